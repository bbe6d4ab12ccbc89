"""The training driver: dataset -> resumable jitted loop -> evaluation -> run directory.

Run directory (the reference runner's, plus Orbax state)::

    <out>/train_state/     Orbax CheckpointManager: the full TrainState + history (resume)
    <out>/checkpoint/      the final dictionary as an srp-jax checkpoint (save_dictionary)
    <out>/checkpoint.pt    reference-schema .pt (artifacts.export_pt / --export-pt)
    <out>/config.yaml  metrics.json  history.json  compute_meta.json  feature_labels.json  DONE

Saves happen every ``training.checkpoint_every`` steps, at the last step, and whenever
SIGTERM/SIGINT arrive (then the run raises :class:`TrainingInterrupted` after the save is on
disk). Rerunning the same command resumes from the newest saved step; step keys are
``fold_in(seed key, step)``, so a resumed run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import factorizers as F
from .._atomic import write_text_atomic
from .._lazy import require_torch
from .._version import __version__
from ..checkpoint import save_dictionary
from ..data import load_prism_dataset, row_sampling_weights
from ..dictionary import Dictionary, load_dictionary
from ..metrics import evaluate, feature_usage, metrics_to_jsonable
from ..config import RunConfig, load_run_config, resolve_eval_k
from ..errors import CheckpointError
from .compiled import compile_training
from .sampling import TrainData
from .state import TrainState, init_train_state
from .step import StepSpec, make_optimizer

STATE_DIR = "train_state"
CHECKPOINT_DIR = "checkpoint"
FEATURE_LABELS_MAX = 256
FEATURE_LABELS_TOP = 6


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped training after the state was saved; rerun to resume."""

    def __init__(self, signum: int, step: int, out_dir: Path):
        self.signum, self.step, self.out_dir = signum, step, out_dir
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: state saved under {out_dir / STATE_DIR}; rerun the same command to resume")


# --------------------------------------------------------------------------------------------
# Small host-side helpers


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class Progress:
    """A tiny progress display: a redrawn bar on a TTY, plain log lines otherwise."""

    def __init__(self, total: int, *, stream=None, enabled: bool | None = None, width: int = 24):
        self.total, self.stream, self.width = max(int(total), 1), stream or sys.stderr, width
        self.tty = bool(enabled) if enabled is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0, self.n0, self.last_draw = time.perf_counter(), None, 0.0

    def rate(self, step: int) -> float:
        if self.n0 is None:
            return float("nan")
        dt = time.perf_counter() - self.t0
        return (step - self.n0) / dt if dt > 0 else float("nan")

    def start(self, step: int) -> None:
        self.n0, self.t0 = step, time.perf_counter()

    def wants_draw(self) -> bool:
        return self.tty and time.perf_counter() - self.last_draw >= 0.25

    def draw(self, step: int, loss: float) -> None:
        frac = min(step / self.total, 1.0)
        fill = int(round(frac * self.width))
        bar = "#" * fill + "." * (self.width - fill)
        self.stream.write(f"\r[train] {step}/{self.total} [{bar}] loss {loss:.4g}  {self.rate(step):.1f} steps/s ")
        self.stream.flush()
        self.last_draw = time.perf_counter()

    def log(self, step: int, row: Mapping[str, float]) -> None:
        if self.tty:
            return
        self.stream.write(
            f"[train] step {step}/{self.total} loss={row['loss']:.6g} rec={row['reconstruction_loss']:.6g} "
            f"prism={row['prism_loss']:.6g} {self.rate(step):.1f} steps/s\n"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def _stop_signals():
    """Turn SIGTERM/SIGINT into a flag the loop polls between steps (main thread only)."""
    caught: list[int] = []
    if not _is_main_thread():
        yield caught
        return
    previous = {}

    def handler(signum, frame):  # noqa: ARG001
        caught.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _package_version() -> str:
    return __version__


# --------------------------------------------------------------------------------------------
# Orbax train-state manager


def _manager(directory: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _save(manager, state: TrainState, extra: Mapping[str, Any]) -> None:
    import orbax.checkpoint as ocp

    step = int(state.step)
    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra))))


def _restore(manager, template: TrainState, directory: Path) -> tuple[TrainState, dict[str, Any]] | None:
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = template  # jax.ShapeDtypeStruct leaves (jax.eval_shape of the initialiser)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
        )
    except Exception as exc:  # noqa: BLE001 - any mismatch becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{directory}: cannot resume from step {step} ({type(exc).__name__}: {first[:300]}); "
            "the config probably changed: use another --out-dir or delete that directory"
        ) from None
    return restored["state"], dict(restored["extra"] or {})


