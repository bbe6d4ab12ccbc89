"""One measurement in a fresh process: ``python -m bench.worker SPEC_JSON OUT_JSON``.

``bench/run.py`` starts one worker per (implementation, task, shape, repetition), so each
implementation imports only its own framework (the srp-jax worker never imports torch) and its
peak memory is its own. SPEC_JSON keys: ``task`` (train | decompose_query | decompose_batched |
recon | matmul), ``impl`` (srp | torch | sparsify; matmul: srp = XLA, torch), ``shape`` (a name
in ``bench.common.SHAPES``) and task options (``steps``, ``prism``, ``strategy``, ``queries``,
``sparse``, ``n``, ``optimizer``, ``seed``, ``repeats``); or ``{"jobs": [spec, ...]}`` to run
several such measurements in one process (for those that report no memory). The result (JSON)
goes to OUT_JSON.

Memory: after the data are in the framework's arrays and the set-up copies are freed, the
kernel's peak-RSS counter is reset (``clear_refs``), so ``peak_rss_bytes`` is the peak of the
process while it holds the data and runs warm-up and timed steps, without set-up transients.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

import numpy as np

from . import common
from .common import SHAPES, peak_rss_bytes, reset_peak_rss, rss_bytes, synthetic_arrays

QUERY_SEED = 1234


def _queries(arrays: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hidden states (n, d), token ids (n,)): pool states in order, uniformly random tokens."""
    rng = np.random.default_rng(QUERY_SEED)
    H = arrays["hidden"]
    h = H[np.arange(n) % H.shape[0]]
    return np.ascontiguousarray(h), rng.integers(0, arrays["W_U"].shape[0], n)


def _train(spec: dict[str, Any], shape: common.Shape) -> dict[str, Any]:
    impl, steps, prism = spec["impl"], int(spec.get("steps", 3)), bool(spec.get("prism", True))
    seed = int(spec.get("seed", 0))
    t0 = time.perf_counter()
    arrays = synthetic_arrays(shape, seed=0)
    if impl == "srp":
        from . import srp_adapter

        trainer = srp_adapter.make_step(shape, arrays, strategy=spec.get("strategy", srp_adapter.DEFAULT_STRATEGY), prism=prism, seed=seed)
    elif impl == "torch":
        from . import torch_reference as tr

        data = tr.RefData.from_arrays(arrays)
        trainer = tr.TorchReference(
            data, shape.D, shape.k, batch_size=shape.batch, lr=common.LR, weight_decay=common.WEIGHT_DECAY,
            lambda_prism=common.LAMBDA_PRISM if prism else 0.0, code_l2=common.CODE_L2, seed=seed,
        )
    elif impl == "sparsify":
        from . import sparsify_adapter

        if prism:
            raise ValueError("sparsify has no prism term: run it with prism false")
        trainer = sparsify_adapter.SparsifyStep(shape, arrays, optimizer=spec.get("optimizer", "adam"), seed=seed)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    if impl != "torch":  # torch shares the NumPy buffers; the others copied them
        del arrays
    gc.collect()
    setup_s = time.perf_counter() - t0
    reset_ok = reset_peak_rss()
    rss_setup = rss_bytes()
    first_s, first = common.timed(trainer.step)
    # untimed warm-up steps, the same count for every implementation (spec "warmup"): where a
    # step takes milliseconds its first few after the first call still run slow (allocator,
    # thread pools and caches settling) and would weigh on a short median
    for _ in range(int(spec.get("warmup", 0))):
        trainer.step()
    first_peak = peak_rss_bytes()
    # the steady state: the peak over the timed steps only (the first call compiles, and XLA's
    # first executions allocate transient buffers a training run sees once)
    steady_reset = reset_peak_rss()
    times, losses = [], [first["loss"]]
    for _ in range(steps):
        dt, m = common.timed(trainer.step)
        times.append(dt)
        losses.append(m["loss"])
    return {
        "setup_s": setup_s, "first_call_s": first_s, "step_s": times, "losses": losses,
        "rss_after_setup_bytes": rss_setup, "first_call_peak_rss_bytes": first_peak,
        "steady_peak_rss_bytes": peak_rss_bytes() if steady_reset else None,
        "peak_rss_bytes": max(x for x in (first_peak, peak_rss_bytes()) if x is not None) if first_peak else peak_rss_bytes(),
        "peak_reset": reset_ok and steady_reset,
        "finite": bool(np.all(np.isfinite(losses))),
        **({"strategy": trainer.spec.strategy, "native_kernels": _native_kernels()} if impl == "srp" else {}),
    }


def _native_kernels() -> bool:
    """Whether srp-jax's steps here called its native CPU kernels (srp_jax._native)."""
    from srp_jax.factorizers import sparse as S

    return bool(S.native_kernels())


def _dictionary_state(shape: common.Shape) -> dict[str, np.ndarray]:
    return common.init_factorizer_arrays(shape.d, shape.D, seed=0)


