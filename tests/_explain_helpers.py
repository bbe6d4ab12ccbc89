"""Small explanations for the view, label and explain-CLI tests: a random TopK dictionary, a
readout, hidden states, a toy tokenizer, and one explained and one withheld query."""

from __future__ import annotations

import numpy as np

from conftest import random_dictionary

D_MODEL, D_FEATURES, VOCAB = 16, 48, 40


class ToyTokenizer:
    """A tokenizer over a fixed word list (the methods srp-jax uses of a HF tokenizer)."""

    def __init__(self, words):
        self.words = list(words)

    def __len__(self):
        return len(self.words)

    def decode(self, ids):
        return "".join(self.words[int(i)] for i in ids)

    def encode(self, text, add_special_tokens=False):  # noqa: ARG002
        return [self.words.index(text)] if text in self.words else [0, 0]


def toy_words(V: int = VOCAB) -> list[str]:
    """Words with the awkward cases of method.md 6: lone punctuation, spaces, newlines, a
    partial byte, a repeat of the same text, a long token."""
    special = ["<s>", ".", " ", "\n", "\ufffd", "", " the", " the", "x" * 40]
    return special + [f" w{i}" if i % 2 else f"W{i}" for i in range(V - len(special))]


def toy_setup(seed: int = 0):
    """(dictionary, W_U (V, d), H (B, d), tokenizer)."""
    sae = random_dictionary("topk", d=D_MODEL, D=D_FEATURES, k=5, seed=seed)
    rng = np.random.default_rng(seed + 1)
    W = rng.normal(size=(VOCAB, D_MODEL)).astype(np.float32) + 0.2
    H = (2.0 * rng.normal(size=(12, D_MODEL))).astype(np.float32)
    return sae, W, H, ToyTokenizer(toy_words())


def explained_and_withheld(sae, W, H):
    """(h index, token) of one explained top-1 logit and one withheld one, searched with the API."""
    from srp_jax.gate import explain

    found = {}
    for i, h in enumerate(H):
        for t in np.argsort(-(W @ h))[:10]:
            e = explain(h, sae, W_U=W, target=int(t))
            found.setdefault(e.explained, (i, int(t)))
        if len(found) == 2:
            return found[True], found[False]
    raise AssertionError(f"no explained/withheld pair in the toy data: {found}")
