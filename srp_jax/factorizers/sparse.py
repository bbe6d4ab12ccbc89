"""Sparse codes: the k active (value, index) pairs of each row, and kernels that touch only them.

A TopK code has at most k nonzeros per row, so its decode, its reconstruction error and every
gradient need only the k selected decoder rows and encoder columns of each example:

* :func:`topk_codes` — ``(values, indices)`` (B, k) of ``TopK_k(ReLU(x W + b))`` (the dense
  (B, D) pre-activation is computed once, unavoidably: the top k need all D of them). Its
  gradient is custom: only the k selected pre-activations carry one, so the encoder-kernel
  gradient is a scatter-add of ``g_bk * x_b`` into k columns per example instead of the dense
  ``x^T (B x D)`` product;
* :func:`decode` — ``sum_s v_bs * decoder[i_bs]`` (B, d); backward: a gather-dot for the values
  and a scatter-add of ``v_bs * g_b`` into the k decoder rows for the decoder;
* :func:`squared_errors` — ``||decode(prefix of k_l) - target||^2`` per row at nested budgets
  ``levels`` (the MSE and the Matryoshka losses) in one gather pass that also keeps what the
  backward needs (so the backward is scatter-adds only);
* :func:`probe_dots` — ``probe_b . decode_b`` per row (the prism term needs only h . x_hat);
* :func:`code_stats` — L0, sum of squares and the fired mask of a sparse code.

Every function equals its dense counterpart (``topk_mask`` + ``decode``) up to float
summation order. Loops: on CPU the gathers run over blocks of rows
(:func:`default_block_rows`), so the (block, k, d) rows they touch stay in cache and no
(B, k, d) array is ever materialised, and the scatter-adds run grouped by table row
(:func:`scatter_plan`: one cheap integer sort, then each decoder row / encoder column takes
its updates while it is in cache); on accelerators one block is the whole batch. Where the
native CPU kernels load (:func:`native_kernels`) the top-k, the gathered-row sums and dots and
the scatter-adds run as those instead. Every loop and kernel sums in a fixed order, so results
are deterministic (bitwise resume).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _native
from .._arrays import is_spread
from .kernels import HIGHEST, Params

#: working set (floats) of one block of the gather / scatter-add loops on CPU: rows * k * d
#: (measured best at 8-32 rows for d 576, k 128: the block's rows stay in cache; see
#: docs/performance.md). ``None`` forces one block (the whole batch).
CPU_BLOCK_ELEMENTS: int | None = 1 << 20
#: backends whose sparse decode loops over the k slots (gathers fused into multiply-adds;
#: measured 2-3x faster than gathering (block, k, d) rows on CPU)
SLOT_DECODE_BACKENDS = ("cpu",)
#: slots per step of that loop (one fused loop over the accumulator per step)
SLOT_UNROLL = 8
#: working set (floats) of one block of the encoder forward + top-k on CPU: rows * D (a block
#: of pre-activations stays in the last-level cache instead of a (B, D) array in fresh memory)
CPU_ENCODE_ELEMENTS: int | None = 1 << 22
#: pre-activations (rows * D) per chunk of a full-vocabulary pass on CPU (reconstruction,
#: usage, the code table): a chunk writes out several encoder blocks, and XLA:CPU runs one
#: block's single-threaded top-k beside the next block's matmul, so longer chunks idle the
#: second core less (docs/performance.md); about 256 MB of pre-activations at most
CPU_PASS_ELEMENTS = 1 << 26
#: rows per chunk of a full-vocabulary pass elsewhere, and the least on CPU
PASS_ROWS = 1024
#: up to this many encoder-forward blocks are written out one by one (more: a loop over them)
MAX_UNROLLED_ENCODE_BLOCKS = 64
#: backends whose scatter-adds run grouped by table row (:func:`scatter_plan`): on CPU the
#: row-major update order misses cache on every update, the grouped order hits it
SORTED_SCATTER_BACKENDS = ("cpu",)
#: entries per step of the grouped scatter loop (measured flat between 256 and 1024)
SORTED_SCATTER_BLOCK = 512
#: backends where the encoder-kernel gradient is transposed into the kernel's layout by a loop
#: over row blocks (:func:`transpose_materialized`): a plain ``.T`` is fused into every
#: optimizer pass over the gradient, each then reading it column-wise (XLA:CPU: ~0.4 s per
#: pass at d 2048 / D 32768, against ~0.2 s for the whole loop)
LOOP_TRANSPOSE_BACKENDS = ("cpu",)
#: table rows per step of that loop
LOOP_TRANSPOSE_ROWS = 32
#: backends whose top-k, gathered-row sums and dots (float32) and grouped scatter-adds run as
#: srp-jax's native kernels (:mod:`srp_jax._native`: the same results over XLA's thread pool,
#: where XLA:CPU's own run on one thread) when they build on this machine; otherwise the XLA
#: loops above
NATIVE_KERNEL_BACKENDS = ("cpu",)


def native_kernels() -> bool:
    """(trace time) Whether this backend calls the native kernels: it is one of
    :data:`NATIVE_KERNEL_BACKENDS` and :func:`srp_jax._native.load` succeeds."""
    return jax.default_backend() in NATIVE_KERNEL_BACKENDS and _native.load()


class SparseCode(NamedTuple):
    """The active entries of a (B, D) code: ``values`` (B, k) float32 (descending per row, may
    hold zeros when fewer than k pre-activations are positive) at ``indices`` (B, k) int32."""

    values: jax.Array
    indices: jax.Array


class CodeStats(NamedTuple):
    """``l0`` mean count of positive entries per row; ``sum_sq`` sum of all squared entries;
    ``fired`` (D,) bool: positive in at least one row."""

    l0: jax.Array
    sum_sq: jax.Array
    fired: jax.Array


def _rows_for(budget: int | None, batch: int, per_row: int) -> int:
    """Rows in ``budget`` floats at ``per_row`` each, rounded down to a power of two (batch
    sizes are usually powers of two: no padded last block), at least 1, at most the batch."""
    if budget is None or jax.default_backend() != "cpu":
        return batch
    return min(batch, _power_of_two_rows(budget, per_row))


def _power_of_two_rows(budget: int, per_row: int) -> int:
    """The largest power of two of rows whose ``per_row`` floats fit in ``budget`` (at least 1)."""
    rows = max(1, budget // max(1, per_row))
    return 1 << (rows.bit_length() - 1)


def default_block_rows(batch: int, k: int, d: int) -> int:
    """Rows per gather / scatter block: a working set of :data:`CPU_BLOCK_ELEMENTS` floats on
    CPU, the whole batch on accelerators (one large gather / scatter-add)."""
    return _rows_for(CPU_BLOCK_ELEMENTS, batch, k * d)


def default_decode_rows(batch: int, d: int) -> int:
    """Rows per block of the slot-loop decode on CPU: a (rows, d) accumulator of
    :data:`CPU_BLOCK_ELEMENTS` floats."""
    return _rows_for(CPU_BLOCK_ELEMENTS, batch, d)


def default_encode_rows(batch: int, width: int) -> int:
    """Rows per encoder-forward block: :data:`CPU_ENCODE_ELEMENTS` pre-activations on CPU, the
    whole batch on accelerators."""
    return _rows_for(CPU_ENCODE_ELEMENTS, batch, width)


# --------------------------------------------------------------------------------------------
# Blocked loops (row blocks; the leading axis of every argument is the batch)


def _blocked(arrays: list[jax.Array], block: int) -> tuple[list[jax.Array], int]:
    """Pad the batch axis to a multiple of ``block`` (zeros) -> (padded arrays, n_blocks)."""
    B = arrays[0].shape[0]
    n = -(-B // block)
    pad = n * block - B
    if pad:
        arrays = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    return arrays, n


def _slice(a: jax.Array, t: jax.Array, block: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, t * block, block, axis=0)


def _map_blocks(fn, arrays: list[jax.Array], out_widths: tuple[tuple[int, ...], ...], block: int):
    """``fn(*row_block) -> tuple of (block, *width)`` over row blocks; outputs (B, *width)."""
    B = arrays[0].shape[0]
    padded, n = _blocked(arrays, block)
    if n == 1:
        return tuple(o[:B] for o in fn(*padded))
    outs = tuple(jnp.zeros((n * block, *w), jnp.float32) for w in out_widths)

    def body(t, outs):
        res = fn(*(_slice(a, t, block) for a in padded))
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, r, t * block, axis=0) for o, r in zip(outs, res))

    return tuple(o[:B] for o in jax.lax.fori_loop(0, n, body, outs))


def transpose_materialized(table: jax.Array, rows: int | None = None) -> jax.Array:
    """``table.T`` (d, W) of a (W, d) table, written to its own buffer.

    On :data:`LOOP_TRANSPOSE_BACKENDS`, by a loop over blocks of ``rows`` table rows (default
    :data:`LOOP_TRANSPOSE_ROWS`): XLA does not fuse into a loop's result, so the consumers read
    the (d, W) buffer row-wise instead of each re-reading the table column-wise (an
    ``optimization_barrier`` does not prevent that: XLA:CPU removes it before fusion).
    Elsewhere (or when fewer than two blocks would run): plain ``table.T``."""
    W, d = table.shape
    rows = LOOP_TRANSPOSE_ROWS if rows is None else int(rows)
    if jax.default_backend() not in LOOP_TRANSPOSE_BACKENDS or rows <= 0 or W < 2 * rows:
        return table.T
    n, tail = divmod(W, rows)

    def body(t, out):
        start = t * rows
        return jax.lax.dynamic_update_slice_in_dim(out, _slice(table, t, rows).T, start, axis=1)

    out = jax.lax.fori_loop(0, n, body, jnp.zeros((d, W), table.dtype))
    if tail:
        out = jax.lax.dynamic_update_slice_in_dim(out, table[n * rows :].T, n * rows, axis=1)
    return out


def _gather(table: jax.Array, indices: jax.Array) -> jax.Array:
    """table[indices] (..., k, d) for in-range indices (no clamping)."""
    return table.at[indices].get(mode="promise_in_bounds")


class ScatterPlan(NamedTuple):
    """The entries of a (B, k) index array grouped by table row, for :func:`scatter_add_rows`:
    ``feature`` (B*k,) int32 the table row of each entry, ascending within each chunk of
    batch rows (see :func:`scatter_plan`), and ``source`` (B*k,) int32 its flat position
    b*k + s in the index array, ascending among entries of one feature in one chunk."""

    feature: jax.Array
    source: jax.Array


def scatter_plan(indices: jax.Array, width: int) -> ScatterPlan:
    """Sort the entries of ``indices`` (B, k) (values in [0, width)) by table row.

    One single-key sort of uint32 words ``feature << p | position`` per chunk of batch rows
    (p the bits of a chunk's flat positions; the chunk is as many rows as fit the other 32 - p
    bits: the whole batch up to B*k*width <= 2^32, otherwise a few chunks). A single-key sort
    is far cheaper on CPU than a key-value sort, and ties cannot occur (positions differ), so
    the order is a pure function of the indices (deterministic) and, within a feature and a
    chunk, by position."""
    B, k = indices.shape
    width_bits = max(1, int(width - 1).bit_length())
    pos_bits = 32 - width_bits
    if width_bits > 31 or (1 << pos_bits) < k:
        raise ValueError(f"scatter_plan: a table of {width} rows with codes of width {k} does not fit 32-bit keys")
    rows = min(B, 1 << (((1 << pos_bits) // k).bit_length() - 1))
    features, sources = [], []
    for start in range(0, B, rows):
        part = indices[start : start + rows].reshape(-1).astype(jnp.uint32)
        keys = jnp.sort((part << pos_bits) | jnp.arange(part.size, dtype=jnp.uint32))
        features.append((keys >> pos_bits).astype(jnp.int32))
        sources.append((keys & jnp.uint32((1 << pos_bits) - 1)).astype(jnp.int32) + start * k)
    if len(features) == 1:
        return ScatterPlan(features[0], sources[0])
    return ScatterPlan(jnp.concatenate(features), jnp.concatenate(sources))


def _sorted_scatter_add(coef: jax.Array, rows: jax.Array, plan: ScatterPlan, width: int, block: int) -> jax.Array:
    """:func:`scatter_add_rows` in ``plan`` order, ``block`` entries per loop step: consecutive
    updates hit the same table rows (which stay in cache) and the rows they add are gathered
    from ``rows`` (B, d)."""
    k = coef.shape[1]
    d = rows.shape[-1]
    n_entries = plan.feature.shape[0]
    n = -(-n_entries // block)
    pad = n * block - n_entries
    feature, source = plan.feature, plan.source
    flat_coef = coef.reshape(-1)
    if pad:  # padding entries add 0 * rows[0] to table row 0
        feature = jnp.pad(feature, (0, pad))
        source = jnp.pad(source, (0, pad), constant_values=n_entries)
        flat_coef = jnp.pad(flat_coef, (0, 1))
    src_rows = jnp.minimum(source // k, rows.shape[0] - 1)

    def add(t, acc):
        src = jax.lax.dynamic_slice_in_dim(source, t * block, block)
        c = flat_coef.at[src].get(mode="promise_in_bounds")
        r = rows.at[jax.lax.dynamic_slice_in_dim(src_rows, t * block, block)].get(mode="promise_in_bounds")
        dst = jax.lax.dynamic_slice_in_dim(feature, t * block, block)
        return acc.at[dst].add(c[:, None] * r, mode="promise_in_bounds")

    return jax.lax.fori_loop(0, n, add, jnp.zeros((width, d), rows.dtype))


def scatter_add_rows(
    coef: jax.Array, rows: jax.Array, indices: jax.Array, width: int, block: int | None = None,
    plan: ScatterPlan | None = None,
) -> jax.Array:
    """``out (width, d)`` with ``out[indices[b, s]] += coef[b, s] * rows[b]``: coef, indices
    (B, k), rows (B, d). The transpose of a gather; sequential, so deterministic.

    On :data:`SORTED_SCATTER_BACKENDS` (CPU) the updates are applied grouped by table row, in
    ascending position within a row: by the native kernel (:func:`native_kernels`; threads
    own table rows), or, with a given ``plan`` or without the kernel, by an XLA loop in
    :func:`scatter_plan` order (computed here when not given; XLA merges identical plans of one
    index array), :data:`SORTED_SCATTER_BLOCK` entries per step: measured ~3x faster than the
    update order at d 576, D 9216, k 128, B 4096 (docs/performance.md). Elsewhere: over row
    blocks of (block, k, d) updates (one block on accelerators). The two agree up to float
    summation order. An explicit ``block`` takes the row-block path on any backend."""
    B, k = indices.shape
    d = rows.shape[-1]
    if jax.default_backend() in SORTED_SCATTER_BACKENDS and block is None:
        if plan is None and native_kernels():
            return _native.scatter_rows(coef, rows, indices, width)
        plan = scatter_plan(indices, width) if plan is None else plan
        return _sorted_scatter_add(coef, rows, plan, width, SORTED_SCATTER_BLOCK)
    block = default_block_rows(B, k, d) if block is None else block
    (cb, rb, ib), n = _blocked([coef, rows, indices], block)

    def add(acc, c, r, i):
        upd = (c[..., None] * r[:, None, :]).reshape(-1, d)
        return acc.at[i.reshape(-1)].add(upd, mode="promise_in_bounds")

    acc = jnp.zeros((width, d), rows.dtype)
    if n == 1:
        return add(acc, cb, rb, ib)
    return jax.lax.fori_loop(0, n, lambda t, a: add(a, _slice(cb, t, block), _slice(rb, t, block), _slice(ib, t, block)), acc)


def scatter_add_values(values: jax.Array, indices: jax.Array, width: int) -> jax.Array:
    """``out (width,)`` with ``out[indices[b, s]] += values[b, s]``."""
    return jnp.zeros((width,), values.dtype).at[indices.reshape(-1)].add(values.reshape(-1), mode="promise_in_bounds")


def _combine_by_slots(table: jax.Array, coef: jax.Array, indices: jax.Array, block: int) -> jax.Array:
    """:func:`combine_rows` as ``acc += coef[:, s] * table[indices[:, s]]`` over the k slots,
    :data:`SLOT_UNROLL` slots per loop step: XLA fuses each step's gathers and multiply-adds
    into one loop over the (block, d) accumulator, so no (block, k, d) array is written."""
    B, k = coef.shape
    d = table.shape[1]
    u = min(SLOT_UNROLL, k)
    pad = -(-k // u) * u - k
    if pad:  # zero coefficients at row 0 add nothing
        coef = jnp.pad(coef, ((0, 0), (0, pad)))
        indices = jnp.pad(indices, ((0, 0), (0, pad)))

    def fn(c, i):
        def step(s, acc):
            cs = jax.lax.dynamic_slice_in_dim(c, s * u, u, axis=1)
            js = jax.lax.dynamic_slice_in_dim(i, s * u, u, axis=1)
            for j in range(u):
                acc = acc + cs[:, j, None] * _gather(table, js[:, j])
            return acc

        return (jax.lax.fori_loop(0, c.shape[1] // u, step, jnp.zeros((c.shape[0], d), table.dtype)),)

    return _map_blocks(fn, [coef, indices], ((d,),), block)[0]


def _native_rows(block: int | None, *arrays: jax.Array) -> bool:
    """(trace time) Whether a gathered-row kernel runs natively: :func:`native_kernels`, no
    explicit ``block`` and float32 operands (a float64 pass keeps its precision in XLA)."""
    return block is None and all(a.dtype == jnp.float32 for a in arrays) and native_kernels()


@jax.custom_vjp
def _native_combine(table: jax.Array, coef: jax.Array, indices: jax.Array) -> jax.Array:
    """``srp_combine_rows`` at the full budget (B, d), differentiable in table and coef (the FFI
    call itself has no gradient rule): the transposes are :func:`scatter_add_rows` and
    :func:`dot_rows`."""
    return _native.combine_rows(table, coef, indices)[:, 0]


def _native_combine_fwd(table, coef, indices):
    return _native_combine(table, coef, indices), (table, coef, indices)


def _native_combine_bwd(res, g):
    table, coef, indices = res
    return scatter_add_rows(coef, g, indices, table.shape[0]), dot_rows(table, g, indices), None


_native_combine.defvjp(_native_combine_fwd, _native_combine_bwd)


@jax.custom_vjp
def _native_dot(table: jax.Array, probe: jax.Array, indices: jax.Array) -> jax.Array:
    """``srp_dot_rows`` of one probe per row (B, k), differentiable in table and probe: the
    transposes are :func:`scatter_add_rows` and :func:`combine_rows`."""
    return _native.dot_rows(table, probe[:, None], indices)[:, 0]


def _native_dot_fwd(table, probe, indices):
    return _native_dot(table, probe, indices), (table, probe, indices)


def _native_dot_bwd(res, g):
    table, probe, indices = res
    return scatter_add_rows(g, probe, indices, table.shape[0]), combine_rows(table, g, indices), None


_native_dot.defvjp(_native_dot_fwd, _native_dot_bwd)


def combine_rows(table: jax.Array, coef: jax.Array, indices: jax.Array, block: int | None = None) -> jax.Array:
    """``sum_s coef[b, s] * table[indices[b, s]]`` (B, d): the sparse decode kernel. With the
    native kernels (:func:`_native_rows`) ``srp_combine_rows`` over the thread pool; else on CPU
    a loop over the k slots (:func:`_combine_by_slots`, blocks of ``block`` rows, default
    :func:`default_decode_rows`); elsewhere one gather of the (B, k, d) rows and a contraction."""
    if _native_rows(block, table, coef):
        return _native_combine(table, coef, indices)
    if jax.default_backend() in SLOT_DECODE_BACKENDS:
        block = default_decode_rows(indices.shape[0], table.shape[1]) if block is None else block
        return _combine_by_slots(table, coef, indices, block)
    block = default_block_rows(*indices.shape, table.shape[1]) if block is None else block
    fn = lambda c, i: (jnp.einsum("bk,bkd->bd", c, _gather(table, i), precision=HIGHEST),)  # noqa: E731
    return _map_blocks(fn, [coef, indices], ((table.shape[1],),), block)[0]


def dot_rows(table: jax.Array, probe: jax.Array, indices: jax.Array, block: int | None = None) -> jax.Array:
    """``table[indices[b, s]] . probe[b]`` (B, k): the transpose of :func:`combine_rows` in coef
    (natively ``srp_dot_rows`` where :func:`_native_rows` allows)."""
    if _native_rows(block, table, probe):
        return _native_dot(table, probe, indices)
    block = default_block_rows(*indices.shape, table.shape[1]) if block is None else block
    fn = lambda p, i: (jnp.einsum("bd,bkd->bk", p, _gather(table, i), precision=HIGHEST),)  # noqa: E731
    return _map_blocks(fn, [probe, indices], ((indices.shape[1],),), block)[0]


def combine_and_dot_rows(
    table: jax.Array, coef: jax.Array, indices: jax.Array, probe: jax.Array, block: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(:func:`combine_rows`, :func:`dot_rows`) of the same rows from one gather pass:
    ``sum_s coef[b, s] table[i_bs]`` (B, d) and ``table[i_bs] . probe[b]`` (B, k) (natively
    two kernel calls where :func:`_native_rows` allows)."""
    if _native_rows(block, table, coef, probe):
        return combine_rows(table, coef, indices), dot_rows(table, probe, indices)
    block = default_block_rows(*indices.shape, table.shape[1]) if block is None else block

    def fn(c, i, p):
        rows = _gather(table, i)
        return (jnp.einsum("bk,bkd->bd", c, rows, precision=HIGHEST), jnp.einsum("bd,bkd->bk", p, rows, precision=HIGHEST))

    return _map_blocks(fn, [coef, indices, probe], ((table.shape[1],), (indices.shape[1],)), block)


