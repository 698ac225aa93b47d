"""A small stderr progress bar for long CLI work (no dependency; quiet when stderr is not a terminal)."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`with Progress("rendering", total) as bar: bar.update(n)` -> one self-rewriting line on stderr."""

    def __init__(self, label: str, total: int, unit: str = "frames", stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __enter__(self) -> "Progress":
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._draw(force=True, final=True)

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < (0.1 if self._tty else 5.0):
            return
        self._last_draw = now
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        frac = self.done / self.total
        bar = "#" * int(frac * 30)
        line = (f"{self.label} [{bar:<30}] {self.done}/{self.total} {self.unit} "
                f"{rate:5.1f}/s, {elapsed:4.0f}s elapsed" + ("" if final else f", ~{eta:3.0f}s left"))
        end = "\n" if final or not self._tty else ""
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()


class PhaseBars:
    """One bar per phase of a job (`update(phase, done, total)`); a new phase closes the previous bar."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._phase: object = None
        self._bar: Progress | None = None

    def __enter__(self) -> "PhaseBars":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, phase: object, done: int, total: int) -> None:
        if phase != self._phase or self._bar is None:
            self.close()
            self._phase = phase
            self._bar = Progress(str(getattr(phase, "value", phase)), total, stream=self.stream).__enter__()
        self._bar.total = max(int(total), done, 1)
        self._bar.update(done - self._bar.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
