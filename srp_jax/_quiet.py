"""Keep the libraries' log noise off stderr (the CLI does this unless ``--verbose``).

Orbax and TensorStore report a failed read more than once: absl log lines, and — after the
call already raised — exceptions of their background coroutines and threads that Python prints
as "unraisable" (``RuntimeError: Event loop is closed``, "Encountered error while reading
array index", each with a traceback), and TensorStore's C++ threads hand exceptions of the
Python callbacks they run to ``PyErr_Print``, which prints through ``sys.excepthook`` (a bare
"Traceback ..." that can land mid-line in srp-jax's own error message). srp-jax turns the
failure itself into one line; this module drops the echoes. Only exceptions raised in those
libraries' own frames (or asyncio's on their behalf) are dropped; anything else still reaches
the previous hooks — an uncaught exception of srp-jax's own code (whose outermost frame is not
a library's) is always printed.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings

NOISY_LOGGERS = ("absl", "orbax", "tensorstore")
_NOISY_PATHS = ("/orbax/", "/tensorstore/", "/asyncio/", "/absl/")
_installed = False


def _library_traceback(exc_type, exc_value, tb) -> bool:
    if exc_type is RuntimeError and "Event loop is closed" in str(exc_value):
        return True
    frames = _frames(tb)
    return bool(frames) and any(any(p in f for p in _NOISY_PATHS) for f in frames)


def _frames(tb) -> list[str]:
    out = []
    while tb is not None:
        out.append(tb.tb_frame.f_code.co_filename.replace("\\", "/"))
        tb = tb.tb_next
    return out


def _library_callback(exc_type, exc_value, tb) -> bool:
    """An exception printed by ``sys.excepthook`` that began in a library frame: a callback a
    library thread ran (the outermost frame is the library's, not srp-jax's or runpy's).
    No shortcut on the message: an error that reaches srp-jax's own frames is always printed."""
    frames = _frames(tb)
    return bool(frames) and any(p in frames[0] for p in _NOISY_PATHS)


def _library_object(obj) -> bool:
    module = getattr(type(obj), "__module__", "") or ""
    code = getattr(obj, "cr_code", None) or getattr(obj, "gi_code", None)
    filename = getattr(code, "co_filename", "") or ""
    return module.split(".")[0] in ("orbax", "tensorstore") or any(p in filename for p in _NOISY_PATHS)


def silence_library_noise() -> None:
    """Install the filters (idempotent, process-wide): the noisy loggers (and asyncio's records
    about library tasks) go quiet, Orbax/TensorStore warnings are ignored, and unraisable /
    thread / ``PyErr_Print`` exceptions raised in their frames are dropped."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    warnings.filterwarnings("ignore", module=r"orbax(\..*)?")
    warnings.filterwarnings("ignore", module=r"tensorstore(\..*)?")

    previous_unraisable = sys.unraisablehook

    def unraisable(info):
        if _library_object(info.object) or _library_traceback(info.exc_type, info.exc_value, info.exc_traceback):
            return
        previous_unraisable(info)

    sys.unraisablehook = unraisable

    previous_thread = threading.excepthook

    def thread_hook(args):
        if _library_traceback(args.exc_type, args.exc_value, args.exc_traceback):
            return
        previous_thread(args)

    threading.excepthook = thread_hook

    previous_except = sys.excepthook

    def except_hook(exc_type, exc_value, exc_traceback):
        if _library_callback(exc_type, exc_value, exc_traceback):
            return
        previous_except(exc_type, exc_value, exc_traceback)

    sys.excepthook = except_hook

    # "Task exception was never retrieved" for a task Orbax started: asyncio logs it with the
    # task's exception; records without a library traceback still pass
    logging.getLogger("asyncio").addFilter(_AsyncioLibraryFilter())


class _AsyncioLibraryFilter(logging.Filter):
    """Drops an asyncio record whose exception never passed through code outside asyncio, Orbax,
    TensorStore and absl: a task Orbax made around a TensorStore future (``_wrap_awaitable``,
    whose traceback holds asyncio's frames only). A task running srp-jax's (or anyone else's)
    code has a frame of it, and its record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        if not (isinstance(info, tuple) and info[0] is not None):
            return True
        frames = _frames(info[2])
        return not (frames and all(any(p in f for p in _NOISY_PATHS) for f in frames))


__all__ = ["silence_library_noise", "NOISY_LOGGERS"]
