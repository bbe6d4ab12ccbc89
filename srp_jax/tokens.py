"""Token strings for display (the reference's ``token_display`` rules, ``method.md`` §6).

``clean_token(tokenizer, token_id)`` decodes one id and makes it printable on one line:
ids outside the vocabulary become ``<extra:N>``; newline, carriage return and tab are escaped
(``\\n``, ``\\r``, ``\\t``); U+FFFD (a partial UTF-8 byte) is removed; a lone space is
``<space>``; a leading space is kept as exactly one space and other surrounding whitespace is
stripped; empty text is ``<empty>``; text longer than ``max_len`` (24) keeps its first
``max_len - 1`` characters and gets ``...``.
"""

from __future__ import annotations

from typing import Any

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


__all__ = ["clean_token", "clean_text", "is_display_token", "MAX_LEN"]
