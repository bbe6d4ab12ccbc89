"""Package-level contracts: no torch on import, the missing-torch error, the CLI shell, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import srp_jax
from srp_jax import errors
from srp_jax.cli.main import main

from conftest import reference_dir


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_never_imports_torch():
    r = _python(
        "import sys, srp_jax, srp_jax.cli.main, srp_jax.metrics, srp_jax.train, srp_jax.checkpoint, srp_jax.hub\n"
        "import srp_jax.sources, srp_jax.corpus, srp_jax.verify, srp_jax.tokens, srp_jax.extract, srp_jax.labels, srp_jax.views\n"
        "assert 'transformers' not in sys.modules and 'gguf' not in sys.modules\n"
        "srp_jax.cli.main.build_parser()\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print('clean')"
    )
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


def test_core_paths_never_import_flax():
    """Training, decomposition, gating and checkpoints run without Flax in the process (it costs
    ~6 MB resident and import time); only the ``flax.linen`` shells in ``srp_jax.modules`` use it."""
    r = _python(
        "import sys, srp_jax, srp_jax.train, srp_jax.train.loop, srp_jax.decompose, srp_jax.gate\n"
        "import srp_jax.checkpoint, srp_jax.metrics, srp_jax.sharding, srp_jax.readout, srp_jax.labels\n"
        "srp_jax.Readout, srp_jax.decompose_token_logit, srp_jax.decompose_tokens\n"
        "assert 'flax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('flax'))\n"
        "srp_jax.TopKSAE\n"
        "assert 'flax.linen' in sys.modules\n"
        "print('clean')"
    )
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


def test_pt_without_torch_names_the_convert_extra():
    path = reference_dir("topk") / "checkpoint.pt"
    r = _python(
        "import sys; sys.modules['torch'] = None\n"
        "import srp_jax\n"
        "try:\n"
        f"    srp_jax.load_factorizer({str(path)!r})\n"
        "except srp_jax.DependencyError as e:\n"
        "    print('ERR', e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "srp-jax[convert]" in r.stdout and "torch==2.13.0" in r.stdout


def test_extract_without_transformers_names_the_extract_extra():
    r = _python(
        "import sys; sys.modules['transformers'] = None\n"
        "from srp_jax.cli.main import main\n"
        "sys.exit(main(['extract', '--model', 'org/name', '--out', 'never-written']))\n"
    )
    assert r.returncode == 2 and "srp-jax[extract]" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cli_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "train", "convert", "hub", "extract", "verify", "explain", "features"):
        assert name in out
    code = main(["train", "--config", str(tmp_path / "missing.yaml"), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing.yaml" in err and "Traceback" not in err
    assert main([]) == 2


def test_error_family_subclasses_the_reference_builtins():
    assert issubclass(errors.MissingConfigError, KeyError) and issubclass(errors.MissingConfigError, errors.SrpError)
    assert issubclass(errors.ShapeError, ValueError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.ThresholdNotReadyError, RuntimeError)
    assert issubclass(errors.DependencyError, ImportError)
    # KeyError's repr-quoting is not applied to our messages
    assert str(errors.MissingConfigError("no config here")) == "no config here"


def test_reference_public_names_exist():
    names = {
        "__version__", "Decomposition", "PrismDataset", "center_normalize_rows", "decompose_token_logit",
        "load_prism_dataset", "preprocess_rows", "build_factorizer", "load_factorizer", "BatchTopKSAE",
        "FactorizerBatch", "GatedSAE", "JumpReLUSAE", "L1ReLUSAE", "SAEBase", "TopKSAE",
    }
    missing = sorted(n for n in names if not hasattr(srp_jax, n))
    assert not missing, missing
    assert set(srp_jax.__all__) >= names - {"__version__"}


def test_help_imports_neither_jax_nor_numpy():
    """``srp-jax --help`` (and every subcommand's) stays fast: no jax, numpy or torch on its path."""
    code = (
        "import sys\n"
        "from srp_jax.cli.main import main\n"
        "for argv in (['--help'], ['train', '--help'], ['hub', 'fetch', '--help'], ['demo', '--help'], ['explain', '--help'],\n"
        "             ['features', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, argv\n"
        "heavy = sorted(m for m in ('jax', 'numpy', 'torch', 'flax', 'orbax') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: srp-jax" in proc.stdout
