"""Hostile inputs and faults (issue 9): every case ends in one line and a documented exit status,
with the user's files byte-identical and no run marked DONE on bad weights.

One test (or parametrized case) per finding of the adversarial pass:
1 damaged train_state; 2 changed config / data / a second trainer; 3 foreign files in --out-dir
and artifacts.report_path; 4 a mistyped data path; 5 divergence and NaN/Inf payloads; 6 the
tracebacks that must be one line; 7 library noise on stderr; 8 temp litter, .pt determinism,
duplicate zip records, empty / unset-variable paths, row statistics that contradict W_U.

Runs are tiny (64 features, 6 steps) and in-process through ``srp_jax.cli.main.main``; only
the lock, the noise and the broken pipe need subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from srp_jax.cli.main import main
from srp_jax.train.rundir import LOCK_FILE, PREVIOUS_DIR

TINY = [
    "factorizer.d_features=64", "factorizer.k=8", "factorizer.k_values=[4,8]", "factorizer.matryoshka_weights=[1,1]",
    "training.steps=6", "training.batch_size=32", "training.log_every=1", "training.checkpoint_every=2",
    "data.max_hidden=32", "data.val_hidden=16", "evaluation.max_eval_hidden=16", "evaluation.k=8",
]
ROOT = Path(__file__).resolve().parents[1]


def tiny(out, *extra_sets, flags=()):
    argv = ["train", "--config", "smoke", "--out-dir", str(out)]
    for s in (*TINY, *extra_sets):
        argv += ["--set", s]
    return argv + list(flags)


def cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def only_line(err: str) -> str:
    """stderr must be exactly one line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def error_after_logs(err: str) -> str:
    """stderr: progress lines (``[...]``) and then exactly one error line, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    others = [ln for ln in lines if not ln.startswith("[")]
    assert len(others) == 1 and lines[-1] == others[0], lines[-5:]
    return others[0]


def snapshot(root: Path, skip: tuple[str, ...] = (LOCK_FILE,)) -> dict[str, str]:
    """sha256 of every file under ``root`` (and the folder names), the lock file excepted."""
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.name in skip:
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def params(out: Path) -> list[np.ndarray]:
    from srp_jax.dictionary import load_dictionary

    d = load_dictionary(out / "checkpoint")
    return [np.asarray(x) for x in jax.tree.leaves((d.params, d.buffers))]


def assert_same_params(a: Path, b: Path) -> None:
    for x, y in zip(params(a), params(b), strict=True):
        np.testing.assert_array_equal(x, y)


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x40
    path.write_bytes(bytes(data))


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------------------------
# Shared runs (trained once per module)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (6 steps, saves at 4 and 6) and its stderr."""
    out = tmp_path_factory.mktemp("finished") / "run"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(tiny(out)) == 0
    return out, err.getvalue()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The same run stopped by SIGTERM after step 5 (saves at 4 and 5, no DONE)."""
    from srp_jax.train import Progress, TrainingInterrupted, train

    class StopAtFive(Progress):
        def log(self, step, row):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns it into a flag

    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(TrainingInterrupted):
        train("smoke", overrides=TINY, out_dir=out, progress=StopAtFive(6, enabled=False), log=lambda m: None)
    assert sorted(p.name for p in (out / "train_state").iterdir() if p.is_dir()) == ["4", "5"]
    assert not (out / "DONE").exists()
    return out


# --------------------------------------------------------------------------------------------
# 1. A damaged train_state is never resumed silently


def test_damaged_latest_save_falls_back_to_the_previous_one(interrupted, finished, tmp_path, capsys):
    run = copy_run(interrupted, tmp_path / "run")
    flip_bit(largest_file(run / "train_state" / "5"))
    damaged = snapshot(run / "train_state" / "5")
    rc, err = cli(tiny(run), capsys)
    assert rc == 0, err[-600:]
    assert "[resume] warning: train_state/5 is damaged" in err and "falling back to the previous intact save, step 4" in err
    assert (run / "DONE").is_file()
    assert_same_params(run, finished[0])  # resumed from step 4: bitwise the uninterrupted run
    moved = next((run / PREVIOUS_DIR).glob("damaged-*")) / "train_state-5"
    assert snapshot(moved) == damaged  # moved aside, not deleted


def test_no_intact_save_refuses_and_changes_nothing(interrupted, tmp_path, capsys):
    run = copy_run(interrupted, tmp_path / "run")
    flip_bit(largest_file(run / "train_state" / "5"))
    (run / "train_state" / "4.sha256.json").write_text("{not json")
    before = snapshot(run)
    rc, err = cli(tiny(run), capsys)
    line = only_line(err.replace("[data] no data.path: training on the built-in synthetic readout (data.fallback: synthetic)", ""))
    assert rc == 2 and "no intact saved state to resume from" in line and "step 5:" in line and "step 4:" in line
    assert "--restart" in line
    assert snapshot(run) == before and not (run / "DONE").exists()


# --------------------------------------------------------------------------------------------
# 2. One run per directory: config, data, a second trainer


@pytest.mark.parametrize(
    "sets, keys",
    [
        (["run.seed=8"], ["run.seed (7 -> 8)", "run.init_seed (7 -> 8)", "data.data_seed (7 -> 8)"]),
        (["training.lr=0.01"], ["training.lr (0.001 -> 0.01)"]),
        (["training.steps=4"], ["training.steps (6 -> 4)"]),
        (["training.steps=20"], ["training.steps (6 -> 20)", "--extend-steps"]),
        (["factorizer.d_features=128"], ["factorizer.d_features (64 -> 128)"]),
    ],
)
def test_resume_with_another_config_is_refused(interrupted, tmp_path, capsys, sets, keys):
    run = copy_run(interrupted, tmp_path / "run")
    before = snapshot(run)
    rc, err = cli(tiny(run, *sets), capsys)
    line = only_line(err)
    assert rc == 2 and "holds a run with another config" in line and "--restart" in line
    for key in keys:
        assert key in line
    assert snapshot(run) == before


def test_finished_run_with_another_config_is_refused_not_skipped(finished, tmp_path, capsys):
    run = copy_run(finished[0], tmp_path / "run")
    before = snapshot(run)
    rc, err = cli(tiny(run, "training.lr=0.002"), capsys)
    assert rc == 2 and "training.lr (0.001 -> 0.002)" in only_line(err) and "[skip]" not in err
    rc, err = cli(tiny(run), capsys)
    assert rc == 0 and "[skip]" in only_line(err)
    assert snapshot(run) == before


def test_other_data_under_the_same_path_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    W, h = rng.normal(size=(96, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    payload = tmp_path / "hLN.npz"
    np.savez(payload, W_U=W, h_LN=h)
    run = tmp_path / "run"
    assert cli(tiny(run, "training.steps=2", flags=["--data-path", payload]), capsys)[0] == 0
    np.savez(payload, W_U=W + 1.0, h_LN=h)  # same path, other numbers
    before, data_before = snapshot(run), snapshot(payload)
    rc, err = cli(tiny(run, "training.steps=2", flags=["--data-path", payload]), capsys)
    assert rc == 2 and "holds a run on other data" in only_line(err)
    assert snapshot(run) == before and snapshot(payload) == data_before


def test_restart_moves_the_old_run_aside(finished, tmp_path, capsys):
    run = copy_run(finished[0], tmp_path / "run")
    old = snapshot(run)
    rc, err = cli(tiny(run, "training.steps=3", flags=["--restart"]), capsys)
    assert rc == 0 and "[restart] moved the previous run's files to" in err
    moved = next((run / PREVIOUS_DIR).iterdir())
    assert snapshot(moved) == old  # every file of the old run, byte-identical
    assert json.loads((run / "history.json").read_text())["history"][-1]["step"] == 3


def test_extend_steps_continues_bitwise_and_refuses_step_dependent_schedules(finished, tmp_path, capsys):
    run = copy_run(finished[0], tmp_path / "run")
    rc, err = cli(tiny(run, "training.steps=8", flags=["--extend-steps"]), capsys)
    assert rc == 0 and "[extend] run: training.steps 6 -> 8" in err and "[resume] run: step 6/8" in err
    fresh = tmp_path / "fresh"
    assert cli(tiny(fresh, "training.steps=8"), capsys)[0] == 0
    assert_same_params(run, fresh)  # constant schedules: an extended run is the longer run
    manifest = json.loads((run / "srp_run.json").read_text())
    assert manifest["extensions"] == [{"from_steps": 6, "to_steps": 8}]
    rc, err = cli(tiny(run, "training.steps=7", flags=["--extend-steps"]), capsys)
    assert rc == 2 and "can only grow" in only_line(err)

    cosine = tmp_path / "cosine"
    assert cli(tiny(cosine, "training.steps=2", "training.lr_schedule=warmup_cosine"), capsys)[0] == 0
    before = snapshot(cosine)
    rc, err = cli(tiny(cosine, "training.steps=4", "training.lr_schedule=warmup_cosine", flags=["--extend-steps"]), capsys)
    line = only_line(err)
    assert rc == 2 and "training.lr_schedule=warmup_cosine depend(s) on training.steps" in line
    assert snapshot(cosine) == before


def test_a_second_trainer_on_a_locked_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    argv = tiny(run, "training.steps=100000", "training.checkpoint_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "srp_jax.cli.main", *map(str, argv)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    try:
        for line in proc.stderr:
            if line.startswith("[train] step 1/"):
                break
        rc, err = cli(argv, capsys)
        line = only_line(err)
        assert rc == 2 and f"another srp-jax train (pid {proc.pid}) is using this run directory" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # it saved its state and stopped
    assert not (run / "DONE").exists()


# --------------------------------------------------------------------------------------------
# 3. Never touch what is not ours


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the trainer gets as far as reading data."""
    import srp_jax.train.loop as loop

    def boom(*a, **k):
        raise AssertionError("the run reached the data: it was not refused up front")

    monkeypatch.setattr(loop, "load_payload", boom)
    monkeypatch.setattr(loop, "run_training", boom)


