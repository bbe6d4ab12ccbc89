"""A plain PyTorch TopK trainer and decomposition, written the way the reference trainer works.

The baseline srp-jax is measured against (and compared with on real payloads). It follows
training-and-checkpoints.md §1 with the reference's kind of code, not srp-jax's:

* model: ``encoder`` a dense ``nn.Linear(d, D)`` (weight (D, d) ~ N(0, 0.02), bias 0),
  ``decoder`` a bare (D, d) parameter ~ N(0, d^-1/2) with unit rows; no decoder bias (the fixed
  ``row_mean`` is the only offset);
* encode: ReLU, then ``torch.topk`` and a scatter of the k values into a dense zero (B, D) code;
  decode: the dense product ``code @ decoder``;
* per step: B row positions from ``torch.multinomial(sample_weights, B, replacement=True)``;
  loss = MSE(x̂, x) + lambda_prism · prism + code_l2 · mean(z²), where the prism term draws
  min(B, N) hidden states uniformly with replacement, takes their target row (``top_targets``
  at a uniform rank), re-encodes it and averages the squared relative residual of the raw logit;
* global-norm clip 1.0, ``torch.optim.AdamW(lr, weight_decay)`` (torch defaults otherwise),
  then every decoder row renormalised to unit norm.

Use it as a timed step (``TorchReference(data, ...).step()``), or as a whole trainer
(``train(payload, ...)`` -> ``(trainer, history)``). Indices can be injected into ``step`` so a
step is reproducible against another implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

NORM_EPS = 1e-8
PRISM_DENOM_EPS = 1e-5
PADDING_NORM = 1e-6
CLIP_NORM = 1.0


def _tensor(x: Any, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x))).to(dtype)


def normalized_weights(weights: Any, V: int) -> torch.Tensor:
    """(V,) float32 probabilities from non-negative weights (None = uniform)."""
    if weights is None:
        return torch.full((V,), 1.0 / V)
    w = _tensor(weights, torch.float64)
    if w.shape != (V,) or not bool(torch.all(w >= 0)) or not float(w.sum()) > 0:
        raise ValueError(f"sample_weights must be {V} non-negative numbers with a positive sum, got shape {tuple(w.shape)}")
    return (w / w.sum()).to(torch.float32)


@dataclasses.dataclass
class RefData:
    """What the loop reads (torch tensors): ``rows_normalized`` (V, d), ``W_U`` (V, d) raw kept
    rows, ``row_mean`` (d,), ``row_norms`` (V,), ``hidden`` (N, d) train hidden states,
    ``top_targets`` (N, P) int64 row positions, ``sample_weights`` (V,) float32, sums to 1."""

    rows_normalized: torch.Tensor
    W_U: torch.Tensor
    row_mean: torch.Tensor
    row_norms: torch.Tensor
    hidden: torch.Tensor
    top_targets: torch.Tensor
    sample_weights: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], sample_weights: Any = None) -> RefData:
        """From already-prepared arrays (``rows_normalized``, ``W_U``, ``row_mean``, ``row_norms``,
        ``hidden``, ``top_targets``; ``sample_weights`` here or in ``arrays``; None = uniform).
        NumPy inputs are shared, not copied, where their dtype allows."""
        weights = sample_weights if sample_weights is not None else arrays.get("sample_weights")
        targets = _tensor(arrays["top_targets"], torch.int64)
        if targets.ndim == 1:
            targets = targets[:, None]
        return cls(
            rows_normalized=_tensor(arrays["rows_normalized"]),
            W_U=_tensor(arrays["W_U"]),
            row_mean=_tensor(arrays["row_mean"]),
            row_norms=_tensor(arrays["row_norms"]),
            hidden=_tensor(arrays["hidden"]),
            top_targets=targets,
            sample_weights=normalized_weights(weights, int(np.shape(arrays["rows_normalized"])[0])),
        )

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], sample_weights: Any = None, top_n: int = 8) -> RefData:
        """From a raw payload: ``W_U`` (or ``W_U_orig``) (V, d) and ``hidden`` (or ``h_LN``)
        (..., d) train hidden states (rows with norm <= 1e-6, the extractor's padding, are
        dropped). Rows are centred on their mean and normalised (norm floor 1e-8); targets are
        each hidden state's ``top_n`` largest logits over these rows (§1.1). The caller chooses
        the hidden split (pass ``PrismDataset.hidden_train`` to match srp-jax)."""
        W = _tensor(payload["W_U"] if "W_U" in payload else payload["W_U_orig"])
        H = _tensor(payload["hidden"] if "hidden" in payload else payload["h_LN"]).reshape(-1, W.shape[1])
        H = H[H.norm(dim=1) > PADDING_NORM]
        row_mean = W.mean(dim=0)
        centred = W - row_mean
        norms = centred.norm(dim=1).clamp_min(NORM_EPS)
        targets = [torch.topk(H[i : i + 256] @ W.T, min(top_n, W.shape[0]), dim=1).indices
                   for i in range(0, H.shape[0], 256)]
        arrays = {
            "rows_normalized": centred / norms[:, None],
            "W_U": W,
            "row_mean": row_mean,
            "row_norms": norms,
            "hidden": H,
            "top_targets": torch.cat(targets) if targets else torch.zeros((0, 1), dtype=torch.int64),
        }
        return cls.from_arrays(arrays, sample_weights)


class TopKFactorizer(nn.Module):
    """encoder Linear(d, D) -> ReLU -> top-k scatter -> ``code @ decoder``. State-dict keys are
    the reference's: ``encoder.weight`` (D, d), ``encoder.bias`` (D,), ``decoder`` (D, d)."""

    def __init__(self, d_model: int, d_features: int, k: int, encoder_init_scale: float = 0.02) -> None:
        super().__init__()
        self.k = int(k)
        self.encoder = nn.Linear(d_model, d_features)
        self.decoder = nn.Parameter(torch.empty(d_features, d_model))
        with torch.no_grad():
            self.encoder.weight.normal_(0.0, encoder_init_scale)
            self.encoder.bias.zero_()
            self.decoder.normal_(0.0, d_model**-0.5)
        self.normalize_decoder_()

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        acts = torch.relu(self.encoder(x))
        kk = self.k if not k else int(k)
        if kk >= acts.shape[-1]:
            return acts
        values, indices = torch.topk(acts, kk, dim=-1)
        return torch.zeros_like(acts).scatter(-1, indices, values)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return code @ self.decoder

    def forward(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encode(x, k)
        return self.decode(code), code

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.decoder.div_(self.decoder.norm(dim=1, keepdim=True).clamp_min(NORM_EPS))


@dataclasses.dataclass
class StepIndices:
    """The random draws of one step: ``rows`` (B,) row positions, ``hidden`` (Bp,) hidden-state
    positions and ``ranks`` (Bp,) target ranks for the prism term (empty when it is off)."""

    rows: torch.Tensor
    hidden: torch.Tensor
    ranks: torch.Tensor


class TorchReference:
    """The trainer: model, AdamW, a seeded torch generator for the draws, and ``step()``."""

    def __init__(
        self,
        data: RefData,
        d_features: int,
        k: int,
        *,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lambda_prism: float = 0.0,
        code_l2: float = 0.0,
        prism_top_n: int = 1,
        seed: int = 0,
        init_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.data = data
        self.batch_size = int(batch_size)
        self.lambda_prism = float(lambda_prism)
        self.code_l2 = float(code_l2)
        n_hidden = int(data.hidden.shape[0])
        self.prism_batch = min(self.batch_size, n_hidden) if self.lambda_prism > 0 else 0
        self.prism_ranks = max(1, min(int(prism_top_n), int(data.top_targets.shape[1]) if n_hidden else 1))
        torch.manual_seed(int(seed))
        self.model = TopKFactorizer(int(data.rows_normalized.shape[1]), int(d_features), int(k))
        if init_state is not None:
            self.model.load_state_dict({key: _tensor(v) for key, v in init_state.items()})
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.generator = torch.Generator().manual_seed(int(seed) + 1)
        self.steps_done = 0

    def sample_indices(self) -> StepIndices:
        """This step's draws: rows by ``torch.multinomial`` (with replacement); hidden states and
        ranks uniform by ``torch.randint``."""
        g = self.generator
        rows = torch.multinomial(self.data.sample_weights, self.batch_size, replacement=True, generator=g)
        n_hidden = int(self.data.hidden.shape[0])
        hidden = torch.randint(0, max(n_hidden, 1), (self.prism_batch,), generator=g)
        ranks = torch.randint(0, self.prism_ranks, (self.prism_batch,), generator=g)
        return StepIndices(rows, hidden, ranks)

    def prism_loss(self, hidden_idx: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """mean_j [h_j · (w_t - (mu + a_t x̂_t)) / max(|h_j · w_t|, 1e-5)]², t = top_targets[h_j, r_j]."""
        d = self.data
        tok = d.top_targets[hidden_idx, ranks]
        recon, _ = self.model(d.rows_normalized[tok])
        w_hat = d.row_mean + d.row_norms[tok][:, None] * recon
        w = d.W_U[tok]
        h = d.hidden[hidden_idx]
        residual = (h * (w - w_hat)).sum(dim=1)
        original = (h * w).sum(dim=1).abs().clamp_min(PRISM_DENOM_EPS)
        return ((residual / original) ** 2).mean()

    def loss(self, idx: StepIndices) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.data.rows_normalized[idx.rows]
        recon, code = self.model(x)
        rec = torch.nn.functional.mse_loss(recon, x)
        loss = rec
        prism = rec.new_zeros(())
        if self.prism_batch > 0:
            prism = self.prism_loss(idx.hidden, idx.ranks)
            loss = loss + self.lambda_prism * prism
        if self.code_l2 > 0:
            loss = loss + self.code_l2 * code.pow(2).mean()
        return loss, {"reconstruction_loss": rec, "prism_loss": prism, "mean_l0": (code > 0).sum(1).float().mean()}

    def step(self, indices: StepIndices | None = None) -> dict[str, float]:
        """One update (draws its own indices unless given). Returns the step's scalars."""
        idx = self.sample_indices() if indices is None else indices
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self.loss(idx)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.model.normalize_decoder_()
        self.steps_done += 1
        out = {"loss": loss.detach(), "grad_norm": grad_norm, **{k: v.detach() for k, v in terms.items()}}
        return {key: float(v) for key, v in out.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model parameters as NumPy arrays under the reference's keys."""
        return {key: v.detach().cpu().numpy().copy() for key, v in self.model.state_dict().items()}


def train(
    payload_arrays: Mapping[str, Any] | RefData,
    d_features: int,
    k: int,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    lambda_prism: float = 0.0,
    seed: int = 0,
    row_sampling: Any = None,
    *,
    weight_decay: float = 1e-4,
    code_l2: float = 0.0,
    prism_top_n: int = 1,
    log_every: int = 50,
) -> tuple[TorchReference, list[dict[str, float]]]:
    """Train a TopK dictionary the reference way; returns ``(trainer, history)``.

    ``payload_arrays``: a :class:`RefData`, prepared arrays (see ``RefData.from_arrays``), or a
    raw payload (``W_U``/``W_U_orig`` + ``hidden``/``h_LN``; see ``RefData.from_payload``).
    ``row_sampling``: the (V,) sampling weights (None = uniform), e.g. srp-jax's
    ``srp_jax.data.row_sampling_weights(dataset, mode)``. History rows (step 1, every
    ``log_every`` and the last step) hold step, loss, reconstruction_loss, prism_loss.
    """
    if isinstance(payload_arrays, RefData):
        data = payload_arrays
        if row_sampling is not None:
            V = int(data.rows_normalized.shape[0])
            data = dataclasses.replace(data, sample_weights=normalized_weights(row_sampling, V))
    elif "rows_normalized" in payload_arrays:
        data = RefData.from_arrays(payload_arrays, row_sampling)
    else:
        data = RefData.from_payload(payload_arrays, row_sampling, top_n=max(1, prism_top_n))
    trainer = TorchReference(
        data, d_features, k, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        lambda_prism=lambda_prism, code_l2=code_l2, prism_top_n=prism_top_n, seed=seed,
    )
    history = []
    for step in range(1, int(steps) + 1):
        m = trainer.step()
        if step == 1 or step % max(1, int(log_every)) == 0 or step == steps:
            history.append({"step": step, "loss": m["loss"], "reconstruction_loss": m["reconstruction_loss"],
                            "prism_loss": m["prism_loss"]})
    return trainer, history


# --------------------------------------------------------------------------------------------
# Decomposition and full-vocabulary reconstruction, the reference way


@torch.no_grad()
def decompose_token_logit(h, w_row, row_mean, row_norm, row_normalized, model: TopKFactorizer, k=None) -> dict:
    """One query ``h · w_t = base + Σ_i a_t z_i (h · d_i) + residual`` (per-query call, like
    the reference's ``decompose_token_logit``): dense encode of the row, contributions over all
    D features, dense decode for the residual row."""
    code = model.encode(row_normalized[None], k)[0]
    contributions = row_norm * code * (model.decoder @ h)
    residual_row = w_row - (row_mean + row_norm * (code @ model.decoder))
    original = h @ w_row
    base = h @ row_mean
    feature_sum = contributions.sum()
    residual = h @ residual_row
    return {
        "original_logit": original,
        "base_term": base,
        "feature_contributions": contributions,
        "feature_sum": feature_sum,
        "residual_term": residual,
        "reconstructed_logit": base + feature_sum,
        "identity_error": original - (base + feature_sum + residual),
        "active_feature_indices": torch.nonzero(code, as_tuple=False).flatten(),
    }


@torch.no_grad()
def reconstruct_rows(model: TopKFactorizer, rows_normalized, row_mean, row_norms, k=None, row_batch: int = 1024):
    """Encode/decode every row in blocks: (recon_x (V, d), recon_W = mu + a·recon_x (V, d))."""
    out = []
    for i in range(0, rows_normalized.shape[0], row_batch):
        recon, _ = model(rows_normalized[i : i + row_batch], k)
        out.append(recon)
    recon_x = torch.cat(out)
    return recon_x, row_mean + row_norms[:, None] * recon_x


__all__ = ["normalized_weights", "RefData", "TopKFactorizer", "StepIndices", "TorchReference", "train", "decompose_token_logit",
           "reconstruct_rows"]
