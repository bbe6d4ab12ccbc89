"""Evaluation metrics: how faithfully a dictionary reproduces a model's readout.

``evaluate(dictionary, readout, hidden)`` returns one flat dict of JSON-safe Python numbers.
Two modes (spec decision 3):

``mode="reference"`` (default)
    Re-derives the ``metrics`` block the PyTorch reference stores in ``checkpoint.pt``
    (``evaluate_model``), key for key: the vocabulary is the **first** ``max_eval_rows`` rows of
    the readout (not a sample, not held out), softmax / top-1 / top-k / KL run over that
    truncated vocabulary, logits and log-softmax are float32, and only usage counts, usage-derived
    rates and the L0 quantiles are float64. No softcap.

``mode="full"``
    The paper's headline protocol: every readout row is the vocabulary (``max_eval_rows`` is
    ignored), the log-softmax behind KL runs in float64, and an optional logit softcap
    ``cap * tanh(l / cap)`` (Gemma: 30) is applied to both logit sets (in float32, as the
    reference's headline runner does) before the softmax, top-1 and top-k overlap. The
    top-1 residual, coverages, identity check and the top-1 vs top-2 margin frontier use the
    linear (pre-softcap) logits. Same keys as ``reference`` (computed over the whole
    vocabulary, aggregates in float64), plus ``kl_bits_p90``, ``frontier_pass_at_0.5``,
    ``frontier_sign_agreement``, ``softcap`` and ``eval_mode``.

Every encoding goes through the shared kernels of :mod:`srp_jax.factorizers` in jitted chunks
(always eval mode, as the reference calls ``model.eval()`` first). The building blocks are
exposed as pure functions (``row_centered_ev``, ``kl_bits``, ``top1_match``, ``topk_overlap``,
``contribution_coverage``, ...) and host-side helpers (``usage_stats``, ``selection_score``,
``duplicate_decoder_frac``, ``pearson``, ``spearman``, ``quantile_linear``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import factorizers as F
from . import sharding as SH
from .factorizers import sparse as S
from .compile import DATA, MODEL, compiled, mesh_axis_size
from ._arrays import as_float_array, as_host_float_array, check_last_dim, is_spread
from .config import EvaluationConfig, resolve_eval_k
from .dictionary import inference_view
from .errors import ConfigError, ShapeError
from .readout import denormalize_rows

HIGHEST = jax.lax.Precision.HIGHEST
LN2 = math.log(2.0)
COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity default
IDENTITY_GATE = 1e-3  # selection_score's fixed identity threshold
DEFAULT_THRESHOLDS = {"max_dead_feature_rate": 0.98, "max_val_logit_kl_bits_mean": 20.0}
FRONTIER_FLOOR = 0.5
FRONTIER_TOL = 0.5
MODES = ("reference", "full")


# ============================================================================================
# Pure building blocks (jnp; jit/vmap friendly)


def row_centered_ev(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """rowEV = 1 - sum (x - x_hat)^2 / max(sum x^2, 1e-12) over all rows and dims.

    x, x_hat: (V, d) normalized rows and their reconstructions. No mean subtraction and no
    row weighting ("centered" refers to the row-mean removal done in preprocessing). Composed
    of :func:`row_ev_parts` and :func:`row_ev_from_sums`, the two halves ``evaluate`` uses
    block by block.
    """
    res_sq, x_sq = row_ev_parts(x, x_hat)
    return row_ev_from_sums(jnp.sum(res_sq), jnp.sum(x_sq))


def row_ev_parts(x: jax.Array, x_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row ``(sum_d (x - x_hat)^2, sum_d x^2)``, each (V,): rowEV's numerator and
    denominator before they are summed over rows (so blocks of rows can be summed apart)."""
    return jnp.sum(jnp.square(x - x_hat), axis=-1), jnp.sum(jnp.square(x), axis=-1)


def row_ev_from_sums(res_sq_total: Any, x_sq_total: Any) -> Any:
    """rowEV from the row totals of :func:`row_ev_parts`: 1 - res / max(x_sq, 1e-12) (works
    on jnp scalars and on host floats, e.g. float64 sums of float32 blocks)."""
    return 1.0 - res_sq_total / (jnp.maximum(x_sq_total, 1e-12) if isinstance(x_sq_total, jax.Array) else max(x_sq_total, 1e-12))