def test_out_dir_with_foreign_files_is_refused_before_compute(tmp_path, capsys, no_compute):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(os.urandom(300))
    (run / "config.yaml").write_text("my: notes\n")
    (run / "metrics.json").write_text("{}\n")
    before = snapshot(run, skip=())
    rc, err = cli(tiny(run), capsys)
    line = only_line(err)
    assert rc == 2 and "holds files srp-jax did not write" in line and "checkpoint.pt" in line and "--force" in line
    assert snapshot(run, skip=()) == before  # not even a lock file was added


def test_force_writes_beside_foreign_files_but_never_over_a_foreign_folder(tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep me\n")
    (run / "metrics.json").write_text("{}\n")
    rc, err = cli(tiny(run, "training.steps=2", flags=["--force"]), capsys)
    assert rc == 0 and (run / "notes.txt").read_text() == "keep me\n" and (run / "DONE").is_file()
    assert json.loads((run / "metrics.json").read_text())["finite_metrics"] is True  # replaced, as --force says
    assert cli(tiny(run, "training.steps=2"), capsys)[0] == 2  # notes.txt is still not ours


def test_foreign_checkpoint_folder_is_refused_up_front_even_with_force(tmp_path, capsys, no_compute):
    run = tmp_path / "mine"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "weights.bin").write_bytes(b"\x00" * 64)
    before = snapshot(run, skip=())
    rc, err = cli(tiny(run, flags=["--force"]), capsys)
    assert rc == 2 and "is not an srp-jax checkpoint" in only_line(err)
    assert snapshot(run, skip=()) == before


