"""The one pure training step: ``train_step(state, batch) -> (state, metrics)``.

``make_train_step(spec)`` builds it for a static :class:`StepSpec` (the optimizer is built
there, once); :mod:`srp_jax.train.sampling` draws the batch outside it and
:func:`srp_jax.compile.compile_step` jits it with the state donated. Per step (the shipped
reference's order, training-and-checkpoints.md §1.3-1.6):

1. (sampling) B row positions i.i.d. from the row-sampling distribution, x = rows_normalized[idx],
   and the prism batch;
2. reconstruction MSE (matryoshka: weighted over k_values) via ``factorizers.reconstruction_loss``
   (``spec.strategy == "sparse"``: ``factorizers.sparse_reconstruction_loss``, the same loss
   and gradients through the k active latents per row only; see below);
3. the L0 controller update (jumprelu / l1_relu, when enabled) from this step's measured L0;
4. loss = rec + sparsity terms + lambda_t * prism + code_l2 * mean(z^2) [+ auxk_coeff * AuxK];
5. gradients -> global-norm clip at 1.0 -> AdamW (optax; torch's decoupled lr*wd decay on every
   parameter);
6. decoder rows renormalised to unit norm (every architecture except jumprelu).

Every random draw comes from ``fold_in(state.rng, step)`` (in the sampler): a run resumed at
any step replays exactly the draws an uninterrupted run makes, so the final parameters are
bitwise equal.

Strategies (``training.step_strategy``, resolved once in :meth:`StepSpec.build` by
:func:`srp_jax.compile.resolve_step_strategy`): ``dense`` computes the codes as (B, D) arrays
and differentiates dense products; ``sparse`` (TopK family) keeps each code as its k (value,
index) pairs (:mod:`srp_jax.factorizers.sparse`): the encoder forward is the one dense
product, the decode, the reconstruction error, the prism term's h . x_hat and every gradient
touch only the k selected decoder rows / encoder columns per example. Both give the same loss
and gradients up to float summation order (tests/test_sparse_step.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .. import factorizers as F
from ..factorizers import sparse as S
from ..compile import compiled, resolve_step_strategy
from ..config import FactorizerConfig, TrainingConfig
from ..errors import ConfigError
from ..readout import denormalize_rows
from .sampling import Batch, PrismBatch, TrainData, sample_batch, sample_prism_batch, sample_row_indices
from .schedules import learning_rate, optax_lr_schedule, prism_weight
from .state import TrainState, controller_coeff_max

CLIP_NORM = 1.0
PRISM_DENOM_EPS = 1e-5
L0_TRAIN_WINDOW = 1000
# bit i of metrics["nonfinite"] says NONFINITE_TERMS[i] went NaN/Inf at that step
NONFINITE_TERMS = ("reconstruction", "prism", "sparsity", "auxk", "loss", "grad", "parameters")


def nonfinite_flags(values: dict[str, Any]) -> jax.Array:
    """An int32 bitmask over :data:`NONFINITE_TERMS`: bit i set when ``values[name]`` (a scalar
    or a pytree) holds a NaN/Inf. One fused reduction per term, returned with the metrics so the
    host reads it at its own cadence (no extra device sync per step)."""
    mask = jnp.zeros((), jnp.int32)
    for bit, name in enumerate(NONFINITE_TERMS):
        leaves = jax.tree.leaves(values[name])
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else True
        mask = mask | jnp.where(finite, 0, 1 << bit).astype(jnp.int32)
    return mask


def describe_nonfinite(mask: int) -> tuple[str, ...]:
    """The names of the terms set in a :func:`nonfinite_flags` mask (in the loss's order)."""
    return tuple(name for bit, name in enumerate(NONFINITE_TERMS) if int(mask) >> bit & 1)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static (hashable) description of a step. ``k`` the training k; ``prism_batch`` =
    min(B, n_hidden_train) (0 = no hidden states: no prism term); ``prism_ranks`` P =
    max(1, min(prism_top_n, 8)); ``auxk_k`` the AuxK budget (default d_model // 2);
    ``strategy`` ``"dense"`` or ``"sparse"`` (``training.step_strategy`` resolved for this
    architecture and backend)."""

    factorizer: FactorizerConfig
    training: TrainingConfig
    d_model: int
    k: int
    prism_batch: int
    prism_ranks: int
    auxk_k: int
    strategy: str = "dense"

    @classmethod
    def build(
        cls,
        factorizer: FactorizerConfig,
        training: TrainingConfig,
        d_model: int,
        n_hidden: int,
        n_targets: int = 8,
        *,
        sharded: bool = False,
        backend: str | None = None,
    ):
        """Resolve the static step description (``sharded``: the step runs on a device mesh,
        which keeps the dense strategy; ``backend`` defaults to ``jax.default_backend()``)."""
        if training.auxk_coeff > 0 and not factorizer.arch.uses_k:
            raise ConfigError(
                "training.auxk_coeff > 0 needs an architecture with a k budget (topk, matryoshka_topk, "
                f"batch_topk), got {factorizer.architecture!r}"
            )
        ranks = max(1, min(training.prism_top_n, n_targets))
        auxk_k = training.auxk_k if training.auxk_k is not None else max(1, int(d_model) // 2)
        return cls(
            factorizer=factorizer,
            training=training,
            d_model=int(d_model),
            k=factorizer.resolve_k(factorizer.k),
            prism_batch=min(training.batch_size, int(n_hidden)),
            prism_ranks=ranks,
            auxk_k=min(int(auxk_k), factorizer.d_features),
            strategy=resolve_step_strategy(
                training.step_strategy,
                sparse_supported=F.sparse_step_available(factorizer, factorizer.k),
                sparse_fraction=F.sparse_work_fraction(factorizer, factorizer.k),
                backend=backend,
                sharded=sharded,
                what=f"architecture {factorizer.architecture!r} (k {factorizer.resolve_k(factorizer.k)}, D {factorizer.d_features})",
            ),
        )

    @property
    def prism_on(self) -> bool:
        return self.prism_batch > 0 and self.training.lambda_prism > 0

    @property
    def controller_on(self) -> bool:
        return self.training.l0_controller.enabled and self.factorizer.arch.l0_controller


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``'s clip (g <- g * max_norm / ||g|| when ||g|| >= max_norm,
    the global L2 norm over every leaf) applied as one scalar factor per step, as torch's
    ``clip_grad_norm_`` does.

    optax divides every element by the norm (``t / norm * max_norm``); XLA will not copy an
    elementwise divide into the two Adam moments that read the clipped gradient, so it writes
    the clipped gradient out as a fresh (D, d) array per matrix, on CPU mostly first-touch page
    faults (about 15 % of a SmolLM2 b1024 step; docs/performance.md). A multiply by a scalar
    fuses into both. Equal to optax's up to one rounding per element."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(training: TrainingConfig) -> optax.GradientTransformation:
    """Global-norm clip at 1.0 (:func:`clip_by_global_norm`), then AdamW (b1 0.9, b2 0.999,
    eps 1e-8, decay on all params).

    optax's ``adamw`` adds ``weight_decay * p`` to the Adam direction before scaling by ``-lr``,
    i.e. p <- p - lr*(adam + wd*p), which is torch's p <- p(1 - lr*wd) - lr*adam.
    """
    return optax.chain(
        clip_by_global_norm(CLIP_NORM),
        optax.adamw(optax_lr_schedule(training), b1=0.9, b2=0.999, eps=1e-8, weight_decay=training.weight_decay),
    )


def prism_loss(
    fcfg: FactorizerConfig, params: F.Params, buffers: F.Buffers, prism: PrismBatch, k: int
) -> tuple[jax.Array, F.Buffers]:
    """The prism penalty: mean_j [h_j . r_t / max(|h_j . w_t|, 1e-5)]^2.

    r_t = w_t - (row_mean + a_t * xhat_t), xhat_t the current (training-mode) reconstruction
    of the target's normalized row. Returns (loss, buffers).
    """
    out = F.forward(fcfg, params, buffers, prism.x, k, train=True)
    recon_w = denormalize_rows(out.reconstruction, prism.row_mean, prism.a)
    residual = jnp.sum(prism.h * (prism.w - recon_w), axis=-1)
    original = jnp.maximum(jnp.abs(jnp.sum(prism.h * prism.w, axis=-1)), PRISM_DENOM_EPS)
    return jnp.mean(jnp.square(residual / original)), out.buffers


def sparse_prism_loss(
    fcfg: FactorizerConfig, params: F.Params, buffers: F.Buffers, prism: PrismBatch, k: int
) -> tuple[jax.Array, F.Buffers]:
    """:func:`prism_loss` through the sparse kernels: h . r_t = h . w_t - h . row_mean -
    a_t (h . x_hat_t), with h . x_hat_t from the k active decoder rows (no (Bp, d) decode)."""
    code, buffers = F.sparse_encode(fcfg, params, buffers, prism.x, k, train=True)
    h_xhat = S.probe_dots(params["decoder"], code, prism.h)
    residual = jnp.sum(prism.h * (prism.w - prism.row_mean), axis=-1) - prism.a * h_xhat
    original = jnp.maximum(jnp.abs(jnp.sum(prism.h * prism.w, axis=-1)), PRISM_DENOM_EPS)
    return jnp.mean(jnp.square(residual / original)), buffers


def selected_prism_loss(
    fcfg: FactorizerConfig,
    params: F.Params,
    buffers: F.Buffers,
    data: TrainData,
    key: jax.Array,
    batch: int,
    k: int,
) -> tuple[jax.Array, F.Buffers]:
    """:func:`prism_loss` on a prism batch drawn from ``data`` with ``key`` (see
    :func:`srp_jax.train.sampling.sample_prism_batch`)."""
    return prism_loss(fcfg, params, buffers, sample_prism_batch(key, data, batch), k)


def controller_update(spec: StepSpec, controller: dict, step_l0: jax.Array, step: jax.Array) -> dict:
    """One L0-controller update (after this step's L0 is measured, before the loss uses it).

    EMA (first value copied); after ``warmup_steps``, on steps divisible by ``control_period``
    and with target > 0: coeff *= exp(kp * clip((ema - target)/target, +-err_clip)), clamped.
    """
    c = spec.training.l0_controller
    ema = jnp.where(controller["l0_ema_init"] == 0, step_l0, c.ema * controller["l0_ema"] + (1.0 - c.ema) * step_l0)
    coeff = controller["coeff"]
    if c.target_l0 > 0:
        rel = jnp.clip((ema - c.target_l0) / c.target_l0, -c.err_clip, c.err_clip)
        updated = jnp.clip(
            coeff * jnp.exp(c.kp * rel), c.coeff_min, controller_coeff_max(spec.factorizer, spec.training)
        )
        active = (step > c.warmup_steps) & (step % c.control_period == 0)
        coeff = jnp.where(active, updated, coeff)
    return {"coeff": coeff.astype(jnp.float32), "l0_ema": ema.astype(jnp.float32), "l0_ema_init": jnp.ones((), jnp.int32)}


def auxk_loss(params: F.Params, x: jax.Array, recon: jax.Array, dead: jax.Array, auxk_k: int) -> jax.Array:
    """AuxK (Gao et al. 2024): reconstruct the residual e = x - xhat (no gradient into xhat)
    from the top-``auxk_k`` ReLU pre-activations among dead latents; MSE normalised by the
    residual's variance around its batch mean. 0 when no latent is dead."""
    acts = jax.nn.relu(F.pre_activation(params, x))
    acts = jnp.where(dead[None, :], acts, 0.0)
    e = jax.lax.stop_gradient(x - recon)
    e_hat = F.decode(params, F.topk_mask(acts, auxk_k))
    denom = jnp.maximum(jnp.mean(jnp.square(e - jnp.mean(e, axis=0, keepdims=True))), 1e-12)
    return jnp.where(jnp.any(dead), jnp.mean(jnp.square(e_hat - e)) / denom, 0.0)


def sparse_auxk_loss(
    params: F.Params, x: jax.Array, code: S.SparseCode, dead: jax.Array, auxk_k: int
) -> jax.Array:
    """:func:`auxk_loss` through the sparse kernels (``code`` the step's sparse code of x)."""
    e = jax.lax.stop_gradient(x - S.decode_code(params, code))
    aux = S.topk_codes(params, x, auxk_k, mask=dead)
    err = jnp.sum(S.squared_errors(params["decoder"], aux, e, (auxk_k,))) / x.size
    denom = jnp.maximum(jnp.mean(jnp.square(e - jnp.mean(e, axis=0, keepdims=True))), 1e-12)
    return jnp.where(jnp.any(dead), err / denom, 0.0)


def make_loss_fn(spec: StepSpec):
    """The step's differentiable objective ``loss_fn(params, state, batch) -> (loss, extras)``
    (extras: the loss terms, this step's L0, the controller and buffers after it, and the
    (D,) mask of latents that fired), for ``spec.strategy``."""
    fcfg, tcfg = spec.factorizer, spec.training
    arch = fcfg.arch
    sparse = spec.strategy == "sparse"
    D = fcfg.d_features

    def loss_fn(params: F.Params, state: TrainState, batch: Batch) -> tuple[jax.Array, dict]:
        step = state.step + 1
        x = batch.x
        lam = prism_weight(tcfg, step)
        dead = state.since_fired >= tcfg.auxk_dead_steps
        zero = jnp.zeros((), jnp.float32)
        if sparse:
            terms = F.sparse_reconstruction_loss(fcfg, params, state.buffers, x, spec.k, train=True)
            stats = S.code_stats(terms.code, D)
        else:
            terms = F.reconstruction_loss(fcfg, params, state.buffers, x, spec.k, train=True)
            stats = S.dense_code_stats(terms.code)
        code = terms.code
        step_l0 = jax.lax.stop_gradient(stats.l0)
        controller = state.controller
        if spec.controller_on:
            controller = controller_update(spec, controller, step_l0, step)
        loss = terms.rec
        penalty = arch.sparsity_penalty(tcfg, terms, controller["coeff"] if spec.controller_on else None)
        if penalty is not None:
            loss = loss + penalty
        sparsity = (terms.aux, zero if penalty is None else penalty)
        buffers = terms.buffers
        prism = zero
        if spec.prism_on and batch.prism is not None:
            prism, buffers = (sparse_prism_loss if sparse else prism_loss)(fcfg, params, buffers, batch.prism, spec.k)
            loss = loss + lam * prism
        if tcfg.code_l2 > 0:
            l2 = stats.sum_sq / (x.shape[0] * D) if sparse else jnp.mean(jnp.square(code))
            loss = loss + tcfg.code_l2 * l2
        aux_k = zero
        if tcfg.auxk_coeff > 0:
            if sparse:
                aux_k = sparse_auxk_loss(params, x, code, dead, spec.auxk_k)
            else:
                aux_k = auxk_loss(params, x, F.decode(params, code), dead, spec.auxk_k)
            loss = loss + tcfg.auxk_coeff * aux_k
        extras = {
            "rec": terms.rec, "prism": prism, "aux": terms.aux, "auxk": aux_k, "step_l0": step_l0, "sparsity": sparsity,
            "controller": controller, "buffers": buffers, "fired": stats.fired,
        }
        return loss, extras

    return loss_fn


def make_train_step(spec: StepSpec, optimizer: optax.GradientTransformation | None = None):
    """The pure update ``train_step(state, batch) -> (state, metrics)`` for ``spec``.

    ``optimizer`` defaults to :func:`make_optimizer` (built here, once); the state's
    ``opt_state`` must come from the same optimizer. ``batch`` is a
    :class:`~srp_jax.train.sampling.Batch` from :func:`sample_batch_for`.
    """
    fcfg, tcfg = spec.factorizer, spec.training
    arch = fcfg.arch
    optimizer = make_optimizer(tcfg) if optimizer is None else optimizer
    loss_fn = make_loss_fn(spec)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        step = state.step + 1
        lam = prism_weight(tcfg, step)
        (loss, ex), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if arch.renormalize_decoder:
            params = F.normalize_decoder(params)
        since_fired = jnp.where(ex["fired"], 0, state.since_fired + 1).astype(jnp.int32)
        in_window = step >= tcfg.steps - L0_TRAIN_WINDOW
        new_state = state.replace(
            params=params,
            opt_state=opt_state,
            buffers=ex["buffers"],
            step=step.astype(jnp.int32),
            controller=ex["controller"],
            since_fired=since_fired,
            l0_sum=state.l0_sum + jnp.where(in_window, ex["step_l0"], 0.0),
            l0_count=state.l0_count + in_window.astype(jnp.int32),
        )
        grad_norm = optax.tree.norm(grads)
        nonfinite = nonfinite_flags({
            "reconstruction": ex["rec"], "prism": ex["prism"], "sparsity": ex["sparsity"], "auxk": ex["auxk"],
            "loss": loss, "grad": grad_norm, "parameters": params,
        })  # fmt: skip
        metrics = {
            "nonfinite": nonfinite,
            "loss": loss,
            "reconstruction_loss": ex["rec"],
            "prism_loss": ex["prism"],
            "aux_loss": ex["aux"],
            "auxk_loss": ex["auxk"],
            "mean_l0": ex["step_l0"],
            "lr": learning_rate(tcfg, step),
            "lambda_prism": lam,
            "grad_norm": grad_norm,
            "dead_fraction": jnp.mean((since_fired >= tcfg.auxk_dead_steps).astype(jnp.float32)),
            "l0_coeff": ex["controller"]["coeff"],
        }
        return new_state, metrics

    return train_step


def sample_batch_for(spec: StepSpec, data: TrainData, rng: jax.Array, step: Any) -> Batch:
    """The batch of update ``step`` for ``spec`` (no prism batch when the prism term is off)."""
    return sample_batch(
        data, rng, step, batch_size=spec.training.batch_size, prism_batch=spec.prism_batch if spec.prism_on else 0,
        row_sampler=spec.training.row_sampler,
    )


def train_step(spec: StepSpec, state: TrainState, data: TrainData) -> tuple[TrainState, dict]:
    """Sample the next batch from ``data`` and apply one update (the composed form of
    :func:`sample_batch_for` and :func:`make_train_step`; kept for callers of the old API)."""
    return make_train_step(spec)(state, sample_batch_for(spec, data, state.rng, state.step + 1))


train_step_jit = compiled(train_step, static_argnums=0)  # no donation: callers keep their state


__all__ = [
    "NONFINITE_TERMS",
    "nonfinite_flags",
    "describe_nonfinite",
    "StepSpec",
    "TrainData",
    "Batch",
    "PrismBatch",
    "make_optimizer",
    "make_train_step",
    "make_loss_fn",
    "sample_batch_for",
    "prism_loss",
    "sparse_prism_loss",
    "sparse_auxk_loss",
    "selected_prism_loss",
    "sample_row_indices",
    "controller_update",
    "auxk_loss",
    "train_step",
    "train_step_jit",
]
