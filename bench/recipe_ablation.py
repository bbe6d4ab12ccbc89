"""The training-recipe ablation on a real payload: the shipped recipe, each paper switch alone,
all of them, and the row-seeded init's scale readings, trained one after another with the same
config, payload and seed, then tabulated (markdown, as in docs/training.md).

Each variant is one ``srp-jax train --config CONFIG --data-path DATA --out OUT/<variant>
--set ...`` run in its own process (run sequentially: they are heavy). A finished variant
(its run directory has DONE) is not retrained, so an interrupted ablation resumes where it
stopped, and rerunning with ``--table-only`` rebuilds the table from the run directories.

    python bench/recipe_ablation.py --data-path /work/data/smollm2 --out runs/recipe_ablation
    python bench/recipe_ablation.py --data-path data/smollm2 --out runs/abl300 --steps 300 \\
        --variants shipped,paper --table abl300.md
    python bench/recipe_ablation.py --list
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

PAPER_SWITCHES = ["training.init_mode=row_seeded", "training.lr_schedule=warmup_cosine", "training.lambda_mode=delayed_ramp"]
OLD_TIE = "training.row_seeded_scale=1.0"  # the first reading of row-seeding: encoder = decoder^T, unscaled

# name -> (what it is, --set overrides on top of the config). Order = table order.
RAMP70 = "training.lambda_ramp_start_frac=0.7"  # the paper's "after 70% of training"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "shipped": ("shipped recipe (constant lr and lambda, random init)", []),
    "row_seeded_tied": ("row-seeded, unscaled tie (the first reading) alone", ["training.init_mode=row_seeded", OLD_TIE]),
    "row_seeded_inv_k": ("row-seeded, encoder x 1/k, alone", ["training.init_mode=row_seeded", "training.row_seeded_scale=inv_k"]),
    "row_seeded_ls": ("row-seeded, encoder x least-squares s* (the default scale), alone",
                      ["training.init_mode=row_seeded", "training.row_seeded_scale=least_squares"]),
    "warmup_cosine": ("warmup-cosine lr alone", ["training.lr_schedule=warmup_cosine"]),
    "delayed_ramp_70": ("lambda ramp from 70% of training (the paper's) alone", ["training.lambda_mode=delayed_ramp", RAMP70]),
    "delayed_ramp": ("lambda ramp from step 1 (the default start) alone", ["training.lambda_mode=delayed_ramp"]),
    "paper_tied": ("all three, unscaled tie, ramp from 70% (the recipe of issue 15)", PAPER_SWITCHES + [OLD_TIE, RAMP70]),
    "paper_ramp70": ("all three, least-squares s*, ramp from 70%", PAPER_SWITCHES + [RAMP70]),
    "paper_lambda_const": ("row-seeded (s*) + warmup-cosine, constant lambda",
                           ["training.init_mode=row_seeded", "training.lr_schedule=warmup_cosine"]),
    "paper": ("all three with the measured defaults (s*, ramp from step 1): configs/paper/", PAPER_SWITCHES),
}
DEFAULT_VARIANTS = list(VARIANTS)

COLUMNS = (  # header, metrics.json key, format
    ("rowEV", "row_centered_ev", "{:.4f}"),
    ("top-1", "val_top1_match", "{:.4f}"),
    ("KL (bits)", "val_logit_kl_bits_mean", "{:.3f}"),
    ("dead / rare", None, None),
    ("top-1 residual frac", "top1_logit_residual_frac_mean", "{:.3f}"),
    ("train s", "train_seconds", "{:.0f}"),
)


def parse_variant(text: str) -> tuple[str, tuple[str, list[str]]]:
    """``name=key=v;key=v`` (a custom variant) -> (name, (description, overrides))."""
    name, _, rest = text.partition("=")
    if not name or not rest:
        raise SystemExit(f"--variant wants NAME=KEY=VALUE[;KEY=VALUE...], got {text!r}")
    overrides = [part.strip() for part in rest.split(";") if part.strip()]
    return name, ("custom: " + "; ".join(overrides), overrides)


def train_command(args: argparse.Namespace, name: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "srp_jax.cli.main", "train", "--config", args.config,
           "--data-path", args.data_path, "--out", str(Path(args.out) / name)]  # fmt: skip
    common = list(args.overrides)
    if args.steps is not None:
        common.append(f"training.steps={args.steps}")
    for item in common + overrides:
        cmd += ["--set", item]
    return cmd


def step1_ratio(run: Path) -> float:
    """The step-1 reconstruction loss over predicting zero (mean x^2 = 1/d for unit rows)."""
    history = json.loads((run / "history.json").read_text())["history"]
    d = int(json.loads((run / "compute_meta.json").read_text())["d_model"])
    first = next((row for row in history if row["step"] == 1), None)
    return float("nan") if first is None else float(first["reconstruction_loss"]) * d


def row_cells(run: Path) -> list[str]:
    m = json.loads((run / "metrics.json").read_text())
    cells = [f"{step1_ratio(run):.3g}"]
    for _, key, fmt in COLUMNS:
        if key is None:
            cells.append(f"{m['dead_feature_rate']:.3f} / {m['rare_feature_rate']:.3f}")
        else:
            value = m.get(key)
            cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
    return cells


def table(args: argparse.Namespace, names: list[str], variants: dict) -> str:
    head = ["variant", "switches (--set)", "rec@1 / zero"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        run = Path(args.out) / name
        switches = " ".join(f"`{o.removeprefix('training.')}`" for o in variants[name][1]) or "(none)"
        if not (run / "DONE").exists():
            lines.append(f"| {name} | {switches} | " + " | ".join(["not run"] * (len(head) - 2)) + " |")
            continue
        lines.append(f"| {name} | {switches} | " + " | ".join(row_cells(run)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n" + __doc__.split("\n\n")[-1].split("\n    ", 1)[-1])  # fmt: skip
    parser.add_argument("--config", default="smollm2-cpu", help="base config (built-in name or YAML; default smollm2-cpu)")
    parser.add_argument("--data-path", help="the payload (e.g. a SmolLM2 extraction folder)")
    parser.add_argument("--out", default="runs/recipe_ablation", help="folder of the run directories (one per variant)")
    parser.add_argument("--steps", type=int, default=None, help="training.steps for every variant (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every variant (repeatable), e.g. factorizer.d_features=4608")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated names (see --list)")
    parser.add_argument("--variant", dest="custom", action="append", default=[], metavar="NAME=KEY=V;KEY=V",
                        help="an extra variant (repeatable), e.g. 'ramp03=training.lambda_mode=delayed_ramp;"
                             "training.lambda_ramp_start_frac=0.3'")  # fmt: skip
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")
    parser.add_argument("--table-only", action="store_true", help="train nothing: tabulate the finished run directories")
    parser.add_argument("--list", action="store_true", help="list the built-in variants and exit")
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    for text in args.custom:
        name, spec = parse_variant(text)
        variants[name] = spec
    if args.list:
        for name, (what, overrides) in variants.items():
            print(f"{name:18s} {what}\n{'':18s} --set {' --set '.join(overrides) if overrides else '(none)'}")
        return 0
    names = [n for n in args.variants.split(",") if n] + [parse_variant(t)[0] for t in args.custom]
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise SystemExit(f"unknown variant(s): {', '.join(unknown)} (see --list)")
    if not args.table_only:
        if not args.data_path:
            raise SystemExit("--data-path is required to train (or use --table-only)")
        for name in names:
            cmd = train_command(args, name, variants[name][1])
            print("[ablation] " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            print(f"[ablation] {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if rc != 0:
                return rc
    text = table(args, names, variants)
    print(text, end="")
    if args.table:
        Path(args.table).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