# --------------------------------------------------------------------------------------------
# The loop


def run_training(
    cfg: RunConfig,
    dataset,
    out_dir: Path | None = None,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) on ``dataset``. Returns ``{state, history, train_seconds, steps_run,
    mean_l0_train, spec}``. With ``out_dir`` the state is saved under ``out_dir/train_state``."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tcfg, fcfg = cfg.training, cfg.factorizer
    weights = row_sampling_weights(dataset, tcfg.row_sampling)
    spec = StepSpec.build(fcfg, tcfg, dataset.d_model, dataset.hidden_train.shape[0], dataset.top_targets.shape[1])
    data = TrainData.from_dataset(dataset, weights, spec.prism_ranks)
    optimizer = make_optimizer(tcfg)  # built once: the step and the state share it
    fns = compile_training(spec, optimizer)

    def fresh_state() -> TrainState:
        return init_train_state(cfg.init_seed, fcfg, tcfg, dataset.d_model, optimizer, dataset.rows_normalized, weights)

    history: list[dict[str, Any]] = []
    elapsed_prev = 0.0
    manager = None
    state = None
    if out_dir is not None:
        state_dir = Path(out_dir) / STATE_DIR
        manager = _manager(state_dir)
        restored = _restore(manager, jax.eval_shape(fresh_state), state_dir)
        if restored is not None:
            state, extra = restored
            history = list(extra.get("history", []))
            elapsed_prev = float(extra.get("elapsed_seconds", 0.0))
            log(f"[resume] {Path(out_dir).name}: step {int(state.step)}/{tcfg.steps} ({elapsed_prev:.1f}s already)")
    if state is None:
        state = fresh_state()
    start = int(state.step)
    steps = tcfg.steps
    progress = progress or Progress(steps)
    t_start = time.perf_counter()

    def extra_now() -> dict[str, Any]:
        return {"history": history, "elapsed_seconds": elapsed_prev + (time.perf_counter() - t_start)}

    try:
        with _stop_signals() as caught:
            progress.start(start)
            for step in range(start + 1, steps + 1):
                batch = fns.sample(data, state.rng, state.step + 1)
                state, metrics = fns.step(state, batch)
                if step == 1 or step % tcfg.log_every == 0 or step == steps:
                    row = {
                        "step": step,
                        "loss": float(metrics["loss"]),
                        "reconstruction_loss": float(metrics["reconstruction_loss"]),
                        "prism_loss": float(metrics["prism_loss"]),
                    }
                    history.append(row)
                    progress.log(step, row)
                if progress.wants_draw():
                    progress.draw(step, float(metrics["loss"]))
                if manager is not None and (
                    (tcfg.checkpoint_every > 0 and step % tcfg.checkpoint_every == 0) or step == steps
                ):
                    _save(manager, state, extra_now())
                if caught:
                    if manager is not None:
                        _save(manager, state, extra_now())
                        manager.wait_until_finished()
                    progress.close()
                    raise TrainingInterrupted(caught[0], step, Path(out_dir) if out_dir else Path("."))
            if caught and manager is not None:  # a signal during the last step / before the loop
                _save(manager, state, extra_now())
        jax.block_until_ready(state.params)
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    progress.close()
    train_seconds = elapsed_prev + (time.perf_counter() - t_start)
    count = int(state.l0_count)
    return {
        "state": state,
        "history": history,
        "train_seconds": train_seconds,
        "steps_run": max(0, steps - start),
        "mean_l0_train": float(state.l0_sum) / count if count > 0 else float("nan"),
        "spec": spec,
        "sample_weights": weights,
    }


def _finite_done(out: Path) -> dict[str, Any] | None:
    if not (out / "DONE").is_file() or not (out / "metrics.json").is_file():
        return None
    try:
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("finite_metrics") is True else None


def feature_labels(dictionary, dataset, usage: np.ndarray) -> dict[str, Any]:
    """``{"features": [...]}`` for the first min(256, D) features: the 6 rows whose normalized
    vectors score highest against each decoder row, with placeholder labels ``tok_<id>``."""
    n = min(FEATURE_LABELS_MAX, dictionary.d_features)
    dec = jnp.asarray(dictionary.params["decoder"][:n])
    scores = jnp.matmul(jnp.asarray(dataset.rows_normalized), dec.T, precision=F.HIGHEST)  # (V, n)
    top = np.asarray(jax.lax.top_k(scores.T, min(FEATURE_LABELS_TOP, scores.shape[0]))[1])
    ids = np.asarray(dataset.row_token_ids, np.int64)
    features = []
    for f in range(n):
        tok_ids = [int(ids[r]) for r in top[f]]
        labels = [f"tok_{t}" for t in tok_ids]
        features.append({
            "feature_id": f,
            "label": "/".join(labels[:3]),
            "top_token_ids": tok_ids,
            "top_token_labels": labels,
            "usage_count": int(usage[f]),
        })  # fmt: skip
    return {"features": features}


