"""Feature labels: each feature's most activating readout rows, against a NumPy brute force."""

from __future__ import annotations

import numpy as np

from srp_jax import Readout
from srp_jax.labels import top_rows_by_activation


def test_top_rows_match_brute_force_across_blocks_and_ties():
    from srp_jax.config import FactorizerConfig
    from srp_jax.dictionary import Dictionary

    rng = np.random.default_rng(0)
    V, d, D = 50, 6, 9
    W = rng.standard_normal((V, d)).astype(np.float32)
    W[7] = W[3]  # an exact tie between rows 3 and 7: the lower row must come first
    readout = Readout.from_weights(W, row_token_ids=np.arange(V)[::-1])  # positions != token ids
    kernel = rng.standard_normal((d, D)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(D)).astype(np.float32)
    dic = Dictionary(config=FactorizerConfig(architecture="topk", d_features=D, k=3),
                     params={"encoder": {"kernel": kernel, "bias": bias}, "decoder": np.eye(D, d, dtype=np.float32)},
                     buffers={}, d_model=d)
    X = np.asarray(readout.rows_normalized, np.float64)
    acts = np.maximum(X @ kernel + bias, 0.0)
    for block in (7, 64):  # several blocks (with padding) and one
        ids, vals = top_rows_by_activation(dic, readout, [0, 4, 8], n=4, block=block)
        for row, f in enumerate([0, 4, 8]):
            order = np.argsort(-acts[:, f], kind="stable")[:4]
            np.testing.assert_array_equal(ids[row], np.arange(V)[::-1][order])
            np.testing.assert_allclose(vals[row], acts[order, f], rtol=1e-5, atol=1e-6)
    all_ids, _ = top_rows_by_activation(dic, readout, n=2)
    assert all_ids.shape == (D, 2)
    f_tie = int(np.argmax(acts[3]))
    got, _ = top_rows_by_activation(dic, readout, [f_tie], n=V)
    pos = [V - 1 - t for t in got[0]]  # back to positions
    assert pos.index(3) < pos.index(7)


def _brute_labels(acts_col, token_ids, texts, show, n):
    """The reference's walk: rows by activation (ties: lower row), skip what is not worth
    showing and repeats, only rows where the feature is on."""
    out_ids, out_text = [], []
    for r in np.argsort(-acts_col, kind="stable"):
        if not acts_col[r] > 0:
            break
        if not show[r] or texts[r] in out_text:
            continue
        out_ids.append(int(token_ids[r]))
        out_text.append(texts[r])
        if len(out_ids) == n:
            break
    return out_ids, out_text


def test_feature_labels_through_a_tokenizer_match_the_reference_walk():
    from _explain_helpers import ToyTokenizer, toy_setup, toy_words
    from srp_jax.labels import feature_labels, readable_label
    from srp_jax.tokens import clean_token, is_display_token

    sae, W, _, tok = toy_setup()
    W = np.concatenate([W, W[:3] + 0.01])  # rows beyond the tokenizer (<extra:N>) never label
    readout = Readout.from_weights(W)
    X = np.asarray(readout.rows_normalized, np.float64)
    acts = np.maximum(X @ np.asarray(sae.params["encoder"]["kernel"], np.float64) + np.asarray(sae.params["encoder"]["bias"]), 0)
    texts = [clean_token(tok, t) for t in range(W.shape[0])]
    show = np.array([t < len(tok) and is_display_token(x) for t, x in enumerate(texts)])
    # a repeat, lone punctuation (skipped), and what cleaning makes of " " / "\ufffd" (shown, as the reference does)
    assert texts[6] == texts[7] == " the" and not show[1] and (texts[2], texts[4]) == ("<space>", "<empty>") and show[2]
    records = feature_labels(sae, readout, n=4, tokenizer=tok, candidates=W.shape[0])
    assert [r["feature_id"] for r in records] == list(range(sae.d_features))
    for f, r in enumerate(records):
        ids, text = _brute_labels(acts[:, f], np.arange(W.shape[0]), texts, show, 4)
        assert (r["top_token_ids"], r["top_token_labels"]) == (ids, text), f
        assert r["label"] == readable_label(text)
        np.testing.assert_allclose(r["top_activations"], acts[ids, f], rtol=1e-5)
    # the default candidate pool (4n) gives the same labels here
    assert feature_labels(sae, readout, [0, 5, 7], n=4, tokenizer=tok) == [records[0], records[5], records[7]]
    # without a tokenizer: the plain top rows as tok_<id>
    plain = feature_labels(sae, readout, [3], n=3)[0]
    assert plain["top_token_ids"] == [int(r) for r in np.argsort(-acts[:, 3], kind="stable")[:3] if acts[r, 3] > 0]
    assert plain["top_token_labels"] == [f"tok_{t}" for t in plain["top_token_ids"]]
    assert readable_label(["a", " b  c", "d", "e"]) == "a/ b c/d" and readable_label([]) == ""
    assert readable_label(["x" * 30, "y" * 30]) == "x" * 30 + "/yyyy..."  # the reference: the first 35 characters + "..."
    assert isinstance(ToyTokenizer(toy_words()).decode([6]), str)


def test_top_rows_in_feature_chunks_and_with_a_row_mask():
    from srp_jax.config import FactorizerConfig
    from srp_jax.dictionary import Dictionary

    rng = np.random.default_rng(3)
    V, d, D = 70, 5, 300
    readout = Readout.from_weights(rng.standard_normal((V, d)).astype(np.float32))
    dic = Dictionary(config=FactorizerConfig(architecture="topk", d_features=D, k=3),
                     params={"encoder": {"kernel": rng.standard_normal((d, D)).astype(np.float32),
                                         "bias": np.zeros(D, np.float32)},
                             "decoder": rng.standard_normal((D, d)).astype(np.float32)}, buffers={}, d_model=d)  # fmt: skip
    whole = top_rows_by_activation(dic, readout, n=4)
    chunked = top_rows_by_activation(dic, readout, n=4, feature_chunk=128, block=16)  # 3 padded chunks of 128
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-6)
    mask = np.zeros(V, bool)
    mask[[4, 9, 11]] = True
    ids, vals = top_rows_by_activation(dic, readout, [0, 1], n=5, row_mask=mask)
    assert set(ids[0][:3]) == {4, 9, 11} and list(ids[0][3:]) == [-1, -1] and np.all(np.isinf(vals[:, 3:]))


def test_display_table_and_fast_tokenizer(tmp_path):
    tokenizers = __import__("pytest").importorskip("tokenizers")
    from srp_jax.tokens import FastTokenizer, clean_token, display_table, load_tokenizer

    vocab = {"<unk>": 0, "hello": 1, "world": 2, ".": 3, "Paris": 4}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    fast = load_tokenizer(tmp_path)
    assert isinstance(fast, FastTokenizer) and len(fast) == 5
    assert fast.encode("Paris", add_special_tokens=False) == [4] and fast.decode([4]) == "Paris"
    texts, show = display_table(fast, [4, 3, 1, 9])
    assert texts == [clean_token(fast, 4), clean_token(fast, 3), "hello", "<extra:9>"] == ["Paris", ".", "hello", "<extra:9>"]
    assert show.tolist() == [True, False, True, False]
