"""Training: the pure step (:mod:`.step`), schedules, the train state and the resumable loop."""

from .loop import Progress, TrainingInterrupted, run_training, train
from .rerun import evaluate_run, load_run
from .schedules import learning_rate, prism_weight
from .state import TrainState, init_train_state
from .step import StepSpec, TrainData, make_optimizer, selected_prism_loss, train_step, train_step_jit

__all__ = [
    "train",
    "load_run",
    "evaluate_run",
    "run_training",
    "TrainingInterrupted",
    "Progress",
    "TrainState",
    "init_train_state",
    "StepSpec",
    "TrainData",
    "make_optimizer",
    "selected_prism_loss",
    "train_step",
    "train_step_jit",
    "learning_rate",
    "prism_weight",
]
