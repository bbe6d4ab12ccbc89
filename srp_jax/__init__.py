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

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("srp-jax")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0+unknown"

from . import factorizers
from .config import ARCHITECTURES, EvaluationConfig, FactorizerConfig, resolve_eval_k
from .decompose import (
    Decomposition,
    MarginDecomposition,
    QueryDecomposition,
    TokenDecompositions,
    batch_decomposition_identity_error,
    build_query_weights,
    coverage_stats,
    decompose_query,
    decompose_rows,
    decompose_token_logit,
    decompose_tokens,
    margin_from_rows,
)
from .dictionary import Dictionary, load_factorizer
from .errors import (
    CheckpointError,
    ConfigError,
    DependencyError,
    HubError,
    MissingConfigError,
    MissingKeyError,
    NonFiniteError,
    ShapeError,
    SrpError,
    ThresholdNotReadyError,
    UnexpectedKeyError,
)
from .factorizers import FactorizerOutput, decode, encode, forward, init_factorizer, topk_mask
from .gate import Explanation, GateResult, GateRule, explain, fidelity_gate
from .readout import Readout, center_normalize_rows, preprocess_rows, resolve_row_mean
