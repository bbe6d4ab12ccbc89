"""``srp-jax hub``: list the published dictionaries, fetch one into an srp-jax checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import CheckpointError

HELP = "list or fetch the published dictionaries on the Hugging Face Hub"
DESCRIPTION = """\
The 17 published Sparse Readout Prism dictionaries (TopK, 20k steps) live on the Hugging Face
Hub as <model>/<op>/checkpoint.pt. The repo id defaults to matteohe/sparse-readout-prism (the
model card's); the reference's manifest names hematteo/sparse-readout-prism. Choose with
--repo-id or $SRP_JAX_HUB_REPO.

  srp-jax hub list [--json]                  the registry: path, model, d_model, D, k, metrics
  srp-jax hub fetch qwen3.5-2b/k256_32x --out DIR
                                             download (Hub cache) and convert to srp-jax in DIR

Offline (HF_HUB_OFFLINE=1 or no network) a cached download is used; otherwise the error names
the file to download and where to put it. Python: load_factorizer("hub:qwen3.5-2b/k256_32x").
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="hub_command", metavar="ACTION")
    sp = sub.add_parser(
        "list", help="print the registry of published dictionaries",
        description="The 17 published dictionaries: path (<model>/<op>), model, d_model, D, k, download "
        "size and the published rowEV / top-1 / KL. --json prints every registry field.",
    )
    sp.add_argument("--json", action="store_true", help="print the full registry as JSON")
    sp = sub.add_parser(
        "fetch", help="download a dictionary and convert it to an srp-jax checkpoint",
        description="Download <model>/<op>/checkpoint.pt from the Hub (or take it from the Hub cache), check it "
        "against the registry (architecture, d_model, D, k) and write it as an srp-jax checkpoint at --out.\n\n"
        "example:\n  srp-jax hub fetch qwen3.5-2b/k256_32x --out dicts/qwen2b-k256",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("spec", metavar="MODEL/OP", help="e.g. qwen3.5-2b/k256_32x (see `srp-jax hub list`)")
    sp.add_argument("--out", required=True, help="output srp-jax checkpoint directory")
    sp.add_argument("--repo-id", default=None, help="Hub repo id (default $SRP_JAX_HUB_REPO or matteohe/sparse-readout-prism)")
    sp.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    sp.add_argument("--cache-dir", default=None, help="Hub cache directory (default: huggingface_hub's)")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists (an srp-jax checkpoint only)")
    sp.add_argument("--no-verify", action="store_true",
                    help="skip the check of architecture, d_model, d_features and k against the registry")
    sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="storage dtype of the parameters (default float32)")


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    from .. import hub

    action = getattr(args, "hub_command", None)
    if action == "list":
        entries = hub.registry()
        if args.json:
            print(json.dumps([e.to_dict() for e in entries], indent=1))
            return 0
        header = ("path", "model", "d_model", "d_features", "k", "size", "rowEV", "top-1", "KL")
        rows = [
            (
                e.path, e.model, str(e.d_model), str(e.d_features), str(e.k), str(e.size or "-"),
                _fmt(hub.metric(e.metrics, "rowEV")), _fmt(hub.metric(e.metrics, "top1")),
                _fmt(hub.metric(e.metrics, "KL")),
            )
            for e in entries
        ]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        for i, row in enumerate((header, *rows)):
            print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
        print(f"\nrepo: {hub.resolve_repo_id()} (also {hub.ALTERNATE_REPO_ID}); file: <path>/checkpoint.pt")
        return 0
    if action == "fetch":
        hub.find_entry(args.spec)  # an unknown name fails before anything else
        out = Path(args.out)
        if (out.exists() or out.is_symlink()) and not args.force:
            raise CheckpointError(f"{out}: already exists (pass --force to replace it)")
        from .._lazy import require_torch

        require_torch(f"converting hub:{args.spec}")
        from convert.checkpoints import hub_to_orbax

        out, src = hub_to_orbax(
            args.spec, out, repo_id=args.repo_id, revision=args.revision, cache_dir=args.cache_dir,
            force=args.force, dtype=args.dtype, verify=not args.no_verify,
        )
        print(f"wrote {out} (from {src})")
        return 0
    print("usage: srp-jax hub {list,fetch} ... (see srp-jax hub --help)")
    return 2