def default_pass_rows(width: int) -> int:
    """Rows per chunk of a full-vocabulary pass over a dictionary of ``width`` (D) features:
    :data:`CPU_PASS_ELEMENTS` pre-activations on CPU (a power of two, at least
    :data:`PASS_ROWS`), :data:`PASS_ROWS` elsewhere."""
    if jax.default_backend() != "cpu":
        return PASS_ROWS
    return max(PASS_ROWS, _power_of_two_rows(CPU_PASS_ELEMENTS, width))


def pass_rows(row_batch: int | None, width: int, *arrays: Any) -> int:
    """The chunk of a full-vocabulary pass (reconstruction, usage, evaluation, the code table):
    ``row_batch`` when given; else :data:`PASS_ROWS` when any of ``arrays`` (the dictionary's
    parameters, the rows) lies on a device mesh (the dense encode there keeps its (rows, D)
    activations small), and :func:`default_pass_rows` of ``width`` on one device."""
    if row_batch is not None:
        return int(row_batch)
    if any(is_spread(a) for a in arrays):
        return PASS_ROWS
    return default_pass_rows(width)


# --------------------------------------------------------------------------------------------
# The TopK selection with its sparse gradient


def _select_block(kernel, bias, x, mask, k):
    acts = jax.nn.relu(jnp.matmul(x, kernel, precision=HIGHEST) + bias)
    if mask is not None:
        acts = jnp.where(mask, acts, 0.0)
    values, indices = _native.topk(acts, k) if native_kernels() else jax.lax.top_k(acts, k)
    return values, indices.astype(jnp.int32)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _topk_select(kernel, bias, x, mask, k):
    B = x.shape[0]
    block = default_encode_rows(B, kernel.shape[1])
    (xb,), n = _blocked([x], block)
    if n == 1:
        values, indices = _select_block(kernel, bias, xb, mask, k)
        return values[:B], indices[:B]
    if n <= MAX_UNROLLED_ENCODE_BLOCKS:
        # the blocks written out in the program (not a loop): XLA:CPU's executor may then run
        # one block's single-threaded top-k beside the next block's matmul
        parts = [_select_block(kernel, bias, xb[t * block : (t + 1) * block], mask, k) for t in range(n)]
        return jnp.concatenate([p[0] for p in parts])[:B], jnp.concatenate([p[1] for p in parts])[:B]
    values, indices = jax.lax.map(lambda xx: _select_block(kernel, bias, xx, mask, k), xb.reshape(n, block, -1))
    return values.reshape(n * block, k)[:B], indices.reshape(n * block, k)[:B]


