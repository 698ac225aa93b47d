"""`StallThreshold`: how long input may stop arriving before the session closes the segment.

A real-time source pushing C-sample chunks lags by up to C between pushes, so the threshold becomes 1.5 C
of the largest of the last 16 paced chunks (at least stall_after_ms, at most half the delay: a longer gap
could no longer be hidden behind the delay). Chunks pushed ahead of the clock (TTS bursts) or longer than
half the delay say nothing about pacing and are not counted.
"""
from __future__ import annotations

from collections import deque

from realtime.audio.mel import SAMPLE_RATE


class StallThreshold:
    def __init__(self, stall_after_ms: float, delay_samples: int) -> None:
        self._minimum = round(stall_after_ms * SAMPLE_RATE / 1000)
        self._maximum = delay_samples // 2
        self._paced_chunks: deque[int] = deque(maxlen=16)
        self.samples = self._minimum    # the current threshold, in samples

    def note_chunk(self, n: int, start: int, now_out: int) -> None:
        """A chunk of n samples stored at input index `start` while the output clock is at `now_out`."""
        if start <= now_out + n and n <= self._maximum:
            self._paced_chunks.append(n)
            paced = int(1.5 * max(self._paced_chunks))
            self.samples = min(max(self._minimum, paced), self._maximum)
