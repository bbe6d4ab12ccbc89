"""The training driver: dataset -> resumable jitted loop -> evaluation -> run directory.

Run directory (the reference runner's, plus Orbax state and the run contract)::

    <out>/srp_run.json     the manifest: resolved config, data fingerprint, what this run wrote
    <out>/.srp_run.lock    held (flock) while a trainer works here
    <out>/train_state/     Orbax CheckpointManager: the full TrainState + history (resume), with
                           a checksum record per save (srp_jax.train.resume)
    <out>/checkpoint/      the final dictionary as an srp-jax checkpoint (save_dictionary)
    <out>/checkpoint.pt    reference-schema .pt (artifacts.export_pt / --export-pt)
    <out>/config.yaml  metrics.json  history.json  compute_meta.json  feature_labels.json  DONE

Saves happen every ``training.checkpoint_every`` steps, at the last step, and whenever
SIGTERM/SIGINT arrive (then the run raises :class:`TrainingInterrupted` after the save is on
disk). Rerunning the same command resumes from the newest intact save; step keys are
``fold_in(seed key, step)``, so a resumed run ends bitwise equal to an uninterrupted one.
The rules of the directory (lock, manifest, resume, ``restart`` / ``force`` /
``extend_steps``) are :mod:`srp_jax.train.rundir`'s; a non-finite loss term, gradient or
parameter stops the run with a :class:`~srp_jax.errors.DivergenceError` (exit 3).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding as SH
from .._atomic import write_text_atomic
from .._hostmem import trim_host_heap
from .._lazy import require_torch
from .._validate import expand_path
from .._version import __version__
from ..progress import Progress
from ..checkpoint import save_dictionary
from ..data import (
    LoadedPayload, build_prism_dataset, data_source, load_payload, payload_files, resolve_data_path, row_sampling_weights,
)
from ..dictionary import Dictionary, load_dictionary
from ..metrics import evaluate, feature_usage, metrics_to_jsonable
from ..config import RunConfig, load_run_config, resolve_eval_k
from ..errors import CheckpointError, DivergenceError, OutputError, ResourceError, RunDirectoryError, SrpError
from . import rundir as R
from .compiled import setup_training
from .resume import StateStore
from .state import TrainState
from .watch import MetricWatchers
from .step import L0_TRAIN_WINDOW, StepSpec, describe_nonfinite, make_optimizer

STATE_DIR = R.STATE_DIR
CHECKPOINT_DIR = R.CHECKPOINT_DIR
FEATURE_LABELS_TOP = 6
WATCHED = ("lr", "lambda_prism", "grad_norm", "mean_l0", "dead_fraction", "aux_loss", "auxk_loss")  # beside the history row


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped training after the state was saved; rerun to resume."""

    def __init__(self, signum: int, step: int, out_dir: Path):
        self.signum, self.step, self.out_dir = signum, step, out_dir
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: state saved under {out_dir / STATE_DIR}; rerun the same command to resume")


# --------------------------------------------------------------------------------------------
# Small host-side helpers


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def _stop_signals():
    """Turn SIGTERM/SIGINT into a flag the loop polls between steps (main thread only)."""
    caught: list[int] = []
    if not _is_main_thread():
        yield caught
        return
    previous = {}

    def handler(signum, frame):  # noqa: ARG001
        caught.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _package_version() -> str:
    return __version__


# --------------------------------------------------------------------------------------------
# The loop


