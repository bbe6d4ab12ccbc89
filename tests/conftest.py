"""Shared test helpers: reference fixtures and small random dictionaries of every architecture."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srp_jax.config import ARCHITECTURES, FactorizerConfig
from srp_jax.dictionary import Dictionary
from srp_jax import factorizers as F

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"


def reference_dir(arch: str) -> Path:
    return REFERENCE / arch


def load_npz(arch: str, name: str) -> dict[str, np.ndarray]:
    with np.load(reference_dir(arch) / name) as data:
        return {k: data[k] for k in data.files}


def load_json(arch: str, name: str):
    return json.loads((reference_dir(arch) / name).read_text())


def random_dictionary(arch: str, *, d: int = 24, D: int = 80, k: int = 6, seed: int = 0) -> Dictionary:
    """A random dictionary with non-trivial biases/thresholds so every branch is exercised."""
    cfg = FactorizerConfig(architecture=arch, d_features=D, k=k, k_values=(2, 4, 8) if arch == "matryoshka_topk" else ())
    key = jax.random.PRNGKey(seed)
    params, buffers = F.init_factorizer(key, cfg, d)
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 1), 3)
    params["encoder"]["kernel"] = params["encoder"]["kernel"] * 10.0
    params["encoder"]["bias"] = 0.05 * jax.random.normal(k1, (D,))
    if arch == "jumprelu":
        params["log_threshold"] = jnp.log(0.05 + 0.05 * jax.random.uniform(k2, (D,)))
    if arch == "gated":
        params["gate_bias"] = 0.05 * jax.random.normal(k2, (D,))
        params["log_r"] = 0.2 * jax.random.normal(k3, (D,))
    if arch == "batch_topk":
        buffers = {"activation_threshold": jnp.float32(0.1), "threshold_initialized": jnp.int32(1)}
    return Dictionary(config=cfg, params=params, buffers=buffers, d_model=d)


@pytest.fixture(params=ARCHITECTURES)
def any_dictionary(request) -> Dictionary:
    return random_dictionary(request.param)


def random_readout_inputs(d: int = 24, V: int = 50, B: int = 7, seed: int = 1):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(V, d)).astype(np.float32) + 0.3
    H = (3.0 * rng.normal(size=(B, d))).astype(np.float32)
    return W, H


# Tests compile in-process and must not depend on (or fill) the on-disk JAX compilation cache
# that short CLI commands turn on (srp_jax.compile.enable_persistent_cache).
import os as _os  # noqa: E402

_os.environ.setdefault("SRP_JAX_COMPILATION_CACHE", "0")
