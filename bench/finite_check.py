"""What the divergence guard costs: the train step with its non-finite flags vs the same step
with the flags dead-code-eliminated, and reading the flags on the host every step vs at the
logging cadence (what the loop does).

    python bench/finite_check.py [--config smoke] [--block 25] [--rounds 12] [--set factorizer.d_features=4096 ...]

Prints steps/s for each variant and the ratios to the flag-free step.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from srp_jax.compile import compile_step, compiled
from srp_jax.config import load_run_config
from srp_jax.data import load_prism_dataset, row_sampling_weights
from srp_jax.train.sampling import TrainData
from srp_jax.train.state import init_train_state
from srp_jax.train.step import StepSpec, make_optimizer, make_train_step, sample_batch_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smoke")
    ap.add_argument("--block", type=int, default=25, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=12, help="interleaved blocks per variant (the median is reported)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_run_config(args.config, args.overrides)
    ds = load_prism_dataset(cfg, cfg.run.seed)
    weights = row_sampling_weights(ds, cfg.training.row_sampling)
    spec = StepSpec.build(cfg.factorizer, cfg.training, ds.d_model, ds.hidden_train.shape[0], ds.top_targets.shape[1])
    data = TrainData.from_dataset(ds, weights, spec.prism_ranks)
    optimizer = make_optimizer(cfg.training)
    step_fn = make_train_step(spec, optimizer)
    with_flags = compile_step(step_fn)

    def without(state, batch):
        state, metrics = step_fn(state, batch)
        return state, {k: v for k, v in metrics.items() if k != "nonfinite"}  # XLA drops the reductions

    no_flags = compile_step(without)
    sample = compiled(lambda d, rng, t: sample_batch_for(spec, d, rng, t))

    def fresh():
        return init_train_state(cfg.init_seed, cfg.factorizer, cfg.training, ds.d_model, optimizer, ds.rows_normalized, weights)

    states = {}

    def run(name, fn, read: str) -> float:
        """steps/s over one block of ``--block`` steps (the state carries on between blocks)."""
        state = states.pop(name) if name in states else fresh()
        pending = []
        if name not in compiled_once:
            state, m = fn(state, sample(data, state.rng, state.step + 1))  # compile
            jax.block_until_ready(state.params)
            compiled_once.add(name)
        t0 = time.perf_counter()
        for t in range(1, args.block + 1):
            state, m = fn(state, sample(data, state.rng, state.step + 1))
            if read == "every step":
                assert int(m["nonfinite"]) == 0
            elif read == "log cadence":
                pending.append(m["nonfinite"])
                if t % args.log_every == 0 or t == args.block:
                    assert not any(int(x) for x in jax.device_get(pending))
                    pending.clear()
                    float(m["loss"])
            elif t % args.log_every == 0 or t == args.block:
                float(m["loss"])
        jax.block_until_ready(state.params)
        states[name] = state
        return args.block / (time.perf_counter() - t0)

    compiled_once: set[str] = set()
    variants = {
        "no flags (baseline)": (no_flags, "none"),
        "flags, read at log cadence (the loop)": (with_flags, "log cadence"),
        "flags, read every step": (with_flags, "every step"),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # short interleaved blocks: load changes on a shared machine hit every variant
        for name, (fn, read) in variants.items():
            samples[name].append(run(name, fn, read))
    rates = {name: float(np.median(v)) for name, v in samples.items()}
    base = rates["no flags (baseline)"]
    D, B, d = cfg.factorizer.d_features, cfg.training.batch_size, ds.d_model
    print(f"{jax.devices()[0].platform}: D={D} d={d} B={B}, median of {args.rounds} interleaved blocks of {args.block} steps")
    for name, rate in rates.items():
        print(f"  {name:<40} {rate:8.1f} steps/s   x{rate / base:.3f}")


if __name__ == "__main__":
    main()
