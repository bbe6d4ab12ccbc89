"""Shared, framework-free pieces of the benchmark: shapes, synthetic data, FLOP counts, memory.

Nothing here imports jax or torch, so the orchestrator (``bench/run.py``) stays light and every
implementation is measured in its own subprocess (``bench/worker.py``) from the same NumPy
arrays.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from typing import Any

import numpy as np

LR = 1e-3
WEIGHT_DECAY = 1e-4
LAMBDA_PRISM = 1e-3  # the paper's prism weight; constant (the shipped trainer's schedule)
CODE_L2 = 1e-6  # the paper recipe's code L2


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark problem: readout (V, d), dictionary width D, TopK k, batch B, hidden pool N.

    The prism batch is min(B, N) (training-and-checkpoints.md §1.3 item 4).
    """

    name: str
    d: int
    D: int
    k: int
    V: int
    batch: int
    n_hidden: int = 2048

    @property
    def prism_batch(self) -> int:
        return min(self.batch, self.n_hidden)

    def to_dict(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)


# The smoke config (configs/smoke.yaml: synthetic 1024 x 128 readout, D 1024, k 32, batch 256,
# 256 hidden states; benchmarked as plain TopK), SmolLM2-135M 16x/k128, and a Qwen3.5-2B-shaped
# 16x/k128 step (vocabulary 248320).
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("smoke", d=128, D=1024, k=32, V=1024, batch=256, n_hidden=256),
        Shape("smollm2_b1024", d=576, D=9216, k=128, V=49152, batch=1024),
        Shape("smollm2_b4096", d=576, D=9216, k=128, V=49152, batch=4096),
        Shape("qwen35_2b_b1024", d=2048, D=32768, k=128, V=248320, batch=1024),
        # a few-second shape for the harness's own test (--smoke)
        Shape("tiny", d=16, D=64, k=4, V=200, batch=32, n_hidden=40),
    )
}


def synthetic_arrays(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic float32 stand-ins for a payload of ``shape``, already preprocessed.

    ``W_U`` (V, d) Gaussian rows around a shared offset, ``row_mean`` (d,), ``row_norms`` (V,),
    ``rows_normalized`` (V, d) unit rows, ``hidden`` (N, d), ``top_targets`` (N, 1) int32 random
    row positions (the step's cost does not depend on which rows are targets, and computing true
    top-1 targets over a 248k vocabulary would dominate the set-up), ``sample_weights`` (V,)
    float64 a hybrid 50 % frequency / 50 % uniform mix over random Zipf-like counts.
    """
    rng = np.random.default_rng(seed)
    V, d = shape.V, shape.d
    W = rng.standard_normal((V, d), dtype=np.float32)
    W *= np.float32(0.05)
    W += rng.standard_normal(d, dtype=np.float32) * np.float32(0.02)
    row_mean = W.mean(axis=0, dtype=np.float64).astype(np.float32)
    rows = W - row_mean
    norms = np.empty(V, np.float32)
    for i in range(0, V, 8192):  # in blocks: no (V, d) float64 temporary at the 248k vocabulary
        block = rows[i : i + 8192].astype(np.float64)
        norms[i : i + 8192] = np.sqrt(np.sum(block * block, axis=1))
    norms = np.maximum(norms, np.float32(1e-8))
    rows /= norms[:, None]
    hidden = rng.standard_normal((shape.n_hidden, d), dtype=np.float32)
    targets = rng.integers(0, V, (shape.n_hidden, 1), dtype=np.int64).astype(np.int32)
    counts = np.maximum(rng.zipf(1.5, V).astype(np.float64) - 1.0, 1.0)
    weights = 0.5 * counts / counts.sum() + 0.5 / V
    return {
        "W_U": W,
        "row_mean": row_mean,
        "row_norms": norms,
        "rows_normalized": rows,
        "hidden": hidden,
        "top_targets": targets,
        "sample_weights": weights / weights.sum(),
    }


def init_factorizer_arrays(d: int, D: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One random TopK dictionary in the reference's layout and init: ``encoder.weight`` (D, d)
    ~ N(0, 0.02), ``encoder.bias`` (D,) zeros, ``decoder`` (D, d) unit rows. Used where both
    implementations must hold the same parameters (decomposition, reconstruction)."""
    rng = np.random.default_rng(seed + 1)
    enc = (rng.standard_normal((D, d), dtype=np.float32) * np.float32(0.02)).astype(np.float32)
    dec = rng.standard_normal((D, d), dtype=np.float32)
    dec /= np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), np.float32(1e-8))
    return {"encoder.weight": enc, "encoder.bias": np.zeros(D, np.float32), "decoder": dec}


# --------------------------------------------------------------------------------------------
# FLOP counts (multiply-add = 2 FLOPs)


def train_step_flops(shape: Shape, prism: bool) -> dict[str, float]:
    """FLOPs of one TopK training step, two ways.

    ``required``: what a TopK step cannot avoid. Per row of a batch of n rows: the dense encoder
    forward 2·d·D (every pre-activation is needed to find the top k); then only the k active
    latents matter: sparse decode 2·k·d, decoder-row gradient 2·k·d, code-value gradient 2·k·d,
    encoder-weight gradient (k active pre-activation gradients times x) 2·k·d. The prism term
    (n = min(B, N) rows) costs the same per row plus its O(d) dot products. The optimizer side
    (clip, AdamW, decoder renorm) is counted as 20 FLOPs per parameter.

    ``dense``: what the dense reference computes: encoder forward 2·n·d·D, dense decode
    2·n·D·d, decoder gradient 2·n·D·d, code gradient 2·n·D·d and encoder-weight gradient
    2·n·d·D, i.e. 10·n·d·D per batch, plus the same O(d) and optimizer terms.
    """
    d, D, k = shape.d, shape.D, shape.k
    n_rows = [shape.batch] + ([shape.prism_batch] if prism else [])
    params = 2 * D * d + D
    optimizer = 20.0 * params
    required = optimizer
    dense = optimizer
    for n in n_rows:
        small = 8.0 * n * d  # residuals, dot products, losses (O(d) per row)
        required += n * (2.0 * d * D + 8.0 * k * d) + small
        dense += n * (10.0 * d * D) + small
    return {"required": required, "dense": dense}


def matmul_flops(n: int) -> float:
    """FLOPs of one (n x n) @ (n x n) product."""
    return 2.0 * n**3


# --------------------------------------------------------------------------------------------
# Memory and timing helpers


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size (bytes), or None off Linux."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size since start or the last ``reset_peak_rss`` (VmHWM), bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover - non-Unix
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5) so a peak measured afterwards
    excludes set-up transients. Returns False when the kernel does not allow it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
    """(seconds, result) of one call; ``fn`` must return only when its work is done."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