def run_training(
    cfg: RunConfig,
    dataset,
    out_dir: Path | None = None,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    mesh: Any = "config",
    extended_from_steps: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) on ``dataset``. Returns ``{state, history, train_seconds, steps_run,
    mean_l0_train, spec, mesh}``. With ``out_dir`` the state is saved under
    ``out_dir/train_state`` (and resumed from its newest intact save). ``mesh``: a
    ``jax.sharding.Mesh``, None (one device) or ``"config"`` (from ``cfg.mesh``, see
    :func:`srp_jax.sharding.mesh_from_config`). ``extended_from_steps``: the run was recorded
    with that many ``training.steps`` and now continues to ``cfg.training.steps``.

    Every step returns a bitmask of the terms that went non-finite; the host reads the masks at
    the logging cadence and before every save, so a diverged state is never saved: the run
    raises :class:`~srp_jax.errors.DivergenceError` naming the step and the terms."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tcfg, fcfg = cfg.training, cfg.factorizer
    weights = row_sampling_weights(dataset, tcfg.row_sampling)
    if isinstance(mesh, str):
        mesh = SH.mesh_from_config(cfg.mesh)
    spec = StepSpec.build(
        fcfg, tcfg, dataset.d_model, dataset.hidden_train.shape[0], dataset.top_targets.shape[1], sharded=mesh is not None
    )
    optimizer = make_optimizer(tcfg)  # built once: the step and the state share it
    setup = setup_training(
        spec, optimizer, dataset, weights, init_seed=cfg.init_seed, mesh=mesh, approx_recall=cfg.mesh.approx_recall
    )
    fns, data = setup.fns, setup.data
    # XLA:CPU runs several programs' collectives on a shared thread pool: on a multi-device CPU
    # mesh, letting the next sampler start before the step ends can deadlock (rendezvous stuck)
    serialize = mesh is not None and mesh.devices.flat[0].platform == "cpu"
    if mesh is not None:
        log(f"[mesh] data={SH.mesh_shape(mesh)[0]} model={SH.mesh_shape(mesh)[1]} over {mesh.devices.size} devices, "
            f"{jax.process_count()} process(es)")

    history: list[dict[str, Any]] = []
    elapsed_prev = 0.0
    store = None
    state = None
    last_saved: int | None = None
    steps = tcfg.steps
    watchers = None
    try:
        if out_dir is not None:
            out_dir = Path(out_dir)
            store = StateStore(out_dir / STATE_DIR, aside_root=out_dir / R.PREVIOUS_DIR, log=log).open()
            restored = store.restore(setup.abstract)
            if restored is not None:
                state, extra, last_saved = restored
                history = list(extra.get("history", []))
                elapsed_prev = float(extra.get("elapsed_seconds", 0.0))
                log(f"[resume] {out_dir.name}: step {int(state.step)}/{steps} ({elapsed_prev:.1f}s already)")
                if extended_from_steps is not None:
                    state = _extend_l0_window(state, extended_from_steps, steps, log)
        if state is None:
            state = setup.init()
        start = int(state.step)
        progress = progress or Progress(steps)
        watchers = MetricWatchers(  # process 0 only: one event stream per run
            None if out_dir is None else Path(out_dir), tensorboard=cfg.artifacts.tensorboard and SH.is_primary(),
            wandb_project=cfg.artifacts.wandb_project if SH.is_primary() else None, run_name=cfg.run.name,
            config=cfg.to_dict(),
        )
        t_start = time.perf_counter()
        pending: list[tuple[int, Any]] = []  # (step, device nonfinite mask) not yet read

        def extra_now() -> dict[str, Any]:
            return {"history": history, "elapsed_seconds": elapsed_prev + (time.perf_counter() - t_start)}

        def check_finite() -> None:
            if not pending:
                return
            masks = jax.device_get([SH.to_host(mask) for _, mask in pending])
            for (at, _), mask in zip(pending, masks):
                if int(mask):
                    raise _diverged(at, int(mask), last_saved, out_dir, cfg)
            pending.clear()

        def save() -> None:
            nonlocal last_saved
            check_finite()
            store.save(state, extra_now())
            last_saved = int(state.step)

        with _stop_signals() as caught:
            progress.start(start)
            for step in range(start + 1, steps + 1):
                batch = fns.sample(data, state.rng, step)  # the host's count: no device add to dispatch
                state, metrics = fns.step(state, batch)
                if serialize:
                    jax.block_until_ready(state)
                if step == start + 1:  # the first step carries the compilation: time it apart
                    jax.block_until_ready(metrics["loss"])
                    progress.first_done(step)
                    trim_host_heap()  # the compiler's freed memory back to the OS, not kept all run
                pending.append((step, metrics["nonfinite"]))
                if step == 1 or step % tcfg.log_every == 0 or step == steps:
                    check_finite()
                    row = {
                        "step": step,
                        "loss": float(metrics["loss"]),
                        "reconstruction_loss": float(metrics["reconstruction_loss"]),
                        "prism_loss": float(metrics["prism_loss"]),
                    }
                    history.append(row)
                    progress.log(step, row)
                    if watchers.active:
                        watchers.scalars(step, {**row, **{k: float(metrics[k]) for k in WATCHED if k in metrics}})
                if progress.wants_draw():
                    progress.draw(step, float(metrics["loss"]))
                if store is not None and (
                    (tcfg.checkpoint_every > 0 and step % tcfg.checkpoint_every == 0) or step == steps
                ):
                    save()
                if SH.any_process(bool(caught)):  # multi-host: every process stops at this step
                    if store is not None:
                        save()
                        store.wait()
                    progress.close()
                    signum = caught[0] if caught else signal.SIGTERM  # a peer was signalled
                    raise TrainingInterrupted(signum, step, out_dir if out_dir else Path("."))
            check_finite()
            if SH.any_process(bool(caught)) and store is not None:  # a signal during the last step
                save()
        jax.block_until_ready(state.params)
    finally:
        if watchers is not None:
            watchers.close()
        if store is not None:
            store.close()
    progress.close()
    train_seconds = elapsed_prev + (time.perf_counter() - t_start)
    count = int(state.l0_count)
    return {
        "state": state,
        "history": history,
        "train_seconds": train_seconds,
        "steps_run": max(0, steps - start),
        "mean_l0_train": float(state.l0_sum) / count if count > 0 else float("nan"),
        "compile_seconds": progress.compile_seconds,
        "spec": spec,
        "sample_weights": weights,
        "mesh": mesh,
    }


