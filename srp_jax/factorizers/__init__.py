"""The factorizer architectures: a registry of one module per architecture, over shared kernels.

Layout (stable names; partition rules key on them)::

    params  = {"encoder": {"kernel": (d, D), "bias": (D,)},
               "decoder": (D, d),
               # jumprelu: "log_threshold" (D,);  gated: "gate_bias" (D,), "log_r" (D,)
              }
    buffers = {}                                                      # topk, matryoshka_topk, gated, l1_relu
            | {"activation_threshold": f32 (), "threshold_initialized": i32 ()}   # batch_topk
            | {"act_scale_ema": f32 (), "act_scale_init": i32 ()}                # jumprelu

Modules: :mod:`.kernels` (top-k, encoder pre-activation, decode, ...), :mod:`.base` (the
:class:`Architecture` interface), :mod:`.registry`, one module per architecture
(:mod:`.topk`, :mod:`.batch_topk`, :mod:`.jumprelu`, :mod:`.gated`, :mod:`.l1_relu`),
:mod:`.functional` (``encode``, ``forward``, ``reconstruction_loss`` dispatching on
``cfg.architecture``) and :mod:`.state_dict` (the PyTorch names). Add an architecture with an
``Architecture`` subclass and ``register(MyArchitecture())``; see ``docs/architecture.md``.
"""

from __future__ import annotations

from . import sparse
from .base import (
    DEFAULT_K,
    Architecture,
    BufferSpec,
    FactorizerBatch,
    FactorizerOutput,
    LossTerms,
    Option,
    SparseLossTerms,
)
from .batch_topk import BatchTopK
from .functional import (
    architecture_of,
    check_ready,
    decode_jit,
    encode,
    encode_jit,
    forward,
    forward_jit,
    init_buffers,
    init_factorizer,
    reconstruction_loss,
    sparse_code,
    sparse_code_available,
    sparse_encode,
    sparse_reconstruction_loss,
    sparse_step_available,
    sparse_work_fraction,
)
from .gated import Gated
from .jumprelu import JumpReLU
from .kernels import (
    HIGHEST,
    NORM_EPS,
    Buffers,
    Params,
    active_count,
    decode,
    decode_sparse,
    mse,
    normalize_decoder,
    normalize_rows,
    pre_activation,
    rectangle_step,
    scatter_rows,
    topk_mask,
    topk_sparse,
)
from .l1_relu import L1ReLU
from .registry import architecture_names, get_architecture, register, unregister
from .state_dict import (
    buffer_keys,
    expected_shapes,
    int_buffer_keys,
    state_dict_keys,
    state_dict_to_variables,
    variables_to_state_dict,
)
from .sparse import SparseCode
from .topk import MatryoshkaTopK, TopK

# The built-in architectures, one registry line each (the reference's order).
for _architecture in (TopK(), MatryoshkaTopK(), BatchTopK(), JumpReLU(), Gated(), L1ReLU()):
    register(_architecture)
del _architecture

BUILTIN_ARCHITECTURES = architecture_names()
INT_BUFFERS = tuple(sorted({name for arch in BUILTIN_ARCHITECTURES for name in int_buffer_keys(arch)}))

__all__ = [
    "Architecture",
    "TopK",
    "MatryoshkaTopK",
    "BatchTopK",
    "JumpReLU",
    "Gated",
    "L1ReLU",
    "Option",
    "BufferSpec",
    "DEFAULT_K",
    "BUILTIN_ARCHITECTURES",
    "register",
    "unregister",
    "get_architecture",
    "architecture_names",
    "architecture_of",
    "FactorizerOutput",
    "FactorizerBatch",
    "LossTerms",
    "SparseLossTerms",
    "SparseCode",
    "sparse",
    "sparse_step_available",
    "sparse_work_fraction",
    "sparse_code",
    "sparse_code_available",
    "sparse_encode",
    "sparse_reconstruction_loss",
    "Params",
    "Buffers",
    "HIGHEST",
    "NORM_EPS",
    "init_factorizer",
    "init_buffers",
    "normalize_rows",
    "normalize_decoder",
    "topk_sparse",
    "topk_mask",
    "scatter_rows",
    "pre_activation",
    "encode",
    "decode",
    "decode_sparse",
    "forward",
    "check_ready",
    "rectangle_step",
    "reconstruction_loss",
    "mse",
    "active_count",
    "state_dict_keys",
    "buffer_keys",
    "int_buffer_keys",
    "expected_shapes",
    "state_dict_to_variables",
    "variables_to_state_dict",
    "encode_jit",
    "forward_jit",
    "decode_jit",
]
