"""Re-check a dictionary's published numbers on a model's payload.

``verify(dictionary, payload)`` runs :func:`srp_jax.metrics.evaluate` (one place for every
metric) and adds what the paper's headline evaluation reports around it (``method.md`` §5.2):

* ``mode="full"`` (default; the headline protocol): the whole vocabulary, float64
  log-softmax, the payload's softcap (its manifest's ``post_readout_transform``, Gemma 30),
  top-1, KL bits (mean and p90), frontier_pass@0.5, and 95 % bootstrap CIs: 400 resamples
  (``numpy.random.default_rng(0)``, percentiles 2.5 / 97.5) of whole prompts (a prompt's
  positions move together, the reference's cluster bootstrap over base cases) for the
  per-position metrics, and of vocabulary rows for rowEV;
* ``mode="reference"``: the reference ``evaluate_model`` on the dictionary's own rows and
  ``evaluation`` block, which re-derives a checkpoint's stored ``metrics``.

Against published numbers (a registry entry, the checkpoint's stored metrics, or a metrics
JSON file) each metric gets a verdict: ``match`` when |measured - published| <= its tolerance
(rowEV 0.02, top-1 0.02, KL 0.05 bits, rates 0.02) or the published value lies inside the
measured CI, ``differs`` otherwise, ``n/a`` when nothing was published.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, ShapeError

PAD_NORM_EPS = 1e-6
BOOTSTRAP_RESAMPLES = 400
BOOTSTRAP_SEED = 0

# (metric key, display name, default tolerance); the order of the printed table
COMPARED = (
    ("row_centered_ev", "rowEV", 0.02),
    ("val_top1_match", "top1", 0.02),
    ("val_logit_kl_bits_mean", "KL", 0.05),
    ("frontier_pass_at_0.5", "frontier@0.5", 0.02),
    ("dead_feature_rate", "dead", 0.02),
    ("rare_feature_rate", "rare", 0.02),
)
PUBLISHED_ALIASES = {
    "rowEV": "row_centered_ev",
    "top1": "val_top1_match",
    "KL": "val_logit_kl_bits_mean",
    "dead": "dead_feature_rate",
    "rare": "rare_feature_rate",
    "frontier@0.5": "frontier_pass_at_0.5",
}
_DISPLAY = {key: name for key, name, _ in COMPARED}


def canonical_published(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Published metrics under the evaluate names (``rowEV`` -> ``row_centered_ev``, ...);
    when both spellings appear the evaluate name wins. Non-numbers are dropped."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = PUBLISHED_ALIASES.get(key, key)
        if name in out and key in PUBLISHED_ALIASES:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def parse_tolerances(items: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """Default tolerances updated by ``NAME=VALUE`` items (``rowEV=0.01``, ``KL=0.1``, ...)."""
    tol = {key: t for key, _, t in COMPARED}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--tol expects NAME=VALUE (e.g. rowEV=0.01), got {item!r}")
        name, value = item.split("=", 1)
        key = PUBLISHED_ALIASES.get(name.strip(), name.strip())
        if key not in tol:
            raise ConfigError(f"--tol: unknown metric {name!r} (known: {', '.join(n for _, n, _ in COMPARED)})")
        try:
            tol[key] = float(value)
        except ValueError:
            raise ConfigError(f"--tol {name}: {value!r} is not a number") from None
    return tol


def hidden_positions(h_LN: np.ndarray, positions: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """``(H (N, d), prompt id (N,))`` from a payload's hidden states.

    ``h_LN`` (n_prompts, T, d): ``all`` keeps every non-padding position (norm > 1e-6),
    ``last`` the last non-padding position of each prompt (the headline's one per prompt).
    A 2-D (N, d) payload is N independent positions (its own prompt each).
    """
    h = np.asarray(h_LN, np.float32)
    if positions not in ("all", "last"):
        raise ConfigError(f"positions must be 'all' or 'last', got {positions!r}")
    if h.ndim == 2:
        keep = np.linalg.norm(h, axis=1) > PAD_NORM_EPS
        return h[keep], np.flatnonzero(keep)
    if h.ndim != 3:
        raise ShapeError(f"h_LN must be (n_prompts, T, d) or (N, d), got shape {h.shape}")
    valid = np.linalg.norm(h, axis=2) > PAD_NORM_EPS  # (P, T)
    if positions == "last":
        has = valid.any(axis=1)
        last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
        prompts = np.flatnonzero(has)
        return h[prompts, last[prompts]], prompts
    prompts, steps = np.nonzero(valid)
    return h[prompts, steps], prompts


def cluster_bootstrap(
    values: np.ndarray, clusters: np.ndarray, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """95 % percentile CI of the mean of ``values`` (N,) resampling whole clusters with
    replacement (``n`` times, ``default_rng(seed)``); each resample's mean weighs positions
    equally. NaN when there are no values."""
    v = np.asarray(values, np.float64)
    if v.size == 0 or n <= 0:
        return float("nan"), float("nan")
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.bincount(inverse, weights=v, minlength=ids.size)
    counts = np.bincount(inverse, minlength=ids.size).astype(np.float64)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, ids.size, size=(int(n), ids.size))
    means = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def row_ev_bootstrap(
    res_sq: np.ndarray, x_sq: np.ndarray, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """95 % CI of rowEV = 1 - sum res^2 / max(sum x^2, 1e-12) over resampled vocabulary rows."""
    r = np.asarray(res_sq, np.float64)
    x = np.asarray(x_sq, np.float64)
    if r.size == 0 or n <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, r.size, size=(int(n), r.size))
    evs = 1.0 - r[draw].sum(axis=1) / np.maximum(x[draw].sum(axis=1), 1e-12)
    lo, hi = np.percentile(evs, [2.5, 97.5])
    return float(lo), float(hi)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def compare(
    measured: Mapping[str, Any],
    published: Mapping[str, float],
    ci: Mapping[str, tuple[float, float]],
    tolerances: Mapping[str, float],
) -> list[dict[str, Any]]:
    """One row per compared metric: published, measured, CI, diff, tolerance, verdict."""
    rows = []
    for key, name, _ in COMPARED:
        got = measured.get(key)
        want = published.get(key)
        lo, hi = ci.get(key, (None, None))
        row = {"metric": key, "name": name, "published": want, "measured": got, "ci_lo": lo, "ci_hi": hi,
               "tolerance": tolerances.get(key)}  # fmt: skip
        if want is None or not _finite(got):
            row.update(diff=None, verdict="n/a")
        else:
            diff = float(got) - float(want)
            inside = _finite(lo) and _finite(hi) and lo <= want <= hi
            ok = abs(diff) <= float(tolerances.get(key, 0.0)) + 1e-12 or inside
            row.update(diff=diff, verdict="match" if ok else "differs")
        rows.append(row)
    return rows


def verify(
    dictionary: Any,
    payload: Mapping[str, Any],
    *,
    mode: str = "full",
    softcap: float | None = None,
    positions: str = "all",
    max_hidden: int | None = None,
    k: int | None = None,
    bootstrap: int = BOOTSTRAP_RESAMPLES,
    published: Mapping[str, Any] | None = None,
    tolerances: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Evaluate ``dictionary`` on ``payload`` (``{"W_U", "h_LN", "token_mask"?}``, e.g.
    :func:`srp_jax.data.read_payload`) and compare with ``published``; returns the report.

    ``softcap`` (full mode) defaults to None; the CLI passes the payload manifest's.
    ``max_hidden`` caps the positions (the first ones, in prompt order); ``k`` the audit k.
    """
    from . import metrics as M
    from .readout import Readout

    if mode not in ("full", "reference"):
        raise ConfigError(f"mode must be 'full' or 'reference', got {mode!r}")
    W = payload["W_U"]
    H, prompt_ids = hidden_positions(payload["h_LN"], positions)
    if max_hidden is not None:
        H, prompt_ids = H[: int(max_hidden)], prompt_ids[: int(max_hidden)]
    if H.shape[0] == 0:
        raise ShapeError("the payload has no non-padding hidden states")
    block = dict(getattr(dictionary, "evaluation", None) or {})
    if k is not None:
        block["k"] = int(k)
    if mode == "full":
        readout = Readout.for_dictionary(W, dictionary, token_mask=payload.get("token_mask"), softcap=softcap, rows="all")
        block["max_eval_hidden"] = int(H.shape[0])
        metrics, items = M.evaluate(dictionary, readout, H, evaluation=block, mode="full", per_item=True)
    else:
        if softcap is not None:
            raise ConfigError("a softcap applies only to mode='full' (the reference evaluator has none)")
        readout = Readout.for_dictionary(W, dictionary, token_mask=payload.get("token_mask"), rows="trained")
        if max_hidden is not None:
            block["max_eval_hidden"] = int(max_hidden)
        metrics, items = M.evaluate(dictionary, readout, H, evaluation=block, mode="reference", per_item=True)
    metrics = M.metrics_to_jsonable(metrics)
    n_used = int(metrics["eval_hidden"])
    used_prompts = prompt_ids[:n_used]
    ci: dict[str, tuple[float, float]] = {}
    if bootstrap > 0:
        ci["row_centered_ev"] = row_ev_bootstrap(items["row_res_sq"], items["row_x_sq"], bootstrap)
        ci["val_top1_match"] = cluster_bootstrap(items["top1_match"], used_prompts, bootstrap)
        ci["val_logit_kl_bits_mean"] = cluster_bootstrap(items["kl_bits"], used_prompts, bootstrap)
        if "frontier_pass" in items:
            ci["frontier_pass_at_0.5"] = cluster_bootstrap(items["frontier_pass"], used_prompts, bootstrap)
    want = canonical_published(published)
    tol = dict(tolerances) if tolerances is not None else parse_tolerances()
    rows = compare(metrics, want, ci, tol)
    verdicts = [r["verdict"] for r in rows if r["verdict"] != "n/a"]
    return {
        "mode": mode,
        "softcap": softcap if mode == "full" else None,
        "positions": positions,
        "n_positions": n_used,
        "n_prompts": int(np.unique(used_prompts).size),
        "vocab_rows": int(metrics["eval_rows"]),
        "k": int(metrics["k"]),
        "bootstrap": {"resamples": int(bootstrap), "seed": BOOTSTRAP_SEED, "unit": "prompt (rowEV: vocabulary row)"},
        "metrics": metrics,
        "ci95": {key: list(v) for key, v in ci.items()},
        "published": want or None,
        "comparison": rows,
        "verdict": ("match" if all(v == "match" for v in verdicts) else "differs") if verdicts else "n/a",
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The side-by-side table the CLI prints."""

    def num(value: Any, digits: int = 4) -> str:
        return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"

    head = ("metric", "published", "measured", "95% CI", "diff", "tol", "verdict")
    lines = []
    for row in report["comparison"]:
        if row["measured"] is None and row["published"] is None:
            continue
        ci = "-" if row["ci_lo"] is None else f"[{num(row['ci_lo'])}, {num(row['ci_hi'])}]"
        diff = "-" if row["diff"] is None else f"{row['diff']:+.4f}"
        lines.append((row["name"], num(row["published"]), num(row["measured"]), ci, diff, num(row["tolerance"], 3), row["verdict"]))
    widths = [max(len(r[i]) for r in (head, *lines)) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in (head, *lines)]
    out.insert(1, "  ".join("-" * w for w in widths))
    cap = report.get("softcap")
    out.append(
        f"\nmode {report['mode']}: {report['n_positions']} positions from {report['n_prompts']} prompts, "
        f"{report['vocab_rows']} vocabulary rows, k {report['k']}" + (f", softcap {cap}" if cap else "")
        + f"; verdict: {report['verdict']}"
    )  # fmt: skip
    return "\n".join(out)


def write_report(report: Mapping[str, Any], path: str | os.PathLike, **context: Any) -> Path:
    """Write the report (plus ``context``: dictionary, payload, ...) as JSON, atomically."""
    from ._atomic import write_text_atomic

    doc = {**context, **report, "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(path)
    write_text_atomic(path, json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    """Strict-JSON copy: NumPy scalars unwrapped, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


__all__ = [
    "verify",
    "compare",
    "format_report",
    "write_report",
    "hidden_positions",
    "cluster_bootstrap",
    "row_ev_bootstrap",
    "parse_tolerances",
    "canonical_published",
    "COMPARED",
]
