"""Feature labels: which vocabulary rows each feature reads out most strongly.

A feature's *top rows* are the readout rows with the largest encoder activation for it,
``relu(x_v . W_enc[:, f] + b_f)`` over the normalized rows ``x_v`` (the reference's display
labelling, ``display_label_features``; not the decoder cosine ``rows_normalized @ decoder^T``
of its runner's ``label_features``): the rows that switch the feature on. Computed in jitted
blocks of rows with a running top-n per feature, and in chunks of features, so all features of
a full vocabulary fit in memory.

With a tokenizer, :func:`feature_labels` shows the rows as tokens the way the reference does:
each candidate is cleaned (:func:`srp_jax.tokens.clean_token`), tokens
:func:`~srp_jax.tokens.is_display_token` rejects (empty, lone punctuation, whitespace) are
skipped, repeats of the same text are dropped, and the first ``n`` remain. Rows whose
activation is 0 (the feature is off there) never label a feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._arrays import to_device
from .compile import compiled
from .dictionary import inference_view
from .factorizers.kernels import HIGHEST

LABEL_MAX_LEN = 36  # the reference's readable label: longer than 36 characters -> the first 35 + "..."
FEATURE_CHUNK = 4096  # features per scan (a (chunk, row block) activation tile at a time)


@compiled(static_argnames=("n", "block"))
def _top_rows(params, X, features, row_ok, *, n: int, block: int):
    """(values (F, n), row positions (F, n)) of the n largest activations per feature over
    the rows where ``row_ok``; -inf values where fewer rows qualify."""
    kernel = params["encoder"]["kernel"][:, features]  # (d, F)
    bias = params["encoder"]["bias"][features][:, None]  # (F, 1)
    V = X.shape[0]
    n_blocks = -(-V // block)
    pad = n_blocks * block - V
    padded = jnp.pad(X, ((0, pad), (0, 0))).reshape(n_blocks, block, -1)
    ok = jnp.pad(row_ok, (0, pad)).reshape(n_blocks, block)

    def body(carry, args):
        best_v, best_i = carry
        xb, okb, start = args
        # the encoder pre-activation x . E_f + b_f (as kernels.pre_activation), laid out (F, block)
        # by the contraction itself: a transpose of the (block, F) tile costs as much as the top-k
        acts = jax.nn.relu(jnp.einsum("df,bd->fb", kernel, xb, precision=HIGHEST) + bias)
        pos = start + jnp.arange(block)
        acts = jnp.where(okb[None, :], acts, -jnp.inf)
        vals = jnp.concatenate([best_v, acts], axis=1)
        idx = jnp.concatenate([best_i, jnp.broadcast_to(pos, acts.shape)], axis=1)
        top_v, where = jax.lax.top_k(vals, n)  # ties: the earlier (lower) row wins
        return (top_v, jnp.take_along_axis(idx, where, axis=1)), None

    F = features.shape[0]
    init = (jnp.full((F, n), -jnp.inf, X.dtype), jnp.zeros((F, n), jnp.int32))
    (values, rows), _ = jax.lax.scan(body, init, (padded, ok, jnp.arange(n_blocks) * block))
    return values, rows


def _chunks(n_features: int, limit: int) -> tuple[int, int]:
    """(number of chunks, chunk size): equal chunks of at most ``limit``, a multiple of 128
    (one compilation for all chunks; the last is padded)."""
    count = max(1, -(-n_features // limit))
    size = -(-n_features // count)
    if count > 1:
        size = -(-size // 128) * 128
    return count, size


def top_rows_by_activation(
    dictionary: Any,
    readout: Any,
    features: Any = None,
    n: int = 6,
    *,
    block: int = 4096,
    row_mask: Any = None,
    feature_chunk: int = FEATURE_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """``(token_ids (F, n), activations (F, n))`` of each feature's n most activating rows.

    ``features`` (F,) feature ids (default: all); ``readout`` a
    :class:`~srp_jax.readout.Readout` (its ``row_token_ids`` map row positions to token ids);
    ``row_mask`` (V,) bool: only these rows compete (where fewer than n do, the remaining
    entries have activation -inf and token id -1). Ties go to the lower row.
    """
    _, params, _, _ = inference_view(dictionary)
    ids = np.arange(dictionary.d_features) if features is None else np.asarray(features, np.int64).reshape(-1)
    X = to_device(readout.rows_normalized)
    V = int(X.shape[0])
    n = int(min(n, V))
    ok = np.ones(V, bool) if row_mask is None else np.asarray(row_mask, bool).reshape(-1)
    if ok.shape[0] != V:
        from .errors import ShapeError

        raise ShapeError(f"row_mask has {ok.shape[0]} entries but the readout has {V} rows")
    ok_j = jnp.asarray(ok)
    count, size = _chunks(max(1, ids.size), int(feature_chunk))
    values, rows = [], []
    for c in range(count):
        part = ids[c * size : (c + 1) * size]
        padded = np.zeros(size, np.int32)
        padded[: part.size] = part
        v, r = _top_rows(params, X, jnp.asarray(padded), ok_j, n=n, block=int(min(block, V)))
        values.append(np.asarray(v)[: part.size])
        rows.append(np.asarray(r)[: part.size])
    values_np = np.concatenate(values)[: ids.size]
    rows_np = np.concatenate(rows)[: ids.size]
    token_ids = np.asarray(readout.row_token_ids, np.int64)[rows_np]
    token_ids = np.where(np.isfinite(values_np), token_ids, -1)
    return token_ids, values_np


def readable_label(tokens: Sequence[str], max_len: int = LABEL_MAX_LEN) -> str:
    """``"tok1/tok2/tok3"`` (the first three), whitespace runs collapsed; longer than
    ``max_len``: its first ``max_len - 1`` characters and ``...`` (the reference's rule, as
    :func:`srp_jax.tokens.clean_text`); ``""`` when there is no token."""
    text = " ".join("/".join(t for t in tokens[:3] if t).split())
    return text if len(text) <= max_len else text[: max_len - 1] + "..."


def feature_labels(
    dictionary: Any,
    readout: Any,
    features: Any = None,
    *,
    n: int = 6,
    tokenizer: Any = None,
    candidates: int | None = None,
    block: int = 4096,
) -> list[dict[str, Any]]:
    """One label record per feature (default: all), in the order of ``features``:

    ``feature_id``, ``label`` (:func:`readable_label` of the tokens), ``top_token_ids``,
    ``top_token_labels`` and ``top_activations`` (at most ``n``, by activation descending;
    only rows where the feature is on). Without a tokenizer the tokens are ``tok_<id>`` and
    the rows are the plain top n; with one, the top ``candidates`` (default 4n) displayable
    rows are cleaned and deduplicated first (rows beyond the tokenizer never label).
    """
    ids = np.arange(dictionary.d_features) if features is None else np.asarray(features, np.int64).reshape(-1)
    row_ids = np.asarray(readout.row_token_ids, np.int64)
    if tokenizer is None:
        top_ids, top_vals = top_rows_by_activation(dictionary, readout, ids, n, block=block)
        texts = None
    else:
        from .tokens import display_table

        texts_all, show = display_table(tokenizer, row_ids)
        text_of = dict(zip(row_ids.tolist(), texts_all))
        width = int(candidates or 4 * n)
        top_ids, top_vals = top_rows_by_activation(dictionary, readout, ids, width, block=block, row_mask=show)
        texts = text_of
    out = []
    for j, fid in enumerate(ids.tolist()):
        chosen_ids: list[int] = []
        chosen_text: list[str] = []
        chosen_vals: list[float] = []
        for tid, val in zip(top_ids[j].tolist(), top_vals[j].tolist()):
            if not val > 0 or tid < 0:
                break  # sorted descending: the rest are off too
            text = f"tok_{tid}" if texts is None else texts[tid]
            if text in chosen_text:
                continue
            chosen_ids.append(int(tid))
            chosen_text.append(text)
            chosen_vals.append(float(val))
            if len(chosen_ids) >= n:
                break
        out.append({
            "feature_id": int(fid),
            "label": readable_label(chosen_text),
            "top_token_ids": chosen_ids,
            "top_token_labels": chosen_text,
            "top_activations": chosen_vals,
        })  # fmt: skip
    return out


__all__ = ["top_rows_by_activation", "feature_labels", "readable_label", "LABEL_MAX_LEN"]