def _extend_l0_window(state: TrainState, old_steps: int, new_steps: int, log: Callable[[str], None]) -> TrainState:
    """``mean_l0_train`` averages the last 1000 steps of the run's length; after extending
    ``training.steps`` the counted window moves. Exact when the new window has not begun yet
    (the sums restart at 0) or starts where the old one did; otherwise say what it covers."""
    done = int(state.step)
    lo_old, lo_new = max(1, old_steps - L0_TRAIN_WINDOW), max(1, new_steps - L0_TRAIN_WINDOW)
    if lo_new > done:
        return state.replace(l0_sum=jnp.zeros_like(state.l0_sum), l0_count=jnp.zeros_like(state.l0_count))
    if lo_new != lo_old:
        log(f"[extend] note: mean_l0_train will also average steps {lo_old}..{lo_new - 1}, counted before the extension")
    return state


_TERM_NAMES = {"reconstruction": "reconstruction loss", "prism": "prism loss", "sparsity": "sparsity terms",
               "auxk": "AuxK loss", "loss": "total loss", "grad": "gradient"}


def _diverged(step: int, mask: int, last_saved: int | None, out_dir: Path | None, cfg: RunConfig) -> DivergenceError:
    terms = describe_nonfinite(mask)
    names = [_TERM_NAMES.get(t, t) for t in terms]
    what = " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]
    if terms == ("parameters",):
        why = f" (the loss terms and gradient were finite: the update overflowed; training.lr = {cfg.training.lr:g})"
    elif "reconstruction" in terms or "prism" in terms:
        why = " (check the data and training.lr)"
    else:
        why = ""
    if out_dir is None:
        kept = "nothing was saved"
    elif last_saved is None:
        kept = "no state was saved before it"
    else:
        kept = f"the last finite state, step {last_saved}, stays in {out_dir / STATE_DIR}"
    return DivergenceError(
        f"training diverged at step {step}: the {what} went non-finite{why}; {kept}; no DONE written",
        step=step, terms=terms,
    )


def _finite_done(out: Path, manifest: R.Manifest | None) -> dict[str, Any] | None:
    """The metrics of a finished run: ``DONE`` and ``metrics.json`` written by this run (the
    manifest records them) and finite; else None."""
    if manifest is None or not (out / R.DONE_FILE).is_file() or not (out / "metrics.json").is_file():
        return None
    if not all(R.matches_record(out / name, manifest.outputs.get(name)) for name in (R.DONE_FILE, "metrics.json")):
        return None
    try:
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("finite_metrics") is True else None


def feature_labels(dictionary, dataset, usage: np.ndarray) -> dict[str, Any]:
    """``{"features": [...]}`` for every feature: its (at most) 6 most activating rows by
    encoder activation over the normalized rows (:func:`srp_jax.labels.feature_labels`, the
    reference's display labelling), placeholder labels ``tok_<id>`` (no tokenizer here; ``srp-jax
    features`` writes them as tokens), and its usage over the evaluated rows."""
    from ..labels import feature_labels as label_records

    features = []
    for record in label_records(dictionary, dataset.readout(), n=FEATURE_LABELS_TOP):
        record = {key: record[key] for key in ("feature_id", "label", "top_token_ids", "top_token_labels")}
        features.append({**record, "usage_count": int(usage[record["feature_id"]])})
    return {"features": features}


def _usage_counts(dictionary, dataset, evaluation, chunk: int = 1024) -> np.ndarray:
    """How many evaluated rows (the first ``max_eval_rows``) use each feature at the audit k."""
    k = resolve_eval_k(evaluation, dictionary.config)
    n_rows = min(int(evaluation.max_eval_rows or dataset.vocab_size), dataset.vocab_size)
    return feature_usage(dictionary, np.asarray(dataset.rows_normalized[:n_rows]), k, row_batch=chunk)