def _topk_select_fwd(kernel, bias, x, mask, k):
    values, indices = _topk_select(kernel, bias, x, mask, k)
    return (values, indices), (kernel, x, values, indices, mask)


def _topk_select_bwd(k, res, cotangents):
    kernel, x, values, indices, mask = res
    g_values = cotangents[0]
    # relu' is 1 exactly where the selected value is positive (masked entries are 0)
    g_pre = jnp.where(values > 0, g_values, 0.0)
    D = kernel.shape[1]
    if native_kernels():  # summed by table row, written straight into the kernel's (d, D) layout
        g_kernel = _native.scatter_rows(g_pre, x, indices, D, transpose=True)
    else:  # gathered as (D, d) rows; put into the kernel's (d, D) layout once (not once per
        # optimizer pass: see transpose_materialized)
        g_kernel = transpose_materialized(scatter_add_rows(g_pre, x, indices, D))
    g_bias = scatter_add_values(g_pre, indices, D)
    g_x = combine_rows(kernel.T, g_pre, indices)  # dropped by XLA when x needs no gradient
    return g_kernel, g_bias, g_x, None


_topk_select.defvjp(_topk_select_fwd, _topk_select_bwd)


def topk_codes(params: Params, x: jax.Array, k: int, mask: jax.Array | None = None) -> SparseCode:
    """The TopK code of rows x (B, d) as (values, indices) (B, k): the k largest of
    ``ReLU(x @ kernel + bias)`` (``mask`` (D,) bool: only those features compete, the others
    count as 0), ties to the lower index, values descending. ``1 <= k <= D``.

    Equal to ``topk_mask`` scattered densely; differentiable in params and x with the sparse
    gradient (only the selected pre-activations carry one).
    """
    enc = params["encoder"]
    values, indices = _topk_select(enc["kernel"], enc["bias"], x, mask, int(k))
    return SparseCode(values, indices)


