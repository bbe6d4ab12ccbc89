"""srp-jax against a plain PyTorch trainer and eai-sparsify, measured side by side in one run.

Measures, on this machine, in one run (see bench/README.md for what each number means):

* train-step seconds and peak memory, srp-jax vs the PyTorch reference (prism term on), at the
  smoke shape, SmolLM2 16x/k128 at batch 1024 and 4096, and a Qwen3.5-2B-shaped step;
* train-step seconds without the prism term, srp-jax vs eai-sparsify's SparseCoder step;
* decomposition queries/s (per query: both; batched: srp-jax) and full-vocabulary
  encode + decode rows/s (both), at the SmolLM2 shape;
* the dense float32 matmul peak of each framework, and the fraction of it each step reaches for
  the FLOPs it must do.

Every measurement runs in a fresh subprocess (bench/worker.py); implementations alternate
(A, B, A, B) so drift hits both; warm-up (jit compile) is excluded and reported apart.

Examples:
  python bench/run.py --quick                 # a few minutes: smoke + SmolLM2 b1024
  python bench/run.py --json results.json     # everything (tens of minutes on 2 cores)
  python bench/run.py --smoke                 # seconds-scale harness check on a tiny shape
  python bench/run.py --shapes smollm2_b4096 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import SHAPES  # noqa: E402

INFERENCE_SHAPE = "smollm2_b1024"  # decomposition and reconstruction use its dictionary and readout
HEADLINE_ORDER = ("smollm2_b4096", "smollm2_b1024", "qwen35_2b_b1024", "smoke", "tiny")

MODES: dict[str, dict[str, Any]] = {
    "full": {
        "shapes": ["smoke", "smollm2_b1024", "smollm2_b4096", "qwen35_2b_b1024"],
        "steps": {"smoke": 100, "smollm2_b1024": 3, "smollm2_b4096": 2, "qwen35_2b_b1024": 2},
        "warmup": {"smoke": 20},
        "rounds": 2, "queries": 300, "batched_queries": 4096, "recon_repeats": 2, "recon_rows": None,
        "matmul_n": 4096, "matmul_repeats": 3, "inference_shape": INFERENCE_SHAPE,
    },
    "quick": {
        "shapes": ["smoke", "smollm2_b1024"],
        "steps": {"smoke": 60, "smollm2_b1024": 2},
        "warmup": {"smoke": 20},
        "rounds": 2, "queries": 100, "batched_queries": 2048, "recon_repeats": 1, "recon_rows": 12288,
        "matmul_n": 4096, "matmul_repeats": 2, "inference_shape": INFERENCE_SHAPE,
    },
    "smoke": {
        "shapes": ["tiny"],
        "steps": {"tiny": 2},
        "rounds": 2, "queries": 10, "batched_queries": 64, "recon_repeats": 1, "recon_rows": None,
        "matmul_n": 256, "matmul_repeats": 2, "inference_shape": "tiny",
    },
}


# --------------------------------------------------------------------------------------------
# Machine and versions


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_hugepages(path: Path = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word of ``path``, e.g.
    ``always [madvise] never`` -> ``madvise``), or None where the file is absent."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return chosen[0] if chosen else None


def machine_info() -> dict[str, Any]:
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    dirty = _git("status", "--porcelain")
    return {
        "cpu_model": common.cpu_model(),
        "cores": common.usable_cores(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(dist) for name, dist in (
            ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"), ("torch", "torch"),
            ("numpy", "numpy"), ("eai_sparsify", "eai-sparsify"), ("srp_jax", "srp-jax"))},
        "transparent_hugepage": transparent_hugepages(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "load_average_start": os.getloadavg(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def sparsify_available() -> bool:
    return _version("eai-sparsify") is not None and _version("torch") is not None


# --------------------------------------------------------------------------------------------
# Running workers


class Runner:
    """Starts workers one at a time and keeps every raw result."""

    def __init__(self, timeout: float, verbose: bool = True) -> None:
        self.timeout = timeout
        self.verbose = verbose
        self.raw: list[dict[str, Any]] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="srp-bench-")

    def __call__(self, spec: dict[str, Any], label: str) -> dict[str, Any]:
        out = Path(self.tmp.name) / f"r{len(self.raw)}.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   SPARSIFY_DISABLE_TRITON="1")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec), str(out)], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=self.timeout)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            rc, err = -1, f"timed out after {self.timeout:.0f} s"
        wall = time.perf_counter() - t0
        if rc == 0 and out.exists():
            result = json.loads(out.read_text())
        else:
            tail = (err or "").strip().splitlines()[-3:]
            result = {"error": f"worker exited {rc}: " + " | ".join(tail), "spec": spec}
        result["label"], result["wall_s"] = label, wall
        self.raw.append(result)
        if self.verbose:
            status = "ok" if "error" not in result else result["error"]
            print(f"  [{len(self.raw):3d}] {label:<44s} {wall:7.1f} s  {status}", file=sys.stderr, flush=True)
        return result


def interleaved(runner: Runner, specs: dict[str, dict[str, Any]], rounds: int, label: str) -> dict[str, list]:
    """Run each implementation's spec once per round, alternating (A, B, A, B, ...)."""
    out: dict[str, list] = {impl: [] for impl in specs}
    for r in range(rounds):
        for impl, spec in specs.items():
            out[impl].append(runner(spec, f"{label} {impl} #{r + 1}"))
    return out