def train(
    config: Any,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | os.PathLike | None = None,
    data_path: str | None = None,
    export_pt: bool | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    force: bool = False,
    restart: bool = False,
    extend_steps: bool = False,
) -> dict[str, Any]:
    """Train one run end to end and write its run directory; returns the metrics dict.

    ``config``: a :class:`RunConfig`, a YAML path, a built-in config name or a mapping
    (``overrides`` / ``out_dir`` / ``data_path`` as the CLI's ``--set`` / ``--out-dir`` /
    ``--data-path``). The run directory is a contract (:mod:`srp_jax.train.rundir`): locked
    while training; resumed only with the config and data its manifest records; a finished run
    (``DONE``) with the same config is not retrained (its metrics are returned) and with
    another config refused. ``restart`` moves a previous run aside first; ``force`` writes into
    a directory holding files srp-jax did not write; ``extend_steps`` lets ``training.steps``
    grow over the recorded value. Raises :class:`TrainingInterrupted` on SIGTERM/SIGINT (after
    saving the state), :class:`~srp_jax.errors.DivergenceError` on a non-finite step and
    :class:`~srp_jax.errors.RunDirectoryError` when the directory refuses the run.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    primary = SH.is_primary()
    if not primary:  # process 0 logs for the run
        log, progress = (lambda msg: None), Progress(1, stream=open(os.devnull, "w"), enabled=False)
    if isinstance(config, RunConfig):
        cfg = config if not (overrides or out_dir is not None or data_path) else load_run_config(
            config.to_dict(), overrides, out_dir=None if out_dir is None else str(out_dir), data_path=data_path
        )
    else:
        cfg = load_run_config(config, overrides, out_dir=None if out_dir is None else str(out_dir), data_path=data_path)
    out = Path(expand_path("run.output_dir", cfg.run.output_dir))
    report = resolve_report_path(cfg.artifacts.report_path) if cfg.artifacts.report_path else None
    want_pt = cfg.artifacts.export_pt if export_pt is None else bool(export_pt)
    if want_pt:
        require_torch("artifacts.export_pt / --export-pt")
    data_source(cfg)  # a missing payload or an unset variable fails here, on every process
    # Process 0 keeps the run directory's contract (the others share the directory, read only).
    lock, created = None, False
    with _agreed("the run directory"):
        if primary:
            # Read-only checks first: a refused directory is left exactly as it was.
            manifest = (R.Manifest.load_if_intact(out) if restart else R.Manifest.load(out)) if out.is_dir() else None
            movable = R.RUN_NAMES if restart else ()
            if restart and manifest is not None and manifest.report:  # a report the old run kept here
                where = Path(manifest.report["path"])
                movable += (where.name,) if where.parent == out.absolute() else ()
            R.check_ownership(out, None if restart else manifest, force=force, movable=movable)
            _check_report_target(report, manifest)  # --restart moves a report the old run wrote
            created = not out.exists()
            R.make_run_dir(out)
            lock = R.RunLock(out)
            lock.acquire()
    try:
        return _train_locked(cfg, out, report, want_pt, progress, log, force=force, restart=restart,
                             extend_steps=extend_steps)
    except SrpError:
        if created and [p.name for p in out.iterdir()] == [R.LOCK_FILE]:  # refused before writing anything
            lock.release()
            (out / R.LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _agreed(what: str):
    """Run a block that only some processes may fail in (process 0's run-directory checks);
    every process leaves it together: all raise when any did (a single process: as is)."""
    failure: BaseException | None = None
    try:
        yield
    except SrpError as exc:
        failure = exc
    if SH.any_process(failure is not None):
        if failure is not None:
            raise failure
        raise RunDirectoryError(f"process 0 refused {what} (its message says why)")


def _train_locked(cfg: RunConfig, out: Path, report: Path | None, want_pt: bool, progress, log, *,
                  force: bool, restart: bool, extend_steps: bool) -> dict[str, Any]:
    """Process 0 checks the manifest and decides (skip / resume / refuse); the others follow."""
    if not SH.is_primary():
        with _agreed("the run"):
            pass
        if SH.any_process(False):  # process 0 skips a finished run
            return _finished_metrics(out)
        loaded = load_payload(cfg, cfg.run.seed)
        extension = None
        if SH.any_process(False):  # process 0 extends training.steps: its manifest (saved) says from what
            extension = (R.Manifest.load(out) or R.Manifest(config={})).extensions[-1]
        return _train_and_write(cfg, out, report, want_pt, progress, log, loaded, None, extension)
    with _agreed("the run"):
        decision = _decide(cfg, out, report, want_pt, log, force=force, restart=restart, extend_steps=extend_steps)
    skip = SH.any_process(decision[0] == "skip")
    if skip:
        return decision[1]
    _, loaded, manifest, extension = decision
    SH.any_process(extension is not None)  # keeps the processes' collectives in step
    return _train_and_write(cfg, out, report, want_pt, progress, log, loaded, manifest, extension)


def _finished_metrics(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _decide(cfg: RunConfig, out: Path, report: Path | None, want_pt: bool, log, *, force: bool, restart: bool,
            extend_steps: bool):
    """``("skip", metrics)`` or ``("train", loaded payload, manifest, extension)``; raises when
    the run directory refuses the run."""
    manifest = R.Manifest.load_if_intact(out) if restart else R.Manifest.load(out)  # again, under the lock
    if restart:
        moved = R.move_previous_run(out, manifest)
        if moved is not None:
            log(f"[restart] moved the previous run's files to {moved}")
        manifest = None
    R.check_ownership(out, manifest, force=force)
    _check_report_target(report, manifest)
    signature = R.run_signature(cfg)
    extension = None
    if manifest is not None:
        extension = _allowed_change(out, R.diff_signatures(manifest.config, signature), cfg, extend_steps)
    path = resolve_data_path(cfg.data.path)
    if manifest is not None and extension is None:
        cached = _finite_done(out, manifest)
        same_files = path is not None and (path.is_file() or path.is_dir()) and manifest.data_matches_stats(
            str(path), tuple(payload_files(path))
        )  # the cheap check: the payload files the manifest recorded, unchanged
        if cached is not None and same_files:
            return "skip", _skip(out, cached, manifest, want_pt, log)
        loaded = load_payload(cfg, cfg.run.seed)
        _check_same_data(out, manifest, loaded)
        if cached is not None:
            manifest.data = R.data_record(loaded.source, loaded.fingerprint, loaded.files)
            manifest.save(out)
            return "skip", _skip(out, cached, manifest, want_pt, log)
    else:
        loaded = load_payload(cfg, cfg.run.seed)
        if manifest is not None:
            _check_same_data(out, manifest, loaded)
    _check_fits(cfg, loaded)
    _check_step(cfg, loaded)
    if loaded.used_fallback:
        log("[data] no data.path: training on the built-in synthetic readout (data.fallback: synthetic)")
    if manifest is None:
        manifest = R.Manifest(config=signature)
    manifest.config = signature
    manifest.data = R.data_record(loaded.source, loaded.fingerprint, loaded.files)
    if extension is not None:
        manifest.extensions.append(extension)
        log(f"[extend] {out.name}: training.steps {extension['from_steps']} -> {extension['to_steps']}")
    if (out / R.DONE_FILE).exists() or (out / R.DONE_FILE).is_symlink():
        (out / R.DONE_FILE).unlink()  # no run is marked done while it trains
        manifest.outputs.pop(R.DONE_FILE, None)
    manifest.save(out)
    return "train", loaded, manifest, extension


def _train_and_write(cfg: RunConfig, out: Path, report: Path | None, want_pt: bool, progress, log,
                     loaded: LoadedPayload, manifest: R.Manifest | None, extension: dict[str, int] | None):
    with _device_errors(cfg, loaded):
        dataset = build_prism_dataset(cfg, loaded, cfg.run.seed)
        result = run_training(
            cfg, dataset, out, progress=progress, log=log,
            extended_from_steps=None if extension is None else extension["from_steps"],
        )
        return _finish(cfg, out, report, want_pt, dataset, result, manifest, log)


def _allowed_change(out: Path, diffs: list, cfg: RunConfig, extend_steps: bool) -> dict[str, int] | None:
    """None when the config matches the manifest's; the extension record when only
    ``training.steps`` grew and ``extend_steps`` allows it; else a RunDirectoryError."""
    if not diffs:
        return None
    hint = ""
    if [key for key, _, _ in diffs] == ["training.steps"]:
        old, new = int(diffs[0][1]), int(diffs[0][2])
        if extend_steps and new > old:
            tc = cfg.training
            fixed = [f"training.{k}={getattr(tc, k)}" for k, plain in (("lr_schedule", "constant"), ("lambda_mode", "constant"))
                     if getattr(tc, k) != plain]  # fmt: skip
            if fixed:
                raise RunDirectoryError(
                    f"{out}: cannot extend training.steps {old} -> {new}: {' and '.join(fixed)} depend(s) on "
                    f"training.steps, so the {old} steps already run followed another schedule than a {new}-step run "
                    "would; start a new run (another --out-dir, or --restart)"
                )
            return {"from_steps": old, "to_steps": new}
        if extend_steps:
            raise RunDirectoryError(f"{out}: training.steps can only grow (recorded {old}, asked {new})")
        if new > old:
            hint = f", or pass --extend-steps to continue this run to {new} steps"
    raise RunDirectoryError(
        f"{out}: holds a run with another config: {R.describe_diff(diffs)}; rerun with the recorded config, "
        f"choose another --out-dir, or pass --restart to move the old run aside{hint}"
    )


def _check_same_data(out: Path, manifest: R.Manifest, loaded: LoadedPayload) -> None:
    recorded = (manifest.data or {}).get("fingerprint")
    if recorded is not None and recorded != loaded.fingerprint:
        source = (manifest.data or {}).get("source")
        raise RunDirectoryError(
            f"{out}: holds a run on other data: data ({source} {recorded[:19]}... -> {loaded.source} "
            f"{loaded.fingerprint[:19]}...); rerun with the recorded data, choose another --out-dir, or pass "
            "--restart to move the old run aside"
        )


def _skip(out: Path, cached: dict[str, Any], manifest: R.Manifest, want_pt: bool, log) -> dict[str, Any]:
    log(f"[skip] {out}: already finished with this config (DONE); pass --restart to train it again")
    if want_pt and not (out / "checkpoint.pt").exists():
        manifest.outputs["checkpoint.pt"] = {"pending": True}
        manifest.save(out)
        _export_finished_run(out, log)
        manifest.outputs["checkpoint.pt"] = R.file_record(out / "checkpoint.pt")
        manifest.save(out)
    return cached


def _check_report_target(report: Path | None, manifest: R.Manifest | None) -> None:
    """``artifacts.report_path`` must be writable and may replace only a report this run wrote."""
    if report is None:
        return
    if report.is_dir():
        raise OutputError(f"artifacts.report_path {report}: is a directory (give a file name, e.g. {report / 'report.md'})")
    for node in report.parents:
        if node.exists() or node.is_symlink():
            if not node.is_dir():
                raise OutputError(f"artifacts.report_path {report}: {node} is a file, not a directory")
            break
    if report.exists() or report.is_symlink():
        record = manifest.report if manifest is not None else None
        if not (record and record.get("path") == str(report.absolute()) and R.matches_record(report, record)):
            raise RunDirectoryError(
                f"artifacts.report_path {report}: exists and was not written by this run; refusing to replace it "
                "(remove it or choose another path)"
            )


def _state_bytes_lower_bound(cfg: RunConfig, d_model: int) -> int:
    """Bytes a run needs at least: float32 parameters, Adam's two moments, one batch of rows
    and its pre-activations."""
    D, B = cfg.factorizer.d_features, cfg.training.batch_size
    n_params = 2 * D * d_model + (1 + len(cfg.factorizer.arch.extra_params)) * D
    return 4 * (3 * n_params + B * d_model + B * D)


def _device_memory() -> int | None:
    device = jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _sizes(cfg: RunConfig, d_model: int) -> str:
    return f"factorizer.d_features={cfg.factorizer.d_features}, d_model={d_model}, training.batch_size={cfg.training.batch_size}"


def _check_step(cfg: RunConfig, loaded: LoadedPayload) -> None:
    """Refuse, before anything is written, a step the config cannot have (an explicit
    ``training.step_strategy: sparse`` where it cannot run, AuxK without a k budget): the
    checks of :meth:`StepSpec.build`, on the run's d_model and mesh."""
    d_model = int(loaded.arrays["W_U"].shape[1])
    sharded = SH.resolve_mesh_shape(cfg.mesh, jax.device_count()) != (1, 1)
    StepSpec.build(cfg.factorizer, cfg.training, d_model, 1, sharded=sharded)


def _check_fits(cfg: RunConfig, loaded: LoadedPayload) -> None:
    """Refuse, before any compute, a run whose state alone exceeds the device's memory."""
    d_model = int(loaded.arrays["W_U"].shape[1])
    need, have = _state_bytes_lower_bound(cfg, d_model), _device_memory()
    if have is not None and need > have:
        raise ResourceError(
            f"the run needs at least {need / 2**30:.1f} GiB ({_sizes(cfg, d_model)}) but the "
            f"{jax.devices()[0].platform} device has {have / 2**30:.1f} GiB; reduce factorizer.d_features or "
            "training.batch_size"
        )


@contextlib.contextmanager
def _device_errors(cfg: RunConfig, loaded: LoadedPayload):
    """Out-of-memory from XLA or NumPy as one :class:`ResourceError` line naming the sizes."""
    d_model = int(loaded.arrays["W_U"].shape[1])
    try:
        yield
    except MemoryError as exc:
        if isinstance(exc, ResourceError):
            raise
        raise ResourceError(f"out of host memory ({_sizes(cfg, d_model)}); reduce them") from None
    except jax.errors.JaxRuntimeError as exc:
        text = str(exc)
        if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
            raise
        first = text.strip().splitlines()[0][:200]
        raise ResourceError(f"out of device memory ({first}) with {_sizes(cfg, d_model)}; reduce them") from None


def _finish(cfg, out, report, want_pt, dataset, result, manifest: R.Manifest | None, log) -> dict[str, Any]:
    """Evaluate the trained state and (process 0) write the run files."""
    state: TrainState = result["state"]

    raw = cfg.to_dict()
    raw.setdefault("run", {})
    raw["run"] = {**(raw.get("run") or {}), "output_dir": str(out)}
    dictionary = Dictionary(
        config=cfg.factorizer,
        params=SH.to_host(state.params),
        buffers=SH.to_host(state.buffers),
        d_model=dataset.d_model,
        **dataset.readout().stats(),
        evaluation=dict(raw.get("evaluation") or {}),
        factorizer_block=dict(raw.get("factorizer") or {}),
    )  # no source_config: the merged config is config.yaml; checkpoint.pt keeps the runner key set
    thresholds = {
        "max_dead_feature_rate": cfg.score_thresholds.max_dead_feature_rate,
        "max_val_logit_kl_bits_mean": cfg.score_thresholds.max_val_logit_kl_bits_mean,
    }
    mesh = result["mesh"]  # on a mesh, evaluation runs there too (params as trained, rows split)
    on_mesh = dictionary if mesh is None else dictionary.replace(params=state.params, buffers=state.buffers)
    t_eval = time.perf_counter()
    with SH.mesh_context(mesh):
        metrics = dict(
            evaluate(on_mesh, dataset.readout(), dataset.hidden_val, evaluation=cfg.evaluation, mode="reference", thresholds=thresholds)
        )
    log(f"[evaluate] {metrics['eval_rows']} rows x {metrics['eval_hidden']} held-out hidden states "
        f"in {time.perf_counter() - t_eval:.1f} s")
    ctrl_on = result["spec"].controller_on
    device = jax.devices()[0]
    commit = _git_commit()
    metrics.update({
        "train_seconds": result["train_seconds"],
        "mean_l0_train": result["mean_l0_train"],
        "l0_controller_enabled": ctrl_on,
        "l0_controller_final_coeff": float(state.controller["coeff"]) if ctrl_on else None,
        "l0_controller_target": cfg.training.l0_controller.target_l0 if ctrl_on else None,
        "data_source": dataset.source_path,
        "used_fallback_data": bool(dataset.used_fallback),
        "val_overlaps_train": bool(dataset.val_overlaps_train),
        "device": device.platform,
        "architecture": cfg.factorizer.architecture,
        "d_features": cfg.factorizer.d_features,
        "init_seed": cfg.init_seed,
        "data_seed": cfg.data_seed,
        "git_commit": commit,
    })  # fmt: skip
    metrics = metrics_to_jsonable(metrics)
    dictionary = dictionary.replace(metrics=dict(metrics))  # the saved copy carries its metrics

    B, d, D = cfg.training.batch_size, dataset.d_model, cfg.factorizer.d_features
    steps_run = result["steps_run"]
    flops = 6 * B * d * D
    compute_meta = {
        "architecture": cfg.factorizer.architecture,
        "d_features": D,
        "d_model": d,
        "steps_run": steps_run,
        "batch_size": B,
        "step_strategy": result["spec"].strategy,
        "row_sampler": cfg.training.row_sampler,
        "train_seconds": result["train_seconds"],
        "seconds_per_step": result["train_seconds"] / max(cfg.training.steps, 1),
        "flops_per_step_est": flops,
        "total_train_flops_est": flops * cfg.training.steps,
        "device": device.platform,
        "gpu_name": device.device_kind if device.platform == "gpu" else None,
        "jax_version": jax.__version__,
        "package_version": _package_version(),
        "git_commit": commit,
    }
    primary = SH.is_primary()
    if primary:
        _write_run_files(out, cfg, raw, dictionary, dataset, metrics, compute_meta, result["history"], want_pt, log,
                         report=report, manifest=manifest)
    SH.sync_processes("srp-jax train: run files written")
    log(
        "[result] "
        + " ".join(
            f"{key}={_fmt(metrics.get(key))}"
            for key in ("selection_score", "row_centered_ev", "val_top1_match", "val_logit_kl_bits_mean",
                        "dead_feature_rate", "rare_feature_rate", "train_seconds")
        )  # fmt: skip
    )
    if primary:
        log(run_summary(out, metrics, steps_run=result["steps_run"], compile_seconds=result.get("compile_seconds")))
    return metrics

def _write_run_files(out, cfg, raw, dictionary, dataset, metrics, compute_meta, history, want_pt, log, *,
                     report: Path | None, manifest: R.Manifest) -> None:
    """Process 0's outputs of a finished run (``DONE`` last), each recorded in the manifest:
    pending before it is written (from then on the name is this run's, even if killed
    mid-write), then its size, mtime and sha256."""
    import yaml

    usage = _usage_counts(dictionary, dataset, cfg.evaluation)
    files = ["compute_meta.json", "config.yaml", "metrics.json", "history.json", "feature_labels.json"]
    written = files + ([CHECKPOINT_DIR] if cfg.artifacts.save_checkpoint else []) + (["checkpoint.pt"] if want_pt else [])
    for name in (*written, R.DONE_FILE):
        manifest.outputs[name] = {"pending": True}
    if report is not None:
        manifest.report = {"path": str(report.absolute()), "pending": True}
    manifest.save(out)

    write_json_atomic(out / "compute_meta.json", compute_meta)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(raw, sort_keys=False))
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "history.json", {"history": history})
    write_json_atomic(out / "feature_labels.json", feature_labels(dictionary, dataset, usage))
    if cfg.artifacts.save_checkpoint:
        save_dictionary(dictionary, out / CHECKPOINT_DIR, force=True)
    if want_pt:
        from convert.checkpoints import dictionary_to_pt  # torch was required above

        dictionary_to_pt(dictionary, out / "checkpoint.pt", force=True)
    if report is not None:
        write_text_atomic(report, run_report(cfg.run.name, metrics, raw))
        manifest.report = {"path": str(report.absolute()), **R.file_record(report)}
        log(f"[report] {report}")
    for name in written:
        manifest.outputs[name] = R.checkpoint_record(out / name) if name == CHECKPOINT_DIR else R.file_record(out / name)
    manifest.save(out)
    write_text_atomic(out / R.DONE_FILE, "done\n")
    manifest.outputs[R.DONE_FILE] = R.file_record(out / R.DONE_FILE)
    manifest.save(out)