# --------------------------------------------------------------------------------------------
# Decode, reconstruction errors and probe dots (custom gradients: scatter-adds only)


@jax.custom_vjp
def decode(decoder: jax.Array, values: jax.Array, indices: jax.Array) -> jax.Array:
    """``sum_s values[b, s] * decoder[indices[b, s]]`` (B, d): the decode of a sparse code."""
    return combine_rows(decoder, values, indices)


def _decode_fwd(decoder, values, indices):
    return decode(decoder, values, indices), (decoder, values, indices)


def _decode_bwd(res, g):
    decoder, values, indices = res
    return scatter_add_rows(values, g, indices, decoder.shape[0]), dot_rows(decoder, g, indices), None


decode.defvjp(_decode_fwd, _decode_bwd)


def decode_code(params: Params, code: SparseCode) -> jax.Array:
    """The reconstruction (B, d) of a :class:`SparseCode` with ``params["decoder"]``."""
    return decode(params["decoder"], code.values, code.indices)


def _level_errors(decoder, values, indices, target, levels, block):
    """Forward of :func:`squared_errors`: errors (L, B), residuals r_l (L, B, d), and
    q_l = rows . r_l (L, B, k) (zero beyond k_l)."""
    k = values.shape[1]
    d = decoder.shape[1]
    L = len(levels)
    slot = jnp.arange(k)
    if _native_rows(block, decoder, values, target):
        # the decode at every budget in one slot-order pass, then the L residuals' dots with
        # the k rows (zero beyond each budget, as below)
        budgets = sorted(set(levels))  # the kernel's prefixes ascend; levels may come in any order
        xhat = _native.combine_rows(decoder, values, indices, tuple(budgets))
        if tuple(budgets) != levels:
            xhat = xhat[:, [budgets.index(kl) for kl in levels]]
        r = xhat - target[:, None, :]  # (B, L, d)
        q = _native.dot_rows(decoder, r, indices)  # (B, L, k)
        q = jnp.where(slot[None, None, :] < jnp.asarray(levels)[None, :, None], q, 0.0)
        return jnp.sum(r * r, axis=-1).T, jnp.moveaxis(r, 1, 0), jnp.moveaxis(q, 1, 0)

    def fn(v, i, y):
        rows = _gather(decoder, i)  # (b, k, d)
        errs, resid, q = [], [], []
        for kl in levels:
            xhat = jnp.einsum("bk,bkd->bd", v[:, :kl], rows[:, :kl], precision=HIGHEST)
            r = xhat - y
            errs.append(jnp.sum(r * r, axis=-1))
            resid.append(r)
            q.append(jnp.where(slot < kl, jnp.einsum("bd,bkd->bk", r, rows, precision=HIGHEST), 0.0))
        return jnp.stack(errs, 1), jnp.stack(resid, 1), jnp.stack(q, 1)

    block = default_block_rows(values.shape[0], k, d) if block is None else block
    e, r, q = _map_blocks(fn, [values, indices, target], ((L,), (L, d), (L, k)), block)
    return e.T, jnp.moveaxis(r, 1, 0), jnp.moveaxis(q, 1, 0)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _squared_errors(decoder, values, indices, target, levels):
    return _level_errors(decoder, values, indices, target, levels, None)[0]


