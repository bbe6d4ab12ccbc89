"""``srp-jax convert SRC DST``: PyTorch checkpoint.pt <-> srp-jax (Orbax) checkpoint directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import CheckpointError

HELP = "convert checkpoint.pt (or hub:<model>/<op>) <-> an srp-jax checkpoint directory"
DESCRIPTION = """\
Convert a dictionary between the PyTorch reference format and the srp-jax format.

The direction follows SRC:
  checkpoint.pt file          -> srp-jax checkpoint directory DST (Orbax arrays + verified metadata)
  hub:<model>/<op>            -> fetched from the Hugging Face Hub (see `srp-jax hub list`), then as above
  srp-jax checkpoint directory
  (or a training run directory
   holding checkpoint/)       -> checkpoint.pt file DST in the reference runner schema

.pt files are read with torch.load(weights_only=True): a file whose pickle would run code is
refused. Both directions are bit-exact: .pt -> srp-jax -> .pt gives the same keys, dtypes and
tensor bits. Output is written atomically; an existing DST is refused unless --force.
Needs the 'convert' extra (PyTorch): pip install 'srp-jax[convert]'.

examples:
  srp-jax convert runs/smoke/checkpoint.pt --out runs/smoke/srp
  srp-jax convert hub:qwen3.5-2b/k256_32x --out dicts/qwen2b-k256
  srp-jax convert dicts/qwen2b-k256 --out qwen2b-k256.pt      (a positional DST works too)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint.pt, hub:<model>/<op>, or an srp-jax checkpoint directory")
    parser.add_argument("dst", metavar="DST", nargs="?", default=None,
                        help="output: a directory (from .pt / hub) or a .pt file (from a directory); or give it as --out")
    parser.add_argument("--out", dest="out", default=None, help="the output (same as DST)")
    parser.add_argument("--force", action="store_true",
                        help="replace DST if it exists (only an srp-jax checkpoint or a file; never the source)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="storage dtype of the parameters. Into srp-jax the default is float32 (bfloat16 sources are "
        "widened exactly); bfloat16 keeps bfloat16 sources (and rounds float32 parameters). Into .pt the "
        "default keeps the stored dtypes.",
    )
    parser.add_argument("--repo-id", default=None, help="Hub repo for hub: sources (default $SRP_JAX_HUB_REPO or matteohe/sparse-readout-prism)")
    parser.add_argument("--revision", default=None, help="Hub revision for hub: sources")
    parser.add_argument("--cache-dir", default=None, help="Hub cache directory for hub: sources")
    parser.add_argument("--no-verify", action="store_true",
                        help="hub: sources: skip the check of architecture, d_model, d_features and k against the registry")


def run(args: argparse.Namespace) -> int:
    from .._lazy import require_torch

    if args.dst is not None and args.out is not None and args.dst != args.out:
        raise CheckpointError(f"two outputs given: DST {args.dst!r} and --out {args.out!r}; give one")
    args.dst = args.dst if args.dst is not None else args.out
    if args.dst is None:
        raise CheckpointError("no output given: srp-jax convert SRC --out DST (a directory from .pt/hub, a .pt from a directory)")

    src_text = os.fspath(args.src)
    dst = Path(args.dst)
    if (dst.exists() or dst.is_symlink()) and not args.force:
        raise CheckpointError(f"{dst}: already exists (pass --force to replace it)")
    if src_text.startswith("hub:"):
        require_torch(f"converting {src_text}")
        from convert.checkpoints import hub_to_orbax

        out, src = hub_to_orbax(
            src_text, dst, repo_id=args.repo_id, revision=args.revision, cache_dir=args.cache_dir,
            force=args.force, dtype=args.dtype or "float32", verify=not args.no_verify,
        )
        print(f"wrote {out} (from {src})")
        return 0
    src = Path(src_text)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    from ..progress import human_size, stage

    size = src.stat().st_size if src.is_file() else sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    stage("convert", f"{src} ({human_size(size)}) -> {dst}: reading, checking every checksum, writing")
    if src.is_dir():
        require_torch(f"writing {dst}")
        from convert.checkpoints import orbax_to_pt

        out = orbax_to_pt(src, dst, force=args.force, dtype=args.dtype)
        print(f"wrote {out}")
        return 0
    require_torch(f"reading {src}")
    return _pt_to_dir(src, dst, args)


def _pt_to_dir(src: Path, dst: Path, args: argparse.Namespace) -> int:
    from convert.checkpoints import pt_to_orbax

    out = pt_to_orbax(src, dst, force=args.force, dtype=args.dtype or "float32")
    print(f"wrote {out}")
    return 0
