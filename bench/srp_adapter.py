"""The srp-jax side of the benchmark: the one module that calls srp-jax.

Everything the benchmark (and ``tests/test_bench.py``) does with srp-jax goes through these
functions. It uses the public API the training loop uses: ``StepSpec.build`` (with
``training.step_strategy``), ``TrainData``, ``srp_jax.train.compiled.compile_training`` (the
jitted sampler and the donated ``train_step(state, batch)``), ``init_train_state``;
``srp_jax.decompose_token_logit``, ``srp_jax.decompose_tokens`` with the cached vocabulary
``srp_jax.code_table``, ``srp_jax.Readout`` and ``srp_jax.metrics.reconstruct_rows``.

Arrays come in the framework-free layout of :mod:`bench.common` (``synthetic_arrays``) and
parameters in the reference's state-dict layout (``encoder.weight`` (D, d), ``encoder.bias``,
``decoder``), so the torch side can hold identical values.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import srp_jax
from srp_jax.config import FactorizerConfig, TrainingConfig
from srp_jax.dictionary import Dictionary
from srp_jax.metrics import reconstruct_rows
from srp_jax.train.compiled import compile_training
from srp_jax._hostmem import trim_host_heap
from srp_jax.train.sampling import draw_rows
from srp_jax.train.state import init_train_state
from srp_jax.train.step import StepSpec, TrainData, make_optimizer

from .common import CODE_L2, LAMBDA_PRISM, LR, WEIGHT_DECAY, Shape

# srp-jax's train-step strategies (``training.step_strategy``): auto = the library's choice
# for the backend and shape (sparse on CPU for TopK at small k / D), dense, sparse.
STRATEGIES = ("auto", "dense", "sparse")
DEFAULT_STRATEGY = "auto"


def _check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown srp-jax step strategy {strategy!r}; this srp-jax offers {', '.join(STRATEGIES)}")
    return strategy


def configs(shape: Shape, *, prism: bool = True, lr: float = LR, weight_decay: float = WEIGHT_DECAY,
            lambda_prism: float = LAMBDA_PRISM, code_l2: float = CODE_L2, steps: int = 1_000_000,
            strategy: str = DEFAULT_STRATEGY):
    """(FactorizerConfig, TrainingConfig) of a plain TopK run of ``shape`` (constant lr and
    lambda, the shipped trainer's schedule) with train-step ``strategy``."""
    fcfg = FactorizerConfig(architecture="topk", d_features=shape.D, k=shape.k)
    tcfg = TrainingConfig(
        steps=steps, batch_size=shape.batch, lr=lr, weight_decay=weight_decay,
        lambda_prism=lambda_prism if prism else 0.0, code_l2=code_l2, step_strategy=_check_strategy(strategy),
    )
    return fcfg, tcfg


def train_data(arrays: dict[str, Any]) -> TrainData:
    """srp-jax's device arrays for the step, from :func:`bench.common.synthetic_arrays`-style arrays."""
    ds = SimpleNamespace(
        rows_normalized=arrays["rows_normalized"], W_U=arrays["W_U"], row_mean=arrays["row_mean"],
        row_norms=arrays["row_norms"], hidden_train=arrays["hidden"], top_targets=arrays["top_targets"],
    )
    return TrainData.from_dataset(ds, arrays["sample_weights"], prism_ranks=1)


def params_from_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Reference layout -> srp-jax params (kernel = encoder.weight^T)."""
    return {
        "encoder": {
            "kernel": jnp.asarray(np.asarray(state["encoder.weight"], np.float32).T),
            "bias": jnp.asarray(np.asarray(state["encoder.bias"], np.float32)),
        },
        "decoder": jnp.asarray(np.asarray(state["decoder"], np.float32)),
    }


def state_dict_from_params(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """srp-jax params -> reference layout (NumPy)."""
    return {
        "encoder.weight": np.asarray(params["encoder"]["kernel"]).T.copy(),
        "encoder.bias": np.asarray(params["encoder"]["bias"]).copy(),
        "decoder": np.asarray(params["decoder"]).copy(),
    }


@dataclasses.dataclass
class SrpTrainer:
    """A ready-to-run srp-jax training step: ``spec`` (static; ``spec.strategy`` the resolved
    dense / sparse choice), ``data``, ``state``, ``fns`` (the compiled sampler and step).

    ``step()`` draws the batch and runs one update, as the training loop does (which also
    returns the compiler's freed heap to the OS after its first step), and returns only when
    it is done (metrics as floats).
    """

    spec: StepSpec
    data: TrainData
    state: Any
    fns: Any
    strategy: str = DEFAULT_STRATEGY
    _stepped: bool = dataclasses.field(default=False, repr=False)

    def step(self) -> dict[str, float]:
        # the update number as a host int, as the training loop passes it (the state is ready:
        # the previous call waited for it, so reading its step costs no wait)
        batch = self.fns.sample(self.data, self.state.rng, int(np.asarray(self.state.step)) + 1)
        self.state, metrics = self.fns.step(self.state, batch)
        jax.block_until_ready((self.state, metrics))
        if not self._stepped:  # as the training loop does after its first (compiling) step
            trim_host_heap()
            self._stepped = True
        # each metric read as a NumPy view of the host buffer (jax.device_get costs ~0.1 ms more)
        return {name: float(np.asarray(metrics[name])) for name in ("loss", "reconstruction_loss", "prism_loss")}

    @property
    def params(self) -> dict[str, Any]:
        return self.state.params


def make_step(shape: Shape, arrays: dict[str, Any], *, strategy: str = DEFAULT_STRATEGY, prism: bool = True,
              seed: int = 0, init_state: dict[str, Any] | None = None, **hyper: Any) -> SrpTrainer:
    """Build srp-jax's train step for ``shape`` on ``arrays``; ``init_state`` (reference layout)
    replaces the random initial parameters (the optimizer state is built for them)."""
    fcfg, tcfg = configs(shape, prism=prism, strategy=strategy, **hyper)
    spec = StepSpec.build(fcfg, tcfg, shape.d, int(np.shape(arrays["hidden"])[0]))
    optimizer = make_optimizer(tcfg)
    state = init_train_state(seed, fcfg, tcfg, shape.d, optimizer)
    if init_state is not None:
        params = params_from_state_dict(init_state)
        state = state.replace(params=params, opt_state=optimizer.init(params))
    return SrpTrainer(spec, train_data(arrays), state, compile_training(spec, optimizer), strategy)


def replay_indices(trainer: SrpTrainer, step: int | None = None) -> dict[str, np.ndarray]:
    """The draws srp-jax's step number ``step`` (1-based; default: the next one) makes:
    ``rows`` (B,), ``hidden`` (Bp,), ``ranks`` (Bp,). Mirrors ``srp_jax.train.sampling``'s key
    use (fold_in(rng, step) -> split -> the configured row sampler; the prism key split ->
    randint), so a torch step can be fed the same batch."""
    spec, data, state = trainer.spec, trainer.data, trainer.state
    t = int(state.step) + 1 if step is None else int(step)
    key = jax.random.fold_in(state.rng, t)
    k_rows, k_prism = jax.random.split(key)
    rows = draw_rows(data, k_rows, spec.training.batch_size, spec.training.row_sampler)
    k_h, k_r = jax.random.split(k_prism)
    n_hidden, n_ranks = data.top_targets.shape
    hidden = jax.random.randint(k_h, (spec.prism_batch,), 0, n_hidden)
    ranks = jax.random.randint(k_r, (spec.prism_batch,), 0, n_ranks)
    return {"rows": np.asarray(rows), "hidden": np.asarray(hidden), "ranks": np.asarray(ranks)}


# --------------------------------------------------------------------------------------------
# Decomposition and reconstruction


def make_dictionary(state: dict[str, Any], k: int) -> Dictionary:
    """An eval-mode TopK :class:`srp_jax.Dictionary` holding reference-layout parameters."""
    D, d = np.shape(state["decoder"])
    cfg = FactorizerConfig(architecture="topk", d_features=int(D), k=int(k))
    return Dictionary(config=cfg, params=params_from_state_dict(state), buffers={}, d_model=int(d))


def make_readout(arrays: dict[str, Any]) -> srp_jax.Readout:
    """The readout prepared once (all rows, the arrays' row mean)."""
    return srp_jax.Readout.from_weights(arrays["W_U"], row_mean=arrays["row_mean"])


def decompose_per_query(dictionary: Dictionary, arrays: dict[str, Any], h: np.ndarray, token: int) -> tuple[float, float]:
    """One reference-style call ``srp_jax.decompose_token_logit``; returns (feature_sum, residual)."""
    out = srp_jax.decompose_token_logit(
        h=h, W_row=arrays["W_U"][token], row_mean=arrays["row_mean"], row_norm=arrays["row_norms"][token],
        row_normalized=arrays["rows_normalized"][token], model=dictionary, k=dictionary.config.k,
    )
    return float(out.feature_sum), float(out.residual_term)


def decompose_batched(dictionary: Dictionary, readout: srp_jax.Readout, H: Any, token_ids: Any, *,
                      sparse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``srp_jax.decompose_tokens`` over a batch (one jitted call); returns (feature_sum (B,),
    residual (B,)) as NumPy, i.e. after the work is done. ``sparse=True`` reads the tokens'
    codes from the vocabulary's :class:`srp_jax.CodeTable` (``srp_jax.code_table``: built by
    the first call, which the harness reports as warm-up, then reused)."""
    codes = srp_jax.code_table(dictionary, readout, dictionary.config.k) if sparse else None
    out = srp_jax.decompose_tokens(H, token_ids, readout, dictionary, dictionary.config.k, sparse=sparse, codes=codes)
    jax.block_until_ready(out)
    return np.asarray(out.feature_sum), np.asarray(out.residual_term)


def code_table_seconds(dictionary: Dictionary, readout: srp_jax.Readout) -> float:
    """Seconds to build the vocabulary's :class:`srp_jax.CodeTable` once (after compilation)."""
    import time

    srp_jax.decompose.build_code_table(dictionary, readout, dictionary.config.k).values.block_until_ready()
    t0 = time.perf_counter()
    srp_jax.decompose.build_code_table(dictionary, readout, dictionary.config.k).values.block_until_ready()
    return time.perf_counter() - t0


def reconstruct_all(dictionary: Dictionary, arrays: dict[str, Any], row_batch: int | None = None) -> jax.Array:
    """Encode + decode every row (``srp_jax.metrics.reconstruct_rows``, blocks of ``row_batch``
    rows, None: the library's choice for the backend; the sparse encode and the k-row decode
    for TopK); returns the normalized-row reconstruction (V, d) once it is computed."""
    recon_x, recon_W, _, _ = reconstruct_rows(
        dictionary, arrays["rows_normalized"], arrays["row_mean"], arrays["row_norms"], dictionary.config.k,
        row_batch=row_batch,
    )
    jax.block_until_ready((recon_x, recon_W))
    return recon_x


def matmul_seconds(n: int, repeats: int = 3) -> list[float]:
    """Seconds of a jitted float32 (n x n) @ (n x n) (HIGHEST precision, as srp-jax runs its
    matmuls), after one warm-up."""
    import time

    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f(a, b).block_until_ready()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        out.append(time.perf_counter() - t0)
    return out


def versions() -> dict[str, str]:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "srp_jax": srp_jax.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": str(jax.devices())}


__all__ = [
    "STRATEGIES",
    "DEFAULT_STRATEGY",
    "configs",
    "train_data",
    "params_from_state_dict",
    "state_dict_from_params",
    "SrpTrainer",
    "make_step",
    "replay_indices",
    "make_dictionary",
    "make_readout",
    "decompose_per_query",
    "decompose_batched",
    "code_table_seconds",
    "reconstruct_all",
    "matmul_seconds",
]
