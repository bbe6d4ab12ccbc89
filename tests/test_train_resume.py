"""Runs that survive: kill -9 / SIGTERM at random steps, rerun, bitwise-equal final parameters."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SETS = [
    "factorizer.architecture=topk", "factorizer.d_features=128", "factorizer.k=8",
    "factorizer.k_values=[]", "factorizer.matryoshka_weights=[]",
    "training.steps=24", "training.batch_size=32", "training.log_every=1", "training.checkpoint_every=5",
    "training.row_sampling=hybrid_50freq_50uniform", "training.lr_schedule=warmup_cosine",
    "training.lambda_mode=delayed_ramp", "training.init_mode=row_seeded",
    "training.auxk_coeff=0.01", "training.auxk_dead_steps=3",
    "data.max_hidden=64", "data.val_hidden=32", "evaluation.max_eval_hidden=32", "evaluation.k=8",
]


def _cmd(out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "srp_jax.cli.main", "train", "--config", "smoke", "--out-dir", str(out)]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_until(out: Path, stop_step: int, sig: int) -> int:
    """Start a run, send ``sig`` once it logs ``stop_step``; return the exit code."""
    proc = subprocess.Popen(_cmd(out), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env())
    try:
        for line in proc.stderr:
            if line.startswith(f"[train] step {stop_step}/"):
                proc.send_signal(sig)
                break
        proc.stderr.read()
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _params(out: Path) -> dict[str, np.ndarray]:
    from srp_jax.dictionary import load_dictionary

    d = load_dictionary(out / "checkpoint")
    return {"kernel": np.asarray(d.params["encoder"]["kernel"]), "bias": np.asarray(d.params["encoder"]["bias"]),
            "decoder": np.asarray(d.params["decoder"])}


def test_kill9_and_sigterm_resume_bitwise(tmp_path):
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(ref), capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    want = _params(ref)
    rng = random.Random(1234)

    # kill -9 at a random step, then finish
    killed = tmp_path / "killed"
    rc = _run_until(killed, rng.randint(2, 23), signal.SIGKILL)
    assert rc == -signal.SIGKILL
    done = subprocess.run(_cmd(killed), capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[resume]" in done.stderr or (killed / "DONE").exists()
    got = _params(killed)
    for name in want:
        assert np.array_equal(got[name], want[name]), name

    # SIGTERM saves at the step it arrives (not only every checkpoint_every) and exits 143
    term = tmp_path / "term"
    stop = 7  # not a multiple of checkpoint_every
    rc = _run_until(term, stop, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM
    steps = sorted(int(p.name) for p in (term / "train_state").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= stop and not (term / "DONE").exists()
    done = subprocess.run(_cmd(term), capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0 and f"[resume] term: step {steps[-1]}/24" in done.stderr
    got = _params(term)
    for name in want:
        assert np.array_equal(got[name], want[name]), name

    # history is identical too, and a finished run is skipped
    import json

    assert json.loads((term / "history.json").read_text()) == json.loads((ref / "history.json").read_text())
    again = subprocess.run(_cmd(ref), capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0 and "[skip]" in again.stderr