SUMMARY_ROWS = (
    ("rowEV", "row_centered_ev", "rowEV", "share of the centred W_U rows' energy the sparse codes reconstruct (1 = exact)"),
    ("top-1", "val_top1_match", "top1", "how often the reconstructed readout picks the model's own top-1 token"),
    ("KL", "val_logit_kl_bits_mean", "KL", "bits between the real and the reconstructed next-token distributions"),
)


def run_summary(out: Path, metrics: Mapping[str, Any], *, steps_run: int | None = None,
                compile_seconds: float | None = None) -> str:
    """The closing summary of a run: where it is, its headline metrics and what they mean."""
    from ..hub import published_ranges

    pub = published_ranges()
    took = f"{metrics.get('train_seconds', float('nan')):.1f} s of training"
    if compile_seconds is not None and math.isfinite(compile_seconds):
        took += f" (first step incl. compile {compile_seconds:.1f} s)"
    lines = [f"[done] {out}: {'' if steps_run is None else f'{steps_run} steps, '}{took}"]
    for label, key, pub_key, meaning in SUMMARY_ROWS:
        value = metrics.get(key)
        text = "n/a" if not isinstance(value, (int, float)) else f"{value:.3f}"
        lo, hi = pub.get(pub_key, (float("nan"), float("nan")))
        lines.append(f"  {label:<6} {text:>6}  {meaning} (published dictionaries: {lo:.2f}-{hi:.2f})")
    dead = metrics.get("dead_feature_rate")
    if isinstance(dead, (int, float)):
        lines.append(f"  {dead:.1%} of features never fire on the evaluated rows; mean L0 {metrics.get('mean_l0', float('nan')):.1f}")
    if metrics.get("finite_metrics") is False:
        lines.append("  WARNING: some metrics are not finite: the run diverged")
    lines.append(f"  load it: srp_jax.load_factorizer({str(out)!r}); files: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return "\n".join(lines)


def _export_finished_run(out: Path, log: Callable[[str], None]) -> None:
    """``--export-pt`` on a finished run: write ``checkpoint.pt`` from its saved dictionary."""
    require_torch(f"writing {out / 'checkpoint.pt'}")
    from convert.checkpoints import dictionary_to_pt

    if not (out / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(
            f"{out}: finished without a {CHECKPOINT_DIR}/ (artifacts.save_checkpoint was false), so there is "
            "nothing to export; pass --restart to train it again"
        )
    dictionary_to_pt(load_dictionary(out / CHECKPOINT_DIR), out / "checkpoint.pt")
    log(f"[export] wrote {out / 'checkpoint.pt'} from {out / CHECKPOINT_DIR}")


FAILURE_NOTES = (
    ("dead_feature_rate", lambda v: v > 0.8, "more than 80% of features are dead"),
    ("top1_logit_residual_frac_mean", lambda v: v > 1.0, "the residual is larger than the top-1 logit on average"),
    ("val_top1_match", lambda v: v < 0.25, "top-1 agreement is below 0.25"),
)


def resolve_report_path(path: str) -> Path:
    """``artifacts.report_path`` with ``${VAR}`` / ``~`` expanded (relative to the working
    directory); an unset variable is a ConfigError naming it."""
    return Path(expand_path("artifacts.report_path", path))


def run_report(name: str, metrics: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The optional markdown run report: a metrics table, failure notes and the merged config."""
    import yaml

    lines = [f"# {name}", "", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            lines.append(f"| {key} | {_fmt(value)} |")
    notes = []
    for key, failed, text in FAILURE_NOTES:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (math.isnan(value) or failed(value)):
            notes.append(f"- {key} = {_fmt(value)}: {text}")
    if metrics.get("finite_metrics") is False:
        notes.append("- some metrics are not finite (NaN/Inf): the run diverged")
    lines += ["", "## Failure notes", "", *(notes or ["none"])]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


__all__ = ["train", "run_training", "TrainingInterrupted", "Progress", "feature_labels", "write_json_atomic", "write_text_atomic"]
