"""``srp-jax`` command line: one small module per subcommand under ``srp_jax.cli``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Any :class:`srp_jax.errors.SrpError` becomes one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SrpError

# name -> module under srp_jax.cli (imported only when that subcommand runs or help is shown)
SUBCOMMANDS = {
    "demo": "demo",
    "train": "train",
    "convert": "convert",
    "hub": "hub",
    "extract": "extract",
    "verify": "verify",
    "explain": "explain",
    "features": "features",
}


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="srp-jax",
        description="Sparse Readout Prism in JAX: train, convert, load and explain readout dictionaries.",
    )
    parser.add_argument("--version", action="version", version=f"srp-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{module_name}":
                continue  # subcommand not built yet
            raise
        sp = sub.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except SrpError as exc:
        print(f"srp-jax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"srp-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
