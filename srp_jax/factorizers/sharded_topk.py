"""Top-k when the latent axis D is sharded over the mesh's ``model`` axis (exact, ties included).

A plain ``jax.lax.top_k`` over a D-sharded (B, D) activation makes XLA all-gather the whole
activation onto every device. The kernels here never do: each device holds its (B/data,
D/model) block and

* **per row** (TopK, Matryoshka TopK, AuxK): takes its local top-k (values and *global*
  feature indices), all-gathers the k candidates per shard along ``model`` (B/data, k·model),
  takes the top-k of the candidates and keeps the winners that fall in its block;
* **per batch** (BatchTopK training): the top ``n`` of all B·D entries. Each device takes its
  local top-``n`` (with global flat indices b·D + j), all candidates are gathered over every
  mesh axis the block is split on, put in flat-index order, and the top ``n`` of them is the
  selection; its smallest value is the cutoff.

Both are exact and equal to the unsharded ``lax.top_k`` selection including ties (the lower
index wins): every element of the global top-k is in its own shard's local top-k, and the
candidates are merged in global-index order (shard order for rows, an explicit sort by flat
index for the batch), which is the order ``lax.top_k`` breaks ties in.

:func:`approximate_topk` switches the *local* stage to ``jax.lax.approx_max_k`` (fast on TPU
only; elsewhere it is an exact top-k): the selection is then approximate (each shard keeps
about ``recall`` of its true local top-k); the merge stays exact. The training loop enables it
with ``mesh.topk: approx_max_k``; evaluation and decompositions always use the exact kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..compile import DATA, MODEL, mesh_axis_size

_APPROX_RECALL: contextvars.ContextVar[float | None] = contextvars.ContextVar("srp_topk_approx_recall", default=None)


@contextlib.contextmanager
def approximate_topk(recall: float | None) -> Iterator[None]:
    """Within this context (at trace time), top-k selections use ``approx_max_k`` with
    ``recall_target=recall`` (None: exact). Approximate: see the module docstring."""
    token = _APPROX_RECALL.set(None if recall is None else float(recall))
    try:
        yield
    finally:
        _APPROX_RECALL.reset(token)


def approx_recall() -> float | None:
    """The active ``approx_max_k`` recall target, or None (exact top-k)."""
    return _APPROX_RECALL.get()


def local_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k over the last axis: ``lax.top_k`` (exact, ties to the lower index), or
    ``lax.approx_max_k`` inside :func:`approximate_topk`."""
    recall = approx_recall()
    if recall is None:
        return jax.lax.top_k(x, k)
    return jax.lax.approx_max_k(x, k, recall_target=recall)


def _row_axis(rows: int) -> str | None:
    """``data`` when the rows split evenly over it (else rows are replicated)."""
    n = mesh_axis_size(DATA)
    return DATA if n > 1 and rows % n == 0 else None


def _col_parts(D: int) -> int:
    """How many ``model`` shards split a latent axis of size ``D`` (1 when it does not divide)."""
    m = mesh_axis_size(MODEL)
    return m if m > 1 and D % m == 0 else 1


def rows_sharded(acts: jax.Array) -> bool:
    """True when a top-k over ``acts`` (B, D) should take the sharded path: a mesh whose
    ``model`` axis divides D or whose ``data`` axis divides B (XLA would otherwise gather the
    activation for its top-k, even when only the batch is split)."""
    return acts.ndim == 2 and (_col_parts(acts.shape[1]) > 1 or _row_axis(acts.shape[0]) is not None)


batch_sharded = rows_sharded  # the same condition for the batch-wide top-n


