"""The train state on disk: ``<out>/train_state/`` (an Orbax ``CheckpointManager`` keeping the
two newest saves) with a checksum record per save, verified at resume.

Each save of step S first writes ``train_state/S.sha256.json`` — the key path, shape, dtype and
sha256 of every leaf of the :class:`~srp_jax.train.state.TrainState` and the sha256 of the
``extra`` JSON (history, elapsed seconds) — and only then hands the state to Orbax (whose save
is asynchronous). The record exists before the arrays do, so a save that Orbax committed is
always verifiable, whenever the process was killed. (A per-file record like ``checkpoint/``'s
would only exist after the asynchronous commit.)

Resuming restores the newest save, checks its layout against the run's state before reading
it, hashes every restored leaf, and refuses non-finite parameters. A damaged save is reported
as a warning and the previous one is tried; the damaged ones are moved to
``<out>/srp_previous/damaged-<UTC time>/`` so Orbax can save those steps again. With no intact
save left the resume is refused (a :class:`~srp_jax.errors.CheckpointError`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .. import sharding as SH
from .._atomic import write_text_atomic
from ..errors import CheckpointError, OutputError

SUMS_SUFFIX = ".sha256.json"
SUMS_FORMAT = "srp-jax-train-state-sums"
MAX_TO_KEEP = 2


class _Damaged(Exception):
    """One save cannot be resumed from (the message says why)."""


def leaf_records(tree: Any) -> dict[str, dict[str, Any]]:
    """``{key path: {shape, dtype}}`` of a pytree of arrays or ``ShapeDtypeStruct``s."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = {"shape": list(np.shape(leaf)), "dtype": np.dtype(leaf.dtype).name}
    return out


def _leaf_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8) if arr.size else b"").hexdigest()


