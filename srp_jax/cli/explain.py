"""``srp-jax explain``: decompose a real model's next-token logit with a dictionary."""

from __future__ import annotations

import argparse
import json

HELP = "decompose a model's next-token logit for a prompt into dictionary features (extra: extract)"
DESCRIPTION = """\
Run the model on --prompt, take the hidden state at the lm_head input of the last token, and
decompose the logit of --token (default: the model's top prediction) exactly as
base + sum of feature contributions + residual, with the fidelity gate (--preset). With --vs
the query is the margin --token minus --vs. Each feature is labelled by the vocabulary rows its
decoder direction points at. W_U is the model's own lm_head weight. Needs the 'extract' extra.

  srp-jax explain runs/smollm2 --model smollm2 --prompt "The capital of France is" --token " Paris"
  srp-jax explain runs/smollm2 --model smollm2 --prompt "The capital of France is" --token " Paris" --vs " London"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dictionary", metavar="DICT", help="checkpoint.pt, an srp-jax checkpoint or run directory, or hub:MODEL/OP")
    parser.add_argument("--model", required=True, help="smollm2 | a .gguf file | a Hugging Face model folder | a Hub id")
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument("--prompt", required=True, help="the text whose next token is explained")
    parser.add_argument("--token", default=None, help="the next token to explain, e.g. ' Paris' (one token; default: top-1)")
    parser.add_argument("--vs", default=None, help="explain the margin --token minus this token")
    parser.add_argument("--top", type=int, default=8, help="features to show (default 8)")
    parser.add_argument("--labels", type=int, default=4, help="top tokens per feature label (default 4)")
    parser.add_argument("--preset", default="accepted", help="gate preset: accepted, plus_delta, floor, frontier")
    parser.add_argument("--k", type=int, default=None, help="audit k (default: the dictionary's k)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _single_token(tokenizer, text: str) -> int:
    from ..errors import ConfigError

    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"{text!r} is {len(ids)} tokens ({pieces}), not one; pick a single token")
    return int(ids[0])


def run(args: argparse.Namespace) -> int:
    import numpy as np  # here, not at module level: --help stays fast

    from ..dictionary import load_factorizer
    from ..extract import HiddenStates, load_model, model_softcap, require_extract_extra
    from ..gate import explain
    from ..metrics import softcap_logits
    from ..readout import Readout
    from ..sources import resolve_model
    from ..tokens import clean_token

    require_extract_extra("srp-jax explain")
    sae = load_factorizer(args.dictionary)
    model, tokenizer = load_model(resolve_model(args.model, revision=args.revision))
    runner = HiddenStates(model)
    enc = tokenizer([args.prompt], return_tensors="pt")
    h_t, _ = runner(enc["input_ids"], enc["attention_mask"])
    h = h_t[0, -1].float().cpu().numpy()
    W_U = runner.weight()
    cap = model_softcap(model)
    logits = W_U @ h
    shown = np.asarray(softcap_logits(logits.astype(np.float64), cap))
    probs = np.exp(shown - shown.max())
    probs /= probs.sum()
    top5 = np.argsort(-shown, kind="stable")[:5]
    target = _single_token(tokenizer, args.token) if args.token is not None else int(top5[0])
    if args.vs is not None:
        other = _single_token(tokenizer, args.vs)
        e = explain(h, sae, W_U=W_U, query_kind="pairwise_margin", target_a=target, target_b=other,
                    preset=args.preset, k=args.k, top_features=args.top)  # fmt: skip
        query = f"logit({clean_token(tokenizer, target)}) - logit({clean_token(tokenizer, other)})"
    else:
        e = explain(h, sae, W_U=W_U, query_kind="selected_token", target=target, preset=args.preset, k=args.k,
                    top_features=args.top)  # fmt: skip
        query = f"logit({clean_token(tokenizer, target)})"
    rank = int(np.sum(shown > shown[target])) + 1
    features = []
    if e.features:
        readout = Readout.for_dictionary(W_U, sae, rows="all")
        ids = [row["feature_id"] for row in e.features]
        dec = np.asarray(sae.params["decoder"])[ids]  # (n, d)
        align = np.asarray(readout.rows_normalized) @ dec.T  # (V, n)
        for j, row in enumerate(e.features):
            best = np.argsort(-align[:, j], kind="stable")[: args.labels]
            features.append({**row, "label_tokens": [clean_token(tokenizer, t) for t in best], "label_ids": best.tolist()})
    result = {
        "prompt": args.prompt,
        "query": query,
        "target_id": target,
        "target_rank": rank,
        "target_prob": float(probs[target]),
        "top5": [{"id": int(t), "token": clean_token(tokenizer, t), "prob": float(probs[t])} for t in top5],
        "softcap": cap,
        "explained": e.explained,
        "reason": e.reason,
        "scores": e.scores,
        "features": features if e.explained else None,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"prompt: {args.prompt!r}")
    print("next token: " + ", ".join(f"{r['token']!r} {r['prob']:.3f}" for r in result["top5"]))
    s = e.scores
    print(f"\n{query}   (rank {rank}, p {result['target_prob']:.3f})")
    print(f"  exact {s['exact']:.4f} = base {s['base']:.4f} + features {s['feature_sum']:.4f} + residual {s['residual']:.4f}"
          f"   (identity error {s['identity_abs_error']:.1e})")  # fmt: skip
    verdict = "explained" if e.explained else f"withheld ({e.reason})"
    print(f"  sparse approximation {s['approx']:.4f}, rho {s['rho']:.3f}: {verdict} [{args.preset}]")
    for row in features:
        labels = " ".join(repr(t) for t in row["label_tokens"])
        print(f"    feature {row['feature_id']:>6}  {row['contribution']:+9.4f}   {labels}")
    return 0