def test_report_path_never_replaces_a_file_it_did_not_write(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "report.md"
    mine.write_text("# my own report\n")
    rc, err = cli(tiny(tmp_path / "run", f"artifacts.report_path={mine}"), capsys)
    assert rc == 2 and "exists and was not written by this run" in only_line(err)
    assert mine.read_text() == "# my own report\n" and not (tmp_path / "run").exists()
    ours = tmp_path / "reports" / "run.md"
    assert cli(tiny(tmp_path / "run", "training.steps=2", f"artifacts.report_path={ours}"), capsys)[0] == 0
    assert ours.read_text().startswith("# smoke")
    (tmp_path / "run" / "DONE").unlink()  # re-evaluate: the run may replace its own report
    rc, err = cli(tiny(tmp_path / "run", "training.steps=2", f"artifacts.report_path={ours}"), capsys)
    assert rc == 0 and "[report]" in err
    old_report = ours.read_bytes()
    rc, err = cli(tiny(tmp_path / "run", "training.steps=3", f"artifacts.report_path={ours}", flags=["--restart"]), capsys)
    assert rc == 0 and (next((tmp_path / "run" / PREVIOUS_DIR).iterdir()) / "report" / "run.md").read_bytes() == old_report
    inside = tmp_path / "run2" / "report.md"  # a report kept inside the run directory is the run's own
    assert cli(tiny(inside.parent, "training.steps=2", f"artifacts.report_path={inside}"), capsys)[0] == 0
    rc, err = cli(tiny(inside.parent, "training.steps=2", f"artifacts.report_path={inside}"), capsys)
    assert rc == 0 and "[skip]" in err


# --------------------------------------------------------------------------------------------
# 4. No silent fallback


def test_missing_data_path_is_an_error_and_creates_nothing(tmp_path, capsys):
    rc, err = cli(tiny(tmp_path / "run", flags=["--data-path", tmp_path / "hLN.pth"]), capsys)
    line = only_line(err)
    assert rc == 2 and "hLN.pth" in line and "never falls back to synthetic data" in line
    assert not (tmp_path / "run").exists()


def test_synthetic_data_only_when_asked_and_announced(finished, tmp_path, capsys):
    assert "[data] no data.path: training on the built-in synthetic readout (data.fallback: synthetic)" in finished[1]
    rc, err = cli(tiny(tmp_path / "run", "data.fallback=error"), capsys)
    assert rc == 2 and "no data.path given" in only_line(err) and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# 5. Divergence stops the run (exit 3); NaN/Inf payloads never reach training


def test_overflowing_learning_rate(tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = cli(tiny(run, "training.lr=1e308"), capsys)  # not even float32: refused as config
    assert rc == 2 and "training.lr = 1e+308 does not fit in float32" in only_line(err) and not run.exists()
    rc, err = cli(tiny(run, "training.lr=1e37"), capsys)  # the first update overflows the next step
    line = error_after_logs(err)
    assert rc == 3 and "training diverged at step 2: the total loss, gradient and parameters went non-finite" in line
    assert "no state was saved" in line and "no DONE written" in line
    assert not any((run / name).exists() for name in ("DONE", "checkpoint", "metrics.json", "checkpoint.pt"))


def test_divergence_after_a_save_keeps_the_last_finite_state(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ("training.lr=1e20", "training.checkpoint_every=1")
    rc, err = cli(tiny(run, *sets), capsys)
    line = error_after_logs(err)
    assert rc == 3 and "diverged at step 2" in line and "the last finite state, step 1, stays in" in line
    assert sorted(p.name for p in (run / "train_state").iterdir() if p.is_dir()) == ["1"]
    from srp_jax.train.resume import StateStore

    store = StateStore(run / "train_state").open()
    try:
        state = store._restore_verified(1, _template(run))[0]  # verified: checksums hold and finite
    finally:
        store.close()
    assert int(state.step) == 1
    rc, err = cli(tiny(run, *sets), capsys)  # rerunning resumes at step 1 and stops again, honestly
    assert rc == 3 and "[resume] run: step 1/6" in err and "diverged at step 2" in error_after_logs(err)
    assert not (run / "DONE").exists()


def _template(run: Path):
    from srp_jax.config import load_run_config
    from srp_jax.data import load_prism_dataset, row_sampling_weights
    from srp_jax.train.state import init_train_state
    from srp_jax.train.step import make_optimizer

    cfg = load_run_config("smoke", [*TINY, "training.lr=1e20"])
    ds = load_prism_dataset(cfg, cfg.run.seed)
    w = row_sampling_weights(ds, cfg.training.row_sampling)
    return jax.eval_shape(lambda: init_train_state(cfg.init_seed, cfg.factorizer, cfg.training, ds.d_model,
                                                   make_optimizer(cfg.training), ds.rows_normalized, w))


def test_huge_hidden_values_diverge_in_the_prism_term(tmp_path, capsys):
    rng = np.random.default_rng(0)
    W, h = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    h[:, 0] = 3e38  # finite, but h . w overflows
    np.savez(tmp_path / "p.npz", W_U=W, h_LN=h)
    rc, err = cli(tiny(tmp_path / "run", flags=["--data-path", tmp_path / "p.npz"]), capsys)
    line = error_after_logs(err)
    assert rc == 3 and "diverged at step 1: the prism loss" in line and not (tmp_path / "run" / "DONE").exists()


def _bad_payloads():
    rng = np.random.default_rng(0)
    W, h = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=(2, 20, 16)).astype(np.float32)
    h_inf = h.copy()
    h_inf[0, 3, 2] = -np.inf
    h_nan = h.copy()
    h_nan[1, 4] = np.nan
    W_nan = W.copy()
    W_nan[9, 0] = np.nan
    return {
        "-inf in h_LN": ({"W_U": W, "h_LN": h_inf}, "h_LN row (0, 3) holds a non-finite value (-inf)"),
        "a NaN row (not dropped as padding)": ({"W_U": W, "h_LN": h_nan}, "h_LN row (1, 4) holds a non-finite value (nan)"),
        "all-NaN h_LN": ({"W_U": W, "h_LN": np.full_like(h, np.nan)}, "40 row(s) in all are not finite"),
        "empty h_LN": ({"W_U": W, "h_LN": np.zeros((0, 16), np.float32)}, "h_LN holds no hidden states"),
        "all padding": ({"W_U": W, "h_LN": np.zeros_like(h)}, "every one of the 40 hidden states in h_LN is padding"),
        "NaN in W_U": ({"W_U": W_nan, "h_LN": h}, "W_U row 9 holds a non-finite value"),
        "d_model 0": ({"W_U": np.zeros((64, 0), np.float32), "h_LN": np.zeros((40, 0), np.float32)}, "d_model >= 1"),
        "a string W_U": ({"W_U": np.array("hello"), "h_LN": h}, "W_U must be a numeric array, got dtype <U5"),
    }


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_bad_payload_is_refused_before_any_compute(case, tmp_path, capsys):
    arrays, message = _bad_payloads()[case]
    np.savez(tmp_path / "p.npz", **arrays)
    before = snapshot(tmp_path / "p.npz")
    import srp_jax.train.loop as loop

    called = []
    real = loop.build_prism_dataset
    loop.build_prism_dataset = lambda *a, **k: called.append(1) or real(*a, **k)
    try:
        rc, err = cli(tiny(tmp_path / "run", flags=["--data-path", tmp_path / "p.npz"]), capsys)
    finally:
        loop.build_prism_dataset = real
    assert rc == 2 and message in only_line(err) and not called
    assert snapshot(tmp_path / "p.npz") == before and not (tmp_path / "run" / "DONE").exists()


# --------------------------------------------------------------------------------------------
# 6. One line instead of a traceback


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses everyone
        if not Path("/sys").is_dir():
            pytest.skip("no unwritable directory available to root")
        return Path("/sys")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    (tmp_path / "a_file").write_text("x")
    ro = _unwritable(tmp_path)
    cases = [
        (["train", "--config", "latin1.yaml"], "not UTF-8 text"),
        (tiny("r", "run.seed=9223372036854775808"), "run.seed must be <= 4294967295"),
        (tiny("r", "run.seed=4294967296"), "run.seed must be <= 4294967295"),
        (tiny("r", "factorizer.d_features=1099511627776"), "factorizer.d_features must be <= 2147483647"),
        (tiny("r", "training.batch_size=1099511627776"), "training.batch_size must be <= 2147483647"),
        (tiny("r", "factorizer.d_features=67108864"), "the run needs at least"),  # refused before allocating
        (tiny("a_file"), "a_file: is a file, not a run directory"),
        (tiny("a_file/run"), "is under a_file, which is a file"),
        (tiny(ro / "srp-run"), "cannot create the run directory"),
        (tiny("r", f"artifacts.report_path={tmp_path}"), "is a directory"),
        (tiny("r", "artifacts.report_path=a_file/report.md"), "a_file is a file, not a directory"),
        (tiny(""), "run.output_dir / --out-dir is empty"),
        (tiny("runs/${SRP_HOSTILE_NOPE}/x"), "uses the environment variable SRP_HOSTILE_NOPE, which is not set"),
        (tiny("r", "artifacts.report_path=${SRP_HOSTILE_NOPE}.md"), "SRP_HOSTILE_NOPE, which is not set"),
    ]
    monkeypatch.delenv("SRP_HOSTILE_NOPE", raising=False)
    for argv, message in cases:
        rc, err = cli(argv, capsys)
        assert rc == 2 and message in only_line(err), (argv[-3:], err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "latin1.yaml"] + (["ro"] if ro.parent == tmp_path else [])


def test_out_of_device_memory_is_one_line(tmp_path, capsys, monkeypatch):
    import srp_jax.train.loop as loop

    def oom(*a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4398046511104 bytes.")

    monkeypatch.setattr(loop, "run_training", oom)
    rc, err = cli(tiny(tmp_path / "run"), capsys)
    line = error_after_logs(err)
    assert rc == 2 and "out of device memory (RESOURCE_EXHAUSTED: Out of memory" in line
    assert "factorizer.d_features=64, d_model=128, training.batch_size=32" in line


def test_convert_errors_are_one_line(finished, tmp_path, capsys):
    pytest.importorskip("torch")
    src = finished[0]
    (tmp_path / "a_file").write_text("x")
    ro = _unwritable(tmp_path)
    assert cli(["convert", src, tmp_path / "d.pt"], capsys)[0] == 0
    nested = copy_run(src / "checkpoint", tmp_path / "nested")
    (nested / "srp_checkpoint.json").write_text("[" * 100000 + "]" * 100000)
    before = snapshot(tmp_path, skip=())
    for argv, message in [
        (["convert", src, ro / "x.pt"], "cannot create a file in"),  # Orbax -> .pt into a read-only folder
        (["convert", tmp_path / "d.pt", ro / "dict"], "cannot create a folder in"),  # .pt -> Orbax
        (["convert", src, tmp_path / "a_file" / "x.pt"], "a_file is a file, not a directory"),
        (["convert", tmp_path / "d.pt", tmp_path / "a_file" / "dict"], "a_file is a file, not a directory"),
        (["convert", nested, tmp_path / "n.pt"], "nested too deeply"),
    ]:
        rc, err = cli(argv, capsys)
        assert rc == 2 and message in only_line(err), (argv, err)
    assert snapshot(tmp_path, skip=()) == before


def test_api_errors_are_one_line():
    from conftest import random_dictionary, random_readout_inputs

    from srp_jax.decompose import decompose_token_logit, decompose_tokens
    from srp_jax.errors import ShapeError
    from srp_jax.readout import Readout

    d = random_dictionary("topk")
    W, H = random_readout_inputs()
    r = Readout.for_dictionary(W, d)
    with pytest.raises(ShapeError, match="token_ids is empty"):
        decompose_tokens(H, [], r, d)
    with pytest.raises(ShapeError, match="token_ids is empty"):
        decompose_tokens(H[:0], np.zeros((0,), np.int64), r, d)
    with pytest.raises(ShapeError, match="softcap must be a positive number, got 'x'"):
        Readout.from_weights(W, softcap="x")
    for bad in (0.0, -1.0):
        with pytest.raises(ShapeError, match="row_norm must be > 0"):
            decompose_token_logit(H[0], r.W_U[0], r.row_mean, bad, r.rows_normalized[0], d)


def test_readout_refuses_a_w_u_that_contradicts_the_dictionary():
    from conftest import random_dictionary, random_readout_inputs

    from srp_jax.errors import ShapeError
    from srp_jax.readout import Readout, preprocess_rows

    W, H = random_readout_inputs()
    mean, norms, _ = preprocess_rows(W)
    ids = np.arange(W.shape[0])
    d = random_dictionary("topk").replace(row_mean=mean, row_norms=norms, row_token_ids=ids)
    assert Readout.for_dictionary(W, d).vocab_size == W.shape[0]  # the matrix it was trained on
    with pytest.raises(ShapeError, match="contradicts the dictionary's stored row statistics"):
        Readout.for_dictionary(W * 1.5, d)
    with pytest.raises(ShapeError, match="contradicts"):
        Readout.for_dictionary(W[::-1].copy(), d, rows="all")
    with pytest.raises(ShapeError, match="another vocabulary"):
        Readout.for_dictionary(W[:10], d.replace(row_norms=None))
    with pytest.raises(ShapeError, match="contradict each other"):
        Readout.for_dictionary(W, d.replace(row_norms=np.asarray(norms)[:5]))


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}


def test_hub_list_into_a_closed_pipe_is_quiet():
    script = "import sys; from srp_jax.cli.main import main; sys.exit(main(['hub', 'list', '--json']))"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write (`| head` that already exited)
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=write_end, stderr=subprocess.PIPE, env=_env())
    finally:
        os.close(write_end)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE and err == ""


# --------------------------------------------------------------------------------------------
# 7. Library noise stays off stderr unless --verbose


def test_orbax_noise_only_with_verbose(finished, tmp_path):
    run = copy_run(finished[0], tmp_path / "run")
    (run / "DONE").unlink()
    for f in (run / "train_state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            with open(f, "r+b") as fh:  # every array chunk of every save unreadable: Orbax fails loudly
                fh.truncate(10)
    before = snapshot(run)
    argv = [sys.executable, "-m", "srp_jax.cli.main", *map(str, tiny(run))]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300)
    lines = [ln for ln in quiet.stderr.splitlines() if ln.strip()]
    assert quiet.returncode == 2 and all(ln.startswith(("[data]", "srp-jax train: error:")) for ln in lines), lines
    assert "no intact saved state" in lines[-1]
    loud = subprocess.run(argv + ["--verbose"], capture_output=True, text=True, env=_env(), timeout=300)
    # --verbose hides nothing: the same refusal, plus whatever the libraries printed (Orbax's
    # "Event loop is closed" dumps come or not depending on thread timing, so they are not asserted)
    # (library threads may write mid-line, so the refusal is looked for anywhere in the text)
    assert loud.returncode == 2 and loud.stderr.count("srp-jax train: error:") == 1, loud.stderr[-2000:]
    assert "no intact saved state" in loud.stderr.split("srp-jax train: error:", 1)[1]
    assert lines[0] in loud.stderr  # the [data] notice too
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------
# 8. Temp litter, deterministic .pt, duplicate zip records


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_litter_of_killed_writes_is_cleaned_at_the_next_write(finished, tmp_path, capsys):
    pytest.importorskip("torch")
    dst = tmp_path / "dict"
    assert cli(["convert", finished[0], tmp_path / "d.pt"], capsys)[0] == 0
    dead, alive = _dead_pid(), os.getpid()
    litter = [tmp_path / f".dict.tmp-{dead}-abc123", tmp_path / ".dict.old-1234abcd"]
    live = tmp_path / f".dict.tmp-{alive}-zzz"  # a writer that still runs: never touched
    for folder in (*litter, live):
        (folder / "arrays").mkdir(parents=True)
        (folder / "arrays" / "blob").write_bytes(os.urandom(1000))
    old_version = tmp_path / ".dict.tmp-k3j4h5g6"  # an older srp-jax's name (no pid): stale after an hour
    recent_old_version = tmp_path / ".dict.tmp-a1b2c3d4"
    for folder in (old_version, recent_old_version):
        folder.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(old_version, (two_hours_ago, two_hours_ago))
    litter.append(old_version)
    file_litter = tmp_path / f".d.pt.tmp-{dead}-q1w2e3.tmp"
    file_litter.write_bytes(b"half a file")
    assert cli(["convert", tmp_path / "d.pt", dst], capsys)[0] == 0
    assert cli(["convert", tmp_path / "d.pt", dst, "--force"], capsys)[0] == 0
    assert not any(p.exists() for p in litter) and live.exists()
    assert cli(["convert", dst, tmp_path / "d.pt", "--force"], capsys)[0] == 0
    assert not file_litter.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".dict.tmp-{alive}-zzz", ".dict.tmp-a1b2c3d4", "d.pt", "dict"])


