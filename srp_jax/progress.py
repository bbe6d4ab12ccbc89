"""Progress on long work (training, extraction, labelling, conversion): a redrawn bar with the
steady-state rate and an ETA on a terminal; periodic plain lines otherwise (logs, CI, pipes).

The first unit of jitted work includes compilation, so it is timed apart ("compile 2.1 s") and
the rate counts only what came after it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` / ``4.2 s``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress of ``total`` units (``unit``, e.g. "steps") under a ``label``.

    ``start(done)`` at the beginning (``done`` > 0 when resuming); ``update(done, **fields)``
    after each unit; ``log(done, row)`` where a plain line is wanted (the training loop calls it
    at ``log_every``); ``close()`` at the end. On a TTY ``update`` redraws at most 4 times a
    second and ``log`` prints nothing; elsewhere ``update`` prints nothing. ``enabled`` forces
    the TTY mode on or off.
    """

    def __init__(
        self, total: int, *, stream=None, enabled: bool | None = None, width: int = 24, label: str = "train",
        unit: str = "steps",
    ):
        self.total, self.stream, self.width = max(int(total), 1), stream or sys.stderr, width
        self.label, self.unit = label, unit
        self.tty = bool(enabled) if enabled is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0, self.n0, self.last_draw = time.perf_counter(), None, 0.0
        self.t_first = self.n_first = None  # the first unit (with compilation) ends here
        self.compile_seconds = float("nan")

    # ---- timing
    def start(self, done: int = 0) -> None:
        self.n0, self.t0 = int(done), time.perf_counter()
        self.t_first = self.n_first = None

    def first_done(self, done: int) -> None:
        """Mark the end of the first unit (call after blocking on its result)."""
        if self.t_first is None:
            self.t_first, self.n_first = time.perf_counter(), int(done)
            self.compile_seconds = self.t_first - self.t0

    def rate(self, done: int) -> float:
        """Steady-state units per second (after the first unit), or NaN before there is one."""
        if self.t_first is None or done <= self.n_first:
            return float("nan")
        dt = time.perf_counter() - self.t_first
        return (done - self.n_first) / dt if dt > 0 else float("nan")

    def eta(self, done: int) -> float:
        r = self.rate(done)
        return (self.total - done) / r if r and math.isfinite(r) and r > 0 else float("nan")

    def _status(self, done: int) -> str:
        r = self.rate(done)
        parts = [f"{r:.3g} {self.unit}/s" if math.isfinite(r) else "", f"ETA {format_duration(self.eta(done))}"]
        if math.isfinite(self.compile_seconds):
            parts.append(f"(first {self.unit[:-1] if self.unit.endswith('s') else self.unit} incl. compile "
                         f"{format_duration(self.compile_seconds)})")
        return "  ".join(p for p in parts if p)

    # ---- output
    def wants_draw(self) -> bool:
        return self.tty and time.perf_counter() - self.last_draw >= 0.25

    def update(self, done: int, **fields: Any) -> None:
        if self.wants_draw():
            self.draw(done, **fields)

    def draw(self, done: int, loss: float | None = None, **fields: Any) -> None:
        frac = min(done / self.total, 1.0)
        fill = int(round(frac * self.width))
        bar = "#" * fill + "." * (self.width - fill)
        shown = {"loss": loss, **fields} if loss is not None else fields
        extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        self.stream.write(f"\r[{self.label}] {done}/{self.total} [{bar}] {frac:4.0%}  {extra}  {self._status(done)} ")
        self.stream.flush()
        self.last_draw = time.perf_counter()

    def log(self, done: int, row: Mapping[str, float]) -> None:
        if self.tty:
            return
        fields = " ".join(f"{k.replace('reconstruction_loss', 'rec').replace('_loss', '')}={v:.6g}"
                          for k, v in row.items() if k != "step" and isinstance(v, (int, float)))
        self.stream.write(f"[{self.label}] {self.unit[:-1] if self.unit.endswith('s') else self.unit} {done}/{self.total} "
                          f"{fields} {self._status(done)}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def stage(label: str, message: str, *, stream=None) -> None:
    """One status line for a long step with no natural unit count (reading a multi-GB file,
    converting it), on a terminal only: pipes and logs stay quiet."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        stream.write(f"[{label}] {message}\n")
        stream.flush()


def human_size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n_bytes < 1024 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TB"  # pragma: no cover


__all__ = ["Progress", "format_duration", "stage", "human_size"]
