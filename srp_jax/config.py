"""Configuration blocks with the reference's keys and defaults.

``FactorizerConfig`` and ``EvaluationConfig`` mirror the ``factorizer:`` and ``evaluation:``
blocks of the reference YAML / checkpoints. They are frozen (hashable) so they can be static
arguments of jitted functions. The full run configuration (``run``, ``data``, ``training``,
``artifacts``, ``mesh``, ...) builds on these further down in this module.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from ._validate import as_bool as _as_bool
from ._validate import as_float as _as_float
from ._validate import as_int as _as_int
from ._validate import as_list as _as_list  # noqa: F401 - kept for callers of the old private name
from ._validate import as_str as _as_str
from ._validate import unknown_keys as _unknown_keys
from .compile import STEP_STRATEGIES
from .errors import ConfigError
from .factorizers.base import DEFAULT_K
from .factorizers.registry import architecture_names, get_architecture, known_option

# The built-in architectures (the live registry, including architectures registered later, is
# ``srp_jax.factorizers.architecture_names()``).
ARCHITECTURES = ("topk", "matryoshka_topk", "batch_topk", "jumprelu", "gated", "l1_relu")
TOPK_FAMILY = ("topk", "matryoshka_topk")  # at most k active per row
K_ARCHITECTURES = ("topk", "matryoshka_topk", "batch_topk")  # those for which k means something

_COMMON_FACTORIZER_KEYS = ("architecture", "d_features", "k", "encoder_init_scale")


@dataclasses.dataclass(frozen=True, init=False)
class FactorizerConfig:
    """The ``factorizer:`` block. Defaults are the reference's ``build_factorizer`` defaults.

    Common keys are fields: ``architecture``, ``d_features``, ``k`` (the trained TopK budget;
    None = not given, the TopK family then trains with 32) and ``encoder_init_scale``. Every
    other key belongs to an architecture (:attr:`Architecture.options`, e.g. batch_topk's
    ``threshold_momentum``, jumprelu's ``log_threshold_init`` / ``bandwidth``, matryoshka's
    ``k_values`` / ``matryoshka_weights``) and is read as an attribute (``cfg.bandwidth``).
    A key of *another* architecture is validated and ignored (reference blocks carry them),
    so two configs differ only where their architecture can tell. Frozen and hashable: a
    static jit argument.
    """

    architecture: str
    d_features: int
    k: int | None
    encoder_init_scale: float
    options: tuple[tuple[str, Any], ...]

    def __init__(
        self,
        architecture: str = "topk",
        d_features: int = 1024,
        k: int | None = None,
        encoder_init_scale: float = 0.02,
        options: Mapping[str, Any] | tuple[tuple[str, Any], ...] = (),
        **named_options: Any,
    ) -> None:
        arch = get_architecture(architecture)
        set_ = object.__setattr__
        set_(self, "architecture", arch.name)
        set_(self, "d_features", _as_int("factorizer.d_features", d_features, minimum=1, maximum=2**31 - 1))
        set_(self, "k", _as_int("factorizer.k", k, minimum=0, allow_none=True))
        set_(self, "encoder_init_scale", _as_float("factorizer.encoder_init_scale", encoder_init_scale))
        given = dict(options.items() if isinstance(options, Mapping) else options)
        given.update(named_options)
        own: dict[str, Any] = {}
        for key, value in given.items():
            option = arch.options.get(key) or known_option(key)
            if option is None:
                _unknown_keys("factorizer", {key: value}, set(_COMMON_FACTORIZER_KEYS) | _all_option_keys())
            coerced = option.coerce(f"factorizer.{key}", value)
            if key in arch.options:
                own[key] = coerced
        resolved = tuple((key, own.get(key, option.default)) for key, option in arch.options.items())
        set_(self, "options", resolved)

    def __getattr__(self, name: str) -> Any:
        # only reached for names that are not fields: architecture options
        if name.startswith("__"):
            raise AttributeError(name)
        for key, value in object.__getattribute__(self, "options"):
            if key == name:
                return value
        option = known_option(name)
        if option is not None:  # another architecture's key: its default
            return option.default
        raise AttributeError(f"FactorizerConfig has no attribute or option {name!r}")

    def __reduce__(self):
        return (_rebuild_factorizer_config, (self.architecture, self.d_features, self.k, self.encoder_init_scale, self.options))

    @property
    def arch(self):
        """The registered :class:`~srp_jax.factorizers.base.Architecture`."""
        return get_architecture(self.architecture)

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None, *, strict: bool = True) -> FactorizerConfig:
        """Build from a reference ``factorizer`` block.

        ``strict`` rejects unknown keys (YAML configs); checkpoint loading passes
        ``strict=False`` because published checkpoints may carry keys we do not use.
        """
        block = dict(block or {})
        known = set(_COMMON_FACTORIZER_KEYS) | _all_option_keys()
        if strict:
            _unknown_keys("factorizer", block, known)
        return cls(**{key: value for key, value in block.items() if key in known and value is not None})

    def to_dict(self) -> dict[str, Any]:
        """A reference-style ``factorizer`` block (plain Python values, JSON/YAML-safe)."""
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "d_features": self.d_features,
            "encoder_init_scale": self.encoder_init_scale,
        }
        if self.k is not None:
            out["k"] = self.k
        out.update(self.arch.option_values(self))
        return out

    def replace(self, **changes: Any) -> FactorizerConfig:
        """A copy with ``changes`` (fields or options) applied."""
        block = {**{key: getattr(self, key) for key in _COMMON_FACTORIZER_KEYS}, **dict(self.options), **changes}
        return FactorizerConfig(**block)

    @property
    def native_k(self) -> int:
        """The reference's ``model.k``: the trained k for architectures that use k (TopK
        family, batch_topk), else ``d_features``."""
        if self.arch.uses_k:
            return DEFAULT_K if self.k is None else self.k
        return self.d_features

    def resolve_k(self, k: int | None = None) -> int:
        """``k or native_k`` (0 and None both fall back, as in the reference)."""
        if k is None or (not isinstance(k, bool) and k == 0):
            return self.native_k
        return _as_int("k", k, minimum=1)

    def loss_k_values(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Matryoshka (k_values, weights); weights of mismatched length become all ones."""
        ks = tuple(self.k_values)
        ws = tuple(self.matryoshka_weights)
        if len(ws) != len(ks):
            ws = tuple(1.0 for _ in ks)
        return ks, ws


