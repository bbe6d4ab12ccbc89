"""The srp-jax checkpoint format: exact round trips, atomic writes, damage always detected."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from srp_jax import factorizers as F
from srp_jax.checkpoint import (
    METADATA_FILE,
    decode_value,
    encode_value,
    is_srp_checkpoint,
    save_dictionary,
)
from srp_jax.config import ARCHITECTURES, FactorizerConfig
from srp_jax.dictionary import Dictionary, load_dictionary, load_factorizer
from srp_jax.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def make_dictionary(arch: str, *, d: int = 6, D: int = 20, V: int = 11, dtype=jnp.float32, seed: int = 0) -> Dictionary:
    cfg = FactorizerConfig(architecture=arch, d_features=D, k=3, k_values=(2, 3) if arch == "matryoshka_topk" else ())
    params, buffers = F.init_factorizer(jax.random.PRNGKey(seed), cfg, d)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    if arch == "batch_topk":
        buffers = {"activation_threshold": jnp.float32(0.25), "threshold_initialized": jnp.int32(1)}
    rng = np.random.default_rng(seed)
    return Dictionary(
        config=cfg, params=params, buffers=buffers, d_model=d,
        row_mean=jnp.asarray(rng.normal(size=d).astype(np.float32)),
        row_norms=jnp.asarray(rng.uniform(0.5, 2, size=V).astype(np.float32)),
        row_token_ids=(np.arange(V, dtype=np.int64) * 3 + (1 << 40)),
        metrics={"rowEV": 0.5, "val_top1_match": float("nan"), "inf": -math.inf, "shape": (3, 4), "none": None,
                 "arr": np.arange(3, dtype=np.float64), 7: "int key"},
        evaluation={"k": 3, "max_eval_rows": None},
        factorizer_block={**cfg.to_dict(), "unused_future_key": [1, 2]},
        source_config={"factorizer": cfg.to_dict(), "training": {"betas": (0.9, 0.95), "lr": 1e-3}},
    )


def _assert_bits_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _assert_same_metadata(a, b):
    assert json.dumps(encode_value(a), sort_keys=True) == json.dumps(encode_value(b), sort_keys=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_is_exact_for_every_architecture(tmp_path, arch):
    dic = make_dictionary(arch, seed=ARCHITECTURES.index(arch))
    save_dictionary(dic, tmp_path / "ck")
    got = load_dictionary(tmp_path / "ck")
    assert got.config == dic.config and got.d_model == dic.d_model
    _assert_bits_equal(dic.params, got.params)
    _assert_bits_equal(dic.buffers, got.buffers)
    for key in ("row_mean", "row_norms", "row_token_ids"):
        _assert_bits_equal(getattr(dic, key), getattr(got, key))
    assert got.row_token_ids.dtype == np.int64 and got.row_token_ids[0] == 1 << 40
    for key in ("metrics", "evaluation", "factorizer_block", "source_config"):
        _assert_same_metadata(getattr(dic, key), getattr(got, key))
    assert got.source_config["training"]["betas"] == (0.9, 0.95)
    assert got.metrics[7] == "int key" and math.isnan(got.metrics["val_top1_match"])
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(dic.encode(x)), np.asarray(got.encode(x)))


def test_bfloat16_params_stay_bfloat16(tmp_path):
    dic = make_dictionary("topk", dtype=jnp.bfloat16)
    save_dictionary(dic, tmp_path / "ck")
    got = load_dictionary(tmp_path / "ck")
    assert got.params["decoder"].dtype == ml_dtypes.bfloat16
    _assert_bits_equal(dic.params, got.params)


def test_metadata_values_round_trip_verbatim():
    from collections import OrderedDict

    value = {"a": (1, [2.5, None]), "b": OrderedDict([("x", 1)]), 3: b"\x00\xff", "n": float("nan"),
             "s": np.float32(1.5), "arr": np.arange(6, dtype=np.int16).reshape(2, 3), "t": True, "__srp_type__": 1}
    back = decode_value(json.loads(json.dumps(encode_value(value), allow_nan=False)))
    assert back["a"] == (1, [2.5, None]) and type(back["b"]) is OrderedDict and back[3] == b"\x00\xff"
    assert math.isnan(back["n"]) and back["s"] == np.float32(1.5) and type(back["s"]) is np.float32
    assert back["arr"].dtype == np.int16 and back["arr"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["t"] is True and back["__srp_type__"] == 1
    with pytest.raises(CheckpointError, match="metrics"):
        encode_value({"f": object()}, "metrics")


def test_existing_path_refused_force_replaces_and_no_temp_left(tmp_path):
    a, b = make_dictionary("gated", seed=1), make_dictionary("gated", seed=2)
    save_dictionary(a, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="already exists"):
        save_dictionary(b, tmp_path / "ck")
    _assert_bits_equal(a.params, load_dictionary(tmp_path / "ck").params)
    save_dictionary(b, tmp_path / "ck", force=True)
    _assert_bits_equal(b.params, load_dictionary(tmp_path / "ck").params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failed_save_leaves_nothing(tmp_path):
    dic = make_dictionary("topk")
    dic.metrics = {"bad": object()}
    with pytest.raises(CheckpointError):
        save_dictionary(dic, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_discovery_run_directory_and_load_factorizer(tmp_path):
    dic = make_dictionary("jumprelu")
    run = tmp_path / "run"
    save_dictionary(dic, run / "checkpoint")
    assert is_srp_checkpoint(run / "checkpoint") and not is_srp_checkpoint(run)
    _assert_bits_equal(dic.params, load_dictionary(run).params)
    loaded = load_factorizer(run)
    _assert_bits_equal(dic.params, loaded.params)
    assert loaded.training is False
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not an srp-jax checkpoint"):
        load_dictionary(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no such"):
        load_dictionary(tmp_path / "missing")


def test_config_disagreeing_with_arrays_is_refused(tmp_path):
    dic = make_dictionary("topk")
    save_dictionary(dic, tmp_path / "ck")
    meta_path = tmp_path / "ck" / METADATA_FILE
    doc = json.loads(meta_path.read_text())
    doc["content"]["factorizer"]["d_features"] = 21
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="checksum"):
        load_dictionary(tmp_path / "ck")
    # the same edit with a re-sealed metadata checksum: the shapes disagree with the config
    import srp_jax.checkpoint as C

    doc["content_sha256"] = C._sha256_bytes(C._canonical(doc["content"]))
    meta_path.write_text(json.dumps(doc))
    from srp_jax.errors import ShapeError

    with pytest.raises(ShapeError, match=r"'decoder' has shape \(20, 6\), expected \(21, 6\)"):
        load_dictionary(tmp_path / "ck")


def _damage(root: Path, rng: random.Random) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    meta = root / METADATA_FILE
    target = meta if rng.random() < 0.35 else rng.choice(files)
    data = bytearray(target.read_bytes())
    mode = rng.random()
    if mode < 0.3 or not data:
        target.write_bytes(bytes(data[: rng.randrange(0, max(1, len(data)))]))
        how = "truncated"
    elif mode < 0.9:
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        how = "flipped"
    else:
        target.unlink()
        how = "deleted"
    return f"{how} {target.relative_to(root)}"


def test_200_damaged_checkpoints_are_all_detected(tmp_path):
    pristine = tmp_path / "pristine"
    save_dictionary(make_dictionary("batch_topk"), pristine)
    rng = random.Random(2024)
    work = tmp_path / "copy"
    for i in range(200):
        shutil.copytree(pristine, work)
        what = _damage(work, rng)
        with pytest.raises(CheckpointError) as info:
            load_dictionary(work)
        message = str(info.value)
        assert "\n" not in message and str(work) in message, (what, message)
        shutil.rmtree(work)


def test_array_checksum_catches_a_silently_changed_array(tmp_path, monkeypatch):
    """Even when the files look intact, a restored array that differs is refused by name."""
    import srp_jax.checkpoint as C

    save_dictionary(make_dictionary("topk"), tmp_path / "ck")
    monkeypatch.setattr(C, "_verify_files", lambda path, files: None)
    meta_path = tmp_path / "ck" / METADATA_FILE
    doc = json.loads(meta_path.read_text())
    doc["content"]["arrays"]["params/decoder"]["sha256"] = "0" * 64
    doc["content_sha256"] = C._sha256_bytes(C._canonical(doc["content"]))
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="params/decoder fails its sha256"):
        load_dictionary(tmp_path / "ck")


def test_restore_onto_a_sharding_in_a_four_device_process(tmp_path):
    save_dictionary(make_dictionary("gated", D=16), tmp_path / "ck")
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from srp_jax.dictionary import load_dictionary
        mesh = Mesh(np.array(jax.devices()), ("model",))
        plain = load_dictionary({str(tmp_path / 'ck')!r})
        rows = NamedSharding(mesh, P("model", None))
        rep = NamedSharding(mesh, P())
        tree = {{"params": {{"encoder": {{"kernel": NamedSharding(mesh, P(None, "model")), "bias": NamedSharding(mesh, P("model"))}},
                            "decoder": rows, "gate_bias": rep, "log_r": rep}}}}
        d = load_dictionary({str(tmp_path / 'ck')!r}, sharding=tree)
        assert len(jax.devices()) == 4
        assert d.params["decoder"].sharding == rows
        assert len(d.params["decoder"].addressable_shards) == 4
        assert d.params["decoder"].addressable_shards[0].data.shape == (4, 6)
        for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(d.params)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        one = load_dictionary({str(tmp_path / 'ck')!r}, sharding=rep)
        assert one.params["decoder"].sharding == rep
        print("SHARDED-OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert "SHARDED-OK" in r.stdout, r.stderr[-2000:]


def test_bad_sharding_argument_is_a_clear_error(tmp_path):
    save_dictionary(make_dictionary("topk"), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="sharding"):
        load_dictionary(tmp_path / "ck", sharding="cpu")
    with pytest.raises(CheckpointError, match="params/decoder"):
        load_dictionary(tmp_path / "ck", sharding={"params": {"encoder": jax.sharding.SingleDeviceSharding(jax.devices()[0])}})