def topk_rows_mask(acts: jax.Array, k: int) -> jax.Array:
    """Boolean (B, D) mask of the ``k`` largest entries per row of a sharded ``acts``
    (1 <= k < D). No gradient flows through the mask."""
    acts = jax.lax.stop_gradient(acts)
    B, D = acts.shape
    M = _col_parts(D)
    D_local = D // M
    k_local = min(k, D_local)
    row_axis = _row_axis(B)
    col_axis = MODEL if M > 1 else None

    def block(a: jax.Array) -> jax.Array:
        offset = jax.lax.axis_index(MODEL) * D_local if col_axis else 0
        vals, idx = local_top_k(a, k_local)
        if col_axis is None:  # D whole on this device: the local top-k is the answer
            win = idx
        else:
            gidx = idx.astype(jnp.int32) + offset
            # candidates in shard order, each shard's in index order among ties: global index order
            cand_v = jax.lax.all_gather(vals, MODEL, axis=1, tiled=True)  # (B_l, M * k_local)
            cand_i = jax.lax.all_gather(gidx, MODEL, axis=1, tiled=True)
            _, pos = jax.lax.top_k(cand_v, k)
            win = jnp.take_along_axis(cand_i, pos, axis=1) - offset  # (B_l, k) local columns
            win = jnp.where((win >= 0) & (win < D_local), win, D_local)  # others: out of range
        rows = jnp.arange(a.shape[0])[:, None]
        return jnp.zeros(a.shape, bool).at[rows, win].set(True, mode="drop")

    spec = P(row_axis, col_axis)
    return jax.shard_map(block, in_specs=spec, out_specs=spec)(acts)


def topk_batch_mask(acts: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """(mask (B, D) of the ``n`` largest entries of the whole of ``acts``, their smallest
    value): ``lax.top_k(acts.reshape(-1), n)``'s selection on a sharded ``acts``
    (1 <= n <= B·D; B·D < 2**31). No gradient flows through either output."""
    acts = jax.lax.stop_gradient(acts)
    B, D = acts.shape
    if B * D >= 2**31:
        raise ValueError(f"batch top-k over {B} x {D} entries needs int64 flat indices (B*D >= 2**31)")
    M = _col_parts(D)
    row_axis = _row_axis(B)
    R = mesh_axis_size(DATA) if row_axis else 1
    B_local, D_local = B // R, D // M
    n_local = min(n, B_local * D_local)
    gather_axes = tuple(ax for ax, size in ((DATA, R), (MODEL, M)) if size > 1)
    col_axis = MODEL if M > 1 else None

    def block(a: jax.Array) -> tuple[jax.Array, jax.Array]:
        r0 = (jax.lax.axis_index(DATA) * B_local) if row_axis else 0
        c0 = (jax.lax.axis_index(MODEL) * D_local) if col_axis else 0
        vals, idx = local_top_k(a.reshape(-1), n_local)
        idx = idx.astype(jnp.int32)
        flat = (idx // D_local + r0) * D + (idx % D_local + c0)  # global flat index b*D + j
        cand_v = jax.lax.all_gather(vals, gather_axes, axis=0, tiled=True)
        cand_i = jax.lax.all_gather(flat, gather_axes, axis=0, tiled=True)
        cand_i, cand_v = jax.lax.sort_key_val(cand_i, cand_v)  # flat-index order: ties as lax.top_k
        top_v, pos = jax.lax.top_k(cand_v, n)
        win = cand_i[pos]
        rows, cols = win // D - r0, win % D - c0
        inside = (rows >= 0) & (rows < B_local) & (cols >= 0) & (cols < D_local)
        rows = jnp.where(inside, rows, B_local)
        mask = jnp.zeros(a.shape, bool).at[rows, cols].set(True, mode="drop")
        # the same on every device; pmax tells shard_map the value is replicated
        return mask, jax.lax.pmax(jnp.min(top_v), gather_axes)

    spec = P(row_axis, col_axis)
    return jax.shard_map(block, in_specs=spec, out_specs=(spec, P()))(acts)


__all__ = [
    "approximate_topk",
    "approx_recall",
    "local_top_k",
    "rows_sharded",
    "batch_sharded",
    "topk_rows_mask",
    "topk_batch_mask",
]
