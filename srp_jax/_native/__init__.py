"""Native CPU kernels (top-k, gathered-row sums and dots, grouped scatter-add of rows) for
XLA's FFI, built on first use.

XLA:CPU runs ``lax.top_k``, gather and scatter loops on one thread; ``kernels.cc`` does the same work
over the thread pool XLA hands to FFI calls (docs/performance.md). The source ships with the
package and is compiled once per machine with the C++ compiler (``$CXX``, else ``g++``) against
the FFI headers jaxlib ships (``jax.ffi.include_dir()``), into
``<srp-jax cache>/native/<hash of source, jaxlib, compiler>/`` (written to a temporary name and
renamed: concurrent first uses do not see a half-written library). Without a compiler, or with
``SRP_JAX_NATIVE=0``, :func:`load` returns False and the callers keep their XLA loops (the same
results: the top-k bitwise, the scatter-adds in the same summation order); a failed build warns
once with the compiler's message.

* :func:`load` — build (if needed) and register the kernels; True when they can be called.
* :func:`topk` — ``(values, indices)`` (..., k) of x (..., n), as ``jax.lax.top_k``.
* :func:`combine_rows` — ``sum_{s < k_p} coef[b, s] * table[indices[b, s]]`` (B, P, d) at
  nested budgets k_p (the sparse decode).
* :func:`dot_rows` — ``table[indices[b, s]] . probe[b, p]`` (B, P, k).
* :func:`scatter_rows` — ``out[f] = sum_{indices[b, s] == f} coef[b, s] * rows[b]`` (W, d),
  or its transpose (d, W).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

#: set to ``0`` to keep the XLA loops (no build, no native calls)
ENV = "SRP_JAX_NATIVE"
SOURCE = Path(__file__).with_name("kernels.cc")
LIBRARY_NAME = "libsrp_native.so"
#: -ffp-contract=off: no fused multiply-adds, the plain products and sums of the XLA loops
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off")
TARGETS = {"srp_topk": "SrpTopK", "srp_scatter_rows": "SrpScatterRows", "srp_combine_rows": "SrpCombineRows",
           "srp_dot_rows": "SrpDotRows"}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(cxx: str) -> Path:
    """Where the library built by ``cxx`` for this source and jaxlib lives."""
    import jaxlib

    from .._cache import cache_root

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), _compiler_version(cxx).encode(),
                 " ".join(CXXFLAGS).encode()):
        key.update(part)
        key.update(b"\0")
    return cache_root() / "native" / key.hexdigest()[:16] / LIBRARY_NAME


def build(cxx: str, target: Path) -> None:
    """Compile ``kernels.cc`` into ``target`` (atomically: a temporary name, then a rename).
    Raises RuntimeError with the compiler's message when it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *CXXFLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_locked() -> bool:
    if os.environ.get(ENV, "1") == "0":
        return False
    cxx = _compiler()
    try:
        import ctypes

        if cxx is None:
            raise RuntimeError("no C++ compiler ($CXX or g++) on PATH")
        path = library_path(cxx)
        if not path.exists():
            build(cxx, path)
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
            handlers = {name: getattr(lib, symbol) for name, symbol in TARGETS.items()}
        except (OSError, AttributeError):  # a damaged or foreign file under that name: build anew
            build(cxx, path)
            lib = ctypes.cdll.LoadLibrary(str(path))
            handlers = {name: getattr(lib, symbol) for name, symbol in TARGETS.items()}
        for name, handler in handlers.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        warnings.warn(
            f"srp-jax: native CPU kernels unavailable, using XLA's single-threaded loops ({exc}); "
            f"set {ENV}=0 to silence", RuntimeWarning, stacklevel=3)
        return False
    _state["library"] = lib
    _state["path"] = path
    return True


def load() -> bool:
    """Build (once per machine) and register the kernels; True when they are callable. The
    answer is remembered for the process (:data:`ENV` is read on the first call)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _load_locked()
    return bool(_state["ok"])


def topk(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` of float32 x (..., n) by the native kernel: values (..., k)
    descending, int32 indices, equal values to the lower index (bitwise the same result).
    Call :func:`load` first; not differentiable (wrap it in a custom VJP)."""
    shape = (*x.shape[:-1], int(k))
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
    return jax.ffi.ffi_call("srp_topk", out, vmap_method="broadcast_all")(x.astype(jnp.float32))


def scatter_rows(coef: jax.Array, rows: jax.Array, indices: jax.Array, width: int, *,
                 transpose: bool = False) -> jax.Array:
    """``out (width, d)`` with ``out[indices[b, s]] += coef[b, s] * rows[b]`` (coef, indices
    (B, k); rows (B, d)), each table row summed in ascending ``b * k + s`` order; with
    ``transpose`` the (d, width) transpose, written directly. Indices outside [0, width) raise
    at run time. Call :func:`load` first."""
    d = rows.shape[-1]
    shape = (d, int(width)) if transpose else (int(width), d)
    call = jax.ffi.ffi_call("srp_scatter_rows", jax.ShapeDtypeStruct(shape, jnp.float32))
    return call(coef.astype(jnp.float32), rows.astype(jnp.float32), indices.astype(jnp.int32), transpose=bool(transpose))


def combine_rows(table: jax.Array, coef: jax.Array, indices: jax.Array, prefixes: tuple[int, ...] | None = None) -> jax.Array:
    """``out[b, p] = sum_{s < prefixes[p]} coef[b, s] * table[indices[b, s]]`` (B, P, d) for
    table (W, d), coef and indices (B, k); ``prefixes`` ascending in [1, k] (default: (k,)).
    Each sum runs in slot order, one product and one sum per term. Indices outside [0, W)
    raise at run time. Call :func:`load` first."""
    B, k = indices.shape
    prefixes = (int(k),) if prefixes is None else tuple(int(p) for p in prefixes)
    if not prefixes or min(prefixes) < 1 or max(prefixes) > k or list(prefixes) != sorted(prefixes):
        raise ValueError(f"combine_rows: prefixes {prefixes} must be one or more ascending budgets in [1, {k}]")
    out = jax.ShapeDtypeStruct((B, len(prefixes), table.shape[1]), jnp.float32)
    call = jax.ffi.ffi_call("srp_combine_rows", out, vmap_method="sequential")
    return call(table.astype(jnp.float32), coef.astype(jnp.float32), indices.astype(jnp.int32),
                prefixes=np.asarray(prefixes, np.int64))


def dot_rows(table: jax.Array, probe: jax.Array, indices: jax.Array) -> jax.Array:
    """``out[b, p, s] = table[indices[b, s]] . probe[b, p]`` (B, P, k) for table (W, d), probe
    (B, P, d) and indices (B, k), each dot summed in a fixed order. Indices outside [0, W)
    raise at run time. Call :func:`load` first."""
    B, k = indices.shape
    out = jax.ShapeDtypeStruct((B, probe.shape[1], k), jnp.float32)
    call = jax.ffi.ffi_call("srp_dot_rows", out, vmap_method="sequential")
    return call(table.astype(jnp.float32), probe.astype(jnp.float32), indices.astype(jnp.int32))


__all__ = ["ENV", "load", "topk", "combine_rows", "dot_rows", "scatter_rows", "library_path", "build"]