def row_cosine(x: jax.Array, x_hat: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
    """Per-row cosine (V,) with torch ``cosine_similarity`` semantics: each norm clamped at eps."""
    nx = jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    ny = jnp.maximum(jnp.linalg.norm(x_hat, axis=-1, keepdims=True), eps)
    return jnp.sum((x / nx) * (x_hat / ny), axis=-1)


def softcap_logits(logits: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(logits / cap)`` (Gemma's final-logit softcap); identity when cap is None."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits / cap)


def kl_nats(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """Per-row KL(P || Q) in nats, P = softmax(logits_p) (original), Q = softmax(logits_q).

    (N, V), (N, V) -> (N,), computed in the inputs' dtype (cast to float64 first, under
    ``jax.enable_x64``, for the full-mode protocol). ``evaluate`` averages nats, then
    converts (the reference's order).
    """
    logp = jax.nn.log_softmax(logits_p, axis=-1)
    logq = jax.nn.log_softmax(logits_q, axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def kl_bits(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """Per-row KL(P || Q) in bits: :func:`kl_nats` / ln 2."""
    return kl_nats(logits_p, logits_q) / LN2


def top1_match(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """Per-row argmax agreement (N,) bool; argmax takes the first maximal index on ties."""
    return jnp.argmax(logits_p, axis=-1) == jnp.argmax(logits_q, axis=-1)


def topk_overlap(logits_p: jax.Array, logits_q: jax.Array, k: int) -> jax.Array:
    """Per-row set overlap |topk(p) ∩ topk(q)| / k (N,); ``k`` is clipped to the vocabulary size."""
    kk = min(int(k), logits_p.shape[-1])
    _, ip = jax.lax.top_k(logits_p, kk)
    _, iq = jax.lax.top_k(logits_q, kk)
    hits = jnp.sum(ip[..., :, None] == iq[..., None, :], axis=(-2, -1))  # indices are unique per row
    return hits.astype(jnp.float32) / kk


def feature_contributions(decoder: jax.Array, code: jax.Array, hidden: jax.Array, row_norms: jax.Array) -> jax.Array:
    """Per-feature logit contributions (B, D): ``a_t * z_t,i * (h · d_i)`` for paired (h, row t).

    decoder (D, d), code (B, D) of the rows, hidden (B, d), row_norms (B,).
    """
    scores = jnp.matmul(hidden, decoder.T, precision=HIGHEST)
    return row_norms[:, None] * code * scores


def contribution_coverage(contrib: jax.Array, top_c: int) -> tuple[jax.Array, jax.Array]:
    """(positive coverage (B,), abs coverage (B,)) of the ``top_c`` largest contributions.

    Positive: (sum of the top_c largest max(c, 0)) / (sum of all max(c, 0)); abs: the same on
    |c|. A row whose total is <= 1e-12 has coverage 1. ``top_c`` is clipped to D.
    """
    kk = min(int(top_c), contrib.shape[-1])

    def cov(v: jax.Array) -> jax.Array:
        total = jnp.sum(v, axis=-1)
        top = jnp.sum(jax.lax.top_k(v, kk)[0], axis=-1)
        return jnp.where(total > 1e-12, top / jnp.where(total > 1e-12, total, 1.0), 1.0)

    return cov(jnp.maximum(contrib, 0.0)), cov(jnp.abs(contrib))


def identity_abs_error(
    hidden: jax.Array,
    W_rows: jax.Array,
    row_mean: jax.Array,
    row_norms: jax.Array,
    decoded: jax.Array,
    contrib: jax.Array,
) -> jax.Array:
    """|h·w − (h·μ + Σ contrib + h·r)| per pair (B,), with r = w − μ − a ⊙ decoded (round-off only)."""
    residual = W_rows - denormalize_rows(decoded, row_mean, row_norms)
    base = jnp.sum(hidden * row_mean[None, :], axis=-1)
    feature_sum = jnp.sum(contrib, axis=-1)
    residual_term = jnp.sum(hidden * residual, axis=-1)
    original = jnp.sum(hidden * W_rows, axis=-1)
    return jnp.abs(original - (base + feature_sum + residual_term))


# ============================================================================================
# Host-side statistics (NumPy; the reference's float64 parts)


def quantile_linear(values: Any, q: float) -> float:
    """Quantile with linear interpolation between order statistics (torch.quantile / numpy
    "linear"): position q·(n−1), lerp written as torch does (from the nearer end). NaN if empty."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = v.shape[0]
    if n == 0:
        return float("nan")
    pos = float(q) * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    w = pos - lo
    a, b = float(v[lo]), float(v[hi])
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1.0 - w)


def usage_stats(
    usage: Any, per_row_l0: Any, *, n_rows: int | None = None, d_features: int | None = None
) -> dict[str, float]:
    """Feature-usage statistics over the evaluated rows (float64, as the reference).

    usage (D,): rows on which each feature is > 0; per_row_l0 (V,): active features per row.
    Returns dead_feature_rate (usage == 0), feature_usage_entropy (−Σ p log p / log max(2, D),
    p = usage / max(Σ usage, 1) over p > 0; 0 if nothing fires), mean_l0, l0_p10/p50/p90
    (linear quantiles; NaN without rows), rare_feature_rate (usage / max(1, n_rows) < 1e-3)
    and always_on_feature_rate (> 0.5).
    """
    u = np.asarray(usage, dtype=np.float64).ravel()
    l0 = np.asarray(per_row_l0, dtype=np.float64).ravel()
    D = int(d_features if d_features is not None else u.shape[0])
    n = int(n_rows if n_rows is not None else l0.shape[0])
    dead = float(np.mean(u == 0)) if u.size else float("nan")
    p = u / max(float(u.sum()), 1.0)
    nz = p[p > 0]
    entropy = float(-np.sum(nz * np.log(nz)) / math.log(max(2, D))) if nz.size else 0.0
    if l0.size:
        mean_l0 = float(np.mean(l0))
        p10, p50, p90 = (quantile_linear(l0, q) for q in (0.10, 0.50, 0.90))
    else:
        mean_l0 = p10 = p50 = p90 = float("nan")
    fire = u / max(1, n)
    return {
        "dead_feature_rate": dead,
        "feature_usage_entropy": entropy,
        "mean_l0": mean_l0,
        "l0_p10": p10,
        "l0_p50": p50,
        "l0_p90": p90,
        "rare_feature_rate": float(np.mean(fire < 1e-3)) if u.size else float("nan"),
        "always_on_feature_rate": float(np.mean(fire > 0.5)) if u.size else float("nan"),
    }


@compiled(static_argnames=("threshold", "chunk"))
def _duplicate_flags(decoder: jax.Array, threshold: float, chunk: int) -> jax.Array:
    """(D,) bool: max cosine to another decoder row >= threshold, in blocks of ``chunk`` rows."""
    d_norm = F.normalize_rows(decoder)
    D = d_norm.shape[0]
    cols = jnp.arange(D)

    def body(block, start):
        sim = jnp.matmul(block, d_norm.T, precision=HIGHEST)  # (b, D)
        rows = start + jnp.arange(block.shape[0])
        sim = jnp.where(cols[None, :] == rows[:, None], -1.0, sim)  # no self-similarity
        return jnp.max(sim, axis=1) >= threshold

    n_blocks = -(-D // chunk)
    padded = jnp.pad(d_norm, ((0, n_blocks * chunk - D), (0, 0))).reshape(n_blocks, chunk, -1)
    starts = jnp.arange(n_blocks) * chunk
    flags = jax.lax.map(lambda args: body(*args), (padded, starts))
    return flags.reshape(-1)[:D]


def duplicate_decoder_frac(
    decoder: Any, threshold: float = 0.9, chunk: int = 1024, *, check_finite: bool = True
) -> float:
    """Fraction of decoder rows (D, d) whose max cosine to any *other* row is >= threshold.

    Rows normalized with a 1e-8 norm floor; computed in blocks of ``chunk`` rows so memory is
    O(chunk·D) (the reference uses 4096; the block size does not change the result). 0 if D <= 1.
    With ``check_finite=False`` a NaN row never counts as a duplicate (as in the reference).
    """
    dec = as_float_array(decoder, name="decoder", ndim=2, check_finite=check_finite)
    D = int(dec.shape[0])
    if D <= 1:
        return 0.0
    flags = _duplicate_flags(dec, float(threshold), max(1, min(int(chunk), D)))
    return int(np.count_nonzero(np.asarray(flags))) / D


def pearson(x: Any, y: Any) -> float:
    """Pearson r (float64); NaN with fewer than 3 points or a (population) std < 1e-12."""
    xa, ya = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ShapeError(f"pearson: x has {xa.shape[0]} values, y has {ya.shape[0]}")
    if xa.size < 3 or xa.std() < 1e-12 or ya.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(xa, ya)[0, 1])


def spearman(x: Any, y: Any) -> float:
    """Spearman ρ as Pearson r of ordinal ranks (argsort of argsort; ties are *not* averaged,
    as in the reference). NaN with fewer than 3 points."""
    xa, ya = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ShapeError(f"spearman: x has {xa.shape[0]} values, y has {ya.shape[0]}")
    if xa.size < 3:
        return float("nan")
    return pearson(np.argsort(np.argsort(xa)), np.argsort(np.argsort(ya)))


def _resolve_thresholds(thresholds: Mapping[str, Any] | None) -> dict[str, float]:
    """Accept the ``score_thresholds`` dict itself or a config holding ``autoresearch.score_thresholds``."""
    block: Mapping[str, Any] = thresholds or {}
    if "autoresearch" in block:
        block = (block.get("autoresearch") or {}).get("score_thresholds") or {}
    elif "score_thresholds" in block:
        block = block.get("score_thresholds") or {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"score_thresholds must be a mapping, got {type(block).__name__}")
    return {
        "max_dead_feature_rate": float(block.get("max_dead_feature_rate", DEFAULT_THRESHOLDS["max_dead_feature_rate"])),
        "max_val_logit_kl_bits_mean": float(
            block.get("max_val_logit_kl_bits_mean", DEFAULT_THRESHOLDS["max_val_logit_kl_bits_mean"])
        ),
    }


def selection_score(metrics: Mapping[str, Any], thresholds: Mapping[str, Any] | None = None) -> float:
    """The reference's sweep-ranking score (not a paper metric), with its gates in order:

    any non-finite numeric value -> −1e9; dead_feature_rate > max_dead (default 0.98) ->
    −1e6 + (1 − dead); KL > max_kl (default 20) -> −1e5 − KL; identity_abs_error_max > 1e-3 ->
    −1e5 − err; else 1.5·rowEV + 0.5·cos + 0.7·absCov + 0.4·posCov + 0.5·top1 + 0.3·topOv −
    0.8·residFrac − 0.03·KL − 0.2·dead (missing keys count 0; the gates treat a missing dead
    rate as 1, a missing KL as 1e9, a missing identity error as 1). ``thresholds`` is the
    ``autoresearch.score_thresholds`` dict (or a whole config holding it).
    """
    for value in metrics.values():
        if isinstance(value, (int, float)) and not math.isfinite(float(value)):
            return -1e9
    th = _resolve_thresholds(thresholds)
    dead = metrics.get("dead_feature_rate", 1.0)
    if dead > th["max_dead_feature_rate"]:
        return -1e6 + (1.0 - dead)
    if metrics.get("val_logit_kl_bits_mean", 1e9) > th["max_val_logit_kl_bits_mean"]:
        return -1e5 - metrics.get("val_logit_kl_bits_mean", 0.0)
    if metrics.get("identity_abs_error_max", 1.0) > IDENTITY_GATE:
        return -1e5 - metrics.get("identity_abs_error_max", 0.0)
    ck = int(metrics.get("contribution_top_k", 8))
    ov = int(metrics.get("topk_overlap", 5))
    g = metrics.get
    return float(
        1.5 * g("row_centered_ev", 0.0)
        + 0.5 * g("row_centered_cosine", 0.0)
        + 0.7 * g(f"top{ck}_abs_contrib_coverage_mean", 0.0)
        + 0.4 * g(f"top{ck}_positive_contrib_coverage_mean", 0.0)
        + 0.5 * g("val_top1_match", 0.0)
        + 0.3 * g(f"val_top{ov}_overlap", 0.0)
        - 0.8 * g("top1_logit_residual_frac_mean", 0.0)
        - 0.03 * g("val_logit_kl_bits_mean", 0.0)
        - 0.2 * g("dead_feature_rate", 0.0)
    )


def metrics_to_jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Copy with non-finite floats replaced by None and NumPy scalars unwrapped (strict JSON)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[str(key)] = value
    return out


# ============================================================================================
# Jitted passes


def _chunked_map(fn, arrays, n: int, chunk: int):
    """Inside jit: run ``fn(*chunk_arrays, valid)`` over ``chunk``-row blocks with ``lax.map``
    (a loop, so memory is one block). ``fn`` returns (per-row tree, per-block tree); per-row
    outputs come back as (n, ...) rows, per-block outputs summed over blocks.

    Blocks are consecutive rows; on a mesh whose ``data`` axis splits the rows (and divides
    ``chunk``), block i holds rows i, i + n_blocks, ... instead, so every block is spread over
    the devices holding the rows and the loop never gathers the rows onto one device."""
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    if n_chunks == 1:  # no loop needed (cheaper to compile)
        rows, blocks = fn(*[jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays], jnp.arange(chunk) < n)
        return jax.tree.map(lambda y: y[:n], rows), blocks
    parts = mesh_axis_size(DATA)
    if parts > 1 and chunk % parts == 0:
        return _strided_chunked_map(fn, arrays, n, chunk, n_chunks)
    stacked = [
        jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(n_chunks, chunk, *a.shape[1:]) for a in arrays
    ]
    valid = (jnp.arange(n_chunks * chunk) < n).reshape(n_chunks, chunk)
    rows, blocks = jax.lax.map(lambda args: fn(*args[0], args[1]), (stacked, valid))
    rows = jax.tree.map(lambda y: y.reshape(n_chunks * chunk, *y.shape[2:])[:n], rows)
    blocks = jax.tree.map(lambda y: jnp.sum(y, axis=0), blocks)
    return rows, blocks


def _strided_chunked_map(fn, arrays, n: int, chunk: int, n_chunks: int):
    """:func:`_chunked_map` with block i = rows {i + n_chunks * j}: the (chunk, n_chunks)
    view of the rows keeps the mesh's row split on its first axis, so each block is sharded."""
    from jax.sharding import PartitionSpec as P

    pad = n_chunks * chunk - n

    def blocks_of(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(chunk, n_chunks, *a.shape[1:])
        a = jnp.swapaxes(a, 0, 1)  # (n_chunks, chunk, ...): block i, row j = original j * n_chunks + i
        return jax.lax.with_sharding_constraint(a, P(None, DATA, *([None] * (a.ndim - 2))))

    stacked = [blocks_of(a) for a in arrays]
    valid = blocks_of(jnp.arange(n_chunks * chunk - pad) < n)
    rows, blocks = jax.lax.map(lambda args: fn(*args[0], args[1]), (stacked, valid))
    rows = jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(n_chunks * chunk, *y.shape[2:])[:n], rows)
    blocks = jax.tree.map(lambda y: jnp.sum(y, axis=0), blocks)
    return rows, blocks


def _sparse_eval(cfg, k) -> bool:
    """(trace time) Whether evaluation encodes through the sparse code: the TopK family off a
    mesh. On a mesh the dense encode's top-k is the latent-sharded one (``K.topk_mask``); the
    sparse encode's plain ``lax.top_k`` would gather each block's (rows, D) activations."""
    return F.sparse_code_available(cfg, k) and mesh_axis_size(DATA) * mesh_axis_size(MODEL) == 1


def _pass_rows(dictionary, row_batch: int | None, *arrays: Any) -> int:
    """:func:`srp_jax.factorizers.sparse.pass_rows` for ``dictionary`` over ``arrays``."""
    return S.pass_rows(row_batch, dictionary.d_features, *jax.tree.leaves(dictionary.params), *arrays)


def _encode_decode_blocks(cfg, params, buffers, x, k):
    """(traced) The sparse code (rows, k) of x (rows, d) and its decode (rows, d), one encoder
    block (:func:`~srp_jax.factorizers.sparse.default_encode_rows`) at a time, written out:
    each block's single-threaded decode can then run beside the next block's matmul. One
    encode and one decode of all rows when the blocks do not divide the rows or would be more
    than :data:`~srp_jax.factorizers.sparse.MAX_UNROLLED_ENCODE_BLOCKS` (compile time)."""
    rows = x.shape[0]
    block = S.default_encode_rows(rows, cfg.d_features)
    if block >= rows or rows % block or rows // block > S.MAX_UNROLLED_ENCODE_BLOCKS:
        code = F.sparse_code(cfg, params, buffers, x, k)
        return code, S.decode_code(params, code)
    codes, recons = [], []
    for t in range(rows // block):
        code = F.sparse_code(cfg, params, buffers, x[t * block : (t + 1) * block], k)
        codes.append(code)
        recons.append(S.decode_code(params, code))
    code = S.SparseCode(*(jnp.concatenate(parts) for parts in zip(*codes)))
    return code, jnp.concatenate(recons)


def _reconstruct_all(cfg, params, buffers, X, A, mu, k, row_batch):
    """(traced) Encode/decode all rows X (V, d) in blocks: per-row recon (V, d), its raw-space
    rows ``recon_W = mu + A * recon`` (V, d) (norms A (V,), mean mu (d,): computed chunk by
    chunk inside the loop, not as a separate pass over (V, d) after it), l0, res², x², cosine,
    and usage (D,) int32. The TopK family (k < D) encodes through the sparse encode and decodes
    its k active rows only (``factorizers.sparse``, encoder block by encoder block:
    :func:`_encode_decode_blocks`); other architectures, and any architecture on a device mesh
    (whose encode takes the sharded top-k), densely."""
    sparse = _sparse_eval(cfg, k)

    def body(x, a, valid):
        if sparse:
            code, recon = _encode_decode_blocks(cfg, params, buffers, x, k)
            active_entries = (code.values > 0) & valid[:, None]
            l0 = jnp.sum(active_entries, axis=1, dtype=jnp.int32)
            usage = S.scatter_add_values(active_entries.astype(jnp.int32), code.indices, cfg.d_features)
        else:
            code = F.encode(cfg, params, buffers, x, k)
            recon = F.decode(params, code)
            active = (code > 0) & valid[:, None]
            l0 = jnp.sum(active, axis=1, dtype=jnp.int32)
            usage = jnp.sum(active, axis=0, dtype=jnp.int32)
        res_sq, x_sq = row_ev_parts(x, recon)
        rows = {
            "recon": recon,
            "recon_W": denormalize_rows(recon, mu, a),
            "l0": l0,
            "res_sq": res_sq,
            "x_sq": x_sq,
            "cos": row_cosine(x, recon),
        }
        return rows, {"usage": usage}

    V = X.shape[0]
    rows, blocks = _chunked_map(body, [X, A], V, max(1, min(int(row_batch), V)))
    return rows, blocks["usage"]


@compiled(static_argnames=("cfg", "k", "row_batch"))
def _reconstruct_jit(cfg, params, buffers, X, A, mu, k, row_batch):
    rows, usage = _reconstruct_all(cfg, params, buffers, X, A, mu, k, row_batch)
    return rows["recon"], rows["recon_W"], usage, rows["l0"]


def reconstruct_rows(
    dictionary, rows_normalized: Any, row_mean: Any, row_norms: Any, k: int | None = None, *, row_batch: int | None = None
) -> tuple[jax.Array, jax.Array, np.ndarray, np.ndarray]:
    """Encode/decode every row in jitted blocks of ``row_batch`` rows (eval mode; None: the
    backend's choice, :func:`srp_jax.factorizers.sparse.pass_rows`).

    Returns ``recon_x`` (V, d) in normalized space, ``recon_W = μ + a ⊙ recon_x`` (V, d) in raw
    space, ``usage`` (D,) float64 (rows on which each feature's code is > 0) and
    ``per_row_l0`` (V,) int64. ``k`` None = the dictionary's trained k.
    """
    x = as_float_array(rows_normalized, name="rows_normalized", ndim=2)
    check_last_dim("rows_normalized", x, dictionary.d_model)
    mu = as_float_array(row_mean, name="row_mean", ndim=1)
    check_last_dim("row_mean", mu, dictionary.d_model)
    a = as_float_array(row_norms, name="row_norms", ndim=1)
    if a.shape[0] != x.shape[0]:
        raise ShapeError(f"row_norms has {a.shape[0]} entries but rows_normalized has {x.shape[0]} rows")
    if x.shape[0] == 0:
        raise ShapeError("rows_normalized has no rows")
    inference_view(dictionary)
    recon_x, recon_W, usage, l0 = _reconstruct_jit(
        dictionary.config, dictionary.params, dictionary.buffers, x, a, mu, dictionary.config.resolve_k(k),
        _pass_rows(dictionary, row_batch, x),
    )
    return recon_x, recon_W, np.asarray(usage, dtype=np.float64), np.asarray(l0, dtype=np.int64)


@compiled(static_argnames=("cfg", "k", "row_batch"))
def _usage_jit(cfg, params, buffers, X, k, row_batch):
    sparse = _sparse_eval(cfg, k)

    def body(x, valid):
        if sparse:
            code = F.sparse_code(cfg, params, buffers, x, k)
            fired = ((code.values > 0) & valid[:, None]).astype(jnp.int32)
            return {}, {"usage": S.scatter_add_values(fired, code.indices, cfg.d_features)}
        code = F.encode(cfg, params, buffers, x, k)
        return {}, {"usage": jnp.sum((code > 0) & valid[:, None], axis=0, dtype=jnp.int32)}

    return _chunked_map(body, [X], X.shape[0], max(1, min(int(row_batch), X.shape[0])))[1]["usage"]


def feature_usage(dictionary, rows_normalized: Any, k: int | None = None, *, row_batch: int | None = None) -> np.ndarray:
    """(D,) int64: on how many of the rows (V, d) each feature's eval code is > 0 (the usage
    counts of :func:`reconstruct_rows`, without decoding; ``row_batch`` as there)."""
    x = as_float_array(rows_normalized, name="rows_normalized", ndim=2)
    check_last_dim("rows_normalized", x, dictionary.d_model)
    if x.shape[0] == 0:
        return np.zeros(dictionary.d_features, np.int64)
    inference_view(dictionary)
    usage = _usage_jit(
        dictionary.config, dictionary.params, dictionary.buffers, x, dictionary.config.resolve_k(k), _pass_rows(dictionary, row_batch, x)
    )
    return np.asarray(usage, np.int64)


def _logit_stats(h, W, recon_W, overlap_k, softcap, wide):
    # softcap: None or a (traced) float32 scalar
    """(traced) Per-hidden-state logit statistics for h (B, d) against W, recon_W (V, d)."""
    lo = jnp.matmul(h, W.T, precision=HIGHEST)  # (B, V) float32, linear
    lr = jnp.matmul(h, recon_W.T, precision=HIGHEST)
    rows = jnp.arange(h.shape[0])
    t_star = jnp.argmax(lo, axis=-1)
    orig_top = lo[rows, t_star]
    rec_top = lr[rows, t_star]
    # exact top-2 (argmax after masking the top-1) for the margin frontier (linear logits)
    t_two = jnp.argmax(lo.at[rows, t_star].set(-jnp.inf), axis=-1)
    co = softcap_logits(lo, softcap)  # float32, as the reference's headline runner
    cr = softcap_logits(lr, softcap)
    if wide:
        co, cr = co.astype(jnp.float64), cr.astype(jnp.float64)
    return {
        "kl_nats": kl_nats(co, cr),
        "top1": top1_match(co, cr),
        "overlap": topk_overlap(co, cr, overlap_k),
        "t_star": t_star.astype(jnp.int32),
        "orig_top": orig_top,
        "rec_top": rec_top,
        "m_exact": orig_top - lo[rows, t_two],
        "m_sparse": rec_top - lr[rows, t_two],
    }


@compiled(static_argnames=("cfg", "k", "row_batch", "hidden_batch", "overlap_k", "top_c", "use_cap", "wide", "clamp"))
def _evaluate_core(
    cfg, params, buffers, W, X, A, mu, H, cap, *, k, row_batch, hidden_batch, overlap_k, top_c, use_cap, wide, clamp
):
    """Everything array-heavy of ``evaluate`` as one jitted program (blocks via ``lax.map``)."""
    norms = jnp.maximum(A, 1e-8) if clamp else A
    rows, usage = _reconstruct_all(cfg, params, buffers, X, norms, mu, k, row_batch)
    recon_W = rows.pop("recon_W")
    del rows["recon"]
    N = H.shape[0]
    hb = max(1, min(int(hidden_batch), N))
    softcap = cap if use_cap else None
    stats, _ = _chunked_map(lambda h, valid: (_logit_stats(h, W, recon_W, overlap_k, softcap, wide), {}), [H], N, hb)
    t = stats["t_star"]

    def contrib_body(h, w_rows, x_rows, a_rows, valid):
        code = F.encode(cfg, params, buffers, x_rows, k)
        contrib = feature_contributions(params["decoder"], code, h, a_rows)
        pos, absc = contribution_coverage(contrib, top_c)
        err = identity_abs_error(h, w_rows, mu, a_rows, F.decode(params, code), contrib)
        return {"pos_cov": pos, "abs_cov": absc, "identity_err": err}, {}

    cov, _ = _chunked_map(contrib_body, [H, W[t], X[t], A[t]], N, hb)
    out = {**rows, **stats, **cov, "usage": usage}
    if not jax.sharding.get_abstract_mesh().empty:  # small results: every process gets them all
        out = jax.tree.map(lambda y: jax.lax.with_sharding_constraint(y, jax.sharding.PartitionSpec()), out)
    return out


# ============================================================================================
# evaluate


def _readout_fields(readout: Any) -> dict[str, Any]:
    names = ("W_U", "row_mean", "row_norms", "rows_normalized")
    out: dict[str, Any] = {}
    for name in names:
        value = readout.get(name) if isinstance(readout, Mapping) else getattr(readout, name, None)
        if value is None:
            raise ConfigError(f"readout lacks {name!r} (need W_U, row_mean, row_norms, rows_normalized)")
        out[name] = value
    cap = readout.get("softcap") if isinstance(readout, Mapping) else getattr(readout, "softcap", None)
    out["softcap"] = cap
    return out


def _evaluation_config(evaluation: Any, dictionary) -> EvaluationConfig:
    if isinstance(evaluation, EvaluationConfig):
        return evaluation
    if evaluation is None:
        evaluation = getattr(dictionary, "evaluation", None) or {}
    if not isinstance(evaluation, Mapping):
        raise ConfigError(f"evaluation must be an EvaluationConfig or a dict, got {type(evaluation).__name__}")
    # the reference reads each key with `or`: 0 / None mean "default"
    block = {key: value for key, value in evaluation.items() if value}
    return EvaluationConfig.from_dict(block, strict=False)


def _input(x: Any, name: str, ndim: int) -> Any:
    """A checked input: kept where it is when already spread over a mesh, else host NumPy."""
    return as_float_array(x, name=name, ndim=ndim) if is_spread(x) else as_host_float_array(x, name=name, ndim=ndim)


def _place_inputs(W, X, A, mu, H):
    """Inputs -> device arrays: on the default device, or, inside ``jax.set_mesh``, on the mesh
    with the vocabulary rows split over ``data`` (when they divide evenly; else replicated) and
    the rest replicated, placed shard by shard (no full copy on one device)."""
    mesh = jax.sharding.get_mesh()
    if mesh is None or getattr(mesh, "empty", True) or mesh.devices.size == 1:
        return tuple(jnp.asarray(a) for a in (W, X, A, mu, H))
    from jax.sharding import NamedSharding, PartitionSpec as P

    parts = int(mesh.shape[DATA]) if DATA in mesh.axis_names else 1
    row_axis = DATA if parts > 1 and W.shape[0] % parts == 0 else None
    rows2, rows1 = NamedSharding(mesh, P(row_axis, None)), NamedSharding(mesh, P(row_axis))
    rep = NamedSharding(mesh, P())
    return SH.place(W, rows2), SH.place(X, rows2), SH.place(A, rows1), SH.place(mu, rep), SH.place(H, rep)


def _f32_mean(values: np.ndarray) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float32), dtype=np.float32))


def evaluate(
    dictionary,
    readout: Any,
    hidden: Any,
    *,
    evaluation: EvaluationConfig | Mapping[str, Any] | None = None,
    mode: str = "reference",
    softcap: float | None = None,
    thresholds: Mapping[str, Any] | None = None,
    row_batch: int | None = None,
    hidden_batch: int = 128,
    per_item: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluate ``dictionary`` on ``readout`` rows and held-out ``hidden`` states (N, d).

    ``readout``: a :class:`srp_jax.readout.Readout` or any object / mapping with ``W_U`` (V, d),
    ``row_mean`` (d,), ``row_norms`` (V,), ``rows_normalized`` (V, d) (and optionally ``softcap``).
    ``evaluation``: the ``evaluation:`` block (``EvaluationConfig`` or dict; None = the
    dictionary's stored block): audit k (``resolve_eval_k``), ``max_eval_rows``,
    ``max_eval_hidden``, ``contribution_top_k`` (8), ``topk_overlap`` (5).
    ``thresholds``: ``autoresearch.score_thresholds`` for ``selection_score``.

    ``mode="reference"``: the reference ``evaluate_model`` key for key (first ``max_eval_rows``
    rows as the vocabulary, float32 logits; ``softcap`` must be None and ``readout.softcap`` is
    ignored). ``mode="full"``: the whole vocabulary, float64 log-softmax, softcap = ``softcap``
    or else ``readout.softcap`` applied before softmax/top-1/top-k, plus ``kl_bits_p90``,
    ``frontier_pass_at_0.5`` (exact top-1 vs top-2 margin on linear logits: sign match with the
    ``x > 0`` convention and |m_exact − m_sparse| / max(|m_exact|, 0.5) <= 0.5),
    ``frontier_sign_agreement``, ``softcap`` and ``eval_mode``. See ``docs/metrics.md``.

    Returns Python floats / ints / bools; NaN only where the reference gives NaN (then
    ``finite_metrics`` is False and ``selection_score`` is −1e9; ``metrics_to_jsonable`` maps
    NaN to None). ``row_batch`` / ``hidden_batch`` set the jitted chunk sizes (``row_batch``
    None: :func:`srp_jax.factorizers.sparse.pass_rows`).

    ``per_item=True`` returns ``(metrics, items)``: the per-hidden-state values behind the
    means (``kl_bits``, ``top1_match``, and in full mode ``frontier_pass``; (n_hidden,)) and
    the per-row terms of rowEV (``row_res_sq``, ``row_x_sq``; (n_rows,)), for bootstraps.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    fields = _readout_fields(readout)
    if mode == "reference":
        if softcap is not None:
            raise ConfigError("softcap applies only to mode='full' (the reference evaluator has none)")
        cap = None
    else:
        cap = softcap if softcap is not None else fields["softcap"]
        if cap is not None:
            cap = float(cap)
            if not (math.isfinite(cap) and cap > 0):
                raise ConfigError(f"softcap must be a positive number, got {cap!r}")
    d = dictionary.d_model
    W = _input(fields["W_U"], "readout.W_U", 2)
    X = _input(fields["rows_normalized"], "readout.rows_normalized", 2)
    mu = _input(fields["row_mean"], "readout.row_mean", 1)
    A = _input(fields["row_norms"], "readout.row_norms", 1)
    for name, arr in (("readout.W_U", W), ("readout.rows_normalized", X), ("readout.row_mean", mu)):
        check_last_dim(name, arr, d)
    V = int(W.shape[0])
    if X.shape[0] != V or A.shape[0] != V:
        raise ShapeError(
            f"readout rows disagree: W_U has {V}, rows_normalized {X.shape[0]}, row_norms {A.shape[0]}"
        )
    if V == 0:
        raise ShapeError("readout has no rows")
    H = _input(hidden, "hidden", 2)
    check_last_dim("hidden", H, d)

    ev = _evaluation_config(evaluation, dictionary)
    k = resolve_eval_k(ev, dictionary.config)
    contribution_top_k = int(ev.contribution_top_k or 8)
    overlap_k_cfg = int(ev.topk_overlap or 5)
    n_rows = min(int(ev.max_eval_rows or V), V) if mode == "reference" else V
    n_hidden = min(int(ev.max_eval_hidden or H.shape[0]), H.shape[0])
    if n_hidden == 0:
        raise ShapeError("hidden has no rows to evaluate on")
    W, X, A, mu, H = _place_inputs(W[:n_rows], X[:n_rows], A[:n_rows], mu, H[:n_hidden])

    # ---- all array work in one jitted program
    wide = mode == "full"
    inference_view(dictionary)
    core = partial(
        _evaluate_core,
        dictionary.config, dictionary.params, dictionary.buffers, W, X, A, mu, H,
        jnp.float32(cap if cap is not None else 1.0),
        k=int(k), row_batch=_pass_rows(dictionary, row_batch, X), hidden_batch=int(hidden_batch), overlap_k=overlap_k_cfg,
        top_c=contribution_top_k, use_cap=cap is not None, wide=wide, clamp=wide,
    )  # fmt: skip
    if wide:
        with jax.enable_x64(True):
            st = {key: np.asarray(val) for key, val in core().items()}
    else:
        st = {key: np.asarray(val) for key, val in core().items()}
    row_ev = float(row_ev_from_sums(float(np.sum(st["res_sq"], dtype=np.float64)), float(np.sum(st["x_sq"], dtype=np.float64))))
    cosine = float(np.mean(st["cos"], dtype=np.float64))
    pos_cov, abs_cov, id_err = st["pos_cov"], st["abs_cov"], st["identity_err"]

    resid = np.abs(st["orig_top"].astype(np.float32) - st["rec_top"].astype(np.float32))
    resid_frac = resid / np.maximum(np.abs(st["orig_top"]).astype(np.float32), np.float32(1e-6))
    overlap = st["overlap"].astype(np.float64)

    if wide:  # float64 aggregates
        kl_bits_rows = st["kl_nats"].astype(np.float64) / LN2
        kl_mean = float(np.mean(kl_bits_rows))
        top1 = float(np.mean(st["top1"].astype(np.float64)))
        resid_abs_mean = float(np.mean(resid, dtype=np.float64))
        resid_frac_mean = float(np.mean(resid_frac, dtype=np.float64))
        pos_mean, abs_mean = float(np.mean(pos_cov, dtype=np.float64)), float(np.mean(abs_cov, dtype=np.float64))
    else:  # float32 means, as the reference's tensor .mean().item()
        kl_mean = _f32_mean(st["kl_nats"]) / LN2
        top1 = _f32_mean(st["top1"].astype(np.float32))
        resid_abs_mean = _f32_mean(resid)
        resid_frac_mean = _f32_mean(resid_frac)
        pos_mean, abs_mean = _f32_mean(pos_cov), _f32_mean(abs_cov)

    usage = usage_stats(st["usage"], st["l0"], n_rows=n_rows, d_features=dictionary.d_features)
    metrics: dict[str, Any] = {
        "k": int(k),
        "eval_rows": int(n_rows),
        "eval_hidden": int(n_hidden),
        "contribution_top_k": contribution_top_k,
        "topk_overlap": overlap_k_cfg,
        "row_centered_ev": row_ev,
        "row_centered_cosine": cosine,
        "top1_logit_residual_frac_mean": resid_frac_mean,
        "top1_logit_residual_abs_mean": resid_abs_mean,
        f"top{contribution_top_k}_positive_contrib_coverage_mean": pos_mean,
        f"top{contribution_top_k}_abs_contrib_coverage_mean": abs_mean,
        "val_logit_kl_bits_mean": kl_mean,
        "val_top1_match": top1,
        f"val_top{overlap_k_cfg}_overlap": float(np.mean(overlap)),
        **usage,
        # a diverged dictionary still gets its metrics (finite_metrics False, selection_score -1e9)
        "duplicate_decoder_frac": duplicate_decoder_frac(SH.to_host(dictionary.params["decoder"]), threshold=0.9, check_finite=False),
        "identity_abs_error_max": float(np.max(id_err)),
        "identity_abs_error_mean": float(np.mean(id_err, dtype=np.float64 if wide else np.float32)),
    }
    if wide:
        m_exact = st["m_exact"].astype(np.float64)
        m_sparse = st["m_sparse"].astype(np.float64)
        sign_match = (m_exact > 0) == (m_sparse > 0)
        rel = np.abs(m_exact - m_sparse) / np.maximum(np.abs(m_exact), FRONTIER_FLOOR)
        frontier_ok = V >= 2
        metrics.update(
            {
                "kl_bits_p90": float(np.percentile(kl_bits_rows, 90)),
                "frontier_pass_at_0.5": (
                    float(np.mean(sign_match & (rel <= FRONTIER_TOL))) if frontier_ok else float("nan")
                ),
                "frontier_sign_agreement": float(np.mean(sign_match)) if frontier_ok else float("nan"),
            }
        )
    finite = all(
        math.isfinite(float(v)) for v in metrics.values() if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    metrics["finite_metrics"] = bool(finite)
    metrics["selection_score"] = selection_score(metrics, thresholds)
    if wide:
        metrics["softcap"] = cap
        metrics["eval_mode"] = "full"
    if not per_item:
        return metrics
    items = {
        "kl_bits": st["kl_nats"].astype(np.float64) / LN2,
        "top1_match": st["top1"].astype(bool),
        "row_res_sq": st["res_sq"].astype(np.float64),
        "row_x_sq": st["x_sq"].astype(np.float64),
    }
    if wide:
        items["frontier_pass"] = sign_match & (rel <= FRONTIER_TOL)
    return metrics, items


__all__ = [
    "evaluate",
    "reconstruct_rows",
    "feature_usage",
    "row_centered_ev",
    "row_ev_parts",
    "row_ev_from_sums",
    "kl_nats",
    "row_cosine",
    "softcap_logits",
    "kl_bits",
    "top1_match",
    "topk_overlap",
    "feature_contributions",
    "contribution_coverage",
    "identity_abs_error",
    "duplicate_decoder_frac",
    "usage_stats",
    "quantile_linear",
    "selection_score",
    "metrics_to_jsonable",
    "pearson",
    "spearman",
    "DEFAULT_THRESHOLDS",
]