def _squared_errors_fwd(decoder, values, indices, target, levels):
    e, r, q = _level_errors(decoder, values, indices, target, levels, None)
    return e, (decoder, values, indices, r, q)


def _squared_errors_bwd(levels, res, g):
    decoder, values, indices, r, q = res
    # d e_l / d v_s = 2 q_l[s] (s < k_l); d e_l / d target = -2 r_l
    g_values = 2.0 * jnp.einsum("lb,lbk->bk", g, q)
    g_r = 2.0 * g[:, :, None] * r  # (L, B, d)
    g_target = -jnp.sum(g_r, axis=0)
    # decoder row of slot s: v_s * sum_{l: s < k_l} g_r[l] -> one scatter per segment of slots
    bounds = sorted({0, *levels})
    g_decoder = jnp.zeros_like(decoder)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        members = [j for j, kl in enumerate(levels) if kl >= hi]
        rows = sum(g_r[j] for j in members)
        g_decoder = g_decoder + scatter_add_rows(values[:, lo:hi], rows, indices[:, lo:hi], decoder.shape[0])
    return g_decoder, g_values, None, g_target


_squared_errors.defvjp(_squared_errors_fwd, _squared_errors_bwd)


def squared_errors(decoder: jax.Array, code: SparseCode, target: jax.Array, levels: tuple[int, ...]) -> jax.Array:
    """``||sum_{s < k_l} v_s decoder[i_s] - target_b||^2`` (L, B) for each budget k_l in
    ``levels`` (each <= k, the code's width; prefixes of a descending TopK code are the TopK
    codes of smaller budgets). ``sum(...) / (B * d)`` is the MSE at that budget."""
    levels = tuple(int(kl) for kl in levels)
    if not levels or min(levels) < 1 or max(levels) > code.values.shape[1]:
        raise ValueError(f"levels {levels} must lie in [1, {code.values.shape[1]}]")
    return _squared_errors(decoder, code.values, code.indices, target, levels)


