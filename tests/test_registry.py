"""The architecture registry: a seventh architecture defined and registered here, in the test
file, runs through every consumer (config, training, Orbax checkpoints, .pt conversion both
ways, evaluation, decomposition, the Flax shell) without touching a library file."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srp_jax
from srp_jax import factorizers as F
from srp_jax.config import FactorizerConfig
from srp_jax.errors import ConfigError
from srp_jax.factorizers import kernels as K
from srp_jax.factorizers.base import Architecture, BufferSpec, FactorizerOutput, Option, float_option


class ShiftedTopK(Architecture):
    """TopK of ReLU(xW + b - shift): a learned per-feature shift (an extra parameter with its
    own config key for its initial value), a training-batch counter (an int buffer) and a
    penalty on the shift's magnitude."""

    name = "toy_shifted_topk"
    uses_k = True
    at_most_k_active = True
    options = {"shift_init": Option(0.01, float_option(), "initial shift of every feature")}
    extra_params = {"shift": lambda cfg: cfg.shift_init}
    buffers = {"batches_seen": BufferSpec("int32", 0)}

    def encode(self, cfg, params, buffers, x, k):
        acts = jax.nn.relu(K.pre_activation(params, x) - params["shift"])
        return K.topk_mask(acts, cfg.resolve_k(k))

    def forward(self, cfg, params, buffers, x, k, train):
        code = self.encode(cfg, params, buffers, x, k)
        new_buffers = {"batches_seen": buffers["batches_seen"] + 1} if train else buffers
        aux = jnp.mean(jnp.abs(params["shift"]))
        return FactorizerOutput(K.decode(params, code), code, aux, None, K.active_count(code), new_buffers)

    def sparsity_penalty(self, training, terms, controller_coeff):
        return 1e-3 * terms.aux


@pytest.fixture
def toy():
    arch = F.register(ShiftedTopK())
    try:
        yield arch
    finally:
        F.unregister(arch.name)


def _config(tmp_path, steps=12):
    return {
        "run": {"name": "toy", "seed": 3, "output_dir": str(tmp_path / "run")},
        "data": {"fallback": "synthetic", "max_hidden": 64, "val_hidden": 32},
        "factorizer": {"architecture": "toy_shifted_topk", "d_features": 96, "k": 6, "shift_init": 0.002},
        "training": {"steps": steps, "batch_size": 32, "lambda_prism": 0.01, "log_every": 100, "checkpoint_every": 5},
        "evaluation": {"max_eval_rows": 256},
    }


def test_registry_lists_and_refuses(toy):
    assert F.architecture_names()[:6] == srp_jax.ARCHITECTURES
    assert F.architecture_names()[-1] == "toy_shifted_topk"
    assert F.get_architecture("toy_shifted_topk") is toy
    with pytest.raises(ConfigError, match="already registered"):
        F.register(ShiftedTopK())
    with pytest.raises(ConfigError, match="unknown factorizer architecture 'nope'.*toy_shifted_topk"):
        FactorizerConfig(architecture="nope")


def test_config_keys_belong_to_their_architecture(toy):
    cfg = FactorizerConfig.from_dict({"architecture": "toy_shifted_topk", "d_features": 8, "k": 2, "shift_init": 0.5})
    assert cfg.shift_init == 0.5 and cfg.native_k == 2
    assert cfg.to_dict() == {"architecture": "toy_shifted_topk", "d_features": 8, "encoder_init_scale": 0.02, "k": 2, "shift_init": 0.5}
    # another architecture's key is validated, then ignored: it cannot change a topk config
    plain = FactorizerConfig(architecture="topk", d_features=8, k=2)
    assert FactorizerConfig(architecture="topk", d_features=8, k=2, shift_init=9.0) == plain
    with pytest.raises(ConfigError, match="factorizer.shift_init must be a number"):
        FactorizerConfig(architecture="topk", d_features=8, shift_init="x")
    with pytest.raises(ConfigError, match="unknown key.*bogus"):
        FactorizerConfig.from_dict({"architecture": "toy_shifted_topk", "bogus": 1})
    assert hash(cfg) == hash(FactorizerConfig.from_dict(cfg.to_dict())) and pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg.replace(shift_init=0.25).shift_init == 0.25 and cfg.replace(k=3).k == 3


def test_builtin_options_validated_and_hashable():
    bt = FactorizerConfig(architecture="batch_topk", d_features=8, threshold_momentum=0.9)
    assert bt.threshold_momentum == 0.9 and bt.options == (("threshold_momentum", 0.9),)
    with pytest.raises(ConfigError, match="threshold_momentum must be <= 1.0"):
        FactorizerConfig(architecture="batch_topk", threshold_momentum=2)
    with pytest.raises(ConfigError, match="bandwidth must be > 0"):
        FactorizerConfig(architecture="jumprelu", bandwidth=0)
    mat = FactorizerConfig(architecture="matryoshka_topk", k_values=[4, 8], matryoshka_weights=[2, 1])
    assert mat.k_values == (4, 8) and mat.to_dict()["k_values"] == [4, 8]
    assert {mat: 1}[FactorizerConfig(architecture="matryoshka_topk", k_values=(4, 8), matryoshka_weights=(2.0, 1.0))] == 1
    # options of other architectures read as their defaults (the reference's attribute style)
    assert FactorizerConfig().bandwidth == 0.5 and FactorizerConfig().threshold_momentum == 0.995


