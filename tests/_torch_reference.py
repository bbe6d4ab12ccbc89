"""A small, independent PyTorch implementation of the six factorizers, for parity tests.

Written from the specification (``method.md`` §1), not from the reference's source, so the
JAX kernels are checked against a second reading of the maths. Parameters live in a plain dict
keyed by the reference ``state_dict`` names (``encoder.weight`` (D, d), ``encoder.bias``,
``decoder`` (D, d), ``log_threshold``, ``gate_bias``, ``log_r``); buffers in a second dict
(``activation_threshold``/``threshold_initialized`` or ``act_scale_ema``/``act_scale_init``),
mutated in place exactly where the reference mutates them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

PARAM_KEYS = {
    "topk": ("encoder.weight", "encoder.bias", "decoder"),
    "matryoshka_topk": ("encoder.weight", "encoder.bias", "decoder"),
    "batch_topk": ("encoder.weight", "encoder.bias", "decoder"),
    "jumprelu": ("encoder.weight", "encoder.bias", "decoder", "log_threshold"),
    "gated": ("encoder.weight", "encoder.bias", "decoder", "gate_bias", "log_r"),
    "l1_relu": ("encoder.weight", "encoder.bias", "decoder"),
}
BUFFER_KEYS = {
    "batch_topk": ("activation_threshold", "threshold_initialized"),
    "jumprelu": ("act_scale_ema", "act_scale_init"),
}


class StepWithBoxGradient(torch.autograd.Function):
    """Forward: 1[u > 0]. Backward: grad * 1[|u| <= width/2] / max(width, 1e-12)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, width: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.width = float(width)
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (u,) = ctx.saved_tensors
        w = ctx.width
        window = (u.abs() <= w / 2).to(u.dtype)
        return grad * window / max(w, 1e-12), None


