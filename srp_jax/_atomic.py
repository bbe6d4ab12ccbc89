"""Atomic file output: write next to the destination, then rename onto it.

Readers never see a half-written file, and a failure leaves the destination untouched.
Temp files are created private (``mkstemp``: 0600, ``mkdtemp``: 0700); before the rename they
get the permissions an ordinary ``open``/``mkdir`` would have given them under the umask.

Every temporary name beside a destination ``NAME`` is ``.NAME.tmp-<pid>-<random>`` (a file, or
a private folder holding the file under its final name); a directory swapped out by a replace
is ``.NAME.old-<random>``. A writer killed half-way (``kill -9``) leaves those behind; the next
successful write to the same destination removes them (:func:`clean_stale_siblings`): temp
names whose process is gone, and swapped-out folders. Litter of a process that still runs is
never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

LEGACY_STALE_SECONDS = 3600.0  # temp names without a pid (older srp-jax) count as stale after this


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_permissions(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give ``path`` the mode a plain create would have (0666 / 0777 minus the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporary names beside a destination called ``name``."""
    return f".{name}.tmp-{os.getpid()}-"


def old_prefix(name: str) -> str:
    """The prefix of a destination folder swapped out while it is being replaced."""
    return f".{name}.old-"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left beside ``path``: ``.NAME.tmp-<pid>-*`` of processes that
    no longer run (and pid-less temp names of older versions untouched for an hour), and
    ``.NAME.old-*`` folders. Call it after ``path`` was written; returns what was removed."""
    path = Path(path)
    parent, name = path.parent, path.name
    tmp_re = re.compile(r"^\." + re.escape(name) + r"\.tmp-(?:(\d+)-)?[^/]*$")
    legacy_file_re = re.compile(r"^\." + re.escape(name) + r"\.[A-Za-z0-9_]{8}\.tmp$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(f".{name}."):
            continue
        stale = False
        match = tmp_re.match(entry.name)
        if match is not None:
            if match.group(1) is not None:
                stale = int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1)))
            else:
                stale = _age(entry, now) > LEGACY_STALE_SECONDS
        elif legacy_file_re.match(entry.name):
            stale = _age(entry, now) > LEGACY_STALE_SECONDS
        elif entry.name.startswith(old_prefix(name)):
            stale = True  # the destination itself is in place again: this copy is obsolete
        if stale:
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _age(entry: os.DirEntry, now: float) -> float:
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def check_writable_parent(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Create ``path``'s parent folders and check that a file can be created there; raise an
    :class:`~srp_jax.errors.OutputError` naming the problem (a file in the way, read-only)."""
    path = Path(path)
    parent = path.parent
    for node in (parent, *parent.parents):
        if node.exists() or node.is_symlink():
            if not node.is_dir():
                raise OutputError(f"{path}: cannot write the {what}: {node} is a file, not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the folder {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write the {what}: {parent} is not writable")
    return parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, keep_name: bool = False) -> Iterator[Path]:
    """Yield a temp path in ``path``'s directory; on a clean exit it is fsynced, given
    umask permissions and renamed onto ``path``; on any error it is removed.

    ``keep_name``: the temp file carries ``path``'s own name inside a private temp folder
    (for writers that record the file name in the file, as ``torch.save`` does)."""
    path = Path(path)
    check_writable_parent(path)
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"{path}: is a directory; refusing to replace it with a file")
    try:
        if keep_name:
            holder = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
            tmp = holder / path.name
        else:
            fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
            os.close(fd)
            holder, tmp = None, Path(tmp_name)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a file in {path.parent} ({exc.strerror or exc})") from None
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        publish_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)
    clean_stale_siblings(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")



def sha256_of_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed in ``chunk``-byte reads (never the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


__all__ = [
    "sha256_of_file",
    "atomic_file",
    "write_text_atomic",
    "publish_permissions",
    "temp_prefix",
    "old_prefix",
    "clean_stale_siblings",
    "check_writable_parent",
]
