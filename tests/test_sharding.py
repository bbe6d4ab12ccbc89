"""Meshes, partition rules, the latent-sharded top-k, multi-host runs and `srp-jax plan`.

Checks that need several devices run in fresh processes with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``; see tests/_mesh_worker.py), so this
session keeps its single device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from srp_jax import sharding as SH
from srp_jax.config import ARCHITECTURES, MeshConfig, load_run_config
from srp_jax.errors import ConfigError
from srp_jax.train.plan import activation_gathers
from srp_jax.train.state import init_train_state
from srp_jax.train.step import make_optimizer

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_mesh_worker.py"


def _env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    # one thread per fake device: 8 devices on 2 shared cores stay responsive (collectives
    # wait for every device; oversubscribed Eigen pools made them stall)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    return env


def _worker(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, str(WORKER), *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for line in proc.stdout.splitlines():
        if line.startswith(("MEASURE", "OK")):
            print(line)
    return proc.stdout


# --------------------------------------------------------------------------------------------
# One device: meshes, rules, parsing


@pytest.mark.parametrize(
    "data, model, n, want",
    [(-1, 1, 8, (8, 1)), (4, 2, 8, (4, 2)), (-1, 2, 8, (4, 2)), (2, -1, 8, (2, 4)), (1, -1, 8, (1, 8)), (-1, 1, 1, (1, 1))],
)
def test_mesh_shape_fills_the_devices(data, model, n, want):
    assert SH.resolve_mesh_shape(MeshConfig(data=data, model=model), n) == want


@pytest.mark.parametrize("data, model, n, where", [(3, -1, 8, "mesh.data=3"), (4, 4, 8, "16 devices"), (-1, 3, 8, "mesh.model=3")])
def test_mesh_shape_must_match_the_device_count(data, model, n, where):
    with pytest.raises(ConfigError, match=where):
        SH.resolve_mesh_shape(MeshConfig(data=data, model=model), n)


def test_mesh_block_validation():
    with pytest.raises(ConfigError, match="both be -1"):
        MeshConfig(data=-1, model=-1)
    with pytest.raises(ConfigError, match="mesh.topk"):
        MeshConfig(topk="fast")
    with pytest.raises(ConfigError, match="topk_recall"):
        MeshConfig(topk="approx_max_k", topk_recall=1.5)
    assert MeshConfig(topk="approx_max_k", topk_recall=0.9).approx_recall == 0.9
    assert MeshConfig().approx_recall is None
    cfg = load_run_config("smoke", ["mesh.data=4", "mesh.model=2", "mesh.topk=approx_max_k"])
    assert (cfg.mesh.data, cfg.mesh.model, cfg.mesh.topk) == (4, 2, "approx_max_k")


def _expected_spec(shape: tuple[int, ...], d: int, D: int) -> P:
    """An independent expectation from shapes alone (d != D): the latent axis goes on model."""
    if shape == (d, D):
        return P(None, "model")
    if shape == (D, d):
        return P("model", None)
    if shape == (D,):
        return P("model")
    return P()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_partition_rules_cover_every_state_leaf(arch):
    d, D = 16, 64
    cfg = load_run_config("smoke", [f"factorizer.architecture={arch}", f"factorizer.d_features={D}",
                                    "factorizer.k_values=[]", "factorizer.matryoshka_weights=[]"])  # fmt: skip
    opt = make_optimizer(cfg.training)
    state = jax.eval_shape(lambda: init_train_state(0, cfg.factorizer, cfg.training, d, opt))
    specs = SH.tree_specs(state, SH.param_rules(cfg.factorizer))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    assert len(leaves) == len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
    for (path, leaf), spec in zip(leaves, jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        assert spec == _expected_spec(tuple(leaf.shape), d, D), (SH.path_name(path), leaf.shape, spec)
    names = [SH.path_name(p) for p, _ in leaves]
    assert "opt_state/1/0/mu/encoder/kernel" in names and "params/decoder" in names


def test_rules_reject_an_indivisible_latent_axis():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    big = {"params": {"decoder": jax.ShapeDtypeStruct((10, 4), np.float32)}}
    assert SH.tree_shardings(mesh, big, SH.param_rules())["params"]["decoder"].spec == P("model", None)
    fake = type("M", (), {"shape": {"data": 1, "model": 4}})()
    assert "not divisible by mesh model = 4" in SH._fits((10, 4), P("model", None), fake)
    assert SH._fits((12, 4), P("model", None), fake) is None


def test_rows_spec_prefers_the_whole_mesh():
    fake = type("M", (), {"shape": {"data": 2, "model": 4}})()
    assert SH.rows_spec(16, fake) == P(("data", "model"))
    assert SH.rows_spec(6, fake) == P("data")
    assert SH.rows_spec(12, fake) == P(("data", "model")) if 12 % 8 == 0 else SH.rows_spec(12, fake) == P("data")
    assert SH.rows_spec(7, fake) == P()


def test_distributed_options_from_env():
    env = {"SRP_COORDINATOR_ADDRESS": "h0:1234", "SRP_NUM_PROCESSES": "4", "SRP_PROCESS_ID": "3"}
    opts = SH.DistributedOptions.from_env(env=env)
    assert (opts.coordinator, opts.num_processes, opts.process_id, opts.mode) == ("h0:1234", 4, 3, "auto")
    assert SH.DistributedOptions.from_env("auto", None, 2, None, env=env).num_processes == 2  # options win
    assert SH.DistributedOptions.from_env(env={"SRP_DISTRIBUTED": "off"}).mode == "off"
    with pytest.raises(ConfigError, match="SRP_NUM_PROCESSES"):
        SH.DistributedOptions.from_env(env={"SRP_NUM_PROCESSES": "two"})
    with pytest.raises(ConfigError, match="needs all of"):
        SH.initialize_distributed(SH.DistributedOptions(coordinator="h0:1"))
    assert SH.initialize_distributed(SH.DistributedOptions(mode="off")) is False


def test_activation_gathers_finds_gathered_activation_rows():
    hlo = "\n".join([
        "  %all-gather = f32[1024,131072]{0,1} all-gather(%copy), channel_id=1, dimensions={1}",
        "  %all-gather.1 = f32[2048,1024]{0,1} all-gather(%x), channel_id=2, dimensions={1}",  # candidates
        "  %ag = (f32[64,131072]{1,0}, s32[8]{0}) all-gather-start(%y), dimensions={0}",
        "  %w = f32[4096,131072]{1,0} add(%a, %b)",  # not a gather
        "  %all-gather.2 = f32[4096,256]{1,0} all-gather(%z), dimensions={0}",
    ])  # fmt: skip
    found = activation_gathers(hlo, batch=4096, d_features=131072)
    assert len(found) == 2 and "1024,131072" in found[0] and "64,131072" in found[1]


def test_approx_max_k_reaches_the_training_step_only():
    """mesh.topk: approx_max_k puts approx_max_k into the compiled train step (and nowhere
    else: the library encode stays exact)."""
    from srp_jax import factorizers as F
    from srp_jax.train.compiled import compile_training
    from srp_jax.train.sampling import Batch
    from srp_jax.train.step import StepSpec

    cfg = load_run_config("smoke", ["factorizer.architecture=topk", "factorizer.d_features=32", "factorizer.k=4",
                                    "factorizer.k_values=[]", "factorizer.matryoshka_weights=[]",
                                    "training.lambda_prism=0", "mesh.topk=approx_max_k"])  # fmt: skip
    spec = StepSpec.build(cfg.factorizer, cfg.training, 8, 0, sharded=True)  # a mesh's step: the dense one
    assert spec.strategy == "dense"
    opt = make_optimizer(cfg.training)
    state = jax.eval_shape(lambda: init_train_state(0, cfg.factorizer, cfg.training, 8, opt))
    batch = Batch(x=jax.ShapeDtypeStruct((cfg.training.batch_size, 8), np.float32))
    for recall, want in ((cfg.mesh.approx_recall, True), (None, False)):
        fns = compile_training(spec, opt, approx_recall=recall)
        text = str(fns.step.trace(state, batch).jaxpr)
        assert ("approx_top_k" in text) is want and "top_k" in text
    params = jax.eval_shape(lambda: F.init_factorizer(jax.random.PRNGKey(0), cfg.factorizer, 8)[0])
    enc = str(jax.make_jaxpr(lambda p, x: F.encode(cfg.factorizer, p, {}, x, 4))(params, batch.x))
    assert "approx_top_k" not in enc


def test_plan_mesh_argument():
    from srp_jax.cli.plan import parse_mesh, registry_shape

    assert parse_mesh("data=2,model=4") == (2, 4) and parse_mesh("model=8, data=1") == (1, 8)
    for bad in ("data=2", "2,4", "data=0,model=8", "data=2,model=x"):
        with pytest.raises(ConfigError, match="--mesh"):
            parse_mesh(bad)
    assert registry_shape("paper/qwen3.5-9b/k256_32x") == (4096, 248320)
    assert registry_shape("configs/paper/gemma-4-e2b/k128_16x.yaml")[0] == 1536
    assert registry_shape("smoke") == (None, None)


# --------------------------------------------------------------------------------------------
# Several devices (fresh processes)


@pytest.mark.slow
def test_every_architecture_matches_one_device_on_every_mesh():
    """20 steps on mesh (4,2) and on one of (8,1), (2,4), (1,8) in turn give the one-device
    parameters (<= 1e-5) for every architecture (each mesh meets two architectures)."""
    _worker("equivalence", timeout=900)


@pytest.mark.slow
def test_sharded_topk_checkpoints_checksums_and_evaluation(tmp_path):
    """Latent-sharded top-k == lax.top_k with ties; a (4,2) run resumes on (1,8) and one
    device bit-identically; a sharded dictionary restore checks block checksums per shard;
    evaluation on a mesh matches one device and never all-gathers the vocabulary."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _worker("topk,checkpoint,shard_checksums,eval", str(tmp_path / "a"), str(tmp_path / "b"))


