"""Text corpora for extraction: the built-in offline corpus, or a user's file.

``builtin`` is 300 English paragraphs of the Python documentation (``pydoc_data.topics``,
CPython 3.11.7), frozen into the package data file ``srp_jax/corpora/pydoc_topics_en.json``
because that text changes between Python versions. It stands in for the wikitext-2 test lines
the reference extractor reads: paragraphs longer than 200 characters, in order. The file keeps
the Python Software Foundation's copyright notice; the licence is ``corpora/PSF-LICENSE.txt``.
Every extraction manifest records the file's sha256 and the sha256 of the prompt list used.

A user's corpus is a UTF-8 ``.txt`` file (paragraphs separated by blank lines, each
paragraph's lines joined with single spaces) or a ``.jsonl`` file (one ``{"text": ...}`` per
line); paragraphs shorter than ``min_chars`` are skipped, as the reference does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

BUILTIN = "builtin"
BUILTIN_RESOURCE = "pydoc_topics_en.json"
BUILTIN_SHA256 = "545f88cc2fcb7aedc1c62aaf33f614505cb91310f45aa3110539cbf0b4a79548"
MIN_CHARS = 200
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Prompts in order. ``source`` names the corpus (``builtin`` or the file path);
    ``sha256`` hashes the corpus file's bytes."""

    name: str
    source: str
    sha256: str
    paragraphs: tuple[str, ...]

    def prompts(self, n: int) -> list[str]:
        """The first ``n`` paragraphs (an error if there are fewer)."""
        if n > len(self.paragraphs):
            raise ConfigError(f"corpus {self.name!r} has {len(self.paragraphs)} paragraphs, fewer than the {n} prompts asked for")
        return list(self.paragraphs[:n])

    def describe(self, n: int) -> dict[str, Any]:
        """Manifest fields: corpus name, file sha256, prompt count and the prompt-list sha256."""
        return {"corpus": self.name, "corpus_source": self.source, "corpus_sha256": self.sha256,
                "n_prompts": int(n), "prompts_sha256": prompts_sha256(self.prompts(n))}  # fmt: skip


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of a prompt list (JSON array, UTF-8, no whitespace): one hash names the exact text."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def select_pydoc_paragraphs(topics: Mapping[str, str], *, min_chars: int = MIN_CHARS) -> list[str]:
    """The English prose of ``pydoc_data.topics.topics``, in the dict's order: each topic's
    blank-line-separated blocks, skipping any block with an indented line (code, grammar,
    tables, lists), lines joined with single spaces, kept when longer than ``min_chars``."""
    out = []
    for text in topics.values():
        for block in _BLANK_LINE.split(text):
            lines = block.split("\n")
            if any(line[:1] in (" ", "\t") for line in lines):
                continue
            para = " ".join(line.strip() for line in lines).strip()
            if len(para) > min_chars:
                out.append(para)
    return out


def _builtin_bytes() -> bytes:
    try:
        return importlib.resources.files("srp_jax.corpora").joinpath(BUILTIN_RESOURCE).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise CheckpointError(f"the built-in corpus (srp_jax.corpora/{BUILTIN_RESOURCE}) is not installed: {exc}") from None


def builtin_corpus() -> Corpus:
    """The frozen pydoc corpus (300 paragraphs)."""
    raw = _builtin_bytes()
    doc = json.loads(raw.decode("utf-8"))
    return Corpus(BUILTIN, f"srp_jax.corpora/{BUILTIN_RESOURCE}", hashlib.sha256(raw).hexdigest(), tuple(doc["paragraphs"]))


def paragraphs_from_text(text: str, *, min_chars: int = MIN_CHARS) -> list[str]:
    """Blank-line-separated paragraphs, lines joined with single spaces, longer than ``min_chars``."""
    out = []
    for block in _BLANK_LINE.split(text.replace("\r\n", "\n")):
        para = " ".join(line.strip() for line in block.split("\n")).strip()
        if len(para) > min_chars:
            out.append(para)
    return out


def load_corpus(spec: str | os.PathLike, *, min_chars: int = MIN_CHARS) -> Corpus:
    """``builtin`` or a ``.txt`` / ``.jsonl`` file (see the module docstring)."""
    text = os.fspath(spec)
    if text == BUILTIN:
        return builtin_corpus()
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such corpus file (use a .txt or .jsonl file, or 'builtin')")
    raw = path.read_bytes()
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".jsonl":
        paragraphs = []
        for number, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                value = item["text"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{path}:{number}: expected a JSON object with a 'text' string") from None
            if not isinstance(value, str):
                raise CheckpointError(f"{path}:{number}: 'text' must be a string")
            value = value.strip()
            if len(value) > min_chars:
                paragraphs.append(value)
    else:
        paragraphs = paragraphs_from_text(body, min_chars=min_chars)
    if not paragraphs:
        raise ConfigError(f"{path}: no paragraph longer than {min_chars} characters")
    return Corpus(str(path), str(path.resolve()), hashlib.sha256(raw).hexdigest(), tuple(paragraphs))


__all__ = ["Corpus", "BUILTIN", "load_corpus", "builtin_corpus", "select_pydoc_paragraphs", "paragraphs_from_text", "prompts_sha256"]
