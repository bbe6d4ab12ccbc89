"""torch for running a model (the ``extract`` extra), beside :mod:`convert.pt_io` for ``.pt``
files: the two modules that import torch. ``srp_jax.extract`` drives a transformers model
through the module handed out here (``srp_jax._lazy.torch_runtime()``), so no module under
``srp_jax/`` imports torch itself.
"""

from __future__ import annotations

import torch

#: ``--model-dtype`` names -> torch dtypes a model is loaded in
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype(name: str) -> torch.dtype:
    """The torch dtype of a model-dtype name (``float32`` / ``bfloat16``)."""
    return DTYPES[name]


__all__ = ["torch", "DTYPES", "dtype"]