def _probe_fwd_terms(decoder, values, indices, probe):
    p = dot_rows(decoder, probe, indices)  # (B, k) = decoder[i] . probe
    return jnp.sum(values * p, axis=-1), p


@jax.custom_vjp
def _probe_dots(decoder, values, indices, probe):
    return _probe_fwd_terms(decoder, values, indices, probe)[0]


def _probe_dots_fwd(decoder, values, indices, probe):
    out, p = _probe_fwd_terms(decoder, values, indices, probe)
    return out, (decoder, values, indices, probe, p)


def _probe_dots_bwd(res, g):
    decoder, values, indices, probe, p = res
    g_decoder = scatter_add_rows(values * g[:, None], probe, indices, decoder.shape[0])
    g_probe = g[:, None] * combine_rows(decoder, values, indices)  # dropped when unused
    return g_decoder, g[:, None] * p, None, g_probe


_probe_dots.defvjp(_probe_dots_fwd, _probe_dots_bwd)


def probe_dots(decoder: jax.Array, code: SparseCode, probe: jax.Array) -> jax.Array:
    """``probe_b . decode(code)_b`` (B,) without forming the decode (the prism term's h . x_hat)."""
    return _probe_dots(decoder, code.values, code.indices, probe)


# --------------------------------------------------------------------------------------------
# Code statistics and conversion


