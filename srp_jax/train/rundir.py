"""The run directory as a contract: a lock, a manifest, and nothing touched that is not ours.

A run directory ``<out>`` belongs to one run:

* ``<out>/.srp_run.lock`` is held (``fcntl.flock``, exclusive) for the life of a ``train``
  call; a second trainer on the same directory is refused naming the holder's pid.
* ``<out>/srp_run.json`` (the manifest) is written when a run starts: the resolved config
  (:func:`run_signature`), the data's fingerprint (:func:`srp_jax.data.payload_fingerprint`),
  the ``training.steps`` extensions, and a record (size, mtime, sha256) of every output the run
  wrote. A rerun resumes only when config and data match; a finished run (``DONE``) with the
  same config is skipped, with another config refused.
* Entries the manifest does not account for are *foreign*: ``train`` refuses such a directory
  before any compute unless ``force``; ``restart`` moves the previous run's files (never
  anything else) to ``<out>/srp_previous/<UTC time>/``.

:mod:`srp_jax.train.loop` drives this; nothing here computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._atomic import sha256_of_file, write_text_atomic
from .._version import __version__
from ..checkpoint import METADATA_FILE, is_srp_checkpoint
from ..config import RunConfig
from ..errors import OutputError, RunDirectoryError

MANIFEST_FILE = "srp_run.json"
LOCK_FILE = ".srp_run.lock"
PREVIOUS_DIR = "srp_previous"
STATE_DIR = "train_state"
CHECKPOINT_DIR = "checkpoint"
DONE_FILE = "DONE"
OUTPUT_FILES = ("config.yaml", "metrics.json", "history.json", "compute_meta.json", "feature_labels.json",
                "checkpoint.pt", DONE_FILE)  # fmt: skip
RUN_NAMES = (MANIFEST_FILE, STATE_DIR, CHECKPOINT_DIR, *OUTPUT_FILES)
MANIFEST_FORMAT = "srp-jax-run"
MANIFEST_VERSION = 1

# Config keys that do not change what a run computes (names, where it writes, how often it saves,
# which devices run it, what it exports): they may differ between a run and its resume.
_UNSIGNED = ("run.name", "run.output_dir", "run.device", "data.path", "data.row_preprocessing",
             "training.checkpoint_every")  # fmt: skip


# --------------------------------------------------------------------------------------------
# The resolved config


def run_signature(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as ``{dotted key: value}`` (defaults filled in), without the keys that
    do not change the computation (``run.name`` / ``output_dir`` / ``device``, ``data.path`` —
    the data fingerprint stands for it —, ``training.checkpoint_every``, ``mesh``, ``artifacts``,
    ``model``). Two runs with equal signatures and data fingerprints compute the same weights."""
    sig: dict[str, Any] = {"run.seed": cfg.run.seed, "run.init_seed": cfg.init_seed}
    for field in dataclasses.fields(cfg.data):
        sig[f"data.{field.name}"] = getattr(cfg.data, field.name)
    sig["data.data_seed"] = cfg.data_seed
    for key, value in cfg.factorizer.to_dict().items():
        sig[f"factorizer.{key}"] = value
    for field in dataclasses.fields(cfg.training):
        value = getattr(cfg.training, field.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                sig[f"training.{field.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            sig[f"training.{field.name}"] = value
    for key, value in cfg.evaluation.to_dict().items():
        sig[f"evaluation.{key}"] = value
    for field in dataclasses.fields(cfg.score_thresholds):
        sig[f"autoresearch.score_thresholds.{field.name}"] = getattr(cfg.score_thresholds, field.name)
    for key in _UNSIGNED:
        sig.pop(key, None)
    return json.loads(json.dumps(sig, sort_keys=True))  # tuples -> lists: what the manifest holds


def diff_signatures(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, recorded, now)]`` for every key whose value differs (a missing key is ``None``)."""
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def describe_diff(diffs: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    parts = [f"{k} ({_short(a)} -> {_short(b)})" for k, a, b in diffs[:limit]]
    if len(diffs) > limit:
        parts.append(f"and {len(diffs) - limit} more")
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------
# File records


_sha256_file = sha256_of_file


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest remembers of a file it wrote: size, mtime_ns and sha256."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(path)}


def checkpoint_record(path: Path) -> dict[str, Any]:
    """What the manifest remembers of the ``checkpoint/`` it wrote: its metadata checksum."""
    try:
        document = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
        digest = document.get("content_sha256")
    except (OSError, ValueError, AttributeError):
        digest = None
    return {"kind": "srp-checkpoint", "content_sha256": digest}


def matches_record(path: Path, record: Mapping[str, Any] | None) -> bool:
    """True when ``path`` is still what the manifest recorded (a pending record always is)."""
    if not isinstance(record, Mapping):
        return False
    if record.get("pending"):
        return True
    if record.get("kind") == "srp-checkpoint":
        return path.is_dir() and is_srp_checkpoint(path) and checkpoint_record(path) == dict(record)
    if not path.is_file() or path.is_symlink():
        return False
    st = path.stat()
    if st.st_size != record.get("size"):
        return False
    if st.st_mtime_ns == record.get("mtime_ns"):
        return True
    return _sha256_file(path) == record.get("sha256")


# --------------------------------------------------------------------------------------------
# The manifest


@dataclasses.dataclass
class Manifest:
    """``srp_run.json``: ``config`` (:func:`run_signature`), ``data`` (fingerprint, source,
    payload file stats), ``extensions`` (``training.steps`` growths), ``outputs`` (name ->
    record), ``report`` (the ``artifacts.report_path`` file this run wrote)."""

    config: dict[str, Any]
    data: dict[str, Any] | None = None
    extensions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] | None = None
    created: str = ""

    @classmethod
    def load_if_intact(cls, out: Path) -> Manifest | None:
        """The manifest, or None when it is missing or damaged (what ``--restart`` moves aside)."""
        try:
            return cls.load(out)
        except RunDirectoryError:
            return None

    @classmethod
    def load(cls, out: Path) -> Manifest | None:
        path = out / MANIFEST_FILE
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise RunDirectoryError(
                f"{path}: the run manifest is damaged ({type(exc).__name__}); pass --restart to move this run aside"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("config"), dict):
            raise RunDirectoryError(f"{path}: not an srp-jax run manifest; pass --restart to move this run aside")
        if doc.get("format_version") != MANIFEST_VERSION:
            raise RunDirectoryError(f"{path}: run manifest version {doc.get('format_version')!r} is not supported")
        return cls(
            config=dict(doc["config"]),
            data=doc.get("data"),
            extensions=list(doc.get("extensions") or []),
            outputs=dict(doc.get("outputs") or {}),
            report=doc.get("report"),
            created=str(doc.get("created") or ""),
        )

    def save(self, out: Path) -> None:
        doc = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "written_by": f"srp-jax {__version__}",
            "created": self.created or _now(),
            "config": self.config,
            "data": self.data,
            "extensions": self.extensions,
            "outputs": self.outputs,
            "report": self.report,
        }
        text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
        with contextlib.suppress(OSError):
            if (out / MANIFEST_FILE).read_text(encoding="utf-8") == text:
                return  # unchanged: a refused or resumed run leaves the file as it was
        write_text_atomic(out / MANIFEST_FILE, text)
        self.created = doc["created"]

    def data_matches_stats(self, source: str, files: tuple[Path, ...]) -> bool:
        """True when the recorded payload came from ``source`` and its files still have the
        recorded size and mtime (the cheap check a finished run is skipped on)."""
        if not self.data or self.data.get("source") != source:
            return False
        recorded = {str(p): (s, m) for p, s, m in self.data.get("files") or []}
        now = {}
        for f in files:
            st = f.stat()
            now[str(f)] = (st.st_size, st.st_mtime_ns)
        return bool(now) and recorded == now


def data_record(source: str, fingerprint: str, files: tuple[Path, ...]) -> dict[str, Any]:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f), st.st_size, st.st_mtime_ns])
    return {"fingerprint": fingerprint, "source": source, "files": stats}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# The lock


class RunLock:
    """An exclusive ``flock`` on ``<out>/.srp_run.lock`` holding this process's pid. The kernel
    drops it when the process dies (even ``kill -9``), so a stale lock file never blocks."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self._fh = None

    def acquire(self) -> None:
        import fcntl

        try:
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"{self.path.parent}: cannot write in the run directory ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            pid = holder.split()[0] if holder.split() else holder
            raise RunDirectoryError(
                f"{self.path.parent}: another srp-jax train (pid {pid}) is using this run directory; "
                "wait for it to finish or choose another --out-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------------------------
# Ownership


def _is_litter(name: str) -> bool:
    """A temp or swapped-out name one of our writes leaves beside its destination."""
    for own in (*RUN_NAMES, LOCK_FILE):
        if name.startswith(f".{own}.tmp-") or name.startswith(f".{own}.old-"):
            return True
        if re.fullmatch(r"\." + re.escape(own) + r"\.[A-Za-z0-9_]{8}\.tmp", name):
            return True
    return False


def foreign_entries(out: Path, manifest: Manifest | None) -> list[str]:
    """Entries of ``out`` this run directory's manifest does not account for."""
    if not out.is_dir():
        return []
    foreign = []
    for name in sorted(os.listdir(out)):
        path = out / name
        if name in (LOCK_FILE, MANIFEST_FILE, PREVIOUS_DIR) or _is_litter(name):
            continue
        if manifest is not None and _is_our_report(path, manifest):
            continue
        if manifest is None:
            foreign.append(name)
        elif name == STATE_DIR and path.is_dir() and not path.is_symlink():
            continue  # every save in it carries its own checksums
        elif not matches_record(path, manifest.outputs.get(name)):
            foreign.append(name)
    return foreign


def _is_our_report(path: Path, manifest: Manifest) -> bool:
    record = manifest.report
    return bool(record) and record.get("path") == str(path.absolute()) and matches_record(path, record)


def _names(entries: list[str], limit: int = 6) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_ownership(out: Path, manifest: Manifest | None, *, force: bool, movable: tuple[str, ...] = ()) -> list[str]:
    """Refuse ``out`` when it holds entries this run did not write (unless ``force``), and —
    even with ``force`` — entries a run could not safely write over. ``movable``: names that
    ``--restart`` is about to move aside (not counted). Returns the foreign entries that
    ``force`` lets the run write beside (or over, for same-named outputs)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, not a run directory (choose another --out-dir)")
    foreign = [name for name in foreign_entries(out, manifest) if name not in movable]
    if not foreign:
        return []
    if not force:
        legacy = " (a run directory of an older srp-jax? --restart moves its files aside)" if (
            manifest is None and (out / STATE_DIR).exists()
        ) else ""
        raise RunDirectoryError(
            f"{out}: holds files srp-jax did not write for this run: {_names(foreign)}{legacy}; choose another "
            "--out-dir, or pass --force to write beside them (same-named outputs are replaced)"
        )
    for name in foreign:
        path = out / name
        if name == STATE_DIR:
            raise RunDirectoryError(
                f"{out}: {STATE_DIR}/ was not written by a run this directory records, so it cannot be resumed "
                "or trusted; pass --restart to move it aside"
            )
        if name == CHECKPOINT_DIR and not (path.is_dir() and is_srp_checkpoint(path)):
            raise RunDirectoryError(f"{path}: exists and is not an srp-jax checkpoint; refusing to replace it (remove it first)")
        if name in OUTPUT_FILES and (path.is_dir() or path.is_symlink()):
            raise RunDirectoryError(f"{path}: exists and is not a regular file; refusing to replace it (remove it first)")
    return foreign


def make_run_dir(out: Path) -> None:
    """Create the run directory (and its parents), or say in one line why it cannot be."""
    for node in (out, *out.parents):
        if node.exists() or node.is_symlink():
            if not node.is_dir():
                where = "is a file" if node == out else f"is under {node}, which is a file"
                raise OutputError(f"{out}: {where}, not a run directory (choose another --out-dir)")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the run directory ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: the run directory is not writable")


def move_previous_run(out: Path, manifest: Manifest | None = None) -> Path | None:
    """``--restart``: move the previous run's files (the manifest, ``train_state/``,
    ``checkpoint/``, the outputs and, when ``manifest`` records it, its
    ``artifacts.report_path`` file; nothing else) to ``<out>/srp_previous/<UTC time>/``."""
    present = [name for name in RUN_NAMES if (out / name).exists() or (out / name).is_symlink()]
    report = Path(manifest.report["path"]) if manifest is not None and manifest.report else None
    if report is not None and not _is_our_report(report, manifest):
        report = None
    if not present and report is None:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = out / PREVIOUS_DIR / stamp
    n = 1
    while target.exists():
        n += 1
        target = out / PREVIOUS_DIR / f"{stamp}-{n}"
    try:
        target.mkdir(parents=True)
        for name in present:
            os.replace(out / name, target / name)
        if report is not None:
            import shutil

            (target / "report").mkdir()
            shutil.move(str(report), str(target / "report" / report.name))
    except OSError as exc:
        raise OutputError(f"{out}: cannot move the previous run aside ({exc.strerror or exc})") from None
    return target


__all__ = [
    "MANIFEST_FILE",
    "LOCK_FILE",
    "PREVIOUS_DIR",
    "STATE_DIR",
    "CHECKPOINT_DIR",
    "OUTPUT_FILES",
    "Manifest",
    "RunLock",
    "run_signature",
    "diff_signatures",
    "describe_diff",
    "file_record",
    "checkpoint_record",
    "matches_record",
    "data_record",
    "foreign_entries",
    "check_ownership",
    "move_previous_run",
    "make_run_dir",
]