def _json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def state_sums(host_state: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The checksum record of a host (NumPy) state and its ``extra`` JSON."""
    leaves = leaf_records(host_state)
    for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
        leaves[jax.tree_util.keystr(path)]["sha256"] = _leaf_sha256(np.asarray(leaf))
    return {"format": SUMS_FORMAT, "leaves": leaves, "extra_sha256": _json_sha256(dict(extra))}


class StateStore:
    """``<out>/train_state/`` with verified saves. ``open()`` before use, ``close()`` after."""

    def __init__(self, directory: str | os.PathLike, *, aside_root: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None):
        self.directory = Path(directory).absolute()
        self.aside_root = Path(aside_root).absolute() if aside_root is not None else self.directory.parent / "srp_previous"
        self.log = log or (lambda msg: None)
        self._manager = None

    # ---- lifecycle
    def open(self) -> StateStore:
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            max_to_keep=MAX_TO_KEEP, create=True, enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # what a killed save left (the run holds the directory's lock)
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as exc:
            raise OutputError(f"{self.directory}: cannot open the train state ({exc.strerror or exc})") from None
        return self

    def close(self) -> None:
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()
            self._manager = None
        if SH.is_primary():
            self._drop_orphan_sums()

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ---- save
    def save(self, state: Any, extra: Mapping[str, Any]) -> None:
        """Record the checksums of ``state`` (a TrainState) and ``extra``, then save it (async)."""
        import orbax.checkpoint as ocp

        step = int(state.step)
        if self._manager.latest_step() == step:
            return
        # a frozen copy: Orbax writes it asynchronously, while the loop keeps appending to the
        # history list it was given (a shared list would be saved longer than it was hashed)
        extra = json.loads(json.dumps(dict(extra)))
        record = {"step": step, **state_sums(SH.to_host(state), extra)}  # every process gathers; process 0 writes
        if SH.is_primary():
            write_text_atomic(self.directory / f"{step}{SUMS_SUFFIX}", json.dumps(record, indent=0) + "\n")
        SH.sync_processes(f"srp-jax: checksums of step {step} written")
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra)))
        )
        if SH.is_primary():
            self._drop_orphan_sums(keep=(step,))

    def _drop_orphan_sums(self, keep: tuple[int, ...] = ()) -> None:
        live = set(self.steps()) | set(keep) if self._manager is not None else set(keep) | set(_step_dirs(self.directory))
        for path in self.directory.glob(f"*{SUMS_SUFFIX}"):
            head = path.name[: -len(SUMS_SUFFIX)]
            if head.isdigit() and int(head) not in live:
                path.unlink(missing_ok=True)

    # ---- restore
    def restore(self, template: Any) -> tuple[Any, dict[str, Any], int] | None:
        """The newest intact save as ``(state, extra, step)``, or None when nothing was saved.

        ``template`` is the state's abstract tree (``jax.eval_shape`` of the initialiser). A
        damaged save is skipped with a warning (and moved aside); none intact raises."""
        steps = sorted(self.steps(), reverse=True)
        problems: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, extra = self._restore_verified(step, template)
            except _Damaged as exc:
                problems.append((step, str(exc)))
                continue
            if problems:
                where = self._move_aside([s for s, _ in problems])
                for bad, why in problems:
                    self.log(f"[resume] warning: {self.directory.name}/{bad} is damaged ({why}); moved to {where}")
                self.log(f"[resume] falling back to the previous intact save, step {step}")
            return state, extra, step
        if problems:
            detail = "; ".join(f"step {s}: {why}" for s, why in problems)
            raise CheckpointError(
                f"{self.directory}: no intact saved state to resume from ({detail}); pass --restart to move this run "
                "aside and train from the start"
            )
        return None

    def _read_sums(self, step: int) -> dict[str, Any]:
        path = self.directory / f"{step}{SUMS_SUFFIX}"
        if not path.is_file():
            raise _Damaged(f"its checksum record {path.name} is missing")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            raise _Damaged(f"its checksum record {path.name} is damaged") from None
        if not isinstance(record, dict) or record.get("format") != SUMS_FORMAT or not isinstance(record.get("leaves"), dict):
            raise _Damaged(f"its checksum record {path.name} is damaged")
        return record

    def _restore_verified(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
        import orbax.checkpoint as ocp

        record = self._read_sums(step)
        want = leaf_records(template)
        have = {k: {"shape": v.get("shape"), "dtype": v.get("dtype")} for k, v in record["leaves"].items()
                if isinstance(v, dict)}  # fmt: skip
        if want != have:
            differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise _Damaged(f"it holds another state layout ({', '.join(differ[:3])} differ)")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template), extra=ocp.args.JsonRestore())
            )
        except Exception as exc:  # noqa: BLE001 - Orbax / TensorStore raise many types: one line
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise _Damaged(f"Orbax cannot read it: {type(exc).__name__}: {first}") from None
        state, extra = restored["state"], dict(restored["extra"] or {})
        host = SH.to_host(state)
        for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
            name = jax.tree_util.keystr(path)
            if _leaf_sha256(np.asarray(leaf)) != record["leaves"][name].get("sha256"):
                raise _Damaged(f"array {name} fails its sha256 check")
        if _json_sha256(extra) != record.get("extra_sha256"):
            raise _Damaged("its history record fails its sha256 check")
        if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(host.params)):
            raise _Damaged("its parameters are not finite")
        return state, extra

    def _move_aside(self, steps: list[int]) -> Path:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = self.aside_root / f"damaged-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.aside_root / f"damaged-{stamp}-{n}"
        self._manager.close()
        try:
            if SH.is_primary():  # process 0 moves; the others wait for it
                target.mkdir(parents=True)
                for step in steps:
                    for name in (str(step), f"{step}{SUMS_SUFFIX}"):
                        if (self.directory / name).exists():
                            os.replace(self.directory / name, target / f"{self.directory.name}-{name}")
        except OSError as exc:
            raise OutputError(f"{self.directory}: cannot move damaged saves aside ({exc.strerror or exc})") from None
        finally:
            SH.sync_processes("srp-jax: damaged saves moved aside")
            self.open()  # Orbax re-reads the steps left
        return target


def _step_dirs(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]


__all__ = ["StateStore", "state_sums", "leaf_records", "SUMS_SUFFIX"]
