"""Metrics people can watch while a run trains: TensorBoard event files (``artifacts.tensorboard``,
extra ``watch``: tensorboardX) and Weights & Biases (``artifacts.wandb_project``, when ``wandb``
is installed). ``history.json`` stays the record of a run; these are views of the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import DependencyError

TENSORBOARD_DIR = "tensorboard"


class MetricWatchers:
    """Fan the loop's scalar rows out to the enabled watchers; a no-op when none is asked for."""

    def __init__(self, out_dir: Path | None, *, tensorboard: bool = False, wandb_project: str | None = None,
                 run_name: str = "run", config: Mapping[str, Any] | None = None):
        self._writers: list[Any] = []
        self._wandb = None
        if tensorboard and out_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise DependencyError(
                    "artifacts.tensorboard needs tensorboardX: pip install 'srp-jax[watch]'"
                ) from None
            self._writers.append(SummaryWriter(logdir=str(Path(out_dir) / TENSORBOARD_DIR)))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise DependencyError(
                    f"artifacts.wandb_project={wandb_project!r} needs wandb, which is not installed: pip install wandb"
                ) from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=dict(config or {}),
                                     dir=str(out_dir) if out_dir is not None else None, resume="allow")

    @property
    def active(self) -> bool:
        return bool(self._writers) or self._wandb is not None

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "train") -> None:
        clean = {f"{prefix}/{k}": float(v) for k, v in values.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for writer in self._writers:
            for key, value in clean.items():
                writer.add_scalar(key, value, global_step=int(step))
            writer.flush()
        if self._wandb is not None and clean:
            self._wandb.log(clean, step=int(step))

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._writers, self._wandb = [], None


__all__ = ["MetricWatchers", "TENSORBOARD_DIR"]
