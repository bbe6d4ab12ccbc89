"""``srp-jax verify``: a dictionary's headline metrics on a payload, against published numbers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "measure a dictionary's rowEV / top-1 / KL / frontier on a payload, against published numbers"
DESCRIPTION = """\
The paper's headline evaluation for DICT on a model's payload: the full vocabulary, float64
log-softmax, the payload's softcap (from its manifest; Gemma: 30), top-1 agreement, KL bits,
frontier_pass@0.5 and 95% bootstrap CIs (400 resamples over prompts; rowEV over vocabulary
rows). --mode reference instead re-derives a checkpoint's stored metrics (the reference
evaluate_model: the dictionary's rows and evaluation block).

  srp-jax verify runs/smollm2 --payload data/smollm2
  srp-jax verify hub:qwen3.5-2b/k256_32x --payload qwen2b_payload      # vs the registry entry
  srp-jax verify checkpoint.pt --payload p.npz --mode reference --against checkpoint

Published numbers come from --entry MODEL/OP (a registry entry; implied by DICT = hub:MODEL/OP),
--against checkpoint (the dictionary's stored metrics) or --against FILE (a metrics JSON).
Each metric gets a verdict: match when |measured - published| <= its tolerance (rowEV 0.02,
top1 0.02, KL 0.05 bits, rates 0.02; change with --tol NAME=VALUE) or the published value lies
inside the measured CI, else differs. The report (JSON, written atomically) goes to --report.
Exit status 0, or 1 with --strict when a verdict is 'differs'.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dictionary", metavar="DICT",
                        help="checkpoint.pt, an srp-jax checkpoint or run directory, or hub:MODEL/OP")
    parser.add_argument("--payload", required=True, help="the model's readout payload (folder, .npz, .safetensors, .pt)")
    parser.add_argument("--mode", choices=("full", "reference"), default="full", help="evaluation protocol (default full)")
    parser.add_argument("--entry", default=None, metavar="MODEL/OP", help="compare with this registry entry")
    parser.add_argument("--against", default=None, metavar="checkpoint|FILE",
                        help="compare with the dictionary's stored metrics, or a metrics JSON file")
    parser.add_argument("--positions", choices=("all", "last"), default="all",
                        help="hidden states: every non-pad position (default) or the last one per prompt")
    parser.add_argument("--max-hidden", type=int, default=None, help="use at most this many positions")
    parser.add_argument("--k", type=int, default=None, help="audit k (default: the dictionary's evaluation k, else its k)")
    cap = parser.add_mutually_exclusive_group()
    cap.add_argument("--softcap", type=float, default=None, help="logit softcap (default: the payload manifest's)")
    cap.add_argument("--no-softcap", action="store_true", help="ignore the manifest's softcap")
    parser.add_argument("--bootstrap", type=int, default=400, help="bootstrap resamples (0 = no CIs; default 400)")
    parser.add_argument("--tol", action="append", default=[], metavar="NAME=VALUE",
                        help="tolerance for a metric, e.g. --tol rowEV=0.01 (repeatable)")
    parser.add_argument("--report", default="verify-report.json", help="JSON report path (default verify-report.json)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any verdict is 'differs'")


def _published(args: argparse.Namespace, dictionary):
    from .. import hub
    from ..errors import CheckpointError, ConfigError

    if args.entry and args.against:
        raise ConfigError("give --entry or --against, not both")
    spec = args.entry or (args.dictionary if args.dictionary.startswith("hub:") and not args.against else None)
    if spec:
        entry = hub.find_entry(spec)
        return dict(entry.metrics), f"registry {entry.path}"
    if args.against == "checkpoint":
        if not dictionary.metrics:
            raise CheckpointError(f"{args.dictionary}: has no stored metrics to compare with")
        return dict(dictionary.metrics), "the checkpoint's stored metrics"
    if args.against:
        path = Path(args.against)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable metrics JSON file ({exc})") from None
        if isinstance(doc, dict) and isinstance(doc.get("metrics"), dict):
            doc = doc["metrics"]
        if not isinstance(doc, dict):
            raise CheckpointError(f"{path}: expected a JSON object of metrics")
        return doc, str(path)
    return None, None


def run(args: argparse.Namespace) -> int:
    from ..data import read_payload
    from ..dictionary import load_factorizer
    from ..sources import read_payload_manifest, softcap_from_manifest
    from ..verify import format_report, parse_tolerances, verify, write_report

    tolerances = parse_tolerances(args.tol)
    dictionary = load_factorizer(args.dictionary)
    published, against = _published(args, dictionary)
    payload = read_payload(args.payload)
    manifest = read_payload_manifest(args.payload)
    softcap = None
    if args.mode == "full" and not args.no_softcap:
        softcap = args.softcap if args.softcap is not None else softcap_from_manifest(manifest)
    report = verify(
        dictionary, payload, mode=args.mode, softcap=softcap, positions=args.positions, max_hidden=args.max_hidden,
        k=args.k, bootstrap=args.bootstrap, published=published, tolerances=tolerances,
    )  # fmt: skip
    context = {
        "dictionary": args.dictionary,
        "architecture": dictionary.architecture,
        "d_features": int(dictionary.d_features),
        "payload": str(args.payload),
        "payload_key": (manifest or {}).get("key"),
        "model": (manifest or {}).get("model"),
        "published_from": against,
    }
    path = write_report(report, args.report, **context)
    if args.json:
        print(path.read_text(encoding="utf-8"), end="")
    else:
        print(format_report(report))
        if against:
            print(f"published: {against}")
        print(f"report: {path}", file=sys.stderr)
    return 1 if args.strict and report["verdict"] == "differs" else 0
