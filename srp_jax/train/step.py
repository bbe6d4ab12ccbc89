"""The one pure training step (jitted with a static :class:`StepSpec`).

Per step (the shipped reference's order, training-and-checkpoints.md §1.3-1.6):

1. draw B row positions i.i.d. from the row-sampling distribution, x = rows_normalized[idx];
2. reconstruction MSE (matryoshka: weighted over k_values) via ``factorizers.reconstruction_loss``;
3. the L0 controller update (jumprelu / l1_relu, when enabled) from this step's measured L0;
4. loss = rec + sparsity terms + lambda_t * prism + code_l2 * mean(z^2) [+ auxk_coeff * AuxK];
5. gradients -> global-norm clip at 1.0 -> AdamW (optax; torch's decoupled lr*wd decay on every
   parameter);
6. decoder rows renormalised to unit norm (every architecture except jumprelu).

Every random draw comes from ``fold_in(state.rng, step)``: a run resumed at any step replays
exactly the draws an uninterrupted run makes, so the final parameters are bitwise equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import factorizers as F
from ..config import K_ARCHITECTURES, FactorizerConfig, TrainingConfig
from ..errors import ConfigError
from .schedules import learning_rate, optax_lr_schedule, prism_weight
from .state import TrainState, controller_coeff_max

CLIP_NORM = 1.0
PRISM_DENOM_EPS = 1e-5
L0_TRAIN_WINDOW = 1000


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static (hashable) description of a step. ``k`` the training k; ``prism_batch`` =
    min(B, n_hidden_train) (0 = no hidden states: no prism term); ``prism_ranks`` P =
    max(1, min(prism_top_n, 8)); ``auxk_k`` the AuxK budget (default d_model // 2)."""

    factorizer: FactorizerConfig
    training: TrainingConfig
    d_model: int
    k: int
    prism_batch: int
    prism_ranks: int
    auxk_k: int

    @classmethod
    def build(cls, factorizer: FactorizerConfig, training: TrainingConfig, d_model: int, n_hidden: int, n_targets: int = 8):
        if training.auxk_coeff > 0 and factorizer.architecture not in K_ARCHITECTURES:
            raise ConfigError(
                f"training.auxk_coeff > 0 needs a TopK-family architecture ({', '.join(K_ARCHITECTURES)}), "
                f"got {factorizer.architecture!r}"
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
        )

    @property
    def prism_on(self) -> bool:
        return self.prism_batch > 0 and self.training.lambda_prism > 0

    @property
    def controller_on(self) -> bool:
        return self.training.l0_controller.enabled and self.factorizer.architecture in ("jumprelu", "l1_relu")


@flax.struct.dataclass
class TrainData:
    """Device arrays the step reads: ``rows_normalized`` (V, d), ``W_U`` (V, d) raw kept rows,
    ``row_mean`` (d,), ``row_norms`` (V,), ``hidden`` (N, d) train hidden states,
    ``top_targets`` (N, P) int32 row positions, ``sample_logits`` (V,) log sampling weights."""

    rows_normalized: jax.Array
    W_U: jax.Array
    row_mean: jax.Array
    row_norms: jax.Array
    hidden: jax.Array
    top_targets: jax.Array
    sample_logits: jax.Array

    @classmethod
    def from_dataset(cls, dataset: Any, sample_weights: Any, prism_ranks: int = 1) -> TrainData:
        targets = np.asarray(dataset.top_targets)
        targets = targets[:, : max(1, min(prism_ranks, targets.shape[1] if targets.ndim == 2 else 1))]
        w = np.asarray(sample_weights, np.float64)
        return cls(
            rows_normalized=jnp.asarray(dataset.rows_normalized, jnp.float32),
            W_U=jnp.asarray(dataset.W_U, jnp.float32),
            row_mean=jnp.asarray(dataset.row_mean, jnp.float32),
            row_norms=jnp.asarray(dataset.row_norms, jnp.float32),
            hidden=jnp.asarray(dataset.hidden_train, jnp.float32),
            top_targets=jnp.asarray(targets, jnp.int32),
            sample_logits=jnp.asarray(np.log(np.maximum(w, 1e-300)), jnp.float32),
        )


def make_optimizer(training: TrainingConfig) -> optax.GradientTransformation:
    """Global-norm clip at 1.0, then AdamW (b1 0.9, b2 0.999, eps 1e-8, decay on all params).

    optax's ``adamw`` adds ``weight_decay * p`` to the Adam direction before scaling by ``-lr``,
    i.e. p <- p - lr*(adam + wd*p), which is torch's p <- p(1 - lr*wd) - lr*adam.
    """
    return optax.chain(
        optax.clip_by_global_norm(CLIP_NORM),
        optax.adamw(optax_lr_schedule(training), b1=0.9, b2=0.999, eps=1e-8, weight_decay=training.weight_decay),
    )


def sample_row_indices(key: jax.Array, sample_logits: jax.Array, batch: int) -> jax.Array:
    """B row positions drawn i.i.d. with replacement from softmax(sample_logits) (= the weights)."""
    return jax.random.categorical(key, sample_logits, shape=(batch,))


