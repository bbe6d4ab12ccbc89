"""Metrics people can watch: TensorBoard event files and W&B rows are the history's numbers."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest

from srp_jax.cli.main import main


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TFRecord event files under ``logdir`` (length, crc, Event, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for file in sorted(logdir.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


ARGS = ["--config", "smoke", "--set", "training.steps=6", "--set", "training.log_every=2",
        "--set", "factorizer.d_features=128", "--set", "data.max_hidden=64", "--set", "data.val_hidden=32"]


def test_tensorboard_events_hold_the_history(tmp_path):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--out", str(out), "--tensorboard"]) == 0
    history = json.loads((out / "history.json").read_text())["history"]
    scalars = read_scalars(out / "tensorboard")
    assert sorted(scalars["train/loss"]) == [row["step"] for row in history] == [1, 2, 4, 6]
    for row in history:
        assert scalars["train/loss"][row["step"]] == pytest.approx(row["loss"], rel=1e-6)
        assert scalars["train/reconstruction_loss"][row["step"]] == pytest.approx(row["reconstruction_loss"], rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/mean_l0", "train/dead_fraction"} <= set(scalars)
    assert scalars["train/lr"][6] == pytest.approx(1e-3)


def test_wandb_rows_when_asked(tmp_path, monkeypatch):
    calls: dict = {"log": [], "finished": False}

    def init(**kwargs):
        calls["init"] = kwargs
        return types.SimpleNamespace(log=lambda row, step: calls["log"].append((step, row)),
                                     finish=lambda: calls.update(finished=True))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--out", str(out), "--wandb", "my-project"]) == 0
    assert calls["init"]["project"] == "my-project" and calls["init"]["config"]["training"]["steps"] == 6
    assert [step for step, _ in calls["log"]] == [1, 2, 4, 6] and calls["finished"]
    history = json.loads((out / "history.json").read_text())["history"]
    assert calls["log"][-1][1]["train/loss"] == pytest.approx(history[-1]["loss"], rel=1e-6)


def test_watchers_missing_dependency_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert main(["train", *ARGS, "--out", str(tmp_path / "r"), "--wandb", "p"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and errors == lines[-1:] and "needs wandb" in errors[0]  # beside the [data] notice
    assert all(ln.startswith("[") for ln in lines[:-1])  # nothing else: no traceback
