"""Logit decomposition: ``h . w_t = base + sum_i c_i + residual_term``, for one token, many
tokens, any linear query and row-by-row margins. Nothing here gates: see :mod:`srp_jax.gate`.

Modules, one concern each: :mod:`.codes` (the vocabulary's sparse codes, computed once:
``CodeTable``, ``code_table``), :mod:`.token` (the token kernel ``token_terms`` and the
reference-parity ``decompose_token_logit``), :mod:`.batched` (``decompose_rows`` /
``decompose_tokens``: B pairs, fixed shapes, dense or sparse), :mod:`.queries` (building a
query's weights from its kind), :mod:`.linear` (``decompose_query`` / ``decompose_queries``),
:mod:`.margins` (``margin_from_rows``, ``coverage_stats``).

One meaning per field name, across every result type:

| name | meaning |
|---|---|
| ``original_logit`` / ``exact_score`` / ``exact`` | the exact score (h . w, or the query's sum) |
| ``base_term`` / ``base`` | the row-mean part: (sum alpha - m) (h . mu); h . mu for a token |
| ``feature_contributions`` / ``contributions`` | per feature: beta_i (h . d_i) (a_t z_i (h . d_i) for a token) |
| ``feature_sum`` / ``sparse_feature_sum`` | the sum of the contributions |
| ``reconstructed_logit`` / ``approx_score`` / ``sparse`` | base + feature_sum (no residual) |
| ``residual_term`` / ``resid_term`` | h . r, r = w - (mu + a x_hat) the residual *row* (part of the identity) |
| ``residual`` | exact - approx: the gate's epsilon (= residual_term up to round-off when exact = h . w) |
| ``identity_error`` | exact - (base + feature_sum + residual_term), signed; float round-off only |
| ``identity_abs_error`` | abs(h . q - exact): nonzero only when the caller's logits differ from h . W |
"""

from __future__ import annotations

from .codes import CodeTable, build_code_table, cached_code_table, clear_code_tables, code_table
from .batched import TokenDecompositions, batch_decomposition_identity_error, decompose_rows, decompose_tokens
from .linear import QueryDecomposition, QueryDecompositions, decompose_queries, decompose_query, query_terms
from .margins import VOCAB_MEAN, MarginDecomposition, coverage_stats, margin_from_rows
from .queries import QUERY_KINDS, build_query_weights, resolve_single_token
from .token import Decomposition, decompose_token_logit, token_terms

__all__ = [
    "Decomposition",
    "TokenDecompositions",
    "CodeTable",
    "build_code_table",
    "code_table",
    "cached_code_table",
    "clear_code_tables",
    "QueryDecomposition",
    "QueryDecompositions",
    "MarginDecomposition",
    "QUERY_KINDS",
    "VOCAB_MEAN",
    "token_terms",
    "query_terms",
    "decompose_token_logit",
    "decompose_rows",
    "decompose_tokens",
    "batch_decomposition_identity_error",
    "resolve_single_token",
    "build_query_weights",
    "decompose_query",
    "decompose_queries",
    "margin_from_rows",
    "coverage_stats",
]
