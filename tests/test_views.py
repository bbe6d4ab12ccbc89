"""Views of an explanation: the table, the JSON, the HTML chart and the PNG show the Python
API's numbers; a withheld explanation shows no feature bars anywhere; the batch page counts
verdicts; the page opens in headless Chromium without console errors (skipped without one)."""

from __future__ import annotations

import html
import json
import re
import shutil

import numpy as np
import pytest

from _explain_helpers import explained_and_withheld, toy_setup
from srp_jax.decompose import build_query_weights, decompose_query
from srp_jax.gate import explain
from srp_jax.labels import feature_labels
from srp_jax.readout import Readout
from srp_jax.views import batch_page, explanation_view, html_page, render_text, verdict_summary, waterfall_figure, write_png


@pytest.fixture(scope="module")
def toy():
    sae, W, H, tok = toy_setup()
    (i_ok, t_ok), (i_no, t_no) = explained_and_withheld(sae, W, H)
    ok = explain(H[i_ok], sae, W_U=W, target=t_ok, top_features=3, labels=4, tokenizer=tok)
    no = explain(H[i_no], sae, W_U=W, target=t_no, top_features=3, labels=4, tokenizer=tok)
    assert ok.explained and no.withheld
    return sae, W, H, tok, (i_ok, t_ok, ok), (i_no, t_no, no)


def _steps_chain(view):
    steps = view.steps
    kinds = [s["kind"] for s in steps]
    assert kinds[0] == "base" and kinds[-3:] == ["subtotal", "residual", "total"]
    level = 0.0
    for s in steps:
        if s["kind"] in ("subtotal", "total"):
            level = 0.0
        assert s["start"] == pytest.approx(level, abs=1e-5) and s["end"] == s["start"] + s["value"]
        level = s["end"]
    return kinds


def test_view_numbers_are_the_explanations(toy):
    sae, W, H, tok, (i, t, e), _ = toy
    view = explanation_view(e)  # the labels attached by explain(labels=4)
    assert view.scores == e.scores and view.explained and view.reason == "ok"
    # the view's feature rows are the Explanation's, number for number
    assert [f["feature_id"] for f in view.features] == [r["feature_id"] for r in e.features]
    for f, r in zip(view.features, e.features):
        assert (f["z"], f["h_dot_d"], f["contribution"]) == (r["query_feature_coeff"], r["feature_hidden_score"], r["contribution"])
    # share = |c| / sum |c| over every active feature (an independent decomposition)
    full = decompose_query(H[i], build_query_weights("selected_token", target=t)[0], sae, W_U=W)
    abs_total = float(np.abs(np.asarray(full.contributions, np.float64)).sum())
    for f in view.features:
        assert f["share"] == pytest.approx(abs(f["contribution"]) / abs_total, rel=1e-5)
    # waterfall: base, the shown features, the others, the approximation, the residual, the exact score
    kinds = _steps_chain(view)
    assert kinds.count("feature") == len(e.features) == 3
    by_kind = {s["kind"]: s for s in view.steps}
    assert by_kind["base"]["value"] == e.scores["base"] and by_kind["residual"]["value"] == e.scores["residual"]
    assert by_kind["subtotal"]["value"] == e.scores["approx"] and by_kind["total"]["value"] == e.scores["exact"]
    shown = sum(f["contribution"] for f in view.features)
    assert by_kind["other"]["value"] == pytest.approx(e.scores["feature_sum"] - shown, abs=1e-6)
    assert by_kind["other"]["end"] == pytest.approx(e.scores["approx"], abs=1e-5)
    # labels: the encoder-activation labels of those features, shown through the tokenizer
    readout = Readout.for_dictionary(W, sae, rows="all")
    expect = feature_labels(sae, readout, [f["feature_id"] for f in view.features], n=4, tokenizer=tok)
    assert [(f["label"], f["top_tokens"]) for f in view.features] == [(r["label"], r["top_token_labels"]) for r in expect]


