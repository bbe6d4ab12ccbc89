"""``srp-jax`` command line: one small module per subcommand under ``srp_jax.cli``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Any :class:`srp_jax.errors.SrpError` becomes one line on stderr and its
``exit_code`` (2; 3 when training diverged); an operating-system error (a read-only folder, a
full disk) one line and 2; a closed output pipe (``srp-jax hub list | head``) ends quietly.
Library log noise (Orbax, TensorStore, absl) stays off stderr unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
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
    "plan": "plan",
    "features": "features",
}


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="srp-jax",
        description="Sparse Readout Prism in JAX: train, convert, load and explain readout dictionaries.",
    )
    parser.add_argument("--version", action="version", version=f"srp-jax {__version__}")
    parser.add_argument("--verbose", action="store_true", help="let library logs (Orbax, TensorStore, absl) through to stderr")
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
        sp.add_argument("--verbose", dest="verbose_here", action="store_true",
                        help="let library logs (Orbax, TensorStore, absl) through to stderr")
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    args.verbose = bool(args.verbose or getattr(args, "verbose_here", False))
    if not args.verbose:
        from .._quiet import silence_library_noise

        silence_library_noise()
    try:
        return int(args._run(args) or 0)
    except SrpError as exc:
        print(f"srp-jax {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print(f"srp-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 128 + 13  # as a process killed by SIGPIPE
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            _silence_stdout()
            return 128 + 13
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"srp-jax {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _silence_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null so the interpreter's
    final flush does not raise again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