def _usage_counts(dictionary, dataset, evaluation, chunk: int = 1024) -> np.ndarray:
    """How many evaluated rows (the first ``max_eval_rows``) use each feature at the audit k."""
    k = resolve_eval_k(evaluation, dictionary.config)
    n_rows = min(int(evaluation.max_eval_rows or dataset.vocab_size), dataset.vocab_size)
    return feature_usage(dictionary, np.asarray(dataset.rows_normalized[:n_rows]), k, row_batch=chunk)


def train(
    config: Any,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | os.PathLike | None = None,
    data_path: str | None = None,
    export_pt: bool | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one run end to end and write its run directory; returns the metrics dict.

    ``config``: a :class:`RunConfig`, a YAML path, a built-in config name or a mapping
    (``overrides`` / ``out_dir`` / ``data_path`` as the CLI's ``--set`` / ``--out-dir`` /
    ``--data-path``). A finished run directory (``DONE`` + finite ``metrics.json``) is not
    retrained: its metrics are returned. Raises :class:`TrainingInterrupted` on SIGTERM/SIGINT
    (after saving the state).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if isinstance(config, RunConfig):
        cfg = config if not (overrides or out_dir or data_path) else load_run_config(
            config.to_dict(), overrides, out_dir=None if out_dir is None else str(out_dir), data_path=data_path
        )
    else:
        cfg = load_run_config(config, overrides, out_dir=None if out_dir is None else str(out_dir), data_path=data_path)
    out = Path(cfg.run.output_dir)
    want_pt = cfg.artifacts.export_pt if export_pt is None else bool(export_pt)
    if want_pt:
        require_torch("artifacts.export_pt / --export-pt")
    cached = _finite_done(out)
    if cached is not None:
        log(f"[skip] {out}: already finished (DONE and finite metrics.json); delete DONE to retrain")
        if want_pt and not (out / "checkpoint.pt").exists():
            _export_finished_run(out, log)
        return cached
    out.mkdir(parents=True, exist_ok=True)

    dataset = load_prism_dataset(cfg, cfg.run.seed)
    result = run_training(cfg, dataset, out, progress=progress, log=log)
    state: TrainState = result["state"]

    raw = cfg.to_dict()
    raw.setdefault("run", {})
    raw["run"] = {**(raw.get("run") or {}), "output_dir": str(out)}
    dictionary = Dictionary(
        config=cfg.factorizer,
        params=jax.device_get(state.params),
        buffers=jax.device_get(state.buffers),
        d_model=dataset.d_model,
        **dataset.readout().stats(),
        evaluation=dict(raw.get("evaluation") or {}),
        factorizer_block=dict(raw.get("factorizer") or {}),
    )  # no source_config: the merged config is config.yaml; checkpoint.pt keeps the runner key set
    thresholds = {
        "max_dead_feature_rate": cfg.score_thresholds.max_dead_feature_rate,
        "max_val_logit_kl_bits_mean": cfg.score_thresholds.max_val_logit_kl_bits_mean,
    }
    metrics = dict(
        evaluate(dictionary, dataset.readout(), dataset.hidden_val, evaluation=cfg.evaluation, mode="reference", thresholds=thresholds)
    )
    ctrl_on = result["spec"].controller_on
    device = jax.devices()[0]
    commit = _git_commit()
    metrics.update({
        "train_seconds": result["train_seconds"],
        "mean_l0_train": result["mean_l0_train"],
        "l0_controller_enabled": ctrl_on,
        "l0_controller_final_coeff": float(state.controller["coeff"]) if ctrl_on else None,
        "l0_controller_target": cfg.training.l0_controller.target_l0 if ctrl_on else None,
        "data_source": dataset.source_path,
        "used_fallback_data": bool(dataset.used_fallback),
        "val_overlaps_train": bool(dataset.val_overlaps_train),
        "device": device.platform,
        "architecture": cfg.factorizer.architecture,
        "d_features": cfg.factorizer.d_features,
        "init_seed": cfg.init_seed,
        "data_seed": cfg.data_seed,
        "git_commit": commit,
    })  # fmt: skip
    metrics = metrics_to_jsonable(metrics)
    dictionary = dictionary.replace(metrics=dict(metrics))  # the saved copy carries its metrics

    B, d, D = cfg.training.batch_size, dataset.d_model, cfg.factorizer.d_features
    steps_run = result["steps_run"]
    flops = 6 * B * d * D
    compute_meta = {
        "architecture": cfg.factorizer.architecture,
        "d_features": D,
        "d_model": d,
        "steps_run": steps_run,
        "batch_size": B,
        "step_strategy": result["spec"].strategy,
        "row_sampler": cfg.training.row_sampler,
        "train_seconds": result["train_seconds"],
        "seconds_per_step": result["train_seconds"] / max(cfg.training.steps, 1),
        "flops_per_step_est": flops,
        "total_train_flops_est": flops * cfg.training.steps,
        "device": device.platform,
        "gpu_name": device.device_kind if device.platform == "gpu" else None,
        "jax_version": jax.__version__,
        "package_version": _package_version(),
        "git_commit": commit,
    }
    import yaml

    write_json_atomic(out / "compute_meta.json", compute_meta)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(raw, sort_keys=False))
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "history.json", {"history": result["history"]})
    usage = _usage_counts(dictionary, dataset, cfg.evaluation)
    write_json_atomic(out / "feature_labels.json", feature_labels(dictionary, dataset, usage))
    if cfg.artifacts.save_checkpoint:
        save_dictionary(dictionary, out / CHECKPOINT_DIR, force=True)
    if want_pt:
        from convert.checkpoints import dictionary_to_pt  # torch was required above

        dictionary_to_pt(dictionary, out / "checkpoint.pt", force=True)
    if cfg.artifacts.report_path:
        report = resolve_report_path(cfg.artifacts.report_path)
        write_text_atomic(report, run_report(cfg.run.name, metrics, raw))
        log(f"[report] {report}")
    write_text_atomic(out / "DONE", "done\n")
    log(
        "[result] "
        + " ".join(
            f"{key}={_fmt(metrics.get(key))}"
            for key in ("selection_score", "row_centered_ev", "val_top1_match", "val_logit_kl_bits_mean",
                        "dead_feature_rate", "rare_feature_rate", "train_seconds")
        )  # fmt: skip
    )
    return metrics


