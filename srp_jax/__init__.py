"""srp-jax: Sparse Readout Prism in JAX/Flax.

A sparse dictionary of a language model's unembedding rows (a TopK factorizer trained on the
centered, row-normalized rows of ``W_U``), the exact decomposition of a logit or a contrast into
``base + sum_i contributions + residual``, and a per-query fidelity gate.

The reference-parity names (``load_factorizer``, ``preprocess_rows``, ``decompose_token_logit``,
...) keep the PyTorch reference's signatures; the JAX-native names (``decompose_tokens``,
``fidelity_gate``, the pure kernels in :mod:`srp_jax.factorizers`) jit and vmap.
``import srp_jax`` never imports torch.
"""

from __future__ import annotations

from ._version import __version__

from . import factorizers, hub, metrics
from .checkpoint import is_srp_checkpoint, save_dictionary
from .config import ARCHITECTURES, EvaluationConfig, FactorizerConfig, RunConfig, load_run_config, resolve_eval_k
from .data import PrismDataset, load_prism_dataset, make_synthetic_data
from .decompose import (
    Decomposition,
    MarginDecomposition,
    QueryDecomposition,
    CodeTable,
    QueryDecompositions,
    TokenDecompositions,
    batch_decomposition_identity_error,
    code_table,
    build_query_weights,
    coverage_stats,
    decompose_query,
    decompose_queries,
    decompose_rows,
    decompose_token_logit,
    decompose_tokens,
    margin_from_rows,
)
from . import errors as _errors
from .dictionary import Dictionary, load_dictionary, load_factorizer
from .errors import (
    CheckpointError,
    ConfigError,
    DependencyError,
    HubError,
    MissingConfigError,
    MissingKeyError,
    NonFiniteError,
    ShapeError,
    StateDictShapeError,
    SrpError,
    ThresholdNotReadyError,
    UnexpectedKeyError,
)
from .factorizers import FactorizerBatch, FactorizerOutput, decode, encode, forward, init_factorizer, topk_mask
from .gate import Explanation, GateResult, GateRule, explain, fidelity_gate
from .hub import fetch_checkpoint
from .metrics import evaluate
from .modules import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    L1ReLUSAE,
    SAEBase,
    TopKSAE,
    bind_dictionary,
    build_factorizer,
    module_from_dictionary,
)
from .readout import Readout, center_normalize_rows, preprocess_rows, resolve_row_mean
from .train import TrainState  # the loop itself: srp_jax.train.train (the subpackage stays importable)

__all__ = [
    # reference-parity names
    "Decomposition",
    "PrismDataset",
    "center_normalize_rows",
    "decompose_token_logit",
    "load_prism_dataset",
    "preprocess_rows",
    "build_factorizer",
    "load_factorizer",
    "BatchTopKSAE",
    "FactorizerBatch",
    "GatedSAE",
    "JumpReLUSAE",
    "L1ReLUSAE",
    "SAEBase",
    "TopKSAE",
    # configs and dictionaries
    "ARCHITECTURES",
    "FactorizerConfig",
    "EvaluationConfig",
    "RunConfig",
    "load_run_config",
    "resolve_eval_k",
    "Dictionary",
    "Readout",
    "resolve_row_mean",
    "make_synthetic_data",
    # pure kernels
    "factorizers",
    "FactorizerOutput",
    "init_factorizer",
    "encode",
    "decode",
    "forward",
    "topk_mask",
    "bind_dictionary",
    "module_from_dictionary",
    # decomposition, gate, metrics
    "TokenDecompositions",
    "QueryDecomposition",
    "QueryDecompositions",
    "MarginDecomposition",
    "decompose_rows",
    "decompose_tokens",
    "CodeTable",
    "code_table",
    "batch_decomposition_identity_error",
    "build_query_weights",
    "decompose_query",
    "decompose_queries",
    "margin_from_rows",
    "coverage_stats",
    "GateRule",
    "GateResult",
    "Explanation",
    "fidelity_gate",
    "explain",
    "metrics",
    "evaluate",
    # checkpoints, hub, training
    "save_dictionary",
    "load_dictionary",
    "is_srp_checkpoint",
    "hub",
    "fetch_checkpoint",
    "TrainState",
]
__all__ += _errors.__all__
