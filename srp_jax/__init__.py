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

import importlib as _importlib

from ._version import __version__
from .errors import __all__ as _error_names

# Public names -> (submodule, attribute); imported on first access (PEP 562), so that
# ``import srp_jax`` and ``srp-jax --help`` stay fast and jax is loaded only when used.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "factorizers": ("factorizers", None),
    "hub": ("hub", None),
    "metrics": ("metrics", None),
    "is_srp_checkpoint": ("checkpoint", 'is_srp_checkpoint'),
    "save_dictionary": ("checkpoint", 'save_dictionary'),
    "ARCHITECTURES": ("config", 'ARCHITECTURES'),
    "EvaluationConfig": ("config", 'EvaluationConfig'),
    "FactorizerConfig": ("config", 'FactorizerConfig'),
    "RunConfig": ("config", 'RunConfig'),
    "load_run_config": ("config", 'load_run_config'),
    "resolve_eval_k": ("config", 'resolve_eval_k'),
    "PrismDataset": ("data", 'PrismDataset'),
    "load_prism_dataset": ("data", 'load_prism_dataset'),
    "make_synthetic_data": ("data", 'make_synthetic_data'),
    "Decomposition": ("decompose", 'Decomposition'),
    "MarginDecomposition": ("decompose", 'MarginDecomposition'),
    "QueryDecomposition": ("decompose", 'QueryDecomposition'),
    "QueryDecompositions": ("decompose", 'QueryDecompositions'),
    "TokenDecompositions": ("decompose", 'TokenDecompositions'),
    "batch_decomposition_identity_error": ("decompose", 'batch_decomposition_identity_error'),
    "build_query_weights": ("decompose", 'build_query_weights'),
    "coverage_stats": ("decompose", 'coverage_stats'),
    "decompose_query": ("decompose", 'decompose_query'),
    "decompose_queries": ("decompose", 'decompose_queries'),
    "decompose_rows": ("decompose", 'decompose_rows'),
    "CodeTable": ("decompose", 'CodeTable'),
    "code_table": ("decompose", 'code_table'),
    "decompose_token_logit": ("decompose", 'decompose_token_logit'),
    "decompose_tokens": ("decompose", 'decompose_tokens'),
    "margin_from_rows": ("decompose", 'margin_from_rows'),
    "Dictionary": ("dictionary", 'Dictionary'),
    "load_dictionary": ("dictionary", 'load_dictionary'),
    "load_factorizer": ("dictionary", 'load_factorizer'),
    "CheckpointError": ("errors", 'CheckpointError'),
    "ConfigError": ("errors", 'ConfigError'),
    "DependencyError": ("errors", 'DependencyError'),
    "HubError": ("errors", 'HubError'),
    "MissingConfigError": ("errors", 'MissingConfigError'),
    "MissingKeyError": ("errors", 'MissingKeyError'),
    "NonFiniteError": ("errors", 'NonFiniteError'),
    "ShapeError": ("errors", 'ShapeError'),
    "StateDictShapeError": ("errors", 'StateDictShapeError'),
    "SrpError": ("errors", 'SrpError'),
    "ThresholdNotReadyError": ("errors", 'ThresholdNotReadyError'),
    "UnexpectedKeyError": ("errors", 'UnexpectedKeyError'),
    "FactorizerBatch": ("factorizers", 'FactorizerBatch'),
    "FactorizerOutput": ("factorizers", 'FactorizerOutput'),
    "decode": ("factorizers", 'decode'),
    "encode": ("factorizers", 'encode'),
    "forward": ("factorizers", 'forward'),
    "init_factorizer": ("factorizers", 'init_factorizer'),
    "topk_mask": ("factorizers", 'topk_mask'),
    "Explanation": ("gate", 'Explanation'),
    "GateResult": ("gate", 'GateResult'),
    "GateRule": ("gate", 'GateRule'),
    "explain": ("gate", 'explain'),
    "fidelity_gate": ("gate", 'fidelity_gate'),
    "fetch_checkpoint": ("hub", 'fetch_checkpoint'),
    "evaluate": ("metrics", 'evaluate'),
    "BatchTopKSAE": ("modules", 'BatchTopKSAE'),
    "GatedSAE": ("modules", 'GatedSAE'),
    "JumpReLUSAE": ("modules", 'JumpReLUSAE'),
    "L1ReLUSAE": ("modules", 'L1ReLUSAE'),
    "SAEBase": ("modules", 'SAEBase'),
    "TopKSAE": ("modules", 'TopKSAE'),
    "bind_dictionary": ("modules", 'bind_dictionary'),
    "build_factorizer": ("modules", 'build_factorizer'),
    "module_from_dictionary": ("modules", 'module_from_dictionary'),
    "Readout": ("readout", 'Readout'),
    "center_normalize_rows": ("readout", 'center_normalize_rows'),
    "preprocess_rows": ("readout", 'preprocess_rows'),
    "resolve_row_mean": ("readout", 'resolve_row_mean'),
    "TrainState": ("train", 'TrainState'),
}
_EXPORTS.update({name: ("errors", name) for name in _error_names})


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        import importlib.util

        # a submodule (``srp_jax.modules`` after ``import srp_jax``), as an eager package gives
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'srp_jax' has no attribute {name!r}") from None
        module, attr = name, None
    value = _importlib.import_module(f".{module}", __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "__version__",
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
    "CodeTable",
    "code_table",
    "decompose_tokens",
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
__all__ += list(_error_names)