TINY = [
    "factorizer.architecture=topk", "factorizer.d_features=64", "factorizer.k=8", "factorizer.k_values=[]",
    "factorizer.matryoshka_weights=[]", "training.steps=12", "training.batch_size=64", "training.log_every=4",
    "data.max_rows=512", "data.max_hidden=64", "data.val_hidden=32", "evaluation.max_eval_hidden=32",
    "evaluation.k=8", "evaluation.max_eval_rows=512",
]  # fmt: skip


def _train_cmd(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "srp_jax.cli.main", "train", "--config", "smoke", "--out-dir", str(out)]
    for item in TINY:
        cmd += ["--set", item]
    return cmd + list(extra)


def _params(out: Path) -> dict[str, np.ndarray]:
    from srp_jax.dictionary import load_dictionary

    d = load_dictionary(out)
    return {"decoder": np.asarray(d.params["decoder"]), "kernel": np.asarray(d.params["encoder"]["kernel"]),
            "bias": np.asarray(d.params["encoder"]["bias"])}  # fmt: skip


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    proc = subprocess.run(_train_cmd(out), env=_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_params(a: Path, b: Path) -> float:
    pa, pb = _params(a), _params(b)
    worst = max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)
    assert worst <= 1e-5, worst
    return worst


@pytest.mark.slow
def test_train_cli_on_a_4x2_mesh(one_device_run, tmp_path):
    out = tmp_path / "mesh"
    proc = subprocess.run(_train_cmd(out, "--set", "mesh.data=4", "--set", "mesh.model=2"), env=_env(8),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[mesh] data=4 model=2 over 8 devices" in proc.stderr
    assert (out / "DONE").is_file() and json.loads((out / "metrics.json").read_text())["finite_metrics"]
    print(f"MEASURE cli mesh (4,2) vs one device max|dparam|={_assert_same_params(one_device_run, out):.2e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(one_device_run, tmp_path):
    """Two local processes (jax.distributed, gloo CPU collectives; 4 devices each, a (4, 2)
    mesh across both) train the run to the one-process result; process 0 writes the files."""
    out = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(
            _train_cmd(out, "--set", "mesh.data=4", "--set", "mesh.model=2", "--coordinator", f"127.0.0.1:{port}",
                       "--num-processes", "2", "--process-id", str(i)),
            env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            results.append((p.returncode, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, err in results:
        assert rc == 0, err[-4000:]
    assert "2 process(es)" in results[0][1] and "[result]" in results[0][1]
    assert "[result]" not in results[1][1]  # process 0 logs for the run
    assert (out / "DONE").is_file()
    print(f"MEASURE two processes vs one max|dparam|={_assert_same_params(one_device_run, out):.2e}")


@pytest.mark.slow
def test_plan_largest_published_config_fits_8gb_without_gathering_activations():
    cmd = [sys.executable, "-m", "srp_jax.cli.main", "plan", "--config", "paper/qwen3.5-9b/k256_32x",
           "--mesh", "data=1,model=8", "--json"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert (report["d_features"], report["d_model"], report["batch_size"]) == (131072, 4096, 4096)
    assert report["mesh"] == [1, 8]
    assert report["params"] == 2 * 131072 * 4096 * 4 // 8 + 131072 * 4 // 8  # encoder, decoder, bias shards
    assert report["step_peak"] <= 8e9, report
    assert report["activation_gathers"] == [], report["activation_gathers"]
    print(f"MEASURE plan (1,8) step_peak={report['step_peak'] / 1e9:.2f} GB compile={report['compile_seconds']:.1f}s")
