"""``srp-jax explain``: decompose a next-token logit (or any linear query) into dictionary features."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

HELP = "explain a next-token logit: exact decomposition into labelled features, the gate's verdict, HTML/PNG/JSON views"
DESCRIPTION = """\
Decompose a score of the model's next-token readout exactly as
  score = base (h . mu) + sum of feature contributions + residual
for the hidden state h at the lm_head input, apply the fidelity gate (--preset), and show it:
a table (default), --json, --html FILE (a self-contained page with a waterfall chart; hover a
bar for the feature's top tokens), --png FILE (the same chart; needs the 'views' extra).
A withheld explanation keeps the exact numbers, says why, and shows no feature bars.

Where h comes from (one of):
  --model M --prompt TEXT     run model M (smollm2, a .gguf, a model folder or a Hub id; the
                              'extract' extra) and take h at the last token; --prompts FILE
                              explains each line of FILE (one page / JSON list with a verdict table)
  --payload P --position N    hidden state N of a readout payload (P,T = prompt P, token T;
                              T = -1 is the prompt's last non-padding token)
  --hidden FILE.npy           a saved h (d,) or several (n, d); W_U from --payload or --model

What is decomposed: the logit of the model's top-1 token (default), of --token T, the margin
--token A --vs B, or any --query-kind: selected_token, target_vs_vocab_mean, pairwise_margin,
token_family_margin (--family A,B,.. --vs-family X,Y,..), winner_vs_topk (--top-competitors),
winner_vs_rank (--competitor-rank). Token strings resolve as in the reference (' '+T first,
then T; one token); id:N names a token by id.

Features are labelled by their most activating vocabulary rows (encoder activation over the
normalized rows, the reference's display labelling), shown through the model's tokenizer
(--tokenizer when there is no --model; else token ids). --labels-file reuses the JSON of
'srp-jax features'. Hidden states of --model runs are cached (--no-cache to skip), so
re-explaining a prompt does not load the model.

  srp-jax explain runs/smollm2 --model smollm2 --prompt "The capital of France is"
  srp-jax explain runs/smollm2 --model smollm2 --prompt "The capital of France is" --token " Paris" --vs " London"
  srp-jax explain runs/smollm2 --model smollm2 --prompts prompts.txt --html report.html
  srp-jax explain runs/smollm2 --payload data/smollm2 --position 0,-1 --tokenizer smollm2 --png f.png
"""

QUERY_KINDS = ("selected_token", "target_vs_vocab_mean", "pairwise_margin", "token_family_margin", "winner_vs_topk",
               "winner_vs_rank")  # fmt: skip
HIDDEN_CACHE_VERSION = "lm_head-input-last-token-v1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dictionary", metavar="DICT", help="checkpoint.pt, an srp-jax checkpoint or run directory, or hub:MODEL/OP")
    src = parser.add_argument_group("where the hidden state comes from")
    src.add_argument("--model", default=None, help="smollm2 | a .gguf file | a Hugging Face model folder | a Hub id")
    src.add_argument("--revision", default=None, help="Hub revision of --model")
    src.add_argument("--prompt", default=None, help="the text whose next token is explained (with --model)")
    src.add_argument("--prompts", default=None, metavar="FILE", help="explain every non-empty line of FILE (with --model)")
    src.add_argument("--payload", default=None, help="a readout payload (W_U; hidden states for --position)")
    src.add_argument("--position", default=None, metavar="N|P,T", help="which payload hidden state (flat index, or prompt,token)")
    src.add_argument("--hidden", default=None, metavar="FILE.npy", help="hidden state(s) (d,) or (n, d)")
    src.add_argument("--tokenizer", default=None, metavar="SRC", help="tokenizer for token text without --model (a model source)")
    src.add_argument("--no-cache", action="store_true", help="always run the model (do not read or write cached hidden states)")
    q = parser.add_argument_group("what is decomposed")
    q.add_argument("--query-kind", choices=QUERY_KINDS, default=None, help="default: selected_token, pairwise_margin with --vs")
    q.add_argument("--token", default=None, help="the token to explain, e.g. ' Paris' or id:7042 (default: the top-1)")
    q.add_argument("--vs", default=None, help="explain the margin --token minus this token")
    q.add_argument("--family", default=None, help="token_family_margin: comma-separated target tokens")
    q.add_argument("--vs-family", default=None, help="token_family_margin: comma-separated contrast tokens")
    q.add_argument("--top-competitors", type=int, default=10, help="winner_vs_topk: competitors (default 10)")
    q.add_argument("--competitor-rank", type=int, default=5, help="winner_vs_rank: the competitor's rank (default 5)")
    q.add_argument("--k", type=int, default=None, help="audit k (default: the dictionary's k)")
    q.add_argument("--preset", default="accepted", help="gate preset: accepted (default), plus_delta, floor, frontier")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int, default=8, help="features to show (default 8)")
    out.add_argument("--labels", type=int, default=4, help="top tokens per feature label (default 4; 0 = none)")
    out.add_argument("--labels-file", default=None, help="feature labels JSON written by 'srp-jax features'")
    out.add_argument("--json", action="store_true", help="print the view as JSON instead of the table")
    out.add_argument("--html", default=None, metavar="FILE", help="write a self-contained HTML page")
    out.add_argument("--png", default=None, metavar="FILE", help="write the chart as PNG (extra: views)")
    out.add_argument("--timings", action="store_true", help="print how long each phase took (stderr)")


# --------------------------------------------------------------------------------------------
# Where h comes from


@dataclasses.dataclass
class Hidden:
    """One hidden state to explain, with what it is (``where``: the prompt or the position)."""

    h: Any
    where: str
    prompt: str | None = None


@dataclasses.dataclass
class Source:
    """W_U (V, d) float32, the tokenizer (or None), the softcap, and the hidden states."""

    W_U: Any
    tokenizer: Any
    softcap: float | None
    hidden: list[Hidden]
    model: str | None


class Timings:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.rows: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.rows.append((name, now - self.last))
        self.last = now

    def line(self) -> str:
        parts = ", ".join(f"{n} {s:.2f} s" for n, s in self.rows)
        return f"[explain] {parts}; total {time.perf_counter() - self.t0:.2f} s"


def _check_args(args: argparse.Namespace) -> None:
    from ..errors import ConfigError

    prompts = args.prompt is not None or args.prompts is not None
    if args.prompt is not None and args.prompts is not None:
        raise ConfigError("give --prompt or --prompts, not both")
    modes = [prompts, args.position is not None, args.hidden is not None]
    if sum(modes) != 1:
        raise ConfigError("say where h comes from: --prompt/--prompts (with --model), --position (with --payload) or --hidden")
    if prompts and args.model is None:
        raise ConfigError("--prompt needs --model (the model to run); a payload's hidden states are picked with --position")
    if args.position is not None and args.payload is None:
        raise ConfigError("--position picks a hidden state of --payload: give --payload")
    if args.hidden is not None and args.payload is None and args.model is None:
        raise ConfigError("--hidden needs W_U: give --payload or --model")
    if args.top < 0 or args.labels < 0:
        raise ConfigError("--top and --labels must be >= 0")


def _read_prompts(path: str) -> list[str]:
    from ..errors import ConfigError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the prompts file ({exc.strerror or exc})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"{path}: no prompts (one per line)")
    return prompts


def hidden_cache_dir() -> Path:
    """Where the lm_head inputs of explained prompts are kept (``<srp-jax cache>/hidden``)."""
    from ..sources import cache_root

    return cache_root() / "hidden"


def _hidden_cache_file(spec: Any, prompt: str) -> Path:
    """One file per (model weights, prompt): the model's identity hashes the weights."""
    key = json.dumps({"v": HIDDEN_CACHE_VERSION, "model": spec.identity(), "dtype": "float32", "prompt": prompt}, sort_keys=True)
    return hidden_cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"


def _fast_readout_weights(spec: Any, source: str, revision: str | None):
    """W_U without running the model: a converted GGUF's safetensors when the cache has one
    (fast), else the source itself (:func:`srp_jax.sources.load_readout_weights`)."""
    from ..sources import load_readout_weights, read_hf_readout
    from ..tokens import _materialized_folder

    if spec is not None and spec.kind == "gguf":
        folder = _materialized_folder(spec.path)
        if folder is not None:
            return read_hf_readout(str(folder))
        return load_readout_weights(str(spec.path))
    return load_readout_weights(source, revision=revision)


def _fast_tokenizer(spec: Any) -> Any:
    """A :class:`~srp_jax.tokens.FastTokenizer` when the model's ``tokenizer.json`` is at hand
    (a converted GGUF, a model folder), else None."""
    from ..tokens import FastTokenizer, _materialized_folder

    folder = _materialized_folder(spec.path) if spec.kind == "gguf" else spec.path if spec.kind == "folder" else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    try:
        return FastTokenizer(folder / "tokenizer.json")
    except ImportError:
        return None


def _from_model(args: argparse.Namespace, timings: Timings) -> Source:
    import numpy as np

    from .._atomic import atomic_file
    from ..sources import resolve_model

    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts)
    spec = resolve_model(args.model, revision=args.revision)
    files = [_hidden_cache_file(spec, p) for p in prompts]
    if not args.no_cache and all(f.is_file() for f in files):
        from ..tokens import load_tokenizer

        weights = _fast_readout_weights(spec, args.model, args.revision)
        tokenizer = load_tokenizer(args.model, revision=args.revision)
        hs = [np.load(f, allow_pickle=False) for f in files]
        if all(h.shape == (weights.W_U.shape[1],) for h in hs):
            timings.lap("model (cached hidden states)")
            return Source(weights.W_U, tokenizer, weights.softcap, [Hidden(h, p, p) for h, p in zip(hs, prompts)], args.model)
    from ..extract import HiddenStates, last_token_hidden, load_model, model_softcap, require_extract_extra

    require_extract_extra("srp-jax explain --model")
    model, tokenizer = load_model(spec)
    runner = HiddenStates(model)
    display = _fast_tokenizer(spec) or tokenizer  # the same tokenizer.json, decoded without transformers' overhead
    timings.lap("model load")
    states = last_token_hidden(runner, tokenizer, prompts)
    hidden = [Hidden(h, prompt, prompt) for h, prompt in zip(states, prompts)]
    if not args.no_cache:
        for hid, file in zip(hidden, files):
            try:
                with atomic_file(file) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, hid.h)
            except OSError:
                pass  # a read-only cache only costs speed
    timings.lap("extraction")
    return Source(runner.weight(), display, model_softcap(model), hidden, args.model)


def _payload_position(h_ln, text: str):
    import numpy as np

    from ..errors import ConfigError

    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"--position {text!r}: expected N or P,T (integers)") from None
    d = h_ln.shape[-1]
    if len(parts) == 1:
        flat = h_ln.reshape(-1, d)
        n = parts[0]
        if not -flat.shape[0] <= n < flat.shape[0]:
            raise ConfigError(f"--position {n}: the payload has {flat.shape[0]} hidden states")
        h, where = flat[n], f"payload hidden state {n}"
    elif len(parts) == 2:
        if h_ln.ndim != 3:
            raise ConfigError(f"--position P,T needs h_LN of shape (prompts, tokens, d); this one is {h_ln.shape}")
        p, t = parts
        if not -h_ln.shape[0] <= p < h_ln.shape[0]:
            raise ConfigError(f"--position {text}: the payload has {h_ln.shape[0]} prompts")
        real = np.flatnonzero(np.linalg.norm(h_ln[p], axis=-1) > 1e-6)
        if t < 0:
            if -t > real.size:
                raise ConfigError(f"--position {text}: prompt {p} has {real.size} non-padding tokens")
            t = int(real[t])
        if not 0 <= t < h_ln.shape[1]:
            raise ConfigError(f"--position {text}: prompts have {h_ln.shape[1]} tokens")
        h, where = h_ln[p, t], f"payload prompt {p}, token {t}"
    else:
        raise ConfigError(f"--position {text!r}: expected N or P,T")
    if float(np.linalg.norm(h)) <= 1e-6:
        raise ConfigError(f"--position {text}: that hidden state is padding (all zeros)")
    return np.asarray(h, np.float32), where


