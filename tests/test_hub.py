"""Registry of published dictionaries and Hub loading (offline: a local Hub cache in tmp)."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
import yaml

from srp_jax import hub
from srp_jax.errors import HubError

FIXTURE_PT = Path(__file__).parent / "fixtures" / "reference"
REV = "0123456789abcdef0123456789abcdef01234567"


def test_registry_is_package_data_with_17_consistent_entries():
    text = importlib.resources.files("srp_jax.configs").joinpath("registry.yaml").read_text()
    assert len(yaml.safe_load(text)["dictionaries"]) == 17
    entries = hub.registry()
    assert len(entries) == 17 and len({e.path for e in entries}) == 17
    for e in entries:
        assert e.d_features == e.d_model * e.width, e.path
        assert e.path == f"{e.slug}/{e.operating_point}" and e.operating_point == f"k{e.k}_{e.width}x"
        assert e.hub_file == f"{e.path}/checkpoint.pt" and e.architecture == "topk"
        assert set(e.metrics) == {"rowEV", "top1", "KL", "dead", "rare"}
        assert 0 < e.metrics["rowEV"] < 1 and 0 < e.metrics["top1"] < 1
    by = {e.path: e for e in entries}
    q = by["qwen3.5-2b/k256_32x"]
    assert (q.d_model, q.d_features, q.k, q.metrics["rowEV"], q.metrics["KL"]) == (2048, 65536, 256, 0.847, 0.136)
    assert by["qwen3.5-9b/k128_8x"].metrics["top1"] == 0.846
    g = by["gemma-4-e2b/k256_32x"]
    assert g.softcap == 30.0 and g.vocab is None and g.metrics["KL"] == 6.37 and any("7.3" in n for n in g.notes)
    assert by["ministral-3-8b/k256_32x"].vocab == 131072 and by["qwen3.5-0.8b/k128_16x"].softcap is None
    assert any("KL" in n for n in by["qwen3.5-0.8b/k128_16x"].notes)


def test_find_entry_accepts_variants_and_suggests_close_matches():
    assert hub.find_entry("hub:qwen3.5-2b/k256_32x").path == "qwen3.5-2b/k256_32x"
    assert hub.find_entry("Qwen3.5-2B/k256_32x/checkpoint.pt").d_model == 2048
    with pytest.raises(HubError, match="did you mean: qwen3.5-2b/k256_32x"):
        hub.find_entry("qwen3.5-2b/k256_3x")
    with pytest.raises(HubError, match="unknown Hub dictionary"):
        hub.find_entry("llama/zzz")


def test_repo_id_setting(monkeypatch):
    monkeypatch.delenv(hub.REPO_ENV, raising=False)
    assert hub.resolve_repo_id() == "matteohe/sparse-readout-prism"
    monkeypatch.setenv(hub.REPO_ENV, "hematteo/sparse-readout-prism")
    assert hub.resolve_repo_id() == "hematteo/sparse-readout-prism"
    assert hub.resolve_repo_id("me/mine") == "me/mine"


def test_metric_names_accept_both_spellings():
    published = {"rowEV": 0.8, "top1": 0.9, "KL": 0.1, "dead": 0.0}
    assert hub.canonical_metrics(published) == {
        "row_centered_ev": 0.8, "val_top1_match": 0.9, "val_logit_kl_bits_mean": 0.1, "dead": 0.0}
    runner = {"row_centered_ev": 0.7, "val_top1_match": 0.6}
    assert hub.metric(runner, "rowEV") == 0.7 and hub.metric(published, "row_centered_ev") == 0.8
    assert hub.metric({"rowEV": 0.1, "row_centered_ev": 0.2}, "rowEV") == 0.2
    assert hub.metric(None, "KL") is None


def make_cache(root: Path, repo: str = "matteohe/sparse-readout-prism", spec: str = "qwen3.5-0.8b/k128_16x") -> Path:
    """A Hub cache laid out as huggingface_hub writes it (snapshot + refs/main)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    target = folder / "snapshots" / REV / spec / "checkpoint.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes((FIXTURE_PT / "topk" / "checkpoint.pt").read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    return target


def registry_agreeing_with_fixture(monkeypatch, spec: str = "qwen3.5-0.8b/k128_16x") -> None:
    """Make the registry entry describe the small reference fixture (topk, d 64, D 256, k 16)
    that the test Hub cache holds in place of the real (GB-sized) dictionary."""
    import dataclasses

    real = hub.registry()
    patched = tuple(
        dataclasses.replace(e, architecture="topk", d_model=64, d_features=256, k=16) if e.path == spec else e
        for e in real
    )
    monkeypatch.setattr(hub, "registry", lambda: patched)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(hub.REPO_ENV, raising=False)
    return cache


def test_fetch_uses_the_cache_offline(offline):
    target = make_cache(offline)
    got = hub.fetch_checkpoint("qwen3.5-0.8b/k128_16x")
    assert got.resolve() == target.resolve()
    assert hub.fetch_checkpoint("qwen3.5-0.8b/k128_16x", cache_dir=offline, local_files_only=True).resolve() == target.resolve()