def test_toy_architecture_end_to_end(toy, tmp_path):
    pytest.importorskip("torch")
    from convert.checkpoints import orbax_to_pt, pt_to_orbax
    from srp_jax.train import train

    metrics = train(_config(tmp_path), export_pt=True)
    run = tmp_path / "run"
    assert metrics["architecture"] == "toy_shifted_topk" and metrics["finite_metrics"] is True
    # Orbax checkpoint and the .pt export hold the architecture's own parameter and buffer
    sae = srp_jax.load_factorizer(run)
    # two training-mode forwards a step (the rows and the prism batch), as batch_topk's EMA sees
    assert set(sae.params) == {"encoder", "decoder", "shift"} and int(sae.buffers["batches_seen"]) == 24
    assert not np.allclose(np.asarray(sae.params["shift"]), 0.002)  # the shift was trained
    from srp_jax._lazy import read_pt

    pt = read_pt(run / "checkpoint.pt")
    assert list(pt["model_state_dict"]) == ["decoder", "shift", "batches_seen", "encoder.weight", "encoder.bias"]
    assert pt["model_state_dict"]["batches_seen"].dtype == np.int64
    # .pt -> srp-jax -> .pt, bit-exact
    pt_to_orbax(run / "checkpoint.pt", tmp_path / "orbax")
    orbax_to_pt(tmp_path / "orbax", tmp_path / "back.pt")
    back = read_pt(tmp_path / "back.pt")
    for key, value in pt["model_state_dict"].items():
        np.testing.assert_array_equal(back["model_state_dict"][key], value)
    again = srp_jax.load_factorizer(tmp_path / "back.pt")
    assert again.config == sae.config
    # evaluation (both modes) and decomposition through the registry
    W, hidden = srp_jax.make_synthetic_data(seed=3)
    readout = srp_jax.Readout.for_dictionary(W, again)
    held_out = np.asarray(hidden).reshape(-1, W.shape[1])[:40]
    ref = srp_jax.evaluate(again, readout, held_out, mode="reference")
    full = srp_jax.evaluate(again, readout, held_out, mode="full")
    assert ref["k"] == 6 and 0.0 < ref["row_centered_ev"] < 1.0 and full["eval_mode"] == "full"
    assert ref["identity_abs_error_max"] < 1e-3
    tokens = np.asarray(jnp.argmax(held_out @ np.asarray(W).T, axis=1))
    dec = srp_jax.decompose_tokens(held_out, tokens, readout, again, sparse=True)
    assert dec.feature_indices.shape == (40, 6)  # at_most_k_active: width k, exact
    np.testing.assert_allclose(np.asarray(dec.identity_error), 0.0, atol=2e-4)
    dense = srp_jax.decompose_tokens(held_out, tokens, readout, again)
    np.testing.assert_allclose(np.asarray(dec.feature_sum), np.asarray(dense.feature_sum), rtol=1e-5, atol=1e-5)
    e = srp_jax.explain(held_out[0], again, W_U=W, query_kind="selected_token", target=int(tokens[0]))
    assert e.scores["exact"] == pytest.approx(float(held_out[0] @ np.asarray(W)[tokens[0]]), rel=1e-5)
    # the generic Flax shell
    module = srp_jax.modules.module_from_config(again.config, again.d_model)
    assert type(module) is srp_jax.modules.Factorizer
    x = readout.rows_normalized[:5]
    code = module.apply({"params": again.params, "buffers": again.buffers}, x, method=module.encode)
    np.testing.assert_array_equal(np.asarray(code), np.asarray(again.encode(x)))
    fresh = module.init(jax.random.key(0), x)
    assert jax.tree.structure(fresh["params"]) == jax.tree.structure(again.params)
    assert float(fresh["params"]["shift"][0]) == pytest.approx(0.002)


def test_toy_architecture_resumes_bitwise(toy, tmp_path):
    """SIGTERM after step 5 saves and stops; rerunning ends bitwise equal (params and buffers)."""
    import os
    import signal

    from srp_jax.train import Progress, TrainingInterrupted, train

    class StopAtFive(Progress):
        def log(self, step, row):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns it into a flag

    train(_config(tmp_path / "full", steps=10))
    cfg = _config(tmp_path / "part", steps=10)
    cfg["training"]["log_every"] = 5
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 5"):
        train(cfg, progress=StopAtFive(10, enabled=False))
    train(cfg)
    a = srp_jax.load_factorizer(tmp_path / "full" / "run")
    b = srp_jax.load_factorizer(tmp_path / "part" / "run")
    assert int(b.buffers["batches_seen"]) == 20
    for x, y in zip(jax.tree.leaves((a.params, a.buffers)), jax.tree.leaves((b.params, b.buffers))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
