"""PyTorch checkpoint.pt <-> srp-jax checkpoint: bit-exact round trips, schemas, safety, damage."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _interop_helpers import ARCHS, FIXTURE_PT, assert_same_tree, runner_checkpoint, save_torch  # noqa: E402
from convert.checkpoints import orbax_to_pt, pt_to_dictionary, pt_to_orbax  # noqa: E402
from srp_jax.dictionary import load_dictionary  # noqa: E402
from srp_jax.dictionary import load_factorizer  # noqa: E402
from srp_jax.errors import CheckpointError, ConfigError, MissingKeyError, ShapeError, SrpError, UnexpectedKeyError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _round_trip(src: Path, tmp: Path, **kw) -> Path:
    pt_to_orbax(src, tmp / "orbax", **kw)
    return orbax_to_pt(tmp / "orbax", tmp / "back.pt")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("arch", ["topk", "gated"])
def test_reference_fixture_round_trip_is_bit_exact(tmp_path, arch):
    src = FIXTURE_PT / arch / "checkpoint.pt"
    back = _round_trip(src, tmp_path)
    assert_same_tree(_load(src), _load(back))
    assert isinstance(_load(back)["model_state_dict"], OrderedDict)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_round_trips_and_maps_weights(tmp_path, arch):
    ckpt = runner_checkpoint(arch, seed=ARCHS.index(arch))
    src = save_torch(ckpt, tmp_path / "src.pt")
    back = _round_trip(src, tmp_path)
    assert_same_tree(_load(src), _load(back))
    # Independent expectation for the layout mapping: kernel = encoder.weight^T, decoder as is.
    dictionary = load_dictionary(tmp_path / "orbax")
    sd = ckpt["model_state_dict"]
    np.testing.assert_array_equal(np.asarray(dictionary.params["encoder"]["kernel"]), sd["encoder.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(dictionary.params["decoder"]), sd["decoder"].numpy())
    assert dictionary.row_token_ids.dtype == np.int64 and dictionary.row_token_ids[0] == 1 << 40
    if arch == "batch_topk":
        assert int(dictionary.buffers["threshold_initialized"]) == 1
        assert _load(back)["model_state_dict"]["threshold_initialized"].dtype == torch.int64


def test_bfloat16_source_default_widens_and_keep_is_bit_exact(tmp_path):
    ckpt = runner_checkpoint("jumprelu", dtype=torch.bfloat16)
    ckpt["row_mean"] = ckpt["row_mean"].to(torch.bfloat16)
    src = save_torch(ckpt, tmp_path / "bf16.pt")
    # default: float32, values exactly the bf16 values
    d32, _ = pt_to_dictionary(src)
    kernel = np.asarray(d32.params["encoder"]["kernel"])
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, ckpt["model_state_dict"]["encoder.weight"].float().numpy().T)
    assert np.asarray(d32.row_mean).dtype == np.float32
    # --dtype bfloat16: the round trip keeps every dtype and bit
    (tmp_path / "keep").mkdir()
    back = _round_trip(src, tmp_path / "keep", dtype="bfloat16")
    assert load_dictionary(tmp_path / "keep" / "orbax").params["decoder"].dtype == ml_dtypes.bfloat16
    assert_same_tree(_load(src), _load(back))
    # float32 round trip: same keys, float32 tensors equal to the bf16 values
    (tmp_path / "wide").mkdir()
    wide = _load(_round_trip(src, tmp_path / "wide"))
    assert wide["model_state_dict"]["decoder"].dtype == torch.float32
    assert torch.equal(wide["model_state_dict"]["decoder"], ckpt["model_state_dict"]["decoder"].float())


def test_hub_schema_keeps_absent_keys_absent_and_extras_verbatim(tmp_path):
    full = runner_checkpoint("topk")
    config = {"factorizer": full["factorizer"], "training": {"steps": 20000, "lr": 1e-3, "betas": (0.9, 0.999)},
              "data": {"max_rows": None}}
    ckpt = {"model_state_dict": full["model_state_dict"], "config": config, "step": 20000,
            "notes_tensor": torch.arange(3, dtype=torch.int16)}
    src = save_torch(ckpt, tmp_path / "hub.pt")
    back = _load(_round_trip(src, tmp_path))
    assert list(back) == ["model_state_dict", "config", "step", "notes_tensor"]
    assert_same_tree(_load(src), back)
    assert back["config"]["training"]["betas"] == (0.9, 0.999)
    assert load_dictionary(tmp_path / "orbax").source_config["training"]["steps"] == 20000


def test_state_dict_key_variant_round_trips(tmp_path):
    full = runner_checkpoint("l1_relu", metrics=False)
    ckpt = {"state_dict": full["model_state_dict"], "factorizer": full["factorizer"]}
    src = save_torch(ckpt, tmp_path / "sd.pt")
    assert_same_tree(_load(src), _load(_round_trip(src, tmp_path)))


def test_written_pt_loads_with_the_reference_style_loader(tmp_path):
    """What we write is a plain weights-only checkpoint a torch user loads unchanged."""
    src = save_torch(runner_checkpoint("topk"), tmp_path / "a.pt")
    back = _load(_round_trip(src, tmp_path))
    enc = torch.nn.Linear(8, 24)
    enc.load_state_dict({"weight": back["model_state_dict"]["encoder.weight"], "bias": back["model_state_dict"]["encoder.bias"]})
    assert back["factorizer"]["architecture"] == "topk"
    assert load_factorizer(tmp_path / "a.pt").d_features == 24


def test_code_running_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": Evil()}, bad)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        pt_to_orbax(bad, tmp_path / "out")
    with pytest.raises(CheckpointError):
        load_factorizer(bad)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint\n")
    cases = [(empty, CheckpointError, "empty"), (text, CheckpointError, "text.pt"),
             (tmp_path / "missing.pt", CheckpointError, "no such")]
    ckpt = runner_checkpoint("gated")
    ckpt["model_state_dict"]["decoder"] = ckpt["model_state_dict"]["decoder"][:, :5]
    cases.append((save_torch(ckpt, tmp_path / "shape.pt"), ShapeError, "decoder"))
    ckpt = runner_checkpoint("gated")
    del ckpt["model_state_dict"]["log_r"]
    cases.append((save_torch(ckpt, tmp_path / "missing_key.pt"), MissingKeyError, "log_r"))
    ckpt = runner_checkpoint("topk")
    ckpt["model_state_dict"]["W_dec"] = torch.zeros(2)
    cases.append((save_torch(ckpt, tmp_path / "extra_key.pt"), UnexpectedKeyError, "W_dec"))
    ckpt = runner_checkpoint("topk")
    ckpt["row_norms"] = ckpt["row_norms"][:-1]
    cases.append((save_torch(ckpt, tmp_path / "rows.pt"), ShapeError, "row_norms"))
    save_torch([1, 2, 3], tmp_path / "list.pt")
    cases.append((tmp_path / "list.pt", CheckpointError, "dict"))
    for field, value in (("architecture", "foo"), ("k", "sixteen")):
        ckpt = runner_checkpoint("topk")
        ckpt["factorizer"] = {**ckpt["factorizer"], field: value}
        cases.append((save_torch(ckpt, tmp_path / f"cfg_{field}.pt"), ConfigError, rf"cfg_{field}\.pt: factorizer config: .*{value}"))
    for path, exc, needle in cases:
        with pytest.raises(exc, match=needle) as info:
            pt_to_orbax(path, out)
        assert "\n" not in str(info.value)
        assert not out.exists(), path
    assert _leftovers(tmp_path) == []


def test_existing_destination_is_refused_unless_forced(tmp_path):
    src = FIXTURE_PT / "topk" / "checkpoint.pt"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        pt_to_orbax(src, out)
    # even --force never deletes a directory that is not an srp-jax checkpoint
    with pytest.raises(CheckpointError, match="is not an srp-jax checkpoint"):
        pt_to_orbax(src, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    ck = tmp_path / "ck"
    pt_to_orbax(FIXTURE_PT / "gated" / "checkpoint.pt", ck)
    pt_to_orbax(src, ck, force=True)  # an existing srp-jax checkpoint is replaced
    assert load_dictionary(ck).k == 16 and load_dictionary(ck).architecture == "topk"
    (tmp_path / "x.pt").write_bytes(b"old")
    with pytest.raises(CheckpointError, match="already exists"):
        orbax_to_pt(ck, tmp_path / "x.pt")
    assert (tmp_path / "x.pt").read_bytes() == b"old"
    orbax_to_pt(ck, tmp_path / "x.pt", force=True)
    assert "model_state_dict" in _load(tmp_path / "x.pt")
    # a destination that is, holds or sits inside the source is refused, forced or not
    run = tmp_path / "run1"
    run.mkdir()
    shutil.copy(src, run / "checkpoint.pt")
    for dst in (run, run / "checkpoint.pt"):
        with pytest.raises(CheckpointError, match="would overwrite the source"):
            pt_to_orbax(run / "checkpoint.pt", dst, force=True)
    with pytest.raises(CheckpointError, match="would overwrite the source"):
        orbax_to_pt(ck, ck / "srp_checkpoint.json", force=True)
    assert (run / "checkpoint.pt").read_bytes() == src.read_bytes() and load_dictionary(ck).k == 16
    assert _leftovers(tmp_path) == []


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    mode = rng.random()
    if mode < 0.3:  # truncate anywhere
        return bytes(b[: rng.randrange(0, len(b))])
    # flip bits, biased toward the structure (pickle at the start, zip directory at the end)
    region = rng.random()
    for _ in range(rng.randint(1, 3)):
        if region < 0.4:
            pos = rng.randrange(0, min(len(b), 1200))
        elif region < 0.8:
            pos = rng.randrange(max(0, len(b) - 1500), len(b))
        else:
            pos = rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
    return bytes(b)


def test_200_corrupted_pt_files_fail_cleanly_or_convert_completely(tmp_path):
    good_path = save_torch(runner_checkpoint("topk", d=8, D=16, V=12), tmp_path / "good.pt")
    good = good_path.read_bytes()
    pristine = pt_to_dictionary(good_path)[0].to_checkpoint_dict()
    rng = random.Random(1234)
    outcomes = {"error": 0, "converted": 0}
    work = tmp_path / "work"
    work.mkdir()
    for i in range(200):
        bad = work / f"bad{i}.pt"
        bad.write_bytes(_corrupt(good, rng))
        out = work / f"out{i}"
        try:
            pt_to_orbax(bad, out)
        except SrpError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc), str(exc)
            assert not out.exists()
            outcomes["error"] += 1
        else:
            # a completed conversion is complete and valid, and -- every record being
            # CRC-checked -- the damage sat in bytes no record covers: the content is intact
            assert_same_tree(load_dictionary(out).to_checkpoint_dict(), pristine)
            outcomes["converted"] += 1
            shutil.rmtree(out)
        bad.unlink()
    assert _leftovers(work) == [] and list(work.iterdir()) == []
    assert outcomes["error"] >= 150, outcomes


def test_flipped_tensor_byte_is_caught_by_the_zip_crc(tmp_path):
    import zipfile

    src = save_torch(runner_checkpoint("topk", d=8, D=16, V=12), tmp_path / "good.pt")
    with zipfile.ZipFile(src) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 16)
        name_len = len(info.filename.encode())
    data = bytearray(src.read_bytes())
    header = info.header_offset
    extra_len = int.from_bytes(data[header + 28: header + 30], "little")
    data[header + 30 + name_len + extra_len + 5] ^= 0x10  # a byte inside the stored tensor
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"fails its CRC-32 check") as exc:
        pt_to_orbax(bad, tmp_path / "out")
    assert str(bad) in str(exc.value) and not (tmp_path / "out").exists()


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "srp_jax.cli.main", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_convert_subprocess_success_and_damage(tmp_path):
    """Two real subprocesses: the console entry point converts, and a damaged file exits 2."""
    src = FIXTURE_PT / "gated" / "checkpoint.pt"
    r = _cli("convert", str(src), str(tmp_path / "dir"))
    assert r.returncode == 0, r.stderr
    assert load_dictionary(tmp_path / "dir").architecture == "gated"
    good = src.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 3])
    r = _cli("convert", str(tmp_path / "trunc.pt"), str(tmp_path / "o1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "trunc.pt" in r.stderr
    assert not (tmp_path / "o1").exists()


def test_cli_convert_in_process(tmp_path, capsys):
    from srp_jax.cli.main import main

    src = FIXTURE_PT / "topk" / "checkpoint.pt"
    assert main(["convert", str(src), str(tmp_path / "dir")]) == 0
    assert main(["convert", str(tmp_path / "dir"), str(tmp_path / "back.pt")]) == 0
    assert_same_tree(_load(src), _load(tmp_path / "back.pt"))
    capsys.readouterr()
    good = src.read_bytes()
    (tmp_path / "plain").mkdir()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(good[:200] + bytes(b ^ 0x5A for b in good[200:900]) + good[900:])
    cases = [(str(src), str(tmp_path / "dir")), (str(tmp_path / "empty.pt"), str(tmp_path / "o1")),
             (str(tmp_path / "plain"), str(tmp_path / "o2.pt")), (str(tmp_path / "nope.pt"), str(tmp_path / "o3")),
             (str(tmp_path / "junk.pt"), str(tmp_path / "o4"))]
    for args in cases:
        assert main(["convert", *args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("srp-jax convert: error:"), err
        assert not Path(args[1]).exists() or args[1].endswith("dir")
    with pytest.raises(SystemExit) as info:
        main(["convert", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "weights_only" in out and "--dtype" in out and "hub:<model>/<op>" in out
