"""Reference sums shared by the sparse-kernel tests (the XLA loops and the native kernels)."""

from __future__ import annotations

import numpy as np


def scatter_by_hand(coef, rows, idx, width):
    """``out[idx[b, s]] += coef[b, s] * rows[b]`` (width, d) in float64, entry by entry."""
    out = np.zeros((width, rows.shape[1]), np.float64)
    for b in range(idx.shape[0]):
        for s in range(idx.shape[1]):
            out[idx[b, s]] += float(coef[b, s]) * rows[b].astype(np.float64)
    return out
