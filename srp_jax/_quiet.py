"""Keep the libraries' log noise off stderr (the CLI does this unless ``--verbose``).

Orbax and TensorStore report a failed read more than once: absl log lines, and — after the
call already raised — exceptions of their background coroutines and threads that Python prints
as "unraisable" (``RuntimeError: Event loop is closed``, "Encountered error while reading
array index", each with a traceback), and TensorStore's C++ threads hand exceptions of the
Python callbacks they run to ``PyErr_Print``, which prints through ``sys.excepthook`` (a bare
"Traceback ..." that can land mid-line in srp-jax's own error message). srp-jax turns the
failure itself into one line; this module drops the echoes. Only exceptions raised in those
libraries' own frames (or asyncio's on their behalf) are dropped; anything else still reaches
the previous hooks — an uncaught exception of srp-jax's own code (a traceback with a frame
outside those libraries) is always printed.
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


def _only_library_frames(tb) -> bool:
    """Every frame of the traceback is Orbax's, TensorStore's, absl's or asyncio's: an echo of a
    library's own failure (a callback its thread ran, a task it made around a TensorStore future,
    whose frames are asyncio's only). An error that passed through srp-jax's (or any other)
    code has a frame of it and is always printed; no shortcut on the message."""
    frames = _frames(tb)
    return bool(frames) and all(any(p in f for p in _NOISY_PATHS) for f in frames)


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
        if _only_library_frames(exc_traceback):
            return
        previous_except(exc_type, exc_value, exc_traceback)

    sys.excepthook = except_hook

    # "Task exception was never retrieved" for a task Orbax started: asyncio logs it with the
    # task's exception
    logging.getLogger("asyncio").addFilter(_AsyncioLibraryFilter())


class _AsyncioLibraryFilter(logging.Filter):
    """Drops asyncio's record of a task exception nobody read when that exception is a
    library's echo (:func:`_only_library_frames`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (isinstance(info, tuple) and info[0] is not None and _only_library_frames(info[2]))


__all__ = ["silence_library_noise", "NOISY_LOGGERS"]
