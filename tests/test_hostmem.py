"""srp_jax._hostmem: freed heap goes back to the OS, and the training loop asks for it once."""

from __future__ import annotations

import sys

import pytest

from srp_jax import _hostmem


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(_hostmem._malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_trim_host_heap_returns_freed_pages_between_live_blocks():
    # 160 MB of 4 KB blocks (below glibc's mmap threshold: served from the heap); every tenth
    # stays alive, so the freed ones are holes free() alone cannot hand back
    blobs = [b"x" * 4096 + bytes([i % 251]) for i in range(40_000)]
    kept = blobs[::10]
    del blobs
    before = _rss_bytes()
    assert _hostmem.trim_host_heap() is True
    after = _rss_bytes()
    assert before - after > 80 * 2**20, (before, after)
    assert len(kept) == 4_000 and kept[-1].startswith(b"x")


def test_trim_host_heap_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(_hostmem, "_malloc_trim", lambda: None)
    assert _hostmem.trim_host_heap() is False


def test_no_malloc_trim_off_linux(monkeypatch):
    _hostmem._malloc_trim.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        assert _hostmem._malloc_trim() is None
    finally:
        _hostmem._malloc_trim.cache_clear()


def test_training_loop_trims_once_after_the_first_step(monkeypatch):
    from srp_jax.config import load_run_config
    from srp_jax.data import load_prism_dataset
    from srp_jax.train import loop

    calls: list[int] = []
    monkeypatch.setattr(loop, "trim_host_heap", lambda: calls.append(1) or True)
    cfg = load_run_config("smoke", ["training.steps=3", "training.log_every=1", "factorizer.d_features=64",
                                    "factorizer.k=4", "training.batch_size=16"])
    out = loop.run_training(cfg, load_prism_dataset(cfg, 0), log=lambda msg: None, mesh=None)
    assert out["steps_run"] == 3 and calls == [1]