def test_table_json_html_and_png_show_the_same_numbers(toy, tmp_path):
    *_, (i, t, e), _ = toy
    view = explanation_view(e, token_text={t: " tok"}, context={"prompt": "a prompt", "preset": "accepted"})
    # JSON: exactly the API's floats
    data = json.loads(view.to_json())
    assert data["scores"] == json.loads(json.dumps(e.scores))
    assert [f["contribution"] for f in data["features"]] == [r["contribution"] for r in e.features]
    assert data["title"] == "logit(' tok')" and data["context"]["prompt"] == "a prompt"
    # the table: the same numbers at the printed precision
    text = render_text(view)
    m = re.search(r"exact (\S+) = base (\S+) \+ features (\S+) \+ residual (\S+)", text)
    assert [float(g) for g in m.groups()] == pytest.approx(
        [e.scores[k] for k in ("exact", "base", "feature_sum", "residual")], abs=5e-5)  # fmt: skip
    for r in e.features:
        row = next(line for line in text.splitlines() if line.strip().startswith(str(r["feature_id"]) + " "))
        nums = [float(x.rstrip("%")) for x in row.split()[-4:]]
        assert nums[:3] == pytest.approx([r["query_feature_coeff"], r["feature_hidden_score"], r["contribution"]], abs=5e-5)
        assert nums[3] == pytest.approx(100 * abs(r["contribution"]) / e.scores["feature_abs_sum"], abs=0.05)
    # the HTML chart: every bar carries the view's exact numbers; the embedded JSON is the view's
    page = html_page(view)
    bars = re.findall(r'<g class="srp-step" data-kind="(\w+)" data-value="([^"]+)" data-start="([^"]+)" data-end="([^"]+)"', page)
    assert [(k, float(v), float(a), float(b)) for k, v, a, b in bars] == [
        (s["kind"], s["value"], s["start"], s["end"]) for s in view.steps]  # fmt: skip
    embedded = re.search(r'<script type="application/json" class="srp-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded) == view.to_dict()
    for r in e.features:
        assert f'{r["contribution"]:+.4f}' in page
    # the PNG: one bar per step spanning exactly [start, end]
    fig = waterfall_figure(view)
    rects = [p for p in fig.axes[0].patches]
    spans = np.array([(p.get_x(), p.get_x() + p.get_width()) for p in rects])
    np.testing.assert_allclose(spans, [sorted((s["start"], s["end"])) for s in view.steps], rtol=0, atol=1e-9)
    write_png(tmp_path / "e.png", view)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_is_self_contained(toy):
    *_, (i, t, e), (_, _, no) = toy
    for view in (explanation_view(e), explanation_view(no)):
        page = html_page(view)
        assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script>" in page
        # nothing is fetched at view time: no external URLs (the SVG namespace is an identifier)
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'<>)]*", page)) - {"http://www.w3.org/2000/svg"}
        assert not urls, urls
        assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import", page)


def test_withheld_shows_no_feature_bars(toy, tmp_path):
    *_, (i, t, e), (_, _, no) = toy
    assert no.features is None
    view = explanation_view(no, context={"preset": "accepted"})
    assert view.features is None and view.withheld
    kinds = _steps_chain(view)
    assert "feature" not in kinds and "other" not in kinds and kinds.count("features_withheld") == 1
    text = render_text(view)
    assert "WITHHELD" in text and no.reason_text in text and "no feature explanation" in text
    assert "contribution" not in text and "feature  label" not in text  # no feature table
    page = html_page(view)
    assert 'srp-verdict srp-withheld' in page and "Withheld" in page and html.escape(no.reason_text) in page
    assert 'data-kind="feature"' not in page and 'class="srp-table"' not in page
    fig = waterfall_figure(view)
    assert len(fig.axes[0].patches) == len(view.steps)
    assert "WITHHELD" in fig.axes[0].get_title(loc="left")
    write_png(tmp_path / "no.png", view)
    # the notebook display of the Explanation is the same chart
    assert "srp-withheld" in no._repr_html_() and 'data-kind="feature"' not in no._repr_html_()
    assert "<svg" in e._repr_html_() and 'data-kind="feature"' in e._repr_html_()


def test_batch_page_counts_verdicts(toy):
    sae, W, H, tok, *_ = toy
    views = [explanation_view(explain(h, sae, W_U=W, target=int(np.argmax(W @ h)), top_features=3), context={"prompt": f"p{j}"})
             for j, h in enumerate(H)]  # fmt: skip
    summary = verdict_summary(views)
    assert summary["n"] == len(H) and summary["explained"] + summary["withheld"] == len(H)
    assert summary["reasons"] == {r: sum(v.reason == r for v in views) for r in {v.reason for v in views}}
    page = batch_page(views)
    assert page.count('<tr class="srp-row') == len(H) and page.count('class="srp-view" id="q') == len(H)
    assert page.count("srp-row srp-withheld") == summary["withheld"]
    assert f"<b>{summary['withheld']}</b> withheld" in page


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_page_in_headless_chromium(toy, tmp_path):
    """The page renders in a real browser: no console errors or failed loads, one chart bar per
    step, the hover tooltip shows a feature's top tokens, and a screenshot is not blank."""
    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no headless Chromium installed (apt-get install chromium)")
    *_, (i, t, e), (_, _, no) = toy
    pages = {"ok": explanation_view(e), "no": explanation_view(no)}
    for name, view in pages.items():
        (tmp_path / f"{name}.html").write_text(html_page(view), encoding="utf-8")
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 960, "height": 800})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto((tmp_path / "ok.html").as_uri())
        assert page.locator("svg.srp-chart .srp-step").count() == len(pages["ok"].steps)
        page.hover("svg.srp-chart .srp-step[data-kind=feature] >> nth=0")
        tip = page.locator(".srp-tooltip").inner_text()
        first = pages["ok"].features[0]
        assert f"feature {first['feature_id']}" in tip and all(tok in tip for tok in first["top_tokens"][:2])
        shot = page.screenshot(full_page=True)
        page.goto((tmp_path / "no.html").as_uri())
        assert page.locator(".srp-verdict.srp-withheld").inner_text().startswith("Withheld")
        assert page.locator("svg.srp-chart .srp-step[data-kind=feature]").count() == 0
        browser.close()
    assert not problems, problems
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000  # a chart, not an empty page


def test_png_without_matplotlib_names_the_views_extra(toy, tmp_path, monkeypatch):
    import sys

    from srp_jax.errors import DependencyError

    *_, (i, t, e), _ = toy
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DependencyError, match=r"srp-jax\[views\]"):
        write_png(tmp_path / "x.png", explanation_view(e))
    assert not (tmp_path / "x.png").exists()
