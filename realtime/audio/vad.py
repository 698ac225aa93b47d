"""Speech / silence: webrtcvad plus an energy gate on fixed blocks, and the per-video-frame decision.

A block (10, 20 or 30 ms at 16 kHz) is speech when webrtcvad says so *and* its RMS is above the energy
gate (webrtcvad alone fires on some noises; the gate also makes digital silence and near-silence idle).

A video frame is rendered when any speech block touches the span its mouth depends on: from
`hangover` before the frame's own time (the mouth closes after the sound stops) to the end of its
200 ms mel window (the mouth opens before the sound starts, which the window already anticipates).
"""
from __future__ import annotations

import math

import numpy as np
import webrtcvad

from realtime.config import SAMPLE_RATE


class SpeechDetector:
    """Streaming block decisions: push samples, get one bool per newly complete block."""

    def __init__(self, aggressiveness: int = 2, block_ms: int = 20, energy_gate_dbfs: float = -50.0) -> None:
        if block_ms not in (10, 20, 30):
            raise ValueError(f"webrtcvad blocks are 10, 20 or 30 ms, got {block_ms}")
        self.block = SAMPLE_RATE * block_ms // 1000
        self._vad = webrtcvad.Vad(int(aggressiveness))
        self._gate_rms = 10.0 ** (energy_gate_dbfs / 20.0)
        self._pending = np.zeros(0, dtype=np.float32)
        self.blocks_decided = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        x = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        n = len(x) // self.block
        self._pending = x[n * self.block:]
        return self._decide(x[:n * self.block].reshape(n, self.block))

    def flush(self) -> np.ndarray:
        """Decide the last partial block, zero-padded (end of a segment)."""
        if len(self._pending) == 0:
            return np.zeros(0, dtype=bool)
        block = np.zeros(self.block, dtype=np.float32)
        block[:len(self._pending)] = self._pending
        self._pending = np.zeros(0, dtype=np.float32)
        return self._decide(block[None, :])

    def _decide(self, blocks: np.ndarray) -> np.ndarray:
        out = np.zeros(len(blocks), dtype=bool)
        if len(blocks) == 0:
            return out
        rms = np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1))
        pcm = np.clip(np.round(blocks * 32767.0), -32768, 32767).astype("<i2")
        for b in np.flatnonzero(rms >= self._gate_rms):
            out[b] = self._vad.is_speech(pcm[b].tobytes(), SAMPLE_RATE)
        self.blocks_decided += len(blocks)
        return out


class SpeechTrack:
    """Block decisions of one segment, queried by sample span (segment-relative samples)."""

    def __init__(self, detector: SpeechDetector) -> None:
        self._detector = detector
        self.block = detector.block
        self._decisions = np.zeros(0, dtype=bool)
        self._base = 0          # block index of _decisions[0]
        self.ended = False

    @property
    def blocks_decided(self) -> int:
        return self._base + len(self._decisions)

    def push(self, samples: np.ndarray) -> None:
        self._append(self._detector.push(samples))

    def end(self) -> None:
        self._append(self._detector.flush())
        self.ended = True

    def _append(self, decisions: np.ndarray) -> None:
        if len(decisions):
            self._decisions = np.concatenate([self._decisions, decisions])

    def speech_in(self, start: int, end: int) -> bool | None:
        """Any speech block overlapping samples [start, end)? None while those blocks are undecided."""
        b0 = max(start, 0) // self.block
        b1 = math.ceil(end / self.block)  # exclusive
        if not self.ended and b1 > self.blocks_decided:
            return None
        b1 = min(b1, self.blocks_decided)
        lo = max(b0 - self._base, 0)
        hi = max(b1 - self._base, 0)
        return bool(self._decisions[lo:hi].any()) if hi > lo else False

    def discard_before(self, sample: int) -> None:
        """Forget decisions for blocks entirely before `sample` (memory bound on long segments)."""
        drop = min(max(sample, 0) // self.block - self._base, len(self._decisions))
        if drop > 0:
            self._decisions = self._decisions[drop:]
            self._base += drop
