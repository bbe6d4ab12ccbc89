"""``Dictionary``: a factorizer config + parameter/buffer pytrees + the checkpoint's row stats.

This is what ``load_factorizer`` returns. It binds the pure kernels of
:mod:`srp_jax.factorizers` for users who want the reference's call style
(``sae.encode(x, k)``, ``sae.decode(code)``, ``sae.k``); JAX-native code can use
``dictionary.params`` / ``dictionary.buffers`` with the pure functions directly.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import factorizers as F
from . import hub
from ._arrays import as_float_array, check_last_dim, static_k, to_numpy
from ._display import count_parameters, fields_repr, html_table, scalar_text
from .checkpoint import load_checkpoint, save_dictionary
from .config import FactorizerConfig
from ._lazy import read_pt
from .errors import CheckpointError, ConfigError, MissingConfigError, ShapeError
from .readout import Readout


@dataclasses.dataclass(repr=False)
class Dictionary:
    """A loaded or trained factorizer.

    Attributes: ``config`` (FactorizerConfig), ``params`` / ``buffers`` (pytrees, see
    :mod:`srp_jax.factorizers`), ``d_model``; from the checkpoint when present (else None):
    ``row_mean`` (d,), ``row_norms`` (V,), ``row_token_ids`` (V,) int64 NumPy, ``metrics``,
    ``evaluation`` (the raw ``evaluation`` block), ``factorizer_block`` (the raw ``factorizer``
    block, kept verbatim for round trips), ``source_config`` (a Hub checkpoint's ``config``
    block, verbatim). ``training`` mirrors torch's ``.training`` (BatchTopK encodes with batch
    selection and updates its threshold while it is True).
    """

    config: FactorizerConfig
    params: F.Params
    buffers: F.Buffers
    d_model: int
    row_mean: jax.Array | None = None
    row_norms: jax.Array | None = None
    row_token_ids: np.ndarray | None = None
    metrics: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    factorizer_block: dict[str, Any] | None = None
    source_config: dict[str, Any] | None = None
    training: bool = False
    frozen: bool = False

    # ---- reference-style attributes
    @property
    def k(self) -> int:
        """The trained k (TopK family, batch_topk) or d_features (the reference's ``model.k``)."""
        return self.config.native_k

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def d_features(self) -> int:
        return self.config.d_features

    @property
    def decoder(self) -> jax.Array:
        return self.params["decoder"]

    def readout(self, W_U: Any, *, token_mask: Any = None, softcap: float | None = None, rows: str = "trained"):
        """``W_U`` prepared the way this dictionary was trained (see ``Readout.for_dictionary``)."""
        return Readout.for_dictionary(W_U, self, token_mask=token_mask, softcap=softcap, rows=rows)

    # ---- display
    def _summary_rows(self) -> list[tuple[str, Any]]:
        dtype = getattr(self.params.get("decoder"), "dtype", "?")
        rows = [
            ("architecture", self.architecture),
            ("d_model", self.d_model),
            ("d_features", self.d_features),
            ("k", self.k),
            ("dtype", np.dtype(dtype).name if dtype != "?" else dtype),
            ("parameters", f"{count_parameters(self.params):,}"),
        ]
        if self.buffers:
            rows.append(("buffers", ", ".join(f"{k}={scalar_text(v)}" for k, v in self.buffers.items())))
        if self.row_norms is not None:
            rows.append(("trained rows", int(np.shape(self.row_norms)[0])))
        if self.metrics:
            from .hub import metric

            shown = [(name, metric(self.metrics, name)) for name in ("rowEV", "top1", "KL")]
            rows += [(name, f"{value:.4g}") for name, value in shown if isinstance(value, (int, float))]
        if self.training:
            rows.append(("mode", "training"))
        return rows

    def __repr__(self) -> str:
        keep = ("architecture", "d_model", "d_features", "k", "dtype", "parameters", "trained rows", "mode")
        return fields_repr("Dictionary", [(k.replace(" ", "_"), v) for k, v in self._summary_rows() if k in keep])

    def _repr_html_(self) -> str:
        return html_table("srp-jax Dictionary", self._summary_rows())

    def replace(self, **changes: Any) -> Dictionary:
        """A copy with ``changes`` applied (the arrays are shared, not copied)."""
        return dataclasses.replace(self, **changes)

    # ---- mode switches (torch-like)
    def train(self, mode: bool = True) -> Dictionary:
        self.training = bool(mode)
        return self

    def eval(self) -> Dictionary:
        return self.train(False)

    # ---- kernels
    def _rows(self, x: Any, name: str = "x") -> jax.Array:
        arr = as_float_array(x, name=name, ndim=(1, 2))
        check_last_dim(name, arr, self.d_model)
        return arr

    def encode(self, x: Any, k: int | None = None) -> jax.Array:
        """Code (B, D) of normalized rows x (B, d) (or (D,) for one row (d,)).

        In training mode an architecture whose training code differs (batch_topk's batch-wide
        selection) encodes through the training forward and keeps the updated buffers."""
        arr = self._rows(x)
        single = arr.ndim == 1
        batch = arr[None] if single else arr
        if self.training and self.config.arch.encode_depends_on_mode:
            out = F.forward_jit(self.config, self.params, self.buffers, batch, static_k(k), train=True)
            self.buffers = out.buffers
            code = out.code
        else:
            cfg, params, buffers, _ = inference_view(self, allow_training=True)
            code = F.encode_jit(cfg, params, buffers, batch, static_k(k))
        return code[0] if single else code

    def decode(self, code: Any) -> jax.Array:
        """code (B, D) -> reconstruction (B, d) in normalized-row space."""
        arr = as_float_array(code, name="code", ndim=(1, 2))
        check_last_dim("code", arr, self.d_features, "the dictionary's d_features")
        return F.decode_jit(self.params, arr)

    def forward(self, x: Any, k: int | None = None) -> F.FactorizerOutput:
        """The reference ``forward`` in the current mode (updates buffers when training)."""
        arr = self._rows(x)
        batch = arr[None] if arr.ndim == 1 else arr
        if not self.training:
            inference_view(self)
        out = F.forward_jit(self.config, self.params, self.buffers, batch, static_k(k), train=self.training)
        if self.training:
            self.buffers = out.buffers
        return out

    __call__ = forward

    # ---- checkpoint dicts
    @classmethod
    def from_checkpoint_dict(
        cls,
        ckpt: Mapping[str, Any],
        *,
        d_model: int | None = None,
        factorizer_config: Mapping[str, Any] | FactorizerConfig | None = None,
        source: str = "checkpoint",
        dtype=None,
    ) -> Dictionary:
        """Build from a reference checkpoint dict (every loader variant of the reference).

        Config: ``factorizer_config``, else ``ckpt['factorizer']``, else
        ``ckpt['config']['factorizer']`` (truthiness fallbacks; KeyError-compatible
        :class:`MissingConfigError` if none). Weights: ``model_state_dict``, else
        ``state_dict``, else the dict itself. ``d_model`` defaults to ``encoder.weight.shape[1]``.
        """
        if not isinstance(ckpt, Mapping):
            raise CheckpointError(f"{source}: expected a checkpoint dict, got {type(ckpt).__name__}")
        config_block = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else None
        if isinstance(factorizer_config, FactorizerConfig):
            cfg, block = factorizer_config, factorizer_config.to_dict()
        else:
            block = factorizer_config or ckpt.get("factorizer") or (config_block or {}).get("factorizer")
            if not block:
                raise MissingConfigError(
                    f"{source}: no factorizer config (looked for 'factorizer' and 'config.factorizer'); "
                    "pass factorizer_config="
                )
            if not isinstance(block, Mapping):
                raise CheckpointError(f"{source}: factorizer config must be a dict, got {type(block).__name__}")
            try:
                cfg = FactorizerConfig.from_dict(block, strict=False)
            except ConfigError as exc:
                raise type(exc)(f"{source}: factorizer config: {exc}") from None
        state = ckpt.get("model_state_dict") or ckpt.get("state_dict") or ckpt
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{source}: the state dict is a {type(state).__name__}, not a dict")
        if d_model is None:
            if "encoder.weight" not in state:
                raise ShapeError(f"{source}: cannot infer d_model: 'encoder.weight' is missing; pass d_model=")
            shape = np.shape(to_numpy(state["encoder.weight"], name=f"{source}['encoder.weight']"))
            if len(shape) != 2:
                raise ShapeError(f"{source}: 'encoder.weight' must be 2-D (D, d), got shape {tuple(shape)}")
            d_model = int(shape[1])
        params, buffers = F.state_dict_to_variables(state, cfg, int(d_model), source=source, dtype=dtype)

        def _opt_float(key: str, ndim: int) -> jax.Array | None:
            if key not in ckpt or ckpt[key] is None:
                return None
            arr = to_numpy(ckpt[key], name=f"{source}[{key!r}]")
            if arr.ndim != ndim:
                raise ShapeError(f"{source}: {key!r} must have rank {ndim}, got shape {arr.shape}")
            return jnp.asarray(arr.astype(np.float32))

        row_mean = _opt_float("row_mean", 1)
        if row_mean is not None and row_mean.shape[0] != d_model:
            raise ShapeError(f"{source}: 'row_mean' has length {row_mean.shape[0]}, expected d_model={d_model}")
        row_token_ids = None
        if ckpt.get("row_token_ids") is not None:
            row_token_ids = to_numpy(ckpt["row_token_ids"], name=f"{source}['row_token_ids']").astype(np.int64)
        evaluation = ckpt.get("evaluation")
        return cls(
            config=cfg,
            params=params,
            buffers=buffers,
            d_model=int(d_model),
            row_mean=row_mean,
            row_norms=_opt_float("row_norms", 1),
            row_token_ids=row_token_ids,
            metrics=dict(ckpt["metrics"]) if isinstance(ckpt.get("metrics"), Mapping) else None,
            evaluation=dict(evaluation) if isinstance(evaluation, Mapping) else None,
            factorizer_block=dict(block),
            source_config=dict(config_block) if config_block is not None else None,
        )

    def to_checkpoint_dict(self) -> dict[str, Any]:
        """The reference runner layout with NumPy arrays (``convert`` turns them into tensors).

        Keys: model_state_dict, factorizer, evaluation, row_mean, row_norms, row_token_ids,
        metrics (each optional one only when present), and ``config`` when the source had it.
        """
        out: dict[str, Any] = {
            "model_state_dict": F.variables_to_state_dict(self.params, self.buffers, self.config),
            "factorizer": dict(self.factorizer_block) if self.factorizer_block else self.config.to_dict(),
        }
        if self.evaluation is not None:
            out["evaluation"] = dict(self.evaluation)
        if self.row_mean is not None:
            out["row_mean"] = np.asarray(self.row_mean, dtype=np.float32)
        if self.row_norms is not None:
            out["row_norms"] = np.asarray(self.row_norms, dtype=np.float32)
        if self.row_token_ids is not None:
            out["row_token_ids"] = np.asarray(self.row_token_ids, dtype=np.int64)
        if self.metrics is not None:
            out["metrics"] = dict(self.metrics)
        if self.source_config is not None:
            out["config"] = dict(self.source_config)
        return out


def inference_view(model: Any, *, allow_training: bool = False) -> tuple[FactorizerConfig, F.Params, F.Buffers, int]:
    """``(config, params, buffers, d_model)`` of a dictionary about to be used in eval mode —
    the one check every consumer (decomposition, evaluation, the Dictionary's own encode)
    runs: the object is a dictionary, it is not in training mode when its architecture's code
    depends on the mode (unless ``allow_training``), and its learned state is ready
    (``ThresholdNotReadyError`` for a BatchTopK threshold never fitted)."""
    try:
        cfg, params, buffers, d_model = model.config, model.params, model.buffers, model.d_model
    except AttributeError:
        raise ConfigError(
            f"model must be a loaded dictionary (srp_jax.load_factorizer), got {type(model).__name__}"
        ) from None
    if not allow_training and getattr(model, "training", False) and cfg.arch.encode_depends_on_mode:
        raise ConfigError(f"use a {cfg.architecture} dictionary in eval mode here (call .eval() first)")
    F.check_ready(cfg, buffers)
    return cfg, params, buffers, int(d_model)


def load_dictionary(path: str | os.PathLike, *, sharding: Any = None) -> Dictionary:
    """Load an srp-jax checkpoint directory (or a training run directory holding
    ``checkpoint/``) into a :class:`Dictionary`.

    ``sharding``: None (default device), a ``jax.sharding.Mesh`` (the partition rules of
    :mod:`srp_jax.sharding`: D on ``model``), one ``jax.sharding.Sharding`` for every parameter
    and buffer, or a pytree of them (``{"params": ..., "buffers": ...}`` or shaped like params);
    arrays are restored directly onto it. Every array's checksum is verified (shard by shard
    on a mesh).
    """
    return Dictionary(**load_checkpoint(path, sharding=sharding).contents)


def _warn_if_nonfinite(dictionary: Dictionary, source: Any) -> None:
    """Warn (not fail: the reference loads diverged runs too) when weights hold NaN/Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path({"params": dictionary.params, "buffers": dictionary.buffers}):
        arr = np.asarray(leaf)
        if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
            count = int(arr.size - np.count_nonzero(np.isfinite(arr.astype(np.float32))))
            if count:
                bad.append(f"{jax.tree_util.keystr(path)} ({count})")
    if bad:
        where = "checkpoint dict" if isinstance(source, Mapping) else os.fspath(source)
        warnings.warn(
            f"{where}: non-finite values in {', '.join(bad)}; decompositions will be NaN and "
            "evaluate() reports finite_metrics=False",
            RuntimeWarning,
            stacklevel=3,
        )


_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}


def resolve_device(device: Any) -> jax.Device:
    """A ``jax.Device`` from a device, a platform string (``"cpu"``, ``"gpu"``, ``"tpu"``, and
    the torch spellings ``"cuda"``, ``"cuda:1"``, ``"cpu:0"``) or a ``torch.device``."""
    if isinstance(device, jax.Device):
        return device
    if isinstance(device, str):
        platform, _, index_text = device.strip().lower().partition(":")
        index = index_text or None
    elif hasattr(device, "type") and hasattr(device, "index"):  # torch.device, without importing torch
        platform, index = str(device.type), device.index
    else:
        raise ConfigError(f"device must be a jax.Device, a platform name or a torch.device, got {device!r}")
    backend = _PLATFORM_ALIASES.get(platform)
    if backend is None:
        raise ConfigError(f"device {device!r}: unknown platform {platform!r} (expected cpu, gpu/cuda or tpu)")
    try:
        devices = jax.devices(backend)
    except RuntimeError:
        raise ConfigError(f"device {device!r}: this JAX has no {backend} backend (have: {jax.default_backend()})") from None
    try:
        position = 0 if index is None else int(index)
    except ValueError:
        raise ConfigError(f"device {device!r}: bad device index {index!r}") from None
    if not 0 <= position < len(devices):
        raise ConfigError(f"device {device!r}: index {position} out of range ({len(devices)} {backend} device(s))")
    return devices[position]


def load_factorizer(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    d_model: int | None = None,
    factorizer_config: Mapping[str, Any] | FactorizerConfig | None = None,
    device: Any = None,
    freeze: bool = False,
    eval_mode: bool = True,
) -> Dictionary:
    """Load a dictionary (the reference signature).

    ``checkpoint`` may be a loaded checkpoint dict, a ``checkpoint.pt`` path (read by
    ``convert`` with ``torch.load(weights_only=True)``; needs the ``convert`` extra), an
    srp-jax (Orbax) checkpoint directory, a training run directory (its ``checkpoint/``), or
    ``"hub:<model>/<op>"`` for a published dictionary. ``device`` (a ``jax.Device``, a platform
    name such as ``"cpu"`` / ``"cuda:0"``, or a ``torch.device``) places the arrays; ``freeze`` only records intent
    (JAX arrays are immutable); ``eval_mode=False`` returns it in training mode.
    """
    dev = None if device is None else resolve_device(device)
    if isinstance(checkpoint, Mapping):
        dictionary = Dictionary.from_checkpoint_dict(
            checkpoint, d_model=d_model, factorizer_config=factorizer_config
        )
    elif isinstance(checkpoint, (str, os.PathLike)):
        dictionary = _load_from_location(checkpoint, d_model=d_model, factorizer_config=factorizer_config)
    else:
        raise ConfigError(
            "checkpoint must be a path, 'hub:<model>/<op>' or a loaded checkpoint dict, "
            f"got {type(checkpoint).__name__}"
        )
    _warn_if_nonfinite(dictionary, checkpoint)
    if dev is not None:
        dictionary.params = jax.device_put(dictionary.params, dev)
        dictionary.buffers = jax.device_put(dictionary.buffers, dev)
    dictionary.frozen = bool(freeze)
    dictionary.training = not eval_mode
    return dictionary


def _load_from_location(location, *, d_model, factorizer_config) -> Dictionary:
    text = os.fspath(location)
    if text.startswith("hub:"):
        entry = hub.find_entry(text)
        source = hub.fetch_checkpoint(entry.path)
        dictionary = _load_from_location(source, d_model=d_model, factorizer_config=factorizer_config)
        hub.verify_entry(dictionary, entry, source=source)
        return dictionary
    path = Path(text)
    if path.is_dir():
        dictionary = load_dictionary(path)
        if factorizer_config is not None or d_model is not None:
            cfg = (
                factorizer_config
                if isinstance(factorizer_config, FactorizerConfig)
                else FactorizerConfig.from_dict(factorizer_config or dictionary.factorizer_block, strict=False)
            )
            dictionary = Dictionary.from_checkpoint_dict(
                dictionary.to_checkpoint_dict(), d_model=d_model, factorizer_config=cfg, source=str(path)
            )
        return dictionary
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    ckpt = read_pt(path)
    return Dictionary.from_checkpoint_dict(ckpt, d_model=d_model, factorizer_config=factorizer_config, source=str(path))


__all__ = ["Dictionary", "inference_view", "load_dictionary", "save_dictionary", "load_factorizer", "resolve_device"]