def _rebuild_factorizer_config(architecture, d_features, k, encoder_init_scale, options):
    return FactorizerConfig(architecture, d_features, k, encoder_init_scale, options)


def _all_option_keys() -> set[str]:
    return {key for name in architecture_names() for key in get_architecture(name).options}


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """The ``evaluation:`` block: audit k and the eval-set sizes (reference defaults)."""

    k: int | None = None
    max_eval_rows: int | None = None
    max_eval_hidden: int | None = None
    contribution_top_k: int = 8
    topk_overlap: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _as_int("evaluation.k", self.k, minimum=0, allow_none=True))
        object.__setattr__(
            self, "max_eval_rows", _as_int("evaluation.max_eval_rows", self.max_eval_rows, minimum=0, allow_none=True)
        )
        object.__setattr__(
            self,
            "max_eval_hidden",
            _as_int("evaluation.max_eval_hidden", self.max_eval_hidden, minimum=0, allow_none=True),
        )
        object.__setattr__(
            self, "contribution_top_k", _as_int("evaluation.contribution_top_k", self.contribution_top_k, minimum=1)
        )
        object.__setattr__(self, "topk_overlap", _as_int("evaluation.topk_overlap", self.topk_overlap, minimum=1))

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None, *, strict: bool = True) -> EvaluationConfig:
        block = dict(block or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if strict:
            _unknown_keys("evaluation", block, known)
        kwargs = {key: block[key] for key in known if key in block and block[key] is not None}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_eval_k(evaluation: EvaluationConfig | Mapping[str, Any] | None, factorizer: FactorizerConfig) -> int:
    """The audit k: ``evaluation.k or factorizer.k or native k`` (an ``or`` chain, as the reference)."""
    if isinstance(evaluation, Mapping):
        ek = evaluation.get("k")
    else:
        ek = evaluation.k if evaluation is not None else None
    if ek:
        return int(ek)
    if factorizer.k:
        return int(factorizer.k)
    return factorizer.native_k


# ============================================================================================
# Run configuration: the whole reference YAML (run, data, model, factorizer, training,
# evaluation, artifacts, autoresearch) plus our additions (training recipe keys, mesh,
# artifacts.export_pt). Every block is validated; unknown keys are named in a ConfigError.

RUN_BLOCKS = ("run", "data", "model", "factorizer", "training", "evaluation", "artifacts", "autoresearch", "mesh")
SWEEP_KEYS = ("grid", "output_root", "fixed")
INIT_MODES = ("random", "row_seeded")
# training.row_seeded_scale: the factor on the tied encoder kernel of a row-seeded init
ROW_SEEDED_SCALES = ("least_squares", "inv_k", "inv_sqrt_k")
# training.row_sampler: how rows are drawn from the row-sampling weights (srp_jax.train.sampling)
ROW_SAMPLERS = ("inverse_cdf", "categorical")
LR_SCHEDULES = ("constant", "warmup_cosine")
LAMBDA_MODES = ("constant", "delayed_ramp")
DATA_FALLBACKS = ("synthetic", "error")
SEED_MAX = 2**32 - 1  # jax.random.PRNGKey keeps 32 bits: larger seeds would collide silently
SIZE_MAX = 2**31 - 1  # array dimensions and sample indices are int32 on the device
FLOAT32_MAX = 3.4028234663852886e38

# training.row_sampling: fixed names, frequency_pow_<p>, hybrid_<F>freq_<U>uniform
_FIXED_SAMPLING = {
    "uniform": ("uniform", None),
    "frequency": ("frequency_pow", 1.0),
    "frequency_sqrt": ("frequency_pow", 0.5),
    "frequency_pow_0.5": ("frequency_pow", 0.5),
    "frequency_pow_0.75": ("frequency_pow", 0.75),
    "top1_sqrt_frequency": ("top_sqrt", 1),
    "top5_sqrt_frequency": ("top_sqrt", 5),
}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_HYBRID = re.compile(rf"^hybrid_(?P<f>{_NUMBER})freq_(?P<u>{_NUMBER})uniform$")
_POW = re.compile(rf"^frequency_pow_(?P<p>{_NUMBER})$")


def parse_row_sampling(mode: str | None) -> tuple[str, Any]:
    """``training.row_sampling`` -> (kind, parameter): ``("uniform", None)``,
    ``("frequency_pow", p)``, ``("hybrid", f)`` with f = F / (F + U) the frequency share, or
    ``("top_sqrt", n)`` (sqrt of top-n hit counts). None / '' mean uniform."""
    mode = mode or "uniform"
    if mode in _FIXED_SAMPLING:
        return _FIXED_SAMPLING[mode]
    if _POW.match(mode):
        return "frequency_pow", float(_POW.match(mode).group("p"))
    match = _HYBRID.match(mode)
    if match:
        f_pct, u_pct = float(match.group("f")), float(match.group("u"))
        return "hybrid", f_pct / max(f_pct + u_pct, 1e-8)
    raise ConfigError(
        f"unknown training.row_sampling mode {mode!r} (expected uniform, frequency, frequency_sqrt, "
        "frequency_pow_<p>, hybrid_<F>freq_<U>uniform, top1_sqrt_frequency or top5_sqrt_frequency)"
    )


def validate_sampling_mode(mode: str | None) -> str:
    """Return the mode (None/'' -> 'uniform') or raise ConfigError naming it."""
    parse_row_sampling(mode)
    return mode or "uniform"


def _block(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _build(cls, name: str, block: Any, **extra):
    block = _block(name, block)
    _unknown_keys(name, block, _fields(cls))
    kwargs = {key: value for key, value in block.items()}
    kwargs.update(extra)
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class RunBlock:
    """``run:``: report name, seeds (``init_seed`` defaults to ``seed``), output dir, device."""

    name: str = "run"
    seed: int = 0
    init_seed: int | None = None
    output_dir: str = "results/run"
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", str(self.name if self.name is not None else "run"))
        object.__setattr__(self, "seed", _as_int("run.seed", self.seed, minimum=0, maximum=SEED_MAX))
        object.__setattr__(
            self, "init_seed", _as_int("run.init_seed", self.init_seed, minimum=0, maximum=SEED_MAX, allow_none=True)
        )
        out = _as_str("run.output_dir", self.output_dir if self.output_dir is not None else "results/run")
        if not out.strip():
            raise ConfigError("run.output_dir / --out-dir is empty (give a run directory)")
        object.__setattr__(self, "output_dir", out)
        object.__setattr__(self, "device", _as_str("run.device", self.device if self.device is not None else "auto"))

    @property
    def resolved_init_seed(self) -> int:
        return self.seed if self.init_seed is None else self.init_seed


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``data:``. ``max_hidden`` / ``val_hidden`` follow the reference's ``or`` (0/None = default);
    ``row_preprocessing`` is inert (only center + normalize exists).

    ``path`` (``$VAR`` / ``~`` expanded when read) must exist when given: an explicit path never
    falls back. ``fallback`` only decides what a config *without* a path trains on:
    ``synthetic`` (the built-in synthetic readout, announced on stderr; the smoke config asks
    for it) or ``error`` (the default)."""

    path: str | None = None
    fallback: str = "error"
    max_rows: int | None = None
    max_hidden: int | None = 512
    val_hidden: int | None = None
    data_seed: int | None = None
    apply_token_mask: bool = True
    row_preprocessing: Any = "center_normalize"

    def __post_init__(self) -> None:
        path = self.path
        if path is not None and not isinstance(path, str):
            path = str(path)
        object.__setattr__(self, "path", path or None)
        object.__setattr__(self, "fallback", _as_str("data.fallback", self.fallback or "error", choices=DATA_FALLBACKS))
        object.__setattr__(self, "max_rows", _as_int("data.max_rows", self.max_rows, minimum=1, allow_none=True))
        object.__setattr__(self, "max_hidden", _as_int("data.max_hidden", self.max_hidden or 512, minimum=1))
        vh = _as_int("data.val_hidden", self.val_hidden, minimum=0, allow_none=True)
        object.__setattr__(self, "val_hidden", vh or min(128, self.max_hidden))
        object.__setattr__(
            self, "data_seed", _as_int("data.data_seed", self.data_seed, minimum=0, maximum=SEED_MAX, allow_none=True)
        )
        object.__setattr__(self, "apply_token_mask", _as_bool("data.apply_token_mask", self.apply_token_mask))

    @classmethod
    def from_dict(cls, block: Any) -> DataConfig:
        """Validate a ``data:`` block (unknown keys named)."""
        return _build(cls, "data", block)


@dataclasses.dataclass(frozen=True)
class L0ControllerConfig:
    """``training.l0_controller:`` (jumprelu / l1_relu only). ``coeff_init`` None = l0_coeff or
    l1_coeff or 1e-4; ``coeff_max`` None = 0.01 for jumprelu, else 0.05."""

    enabled: bool = False
    target_l0: float = 0.0
    kp: float = 0.2
    ema: float = 0.9
    warmup_steps: int = 200
    control_period: int = 10
    err_clip: float = 0.3
    coeff_init: float | None = None
    coeff_min: float = 1e-8
    coeff_max: float | None = None

    def __post_init__(self) -> None:
        p = "training.l0_controller."
        object.__setattr__(self, "enabled", _as_bool(p + "enabled", self.enabled))
        for key in ("target_l0", "kp", "ema", "err_clip", "coeff_min"):
            object.__setattr__(self, key, _as_float(p + key, getattr(self, key)))
        for key in ("coeff_init", "coeff_max"):
            object.__setattr__(self, key, _as_float(p + key, getattr(self, key), allow_none=True))
        object.__setattr__(self, "warmup_steps", _as_int(p + "warmup_steps", self.warmup_steps, minimum=0))
        object.__setattr__(self, "control_period", max(1, _as_int(p + "control_period", self.control_period)))
        if not 0.0 <= self.ema <= 1.0:
            raise ConfigError(f"{p}ema must be in [0, 1], got {self.ema}")


def _row_seeded_scale(name: str, value: Any) -> str | float:
    """One of ROW_SEEDED_SCALES, or a positive number (a fixed factor; 1.0 = the unscaled tie)."""
    if isinstance(value, str) and value in ROW_SEEDED_SCALES:
        return value
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name} must be one of {', '.join(ROW_SEEDED_SCALES)} or a positive number, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """``training:``. Defaults reproduce the shipped reference trainer (constant lr and lambda,
    random init, no AuxK); the paper-recipe switches are opt-in (spec decision 2).

    ``lr_warmup_steps`` None = 5% of ``steps``; ``auxk_k`` None = d_model // 2.
    ``row_sampler`` (ours): ``inverse_cdf`` (O(B log V), default) or ``categorical`` (the
    previous Gumbel-max draw, for reproducing older runs). ``step_strategy`` (ours): ``auto``
    (default: the faster path for the backend, see ``docs/performance.md``), ``dense`` or
    ``sparse`` (TopK family only).
    """

    steps: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lambda_prism: float = 0.0
    prism_top_n: int = 1
    code_l2: float = 0.0
    row_sampling: str = "uniform"
    log_every: int = 50
    checkpoint_every: int = 500
    l0_coeff: float = 0.0
    l1_coeff: float = 0.0
    gate_l1_coeff: float = 0.0
    gated_aux_coeff: float = 1.0
    l0_controller: L0ControllerConfig = dataclasses.field(default_factory=L0ControllerConfig)
    init_mode: str = "random"
    row_seeded_scale: str | float = "least_squares"
    lr_schedule: str = "constant"
    lr_warmup_steps: int | None = None
    final_lr_frac: float = 0.1
    lambda_mode: str = "constant"
    lambda_ramp_start_frac: float = 0.0  # measured (docs/training.md); the paper's reading is 0.7
    auxk_coeff: float = 0.0
    auxk_k: int | None = None
    auxk_dead_steps: int = 1000
    row_sampler: str = "inverse_cdf"
    step_strategy: str = "auto"

    def __post_init__(self) -> None:
        p = "training."
        object.__setattr__(self, "steps", _as_int(p + "steps", self.steps, minimum=0))
        object.__setattr__(self, "batch_size", _as_int(p + "batch_size", self.batch_size, minimum=1, maximum=SIZE_MAX))
        for key in ("lr", "weight_decay", "lambda_prism", "code_l2", "l0_coeff", "l1_coeff", "gate_l1_coeff",
                    "gated_aux_coeff", "final_lr_frac", "lambda_ramp_start_frac", "auxk_coeff"):
            value = _as_float(p + key, getattr(self, key))
            if value < 0:
                raise ConfigError(f"{p}{key} must be >= 0, got {value}")
            if value > FLOAT32_MAX:
                raise ConfigError(f"{p}{key} = {value:g} does not fit in float32 (the step computes in float32; max {FLOAT32_MAX:.4g})")
            object.__setattr__(self, key, value)
        object.__setattr__(self, "prism_top_n", _as_int(p + "prism_top_n", self.prism_top_n))
        object.__setattr__(self, "row_sampling", _as_str(p + "row_sampling", self.row_sampling or "uniform"))
        object.__setattr__(self, "log_every", max(1, _as_int(p + "log_every", self.log_every)))
        object.__setattr__(self, "checkpoint_every", _as_int(p + "checkpoint_every", self.checkpoint_every, minimum=0))
        ctrl = self.l0_controller
        if not isinstance(ctrl, L0ControllerConfig):
            ctrl = _build(L0ControllerConfig, "training.l0_controller", ctrl)
        object.__setattr__(self, "l0_controller", ctrl)
        object.__setattr__(self, "init_mode", _as_str(p + "init_mode", self.init_mode, choices=INIT_MODES))
        object.__setattr__(self, "row_seeded_scale", _row_seeded_scale(p + "row_seeded_scale", self.row_seeded_scale))
        object.__setattr__(self, "lr_schedule", _as_str(p + "lr_schedule", self.lr_schedule, choices=LR_SCHEDULES))
        object.__setattr__(self, "lambda_mode", _as_str(p + "lambda_mode", self.lambda_mode, choices=LAMBDA_MODES))
        object.__setattr__(
            self, "lr_warmup_steps", _as_int(p + "lr_warmup_steps", self.lr_warmup_steps, minimum=0, allow_none=True)
        )
        if self.final_lr_frac > 1:
            raise ConfigError(f"{p}final_lr_frac must be in [0, 1], got {self.final_lr_frac}")
        if self.lambda_ramp_start_frac > 1:
            raise ConfigError(f"{p}lambda_ramp_start_frac must be in [0, 1], got {self.lambda_ramp_start_frac}")
        object.__setattr__(self, "auxk_k", _as_int(p + "auxk_k", self.auxk_k, minimum=1, allow_none=True))
        object.__setattr__(self, "auxk_dead_steps", _as_int(p + "auxk_dead_steps", self.auxk_dead_steps, minimum=1))
        validate_sampling_mode(self.row_sampling)
        object.__setattr__(self, "row_sampler", _as_str(p + "row_sampler", self.row_sampler, choices=ROW_SAMPLERS))
        object.__setattr__(
            self, "step_strategy", _as_str(p + "step_strategy", self.step_strategy, choices=STEP_STRATEGIES)
        )

    @property
    def warmup_steps(self) -> int:
        """The resolved warmup length (``lr_warmup_steps`` or 5% of ``steps``)."""
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return int(round(0.05 * self.steps))


@dataclasses.dataclass(frozen=True)
class ArtifactsConfig:
    """``artifacts:``. ``make_figures`` is inert; ours: ``export_pt`` also writes
    ``checkpoint.pt``; ``tensorboard`` writes event files under ``<out>/tensorboard``
    (extra ``watch``); ``wandb_project`` logs to Weights & Biases (needs ``wandb``)."""

    save_checkpoint: bool = True
    report_path: str | None = None
    make_figures: Any = None
    export_pt: bool = False
    tensorboard: bool = False
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "save_checkpoint", _as_bool("artifacts.save_checkpoint", self.save_checkpoint))
        object.__setattr__(self, "export_pt", _as_bool("artifacts.export_pt", self.export_pt))
        object.__setattr__(self, "tensorboard", _as_bool("artifacts.tensorboard", self.tensorboard))
        object.__setattr__(self, "wandb_project", _as_str("artifacts.wandb_project", self.wandb_project, allow_none=True))
        object.__setattr__(self, "report_path", _as_str("artifacts.report_path", self.report_path, allow_none=True))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """``mesh:`` the device mesh (see ``docs/scaling.md``): ``data`` / ``model`` axis sizes
    (``-1`` = all the devices the other axis leaves; data * model = jax.device_count()),
    and the training top-k: ``topk`` ``exact`` (default) or ``approx_max_k`` (TPU-fast,
    approximate, keeps about ``topk_recall`` of each shard's true top-k; training only)."""

    data: int = -1
    model: int = 1
    topk: str = "exact"
    topk_recall: float = 0.95

    def __post_init__(self) -> None:
        for name in ("data", "model"):
            value = _as_int(f"mesh.{name}", getattr(self, name))
            if value != -1 and value < 1:
                raise ConfigError(f"mesh.{name} must be -1 (fill with the remaining devices) or >= 1, got {value}")
            object.__setattr__(self, name, value)
        if self.data == -1 and self.model == -1:
            raise ConfigError("mesh.data and mesh.model cannot both be -1")
        if self.topk not in TOPK_ALGORITHMS:
            raise ConfigError(f"mesh.topk must be one of {', '.join(TOPK_ALGORITHMS)}, got {self.topk!r}")
        recall = _as_float("mesh.topk_recall", self.topk_recall)
        if not 0.0 < recall <= 1.0:
            raise ConfigError(f"mesh.topk_recall must be in (0, 1], got {recall}")
        object.__setattr__(self, "topk_recall", recall)

    @property
    def approx_recall(self) -> float | None:
        """The ``approx_max_k`` recall target of training, or None (exact top-k)."""
        return self.topk_recall if self.topk == "approx_max_k" else None


TOPK_ALGORITHMS = ("exact", "approx_max_k")


@dataclasses.dataclass(frozen=True)
class ScoreThresholds:
    """``autoresearch.score_thresholds:`` used by ``selection_score``."""

    max_dead_feature_rate: float = 0.98
    max_val_logit_kl_bits_mean: float = 20.0

    def __post_init__(self) -> None:
        p = "autoresearch.score_thresholds."
        object.__setattr__(self, "max_dead_feature_rate", _as_float(p + "max_dead_feature_rate", self.max_dead_feature_rate))
        object.__setattr__(
            self, "max_val_logit_kl_bits_mean", _as_float(p + "max_val_logit_kl_bits_mean", self.max_val_logit_kl_bits_mean)
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated run config. ``raw`` is the merged mapping (overrides applied) that is written
    to ``config.yaml`` and recorded in checkpoints; the typed blocks are what the code reads."""

    run: RunBlock
    data: DataConfig
    factorizer: FactorizerConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    artifacts: ArtifactsConfig
    mesh: MeshConfig
    score_thresholds: ScoreThresholds
    raw: Mapping[str, Any] = dataclasses.field(compare=False, hash=False)

    @property
    def data_seed(self) -> int:
        return self.run.seed if self.data.data_seed is None else self.data.data_seed

    @property
    def init_seed(self) -> int:
        return self.run.resolved_init_seed

    def to_dict(self) -> dict[str, Any]:
        """The merged config mapping (a deep copy)."""
        import copy

        return copy.deepcopy(dict(self.raw))


def run_config_from_dict(config: Mapping[str, Any]) -> RunConfig:
    """Validate a whole reference-style config mapping (unknown keys raise, naming them)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"a run config must be a mapping, got {type(config).__name__}")
    for key in SWEEP_KEYS:
        if key in config:
            raise ConfigError(
                f"top-level {key!r} marks a sweep-grid template, not a single run config; "
                "expand the grid into one config per cell"
            )
    _unknown_keys("the config", config, set(RUN_BLOCKS))
    for key in ("factorizer", "training"):
        if not isinstance(config.get(key), Mapping):
            raise ConfigError(f"the config must have a {key!r} block")
    training_block = _block("training", config.get("training"))
    if "l0_controller" in training_block:
        training_block["l0_controller"] = _build(
            L0ControllerConfig, "training.l0_controller", training_block["l0_controller"]
        )
    autoresearch = _block("autoresearch", config.get("autoresearch"))
    _unknown_keys("autoresearch", autoresearch, {"score_thresholds"})
    _block("model", config.get("model"))  # documentary, never read; must still be a mapping
    return RunConfig(
        run=_build(RunBlock, "run", config.get("run")),
        data=_build(DataConfig, "data", config.get("data")),
        factorizer=FactorizerConfig.from_dict(_block("factorizer", config.get("factorizer")), strict=True),
        training=_build(TrainingConfig, "training", training_block),
        evaluation=EvaluationConfig.from_dict(_block("evaluation", config.get("evaluation")), strict=True),
        artifacts=_build(ArtifactsConfig, "artifacts", config.get("artifacts")),
        mesh=_build(MeshConfig, "mesh", config.get("mesh")),
        score_thresholds=_build(ScoreThresholds, "autoresearch.score_thresholds", autoresearch.get("score_thresholds")),
        raw=dict(config),
    )


def parse_override_value(text: str) -> Any:
    """``--set`` value coercion (the reference's): null/none/~ -> None, true/false -> bool, then
    int, then float, else the string. A YAML flow list/map (``[16, 32]``) is parsed as YAML."""
    low = text.strip().lower()
    if low in ("null", "none", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        import yaml

        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse override value {text!r}: {exc}") from None
    return text


def apply_overrides(config: Mapping[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a deep copy of ``config`` (intermediate blocks are created)."""
    import copy

    out = copy.deepcopy(dict(config))
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"--set key {key!r} is not a dotted key like training.steps")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = parse_override_value(value)
    return out


def builtin_config_path(name: str):
    """Path of a config shipped as package data (``smoke``, ``smollm2-cpu``,
    ``paper/qwen3.5-2b/k256_32x``), or None."""
    from importlib import resources

    try:
        root = resources.files("srp_jax.configs")
    except ModuleNotFoundError:  # pragma: no cover - broken install
        return None
    stem = name[:-5] if name.endswith(".yaml") else name
    for candidate in (f"{stem}.yaml", f"paper/{stem}.yaml"):
        node = root
        for part in candidate.split("/"):
            node = node / part
        if node.is_file():
            return node
    return None


def builtin_config_names() -> list[str]:
    """Names accepted by ``--config`` besides file paths: ``smoke``, ``smollm2-cpu``, ...,
    ``paper/<model>/<op>``."""
    from importlib import resources

    try:
        root = resources.files("srp_jax.configs")
    except ModuleNotFoundError:  # pragma: no cover - broken install
        return []
    names = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml") and p.name != "registry.yaml")
    paper = root / "paper"
    if paper.is_dir():
        for model in sorted(paper.iterdir(), key=lambda p: p.name):
            if model.is_dir():
                names += [f"paper/{model.name}/{op.name[:-5]}" for op in sorted(model.iterdir(), key=lambda p: p.name)
                          if op.name.endswith(".yaml")]
    return names


def read_config_file(path_or_name) -> tuple[dict[str, Any], str]:
    """Read a YAML config from a file, or a built-in config by name. Returns (mapping, source)."""
    import os

    import yaml

    text = os.fspath(path_or_name)
    if os.path.isfile(text):
        source, opener = text, lambda: open(text, encoding="utf-8")
    else:
        node = builtin_config_path(text)
        if node is None and os.path.isdir(text):
            raise ConfigError(f"{text}: is a directory, not a YAML config file")
        if node is None:
            names = builtin_config_names()
            flat = [n for n in names if not n.startswith("paper/")]
            paper = [n for n in names if n.startswith("paper/")]
            raise ConfigError(
                f"{text}: no such config file or built-in config (built-in: {', '.join(flat)}, and "
                f"{len(paper)} paper configs paper/<model>/<op>, e.g. {paper[0] if paper else 'none'}; "
                "srp-jax hub list shows the <model>/<op> names)"
            )
        source, opener = f"srp_jax.configs:{text}", lambda: node.open("r", encoding="utf-8")
    try:
        with opener() as fh:
            loaded = yaml.safe_load(fh)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{source}: not valid YAML ({first})") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{source}: a config must be a YAML mapping, got {type(loaded).__name__}")
    return dict(loaded), source


def load_run_config(
    config: Any,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    out_dir: str | None = None,
    data_path: str | None = None,
) -> RunConfig:
    """Load and validate a run config: a YAML path, a built-in name, or a mapping; then
    ``--set`` overrides, ``--out-dir`` (= run.output_dir) and ``--data-path`` (= data.path)."""
    if isinstance(config, Mapping):
        mapping = dict(config)
    else:
        mapping, _ = read_config_file(config)
    mapping = apply_overrides(mapping, overrides)
    if out_dir is not None:
        mapping.setdefault("run", {})
        mapping["run"] = {**(mapping["run"] or {}), "output_dir": str(out_dir)}
    if data_path is not None:
        mapping["data"] = {**(mapping.get("data") or {}), "path": str(data_path)}
    return run_config_from_dict(mapping)
