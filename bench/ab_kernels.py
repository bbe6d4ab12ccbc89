"""A/B of srp-jax's CPU kernel settings on one train step, in one process.

Each variant sets module constants of :mod:`srp_jax.factorizers.sparse` (read when the step
is traced: ``SORTED_SCATTER_BACKENDS``, ``MAX_UNROLLED_ENCODE_BLOCKS``, ``CPU_ENCODE_ELEMENTS``,
...) and compiles its own step on the same synthetic data; the steps then run alternately
(A, B, A, B, ...) so machine drift hits every variant alike. Prints each variant's median
and minimum step seconds and its last loss (variants must agree up to float summation order).

    python bench/ab_kernels.py smollm2_b4096 --prism --reps 8 \\
        "SORTED_SCATTER_BACKENDS=" "SORTED_SCATTER_BACKENDS=cpu"
    python bench/ab_kernels.py smollm2_b4096 --reps 8 \\
        MAX_UNROLLED_ENCODE_BLOCKS=0 MAX_UNROLLED_ENCODE_BLOCKS=64

    python bench/ab_kernels.py qwen35_2b_b1024 --reps 5 \\
        "LOOP_TRANSPOSE_BACKENDS=" LOOP_TRANSPOSE_ROWS=32

Each variant holds its own state and copy of the data: at the Qwen shape three variants fit in
24 GB of memory, four do not.

A variant is comma-separated NAME=VALUE pairs; a value is an int, or a tuple of backend names
separated by ``+`` (empty: none) for the ``*_BACKENDS`` constants.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def parse_variant(text: str) -> dict[str, object]:
    """``"A=1,B_BACKENDS=cpu+gpu"`` -> ``{"A": 1, "B_BACKENDS": ("cpu", "gpu")}``."""
    out: dict[str, object] = {}
    for pair in filter(None, text.split(",")):
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"ab_kernels: variant item {pair!r} is not NAME=VALUE")
        out[name] = tuple(filter(None, value.split("+"))) if name.endswith("_BACKENDS") else int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(common.SHAPES))
    ap.add_argument("variants", nargs="+", help="NAME=VALUE[,NAME=VALUE...] per variant")
    ap.add_argument("--prism", action="store_true", help="with the prism term")
    ap.add_argument("--reps", type=int, default=6, help="alternating rounds (default 6)")
    args = ap.parse_args(argv)

    from bench import srp_adapter
    from srp_jax.factorizers import sparse as S

    variants = [parse_variant(v) for v in args.variants]
    for v in variants:
        unknown = [name for name in v if not hasattr(S, name)]
        if unknown:
            raise SystemExit(f"ab_kernels: srp_jax.factorizers.sparse has no setting {', '.join(unknown)}")
    shape = common.SHAPES[args.shape]
    arrays = common.synthetic_arrays(shape)
    defaults = {name: getattr(S, name) for v in variants for name in v}
    trainers = []
    for v in variants:
        for name, value in {**defaults, **v}.items():
            setattr(S, name, value)
        trainer = srp_adapter.make_step(shape, arrays, prism=args.prism)
        t0 = time.perf_counter()
        trainer.step()  # traces and compiles under this variant's settings
        print(f"compiled {v} in {time.perf_counter() - t0:.1f} s", flush=True)
        trainers.append(trainer)
    times: list[list[float]] = [[] for _ in trainers]
    losses = [float("nan")] * len(trainers)
    for _ in range(args.reps):
        for j, trainer in enumerate(trainers):
            dt, metrics = common.timed(trainer.step)
            times[j].append(dt)
            losses[j] = metrics["loss"]
    for v, ts, loss in zip(variants, times, losses):
        print(f"{v}: median {statistics.median(ts):.3f} s  min {min(ts):.3f} s  loss {loss:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
