"""`Upsampler3x`: 16 kHz -> 48 kHz for the outgoing Opus stream, one 20 ms frame in, one out, no frame held.

Why our own: aiortc's Opus encoder resamples through PyAV with `frame_size=960`. libswresample keeps its
filter's delay (48 output samples) back from each call, so the FIFO completes a 960-sample frame only
when the *next* 20 ms frame arrives: every outgoing audio packet left one frame (20 ms) late. Fed 48 kHz
frames of exactly 960 samples, that resampler passes them through and the packet leaves in the same call
(tests/test_opus_encoder.py). This filter keeps its history itself and returns all 960 samples of each
frame at once, delayed by its group delay only ((taps - 1) / 2 = 47.5 samples at 48 kHz, 0.99 ms, the
same as libswresample's default filter).

The filter: a Kaiser-windowed sinc (96 taps, beta 8, cutoff 7 kHz): flat to ~5.8 kHz, images of the
16 kHz input (above 8 kHz at 48 kHz) down >= 60 dB (test_opus_encoder.py measures both). Cost: one
np.convolve of 1055 x 96 per frame, ~0.03 ms, so it runs where the encoder runs (aiortc's executor).
"""
from __future__ import annotations

import numpy as np

from realtime.config import SAMPLE_RATE

FACTOR = 3
IN_RATE = SAMPLE_RATE
OUT_RATE = IN_RATE * FACTOR


def interpolation_filter(taps: int = 96, cutoff_hz: float = 7000.0, beta: float = 8.0) -> np.ndarray:
    """Low-pass for 3x interpolation at 48 kHz, gain 3 so the zero-stuffed signal keeps its level."""
    n = np.arange(taps) - (taps - 1) / 2.0
    fc = cutoff_hz / OUT_RATE
    h = 2.0 * fc * np.sinc(2.0 * fc * n) * np.kaiser(taps, beta)
    return FACTOR * h / np.sum(h)


class Upsampler3x:
    """Stateful 3x interpolator: each call's input continues the previous call's."""

    def __init__(self, taps: int = 96) -> None:
        self._h = interpolation_filter(taps)
        self._history = np.zeros(taps - 1)

    @property
    def delay_samples(self) -> float:
        """Group delay at the output rate."""
        return (len(self._h) - 1) / 2.0

    def reset(self) -> None:
        """Forget the history (after a discontinuity: the next frame starts from silence)."""
        self._history[:] = 0.0

    def process(self, x: np.ndarray) -> np.ndarray:
        """FACTOR * len(x) output samples (float64) for the input samples x (any real dtype)."""
        stuffed = np.zeros(FACTOR * len(x))
        stuffed[::FACTOR] = x
        extended = np.concatenate([self._history, stuffed])
        self._history = extended[len(extended) - len(self._history):].copy()
        return np.convolve(extended, self._h, mode="valid")


__all__ = ["FACTOR", "IN_RATE", "OUT_RATE", "Upsampler3x", "interpolation_filter"]
