"""Keep the libraries' log noise off stderr (the CLI does this unless ``--verbose``).

Orbax and TensorStore report a failed read more than once: absl log lines, and — after the
call already raised — exceptions of their background coroutines and threads that Python prints
as "unraisable" (``RuntimeError: Event loop is closed``, "Encountered error while reading
array index", each with a traceback). srp-jax turns the failure itself into one line; this
module drops the echoes. Only exceptions raised in those libraries' own frames (or asyncio's
on their behalf) are dropped; anything else still reaches the previous hooks.
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
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename.replace("\\", "/"))
        tb = tb.tb_next
    return bool(frames) and any(any(p in f for p in _NOISY_PATHS) for f in frames)


def _library_object(obj) -> bool:
    module = getattr(type(obj), "__module__", "") or ""
    code = getattr(obj, "cr_code", None) or getattr(obj, "gi_code", None)
    filename = getattr(code, "co_filename", "") or ""
    return module.split(".")[0] in ("orbax", "tensorstore") or any(p in filename for p in _NOISY_PATHS)


def silence_library_noise() -> None:
    """Install the filters (idempotent, process-wide): the noisy loggers above ERROR go quiet,
    Orbax/TensorStore warnings are ignored, and unraisable / thread exceptions raised in their
    frames are dropped."""
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


__all__ = ["silence_library_noise", "NOISY_LOGGERS"]
