"""Token strings for display (the reference's ``token_display`` rules, ``method.md`` §6).

``clean_token(tokenizer, token_id)`` decodes one id and makes it printable on one line:
ids outside the vocabulary become ``<extra:N>``; newline, carriage return and tab are escaped
(``\\n``, ``\\r``, ``\\t``); U+FFFD (a partial UTF-8 byte) is removed; a lone space is
``<space>``; a leading space is kept as exactly one space and other surrounding whitespace is
stripped; empty text is ``<empty>``; text longer than ``max_len`` (24) keeps its first
``max_len - 1`` characters and gets ``...``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_LEN = 24


def clean_text(text: str, max_len: int = MAX_LEN) -> str:
    """The display rules above applied to an already-decoded token string."""
    if text == " ":
        return "<space>"
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t").replace("\ufffd", "")
    lead = text.startswith(" ")
    text = text.strip()
    if lead and text:
        text = " " + text
    if not text:
        return "<space>" if lead else "<empty>"
    if len(text) > max_len:
        text = text[: max_len - 1] + "..."
    return text


def clean_token(tokenizer: Any, token_id: int, max_len: int = MAX_LEN) -> str:
    """Display string of vocabulary id ``token_id`` (``<extra:N>`` beyond the tokenizer)."""
    token_id = int(token_id)
    if tokenizer is None or token_id < 0 or token_id >= len(tokenizer):
        return f"<extra:{token_id}>"
    return clean_text(tokenizer.decode([token_id]), max_len)


def is_display_token(text: str) -> bool:
    """Whether a decoded token is worth showing as a label: not empty, not a single
    non-alphanumeric character, not all whitespace or non-printable."""
    body = text.strip()
    if not body:
        return False
    if len(body) == 1 and not body.isalnum():
        return False
    return any(ch.isprintable() and not ch.isspace() for ch in body)


def display_table(tokenizer: Any, token_ids: Sequence[int] | np.ndarray, max_len: int = MAX_LEN) -> tuple[list[str], np.ndarray]:
    """``(texts, worth_showing)`` for many ids at once: ``clean_token`` of each id (decoded in
    one batch) and whether :func:`is_display_token` accepts it (ids beyond the tokenizer:
    ``<extra:N>``, never shown as a label)."""
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    n_vocab = len(tokenizer)
    inside = (ids >= 0) & (ids < n_vocab)
    decoded = iter(_batch_decode(tokenizer, [[int(t)] for t in ids[inside]]))
    texts = [clean_text(next(decoded), max_len) if ok else f"<extra:{int(t)}>" for t, ok in zip(ids, inside)]
    show = np.array([ok and is_display_token(text) for text, ok in zip(texts, inside)], dtype=bool)
    return texts, show


def _batch_decode(tokenizer: Any, batches: list[list[int]]) -> list[str]:
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode(batches))
    return [tokenizer.decode(b) for b in batches]


class FastTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (no transformers import: about
    0.5 s instead of several seconds), with the few methods srp-jax uses of a Hugging Face
    tokenizer: ``encode(text, add_special_tokens=False)``, ``decode(ids)``, ``batch_decode``,
    ``convert_ids_to_tokens`` and ``len()``."""

    def __init__(self, path: str | os.PathLike):
        import tokenizers

        self.path = Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def batch_decode(self, batches: Sequence[Sequence[int]]) -> list[str]:
        return list(self._tok.decode_batch([[int(i) for i in b] for b in batches], skip_special_tokens=False))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def __repr__(self) -> str:
        return f"FastTokenizer({str(self.path)!r}, vocab={len(self)})"


def load_tokenizer(source: str | os.PathLike, *, revision: str | None = None) -> Any:
    """The tokenizer of a model source, as cheaply as it can be had.

    ``source``: a folder with ``tokenizer.json`` (or a Hugging Face model folder), a ``.gguf``
    file or ``smollm2`` (its converted folder in the srp-jax cache when ``srp-jax extract`` /
    ``explain`` made one, else read from the GGUF by transformers), a readout payload (the
    model its manifest names), or a Hub id. A ``tokenizer.json`` is read with ``tokenizers``
    (:class:`FastTokenizer`); anything else with ``transformers.AutoTokenizer`` (the
    ``extract`` extra).
    """
    from .errors import ConfigError
    from .sources import read_payload_manifest, resolve_model

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return _fast_or_auto(path)
    if path.exists() and not (path.is_file() and path.suffix.lower() == ".gguf") and not (path / "config.json").is_file():
        manifest = read_payload_manifest(path)
        named = (manifest or {}).get("model_id") or (manifest or {}).get("model")
        if not named:
            raise ConfigError(f"{path}: a payload whose manifest names no model; pass the model's tokenizer (--tokenizer)")
        return load_tokenizer(named, revision=(manifest or {}).get("revision"))
    spec = resolve_model(text, revision=revision)
    if spec.kind == "gguf":
        folder = _materialized_folder(spec.path)
        if folder is not None:
            return _fast_or_auto(folder)
        return _auto_tokenizer(str(spec.path.parent), gguf_file=spec.path.name)
    if spec.kind == "folder":
        return _fast_or_auto(spec.path) if (spec.path / "tokenizer.json").is_file() else _auto_tokenizer(str(spec.path))
    return _auto_tokenizer(spec.name, revision=spec.revision)


def _materialized_folder(gguf: Path) -> Path | None:
    """The converted Hugging Face folder of a GGUF in the srp-jax cache, if one was made."""
    from .sources import cache_root, file_sha256

    folder = cache_root() / "models" / f"gguf-{file_sha256(gguf)[:16]}"
    return folder if (folder / "srp_jax_source.json").is_file() and (folder / "tokenizer.json").is_file() else None


def _fast_or_auto(folder: Path) -> Any:
    try:
        return FastTokenizer(folder / "tokenizer.json")
    except ImportError:
        return _auto_tokenizer(str(folder))


def _auto_tokenizer(location: str, **kwargs: Any) -> Any:
    from .errors import DependencyError

    try:
        import transformers
    except ImportError:
        raise DependencyError("reading this tokenizer needs transformers: pip install 'srp-jax[extract]'") from None
    return transformers.AutoTokenizer.from_pretrained(location, **kwargs)


__all__ = ["clean_token", "clean_text", "is_display_token", "display_table", "FastTokenizer", "load_tokenizer", "MAX_LEN"]