def _decompose_query(spec: dict[str, Any], shape: common.Shape) -> dict[str, Any]:
    impl, n = spec["impl"], int(spec.get("queries", 200))
    arrays = synthetic_arrays(shape, seed=0)
    state = _dictionary_state(shape)
    H, ids = _queries(arrays, n + 5)
    if impl == "srp":
        from . import srp_adapter

        model = srp_adapter.make_dictionary(state, shape.k)

        def one(i):
            return srp_adapter.decompose_per_query(model, arrays, H[i], int(ids[i]))
    elif impl == "torch":
        import torch

        from . import torch_reference as tr

        model = tr.TopKFactorizer(shape.d, shape.D, shape.k)
        model.load_state_dict({key: torch.from_numpy(v) for key, v in state.items()})
        t = {key: torch.from_numpy(np.asarray(v)) for key, v in arrays.items() if key != "sample_weights"}
        Ht = torch.from_numpy(H)

        def one(i):
            tok = int(ids[i])
            out = tr.decompose_token_logit(Ht[i], t["W_U"][tok], t["row_mean"], t["row_norms"][tok],
                                           t["rows_normalized"][tok], model, shape.k)
            return float(out["feature_sum"]), float(out["residual_term"])
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    t0 = time.perf_counter()
    for i in range(n, n + 5):  # warm-up: the first call compiles (srp) / allocates (torch)
        one(i)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    checks = [one(i) for i in range(n)]
    dt = time.perf_counter() - t0
    fs = np.array([c[0] for c in checks], np.float64)
    return {"seconds": dt, "queries": n, "queries_per_s": n / dt, "warmup_s": warm,
            "check_feature_sum": fs.tolist()}


def _decompose_batched(spec: dict[str, Any], shape: common.Shape) -> dict[str, Any]:
    from . import srp_adapter

    n, sparse, repeats = int(spec.get("queries", 4096)), bool(spec.get("sparse", True)), int(spec.get("repeats", 3))
    arrays = synthetic_arrays(shape, seed=0)
    model = srp_adapter.make_dictionary(_dictionary_state(shape), shape.k)
    readout = srp_adapter.make_readout(arrays)
    H, ids = _queries(arrays, n)
    first_s, (fs, _) = common.timed(srp_adapter.decompose_batched, model, readout, H, ids, sparse=sparse)
    times = [common.timed(srp_adapter.decompose_batched, model, readout, H, ids, sparse=sparse)[0]
             for _ in range(repeats)]
    best = float(np.median(times))
    table_s = srp_adapter.code_table_seconds(model, readout) if sparse else None
    return {"seconds": times, "queries": n, "queries_per_s": n / best, "first_call_s": first_s,
            "check_feature_sum": fs[:200].astype(np.float64).tolist(),
            **({"code_table_s": table_s} if table_s is not None else {})}


def _recon(spec: dict[str, Any], shape: common.Shape) -> dict[str, Any]:
    # row_batch: srp-jax's default is its own (per backend); the reference encodes in blocks of 1024
    impl, repeats, row_batch = spec["impl"], int(spec.get("repeats", 2)), spec.get("row_batch")
    arrays = synthetic_arrays(shape, seed=0)
    n_rows = min(int(spec.get("rows") or shape.V), shape.V)  # a prefix of the vocabulary (quick mode)
    for key in ("rows_normalized", "row_norms", "W_U"):
        arrays[key] = arrays[key][:n_rows]
    state = _dictionary_state(shape)
    if impl == "srp":
        from . import srp_adapter

        model = srp_adapter.make_dictionary(state, shape.k)

        def run():
            return np.asarray(srp_adapter.reconstruct_all(model, arrays, None if row_batch is None else int(row_batch)))
    elif impl == "torch":
        import torch

        from . import torch_reference as tr

        model = tr.TopKFactorizer(shape.d, shape.D, shape.k)
        model.load_state_dict({key: torch.from_numpy(v) for key, v in state.items()})
        X, mu, A = (torch.from_numpy(arrays[key]) for key in ("rows_normalized", "row_mean", "row_norms"))

        def run():
            return tr.reconstruct_rows(model, X, mu, A, shape.k, int(row_batch or 1024))[0].numpy()
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    first_s, recon = common.timed(run)
    times = [common.timed(run)[0] for _ in range(repeats)]
    best = float(np.median(times))
    mse = float(np.mean((recon.astype(np.float64) - arrays["rows_normalized"]) ** 2))
    return {"seconds": times, "rows": n_rows, "rows_per_s": n_rows / best, "first_call_s": first_s,
            "check_mse": mse}


def _matmul(spec: dict[str, Any]) -> dict[str, Any]:
    n, repeats = int(spec.get("n", 4096)), int(spec.get("repeats", 3))
    if spec["impl"] == "srp":
        from . import srp_adapter

        times = srp_adapter.matmul_seconds(n, repeats)
    else:
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = [common.timed(torch.matmul, a, b)[0] for _ in range(repeats)]
    best = min(times)
    return {"seconds": times, "n": n, "gflops": common.matmul_flops(n) / best / 1e9}


def _versions(impl: str) -> dict[str, Any]:
    if impl == "srp":
        from . import srp_adapter

        return srp_adapter.versions()
    import torch

    out = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if impl == "sparsify":
        from . import sparsify_adapter

        out.update(sparsify_adapter.versions())
    return out


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    task = spec["task"]
    shape = SHAPES[spec["shape"]] if "shape" in spec else None
    if task == "train":
        out = _train(spec, shape)
    elif task == "decompose_query":
        out = _decompose_query(spec, shape)
    elif task == "decompose_batched":
        out = _decompose_batched(spec, shape)
    elif task == "recon":
        out = _recon(spec, shape)
    elif task == "matmul":
        out = _matmul(spec)
    else:
        raise ValueError(f"unknown task {task!r}")
    out["versions"] = _versions(spec["impl"])
    out["spec"] = spec
    out["pid"] = os.getpid()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.worker SPEC_JSON OUT_JSON", file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    if "jobs" in spec:  # several measurements that need no clean memory share one process
        result = {"results": [run_spec(job) for job in spec["jobs"]]}
    else:
        result = run_spec(spec)
    with open(args[1] + ".tmp", "w") as fh:
        json.dump(result, fh)
    os.replace(args[1] + ".tmp", args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
