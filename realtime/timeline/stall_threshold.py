"""`StallThreshold`: how long input may stop arriving before the session closes the segment.

A real-time source pushing C-sample chunks lags by up to C between pushes, so the threshold becomes 1.5 C
of the largest of the last 16 paced chunks (at least stall_after_ms, at most half the delay: a longer gap
could no longer be hidden behind the delay). Chunks pushed ahead of the clock (TTS bursts) or longer than
half the delay say nothing about pacing and are not counted.

A live input over a jittery link lags by its arrival jitter too: the session passes the spread of
lateness its live chunks showed lately (realtime/timeline/live_arrival.py), and the threshold covers the jitter
allowance plus that spread, within the same bounds. Otherwise each late burst would close the segment
and the input would be placed anew, later, for good.
"""
from __future__ import annotations

from collections import deque

from realtime.audio.mel import SAMPLE_RATE


class StallThreshold:
    def __init__(self, stall_after_ms: float, delay_samples: int, jitter_samples: int = 0) -> None:
        self._minimum = round(stall_after_ms * SAMPLE_RATE / 1000)
        self._maximum = delay_samples // 2
        self._jitter = jitter_samples
        self._paced_chunks: deque[int] = deque(maxlen=16)
        self._paced = 0     # 1.5 x the largest recent paced chunk
        self._arrival = 0   # jitter allowance + the live input's lateness spread (0 without one)
        self.samples = self._minimum    # the current threshold, in samples

    def note_chunk(self, n: int, start: int, now_out: int) -> None:
        """A chunk of n samples stored at input index `start` while the output clock is at `now_out`."""
        if start <= now_out + n and n <= self._maximum:
            self._paced_chunks.append(n)
            self._paced = int(1.5 * max(self._paced_chunks))
            self._update()

    def note_spread(self, spread: int) -> None:
        """The live input's recent arrival-lateness spread, in samples."""
        self._arrival = self._jitter + spread if spread > 0 else 0
        self._update()

    def _update(self) -> None:
        self.samples = min(max(self._minimum, self._paced, self._arrival), self._maximum)
