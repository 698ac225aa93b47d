"""`LiveArrival`: how late a live input (a microphone) arrives, and how much delay it may give back.

Why. A session's input -> output mapping is fixed (input n plays at n + L), so a live input's delay is
decided by where its audio is placed on the input timeline: where its first chunk arrived, and again
after every stall (realtime/timeline/session.py `_open_segment`). Over a lossy, jittery link the
microphone's arrivals come late in bursts: a late chunk that passes the stall threshold closes the segment, and the
next one is placed where its (late) audio arrived, so the delay grows by that lateness and, as the input
is contiguous from then on, keeps it for the rest of the session. Each bad moment ratchets the delay up.

Two things undo that, both from the arrival record of the live chunks over the last `window` samples
of output time:
- the stall threshold covers the spread of arrival lateness the link has shown (`spread`; the session
  passes it to `StallThreshold`, which bounds it at L / 2), so ordinary jitter no longer closes the
  segment;
- delay the input has not needed for a whole window is given back (`margin`): when every chunk of the
  window arrived with margin over the jitter allowance, the smallest margin is delay nobody used. It is
  given back only in the input's pauses (quiet chunks after at least `min_quiet` samples of quiet), by
  storing less of the quiet chunk: speech is never dropped, doubled or stretched, and each pause gives
  back at most `MAX_TRIM_FRACTION` of its length (silence shortened, never removed).

Margins are measured against the current placement (`in_head`: where the chunk is stored); when the
session places a continuing input anew (a stall: `moved`), the window's margins move with it, so the
late chunk that caused the stall keeps what it needed in the window and only delay beyond it is given
back. The lateness spread does not depend on placement (arrival position minus samples received). Both
restart with an input that starts from silence (`restart`). Work per chunk is constant: sliding-window
extremes over monotonic deques, and one offset that shifts every stored margin at once.
"""
from __future__ import annotations

from collections import deque

import numpy as np

MAX_TRIM_FRACTION = 0.5   # of a quiet chunk: pauses are shortened, never removed
MIN_TRIM = 16             # samples (1 ms): less unused delay than this is the clock's rounding, kept


class WindowExtreme:
    """The maximum (or minimum) of the values pushed at times within `span` of the latest time; amortised
    constant work per push (a monotonic deque: a value that can never be the extreme again is dropped)."""

    def __init__(self, span: int, largest: bool) -> None:
        self.span = span
        self._sign = 1 if largest else -1
        self._items: deque[tuple[int, int]] = deque()   # (time, sign * value), values decreasing

    def push(self, t: int, value: int) -> None:
        v = self._sign * value
        while self._items and self._items[-1][1] <= v:
            self._items.pop()
        self._items.append((t, v))
        while self._items[0][0] < t - self.span:
            self._items.popleft()

    def value(self) -> int | None:
        return self._sign * self._items[0][1] if self._items else None

    def clear(self) -> None:
        self._items.clear()


class LiveArrival:
    """The arrival record of one session's live input. All quantities in 16 kHz samples; positions on
    the output timeline."""

    def __init__(self, window: int, jitter: int, min_quiet: int, quiet_rms: float) -> None:
        self.window = window          # how long lateness is remembered (and unused delay must stay unused)
        self.jitter = jitter          # the session's input jitter allowance
        self.min_quiet = min_quiet    # quiet input needed before a pause is shortened
        self.quiet_rms = quiet_rms    # below this RMS (float samples) a chunk is quiet
        self._received = 0            # live samples received, before any trim
        self._lateness = (WindowExtreme(window, largest=True), WindowExtreme(window, largest=False))
        self._margin = WindowExtreme(window, largest=False)
        self._placed_at: int | None = None   # output position where the input started (from silence)
        self._quiet_run = 0
        self._shift = 0               # stored margins minus this are the margins under today's placement
        self.trimmed = 0              # samples given back, in all

    def restart(self, position: int) -> None:
        """A live input starts from silence at output position `position` (a session's start, after an
        interrupt, after pushed speech during which the microphone was not fed): nothing before says
        anything about it."""
        self._margin.clear()
        for extreme in self._lateness:
            extreme.clear()
        self._placed_at = position
        self._shift = 0

    def moved(self, jump: int) -> None:
        """The continuing input was placed `jump` samples later (or earlier, negative) on the input
        timeline: every chunk of the window would have had that much more margin."""
        self._shift -= jump

    @property
    def margin(self) -> int | None:
        """The smallest margin of the window, under today's placement (None before any live chunk): delay
        the live input did not need lately."""
        lowest = self._margin.value()
        return None if lowest is None else lowest - self._shift

    @property
    def spread(self) -> int:
        """How much later than real time the window's latest-arriving chunk came than its earliest: the
        link's jitter as this input sees it."""
        late, early = self._lateness[0].value(), self._lateness[1].value()
        return 0 if late is None or early is None else late - early

    def note(self, chunk: np.ndarray, in_head: int, position: int, *, may_trim: bool = True) -> int:
        """A live chunk about to be stored at input index `in_head`, the output clock at `position`.
        Returns how many of its leading samples not to store (delay given back; 0 unless `may_trim`,
        the chunk is quiet, the input has been quiet for `min_quiet`, and a whole window since the
        input started arrived with margin)."""
        n = len(chunk)
        lateness = position - self._received
        self._received += n
        for extreme in self._lateness:
            extreme.push(position, lateness)
        # Margin: how far the chunk's place is ahead of where the jitter allowance needs it. Stored plus
        # the shift, so a trim or a new placement moves every stored margin at once (read minus it).
        self._margin.push(position, in_head - (position - self.jitter) + self._shift)
        quiet = n > 0 and float(np.sqrt(np.mean(np.square(chunk, dtype=np.float64)))) < self.quiet_rms
        quiet_before, self._quiet_run = self._quiet_run, (self._quiet_run + n if quiet else 0)
        excess = self.margin or 0
        if (not may_trim or not quiet or quiet_before < self.min_quiet or excess < MIN_TRIM or self._placed_at is None
                or position - self._placed_at < self.window):
            return 0
        trim = min(excess, int(n * MAX_TRIM_FRACTION))
        self.trimmed += trim
        self._shift += trim    # every later chunk is stored `trim` earlier: every margin shrinks by it
        return trim


__all__ = ["MAX_TRIM_FRACTION", "MIN_TRIM", "LiveArrival", "WindowExtreme"]
