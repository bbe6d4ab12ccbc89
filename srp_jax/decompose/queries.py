"""Building linear queries: the token weights alpha and mean-subtraction m of each query kind
(method.md 3.3a), from token ids or strings resolved with a tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import as_float_array, to_numpy
from ..errors import ConfigError

QUERY_KINDS = (
    "selected_token",
    "target_vs_vocab_mean",
    "pairwise_margin",
    "token_family_margin",
    "winner_vs_topk",
    "winner_vs_rank",
)


def resolve_single_token(tokenizer: Any, raw: str) -> int | None:
    """One token id for a token string: try ``" " + raw`` first (unless it starts with a
    space), then ``raw``; success needs exactly one id (no special tokens). Else None."""
    candidates = [raw] if raw.startswith(" ") else [" " + raw, raw]
    for text in candidates:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
    return None


def _token_id(token: Any, tokenizer: Any, role: str) -> int | None:
    if isinstance(token, str):
        if tokenizer is None:
            raise ConfigError(f"{role} {token!r} is a string: pass tokenizer= to resolve it")
        return resolve_single_token(tokenizer, token)
    if not isinstance(token, (bool, np.bool_)) and not isinstance(token, (int, np.integer)):
        # a 0-d integer array of any framework (jnp.argmax(...), torch.argmax(...), np.int64)
        if getattr(token, "shape", None) is not None and len(token.shape) == 0:
            value = to_numpy(token, name=role)
            if np.issubdtype(value.dtype, np.integer):
                token = int(value)
    if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
        raise ConfigError(f"{role} must be a token id or a token string, got {token!r}")
    if int(token) < 0:
        raise ConfigError(f"{role} must be a non-negative token id, got {token}")
    return int(token)


def _merge(weights: dict[int, float], tid: int, value: float) -> None:
    weights[tid] = float(weights.get(tid, 0.0) + value)


def build_query_weights(
    query_kind: str,
    *,
    target: Any = None,
    target_a: Any = None,
    target_b: Any = None,
    target_family: Sequence[Any] = (),
    contrast_family: Sequence[Any] = (),
    logits: Any = None,
    top_competitors: int = 10,
    competitor_rank: int = 5,
    tokenizer: Any = None,
) -> tuple[dict[int, float], float, dict[str, Any]]:
    """Token weights alpha, the mean-subtraction weight m, and metadata for a query kind.

    | kind | alpha | m |
    | selected_token | {t: 1} | 0 |
    | target_vs_vocab_mean | {t: 1} | 1 |
    | pairwise_margin | {A: +1} merged with {B: -1} (A == B gives weight 0) | 0 |
    | token_family_margin | +1/|A| per A token, -1/|B| per B token, merged | 0 |
    | winner_vs_topk | argmax +1; the next ``top_competitors`` tokens -softmax(their logits) | 0 |
    | winner_vs_rank | argmax +1; the token at rank max(2, ``competitor_rank``) -1 | 0 |

    Tokens are ids, or strings resolved with ``tokenizer`` (unresolvable family members are
    dropped; an unresolvable single target is an error). ``logits`` (V,) are needed by the
    winner kinds.
    """
    weights: dict[int, float] = {}
    meta: dict[str, Any] = {"query_kind": query_kind}
    if query_kind in ("selected_token", "target_vs_vocab_mean"):
        tid = _token_id(target, tokenizer, "target")
        if tid is None:
            raise ConfigError(f"{query_kind}: target {target!r} did not resolve to a single token")
        weights[tid] = 1.0
        meta["target_token_id"] = tid
        return weights, (1.0 if query_kind == "target_vs_vocab_mean" else 0.0), meta
    if query_kind == "pairwise_margin":
        aid = _token_id(target_a, tokenizer, "target_a")
        bid = _token_id(target_b, tokenizer, "target_b")
        if aid is None or bid is None:
            raise ConfigError(f"pairwise_margin: {target_a!r} / {target_b!r} did not resolve to single tokens")
        weights[aid] = 1.0
        _merge(weights, bid, -1.0)
        meta.update(target_token_id=aid, contrast_token_ids=[bid])
        return weights, 0.0, meta
    if query_kind == "token_family_margin":
        a_ids = [t for t in (_token_id(x, tokenizer, "target_family") for x in target_family) if t is not None]
        b_ids = [t for t in (_token_id(x, tokenizer, "contrast_family") for x in contrast_family) if t is not None]
        if not a_ids or not b_ids:
            raise ConfigError("token_family_margin: a token family is empty after resolving its tokens")
        for tid in a_ids:
            _merge(weights, tid, 1.0 / len(a_ids))
        for tid in b_ids:
            _merge(weights, tid, -1.0 / len(b_ids))
        meta.update(target_token_ids=a_ids, contrast_token_ids=b_ids)
        return weights, 0.0, meta
    if query_kind in ("winner_vs_topk", "winner_vs_rank"):
        if logits is None:
            raise ConfigError(f"{query_kind} needs logits=")
        lg = np.asarray(as_float_array(logits, name="logits", ndim=1))
        if query_kind == "winner_vs_topk":
            count = min(max(2, int(top_competitors) + 1), lg.shape[0])
        else:
            count = min(max(2, int(competitor_rank)), lg.shape[0])
        vals, ids = jax.lax.top_k(jnp.asarray(lg), count)
        vals, ids = np.asarray(vals), np.asarray(ids)
        winner = int(ids[0])
        weights[winner] = 1.0
        meta["target_token_id"] = winner
        if query_kind == "winner_vs_topk":
            comp_ids = [int(t) for t in ids[1: int(top_competitors) + 1]]
            comp_w = np.asarray(jax.nn.softmax(jnp.asarray(vals[1: int(top_competitors) + 1], jnp.float32)))
            for tid, w in zip(comp_ids, comp_w.tolist()):
                _merge(weights, tid, -float(w))
            meta.update(
                contrast_token_ids=comp_ids,
                competitor_weight_entropy=float(-(comp_w * np.log(np.maximum(comp_w, 1e-12))).sum()),
            )
        else:
            competitor = int(ids[-1])
            _merge(weights, competitor, -1.0)
            meta.update(contrast_token_ids=[competitor], competitor_rank=count, competitor_logit=float(vals[-1]))
        return weights, 0.0, meta
    raise ConfigError(f"unknown query kind {query_kind!r} (expected one of: {', '.join(QUERY_KINDS)})")


__all__ = ["QUERY_KINDS", "resolve_single_token", "build_query_weights"]
