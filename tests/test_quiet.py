"""srp_jax._quiet drops the echoes of library failures, and only those.

Each case runs in a fresh interpreter (the filters are process-wide). A "library" frame is
code compiled with a file name under ``/tensorstore/`` or ``/orbax/``, so the filters see
exactly what they see when TensorStore's or Orbax's own code raises.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent(
    """
    import asyncio, gc, sys
    from srp_jax._quiet import silence_library_noise

    def compiled(path, source):
        space = {}
        exec(compile(source, path, "exec"), space)
        return space

    lib = compiled("/site-packages/tensorstore/_callbacks.py",
                   "def callback():\\n    raise ValueError('LIBRARY-ECHO')\\n"
                   "async def task():\\n    raise ValueError('LIBRARY-TASK')\\n")
    # an awaitable whose frames are asyncio's only, as a TensorStore future (C code) wrapped
    # into a task by asyncio.ensure_future (asyncio's _wrap_awaitable)
    wrapped = compiled("/lib/python3/asyncio/_c_future.py",
                       "class Future:\\n    def __await__(self):\\n        raise ValueError('WRAPPED-TASK')\\n"
                       "        yield\\n")
    own = compiled("/work/srp_jax/own.py",
                   "def callback():\\n    raise ValueError('OWN-ERROR')\\n"
                   "async def task():\\n    raise ValueError('OWN-TASK')\\n")

    def pyerr_print(fn):
        # what TensorStore's C++ threads do with a callback's exception: PyErr_Print, which
        # hands it to sys.excepthook with a traceback that begins in the callback's frame
        try:
            fn()
        except ValueError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__.tb_next)

    def unretrieved(coro_fn):
        # a task whose exception nobody reads: asyncio logs it when the task is collected
        loop = asyncio.new_event_loop()
        awaitable = coro_fn()
        task = asyncio.ensure_future(awaitable, loop=loop)
        loop.run_until_complete(asyncio.sleep(0.01))
        del task
        gc.collect()
        loop.close()
    """
)


def _stderr(body: str, quiet: bool) -> str:
    script = PRELUDE + ("silence_library_noise()\n" if quiet else "") + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.parametrize(
    "body, library_marker, own_marker",
    [
        ("pyerr_print(lib['callback']); pyerr_print(own['callback'])", "LIBRARY-ECHO", "OWN-ERROR"),
        ("unretrieved(lib['task']); unretrieved(own['task'])", "LIBRARY-TASK", "OWN-TASK"),
        ("unretrieved(wrapped['Future']); unretrieved(own['task'])", "WRAPPED-TASK", "OWN-TASK"),
    ],
    ids=["PyErr_Print from a library callback", "asyncio: task exception never retrieved",
         "asyncio: a wrapped library future's task"],
)
def test_library_echoes_dropped_own_errors_kept(body, library_marker, own_marker):
    loud = _stderr(body, quiet=False)
    assert library_marker in loud and own_marker in loud, loud  # the echo exists without the filter
    quiet = _stderr(body, quiet=True)
    assert library_marker not in quiet, quiet
    assert own_marker in quiet and "Traceback (most recent call last)" in quiet, quiet


def test_uncaught_error_of_own_code_still_printed():
    """An uncaught exception of srp-jax's code, even one raised inside a library call, keeps
    its traceback: it has frames outside the libraries."""
    script = PRELUDE + "silence_library_noise()\ndef ours():\n    lib['callback']()\nours()\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "LIBRARY-ECHO" in done.stderr and "Traceback" in done.stderr, done.stderr


def test_uncaught_event_loop_error_of_own_code_still_printed():
    """The message Orbax's closed loops raise is not a pass: raised through srp-jax's own
    frames, it keeps its traceback."""
    script = PRELUDE + ("silence_library_noise()\n"
                        "def ours():\n    raise RuntimeError('Event loop is closed')\nours()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Event loop is closed" in done.stderr and "Traceback" in done.stderr, done.stderr
