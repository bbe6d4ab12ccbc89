"""The fidelity gate: withhold an explanation when the sparse reconstruction fails the query.

``fidelity_gate`` is one pure, jittable, elementwise function. With ``eps = s_exact - s_recon``
it checks a sign agreement and a residual share ``rho = |eps| / denominator(|s_exact|)``.
Presets reproduce each published artefact (spec decision 1):

| preset | rho denominator | pass if | sign rule |
| ``accepted`` (default; the baseline runner, the paper's "covered") | max(|s|, 1e-6) | rho < 0.5 | (s_exact > 0) == (s_recon > 0) |
| ``plus_delta`` (the formula the paper text states) | |s| + 0.5 | rho < 0.5 | (s_exact > 0) == (s_recon > 0) |
| ``floor`` (the benchmark suite) | max(|s|, 0.5) | rho < 0.5 | np.sign(s_exact) == np.sign(feature_sum) |
| ``frontier`` (C4 headline frontier@0.5) | max(|s|, 0.5) | rho <= 0.5 | (s_exact > 0) == (s_recon > 0) |

``explain`` = decompose + gate: an *explained* result carries the per-feature explanation; a
*withheld* one keeps the scores, eps, rho and the failing reason and no features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._arrays import as_float_array
from ._pytree import pytree_dataclass
from .decompose import build_query_weights, decompose_query
from .errors import ConfigError, ShapeError

REASONS = ("ok", "sign_flip", "residual_share", "tiny_margin")
REASON_TEXT = {
    "ok": "the sparse reconstruction preserves the score",
    "sign_flip": "the sparse reconstruction has the wrong sign",
    "residual_share": "the residual is too large a share of the score",
    "tiny_margin": "the exact score is too small to explain",
}


@dataclasses.dataclass(frozen=True)
class GateRule:
    """A gate's parameters. ``rho_form``: "unfloored" max(|s|, eps) | "floor" max(|s|, delta)
    | "plus" |s| + delta. ``sign_mode``: "gt0" ((x > 0) == (y > 0)) | "npsign" (np.sign
    equality, 0 its own sign). ``sign_against``: "recon" (s_recon) | "feature_sum"."""

    rho_form: str = "unfloored"
    delta: float = 0.5
    eps: float = 1e-6
    max_rho: float = 0.5
    strict: bool = True
    sign_mode: str = "gt0"
    sign_against: str = "recon"
    min_abs_exact: float | None = None

    def __post_init__(self) -> None:
        if self.rho_form not in ("unfloored", "floor", "plus"):
            raise ConfigError(f"rho_form must be 'unfloored', 'floor' or 'plus', got {self.rho_form!r}")
        if self.sign_mode not in ("gt0", "npsign"):
            raise ConfigError(f"sign_mode must be 'gt0' or 'npsign', got {self.sign_mode!r}")
        if self.sign_against not in ("recon", "feature_sum"):
            raise ConfigError(f"sign_against must be 'recon' or 'feature_sum', got {self.sign_against!r}")


PRESETS: dict[str, GateRule] = {
    "accepted": GateRule(rho_form="unfloored", eps=1e-6, strict=True, sign_mode="gt0"),
    "plus_delta": GateRule(rho_form="plus", delta=0.5, strict=True, sign_mode="gt0"),
    "floor": GateRule(rho_form="floor", delta=0.5, strict=True, sign_mode="npsign", sign_against="feature_sum"),
    "frontier": GateRule(rho_form="floor", delta=0.5, strict=False, sign_mode="gt0"),
}


def gate_rule(preset: str | GateRule = "accepted", **overrides: Any) -> GateRule:
    """A preset by name (or a rule), with field overrides."""
    if isinstance(preset, GateRule):
        rule = preset
    elif preset in PRESETS:
        rule = PRESETS[preset]
    else:
        raise ConfigError(f"unknown gate preset {preset!r} (expected one of: {', '.join(PRESETS)})")
    known = {f.name for f in dataclasses.fields(GateRule)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown gate rule field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(rule, **overrides) if overrides else rule


@pytree_dataclass
class GateResult:
    """Elementwise gate verdicts: ``passed`` bool, ``rho`` float, ``sign_match`` bool,
    ``reason`` int code into :data:`REASONS` (0 ok, 1 sign_flip, 2 residual_share,
    3 tiny_margin; the first failing check in that order: tiny margin, sign, share)."""

    passed: jax.Array
    rho: jax.Array
    sign_match: jax.Array
    reason: jax.Array

    def reason_names(self) -> Any:
        """Reason codes as strings (a str for a scalar result, else a NumPy array of str)."""
        codes = np.asarray(self.reason)
        names = np.asarray(REASONS, dtype=object)[codes]
        return str(names) if codes.ndim == 0 else names

    def counts(self) -> dict[str, int]:
        """How many verdicts end with each reason (``{"ok": n_passed, "sign_flip": ...}``)."""
        codes = np.asarray(self.reason).reshape(-1)
        return {name: int(np.sum(codes == i)) for i, name in enumerate(REASONS) if np.any(codes == i)}

    def __repr__(self) -> str:
        try:
            codes = np.asarray(self.reason)
        except Exception:  # noqa: BLE001 - traced
            return f"GateResult(shape={tuple(self.reason.shape)})"
        if codes.ndim == 0:
            return (
                f"GateResult(passed={bool(np.asarray(self.passed))}, rho={float(np.asarray(self.rho)):.4g}, "
                f"sign_match={bool(np.asarray(self.sign_match))}, reason={self.reason_names()!r})"
            )
        counts = ", ".join(f"{name} {n}" for name, n in self.counts().items())
        return f"GateResult(shape={codes.shape}, passed={int(np.sum(np.asarray(self.passed)))}/{codes.size}; {counts})"


def fidelity_gate(
    s_exact: Any,
    s_recon: Any,
    feature_sum: Any = None,
    *,
    preset: str | GateRule = "accepted",
    **overrides: Any,
) -> GateResult:
    """Gate scores elementwise (scalars or arrays of any matching shape; jit/vmap-safe).

    ``s_exact`` the exact score, ``s_recon`` the sparse reconstruction (base included when
    the query has one), ``feature_sum`` only for rules that compare signs against it.
    """
    rule = gate_rule(preset, **overrides)
    s = jnp.asarray(s_exact, jnp.float32)
    r = jnp.asarray(s_recon, jnp.float32)
    if s.shape != r.shape:
        raise ShapeError(f"s_exact has shape {s.shape} but s_recon has {r.shape}")
    err = jnp.abs(s - r)
    mag = jnp.abs(s)
    if rule.rho_form == "unfloored":
        rho = err / jnp.maximum(mag, rule.eps)
    elif rule.rho_form == "floor":
        rho = err / jnp.maximum(mag, rule.delta)
    else:
        rho = err / (mag + rule.delta)
    if rule.sign_against == "feature_sum":
        if feature_sum is None:
            raise ConfigError("this gate rule compares signs against feature_sum: pass feature_sum=")
        other = jnp.asarray(feature_sum, jnp.float32)
        if other.shape != s.shape:
            raise ShapeError(f"s_exact has shape {s.shape} but feature_sum has {other.shape}")
    else:
        other = r
    if rule.sign_mode == "gt0":
        sign_match = (s > 0) == (other > 0)
    else:
        sign_match = jnp.sign(s) == jnp.sign(other)
    share_ok = rho < rule.max_rho if rule.strict else rho <= rule.max_rho
    tiny = (mag < rule.min_abs_exact) if rule.min_abs_exact is not None else jnp.zeros_like(sign_match)
    reason = jnp.where(tiny, 3, jnp.where(~sign_match, 1, jnp.where(~share_ok, 2, 0))).astype(jnp.int32)
    return GateResult(passed=reason == 0, rho=rho, sign_match=sign_match, reason=reason)


@dataclasses.dataclass(frozen=True, repr=False)
class Explanation:
    """The result of :func:`explain`.

    Always: ``explained`` (bool), ``reason`` ("ok" or why it was withheld; ``reason_text`` in
    words), ``scores`` (exact, approx, base, feature_sum, residual, rho, sign_match,
    identity_abs_error, n_active_features), ``query``
    (kind, weights, mean_subtract and metadata), ``gate`` (the rule used). ``features``: the
    per-feature rows sorted by |contribution| descending (top ``top_features``) when
    explained, None when withheld.
    """

    explained: bool
    reason: str
    scores: dict[str, float]
    query: dict[str, Any]
    gate: dict[str, Any]
    features: list[dict[str, Any]] | None
    labels: dict[int, dict[str, Any]] | None = None

    @property
    def withheld(self) -> bool:
        return not self.explained

    @property
    def reason_text(self) -> str:
        """The verdict in words, with the numbers behind it."""
        s = self.scores
        if self.reason == "sign_flip":
            return f"{REASON_TEXT['sign_flip']} (exact {s['exact']:+.4g}, sparse {s['approx']:+.4g})"
        if self.reason == "residual_share":
            limit = self.gate.get("max_rho", 0.5)
            return f"{REASON_TEXT['residual_share']} (rho {s['rho']:.3g}, the gate needs {'<' if self.gate.get('strict', True) else '<='} {limit:g})"
        if self.reason == "tiny_margin":
            return f"{REASON_TEXT['tiny_margin']} (|exact| {abs(s['exact']):.3g} < {self.gate.get('min_abs_exact')})"
        return f"{REASON_TEXT['ok']} (rho {s['rho']:.3g})"

    def __repr__(self) -> str:
        s = self.scores
        head = (
            f"Explanation({'explained' if self.explained else 'withheld'}: {self.query.get('query_kind')}, "
            f"exact {s['exact']:.4g} = base {s['base']:.4g} + features {s['feature_sum']:.4g} + residual {s['residual']:.4g}"
        )
        if self.explained:
            top = ", ".join(f"#{f['feature_id']} {f['contribution']:+.3g}" for f in (self.features or [])[:3])
            return head + f"; top: {top})"
        return head + f"; {self.reason})"

    def view(self, **kwargs: Any) -> Any:
        """The :class:`srp_jax.views.ExplanationView` of this explanation (keywords go to
        :func:`srp_jax.views.explanation_view`: ``labels``, ``token_text``, ``title``,
        ``context``)."""
        from .views import explanation_view

        return explanation_view(self, **kwargs)

    def _repr_html_(self) -> str:
        from .views import render_html

        return render_html(self.view())


def explain(
    h: Any,
    model: Any,
    *,
    W_U: Any,
    query_kind: str = "selected_token",
    target: Any = None,
    target_a: Any = None,
    target_b: Any = None,
    target_family: Sequence[Any] = (),
    contrast_family: Sequence[Any] = (),
    top_competitors: int = 10,
    competitor_rank: int = 5,
    tokenizer: Any = None,
    logits: Any = None,
    row_mean: Any = None,
    k: int | None = None,
    preset: str | GateRule = "accepted",
    top_features: int | None = None,
    labels: int = 0,
    **gate_overrides: Any,
) -> Explanation:
    """Decompose one query (any kind of :func:`srp_jax.decompose.build_query_weights`) for
    hidden state ``h`` (d,) and gate it; see :class:`Explanation`.

    ``logits`` (V,) default to h . W_U (float32); the winner kinds rank them. ``labels`` > 0
    labels each shown feature of an explained query with its ``labels`` most activating
    vocabulary rows (:func:`srp_jax.labels.feature_labels`, as tokens when ``tokenizer`` is
    given).
    """
    rule = gate_rule(preset, **gate_overrides)
    if logits is None and query_kind in ("winner_vs_topk", "winner_vs_rank"):
        logits = jnp.matmul(
            as_float_array(W_U, name="W_U", ndim=2), as_float_array(h, name="h", ndim=1),
            precision=jax.lax.Precision.HIGHEST,
        )
    weights, mean_subtract, meta = build_query_weights(
        query_kind, target=target, target_a=target_a, target_b=target_b, target_family=target_family,
        contrast_family=contrast_family, logits=logits, top_competitors=top_competitors,
        competitor_rank=competitor_rank, tokenizer=tokenizer,
    )
    q = decompose_query(h, weights, model, W_U=W_U, row_mean=row_mean, mean_subtract=mean_subtract, logits=logits, k=k)
    verdict = fidelity_gate(q.exact_score, q.approx_score, q.sparse_feature_sum, preset=rule)
    scores = {
        "exact": float(q.exact_score),
        "approx": float(q.approx_score),
        "base": float(q.base_term),
        "feature_sum": float(q.sparse_feature_sum),
        "residual": float(q.residual),
        "rho": float(verdict.rho),
        "sign_match": bool(verdict.sign_match),
        "identity_abs_error": float(q.identity_abs_error),
        "n_active_features": q.n_active_features,
        "feature_abs_sum": float(jnp.sum(jnp.abs(q.contributions))),
    }
    query = {"weights": {int(t): float(w) for t, w in weights.items()}, "mean_subtract": mean_subtract, **meta}
    if tokenizer is not None:  # how the query's tokens read (the views' titles)
        from .tokens import clean_token

        query["token_text"] = {int(t): clean_token(tokenizer, t) for t in weights}
    passed = bool(verdict.passed)
    features = None
    if passed:
        rows = sorted(q.feature_rows(), key=lambda row: -row["abs_contribution"])
        features = rows if top_features is None else rows[: int(top_features)]
    records = None
    if features and labels:
        from .labels import feature_labels
        from .readout import Readout

        if row_mean is None:
            readout = Readout.for_dictionary(W_U, model, rows="all")
        else:
            readout = Readout.from_weights(W_U, row_mean=row_mean)
        ids = [row["feature_id"] for row in features]
        records = {r["feature_id"]: r for r in feature_labels(model, readout, ids, n=int(labels), tokenizer=tokenizer)}
    return Explanation(passed, verdict.reason_names(), scores, query, dataclasses.asdict(rule), features, records)


__all__ = ["GateRule", "GateResult", "PRESETS", "REASONS", "REASON_TEXT", "gate_rule", "fidelity_gate", "Explanation", "explain"]
