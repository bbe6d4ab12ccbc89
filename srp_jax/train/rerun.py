"""Rebuild a finished run from its directory: the config it used, its data split (the same
validation hidden states), its dictionary, and its evaluation (``metrics.json`` again)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, load_run_config
from ..data import PrismDataset, load_prism_dataset
from ..dictionary import Dictionary, load_factorizer
from ..errors import CheckpointError
from ..metrics import evaluate


def load_run(run_dir: str | os.PathLike) -> tuple[RunConfig, PrismDataset, Dictionary]:
    """``(config, dataset, dictionary)`` of a run directory: ``config.yaml`` as merged for the
    run, the dataset rebuilt from it (same seeds, so the same train / validation split and row
    subset), and the trained dictionary (``checkpoint/``)."""
    run = Path(run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{run}: no config.yaml (not a finished srp-jax run directory)")
    raw = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    cfg = load_run_config(raw)
    return cfg, load_prism_dataset(cfg, cfg.run.seed), load_factorizer(run)


def evaluate_run(run_dir: str | os.PathLike, *, mode: str = "reference", **kwargs: Any) -> dict[str, Any]:
    """Evaluate a run's dictionary on its own validation split exactly as training did
    (``mode="reference"`` reproduces the evaluation keys of its ``metrics.json``); ``mode="full"``
    and other :func:`srp_jax.metrics.evaluate` options are available too."""
    cfg, dataset, dictionary = load_run(run_dir)
    thresholds = {
        "max_dead_feature_rate": cfg.score_thresholds.max_dead_feature_rate,
        "max_val_logit_kl_bits_mean": cfg.score_thresholds.max_val_logit_kl_bits_mean,
    }
    return evaluate(dictionary, dataset.readout(), dataset.hidden_val, evaluation=cfg.evaluation, mode=mode,
                    thresholds=thresholds, **kwargs)


__all__ = ["load_run", "evaluate_run"]
