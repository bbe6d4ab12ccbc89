"""Helpers for the interop tests: reference-schema ``.pt`` files built with torch directly.

The checkpoints are written here from first principles (torch tensors in the reference key
order, ``torch.save``), independently of ``convert/``, so the converters are tested against
an outside expectation.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

ARCHS = ("topk", "matryoshka_topk", "batch_topk", "jumprelu", "gated", "l1_relu")
FIXTURE_PT = Path(__file__).parent / "fixtures" / "reference"


def factorizer_block(arch: str, D: int, k: int = 4) -> dict:
    block = {"architecture": arch, "d_features": D}
    if arch in ("topk", "matryoshka_topk", "batch_topk"):
        block["k"] = k
    block["encoder_init_scale"] = 0.02
    if arch == "matryoshka_topk":
        block["k_values"] = [2, 4]
        block["matryoshka_weights"] = [1.0, 0.5]
    if arch == "batch_topk":
        block["threshold_momentum"] = 0.99
    if arch == "jumprelu":
        block["log_threshold_init"] = -6.0
        block["bandwidth"] = 0.5
    return block


def torch_state_dict(arch: str, d: int, D: int, *, seed: int = 0, dtype=None):
    """A reference ``state_dict`` (OrderedDict in torch's order) with random values."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    dec = torch.randn(D, d, generator=g)
    sd["decoder"] = (dec / dec.norm(dim=1, keepdim=True)).to(dtype)
    if arch == "jumprelu":
        sd["log_threshold"] = (torch.randn(D, generator=g) - 3).to(dtype)
    if arch == "gated":
        sd["gate_bias"] = (0.1 * torch.randn(D, generator=g)).to(dtype)
        sd["log_r"] = (0.1 * torch.randn(D, generator=g)).to(dtype)
    if arch == "batch_topk":
        sd["activation_threshold"] = torch.tensor(0.123, dtype=dtype)
        sd["threshold_initialized"] = torch.tensor(1, dtype=torch.int64)
    if arch == "jumprelu":
        sd["act_scale_ema"] = torch.tensor(0.77, dtype=dtype)
        sd["act_scale_init"] = torch.tensor(1, dtype=torch.int64)
    sd["encoder.weight"] = (0.02 * torch.randn(D, d, generator=g)).to(dtype)
    sd["encoder.bias"] = (0.01 * torch.randn(D, generator=g)).to(dtype)
    return sd


def runner_checkpoint(arch: str, d: int = 8, D: int = 24, V: int = 40, *, seed: int = 0, dtype=None, metrics=True):
    """The reference runner layout (every top-level key) as a torch object tree."""
    import torch

    g = torch.Generator().manual_seed(seed + 100)
    ckpt = {
        "model_state_dict": torch_state_dict(arch, d, D, seed=seed, dtype=dtype),
        "factorizer": factorizer_block(arch, D),
        "evaluation": {"k": 4, "max_eval_rows": None, "topk_overlap": 5},
        "row_mean": torch.randn(d, generator=g),
        "row_norms": torch.rand(V, generator=g) + 0.5,
        "row_token_ids": torch.arange(V, dtype=torch.int64) * 7 + (1 << 40),
    }
    if metrics:
        ckpt["metrics"] = {"row_centered_ev": 0.5, "val_top1_match": 0.25, "dead_fraction": 0.0, "note": None, "tag": "x"}
    return ckpt


def save_torch(obj, path) -> Path:
    import torch

    path = Path(path)
    torch.save(obj, path)
    return path


def assert_same_tree(a, b, where: str = "") -> None:
    """Same keys (same order), same types, same dtypes/shapes and identical tensor bits."""
    import torch

    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
        ab = a.reshape(-1).contiguous().view(torch.uint8) if a.numel() else a
        bb = b.reshape(-1).contiguous().view(torch.uint8) if b.numel() else b
        assert torch.equal(ab, bb), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, (where, a, b)
