"""`DelayedAudioOut`: the session's output audio track, the input delayed by a fixed number of samples.

Output sample j (pts j / 16000) is input sample j - delay_samples, read from the session's `AudioRing`
(silence where nothing was stored), so the track is continuous whatever the input does. After a barge-in
the next block starts with a 5 ms fade from the last sample played, so cutting the audio does not click.
"""
from __future__ import annotations

import numpy as np

from realtime.audio.audio_ingest import AudioRing

FADE_SAMPLES = 80      # 5 ms audio fade after an interrupt


class DelayedAudioOut:
    def __init__(self, ring: AudioRing, delay_samples: int) -> None:
        self._ring = ring
        self._delay_samples = delay_samples
        self.position = 0               # output samples returned so far
        self.block_start = 0            # output position of the start of the last audio block pulled
        self._last_sample = 0.0
        self._fade_from: float | None = None

    def read(self, n: int) -> tuple[int, np.ndarray]:
        """The next n output samples and the output position they start at."""
        out_start = self.position
        in_start = out_start - self._delay_samples   # output sample j plays input sample j - delay
        out = self._ring.read(in_start, n)
        if self._fade_from is not None:
            fade = min(FADE_SAMPLES, n)
            out[:fade] += self._fade_from * np.linspace(1.0, 0.0, fade, endpoint=False, dtype=np.float32)
            self._fade_from = None
        self._last_sample = float(out[-1])
        self.block_start = out_start
        self.position = out_start + n
        return out_start, out

    def interrupt(self) -> None:
        """The next block fades out from the last sample played instead of jumping to silence."""
        self._fade_from = self._last_sample if self._last_sample != 0.0 else None
        self._last_sample = 0.0
