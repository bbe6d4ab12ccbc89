"""Feature labels: each feature's most activating readout rows, against a NumPy brute force."""

from __future__ import annotations

import numpy as np

from srp_jax import Readout
from srp_jax.labels import top_rows_by_activation


def test_top_rows_match_brute_force_across_blocks_and_ties():
    from srp_jax.config import FactorizerConfig
    from srp_jax.dictionary import Dictionary

    rng = np.random.default_rng(0)
    V, d, D = 50, 6, 9
    W = rng.standard_normal((V, d)).astype(np.float32)
    W[7] = W[3]  # an exact tie between rows 3 and 7: the lower row must come first
    readout = Readout.from_weights(W, row_token_ids=np.arange(V)[::-1])  # positions != token ids
    kernel = rng.standard_normal((d, D)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(D)).astype(np.float32)
    dic = Dictionary(config=FactorizerConfig(architecture="topk", d_features=D, k=3),
                     params={"encoder": {"kernel": kernel, "bias": bias}, "decoder": np.eye(D, d, dtype=np.float32)},
                     buffers={}, d_model=d)
    X = np.asarray(readout.rows_normalized, np.float64)
    acts = np.maximum(X @ kernel + bias, 0.0)
    for block in (7, 64):  # several blocks (with padding) and one
        ids, vals = top_rows_by_activation(dic, readout, [0, 4, 8], n=4, block=block)
        for row, f in enumerate([0, 4, 8]):
            order = np.argsort(-acts[:, f], kind="stable")[:4]
            np.testing.assert_array_equal(ids[row], np.arange(V)[::-1][order])
            np.testing.assert_allclose(vals[row], acts[order, f], rtol=1e-5, atol=1e-6)
    all_ids, _ = top_rows_by_activation(dic, readout, n=2)
    assert all_ids.shape == (D, 2)
    f_tie = int(np.argmax(acts[3]))
    got, _ = top_rows_by_activation(dic, readout, [f_tie], n=V)
    pos = [V - 1 - t for t in got[0]]  # back to positions
    assert pos.index(3) < pos.index(7)
