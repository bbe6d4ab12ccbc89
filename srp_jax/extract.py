"""Extraction of a readout payload from a causal LM: ``W_U`` and the hidden states at the
lm_head input for a text corpus (needs the ``extract`` extra: transformers, accelerate,
torch, gguf; ``import srp_jax`` never imports this module).

The recipe is the reference extractor's (``training-and-checkpoints.md`` §4.1):

* ``W_U`` = the lm_head weight as stored (tied embeddings included), float32 (V, d);
* hidden states = the tensor the lm_head is applied to (a forward pre-hook: after the final
  norm), for ``n_prompts`` corpus paragraphs tokenized to ``max_len`` tokens
  (``padding="max_length"``, truncation, the tokenizer's special tokens; pad = EOS when the
  tokenizer has none), in batches of ``batch_size``, with padding positions zeroed:
  ``h_LN`` (n_prompts, max_len, d) float32;
* before anything is written, on the first ``check_prompts`` prompts: (A) the structural check
  ``max|lm_head(h) - logits| / max|logits| < 1e-4``. When it fails but the config declares
  ``final_logit_softcapping`` and ``cap * tanh(lm_head(h) / cap)`` matches the logits, the
  transform is **recorded** (``post_readout_transform: {type: tanh_softcap, cap}``) instead of
  failing; (B) the precision check ``max|h W^T (+ b) - lm_head(h)| / max|lm_head(h)| <
  bf16_rel_tol``. Anything else fails with :class:`ExtractionError` and writes nothing.

Hidden states stream into a work folder next to the output in batches (``h_LN.npy`` as a
memory map plus ``state.json``), so memory stays at one batch and an interrupted extraction
resumes where it stopped when rerun with the same settings. The finished payload is published
atomically: a folder (``W_U.npy``, ``h_LN.npy``, optional ``token_mask.npy``,
``manifest.json``) renamed into place, or an ``.npz`` / ``.safetensors`` file with
``<stem>_manifest.json`` beside it; every format is one :func:`srp_jax.data.read_payload`
reads.

GGUF models: transformers parses a GGUF file slowly (about 30 s for SmolLM2-135M on 2 cores),
so a GGUF of at most ``GGUF_MATERIALIZE_MAX_BYTES`` is converted once into a float32 Hugging
Face folder in the srp-jax cache (the same weights, bit for bit) and loaded from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_file, publish_permissions, write_text_atomic
from ._lazy import torch_runtime
from .corpus import Corpus
from .errors import CheckpointError, ConfigError, DependencyError, SrpError
from .sources import ModelSpec, cache_root, file_sha256, payload_manifest_path, read_payload_manifest

EXTRA_HINT = "install the 'extract' extra: pip install 'srp-jax[extract]' (transformers, accelerate, torch, gguf)"
STRUCTURAL_TOL = 1e-4
GGUF_MATERIALIZE_MAX_BYTES = 512 * 1024 * 1024
PAYLOAD_FORMAT = 1
LM_HEAD_PATHS = ("lm_head", "model.lm_head", "language_model.lm_head", "model.language_model.lm_head", "text_model.lm_head")
FINAL_NORM_PATHS = (
    "model.norm", "model.language_model.norm", "language_model.norm", "model.model.norm", "transformer.ln_f",
    "model.final_layernorm", "model.language_model.final_layernorm",
)  # fmt: skip


class ExtractionError(SrpError, RuntimeError):
    """The model failed an adapter check (or could not be read); nothing was written."""


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """What decides a payload's contents (all part of its cache key)."""

    n_prompts: int = 300
    max_len: int = 256
    batch_size: int = 8
    model_dtype: str = "float32"
    bf16_rel_tol: float = 5e-3
    check_prompts: int = 6
    min_chars: int = 200
    token_mask: bool = False

    def __post_init__(self) -> None:
        for name in ("n_prompts", "max_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model_dtype must be float32 or bfloat16, got {self.model_dtype!r}")
        if int(self.check_prompts) < 1:
            raise ConfigError(f"check_prompts must be >= 1, got {self.check_prompts}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require_extract_extra(what: str = "extraction") -> None:
    """A :class:`DependencyError` naming the ``extract`` extra when transformers/torch are missing."""
    import importlib.util

    def absent(name: str) -> bool:
        if name in sys.modules:
            return sys.modules[name] is None
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    missing = [m for m in ("torch", "transformers") if absent(m)]
    if missing:
        raise DependencyError(f"{what} needs {' and '.join(missing)}; {EXTRA_HINT}")


def payload_key(model: ModelSpec, corpus: Corpus, settings: ExtractionSettings) -> str:
    """sha256 over (model identity, corpus and prompt hashes, settings): names a payload."""
    doc = {"model": model.identity(), "corpus": corpus.describe(settings.n_prompts), "settings": settings.to_dict(),
           "format": PAYLOAD_FORMAT}  # fmt: skip
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading models


@contextlib.contextmanager
def _quiet_transformers(show_progress: bool):
    import transformers
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    gguf_utils, gguf_tqdm = None, None
    if not show_progress:
        hf_logging.disable_progress_bar()
        # the GGUF loader uses plain tqdm, outside transformers' progress switch
        with contextlib.suppress(ImportError, AttributeError):
            from transformers import modeling_gguf_pytorch_utils as gguf_utils

            gguf_tqdm = gguf_utils.tqdm
            gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield transformers
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _from_pretrained(transformers, location: str, dtype, **kwargs):
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except ValueError as first:
        try:  # multimodal checkpoints (Qwen3.5, Gemma-4) keep the LM under an image-text class
            return transformers.AutoModelForImageTextToText.from_pretrained(location, dtype=dtype, **kwargs)
        except Exception:  # noqa: BLE001 - report the causal-LM error, the usual case
            raise ExtractionError(f"{location}: cannot load as a causal LM ({first})") from None


def materialized_gguf(path: Path, *, show_progress: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """The Hugging Face folder (float32 safetensors + tokenizer) converted from GGUF ``path``,
    made once under ``<cache>/models/gguf-<sha256[:16]>`` (atomically)."""
    log = log or _stderr
    sha = file_sha256(path)
    folder = cache_root() / "models" / f"gguf-{sha[:16]}"
    if (folder / "srp_jax_source.json").is_file():
        return folder
    log(f"[extract] converting {path.name} to a Hugging Face folder in {folder.parent} (once)")
    torch = torch_runtime(f"converting {path.name}").torch

    with _quiet_transformers(show_progress) as transformers:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = _from_pretrained(transformers, str(path.parent), torch.float32, gguf_file=path.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(folder.parent / f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # a GGUF-loaded model is flagged as quantized and refuses save_pretrained: copy its
            # (already dequantized) float32 weights into a plain model of the same config
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(model.state_dict(), strict=True)
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "srp_jax_source.json").write_text(json.dumps({"gguf": path.name, "sha256": sha}) + "\n")
            for file in tmp.iterdir():
                publish_permissions(file)
            publish_permissions(tmp, directory=True)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process made it first
                if not (folder / "srp_jax_source.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(
    spec: ModelSpec,
    *,
    model_dtype: str = "float32",
    device: str = "cpu",
    materialize: bool | None = None,
    show_progress: bool = False,
    log: Callable[[str], None] | None = None,
):
    """``(model, tokenizer)`` for a model spec, in eval mode. ``materialize`` (GGUF only):
    None = when the file is at most ``GGUF_MATERIALIZE_MAX_BYTES``."""
    require_extract_extra(f"loading {spec.name}")
    dtype = torch_runtime(f"loading {spec.name}").dtype(model_dtype)
    with _quiet_transformers(show_progress) as transformers:
        if spec.kind == "gguf":
            small = spec.path.stat().st_size <= GGUF_MATERIALIZE_MAX_BYTES
            if materialize if materialize is not None else small:
                location, kwargs = str(materialized_gguf(spec.path, show_progress=show_progress, log=log)), {}
            else:
                location, kwargs = str(spec.path.parent), {"gguf_file": spec.path.name}
        elif spec.kind == "folder":
            location, kwargs = str(spec.path), {}
        else:
            location, kwargs = spec.name, {"revision": spec.revision}
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ExtractionError(f"{spec.name}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
        model = _from_pretrained(transformers, location, dtype, **kwargs)
    model.eval()
    if device != "cpu":
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def find_module(model: Any, paths: Sequence[str]) -> tuple[Any, str] | tuple[None, None]:
    """The first of the dotted ``paths`` that exists on ``model``."""
    for path in paths:
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return node, path
    return None, None


def model_softcap(model: Any) -> float | None:
    """``final_logit_softcapping`` of the model config (or its text config), or None."""
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        cap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
        if cap:
            return float(cap)
    return None


# --------------------------------------------------------------------------------------------
# The forward pass


class HiddenStates:
    """Run prompts through a model and capture the lm_head input (the pre-hook of the
    reference). ``__call__(input_ids, attention_mask) -> (h (B, T, d) float32 torch, logits)``."""

    def __init__(self, model: Any):
        self.torch = torch_runtime("capturing hidden states").torch
        self.model = model
        self.lm_head, self.lm_head_path = find_module(model, LM_HEAD_PATHS)
        if self.lm_head is None:
            raise ExtractionError(f"no lm_head found (looked for {', '.join(LM_HEAD_PATHS)})")
        self.final_norm_path = find_module(model, FINAL_NORM_PATHS)[1]
        if self.final_norm_path is None:
            raise ExtractionError(f"no final norm found (looked for {', '.join(FINAL_NORM_PATHS)})")
        self.device = next(model.parameters()).device

    def __call__(self, input_ids, attention_mask):
        torch = self.torch
        captured = {}

        def hook(module, args):  # noqa: ARG001
            captured["h"] = args[0].detach()

        handle = self.lm_head.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        finally:
            handle.remove()
        if "h" not in captured:
            raise ExtractionError(f"the forward pass never called {self.lm_head_path}")
        return captured["h"], out.logits

    def weight(self) -> np.ndarray:
        """``W_U`` = the lm_head weight as float32 NumPy (V, d)."""
        return self.lm_head.weight.detach().to(self.torch.float32).cpu().numpy()

    def bias(self):
        return getattr(self.lm_head, "bias", None)


def last_token_hidden(runner: HiddenStates, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 8) -> np.ndarray:
    """The lm_head input at each prompt's last token: (len(prompts), d) float32 NumPy.

    ``runner`` a :class:`HiddenStates` of the model, ``tokenizer`` its tokenizer. Prompts run
    in padded batches; the last real token is read from the attention mask, so either padding
    side gives the same states as one prompt at a time.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        h, _ = runner(enc["input_ids"], enc["attention_mask"])
        mask = enc["attention_mask"].cpu().numpy()
        h_np = h.float().cpu().numpy()
        for i in range(h_np.shape[0]):
            out.append(h_np[i, int(np.flatnonzero(mask[i])[-1])])
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def _tokenize(tokenizer, prompts: Sequence[str], max_len: int):
    return tokenizer(list(prompts), return_tensors="pt", padding="max_length", truncation=True, max_length=max_len)


def adapter_check(
    runner: HiddenStates, tokenizer, prompts: Sequence[str], settings: ExtractionSettings
) -> dict[str, Any]:
    """The reference's two checks on ``prompts`` (see the module docstring); returns the
    manifest fields or raises :class:`ExtractionError`."""
    torch = runner.torch
    enc = _tokenize(tokenizer, prompts, settings.max_len)
    h, logits = runner(enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():
        head = runner.lm_head(h).float()
        logits = logits.float()
        scale = float(logits.abs().max().clamp_min(1e-12))
        rel = float((head - logits).abs().max()) / scale
        transform, t_abs, t_rel = None, None, None
        if not rel < STRUCTURAL_TOL:
            cap = model_softcap(runner.model)
            if cap is None:
                raise ExtractionError(
                    f"structural check failed: max|lm_head(h) - logits| / max|logits| = {rel:.3g} >= {STRUCTURAL_TOL} "
                    "and the config declares no final_logit_softcapping (an unknown post-readout transform)"
                )
            capped = cap * torch.tanh(head / cap)
            t_abs = float((capped - logits).abs().max())
            t_rel = t_abs / scale
            if not t_rel < STRUCTURAL_TOL:
                raise ExtractionError(
                    f"structural check failed even with the declared softcap {cap}: relative error {t_rel:.3g}"
                )
            transform = {"type": "tanh_softcap", "cap": cap}
        W = runner.lm_head.weight.float()
        recon = h.float() @ W.T
        bias = runner.bias()
        if bias is not None:
            recon = recon + bias.float()
        b_abs = float((recon - head).abs().max())
        b_rel = b_abs / float(head.abs().max().clamp_min(1e-12))
    if not b_rel < settings.bf16_rel_tol:
        raise ExtractionError(
            f"precision check failed: max|h W^T - lm_head(h)| / max|lm_head(h)| = {b_rel:.3g} >= {settings.bf16_rel_tol}"
        )
    return {
        "adapter_gate_structural_abs": float((head - logits).abs().max()),
        "adapter_gate_structural_rel": rel,
        "adapter_gate_recon_vs_lmhead_abs": b_abs,
        "adapter_gate_recon_vs_lmhead_rel": b_rel,
        "post_readout_transform": transform,
        "post_readout_transform_abs": t_abs,
        "post_readout_transform_rel": t_rel,
        "check_prompts": len(prompts),
    }


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A redrawn one-line bar on a TTY; silent otherwise (logs and CI stay clean)."""

    def __init__(self, total: int, *, label: str = "extract", unit: str = "prompts", stream=None, enabled: bool | None = None):
        self.total, self.label, self.unit = max(int(total), 1), label, unit
        self.stream = stream or sys.stderr
        self.enabled = bool(enabled) if enabled is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0, self.n0 = time.perf_counter(), None

    def update(self, done: int) -> None:
        if self.n0 is None:
            self.n0, self.t0 = done, time.perf_counter()
        if not self.enabled:
            return
        rate = (done - self.n0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        fill = int(round(24 * done / self.total))
        eta_text = "--" if eta != eta else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
        self.stream.write(
            f"\r[{self.label}] {done}/{self.total} {self.unit} [{'#' * fill}{'.' * (24 - fill)}] "
            f"{rate:.1f}/s ETA {eta_text} "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Output layout


def _out_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix in (".npz", ".safetensors"):
        return suffix[1:]
    if suffix in (".pt", ".pth", ".npy"):
        raise ConfigError(f"{out}: write a folder, .npz or .safetensors payload (not {suffix})")
    return "folder"


def work_dir_for(out: Path) -> Path:
    """The resumable work folder next to ``out``."""
    return out.parent / f".{out.name}.partial"


def payload_complete(out: Path) -> bool:
    """Whether ``out`` is a finished payload (its files and manifest are in place)."""
    fmt = _out_format(out)
    if fmt == "folder":
        return all((out / name).is_file() for name in ("W_U.npy", "h_LN.npy", "manifest.json"))
    return out.is_file() and payload_manifest_path(out).is_file()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _publish(work: Path, out: Path, fmt: str, manifest: dict[str, Any], token_mask: np.ndarray | None) -> None:
    if fmt == "folder":
        (work / "state.json").unlink(missing_ok=True)
        write_text_atomic(work / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        publish_permissions(work, directory=True)
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(work, out)
        if old is not None:
            _remove(old)
        return
    W = np.load(work / "W_U.npy", mmap_mode="r")
    h = np.load(work / "h_LN.npy", mmap_mode="r")
    arrays = {"W_U": np.asarray(W), "h_LN": np.asarray(h)}
    if token_mask is not None:
        arrays["token_mask"] = token_mask
    with atomic_file(out) as tmp:
        if fmt == "npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        else:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    write_text_atomic(payload_manifest_path(out), json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(work)


# --------------------------------------------------------------------------------------------
# The extraction


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in ("srp-jax", "torch", "transformers", "gguf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _token_mask(tokenizer, vocab: int) -> np.ndarray:
    """True for ids the tokenizer has that are not special (the reference's newer rule)."""
    mask = np.zeros(vocab, dtype=bool)
    mask[: min(len(tokenizer), vocab)] = True
    for i in tokenizer.all_special_ids:
        if 0 <= int(i) < vocab:
            mask[int(i)] = False
    return mask


def _source_check(spec: ModelSpec, W: np.ndarray) -> dict[str, Any]:
    """Compare the lm_head weight with the torch-free reading of the same source."""
    from .sources import read_gguf_readout, read_hf_readout

    try:
        if spec.kind == "gguf":
            src = read_gguf_readout(spec.path)
        elif spec.kind == "folder":
            src = read_hf_readout(str(spec.path))
        else:
            src = read_hf_readout(spec.name, revision=spec.revision, local_files_only=True)
    except (SrpError, OSError) as exc:
        return {"checked": False, "why": str(exc)[:300]}
    if src.W_U.shape != W.shape:
        return {"checked": True, "equal": False, "why": f"shape {src.W_U.shape} vs lm_head {W.shape}", "tensor": src.tensor}
    return {
        "checked": True,
        "equal": bool(np.array_equal(src.W_U, W)),
        "max_abs_diff": float(np.max(np.abs(src.W_U - W))) if W.size else 0.0,
        "tensor": src.tensor,
        "tied": src.tied,
    }


def extract_payload(
    model: ModelSpec,
    corpus: Corpus,
    out: str | os.PathLike,
    settings: ExtractionSettings = ExtractionSettings(),
    *,
    force: bool = False,
    device: str = "cpu",
    materialize: bool | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> Path:
    """Extract a payload (see the module docstring) to ``out`` (a folder, or ``.npz`` /
    ``.safetensors``) and return its path. An existing ``out`` is an error unless ``force``.
    A work folder left by an interrupted run with the same key is resumed. ``loaded``: a
    ``(model, tokenizer)`` already in memory (then ``model`` only names it)."""
    log = log or _stderr
    out = Path(out)
    fmt = _out_format(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise CheckpointError(f"{out}: already exists (pass --force to replace it)")
    prompts = corpus.prompts(settings.n_prompts)
    key = payload_key(model, corpus, settings)
    work = work_dir_for(out)
    state = {}
    if (work / "state.json").is_file():
        try:
            state = json.loads((work / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        if state.get("key") != key:
            log(f"[extract] {work}: left by an extraction with other settings; starting afresh")
            state = {}
    if not state:
        _remove(work)
    t0 = time.perf_counter()
    if loaded is None:
        lm, tokenizer = load_model(model, model_dtype=settings.model_dtype, device=device, materialize=materialize,
                                   show_progress=bool(progress), log=log)  # fmt: skip
    else:
        lm, tokenizer = loaded
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    load_seconds = time.perf_counter() - t0
    runner = HiddenStates(lm)
    checks = adapter_check(runner, tokenizer, prompts[: settings.check_prompts], settings)
    W = runner.weight()
    V, d = W.shape
    torch = runner.torch

    work.mkdir(parents=True, exist_ok=True)
    h_path = work / "h_LN.npy"
    shape = (settings.n_prompts, settings.max_len, d)
    done = int(state.get("done", 0)) if state else 0
    if done and h_path.is_file():
        h_out = np.lib.format.open_memmap(h_path, mode="r+")
        if h_out.shape != shape or h_out.dtype != np.float32:
            h_out, done = None, 0
    else:
        h_out, done = None, 0
    if h_out is None:
        h_out = np.lib.format.open_memmap(h_path, mode="w+", dtype=np.float32, shape=shape)
        state = {"key": key, "done": 0, "nonpad": []}
        np.save(work / "W_U.npy", W)
    elif done:
        log(f"[extract] resuming at prompt {done}/{settings.n_prompts}")
    nonpad: list[int] = list(state.get("nonpad", []))[:done]
    bar = Progress(settings.n_prompts, enabled=progress)
    t_run = time.perf_counter()
    bar.update(done)
    try:
        for start in range(done, settings.n_prompts, settings.batch_size):
            batch = prompts[start : start + settings.batch_size]
            enc = _tokenize(tokenizer, batch, settings.max_len)
            h, _ = runner(enc["input_ids"], enc["attention_mask"])
            mask = enc["attention_mask"].to(h.device).unsqueeze(-1).to(h.dtype)
            h = (h * mask).to(torch.float32).cpu().numpy()
            if h.shape[1] != settings.max_len:
                raise ExtractionError(f"tokenizer returned {h.shape[1]} positions, expected max_len {settings.max_len}")
            h_out[start : start + len(batch)] = h
            h_out.flush()
            nonpad += [int(n) for n in enc["attention_mask"].sum(dim=1).tolist()]
            state = {"key": key, "done": start + len(batch), "nonpad": nonpad}
            write_text_atomic(work / "state.json", json.dumps(state) + "\n")
            bar.update(start + len(batch))
    finally:
        bar.close()
        del h_out
    extract_seconds = time.perf_counter() - t_run
    mask = _token_mask(tokenizer, V) if settings.token_mask else None
    if mask is not None:
        np.save(work / "token_mask.npy", mask)
    cfg = lm.config
    text_cfg = getattr(cfg, "text_config", None)
    manifest = {
        "format": "srp-jax readout payload",
        "format_version": PAYLOAD_FORMAT,
        "key": key,
        "model": model.name,
        "model_id": model.name if model.kind == "hub" else None,
        "revision": model.revision,
        "model_identity": model.identity(),
        "model_type": getattr(cfg, "model_type", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "vocab_size": int(V),
        "d_model": int(d),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", getattr(text_cfg, "num_hidden_layers", None)),
        "hidden_source": f"forward pre-hook on {runner.lm_head_path} (final norm: {runner.final_norm_path})",
        "lm_head_path": runner.lm_head_path,
        "final_norm_path": runner.final_norm_path,
        "lm_head_bias": runner.bias() is not None,
        "model_dtype": settings.model_dtype,
        **checks,
        "W_U_source_check": _source_check(model, W),
        **corpus.describe(settings.n_prompts),
        "max_len": settings.max_len,
        "batch_size": settings.batch_size,
        "min_chars": settings.min_chars,
        "padding": "max_length, padding zeroed",
        "padding_side": getattr(tokenizer, "padding_side", None),
        "pad_token_id": tokenizer.pad_token_id,
        "h_LN_shape": list(shape),
        "h_LN_dtype": "float32",
        "n_nonpad_positions": int(sum(nonpad)),
        "token_mask": bool(settings.token_mask),
        "settings": settings.to_dict(),
        "payload_format": fmt,
        "load_seconds": round(load_seconds, 3),
        "extract_seconds": round(extract_seconds, 3),
        "extracted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    _publish(work, out, fmt, manifest, mask)
    log(
        f"[extract] wrote {out}: W_U {V}x{d}, h_LN {shape[0]}x{shape[1]}x{d} "
        f"({manifest['n_nonpad_positions']} non-pad positions) in {extract_seconds:.1f}s"
        + (f"; post-readout transform {checks['post_readout_transform']}" if checks["post_readout_transform"] else "")
    )
    return out


def cached_payload(
    model: ModelSpec,
    corpus: Corpus,
    settings: ExtractionSettings = ExtractionSettings(),
    *,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> Path:
    """A payload folder for (model, corpus, settings): reused from
    ``<cache>/payloads/<key[:16]>`` when finished there (and its manifest names the same key),
    else extracted there (resuming an interrupted extraction)."""
    log = log or _stderr
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "payloads"
    key = payload_key(model, corpus, settings)
    out = root / key[:16]
    if payload_complete(out):
        manifest = read_payload_manifest(out) or {}
        if manifest.get("key") == key:
            log(f"[extract] reusing cached payload {out}")
            return out
    return extract_payload(model, corpus, out, settings, force=True, log=log, **kwargs)


__all__ = [
    "ExtractionSettings",
    "ExtractionError",
    "last_token_hidden",
    "HiddenStates",
    "extract_payload",
    "cached_payload",
    "payload_key",
    "payload_complete",
    "load_model",
    "adapter_check",
    "model_softcap",
    "require_extract_extra",
    "materialized_gguf",
]
