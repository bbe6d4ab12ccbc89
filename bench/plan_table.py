"""Per-device memory of every published operating point on common slices (docs/scaling.md).

Compiles (never runs) each config's train step with `srp_jax.train.plan.plan_training` on fake
CPU devices and prints a markdown table of the per-device peak of training: the step's peak
plus the sampler's resident data (its share of rows_normalized), which stays on the
devices while the step runs:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python bench/plan_table.py

Meshes: (1, 4) = a v4-8 (4 chips, 32 GiB HBM each), (1, 8) = a v5e-8 (8 chips, 16 GiB) or
8 x H100 (80 GB) with the latent axis split, (8, 1) = 8 devices splitting only the batch.
Numbers are XLA:CPU's memory assignment: an estimate of what TPU / GPU compilers need (run
`srp-jax plan --platform native` on the target for its own numbers).
"""

from __future__ import annotations

import sys
import time

import jax

from srp_jax.config import load_run_config
from srp_jax.hub import registry
from srp_jax.train.plan import plan_training

MESHES = ((1, 4), (1, 8), (8, 1))
DEFAULT_VOCAB = 262144
HBM = {"v4-8": 32 * 2**30, "v5e-8": 16 * 2**30, "8xH100": 80e9}


def main() -> int:
    if jax.device_count() < 8:
        print("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu", file=sys.stderr)
        return 2
    only = sys.argv[1:]
    print("| operating point | D x d, k | state (all devices) | (1,4) peak | (1,8) peak | (8,1) peak | fits v4-8 / v5e-8 / 8xH100 |")
    print("|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for entry in registry():
        if only and entry.path not in only:
            continue
        cfg = load_run_config(f"paper/{entry.path}")
        vocab = entry.vocab or DEFAULT_VOCAB
        peaks = {}
        for data, model in MESHES:
            r = plan_training(cfg, data=data, model=model, d_model=entry.d_model, vocab_rows=vocab)
            assert not r.activation_gathers, (entry.path, (data, model), r.activation_gathers)
            peaks[(data, model)] = r.step_peak + r.sampler_data
            state_total = (r.params + r.opt_state) * (model if data == 1 else 1)
        fits = [
            "yes" if peaks[(1, 4)] < HBM["v4-8"] else "no",
            "yes" if peaks[(1, 8)] < HBM["v5e-8"] else "no",
            "yes" if min(peaks[(1, 8)], peaks[(8, 1)]) < HBM["8xH100"] else "no",
        ]
        print(
            f"| {entry.path} | {entry.d_features} x {entry.d_model}, {entry.k} | {state_total / 1e9:.1f} GB "
            f"| {peaks[(1, 4)] / 1e9:.2f} GB | {peaks[(1, 8)] / 1e9:.2f} GB | {peaks[(8, 1)] / 1e9:.2f} GB | {' / '.join(fits)} |",
            flush=True,
        )
    print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
