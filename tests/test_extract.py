"""Extraction on tiny models built here (Llama tied/untied, Gemma-2 with its softcap): the
payload equals a direct transformers computation, padding is zeroed, post-readout transforms
are recorded or refused, interrupted extractions resume, and train --model reuses its cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from srp_jax.cli.main import main  # noqa: E402
from srp_jax.corpus import Corpus  # noqa: E402
from srp_jax.data import read_payload  # noqa: E402
from srp_jax.extract import ExtractionError, ExtractionSettings, HiddenStates, extract_payload  # noqa: E402
from srp_jax.sources import read_hf_readout, resolve_model  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(45)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


def _save_model(folder: Path, kind: str = "llama", tied: bool = True) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0)
        model = transformers.Gemma2ForCausalLM(cfg)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():  # logits large enough that a softcap of 3 matters
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _corpus(n: int = 10) -> Corpus:
    rng = np.random.default_rng(0)
    paragraphs = tuple(" ".join(f"w{i}" for i in rng.integers(0, 45, size=rng.integers(3, 14))) for _ in range(n))
    return Corpus("test", "test", "0" * 64, paragraphs)


SETTINGS = ExtractionSettings(n_prompts=10, max_len=12, batch_size=4, check_prompts=3, min_chars=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("m") / "llama")


def _direct(folder: Path, prompts: list[str], max_len: int):
    """The reference recipe written out here: final hidden states with padding zeroed."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok(prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_len)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    h = (out.hidden_states[-1] * enc["attention_mask"][..., None]).numpy()
    return model.lm_head.weight.detach().numpy(), h, enc["attention_mask"].numpy()


def test_payload_equals_a_direct_transformers_extraction(llama, tmp_path):
    logs = []
    out = extract_payload(resolve_model(str(llama)), _corpus(), tmp_path / "p", SETTINGS, log=logs.append)
    payload = read_payload(out)
    W, h, mask = _direct(llama, list(_corpus().paragraphs), SETTINGS.max_len)
    assert np.array_equal(payload["W_U"], W)
    assert payload["h_LN"].shape == (10, 12, 16)
    np.testing.assert_allclose(payload["h_LN"], h, rtol=0, atol=1e-6)
    assert np.all(payload["h_LN"][mask == 0] == 0) and (mask == 0).any()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["post_readout_transform"] is None and manifest["adapter_gate_structural_rel"] < 1e-4
    assert manifest["n_nonpad_positions"] == int(mask.sum()) and manifest["tie_word_embeddings"] is True
    assert manifest["W_U_source_check"] == {"checked": True, "equal": True, "max_abs_diff": 0.0,
                                            "tensor": "model.embed_tokens.weight", "tied": True}
    assert manifest["corpus_sha256"] == "0" * 64 and manifest["n_prompts"] == 10
    assert not (tmp_path / ".p.partial").exists() and "wrote" in logs[-1]
    with pytest.raises(Exception, match="already exists"):
        extract_payload(resolve_model(str(llama)), _corpus(), tmp_path / "p", SETTINGS)


def test_file_payloads_npz_and_safetensors(llama, tmp_path):
    folder = extract_payload(resolve_model(str(llama)), _corpus(), tmp_path / "p", SETTINGS, log=lambda m: None)
    ref = read_payload(folder)
    for name in ("p.npz", "p.safetensors"):
        out = extract_payload(resolve_model(str(llama)), _corpus(), tmp_path / name, SETTINGS, log=lambda m: None)
        got = read_payload(out)
        assert np.array_equal(got["W_U"], ref["W_U"]) and np.array_equal(got["h_LN"], ref["h_LN"])
        assert (tmp_path / "p_manifest.json").is_file()