def keep_largest(acts: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: keep the k largest entries, zero elsewhere; k >= width -> unchanged."""
    width = acts.shape[-1]
    k = min(int(k), width)
    if k >= width:
        return acts
    vals, idx = acts.topk(k, dim=-1)
    return torch.zeros_like(acts).scatter(-1, idx, vals)


class TorchFactorizer:
    """One factorizer: ``params`` (leaf tensors with grad), ``buffers``, a ``training`` flag."""

    def __init__(self, arch: str, state: dict[str, Any], *, k: int = 32, momentum: float = 0.995,
                 bandwidth: float = 0.5, training: bool = False) -> None:
        self.arch = arch
        self.k = int(k)
        self.momentum = float(momentum)
        self.bandwidth = float(bandwidth)
        self.training = training
        self.params = {
            key: torch.tensor(np.asarray(state[key], dtype=np.float32), requires_grad=True) for key in PARAM_KEYS[arch]
        }
        self.buffers = {}
        for key in BUFFER_KEYS.get(arch, ()):
            arr = np.asarray(state[key])
            dtype = torch.int64 if key.endswith(("initialized", "_init")) else torch.float32
            self.buffers[key] = torch.tensor(arr, dtype=dtype)
        D = self.params["decoder"].shape[0]
        if arch in ("jumprelu", "gated", "l1_relu"):
            self.k = D  # only for API parity; unused

    # ---- pieces
    @property
    def n_features(self) -> int:
        return self.params["decoder"].shape[0]

    def _linear(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        out = x @ self.params["encoder.weight"].t()
        return out + self.params["encoder.bias"] if with_bias else out

    def _k(self, k: int | None) -> int:
        return int(k) if k else self.k  # the reference's `k or self.k`

    def _jump_width(self, z: torch.Tensor, update: bool) -> float:
        """bandwidth * RMS-EMA of positive activations, floored at 1e-8; EMA moves only when
        ``update`` and training."""
        with torch.no_grad():
            positive = z[z > 0]
            rms = positive.square().mean().sqrt() if positive.numel() else torch.tensor(1.0)
            if update and self.training:
                if int(self.buffers["act_scale_init"]) == 0:
                    self.buffers["act_scale_ema"] = rms.clone().to(torch.float32)
                    self.buffers["act_scale_init"] = torch.tensor(1, dtype=torch.int64)
                else:
                    self.buffers["act_scale_ema"] = 0.99 * self.buffers["act_scale_ema"] + 0.01 * rms
            scale = float(self.buffers["act_scale_ema"])
        return max(self.bandwidth * scale, 1e-8)

    # ---- encode
    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        a = self.arch
        if a in ("topk", "matryoshka_topk"):
            return keep_largest(torch.relu(self._linear(x)), self._k(k))
        if a == "batch_topk":
            acts = torch.relu(self._linear(x))
            if self.training:
                return self._batch_select(acts, self._k(k))
            if int(self.buffers["threshold_initialized"]) == 0:
                raise RuntimeError("batch_topk: activation threshold not learned yet")
            return torch.where(acts > self.buffers["activation_threshold"], acts, torch.zeros_like(acts))
        if a == "jumprelu":
            z = torch.relu(self._linear(x))
            theta = self.params["log_threshold"].exp()
            return z * StepWithBoxGradient.apply(z - theta, self._jump_width(z, update=False))
        if a == "gated":
            return self._gated(x)[0]
        if a == "l1_relu":
            return torch.relu(self._linear(x))
        raise ValueError(a)

    def _batch_select(self, acts: torch.Tensor, k: int) -> torch.Tensor:
        B, D = acts.shape
        n = min(B * min(k, D), B * D)
        if n <= 0:
            return torch.zeros_like(acts)
        flat = acts.reshape(-1)
        vals, idx = flat.topk(n)
        keep = torch.zeros_like(flat).index_fill(0, idx, 1.0)
        code = (flat * keep).reshape(B, D)
        with torch.no_grad():
            cut = vals.min()
            if int(self.buffers["threshold_initialized"]) == 0:
                self.buffers["activation_threshold"] = cut.clone()
                self.buffers["threshold_initialized"] = torch.tensor(1, dtype=torch.int64)
            else:
                m = self.momentum
                self.buffers["activation_threshold"] = m * self.buffers["activation_threshold"] + (1 - m) * cut
        return code

    def _gated(self, x: torch.Tensor):
        z = self._linear(x, with_bias=False)
        pre_gate = z + self.params["gate_bias"]
        opened = (pre_gate > 0).to(z.dtype)
        magnitude = torch.relu(self.params["log_r"].exp() * z + self.params["encoder.bias"])
        return opened * magnitude, pre_gate, opened

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return code @ self.params["decoder"]

    # ---- forward
    def forward(self, x: torch.Tensor, k: int | None = None) -> dict[str, Any]:
        """Returns reconstruction, code, aux_loss, aux_recon (or None), mean_l0 (float)."""
        a = self.arch
        aux = torch.zeros(())
        aux_recon = None
        if a == "jumprelu":
            z = torch.relu(self._linear(x))
            theta = self.params["log_threshold"].exp()
            step = StepWithBoxGradient.apply(z - theta, self._jump_width(z, update=True))
            code = z * step
            aux = step.sum(-1).mean()
            l0 = float(aux.detach())
        elif a == "gated":
            code, pre_gate, opened = self._gated(x)
            active = torch.relu(pre_gate)
            aux = active.sum(-1).mean()
            aux_recon = active @ self.params["decoder"].detach()
            l0 = float(opened.sum(-1).mean())
        else:
            code = self.encode(x, k)
            if a == "l1_relu":
                norms = self.params["decoder"].detach().norm(dim=1)
                aux = (code * norms).sum(-1).mean()
            l0 = float((code > 0).float().sum(-1).mean())
        return {"reconstruction": self.decode(code), "code": code, "aux_loss": aux, "aux_recon": aux_recon, "mean_l0": l0}

    # ---- training objective
    def reconstruction_loss(self, x: torch.Tensor, k: int | None = None, k_values=None, weights=None):
        """(rec, code, aux, aux_recon_mse): the spec's matryoshka weighted multi-k or one MSE."""
        if self.arch == "matryoshka_topk" and k_values:
            ws = list(weights) if weights is not None and len(weights) == len(k_values) else [1.0] * len(k_values)
            total = torch.zeros(())
            code = None
            for kj, wj in zip(k_values, ws):
                out = self.forward(x, kj)
                total = total + wj * torch.mean((out["reconstruction"] - x) ** 2)
                code = out["code"]
            return total / sum(ws), code, torch.zeros(()), torch.zeros(())
        out = self.forward(x, k)
        rec = torch.mean((out["reconstruction"] - x) ** 2)
        aux_mse = torch.mean((out["aux_recon"] - x) ** 2) if out["aux_recon"] is not None else torch.zeros(())
        return rec, out["code"], out["aux_loss"], aux_mse

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {key: p.detach().numpy().copy() for key, p in self.params.items()}
        out.update({key: b.numpy().copy() for key, b in self.buffers.items()})
        return out
