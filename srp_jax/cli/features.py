"""``srp-jax features``: label every feature of a dictionary with its most activating tokens."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HELP = "label every feature with the vocabulary rows that activate it most (JSON)"
DESCRIPTION = """\
For every feature of DICT, its top vocabulary rows by encoder activation
relu(x_v . E_f + b_f) over the normalized rows x_v of W_U (the reference's display
labelling), in jitted blocks. With a tokenizer (--model, or --tokenizer) the rows are shown as
tokens with the reference's cleaning rules, skipping tokens not worth showing (empty, lone
punctuation) and repeats; without one, as token ids (tok_<id>). The JSON (written atomically)
has one record per feature: feature_id, label, top_token_ids, top_token_labels,
top_activations. 'srp-jax explain --labels-file' reuses it.

W_U comes from --model (read without running it), --payload, or for a run directory the
payload it was trained on (its config; synthetic data is rebuilt).

  srp-jax features runs/smollm2 --model smollm2 --out runs/smollm2-labels.json
  srp-jax features results/smoke_demo --out smoke-labels.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dictionary", metavar="DICT", help="checkpoint.pt, an srp-jax checkpoint or run directory, or hub:MODEL/OP")
    parser.add_argument("--model", default=None, help="W_U and the tokenizer of this model (smollm2, .gguf, folder, Hub id)")
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument("--payload", default=None, help="W_U from this readout payload")
    parser.add_argument("--tokenizer", default=None, metavar="SRC", help="tokenizer of this model source (default: --model's)")
    parser.add_argument("--n", type=int, default=6, help="tokens per feature (default 6)")
    parser.add_argument("--out", default="feature_labels.json", help="output JSON (default feature_labels.json)")


def _readout_source(args: argparse.Namespace):
    """(W_U weights or a Readout, description) for the labels."""
    from ..errors import ConfigError

    if args.model and args.payload:
        raise ConfigError("give --model or --payload, not both")
    if args.payload:
        from ..sources import read_payload_readout

        return read_payload_readout(args.payload), args.payload
    if args.model:
        from ..sources import resolve_model
        from .explain import _fast_readout_weights

        return _fast_readout_weights(resolve_model(args.model, revision=args.revision), args.model, args.revision), args.model
    run = Path(args.dictionary)
    if (run / "config.yaml").is_file():
        import yaml

        raw = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        path = (raw.get("data") or {}).get("path")
        if path:
            from ..data import resolve_data_path
            from ..sources import read_payload_readout

            resolved = resolve_data_path(path)
            if resolved is not None and resolved.exists():
                return read_payload_readout(resolved), str(resolved)
        from ..train.rerun import load_run

        _, dataset, _ = load_run(run)
        return dataset.readout(), f"{run} (the run's {'synthetic ' if dataset.used_fallback else ''}data)"
    raise ConfigError("no W_U: give --model or --payload (or a run directory whose config names its data)")


def run(args: argparse.Namespace) -> int:
    from .._atomic import write_text_atomic
    from ..compile import enable_persistent_cache
    from ..errors import ConfigError
    from ..sources import cache_root

    if args.n < 1:
        raise ConfigError("--n must be >= 1")
    enable_persistent_cache(cache_root() / "jax-compilation")
    from ..dictionary import load_factorizer
    from ..labels import LABEL_MAX_LEN, feature_labels
    from ..readout import Readout

    sae = load_factorizer(args.dictionary)
    source, where = _readout_source(args)
    readout = source if isinstance(source, Readout) else Readout.for_dictionary(source.W_U, sae, rows="all")
    tok_src = args.tokenizer or args.model
    tokenizer = None
    if tok_src:
        from ..tokens import load_tokenizer

        tokenizer = load_tokenizer(tok_src, revision=args.revision)
    start = time.perf_counter()
    records = feature_labels(sae, readout, n=args.n, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    doc: dict[str, Any] = {
        "format": "srp-jax feature labels",
        "format_version": 1,
        "rule": "top rows by encoder activation relu(x_v . E_f + b_f) over the normalized rows (the reference's display "
                "labelling); with a tokenizer: cleaned tokens, undisplayable tokens and repeats skipped; rows where the "
                f"feature is off (activation 0) never label it; label = the first three joined by '/' (longer than "
                f"{LABEL_MAX_LEN} characters: the first {LABEL_MAX_LEN - 1} and '...')",
        "dictionary": args.dictionary,
        "readout": where,
        "tokenizer": tok_src,
        "vocab_rows": readout.vocab_size,
        "d_features": sae.d_features,
        "n": args.n,
        "features": records,
    }  # fmt: skip
    write_text_atomic(args.out, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    rate = len(records) / max(seconds, 1e-9)
    print(f"labelled {len(records)} features over {readout.vocab_size} rows in {seconds:.2f} s ({rate:,.0f} features/s)"
          f"{' with ' + str(tok_src) + ' tokens' if tok_src else ' (token ids: no tokenizer)'}", file=sys.stderr)  # fmt: skip
    for r in records[:3]:
        print(f"  f{r['feature_id']}: {r['label']}")
    print(f"wrote {args.out}")
    return 0