def test_interrupted_extraction_resumes_to_the_same_payload(llama, tmp_path, monkeypatch):
    spec = resolve_model(str(llama))
    reference = read_payload(extract_payload(spec, _corpus(), tmp_path / "ref", SETTINGS, log=lambda m: None))
    calls = {"n": 0}
    original = HiddenStates.__call__

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # adapter check, batch 1, then die in batch 2
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(HiddenStates, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract_payload(spec, _corpus(), tmp_path / "p", SETTINGS, log=lambda m: None)
    state = json.loads((tmp_path / ".p.partial" / "state.json").read_text())
    assert state["done"] == 4 and not (tmp_path / "p").exists()
    monkeypatch.setattr(HiddenStates, "__call__", original)
    logs = []
    got = read_payload(extract_payload(spec, _corpus(), tmp_path / "p", SETTINGS, log=logs.append))
    assert any("resuming at prompt 4/10" in m for m in logs)
    assert np.array_equal(got["h_LN"], reference["h_LN"]) and np.array_equal(got["W_U"], reference["W_U"])
    # other settings do not resume a stale work folder
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(HiddenStates, "__call__", flaky)
        calls["n"] = 0
        extract_payload(spec, _corpus(), tmp_path / "q", SETTINGS, log=lambda m: None)
    monkeypatch.setattr(HiddenStates, "__call__", original)
    logs = []
    other = ExtractionSettings(**{**SETTINGS.to_dict(), "max_len": 10})
    got = read_payload(extract_payload(spec, _corpus(), tmp_path / "q", other, log=logs.append))
    assert got["h_LN"].shape == (10, 10, 16) and any("starting afresh" in m for m in logs)


def test_gemma_softcap_is_recorded_not_failed(tmp_path):
    folder = _save_model(tmp_path / "gemma", kind="gemma2", tied=False)
    out = extract_payload(resolve_model(str(folder)), _corpus(), tmp_path / "p", SETTINGS, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["post_readout_transform"] == {"type": "tanh_softcap", "cap": 3.0}
    assert manifest["adapter_gate_structural_rel"] > 1e-3 and manifest["post_readout_transform_rel"] < 1e-4
    src = read_hf_readout(str(folder))
    assert src.softcap == 3.0 and src.tensor == "lm_head.weight" and src.tied is False
    assert np.array_equal(read_payload(out)["W_U"], src.W_U)
    from srp_jax.sources import load_readout

    assert load_readout(out).softcap == 3.0  # the payload source reads it back from the manifest


def test_unknown_post_readout_transform_fails_and_writes_nothing(llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out

    model.forward = scaled
    with pytest.raises(ExtractionError, match="structural check failed"):
        extract_payload(resolve_model(str(llama)), _corpus(), tmp_path / "p", SETTINGS, loaded=(model, tok))
    assert list(tmp_path.iterdir()) == []


def test_cli_extract_and_train_from_a_model_reuses_the_cache(llama, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": p}) for p in _corpus().paragraphs) + "\n")
    base = ["--model", str(llama), "--corpus", str(corpus), "--n-prompts", "10", "--max-len", "12", "--min-chars", "0"]
    assert main(["extract", *base, "--out", str(tmp_path / "p"), "--token-mask"]) == 0
    payload = read_payload(tmp_path / "p")
    assert payload["token_mask"].tolist() == [True, False, False] + [True] * 45  # eos and unk are special ids
    train = ["train", *base, "--config", "smoke", "--payload-cache", str(tmp_path / "cache"),
             "--set", "training.steps=3", "--set", "data.max_hidden=32", "--set", "data.val_hidden=16",
             "--set", "factorizer.d_features=32", "--set", "factorizer.k=4", "--set", "factorizer.k_values=[2,4]",
             "--set", "evaluation.k=4"]  # fmt: skip
    assert main([*train, "--out-dir", str(tmp_path / "run1")]) == 0
    err = capsys.readouterr().err
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and "reusing" not in err
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert metrics["data_source"] == str(cached[0]) and metrics["used_fallback_data"] is False
    assert main([*train, "--out-dir", str(tmp_path / "run2")]) == 0
    assert "reusing cached payload" in capsys.readouterr().err
    assert main(["train", "--model", str(llama), "--data-path", "x"]) == 2


def test_progress_bar_draws_on_a_tty_and_is_silent_otherwise():
    import io

    from srp_jax.extract import Progress

    class TTY(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = TTY(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(10, stream=stream)
        for done in (0, 5, 10):
            bar.update(done)
        bar.close()
    assert pipe.getvalue() == ""
    lines = tty.getvalue().split("\r")
    assert "[extract] 10/10 prompts [" + "#" * 24 + "]" in lines[-1] and tty.getvalue().endswith("\n")
