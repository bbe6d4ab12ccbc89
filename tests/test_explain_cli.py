"""``srp-jax explain`` and ``srp-jax features`` on a payload (no model run): the JSON, the table
and the chart carry the Python API's numbers for every query kind, a withheld explanation
shows no features, batch mode counts verdicts, labels come from the encoder activations
through the tokenizer, and bad input is one line and exit 2. (The SmolLM2 run of the same
commands is in test_real_models.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from _explain_helpers import explained_and_withheld, toy_setup, toy_words
from srp_jax.cli.main import main
from srp_jax.gate import explain
from srp_jax.labels import feature_labels
from srp_jax.readout import Readout

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A dictionary on disk, a payload (3 prompts x 5 tokens, padded), a tokenizer.json."""
    from srp_jax.checkpoint import save_dictionary
    from srp_jax.tokens import FastTokenizer

    root = tmp_path_factory.mktemp("explain")
    sae, W, H, _ = toy_setup()
    save_dictionary(sae, root / "dict")
    h_ln = np.zeros((3, 5, W.shape[1]), np.float32)
    h_ln[0, :4], h_ln[1, :5], h_ln[2, :2] = H[:4], H[4:9], H[9:11]  # prompts 0 and 2 end in padding
    (root / "payload").mkdir()
    np.save(root / "payload" / "W_U.npy", W)
    np.save(root / "payload" / "h_LN.npy", h_ln)
    words = [w.replace(" ", "_") or "<e>" for w in toy_words()]  # WordLevel needs distinct, non-empty words
    words = [w if words.index(w) == i else f"{w}{i}" for i, w in enumerate(words)]
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<s>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    (root / "tok").mkdir()
    tk.save(str(root / "tok" / "tokenizer.json"))
    return {"root": root, "sae": sae, "W": W, "H": H, "h_ln": h_ln, "tok": FastTokenizer(root / "tok" / "tokenizer.json")}


