"""``srp-jax plan``: compile a config's train step for a mesh and print per-device memory."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HELP = "compile the train step for a mesh (without running it) and print per-device memory"
DESCRIPTION = """\
Compile the sampler and the train step of a config on a (data x model) device mesh, exactly as
`srp-jax train` would, without allocating or running anything, and print what one device holds:
parameters, optimizer state, the batch, the step's temporaries (activations and gradients) and
its peak, from XLA's memory analysis of the compiled programs. It also counts all-gathers of the
(B x D) activation in the compiled step (the latent-sharded top-k keeps this at none).

By default the compile runs on fake CPU devices (the command re-runs itself with
XLA_FLAGS=--xla_force_host_platform_device_count=N), which needs no accelerator; the numbers
are then XLA:CPU's (TPU and GPU compilers lay memory out differently: treat them as an
estimate, and use --platform native on the target machine for its own compiler's numbers).

  srp-jax plan --config paper/qwen3.5-9b/k256_32x --mesh data=1,model=8
  srp-jax plan --config paper/ministral-3-8b/k256_32x --mesh data=2,model=4 --json
  srp-jax plan --config my.yaml --mesh data=4,model=2 --d-model 2048 --vocab 151936

d_model and the vocabulary size come from the registry for the published configs
(configs/paper/...), else from --d-model / --vocab (default 262144 rows).
"""

DEFAULT_VOCAB = 262144
CHILD_ENV = "SRP_PLAN_CHILD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file or built-in name (e.g. paper/qwen3.5-9b/k256_32x)")
    parser.add_argument("--mesh", required=True, metavar="data=D,model=M", help="mesh axis sizes, e.g. data=1,model=8")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.batch_size=2048 (repeatable)")
    parser.add_argument("--d-model", type=int, default=None, help="readout width d (default: from the registry)")
    parser.add_argument("--vocab", type=int, default=None, help=f"readout rows V (default: registry, else {DEFAULT_VOCAB})")
    parser.add_argument("--platform", choices=("cpu", "native"), default="cpu",
                        help="cpu: fake CPU devices (default); native: this machine's own devices")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def parse_mesh(text: str) -> tuple[int, int]:
    """``data=D,model=M`` (either order; -1 not allowed here) -> (D, M)."""
    from ..errors import ConfigError

    sizes = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*(data|model)\s*=\s*(\d+)\s*", part)
        if not match:
            raise ConfigError(f"--mesh expects data=D,model=M with positive integers, got {text!r}")
        sizes[match.group(1)] = int(match.group(2))
    if set(sizes) != {"data", "model"} or min(sizes.values()) < 1:
        raise ConfigError(f"--mesh expects both data=D and model=M (>= 1), got {text!r}")
    return sizes["data"], sizes["model"]


def registry_shape(config_name: str) -> tuple[int | None, int | None]:
    """(d_model, vocab) of the published dictionary a config path or name refers to."""
    from ..hub import registry

    text = config_name.replace(os.sep, "/").removesuffix(".yaml")
    for entry in registry():
        if text.endswith(entry.path):
            return entry.d_model, entry.vocab
    return None, None


def _child_env(n_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = "1"
    return env


def run(args: argparse.Namespace) -> int:
    data, model = parse_mesh(args.mesh)
    if args.platform == "cpu" and os.environ.get(CHILD_ENV) != "1":
        # a fresh process: the fake device count must be set before JAX starts its backend
        cmd = [sys.executable, "-m", "srp_jax.cli.main", "plan", "--config", args.config, "--mesh", args.mesh]
        for item in args.overrides:
            cmd += ["--set", item]
        for flag, value in (("--d-model", args.d_model), ("--vocab", args.vocab)):
            if value is not None:
                cmd += [flag, str(value)]
        if args.json:
            cmd.append("--json")
        return subprocess.run(cmd, env=_child_env(data * model), check=False).returncode

    from ..config import load_run_config
    from ..errors import ConfigError
    from ..train.plan import format_report, plan_training

    cfg = load_run_config(args.config, args.overrides)
    reg_d, reg_v = registry_shape(str(args.config))
    d_model = args.d_model or reg_d
    if d_model is None:
        raise ConfigError(f"{args.config}: not a published config; pass --d-model (and --vocab)")
    vocab = args.vocab or reg_v or DEFAULT_VOCAB
    report = plan_training(cfg, data=data, model=model, d_model=d_model, vocab_rows=vocab)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0
