"""Atomic file output: write next to the destination, then rename onto it.

Readers never see a half-written file, and a failure leaves the destination untouched.
Temp files are created private (``mkstemp``: 0600, ``mkdtemp``: 0700); before the rename they
get the permissions an ordinary ``open``/``mkdir`` would have given them under the umask.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_permissions(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give ``path`` the mode a plain create would have (0666 / 0777 minus the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in ``path``'s directory; on a clean exit it is fsynced, given
    umask permissions and renamed onto ``path``; on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