# --------------------------------------------------------------------------------------------
# Aggregation


def _ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if "error" not in r]


def summarize_train(results: list[dict[str, Any]]) -> dict[str, Any]:
    good = _ok(results)
    if not good:
        return {"error": results[0].get("error", "no result") if results else "not run"}
    steps = [t for r in good for t in r["step_s"]]
    median = statistics.median(steps)
    first = statistics.median(r["first_call_s"] for r in good)
    peaks = [r["peak_rss_bytes"] for r in good if r.get("peak_rss_bytes")]
    steady = [r["steady_peak_rss_bytes"] for r in good if r.get("steady_peak_rss_bytes")]
    return {
        "step_s": median, "step_s_min": min(steps), "step_s_all": steps,
        "first_call_s": first, "warmup_extra_s": max(first - median, 0.0),
        "peak_rss_bytes": max(peaks) if peaks else None,
        "steady_peak_rss_bytes": max(steady) if steady else None,
        "rss_after_setup_bytes": max((r["rss_after_setup_bytes"] or 0) for r in good) or None,
        "finite": all(r["finite"] for r in good), "rounds": len(good),
        **({"strategy": good[0]["strategy"]} if "strategy" in good[0] else {}),
    }


def summarize_rate(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    good = _ok(results)
    if not good:
        return {"error": results[0].get("error", "no result") if results else "not run"}
    rates = [r[key] for r in good]
    out = {key: statistics.median(rates), f"{key}_all": rates, "rounds": len(good)}
    for extra in ("first_call_s", "warmup_s", "code_table_s"):
        if extra in good[0]:
            out[extra] = statistics.median(r[extra] for r in good)
    return out


def _agreement(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float | None:
    """Largest relative difference of a cross-check value between two implementations."""
    ga, gb = _ok(a), _ok(b)
    if not ga or not gb or key not in ga[0] or key not in gb[0]:
        return None
    va, vb = ga[0][key], gb[0][key]
    if isinstance(va, list):
        n = min(len(va), len(vb))
        scale = max(max(abs(x) for x in va[:n]), 1e-30)
        return max(abs(x - y) for x, y in zip(va[:n], vb[:n])) / scale
    return abs(va - vb) / max(abs(va), 1e-30)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


# --------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(mode: str, shapes: list[str], rounds: int, strategy: str, sparsify_optimizer: str,
                  skip_sparsify: bool, timeout: float) -> dict[str, Any]:
    cfg = MODES[mode]
    runner = Runner(timeout)
    machine = machine_info()
    t_start = time.perf_counter()
    report: dict[str, Any] = {"mode": mode, "machine": machine, "config": {
        "shapes": {name: SHAPES[name].to_dict() for name in shapes}, "rounds": rounds, "strategy": strategy,
        "lr": common.LR, "weight_decay": common.WEIGHT_DECAY, "lambda_prism": common.LAMBDA_PRISM,
        "code_l2": common.CODE_L2, "sparsify_optimizer": sparsify_optimizer, "steps": cfg["steps"],
        "warmup_steps": cfg.get("warmup", {}),
        "queries": cfg["queries"], "batched_queries": cfg["batched_queries"], "matmul_n": cfg["matmul_n"],
        "recon_rows": cfg["recon_rows"] or SHAPES[cfg["inference_shape"]].V,
        "inference_shape": cfg["inference_shape"],
    }}
    with_sparsify = not skip_sparsify and sparsify_available()
    if not with_sparsify:
        report["sparsify_skipped"] = ("--skip-sparsify" if skip_sparsify else
                                      "eai-sparsify not installed (pip install -e \".[bench]\")")

    # 1. the machine's dense matmul peak, in both frameworks
    n = cfg["matmul_n"]
    rep_mm = cfg["matmul_repeats"]
    mm = interleaved(runner, {"srp": {"task": "matmul", "impl": "srp", "n": n, "repeats": rep_mm},
                              "torch": {"task": "matmul", "impl": "torch", "n": n, "repeats": rep_mm}},
                     rounds, f"matmul {n}")
    matmul = {impl: summarize_rate(res, "gflops") for impl, res in mm.items()}
    peaks = [max(s["gflops_all"]) for s in matmul.values() if "gflops_all" in s]
    peak_gflops = max(peaks) if peaks else None
    report["matmul"] = {**matmul, "peak_gflops": peak_gflops}

    # 2. train steps, prism on: srp-jax vs the torch reference; 3. no prism: srp-jax vs sparsify
    train: dict[str, Any] = {}
    for name in shapes:
        shape = SHAPES[name]
        steps = cfg["steps"].get(name, 2)
        base = {"task": "train", "shape": name, "steps": steps, "warmup": cfg.get("warmup", {}).get(name, 0)}
        res = interleaved(runner, {"srp": {**base, "impl": "srp", "prism": True, "strategy": strategy},
                                   "torch": {**base, "impl": "torch", "prism": True}}, rounds, f"train {name} prism")
        entry = {"prism": {impl: summarize_train(r) for impl, r in res.items()}}
        flops = common.train_step_flops(shape, prism=True)
        entry["prism"]["flops"] = flops
        if with_sparsify:
            res = interleaved(runner, {
                "srp": {**base, "impl": "srp", "prism": False, "strategy": strategy},
                "sparsify": {**base, "impl": "sparsify", "prism": False, "optimizer": sparsify_optimizer},
            }, rounds, f"train {name} no-prism")
            entry["no_prism"] = {impl: summarize_train(r) for impl, r in res.items()}
            entry["no_prism"]["flops"] = common.train_step_flops(shape, prism=False)
        for block in ("prism", "no_prism"):
            if block not in entry:
                continue
            flops_req = entry[block]["flops"]["required"]
            for impl, summary in entry[block].items():
                if impl != "flops" and "step_s" in summary and peak_gflops:
                    summary["fraction_of_peak"] = flops_req / summary["step_s"] / (peak_gflops * 1e9)
        entry["speedup_vs_torch"] = _ratio(entry["prism"]["torch"].get("step_s"), entry["prism"]["srp"].get("step_s"))
        entry["memory_ratio_vs_torch"] = _ratio(entry["prism"]["srp"].get("peak_rss_bytes"),
                                                entry["prism"]["torch"].get("peak_rss_bytes"))
        entry["steady_memory_ratio_vs_torch"] = _ratio(entry["prism"]["srp"].get("steady_peak_rss_bytes"),
                                                       entry["prism"]["torch"].get("steady_peak_rss_bytes"))
        if "no_prism" in entry:
            entry["speedup_vs_sparsify"] = _ratio(entry["no_prism"]["sparsify"].get("step_s"),
                                                  entry["no_prism"]["srp"].get("step_s"))
        train[name] = entry
    report["train"] = train

    # 4. decomposition and full-vocabulary reconstruction (one process per implementation per round)
    ish = cfg["inference_shape"]
    q = {"shape": ish, "queries": cfg["queries"]}
    recon_opts = {"shape": ish, "repeats": cfg["recon_repeats"], "rows": cfg["recon_rows"]}
    srp_jobs = [{"task": "decompose_query", "impl": "srp", **q},
                {"task": "decompose_batched", "impl": "srp", "shape": ish, "queries": cfg["batched_queries"],
                 "sparse": True},
                {"task": "decompose_batched", "impl": "srp", "shape": ish, "queries": cfg["batched_queries"],
                 "sparse": False},
                {"task": "recon", "impl": "srp", **recon_opts}]
    torch_jobs = [{"task": "decompose_query", "impl": "torch", **q}, {"task": "recon", "impl": "torch", **recon_opts}]
    inf = interleaved(runner, {"srp": {"jobs": srp_jobs, "impl": "srp"}, "torch": {"jobs": torch_jobs, "impl": "torch"}},
                      rounds, f"decompose+recon {ish}")

    def pick(impl: str, i: int) -> list[dict[str, Any]]:
        return [r["results"][i] if "results" in r else r for r in inf[impl]]

    per_query = {"srp": pick("srp", 0), "torch": pick("torch", 0)}
    recon = {"srp": pick("srp", 3), "torch": pick("torch", 1)}
    report["decompose"] = {
        "per_query": {impl: summarize_rate(r, "queries_per_s") for impl, r in per_query.items()},
        "batched_sparse": {"srp": summarize_rate(pick("srp", 1), "queries_per_s")},
        "batched_dense": {"srp": summarize_rate(pick("srp", 2), "queries_per_s")},
        "agreement_rel": _agreement(per_query["srp"], per_query["torch"], "check_feature_sum"),
        "batched_vs_per_query_agreement_rel": _agreement(pick("srp", 1), per_query["torch"], "check_feature_sum"),
    }
    report["recon"] = {impl: summarize_rate(r, "rows_per_s") for impl, r in recon.items()}
    report["recon"]["agreement_rel"] = _agreement(recon["srp"], recon["torch"], "check_mse")

    # 5. headline ratios
    head = next((s for s in HEADLINE_ORDER if s in train), shapes[0] if shapes else None)
    dq = report["decompose"]
    report["ratios"] = {
        "headline_shape": head,
        "train_step_speedup": train[head]["speedup_vs_torch"] if head else None,
        "sparsify_speedup": train[head].get("speedup_vs_sparsify") if head else None,
        "decompose_speedup": _ratio(dq["batched_sparse"]["srp"].get("queries_per_s"),
                                    dq["per_query"]["torch"].get("queries_per_s")),
        "recon_speedup": _ratio(report["recon"]["srp"].get("rows_per_s"), report["recon"]["torch"].get("rows_per_s")),
        "per_query_speedup": _ratio(dq["per_query"]["srp"].get("queries_per_s"),
                                    dq["per_query"]["torch"].get("queries_per_s")),
        "train_step_speedup_min": min((e["speedup_vs_torch"] for e in train.values() if e["speedup_vs_torch"]),
                                      default=None),
    }
    machine["load_average_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - t_start
    report["raw"] = runner.raw
    report["errors"] = [r["label"] + ": " + r["error"] for r in runner.raw if "error" in r]
    return report


# --------------------------------------------------------------------------------------------
# Output


def _fmt(x: Any, spec: str = ".3g", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _mem(s: dict[str, Any]) -> str:
    """'steady / whole' peak RSS of one train summary (the whole includes the first call)."""
    steady, whole = s.get("steady_peak_rss_bytes"), s.get("peak_rss_bytes")
    return _gb(whole) if steady is None else f"{_gb(steady)} / {_gb(whole)}"


def _gb(x: int | None) -> str:
    return "n/a" if not x else f"{x / 1e9:.2f} GB"


def _memory_line(m: dict[str, Any]) -> str:
    if "transparent_hugepage" not in m:  # a report saved before these were recorded
        return "memory environment not recorded"
    return f"transparent huge pages {m['transparent_hugepage'] or 'n/a'}, GLIBC_TUNABLES {m['glibc_tunables'] or 'unset'}"


def _native_line(rep: dict[str, Any]) -> str:
    """Whether srp-jax's train steps ran its native CPU kernels (srp_jax._native), from the
    workers' reports: on, off, mixed, or not recorded (older reports)."""
    seen = {r["native_kernels"] for r in rep.get("raw", []) if isinstance(r, dict) and "native_kernels" in r}
    if not seen:
        return "srp-jax native CPU kernels not recorded"
    return "srp-jax native CPU kernels " + ("on" if seen == {True} else "off" if seen == {False} else "mixed")


def format_table(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        f"srp-jax benchmark ({rep['mode']}) - {m['cpu_model']}, {m['cores']} cores, "
        f"jax {m['versions']['jax']}, torch {m['versions']['torch']}, eai-sparsify {m['versions']['eai_sparsify']}, "
        f"git {str(m['git_commit'])[:10]}{'+dirty' if m['git_dirty'] else ''}",
        f"load average at start {m['load_average_start'][0]:.2f}, at end {m.get('load_average_end', [float('nan')])[0]:.2f}"
        " (other jobs on the machine skew both sides)",
        f"{_memory_line(m)}; {_native_line(rep)}",
        "",
        f"dense f32 matmul peak: XLA {_fmt(rep['matmul']['srp'].get('gflops'), '.1f')} GFLOP/s, torch "
        f"{_fmt(rep['matmul']['torch'].get('gflops'), '.1f')} GFLOP/s -> peak {_fmt(rep['matmul']['peak_gflops'], '.1f')}",
        "",
        "train step (median s; peak RSS over the timed steps / including the first, compiling call; fraction of matmul peak for the required FLOPs; warm-up extra s)",
        f"{'shape':<18} {'work':<10} {'impl':<12} {'step s':>9} {'peak RSS steady / all':>18} {'%peak':>7} {'warm-up':>8}  speedup",
    ]
    for name, e in rep["train"].items():
        for block, other in (("prism", "torch"), ("no_prism", "sparsify")):
            if block not in e:
                continue
            speed = e["speedup_vs_torch"] if block == "prism" else e.get("speedup_vs_sparsify")
            for impl in ("srp", other):
                s = e[block][impl]
                if "error" in s:
                    lines.append(f"{name:<18} {block:<10} {impl:<12} error: {s['error'][:60]}")
                    continue
                frac = s.get("fraction_of_peak")
                label = f"{impl}/{s['strategy']}" if "strategy" in s else impl
                lines.append(
                    f"{name:<18} {block:<10} {label:<12} {s['step_s']:9.4f} {_mem(s):>18} "
                    f"{_fmt(None if frac is None else 100 * frac, '.1f'):>6}% {s['warmup_extra_s']:8.2f}"
                    + (f"  {_fmt(speed, '.2f')}x" if impl == "srp" else "")
                )
    d = rep["decompose"]
    vocab = SHAPES[rep["config"]["inference_shape"]].V
    lines += [
        "",
        f"decomposition at {rep['config']['inference_shape']} (queries/s)",
        f"  per query   srp-jax decompose_token_logit {_fmt(d['per_query']['srp'].get('queries_per_s'), '.1f')}"
        f"   torch {_fmt(d['per_query']['torch'].get('queries_per_s'), '.1f')}"
        f"   (agree to {_fmt(d['agreement_rel'], '.1e')} rel)",
        f"  batched     srp-jax decompose_tokens sparse {_fmt(d['batched_sparse']['srp'].get('queries_per_s'), '.1f')}"
        f"   dense {_fmt(d['batched_dense']['srp'].get('queries_per_s'), '.1f')}"
        f"   (sparse reads the vocabulary's CodeTable, built once in "
        f"{_fmt(d['batched_sparse']['srp'].get('code_table_s'), '.2f')} s)",
        f"full-vocabulary encode+decode ({rep['config']['recon_rows']} of {vocab} rows; rows/s): "
        f"srp-jax {_fmt(rep['recon']['srp'].get('rows_per_s'), '.1f')}"
        f"   torch {_fmt(rep['recon']['torch'].get('rows_per_s'), '.1f')}"
        f"   (MSE agree to {_fmt(rep['recon']['agreement_rel'], '.1e')} rel)",
    ]
    if rep.get("sparsify_skipped"):
        lines.append(f"sparsify comparison skipped: {rep['sparsify_skipped']}")
    for err in rep["errors"]:
        lines.append(f"ERROR {err}")
    r = rep["ratios"]
    lines += [
        "",
        f"headline shape {r['headline_shape']}; per-query speedup {_fmt(r['per_query_speedup'], '.2f')}x; "
        f"slowest train-step speedup {_fmt(r['train_step_speedup_min'], '.2f')}x; wall {rep['wall_s']:.0f} s",
        f"train_step_speedup={_fmt(r['train_step_speedup'], '.2f')} sparsify_speedup={_fmt(r['sparsify_speedup'], '.2f')} "
        f"decompose_speedup={_fmt(r['decompose_speedup'], '.2f')} recon_speedup={_fmt(r['recon_speedup'], '.2f')}",
    ]
    return "\n".join(lines)


def format_markdown(rep: dict[str, Any], command: str = "python bench/run.py --json bench.json") -> str:
    """The report as the README's results table (markdown): machine and versions, then one row
    per measurement with both sides and the ratio (srp-jax speed / other speed)."""
    m, r = rep["machine"], rep["ratios"]
    v = m["versions"]
    out = [
        f"Measured by `{command}` ({rep['mode']} mode, {rep['config'].get('rounds', '?')} interleaved rounds, "
        f"wall {rep['wall_s'] / 60:.0f} min) on {m['cpu_model']}, {m['cores']} cores; jax {v['jax']}, "
        f"torch {v['torch']}, eai-sparsify {v['eai_sparsify']}; srp-jax git {str(m['git_commit'])[:10]}"
        f"{'+dirty' if m['git_dirty'] else ''}; load average {m['load_average_start'][0]:.1f} at start; "
        f"{_memory_line(m)}; {_native_line(rep)}. "
        f"Dense float32 matmul peak in the same run: {_fmt(rep['matmul']['peak_gflops'], '.0f')} GFLOP/s. "
        "Memory is the process's peak RSS over the timed steps / including the first call (srp-jax "
        "compiles there).",
        "",
        "| work | shape | PyTorch way | srp-jax | srp-jax ÷ other speed |",
        "|---|---|---|---|---|",
    ]
    for name, e in rep["train"].items():
        for block, other, label in (("prism", "torch", "plain PyTorch"), ("no_prism", "sparsify", "eai-sparsify")):
            if block not in e:
                continue
            a, b = e[block]["srp"], e[block][other]
            if "error" in a or "error" in b:
                out.append(f"| train step ({block.replace('_', ' ')}) | {name} | {label}: error | error | n/a |")
                continue
            speed = e["speedup_vs_torch"] if block == "prism" else e.get("speedup_vs_sparsify")
            frac = a.get("fraction_of_peak")
            work = "train step, prism on" if block == "prism" else "train step, no prism"
            strategy = f" ({a['strategy']})" if "strategy" in a else ""
            peak = "" if frac is None else f", {100 * frac:.0f}% of peak"
            out.append(
                f"| {work} | {name} | {label}: {b['step_s']:.3f} s, {_mem(b)} | "
                f"{a['step_s']:.3f} s{strategy}, {_mem(a)}{peak} | **{_fmt(speed, '.2f')}×** |"
            )
    d, inf = rep["decompose"], rep["config"]["inference_shape"]
    tq = d["per_query"]["torch"].get("queries_per_s")
    for label, entry in (("decomposition, per query", d["per_query"]["srp"]),
                         ("decomposition, batched (sparse, code table)", d["batched_sparse"]["srp"])):  # fmt: skip
        q = entry.get("queries_per_s")
        out.append(f"| {label} | {inf} | {_fmt(tq, '.0f')} queries/s (per query) | {_fmt(q, '.0f')} queries/s | "
                   f"**{_fmt(_ratio(q, tq), '.1f')}×** |")  # fmt: skip
    rs, rt = rep["recon"]["srp"].get("rows_per_s"), rep["recon"]["torch"].get("rows_per_s")
    out.append(f"| full-vocabulary encode + decode ({rep['config']['recon_rows']} rows) | {inf} | {_fmt(rt, '.0f')} rows/s | "
               f"{_fmt(rs, '.0f')} rows/s | **{_fmt(_ratio(rs, rt), '.2f')}×** |")  # fmt: skip
    out += [
        "",
        f"`train_step_speedup={_fmt(r['train_step_speedup'], '.2f')} sparsify_speedup={_fmt(r['sparsify_speedup'], '.2f')} "
        f"decompose_speedup={_fmt(r['decompose_speedup'], '.2f')} recon_speedup={_fmt(r['recon_speedup'], '.2f')}` "
        f"(headline shape {r['headline_shape']})",
    ]
    return "\n".join(out) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description=__doc__.split("\n\n")[0] + " Prints a table and a final line of ratios "
        "(srp-jax speed / other speed; > 1 means srp-jax is faster).",
        epilog=__doc__[__doc__.index("Examples:"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a pass of a few minutes (smoke + SmolLM2 b1024)")
    group.add_argument("--smoke", action="store_true", help="a tiny shape only: checks the harness, measures nothing useful")
    parser.add_argument("--json", metavar="FILE", help="also write the full report (machine, versions, raw results) as JSON")
    parser.add_argument("--shapes", help=f"comma-separated train shapes (default: the mode's); known: {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, help="interleaved repetitions per measurement (default 2)")
    parser.add_argument("--strategy", default="auto", choices=("auto", "dense", "sparse"),
                        help="srp-jax train-step strategy (training.step_strategy; default auto: the library's choice)")
    parser.add_argument("--sparsify-optimizer", default="adam", choices=("adam", "signum"),
                        help="optimizer of the sparsify step, built as sparsify's trainer does (default adam)")
    parser.add_argument("--skip-sparsify", action="store_true", help="leave out the eai-sparsify comparison")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per worker (default 3600)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the results as a markdown table (the README's)")
    parser.add_argument("--from-json", metavar="FILE", help="measure nothing: print (and --markdown) a saved --json report")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        print(format_table(report), flush=True)
        if args.markdown:
            _write_atomic(Path(args.markdown), format_markdown(report))
        return 1 if report["errors"] else 0
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    shapes = MODES[mode]["shapes"] if not args.shapes else [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    rounds = args.rounds if args.rounds is not None else MODES[mode]["rounds"]
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    report = run_benchmark(mode, shapes, rounds, args.strategy, args.sparsify_optimizer, args.skip_sparsify,
                           args.timeout)
    print(format_table(report), flush=True)
    if args.json:
        _write_atomic(Path(args.json), json.dumps(report, indent=1, default=float))
    if args.markdown:
        _write_atomic(Path(args.markdown), format_markdown(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
