"""Checks that need several devices, run in a fresh process by tests/test_sharding.py with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the main test session keeps one
device). ``python tests/_mesh_worker.py <check>[,<check>...] [args]``; prints ``OK <check>`` on success and
``MEASURE ...`` lines with the numbers the test reports."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from srp_jax import sharding as SH
from srp_jax.config import ARCHITECTURES, load_run_config
from srp_jax.data import load_prism_dataset
from srp_jax.train.loop import Progress, run_training

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]


def tiny_payload(seed: int = 0, V: int = 256, d: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    return {"W_U": rng.normal(size=(V, d)).astype(np.float32), "h_LN": rng.normal(size=(4, 24, d)).astype(np.float32)}


def tiny_sets(arch: str, steps: int = 20) -> list[str]:
    sets = [
        f"factorizer.architecture={arch}", "factorizer.d_features=64", "factorizer.k=4",
        "factorizer.k_values=[2,4,8]" if arch == "matryoshka_topk" else "factorizer.k_values=[]",
        "factorizer.matryoshka_weights=[]", f"training.steps={steps}", "training.batch_size=32",
        "training.log_every=1000", "training.init_mode=row_seeded", "data.max_hidden=64", "data.val_hidden=16",
        "training.step_strategy=dense",  # a mesh runs the dense step: compare like with like
    ]  # fmt: skip
    if arch == "topk":  # AuxK's top-k over dead latents takes the sharded path too
        sets += ["training.auxk_coeff=0.01", "training.auxk_dead_steps=3"]
    if arch in ("jumprelu", "l1_relu"):
        sets += ["training.l0_controller.enabled=true"]
    return sets


def quiet() -> Progress:
    return Progress(1, stream=io.StringIO(), enabled=False)


def train_params(cfg, ds, mesh, out_dir=None):
    out = run_training(cfg, ds, out_dir, progress=quiet(), log=lambda m: None, mesh=mesh)
    return out


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --------------------------------------------------------------------------------------------


def meshes_for(i: int) -> list[tuple[int, int]]:
    """The meshes architecture number ``i`` is checked on: (4, 2) (both axes split) and one of
    the others in turn, so each of those meets two of the six architectures."""
    others = [m for m in MESHES if m != (4, 2)]
    return [(4, 2), others[i % len(others)]]


def check_equivalence(archs: str = "all") -> None:
    """Every architecture: 20 steps on (4, 2) and on one more mesh (in turn) == 20 steps on
    one device (<= 1e-5)."""
    names = ARCHITECTURES if archs == "all" else archs.split(",")
    t0 = time.perf_counter()
    worst = 0.0
    for i, arch in enumerate(names):
        cfg = load_run_config("smoke", tiny_sets(arch))
        ds = load_prism_dataset(cfg, 0, payload=tiny_payload())
        ref = train_params(cfg, ds, None)["state"]
        for shape in meshes_for(i):
            got = train_params(cfg, ds, SH.make_mesh(*shape))["state"]
            spec = got.params["encoder"]["kernel"].sharding.spec
            assert spec == P(None, "model"), (arch, shape, spec)
            for name in ("params", "buffers", "since_fired", "controller"):
                diff = max_diff(getattr(ref, name), getattr(got, name)) if jax.tree.leaves(getattr(ref, name)) else 0.0
                assert diff <= 1e-5, (arch, shape, name, diff)
            diff = max_diff(ref.params, got.params)
            worst = max(worst, diff)
            print(f"MEASURE equivalence {arch} mesh={shape} max|dparam|={diff:.2e}", flush=True)
    print(f"MEASURE equivalence worst={worst:.2e} seconds={time.perf_counter() - t0:.1f}")


def check_topk() -> None:
    """The latent-sharded top-k (rows and batch) selects exactly what lax.top_k does, ties
    included, on every mesh; no full activation is gathered."""
    from srp_jax.factorizers import kernels as K
    from srp_jax.factorizers.sharded_topk import approximate_topk

    rng = np.random.default_rng(0)
    acts = rng.integers(0, 6, size=(16, 64)).astype(np.float32)  # many exact ties
    acts[3] = 2.0  # a row of equal values: the lowest indices must win
    for shape in MESHES:
        mesh = SH.make_mesh(*shape)
        placed = jax.device_put(acts, NamedSharding(mesh, P("data", "model")))
        for k in (1, 5, 13):  # k below, equal-ish to and above a shard's width on (1, 8)
            want = np.asarray(K.topk_mask(jnp.asarray(acts), k))  # no mesh: the plain kernel
            with jax.set_mesh(mesh):
                got = np.asarray(jax.jit(lambda a: K.topk_mask(a, k))(placed))
            np.testing.assert_array_equal(got, want, err_msg=f"rows {shape} k={k}")
        with jax.set_mesh(mesh), approximate_topk(0.95):  # CPU approx_max_k: exact values, ties in any order
            approx = np.asarray(jax.jit(lambda a: K.topk_mask(a, 5))(placed))
        np.testing.assert_array_equal(np.sort(approx, axis=1), np.sort(want5 := np.asarray(K.topk_mask(jnp.asarray(acts), 5)), axis=1))
        assert (np.count_nonzero(approx, axis=1) <= np.count_nonzero(want5, axis=1)).all()
        for n in (7, 200, 16 * 64):
            flat = acts.reshape(-1)
            vals, idx = jax.lax.top_k(jnp.asarray(flat), n)
            want = np.zeros(flat.shape, np.float32)
            want[np.asarray(idx)] = 1.0
            with jax.set_mesh(mesh):
                mask, cutoff = jax.jit(lambda a: K.batch_topk_mask(a, n))(placed)
            np.testing.assert_array_equal(np.asarray(mask).reshape(-1), want, err_msg=f"batch {shape} n={n}")
            assert float(cutoff) == float(jnp.min(vals))
        # the compiled program gathers candidates (B_local, k * model), never (B_local, D)
        with jax.set_mesh(mesh):
            hlo = jax.jit(lambda a: K.topk_mask(a, 5)).lower(placed).compile().as_text()
        from srp_jax.train.plan import activation_gathers

        assert not activation_gathers(hlo, 16, 64), (shape, activation_gathers(hlo, 16, 64))
    print("MEASURE topk meshes=4 ties=exact")


def check_checkpoint(tmp: str) -> None:
    """A run saved on a (4, 2) mesh resumes on (1, 8) and on one device bit-identically, and
    its dictionary checkpoint loads onto (1, 8) / one device bit-identically (per-shard
    checksums verified)."""
    from srp_jax.checkpoint import load_checkpoint, save_dictionary
    from srp_jax.dictionary import Dictionary
    from srp_jax.train.loop import STATE_DIR
    from srp_jax.train.resume import StateStore
    from srp_jax.train.compiled import setup_training
    from srp_jax.train.step import StepSpec, make_optimizer
    from srp_jax.data import row_sampling_weights

    tmp = Path(tmp)
    cfg = load_run_config("smoke", tiny_sets("topk", steps=6) + ["training.checkpoint_every=3"])
    ds = load_prism_dataset(cfg, 0, payload=tiny_payload())
    saved = train_params(cfg, ds, SH.make_mesh(4, 2), tmp / "run")["state"]
    host = SH.to_host(saved)
    weights = row_sampling_weights(ds, cfg.training.row_sampling)
    spec = StepSpec.build(cfg.factorizer, cfg.training, ds.d_model, ds.hidden_train.shape[0], ds.top_targets.shape[1])
    opt = make_optimizer(cfg.training)
    for mesh in (SH.make_mesh(1, 8), None):
        setup = setup_training(spec, opt, ds, weights, init_seed=cfg.init_seed, mesh=mesh)
        store = StateStore(tmp / "run" / STATE_DIR).open()
        state, _, _ = store.restore(setup.abstract)  # checksums verified on the new layout too
        store.close()
        assert int(state.step) == 6
        if mesh is not None:
            assert state.params["decoder"].sharding.spec == P("model", None)
            assert state.params["decoder"].sharding.mesh.shape["model"] == 8
        for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(SH.to_host(state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the dictionary checkpoint: save from the (4, 2) arrays, load onto other layouts
    d = Dictionary(config=cfg.factorizer, params=saved.params, buffers=saved.buffers, d_model=ds.d_model)
    path = save_dictionary(d, tmp / "dict")
    mesh = SH.make_mesh(1, 8)
    sh = SH.tree_shardings(mesh, {"params": saved.params}, SH.param_rules(cfg.factorizer))
    for sharding in (sh, mesh, None):  # explicit shardings, the rules on a mesh, one device
        loaded = load_checkpoint(path, sharding=sharding).contents
        if sharding is mesh:
            assert loaded["params"]["encoder"]["kernel"].sharding.spec == P(None, "model")
        for a, b in zip(jax.tree.leaves(host.params), jax.tree.leaves(loaded["params"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("MEASURE checkpoint (4,2)->(1,8),(1,1) bit-identical")


def check_shard_checksums(tmp: str) -> None:
    """A sharded restore verifies each array block by block on the devices that hold it: a
    tampered block checksum is caught even though the files are intact."""
    import json

    from srp_jax.checkpoint import METADATA_FILE, _canonical, _sha256_bytes, load_checkpoint, save_dictionary
    from srp_jax.errors import CheckpointError
    from conftest import random_dictionary

    d = random_dictionary("topk", d=16, D=64)
    path = save_dictionary(d, Path(tmp) / "dict")
    mesh = SH.make_mesh(1, 8)
    sh = SH.tree_shardings(mesh, {"params": d.params}, SH.param_rules(d.config))
    stats = load_checkpoint(path, sharding=sh).verified
    assert stats["blocks_verified"] > 0 and stats["whole_arrays_hashed"] == 0, stats
    doc = json.loads((path / METADATA_FILE).read_text())
    blocks = doc["content"]["arrays"]["params/decoder"]["blocks"]
    blocks["0"][5] = "0" * 64
    doc["content_sha256"] = _sha256_bytes(_canonical(doc["content"]))
    (path / METADATA_FILE).write_text(json.dumps(doc))
    try:
        load_checkpoint(path, sharding=sh)
    except CheckpointError as exc:
        assert "params/decoder" in str(exc) and "block 5" in str(exc), exc
    else:
        raise AssertionError("a tampered block checksum was not detected")
    print(f"MEASURE shard-checksums blocks={stats['blocks_verified']}")


def vocab_gathers(hlo: str, n_rows: int, d: int) -> list[str]:
    """all-gathers whose result is at least a whole (n_rows, d) readout and has a d axis."""
    import re

    found = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*\(?\s*[a-z0-9]+\[([0-9,]*)\][^=]*?all-gather(?:-start)?\(", line)
        if m:
            dims = [int(x) for x in m.group(1).split(",") if x]
            if d in dims and int(np.prod(dims)) >= n_rows * d:
                found.append(line.strip()[:160])
    return found


def check_eval() -> None:
    """evaluate() on a mesh (rows split over data, D over model) gives the one-device
    metrics, and its compiled program never all-gathers the vocabulary."""
    from srp_jax import metrics as M
    from srp_jax.readout import Readout
    from conftest import random_dictionary

    rng = np.random.default_rng(3)
    V, d, D = 1024, 24, 64
    W = (rng.normal(size=(V, d)) + 0.2).astype(np.float32)
    readout = Readout.from_weights(W)
    H = (2.0 * rng.normal(size=(40, d))).astype(np.float32)
    ev = {"k": 6, "max_eval_rows": 768, "max_eval_hidden": 40}
    cases = [("topk", "reference", ((4, 2), (1, 8))), ("topk", "full", ((2, 4),)),
             ("batch_topk", "reference", ((4, 2),)), ("gated", "reference", ((8, 1),))]
    for arch, mode, shapes in cases:
        dic = random_dictionary(arch, d=d, D=D)
        want = M.evaluate(dic, readout, H, evaluation=ev, mode=mode, row_batch=256, hidden_batch=16)
        for shape in shapes:
            mesh = SH.make_mesh(*shape)
            sh = SH.tree_shardings(mesh, {"params": dic.params, "buffers": dic.buffers}, SH.param_rules(dic.config))
            placed = dic.replace(params=SH.place_tree(dic.params, sh["params"]), buffers=SH.place_tree(dic.buffers, sh["buffers"]))
            with SH.mesh_context(mesh):
                got = M.evaluate(placed, readout, H, evaluation=ev, mode=mode, row_batch=256, hidden_batch=16)
            for key, value in want.items():
                if isinstance(value, float) and not np.isnan(value):
                    assert abs(got[key] - value) <= 1e-5 * max(1.0, abs(value)), (arch, mode, shape, key, got[key], value)
                else:
                    assert got[key] == value or (value != value and got[key] != got[key]), (arch, mode, shape, key)
    # the compiled evaluation keeps the vocabulary split
    dic = random_dictionary("topk", d=d, D=D)
    mesh = SH.make_mesh(4, 2)
    sh = SH.tree_shardings(mesh, {"params": dic.params}, SH.param_rules(dic.config))["params"]
    with SH.mesh_context(mesh):
        Wp, Xp, Ap, mup, Hp = M._place_inputs(np.asarray(readout.W_U), np.asarray(readout.rows_normalized),
                                               np.asarray(readout.row_norms), np.asarray(readout.row_mean), H)
        assert Wp.sharding.spec == P("data", None)
        lowered = M._evaluate_core.lower(
            dic.config, SH.place_tree(dic.params, sh), dic.buffers, Wp, Xp, Ap, mup, Hp, jnp.float32(1.0),
            k=6, row_batch=256, hidden_batch=16, overlap_k=5, top_c=8, use_cap=False, wide=False, clamp=False,
        )
        hlo = lowered.compile().as_text()
    assert "all-gather" in hlo or "all-reduce" in hlo  # it is a distributed program
    assert not vocab_gathers(hlo, V, d), vocab_gathers(hlo, V, d)[:3]
    print("MEASURE eval on mesh == one device (1e-5); no vocabulary all-gather")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    assert jax.device_count() == 8, jax.device_count()
    import inspect

    checks, *rest = sys.argv[1:]
    for check in checks.split(","):  # each check takes the next arguments it needs (tmp dirs)
        fn = globals()[f"check_{check}"]
        n = len(inspect.signature(fn).parameters) if fn is not check_equivalence else min(1, len(rest))
        args, rest = rest[:n], rest[n:]
        t0 = time.perf_counter()
        fn(*args)
        print(f"OK {check} ({time.perf_counter() - t0:.1f} s)", flush=True)