def _export_finished_run(out: Path, log: Callable[[str], None]) -> None:
    """``--export-pt`` on a finished run: write ``checkpoint.pt`` from its saved dictionary."""
    require_torch(f"writing {out / 'checkpoint.pt'}")
    from convert.checkpoints import dictionary_to_pt

    if not (out / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(
            f"{out}: finished without a {CHECKPOINT_DIR}/ (artifacts.save_checkpoint was false), so there is "
            "nothing to export; delete DONE to retrain"
        )
    dictionary_to_pt(load_dictionary(out / CHECKPOINT_DIR), out / "checkpoint.pt")
    log(f"[export] wrote {out / 'checkpoint.pt'} from {out / CHECKPOINT_DIR}")


FAILURE_NOTES = (
    ("dead_feature_rate", lambda v: v > 0.8, "more than 80% of features are dead"),
    ("top1_logit_residual_frac_mean", lambda v: v > 1.0, "the residual is larger than the top-1 logit on average"),
    ("val_top1_match", lambda v: v < 0.25, "top-1 agreement is below 0.25"),
)


def resolve_report_path(path: str) -> Path:
    """``artifacts.report_path`` with ``${VAR}`` / ``~`` expanded (relative to the working directory)."""
    return Path(os.path.expanduser(os.path.expandvars(path)))


def run_report(name: str, metrics: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The optional markdown run report: a metrics table, failure notes and the merged config."""
    import yaml

    lines = [f"# {name}", "", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            lines.append(f"| {key} | {_fmt(value)} |")
    notes = []
    for key, failed, text in FAILURE_NOTES:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (math.isnan(value) or failed(value)):
            notes.append(f"- {key} = {_fmt(value)}: {text}")
    if metrics.get("finite_metrics") is False:
        notes.append("- some metrics are not finite (NaN/Inf): the run diverged")
    lines += ["", "## Failure notes", "", *(notes or ["none"])]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


__all__ = ["train", "run_training", "TrainingInterrupted", "Progress", "feature_labels", "write_json_atomic", "write_text_atomic"]