def code_stats(code: SparseCode, width: int) -> CodeStats:
    """L0 (mean positive entries per row), sum of squares and the fired mask (width,)."""
    positive = code.values > 0
    l0 = jnp.mean(jnp.sum(positive.astype(jnp.float32), axis=-1))
    fired = scatter_add_values(positive.astype(jnp.int32), code.indices, width) > 0
    return CodeStats(l0, jnp.sum(jnp.square(code.values)), fired)


def dense_code_stats(code: jax.Array) -> CodeStats:
    """:func:`code_stats` of a dense (B, D) code."""
    return CodeStats(
        jnp.mean(jnp.sum((code > 0).astype(jnp.float32), axis=-1)), jnp.sum(jnp.square(code)), jnp.any(code > 0, axis=0)
    )


def by_feature(code: SparseCode, width: int) -> SparseCode:
    """The same code laid out for reading: nonzero entries ascending by feature index, then
    padding (index -1, value 0). ``width`` is D."""
    key = jnp.where(code.values != 0, code.indices, width)
    key, values, indices = jax.lax.sort((key, code.values, code.indices), dimension=code.values.ndim - 1, num_keys=1)
    valid = key < width
    return SparseCode(jnp.where(valid, values, 0.0), jnp.where(valid, indices, -1).astype(jnp.int32))