def test_exported_pt_files_are_deterministic_with_the_reference_root(finished, tmp_path, capsys):
    pytest.importorskip("torch")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for where in ("a", "b"):
        assert cli(["convert", finished[0], tmp_path / where / "checkpoint.pt"], capsys)[0] == 0
    a, b = (tmp_path / w / "checkpoint.pt" for w in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()  # same content, same bytes
    names = zipfile.ZipFile(a).namelist()
    assert all(n.startswith("checkpoint/") for n in names)  # the reference's root for checkpoint.pt
    reference = ROOT / "tests" / "fixtures" / "reference" / "topk" / "checkpoint.pt"
    assert zipfile.ZipFile(reference).namelist()[0].split("/")[0] == "checkpoint"


def test_zip_with_duplicate_records_is_refused(finished, tmp_path, capsys):
    pytest.importorskip("torch")
    good = tmp_path / "checkpoint.pt"
    assert cli(["convert", finished[0], good], capsys)[0] == 0
    forged = tmp_path / "forged.pt"
    shutil.copy(good, forged)
    import warnings

    with zipfile.ZipFile(forged, "a") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        z.writestr(zipfile.ZipFile(good).namelist()[0], b"another pickle")
    before = snapshot(forged)
    rc, err = cli(["convert", forged, tmp_path / "out"], capsys)
    assert rc == 2 and "holds record 'checkpoint/data.pkl' more than once" in only_line(err)
    assert snapshot(forged) == before and not (tmp_path / "out").exists()
