"""eai-sparsify's ``SparseCoder`` training step on the benchmark's work (no prism term).

Needs the ``bench`` extra (``pip install -e ".[bench]"``: eai-sparsify 1.3.3 on CPU torch). One
step is what sparsify's ``Trainer`` does per batch on its default CPU path (no Triton: the
eager ``embedding_bag`` decoder, its ``FusedEncoder`` with the sparse ``index_add`` backward):

1. B rows drawn with ``torch.multinomial`` from the same sampling weights (as the torch
   reference does; sparsify itself reads activations from a model instead);
2. ``SparseCoder.forward(x)`` -> ``fvu`` (its loss: squared error over total variance);
3. ``fvu.backward()``; ``remove_gradient_parallel_to_decoder_directions()`` (its decoder
   constraint); ``optimizer.step()``; ``optimizer.zero_grad()``.

The optimizer is built the way ``sparsify.trainer.Trainer`` builds it: ``"adam"``
(``torch.optim.Adam``; the closest to srp-jax's AdamW, so the default here) or ``"signum"``
(``ScheduleFreeWrapper(SignSGD, momentum=0.95)``, sparsify's own default). The learning rate
is the benchmark's (1e-3) rather than sparsify's width-scaled default; it does not change the cost.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .common import LR, Shape

OPTIMIZERS = ("adam", "signum")


def _import_sparsify():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the sparsify comparison needs eai-sparsify: pip install -e \".[bench]\"" f" ({exc})"
        ) from exc
    return sparsify


class SparsifyStep:
    """A ``SparseCoder`` (d -> D latents, TopK k) with its optimizer; ``step()`` runs one update."""

    def __init__(self, shape: Shape, arrays: dict[str, Any], *, optimizer: str = "adam", lr: float = LR,
                 seed: int = 0) -> None:
        import torch

        sparsify = _import_sparsify()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown sparsify optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        self.torch = torch
        self.batch = shape.batch
        self.rows = torch.from_numpy(np.ascontiguousarray(arrays["rows_normalized"], np.float32))
        w = torch.from_numpy(np.asarray(arrays["sample_weights"], np.float64))
        self.weights = (w / w.sum()).to(torch.float32)
        torch.manual_seed(seed)
        cfg = sparsify.SparseCoderConfig(num_latents=shape.D, k=shape.k, normalize_decoder=True)
        self.sae = sparsify.SparseCoder(shape.d, cfg, device="cpu", dtype=torch.float32)
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=lr)
        else:
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            self.optimizer = ScheduleFreeWrapper(SignSGD(self.sae.parameters(), lr=lr), momentum=0.95)
            self.optimizer.train()
        self.generator = torch.Generator().manual_seed(seed + 1)

    def step(self) -> dict[str, float]:
        torch = self.torch
        idx = torch.multinomial(self.weights, self.batch, replacement=True, generator=self.generator)
        x = self.rows[idx]
        out = self.sae(x)
        out.fvu.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"loss": float(out.fvu.detach())}


def versions() -> dict[str, str]:
    sparsify = _import_sparsify()
    return {"eai_sparsify": sparsify.__version__}


__all__ = ["OPTIMIZERS", "SparsifyStep", "versions"]