def _run(capsys, *argv):
    code = main(["explain", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_table_and_chart_are_the_python_api(ws, capsys, tmp_path):
    root, sae, W, h_ln, tok = ws["root"], ws["sae"], ws["W"], ws["h_ln"], ws["tok"]
    base = [root / "dict", "--payload", root / "payload", "--position", "0,-1", "--tokenizer", root / "tok"]
    code, out, err = _run(capsys, *base, "--json", "--html", tmp_path / "e.html", "--png", tmp_path / "e.png")
    assert code == 0, err
    data = json.loads(out)
    h = h_ln[0, 3]  # prompt 0, its last non-padding token
    top1 = int(np.argmax(W @ h))
    e = explain(h, sae, W_U=W, target=top1, top_features=8)
    assert data["scores"] == json.loads(json.dumps(e.scores)) and data["explained"] == e.explained
    assert data["context"]["where"] == "payload prompt 0, token 3" and data["context"]["target_rank"] == 1
    assert [t["id"] for t in data["context"]["top5"]] == np.argsort(-(W @ h), kind="stable")[:5].tolist()
    if e.explained:
        assert [(f["feature_id"], f["contribution"], f["z"], f["h_dot_d"]) for f in data["features"]] == [
            (r["feature_id"], r["contribution"], r["query_feature_coeff"], r["feature_hidden_score"]) for r in e.features]  # fmt: skip
        readout = Readout.for_dictionary(W, sae, rows="all")
        expect = feature_labels(sae, readout, [r["feature_id"] for r in e.features], n=4, tokenizer=tok)
        assert [f["top_tokens"] for f in data["features"]] == [r["top_token_labels"] for r in expect]
    else:
        assert data["features"] is None
    page = (tmp_path / "e.html").read_text()
    values = [float(v) for v in re.findall(r'<g class="srp-step" data-kind="\w+" data-value="([^"]+)"', page)]
    assert values == [s["value"] for s in data["steps"]] and values[0] == e.scores["base"] and values[-1] == e.scores["exact"]
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    # the table: the same identity at the printed precision
    code, text, _ = _run(capsys, *base)
    m = re.search(r"exact (\S+) = base (\S+) \+ features (\S+) \+ residual (\S+)", text)
    assert [float(g) for g in m.groups()] == pytest.approx([e.scores[k] for k in ("exact", "base", "feature_sum", "residual")], abs=5e-5)
    assert text.splitlines()[0] == "hidden state: payload prompt 0, token 3"


KINDS = {
    "selected_token": (["--token", "id:{a}"], {"target": "{a}"}),
    "target_vs_vocab_mean": (["--token", "id:{a}"], {"target": "{a}"}),
    "pairwise_margin": (["--token", "id:{a}", "--vs", "id:{b}"], {"target_a": "{a}", "target_b": "{b}"}),
    "token_family_margin": (["--family", "id:{a},id:{b}", "--vs-family", "id:{c}"],
                            {"target_family": ["{a}", "{b}"], "contrast_family": ["{c}"]}),
    "winner_vs_topk": (["--top-competitors", "3"], {"top_competitors": 3}),
    "winner_vs_rank": (["--competitor-rank", "4"], {"competitor_rank": 4}),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_query_kind_matches_the_api(ws, capsys, tmp_path, kind):
    root, sae, W, H = ws["root"], ws["sae"], ws["W"], ws["H"]
    h = H[5]
    np.save(tmp_path / "h.npy", h)
    a, b, c = (int(t) for t in np.argsort(-(W @ h))[[0, 3, 7]])
    fill = lambda x: [fill(v) for v in x] if isinstance(x, list) else int(x.format(a=a, b=b, c=c)) if isinstance(x, str) else x  # noqa: E731
    flags, kwargs = KINDS[kind]
    code, out, err = _run(capsys, root / "dict", "--payload", root / "payload", "--hidden", tmp_path / "h.npy",
                          "--query-kind", kind, *[f.format(a=a, b=b, c=c) for f in flags], "--json")  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    e = explain(h, sae, W_U=W, query_kind=kind, top_features=8, **{k: fill(v) for k, v in kwargs.items()})
    assert data["query_kind"] == kind and data["scores"] == json.loads(json.dumps(e.scores))
    assert {int(t): w for t, w in data["query"]["weights"].items()} == e.query["weights"]
    assert data["explained"] == e.explained and data["reason"] == e.reason


def test_a_withheld_explanation_is_visibly_withheld(ws, capsys, tmp_path):
    root, sae, W, H = ws["root"], ws["sae"], ws["W"], ws["H"]
    _, (i, t) = explained_and_withheld(sae, W, H)
    np.save(tmp_path / "h.npy", H[i])
    argv = [root / "dict", "--payload", root / "payload", "--hidden", tmp_path / "h.npy", "--token", f"id:{t}"]
    code, text, err = _run(capsys, *argv, "--html", tmp_path / "no.html", "--png", tmp_path / "no.png")
    assert code == 0, err
    e = explain(H[i], sae, W_U=W, target=t)
    assert e.withheld and f"WITHHELD [accepted] - {e.reason_text}" in text and "no feature explanation" in text
    assert not re.search(r"^\s+\d+\s+\S.*%$", text, re.M)  # no feature rows
    page = (tmp_path / "no.html").read_text()
    assert "srp-verdict srp-withheld" in page and 'data-kind="feature"' not in page and 'data-kind="features_withheld"' in page
    code, out, _ = _run(capsys, *argv, "--json")
    data = json.loads(out)
    assert data["explained"] is False and data["features"] is None and data["reason"] == e.reason


def test_batch_of_hidden_states_counts_verdicts(ws, capsys, tmp_path):
    root, sae, W, H = ws["root"], ws["sae"], ws["W"], ws["H"]
    np.save(tmp_path / "H.npy", H)
    argv = [root / "dict", "--payload", root / "payload", "--hidden", tmp_path / "H.npy", "--labels", "0"]
    code, out, err = _run(capsys, *argv, "--json", "--html", tmp_path / "batch.html")
    assert code == 0, err
    data = json.loads(out)
    verdicts = [explain(h, sae, W_U=W, target=int(np.argmax(W @ h))) for h in H]
    assert [x["explained"] for x in data["explanations"]] == [v.explained for v in verdicts]
    assert data["summary"]["withheld"] == sum(v.withheld for v in verdicts) and data["summary"]["n"] == len(H)
    page = (tmp_path / "batch.html").read_text()
    assert page.count('<tr class="srp-row') == len(H)
    code, text, _ = _run(capsys, *argv)
    assert f"{len(H)} queries: {data['summary']['explained']} explained, {data['summary']['withheld']} withheld" in text


def test_features_writes_every_label_and_explain_reuses_them(ws, capsys, tmp_path):
    root, sae, W, tok = ws["root"], ws["sae"], ws["W"], ws["tok"]
    out = tmp_path / "labels.json"
    assert main(["features", str(root / "dict"), "--payload", str(root / "payload"), "--tokenizer", str(root / "tok"),
                 "--n", "5", "--out", str(out)]) == 0  # fmt: skip
    assert "features/s" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    readout = Readout.for_dictionary(W, sae, rows="all")
    assert doc["features"] == feature_labels(sae, readout, n=5, tokenizer=tok) and doc["d_features"] == sae.d_features
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json"]  # written atomically, nothing left over
    code, text, err = _run(capsys, root / "dict", "--payload", root / "payload", "--position", "5", "--labels-file", out, "--json")
    assert code == 0, err
    data = json.loads(text)
    by_id = {r["feature_id"]: r for r in doc["features"]}
    for f in data["features"] or []:
        assert f["top_tokens"] == by_id[f["feature_id"]]["top_token_labels"]
    # without a tokenizer the labels are token ids
    assert main(["features", str(root / "dict"), "--payload", str(root / "payload"), "--out", str(tmp_path / "ids.json")]) == 0
    plain = json.loads((tmp_path / "ids.json").read_text())["features"][0]
    assert plain["top_token_labels"] == [f"tok_{t}" for t in plain["top_token_ids"]]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", "hi"], "--prompt needs --model"),
        (["--position", "1"], "--position picks a hidden state of --payload"),
        (["--payload", "P", "--position", "9,0"], "the payload has 3 prompts"),
        (["--payload", "P", "--position", "2,-3"], "prompt 2 has 2 non-padding tokens"),
        (["--payload", "P", "--position", "0,4"], "padding"),
        (["--payload", "P", "--position", "1", "--token", "W10 W12"], "did not resolve to a single token"),
        (["--payload", "P", "--position", "1", "--query-kind", "pairwise_margin"], "needs --vs"),
        (["--payload", "P", "--position", "1", "--labels-file", "P/W_U.npy"], "not a feature labels file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(ws, capsys, argv, needle):
    root = ws["root"]
    argv = [str(root / "payload") if a == "P" else a.replace("P/", f"{root / 'payload'}/") for a in argv]
    code, out, err = _run(capsys, root / "dict", *argv, "--tokenizer", root / "tok")
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_persistent_compilation_cache_fills_its_directory(tmp_path):
    code = (
        "import jax, jax.numpy as jnp\n"
        "from srp_jax.compile import enable_persistent_cache\n"
        f"assert enable_persistent_cache({str(tmp_path / 'jc')!r})\n"
        "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "SRP_JAX_COMPILATION_CACHE"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any((tmp_path / "jc").iterdir())
    env["SRP_JAX_COMPILATION_CACHE"] = "0"
    off = subprocess.run([sys.executable, "-c", "from srp_jax.compile import enable_persistent_cache as e; assert not e('x')"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert off.returncode == 0, off.stderr[-2000:]