def test_fetch_without_a_cached_copy_says_what_to_download(offline):
    with pytest.raises(HubError) as info:
        hub.fetch_checkpoint("qwen3.5-2b/k256_32x")
    msg = str(info.value)
    assert "qwen3.5-2b/k256_32x/checkpoint.pt" in msg and str(offline) in msg and "refs/main" in msg
    assert "https://huggingface.co/matteohe/sparse-readout-prism/resolve/main/" in msg
    # two lines: what failed, then the easy alternative (convert a downloaded file) before the cache layout
    what, fix = msg.split("\n")
    assert what.startswith("qwen3.5-2b/k256_32x: not in the Hub cache") and len(what) < 120
    assert fix.index("srp-jax convert checkpoint.pt --out DIR") < fix.index("refs/main")


def test_load_factorizer_hub_spec(offline, monkeypatch):
    pytest.importorskip("torch")
    from srp_jax.dictionary import load_factorizer
    from srp_jax.errors import CheckpointError

    make_cache(offline)
    # the cached file is not the published 0.8b dictionary: the registry check names the fields
    with pytest.raises(CheckpointError, match=r"not the published qwen3.5-0.8b/k128_16x: d_model 64 \(registry: 1024\)"):
        load_factorizer("hub:qwen3.5-0.8b/k128_16x")
    registry_agreeing_with_fixture(monkeypatch)
    make_cache(offline, repo="hematteo/sparse-readout-prism")
    monkeypatch.setenv(hub.REPO_ENV, "matteohe/none")
    with pytest.raises(HubError):
        load_factorizer("hub:qwen3.5-0.8b/k128_16x")  # that repo has no cached copy
    monkeypatch.setenv(hub.REPO_ENV, "hematteo/sparse-readout-prism")
    d = load_factorizer("hub:qwen3.5-0.8b/k128_16x")
    assert d.architecture == "topk" and d.k == 16 and d.d_model == 64


def test_cli_hub_list_and_fetch(offline, tmp_path, capsys, monkeypatch):
    from srp_jax.dictionary import load_dictionary
    from srp_jax.cli.main import main

    assert main(["hub", "list"]) == 0
    out = capsys.readouterr().out
    assert "qwen3.5-2b/k256_32x" in out and "0.847" in out and "d_features" in out and "hematteo" in out
    assert len([ln for ln in out.splitlines() if "/k" in ln and "x " in ln + " "]) >= 17
    assert main(["hub", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 17 and rows[0]["metrics"]["rowEV"] == 0.76
    pytest.importorskip("torch")
    make_cache(offline)
    out_dir = tmp_path / "dict"
    # a cached file that disagrees with the registry is refused, nothing written; --no-verify accepts it
    for argv in (["hub", "fetch", "qwen3.5-0.8b/k128_16x", "--out", str(out_dir)],
                 ["convert", "hub:qwen3.5-0.8b/k128_16x", str(out_dir)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "not the published qwen3.5-0.8b/k128_16x" in err and "d_features 256 (registry: 16384)" in err
        assert len(err.strip().splitlines()) == 1 and not out_dir.exists()
    assert main(["hub", "fetch", "qwen3.5-0.8b/k128_16x", "--out", str(tmp_path / "nv"), "--no-verify"]) == 0
    assert load_dictionary(tmp_path / "nv").d_model == 64
    registry_agreeing_with_fixture(monkeypatch)
    assert main(["hub", "fetch", "qwen3.5-0.8b/k128_16x", "--out", str(out_dir)]) == 0
    assert load_dictionary(out_dir).k == 16
    capsys.readouterr()
    assert main(["hub", "fetch", "qwen3.5-0.8b/k128_16x", "--out", str(out_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["hub", "fetch", "qwen3.5-2b/k256_32x", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    # one line (issue 9's rule) saying what is missing and how to fix it; nothing written
    assert len(err.strip().splitlines()) == 1 and "checkpoint.pt" in err and "offline" in err and not (tmp_path / "x").exists()
    assert main(["convert", "hub:qwen3.5-0.8b/k128_16x", str(tmp_path / "conv")]) == 0
    assert load_dictionary(tmp_path / "conv").d_features == 256


def test_unresolvable_endpoint_fails_fast_without_retries(monkeypatch, tmp_path):
    """No network (the endpoint's host does not resolve, no proxy): the cache is used, or a
    one-line error comes at once instead of huggingface_hub's ~25 s of retries."""
    import time

    from huggingface_hub import constants

    for name in hub._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(hub.REPO_ENV, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://srp-jax-test.invalid")
    assert "srp-jax-test.invalid does not resolve" in hub.endpoint_unreachable()
    cache = tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(HubError, match=r"no network \(srp-jax-test\.invalid does not resolve") as info:
        hub.fetch_checkpoint("qwen3.5-2b/k256_32x", cache_dir=cache)
    assert time.monotonic() - start < 10 and str(info.value).count("\n") == 1 and str(cache) in str(info.value)
    target = make_cache(cache)
    assert hub.fetch_checkpoint("qwen3.5-0.8b/k128_16x", cache_dir=cache).resolve() == target.resolve()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # a proxy resolves names for us
    assert hub.endpoint_unreachable() is None
