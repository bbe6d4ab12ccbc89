"""Views of an explanation: one view model, built from an :class:`~srp_jax.gate.Explanation`,
and the renderers that consume it (text table, JSON, a self-contained HTML page with a
waterfall chart, a PNG of the same chart, a batch page with a table of verdicts).

Every number a renderer shows is a field of the view, and every field of the view is the
Explanation's own number (no renderer recomputes anything), so the table, the JSON, the HTML
and the PNG agree with the Python API by construction.

The waterfall runs from 0 through the base ``h . mu``, each shown feature's signed
contribution and the remaining features together, to the sparse approximation, then through
the residual to the exact score. A withheld explanation has no feature bars: one grey bar holds
the features' total, and the verdict says why the gate withheld it.

This module is pure Python (no JAX, no NumPy): it can render in a notebook or a CLI without
touching an accelerator. The PNG needs matplotlib (the ``views`` extra).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ._atomic import atomic_file, write_text_atomic
from .errors import DependencyError

VIEW_FORMAT = "srp-jax explanation view"
VIEW_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The view model


@dataclasses.dataclass(frozen=True, repr=False)
class ExplanationView:
    """What every renderer shows of one explanation (plain Python data, JSON-ready).

    ``title`` the query in words (``logit(' Paris')``); ``explained``, ``reason``,
    ``reason_text``, ``gate`` (the rule), ``scores`` (the Explanation's: exact, base,
    feature_sum, approx, residual, rho, ...); ``features`` (None when withheld) one dict per
    shown feature: ``feature_id``, ``label``, ``top_tokens``, ``top_token_ids``,
    ``top_activations``, ``z`` (the query's coefficient beta_i), ``h_dot_d`` (h . d_i),
    ``contribution`` (z * h.d) and ``share`` (|contribution| / the sum of |contribution| over
    all active features); ``other`` the features not shown (count, contribution);
    ``steps`` the waterfall; ``context`` what the caller adds (prompt, next-token table, ...).
    """

    title: str
    query_kind: str
    explained: bool
    reason: str
    reason_text: str
    gate: dict[str, Any]
    scores: dict[str, Any]
    features: list[dict[str, Any]] | None
    other: dict[str, Any] | None
    steps: list[dict[str, Any]]
    query: dict[str, Any]
    context: dict[str, Any]

    @property
    def withheld(self) -> bool:
        return not self.explained

    def to_dict(self) -> dict[str, Any]:
        """The view as JSON-ready data (non-finite floats become None)."""
        out = {"format": VIEW_FORMAT, "format_version": VIEW_FORMAT_VERSION}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return _jsonable(out)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def text(self) -> str:
        return render_text(self)

    def __repr__(self) -> str:
        return render_text(self)

    def _repr_html_(self) -> str:
        return render_html(self)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _token_name(token_id: int, token_text: Mapping[int, str] | None) -> str:
    if token_text and int(token_id) in token_text:
        return repr(token_text[int(token_id)])
    return f"#{int(token_id)}"


def query_title(query: Mapping[str, Any], token_text: Mapping[int, str] | None = None) -> str:
    """The query in words, e.g. ``logit(' Paris') - logit(' London')``."""
    kind = query.get("query_kind", "query")
    name = lambda t: _token_name(t, token_text)  # noqa: E731
    target = query.get("target_token_id")
    others = list(query.get("contrast_token_ids") or [])
    if kind == "selected_token":
        return f"logit({name(target)})"
    if kind == "target_vs_vocab_mean":
        return f"logit({name(target)}) - h.mu (the mean row)"
    if kind == "pairwise_margin":
        return f"logit({name(target)}) - logit({name(others[0])})" if others else f"logit({name(target)})"
    if kind == "token_family_margin":
        a = ", ".join(name(t) for t in query.get("target_token_ids") or [])
        b = ", ".join(name(t) for t in others)
        return f"mean logit{{{a}}} - mean logit{{{b}}}"
    if kind == "winner_vs_topk":
        return f"logit({name(target)}) - softmax-weighted logit of the next {len(others)}"
    if kind == "winner_vs_rank":
        rank = query.get("competitor_rank")
        return f"logit({name(target)}) - logit({name(others[0])}, rank {rank})" if others else f"logit({name(target)})"
    return str(kind)


def explanation_view(
    explanation: Any,
    *,
    labels: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]] | None = None,
    token_text: Mapping[int, str] | None = None,
    title: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> ExplanationView:
    """The view of an Explanation (the one place a view is built).

    ``labels``: feature label records (:func:`srp_jax.labels.feature_labels`; a list or a
    mapping by feature id); default the Explanation's own ``labels``. ``token_text`` {token
    id: display text} names the query's tokens in the title (default: the Explanation's own,
    when ``explain`` had a tokenizer). ``context`` is carried as is.
    """
    if labels is None:
        labels = getattr(explanation, "labels", None)
    if labels is not None and not isinstance(labels, Mapping):
        labels = {int(r["feature_id"]): r for r in labels}
    scores = dict(explanation.scores)
    steps: list[dict[str, Any]] = []

    def step(kind: str, name: str, value: float, start: float, **extra: Any) -> float:
        end = start + value
        steps.append({"kind": kind, "name": name, "value": value, "start": start, "end": end, **extra})
        return end

    base, feature_sum, approx = scores["base"], scores["feature_sum"], scores["approx"]
    level = step("base", "base h·μ", base, 0.0)
    features = other = None
    n_active = int(scores.get("n_active_features", 0))
    if explanation.explained:
        rows = list(explanation.features or [])
        abs_total = scores.get("feature_abs_sum")
        if abs_total is None:
            abs_total = sum(abs(r["contribution"]) for r in rows)
        features = []
        for r in rows:
            fid = int(r["feature_id"])
            lab = (labels or {}).get(fid) or {}
            feat = {
                "feature_id": fid,
                "label": str(lab.get("label", "")),
                "top_tokens": list(lab.get("top_token_labels", [])),
                "top_token_ids": list(lab.get("top_token_ids", [])),
                "top_activations": list(lab.get("top_activations", [])),
                "z": r["query_feature_coeff"],
                "h_dot_d": r["feature_hidden_score"],
                "contribution": r["contribution"],
                "share": abs(r["contribution"]) / abs_total if abs_total else 0.0,
            }
            features.append(feat)
            name = f"f{fid} {feat['label']}".strip()
            level = step("feature", name, feat["contribution"], level, feature_id=fid)
        shown = sum(f["contribution"] for f in features)
        other = {"count": max(0, n_active - len(features)), "contribution": feature_sum - shown}
        if other["count"]:
            level = step("other", f"{other['count']} other features", other["contribution"], level)
    else:
        step("features_withheld", f"{n_active} features (explanation withheld)", feature_sum, level)
    step("subtotal", "sparse approximation", approx, 0.0)
    step("residual", "residual", scores["residual"], approx)
    step("total", "exact score", scores["exact"], 0.0)
    query = dict(explanation.query)
    names = {**(query.get("token_text") or {}), **(token_text or {})}
    return ExplanationView(
        title=title or query_title(query, names),
        query_kind=str(query.get("query_kind")),
        explained=bool(explanation.explained),
        reason=str(explanation.reason),
        reason_text=str(explanation.reason_text),
        gate=dict(explanation.gate),
        scores=scores,
        features=features,
        other=other,
        steps=steps,
        query=query,
        context=dict(context or {}),
    )


# --------------------------------------------------------------------------------------------
# Text


def _verdict_word(view: ExplanationView) -> str:
    return "explained" if view.explained else "WITHHELD"


def render_text(view: ExplanationView) -> str:
    """The table a terminal shows: the identity, the verdict, the feature rows (or why there
    are none)."""
    s, ctx = view.scores, view.context
    head = view.title
    if "target_rank" in ctx and "target_prob" in ctx:
        head += f"   (rank {ctx['target_rank']}, p {ctx['target_prob']:.3f})"
    preset = f" [{ctx['preset']}]" if ctx.get("preset") else ""
    lines = [
        head,
        f"  exact {s['exact']:.4f} = base {s['base']:.4f} + features {s['feature_sum']:.4f} + residual {s['residual']:.4f}"
        f"   (identity error {s['identity_abs_error']:.1e})",
        f"  sparse approximation {s['approx']:.4f}, rho {s['rho']:.3f}: {_verdict_word(view)}{preset} - {view.reason_text}",
    ]
    if not view.explained:
        lines.append("  no feature explanation: the fidelity gate withholds it (the scores above stay exact)")
        return "\n".join(lines)
    feats = view.features or []
    width = max([28, *(len(f["label"]) for f in feats)])
    lines.append("")
    lines.append(f"  {'feature':>7}  {'label':<{width}}  {'z':>9}  {'h.d':>9}  {'contribution':>12}  {'share':>6}")
    for f in feats:
        lines.append(
            f"  {f['feature_id']:>7}  {f['label']:<{width}}  {f['z']:>9.4f}  {f['h_dot_d']:>9.4f}  "
            f"{f['contribution']:>+12.4f}  {100 * f['share']:>5.1f}%"
        )
    if view.other and view.other["count"]:
        name = f"({view.other['count']} more features)"
        lines.append(f"  {'':>7}  {name:<{width}}  {'':>9}  {'':>9}  {view.other['contribution']:>+12.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The chart (SVG, shared by the HTML page and the notebook display)

COLORS = {
    "base": "#8d99ae",
    "feature+": "#2b83ba",
    "feature-": "#d7191c",
    "other+": "#abd9e9",
    "other-": "#fdae61",
    "features_withheld": "#c8c8c8",
    "subtotal": "#5e6b7d",
    "residual": "#f4a259",
    "total": "#1f2d3d",
}
ROW_H, BAR_H, LABEL_W, VALUE_W, WIDTH, TOP = 26, 17, 300, 86, 900, 34


def _color(st: Mapping[str, Any]) -> str:
    kind = st["kind"]
    if kind in ("feature", "other"):
        return COLORS[kind + ("+" if st["value"] >= 0 else "-")]
    return COLORS[kind]


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * span:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(x: float) -> str:
    return f"{x:+.4f}"


def _tip(view: ExplanationView, st: Mapping[str, Any]) -> str:
    """Hover text of a step: for a feature its top tokens and numbers."""
    if st["kind"] == "feature":
        f = next(f for f in view.features or [] if f["feature_id"] == st["feature_id"])
        tokens = ", ".join(
            f"{t!r} ({a:.3g})" for t, a in zip(f["top_tokens"], f["top_activations"])
        ) or "(no labels: pass labels= or a tokenizer)"
        return (f"feature {f['feature_id']}\ntop tokens: {tokens}\n"
                f"z {f['z']:.4g} x h.d {f['h_dot_d']:.4g} = {_fmt(f['contribution'])} ({100 * f['share']:.1f}% of |features|)")  # fmt: skip
    if st["kind"] == "features_withheld":
        return f"all features together: {_fmt(st['value'])}\nper-feature bars withheld: {view.reason_text}"
    return f"{st['name']}: {_fmt(st['value'])}"


def render_svg(view: ExplanationView) -> str:
    """The waterfall as an inline SVG (no scripts, no external resources). Each step is a
    ``<g class="srp-step">`` with ``data-kind``, ``data-value``, ``data-start`` and
    ``data-end`` (the view's numbers, exactly) and a ``<title>`` hover text."""
    steps = view.steps
    points = [0.0] + [v for st in steps for v in (st["start"], st["end"])]
    lo, hi = min(points), max(points)
    pad = 0.04 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    x0, x1 = LABEL_W + 8, WIDTH - VALUE_W - 8
    sx = lambda v: x0 + (v - lo) / (hi - lo) * (x1 - x0)  # noqa: E731
    height = TOP + ROW_H * len(steps) + 12
    out = [
        f'<svg class="srp-chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{html.escape(view.title)} waterfall">',
        '<defs><pattern id="srp-hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        '<rect width="6" height="6" fill="#e4e4e4"/><line x1="0" y1="0" x2="0" y2="6" stroke="#9a9a9a" stroke-width="2"/></pattern></defs>',
    ]
    for t in _nice_ticks(lo, hi):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{height - 10}" stroke="#ececec"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP - 10}" font-size="10" text-anchor="middle" fill="#666">{t:g}</text>')
    zx = sx(0.0)
    out.append(f'<line x1="{zx:.1f}" y1="{TOP - 6}" x2="{zx:.1f}" y2="{height - 10}" stroke="#888" stroke-width="1"/>')
    for i, st in enumerate(steps):
        y = TOP + i * ROW_H
        a, b = sorted((st["start"], st["end"]))
        xa, xb = sx(a), sx(b)
        fill = "url(#srp-hatch)" if st["kind"] == "features_withheld" else _color(st)
        attrs = " ".join(
            f'data-{k}="{html.escape(repr(v) if isinstance(v, float) else str(v))}"'
            for k, v in (("kind", st["kind"]), ("value", st["value"]), ("start", st["start"]), ("end", st["end"]))
        )
        fid = f' data-feature="{st["feature_id"]}"' if "feature_id" in st else ""
        tip = html.escape(_tip(view, st))
        out.append(f'<g class="srp-step" {attrs}{fid} data-tip="{tip}"><title>{tip}</title>')
        out.append(f'<rect x="{LABEL_W - 292}" y="{y}" width="{WIDTH - 16}" height="{ROW_H}" fill="transparent"/>')
        out.append(
            f'<rect class="srp-bar" x="{xa:.2f}" y="{y + (ROW_H - BAR_H) / 2:.1f}" width="{max(xb - xa, 1.0):.2f}" '
            f'height="{BAR_H}" fill="{fill}" stroke="{_color(st) if st["kind"] == "features_withheld" else "none"}"/>'
        )
        bold = ' font-weight="bold"' if st["kind"] in ("total", "subtotal") else ""
        name = st["name"] if len(st["name"]) <= 44 else st["name"][:43] + "..."
        out.append(f'<text x="{LABEL_W}" y="{y + ROW_H / 2 + 4:.1f}" font-size="12" text-anchor="end"{bold}>{html.escape(name)}</text>')
        out.append(f'<text x="{WIDTH - 8}" y="{y + ROW_H / 2 + 4:.1f}" font-size="12" text-anchor="end" '
                   f'font-family="monospace"{bold}>{_fmt(st["value"])}</text>')  # fmt: skip
        out.append("</g>")
        if i + 1 < len(steps) and steps[i + 1]["kind"] not in ("subtotal", "total"):
            xe = sx(st["end"])
            out.append(f'<line x1="{xe:.1f}" y1="{y + (ROW_H + BAR_H) / 2:.1f}" x2="{xe:.1f}" '
                       f'y2="{y + ROW_H + (ROW_H - BAR_H) / 2:.1f}" stroke="#555" stroke-dasharray="2,2"/>')  # fmt: skip
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# HTML

CSS = """
.srp-view{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2d3d;max-width:920px;margin:0 0 28px 0}
.srp-view h2{font-size:18px;margin:4px 0}
.srp-view .srp-prompt{color:#555;font-size:13px;margin:2px 0 8px 0}
.srp-view .srp-next{color:#555;font-size:12px;margin:0 0 8px 0}
.srp-verdict{padding:8px 12px;border-radius:6px;margin:8px 0;font-size:14px}
.srp-verdict.srp-ok{background:#e6f4ea;border:1px solid #8cc7a0}
.srp-verdict.srp-withheld{background:#fdecea;border:1px solid #e3a29b}
.srp-identity{font-family:monospace;font-size:13px;margin:6px 0}
.srp-table{border-collapse:collapse;font-size:12.5px;margin-top:8px}
.srp-table th,.srp-table td{padding:3px 8px;border-bottom:1px solid #e8e8e8;text-align:right}
.srp-table td.srp-l,.srp-table th.srp-l{text-align:left}
.srp-step:hover .srp-bar{opacity:.75;stroke:#000}
.srp-tooltip{position:fixed;pointer-events:none;background:#1f2d3d;color:#fff;padding:6px 9px;border-radius:5px;
 font-size:12px;white-space:pre-line;max-width:420px;z-index:10;display:none}
.srp-summary td,.srp-summary th{padding:3px 10px;border-bottom:1px solid #e8e8e8;text-align:left;font-size:13px}
"""

# hover tooltips from data-tip (the SVG <title> elements already give native ones)
SCRIPT = """
(function(){
  if (window.__srpTooltips) { return; }
  window.__srpTooltips = true;
  var tip = document.createElement('div');
  tip.className = 'srp-tooltip';
  document.body.appendChild(tip);
  document.addEventListener('mouseover', function(ev){
    var el = ev.target && ev.target.closest ? ev.target.closest('.srp-step') : null;
    if (!el) { tip.style.display = 'none'; return; }
    tip.textContent = el.getAttribute('data-tip') || '';
    tip.style.display = 'block';
  });
  document.addEventListener('mousemove', function(ev){
    tip.style.left = (ev.clientX + 14) + 'px';
    tip.style.top = (ev.clientY + 14) + 'px';
  });
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _json_script(data: Any, css_class: str) -> str:
    text = json.dumps(_jsonable(data), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" class="{css_class}">{text}</script>'


def render_html(view: ExplanationView, *, anchor: str | None = None, script: bool = True) -> str:
    """One explanation as an HTML fragment (verdict, identity, chart, feature table, and the
    view's JSON in a ``<script type="application/json" class="srp-data">``), for a page or
    a notebook cell."""
    s, ctx = view.scores, view.context
    ok = view.explained
    ident = f' id="{_e(anchor)}"' if anchor else ""
    parts = [f'<div class="srp-view"{ident}>', f"<style>{CSS}</style>"]
    parts.append(f"<h2>{_e(view.title)}</h2>")
    if ctx.get("prompt") is not None:
        parts.append(f'<div class="srp-prompt">prompt: <code>{_e(ctx["prompt"])}</code></div>')
    if ctx.get("top5"):
        nxt = ", ".join(f"<code>{_e(repr(t['token']))}</code> {t['prob']:.3f}" for t in ctx["top5"])
        parts.append(f'<div class="srp-next">next token: {nxt}</div>')
    preset = f" (gate: {_e(ctx['preset'])})" if ctx.get("preset") else ""
    word = "Explained" if ok else "Withheld"
    extra = "" if ok else " &mdash; no feature explanation is shown."
    parts.append(f'<div class="srp-verdict {"srp-ok" if ok else "srp-withheld"}"><b>{word}</b>{preset}: '
                 f"{_e(view.reason_text)}{extra}</div>")  # fmt: skip
    parts.append(
        f'<div class="srp-identity">exact {s["exact"]:.4f} = base {s["base"]:.4f} + features {s["feature_sum"]:.4f} '
        f'+ residual {s["residual"]:.4f} &nbsp; (sparse approximation {s["approx"]:.4f}, &rho; {s["rho"]:.3f}, '
        f'identity error {s["identity_abs_error"]:.1e})</div>'
    )
    parts.append(render_svg(view))
    if ok and view.features:
        rows = "".join(
            f'<tr class="srp-feature" data-feature="{f["feature_id"]}"><td>{f["feature_id"]}</td>'
            f'<td class="srp-l">{_e(f["label"])}</td><td class="srp-l">{_e(", ".join(repr(t) for t in f["top_tokens"]))}</td>'
            f'<td>{f["z"]:.4f}</td><td>{f["h_dot_d"]:.4f}</td><td>{f["contribution"]:+.4f}</td><td>{100 * f["share"]:.1f}%</td></tr>'
            for f in view.features
        )
        if view.other and view.other["count"]:
            rows += (f'<tr><td></td><td class="srp-l">({view.other["count"]} more features)</td><td></td><td></td><td></td>'
                     f'<td>{view.other["contribution"]:+.4f}</td><td></td></tr>')  # fmt: skip
        parts.append(
            '<table class="srp-table"><tr><th>feature</th><th class="srp-l">label</th><th class="srp-l">top tokens</th>'
            "<th>z</th><th>h&middot;d</th><th>contribution</th><th>share</th></tr>" + rows + "</table>"
        )
    parts.append(_json_script(view.to_dict(), "srp-data"))
    if script:
        parts.append(f"<script>{SCRIPT}</script>")
    parts.append("</div>")
    return "".join(parts)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>body{{margin:24px;background:#fff}}{CSS}</style></head><body>{body}<script>{SCRIPT}</script></body></html>\n"
    )


def html_page(view: ExplanationView) -> str:
    """A whole self-contained page for one explanation (inline CSS, SVG and script; nothing
    is fetched when it is viewed)."""
    return _page(f"srp-jax: {view.title}", render_html(view, script=False))


def verdict_summary(views: Sequence[ExplanationView]) -> dict[str, Any]:
    """How often the gate explained and withheld, and why: ``{"n", "explained",
    "withheld", "reasons": {reason: count}}``."""
    reasons: dict[str, int] = {}
    for v in views:
        reasons[v.reason] = reasons.get(v.reason, 0) + 1
    explained = sum(1 for v in views if v.explained)
    return {"n": len(views), "explained": explained, "withheld": len(views) - explained, "reasons": reasons}


def batch_page(views: Sequence[ExplanationView], *, title: str = "srp-jax explanations") -> str:
    """Many explanations on one page: the verdict summary, a table with one row per query
    (prompt, query, exact, approximation, rho, verdict and reason; linked to its chart),
    then every explanation."""
    summary = verdict_summary(views)
    n = max(summary["n"], 1)
    reason_rows = "".join(
        f"<tr><td>{_e(r)}</td><td>{c}</td><td>{100 * c / n:.1f}%</td></tr>" for r, c in sorted(summary["reasons"].items())
    )
    rows = []
    for i, v in enumerate(views):
        s = v.scores
        word = "explained" if v.explained else "withheld"
        rows.append(
            f'<tr class="srp-row srp-{word}"><td><a href="#q{i}">{i + 1}</a></td><td>{_e(v.context.get("prompt", ""))}</td>'
            f"<td>{_e(v.title)}</td><td>{s['exact']:.4f}</td><td>{s['approx']:.4f}</td><td>{s['rho']:.3f}</td>"
            f"<td>{word}</td><td>{_e(v.reason)}</td></tr>"
        )
    body = [
        f"<h1 style='font-family:system-ui,sans-serif'>{_e(title)}</h1>",
        f'<div class="srp-view"><p>{summary["n"]} queries: <b>{summary["explained"]}</b> explained, '
        f'<b>{summary["withheld"]}</b> withheld ({100 * summary["withheld"] / n:.1f}%).</p>',
        '<table class="srp-summary"><tr><th>verdict reason</th><th>count</th><th>share</th></tr>' + reason_rows + "</table>",
        '<table class="srp-summary srp-verdicts" style="margin-top:12px"><tr><th>#</th><th>prompt</th><th>query</th>'
        "<th>exact</th><th>approx</th><th>&rho;</th><th>verdict</th><th>reason</th></tr>" + "".join(rows) + "</table></div>",
        _json_script({"summary": summary}, "srp-summary-data"),
    ]
    body += [render_html(v, anchor=f"q{i}", script=False) for i, v in enumerate(views)]
    return _page(title, "".join(body))


def write_html(path: str | os.PathLike, views: ExplanationView | Sequence[ExplanationView], *, title: str | None = None) -> None:
    """Write one explanation's page, or a batch page for several, atomically."""
    if isinstance(views, ExplanationView):
        write_text_atomic(path, html_page(views))
    else:
        write_text_atomic(path, batch_page(list(views), title=title or "srp-jax explanations"))


# --------------------------------------------------------------------------------------------
# PNG (matplotlib, the `views` extra)


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise DependencyError("--png needs matplotlib: pip install 'srp-jax[views]'") from None
    matplotlib.use("Agg", force=True)  # headless: never opens a window
    import matplotlib.pyplot as plt

    return plt


def waterfall_figure(view: ExplanationView):
    """The waterfall as a matplotlib Figure (Agg backend): one horizontal bar per step,
    spanning [start, end], in the view's order top to bottom."""
    plt = _require_matplotlib()
    steps = view.steps
    n = len(steps)
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.36 * n), dpi=100)
    ys = list(range(n))[::-1]
    for y, st in zip(ys, steps):
        a, b = sorted((st["start"], st["end"]))
        withheld = st["kind"] == "features_withheld"
        ax.barh(y, b - a, left=a, height=0.64, color="#e4e4e4" if withheld else _color(st),
                hatch="///" if withheld else None, edgecolor="#9a9a9a" if withheld else "none", gid=st["kind"])  # fmt: skip
        ax.text(1.01, y, _fmt(st["value"]), transform=ax.get_yaxis_transform(), va="center", ha="left",
                family="monospace", fontsize=9, fontweight="bold" if st["kind"] in ("total", "subtotal") else "normal")  # fmt: skip
    for i in range(n - 1):
        if steps[i + 1]["kind"] in ("subtotal", "total"):
            continue
        x = steps[i]["end"]
        ax.plot([x, x], [ys[i] - 0.32, ys[i + 1] + 0.32], color="#555", lw=0.8, ls=":")
    ax.axvline(0.0, color="#888", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([st["name"] if len(st["name"]) <= 44 else st["name"][:43] + "..." for st in steps], fontsize=9)
    ax.set_xlabel("contribution to the score (logit units)")
    ax.grid(axis="x", color="#ececec")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    word = "Explained" if view.explained else "WITHHELD (no feature explanation)"
    ax.set_title(f"{view.title}\n{word}: {view.reason_text}", fontsize=10, loc="left",
                 color="#1f5f2f" if view.explained else "#a31515")  # fmt: skip
    fig.tight_layout()
    return fig


def write_png(path: str | os.PathLike, view: ExplanationView, *, dpi: int = 150) -> None:
    """The waterfall as a PNG image, written atomically."""
    plt = _require_matplotlib()
    fig = waterfall_figure(view)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)


__all__ = [
    "ExplanationView",
    "explanation_view",
    "query_title",
    "render_text",
    "render_svg",
    "render_html",
    "html_page",
    "batch_page",
    "verdict_summary",
    "write_html",
    "waterfall_figure",
    "write_png",
]
