"""The vocabulary's sparse codes, computed once: a :class:`CodeTable` per (dictionary, readout, k).

Decomposing the logit of token t needs z_t = encode(x_t): an O(D·d) encoder pass. The rows of
a readout are fixed, so their codes are too: :func:`build_code_table` encodes every row once
(jitted, in blocks, through the architecture's sparse encode) and keeps the k active
(value, index) pairs per row. A query then costs O(k·d): gather the k decoder rows, dot them
with h (see :mod:`srp_jax.decompose.batched`). :func:`code_table` caches tables by the identity
of the dictionary's parameters and the readout's rows, so repeated calls reuse one table.

Only architectures whose eval code has at most k active entries (the TopK family, k < D)
have a table: their table is exact, not a truncation.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp

from .. import factorizers as F
from .._arrays import as_float_array, check_last_dim, static_k
from .._pytree import pytree_dataclass, static_field
from ..compile import compiled
from ..dictionary import inference_view
from ..errors import ConfigError, ShapeError
from ..factorizers import sparse as S


@pytree_dataclass
class CodeTable:
    """The eval-mode codes of V readout rows: ``values`` (V, k) float32 and ``indices`` (V, k)
    int32, each row's nonzero entries ascending by feature index then padding (index -1,
    value 0); ``n_active`` (V,) int32 nonzero entries per row. ``k`` and ``d_features`` are
    static. ``values[t] / indices[t]`` is exactly ``encode(rows_normalized[t], k)`` restricted
    to its nonzeros."""

    values: jax.Array
    indices: jax.Array
    n_active: jax.Array
    k: int = static_field()
    d_features: int = static_field()

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    def rows(self, positions: Any) -> S.SparseCode:
        """The codes of readout row positions (B,) as a :class:`SparseCode` (B, k)."""
        return S.SparseCode(self.values[positions], self.indices[positions])


def sparse_codes_by_feature(cfg, params, buffers, x, k) -> tuple[S.SparseCode, jax.Array]:
    """(traced) The eval codes of rows x (B, d) laid out by feature (:func:`S.by_feature`) and
    their nonzero counts (B,)."""
    code = S.by_feature(F.sparse_code(cfg, params, buffers, x, k), cfg.d_features)
    return code, jnp.sum(code.indices >= 0, axis=-1).astype(jnp.int32)


@compiled(static_argnames=("cfg", "k", "row_batch"))
def _table_arrays(cfg, params, buffers, X, *, k, row_batch):
    V = X.shape[0]
    n = -(-V // row_batch)
    Xp = jnp.pad(X, ((0, n * row_batch - V), (0, 0))).reshape(n, row_batch, -1)

    def block(x):
        code, n_active = sparse_codes_by_feature(cfg, params, buffers, x, k)
        return code.values, code.indices, n_active

    values, indices, n_active = jax.lax.map(block, Xp)
    kk = values.shape[-1]
    return values.reshape(-1, kk)[:V], indices.reshape(-1, kk)[:V], n_active.reshape(-1)[:V]


def build_code_table(model: Any, readout: Any, k: int | None = None, *, row_batch: int | None = None) -> CodeTable:
    """Encode every row of ``readout`` (a :class:`~srp_jax.readout.Readout`, or any object with
    ``rows_normalized`` (V, d)) with ``model`` at ``k`` (None: the trained k) into a
    :class:`CodeTable`. One jitted pass in blocks of ``row_batch`` rows (None:
    :func:`srp_jax.factorizers.sparse.pass_rows`)."""
    cfg, params, buffers, d_model = inference_view(model)
    kk = cfg.resolve_k(static_k(k))
    if not F.sparse_code_available(cfg, kk):
        raise ConfigError(
            f"a code table needs at most k < D active features per row (the TopK family); "
            f"{cfg.architecture} with k {kk} and D {cfg.d_features} has none"
        )
    X = as_float_array(getattr(readout, "rows_normalized", None), name="readout.rows_normalized", ndim=2)
    check_last_dim("readout.rows_normalized", X, d_model)
    if X.shape[0] == 0:
        raise ShapeError("readout has no rows")
    rows = S.pass_rows(row_batch, cfg.d_features, *jax.tree.leaves(params), X)
    values, indices, n_active = _table_arrays(cfg, params, buffers, X, k=kk, row_batch=max(1, min(rows, X.shape[0])))
    return CodeTable(values=values, indices=indices, n_active=n_active, k=kk, d_features=cfg.d_features)


# --------------------------------------------------------------------------------------------
# The cache: by identity of the arrays the table was computed from


_CACHE: dict[tuple, tuple[tuple[weakref.ref, ...], CodeTable]] = {}


def _sources(model: Any, readout: Any) -> tuple[Any, ...]:
    params = model.params
    return (model, params["encoder"]["kernel"], params["encoder"]["bias"], params["decoder"], readout.rows_normalized)


def _key(model: Any, readout: Any, k: int) -> tuple:
    return (*(id(obj) for obj in _sources(model, readout)), int(k))


def _ref(obj: Any):
    try:
        return weakref.ref(obj)
    except TypeError:  # not weak-referenceable: hold it (the entry then lives until cleared)
        return lambda obj=obj: obj


def cached_code_table(model: Any, readout: Any, k: int | None = None) -> CodeTable | None:
    """The cached table of (``model``, ``readout``, ``k``) if one was built, else None."""
    cfg = model.config
    kk = cfg.resolve_k(static_k(k))
    entry = _CACHE.get(_key(model, readout, kk))
    if entry is None:
        return None
    refs, table = entry
    if any(ref() is not obj for ref, obj in zip(refs, _sources(model, readout))):
        return None  # an id was reused by another object
    return table


def code_table(model: Any, readout: Any, k: int | None = None, *, row_batch: int | None = None) -> CodeTable:
    """The :class:`CodeTable` of (``model``, ``readout``, ``k``), built on first use and then
    reused: cached by the identity of the dictionary, its encoder/decoder arrays and the
    readout's rows (new parameters, e.g. after more training, get a new table). Entries are
    dropped when those objects are garbage collected (:func:`clear_code_tables` drops all)."""
    table = cached_code_table(model, readout, k)
    if table is not None:
        return table
    table = build_code_table(model, readout, k, row_batch=row_batch)
    key = _key(model, readout, table.k)
    _CACHE[key] = (tuple(_ref(obj) for obj in _sources(model, readout)), table)
    for obj in _sources(model, readout):
        try:
            weakref.finalize(obj, _CACHE.pop, key, None)
        except TypeError:
            pass
    return table


def clear_code_tables() -> None:
    """Drop every cached :class:`CodeTable`."""
    _CACHE.clear()


__all__ = [
    "CodeTable",
    "build_code_table",
    "code_table",
    "cached_code_table",
    "clear_code_tables",
    "sparse_codes_by_feature",
]