def selected_prism_loss(
    fcfg: FactorizerConfig,
    params: F.Params,
    buffers: F.Buffers,
    data: TrainData,
    key: jax.Array,
    batch: int,
    k: int,
) -> tuple[jax.Array, F.Buffers]:
    """The prism penalty: mean_j [h_j . r_t / max(|h_j . w_t|, 1e-5)]^2.

    h_j uniform (with replacement) over the train hidden states, t = top_targets[h_j, rank_j]
    with rank_j uniform in [0, P); r_t = w_t - (row_mean + row_norms[t] * xhat_t) with xhat_t
    the current (training-mode) reconstruction of rows_normalized[t]. Returns (loss, buffers).
    """
    k_h, k_r = jax.random.split(key)
    n_hidden, n_ranks = data.top_targets.shape
    h_idx = jax.random.randint(k_h, (batch,), 0, n_hidden)
    rank = jax.random.randint(k_r, (batch,), 0, n_ranks)
    tok = data.top_targets[h_idx, rank]
    out = F.forward(fcfg, params, buffers, data.rows_normalized[tok], k, train=True)
    recon_w = data.row_mean[None, :] + data.row_norms[tok][:, None] * out.reconstruction
    w = data.W_U[tok]
    h = data.hidden[h_idx]
    residual = jnp.sum(h * (w - recon_w), axis=-1)
    original = jnp.maximum(jnp.abs(jnp.sum(h * w, axis=-1)), PRISM_DENOM_EPS)
    return jnp.mean(jnp.square(residual / original)), out.buffers


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


def train_step(spec: StepSpec, state: TrainState, data: TrainData) -> tuple[TrainState, dict]:
    """One update. Pure: (state, data) -> (new state, scalar metrics)."""
    fcfg, tcfg = spec.factorizer, spec.training
    arch = fcfg.architecture
    step = state.step + 1
    key = jax.random.fold_in(state.rng, step)
    k_rows, k_prism = jax.random.split(key)
    idx = sample_row_indices(k_rows, data.sample_logits, tcfg.batch_size)
    x = data.rows_normalized[idx]
    lam = prism_weight(tcfg, step)
    dead = state.since_fired >= tcfg.auxk_dead_steps
    zero = jnp.zeros((), jnp.float32)

    def loss_fn(params):
        terms = F.reconstruction_loss(fcfg, params, state.buffers, x, spec.k, train=True)
        code = terms.code
        step_l0 = jax.lax.stop_gradient(jnp.mean(jnp.sum((code > 0).astype(jnp.float32), axis=-1)))
        controller = state.controller
        if spec.controller_on:
            controller = controller_update(spec, controller, step_l0, step)
        loss = terms.rec
        if arch == "jumprelu":
            loss = loss + (controller["coeff"] if spec.controller_on else tcfg.l0_coeff) * terms.aux
        elif arch == "l1_relu":
            loss = loss + (controller["coeff"] if spec.controller_on else tcfg.l1_coeff) * terms.aux
        elif arch == "gated":
            loss = loss + tcfg.gate_l1_coeff * terms.aux + tcfg.gated_aux_coeff * terms.aux_recon_mse
        buffers = terms.buffers
        prism = zero
        if spec.prism_on:
            prism, buffers = selected_prism_loss(fcfg, params, buffers, data, k_prism, spec.prism_batch, spec.k)
            loss = loss + lam * prism
        if tcfg.code_l2 > 0:
            loss = loss + tcfg.code_l2 * jnp.mean(jnp.square(code))
        aux_k = zero
        if tcfg.auxk_coeff > 0:
            aux_k = auxk_loss(params, x, F.decode(params, code), dead, spec.auxk_k)
            loss = loss + tcfg.auxk_coeff * aux_k
        fired = jnp.any(code > 0, axis=0)
        extras = {
            "rec": terms.rec, "prism": prism, "aux": terms.aux, "auxk": aux_k, "step_l0": step_l0,
            "controller": controller, "buffers": buffers, "fired": fired,
        }
        return loss, extras

    (loss, ex), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    optimizer = make_optimizer(tcfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if arch != "jumprelu":
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
    metrics = {
        "loss": loss,
        "reconstruction_loss": ex["rec"],
        "prism_loss": ex["prism"],
        "aux_loss": ex["aux"],
        "auxk_loss": ex["auxk"],
        "mean_l0": ex["step_l0"],
        "lr": learning_rate(tcfg, step),
        "lambda_prism": lam,
        "grad_norm": optax.tree.norm(grads),
        "dead_fraction": jnp.mean((since_fired >= tcfg.auxk_dead_steps).astype(jnp.float32)),
        "l0_coeff": ex["controller"]["coeff"],
    }
    return new_state, metrics


train_step_jit = jax.jit(train_step, static_argnums=0)


__all__ = [
    "StepSpec",
    "TrainData",
    "make_optimizer",
    "selected_prism_loss",
    "sample_row_indices",
    "controller_update",
    "auxk_loss",
    "train_step",
    "train_step_jit",
]