def _from_arrays(args: argparse.Namespace, timings: Timings) -> Source:
    import numpy as np

    from ..errors import ConfigError, ShapeError
    from ..sources import read_payload_readout, resolve_model
    from ..tokens import load_tokenizer

    if args.payload is not None:
        weights = read_payload_readout(args.payload)
    else:
        weights = _fast_readout_weights(resolve_model(args.model, revision=args.revision), args.model, args.revision)
    W = weights.W_U
    if args.position is not None:
        from ..data import read_payload

        h, where = _payload_position(read_payload(args.payload)["h_LN"], args.position)
        hidden = [Hidden(h, where)]
    else:
        try:
            arr = np.load(args.hidden, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{args.hidden}: not a readable .npy array ({exc})") from None
        arr = np.asarray(arr, np.float32)
        if arr.ndim not in (1, 2) or arr.shape[-1] != W.shape[1]:
            raise ShapeError(f"{args.hidden}: expected shape ({W.shape[1]},) or (n, {W.shape[1]}), got {arr.shape}")
        rows = arr.reshape(-1, W.shape[1])
        hidden = [Hidden(r, f"{args.hidden}[{i}]" if len(rows) > 1 else str(args.hidden)) for i, r in enumerate(rows)]
    tok_src = args.tokenizer or args.model
    tokenizer = load_tokenizer(tok_src, revision=args.revision) if tok_src else None
    timings.lap("readout and hidden states")
    return Source(W, tokenizer, weights.softcap, hidden, args.model or args.payload)


# --------------------------------------------------------------------------------------------
# The query


def _token_arg(text: str):
    return int(text[3:]) if text.startswith("id:") and text[3:].isdigit() else text


def _query_kwargs(args: argparse.Namespace, top1: int) -> dict[str, Any]:
    from ..errors import ConfigError

    kind = args.query_kind or ("pairwise_margin" if args.vs else "token_family_margin" if args.family else "selected_token")
    token = _token_arg(args.token) if args.token is not None else top1
    if kind in ("selected_token", "target_vs_vocab_mean"):
        return {"query_kind": kind, "target": token}
    if kind == "pairwise_margin":
        if args.vs is None:
            raise ConfigError("pairwise_margin needs --vs B (and --token A, default the top-1)")
        return {"query_kind": kind, "target_a": token, "target_b": _token_arg(args.vs)}
    if kind == "token_family_margin":
        if not args.family or not args.vs_family:
            raise ConfigError("token_family_margin needs --family A,B,.. and --vs-family X,Y,..")
        split = lambda s: [_token_arg(t) for t in s.split(",") if t != ""]  # noqa: E731
        return {"query_kind": kind, "target_family": split(args.family), "contrast_family": split(args.vs_family)}
    return {"query_kind": kind, "top_competitors": args.top_competitors, "competitor_rank": args.competitor_rank}


def _labels_from_file(path: str) -> dict[int, dict[str, Any]]:
    from ..errors import ConfigError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return {int(r["feature_id"]): r for r in data["features"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a feature labels file of 'srp-jax features' ({type(exc).__name__}: {exc})") from None


def _explain_one(hid: Hidden, sae: Any, source: Source, args: argparse.Namespace):
    """(Explanation, context, token_text) of one hidden state."""
    import numpy as np

    from ..gate import explain
    from ..metrics import softcap_logits
    from ..tokens import clean_token

    tok = source.tokenizer
    logits = source.W_U @ hid.h
    shown = np.asarray(softcap_logits(logits.astype(np.float64), source.softcap))
    probs = np.exp(shown - shown.max())
    probs /= probs.sum()
    top5 = np.argsort(-shown, kind="stable")[:5]
    kwargs = _query_kwargs(args, int(top5[0]))
    e = explain(hid.h, sae, W_U=source.W_U, tokenizer=tok, preset=args.preset, k=args.k, top_features=args.top, **kwargs)
    name = (lambda t: clean_token(tok, t)) if tok is not None else (lambda t: f"#{int(t)}")
    ids = set(int(t) for t in e.query["weights"]) | {int(t) for t in top5}
    token_text = {t: name(t) for t in ids}
    target = e.query.get("target_token_id")
    context = {
        "prompt": hid.prompt,
        "where": hid.where,
        "model": source.model,
        "dictionary": args.dictionary,
        "preset": args.preset,
        "softcap": source.softcap,
        "top5": [{"id": int(t), "token": token_text[int(t)], "prob": float(probs[t])} for t in top5],
    }
    if target is not None:
        context.update(target_id=int(target), target_token=token_text.get(int(target), name(target)),
                       target_rank=int(np.sum(shown > shown[int(target)])) + 1, target_prob=float(probs[int(target)]))  # fmt: skip
    return e, context, token_text


def run(args: argparse.Namespace) -> int:
    timings = Timings()
    _check_args(args)
    from ..compile import enable_persistent_cache
    from ..sources import cache_root

    enable_persistent_cache(cache_root() / "jax-compilation")
    from ..dictionary import load_factorizer
    from ..views import explanation_view, render_text, verdict_summary, write_html, write_png

    sae = load_factorizer(args.dictionary)
    timings.lap("dictionary")
    source = _from_model(args, timings) if args.position is None and args.hidden is None else _from_arrays(args, timings)
    results = [_explain_one(hid, sae, source, args) for hid in source.hidden]
    timings.lap("decomposition")
    labels: dict[int, dict[str, Any]] = {}
    wanted = sorted({f["feature_id"] for e, _, _ in results for f in (e.features or [])})
    if args.labels_file:
        labels = _labels_from_file(args.labels_file)
    elif args.labels and wanted:
        from ..labels import feature_labels
        from ..readout import Readout

        readout = Readout.for_dictionary(source.W_U, sae, rows="all")
        labels = {r["feature_id"]: r for r in feature_labels(sae, readout, wanted, n=args.labels, tokenizer=source.tokenizer)}
        timings.lap("labels")
    views = [explanation_view(e, labels=labels, token_text=tt, context=ctx) for e, ctx, tt in results]
    if args.html:
        write_html(args.html, views[0] if len(views) == 1 and args.prompts is None else views)
    if args.png:
        if len(views) != 1:
            from ..errors import ConfigError

            raise ConfigError("--png draws one explanation; use --html for several")
        write_png(args.png, views[0])
    if args.html or args.png:
        timings.lap("views")
    if args.json:
        data = views[0].to_dict() if len(views) == 1 and args.prompts is None else {
            "summary": verdict_summary(views), "explanations": [v.to_dict() for v in views]}  # fmt: skip
        print(json.dumps(data, indent=1, allow_nan=False))
    else:
        for i, view in enumerate(views):
            ctx = view.context
            if i:
                print()
            print(f"prompt: {ctx['prompt']!r}" if ctx.get("prompt") is not None else f"hidden state: {ctx['where']}")
            print("next token: " + ", ".join(f"{r['token']!r} {r['prob']:.3f}" for r in ctx["top5"]))
            print()
            print(render_text(view))
        if len(views) > 1:
            s = verdict_summary(views)
            reasons = ", ".join(f"{r} {c}" for r, c in sorted(s["reasons"].items()))
            print(f"\n{s['n']} queries: {s['explained']} explained, {s['withheld']} withheld ({reasons})")
        for path in (args.html, args.png):
            if path:
                print(f"wrote {path}")
    if args.timings:
        print(timings.line(), file=sys.stderr)
    return 0