def safe_indices(indices: jax.Array) -> jax.Array:
    """Padding indices (-1) replaced by 0, for gathers whose padded coefficients are 0."""
    return jnp.where(indices >= 0, indices, 0)


def to_dense(code: SparseCode, width: int) -> jax.Array:
    """The dense (B, width) code (zeros outside the active entries; padding -1 is dropped)."""
    B = code.values.shape[0]
    idx = jnp.where(code.indices >= 0, code.indices, width)
    return jnp.zeros((B, width), code.values.dtype).at[jnp.arange(B)[:, None], idx].set(code.values, mode="drop")


__all__ = [
    "CPU_BLOCK_ELEMENTS",
    "CPU_ENCODE_ELEMENTS",
    "CPU_PASS_ELEMENTS",
    "PASS_ROWS",
    "default_pass_rows",
    "pass_rows",
    "MAX_UNROLLED_ENCODE_BLOCKS",
    "SORTED_SCATTER_BACKENDS",
    "SORTED_SCATTER_BLOCK",
    "NATIVE_KERNEL_BACKENDS",
    "native_kernels",
    "SparseCode",
    "CodeStats",
    "default_block_rows",
    "default_encode_rows",
    "default_decode_rows",
    "ScatterPlan",
    "scatter_plan",
    "scatter_add_rows",
    "scatter_add_values",
    "combine_rows",
    "dot_rows",
    "combine_and_dot_rows",
    "topk_codes",
    "decode",
    "decode_code",
    "squared_errors",
    "probe_dots",
    "code_stats",
    "dense_code_stats",
    "by_feature",
    "safe_indices",
    "to_dense",
]
