"""Per-session metrics as plain data: counters, fixed-bucket histograms, exact recent percentiles.

`Histogram` keeps Prometheus-style cumulative buckets (`le` upper bounds, plus +Inf), sum and count for
the whole session, and a bounded window of recent values for exact p50 / p95 / p99.
`SessionMetrics.as_dict()` is what `LipSyncSession.metrics()` returns and what the server's /metrics
formats; every value is an int, float, str, None, or a dict / list of those.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from realtime.config import DEFAULT_LATENCY_BUCKETS_MS, DEFAULT_RENDER_BUCKETS_MS


class Histogram:
    """Fixed buckets + a recent-values window. Thread-safe (the render worker observes render times)."""

    def __init__(self, buckets: tuple[float, ...], window: int = 4096) -> None:
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last one: above every bound (+Inf)
        self.count = 0
        self.sum = 0.0
        self._recent: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        value = float(value)
        i = int(np.searchsorted(self.buckets, value, side="left"))
        with self._lock:
            self._counts[i] += 1
            self.count += 1
            self.sum += value
            self._recent.append(value)

    def quantile(self, q: float) -> float | None:
        with self._lock:
            if not self._recent:
                return None
            return float(np.percentile(np.fromiter(self._recent, dtype=np.float64), 100.0 * q))

    def as_dict(self) -> dict:
        with self._lock:
            cumulative, running = {}, 0
            for bound, c in zip(self.buckets, self._counts[:-1], strict=True):  # [-1]: +Inf, below
                running += c
                cumulative[_fmt(bound)] = running
            cumulative["+Inf"] = running + self._counts[-1]
            count, total = self.count, self.sum
        return {
            "buckets": cumulative,
            "count": count,
            "sum": total,
            "p50": self.quantile(0.50),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
        }


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


@dataclass
class SessionMetrics:
    """Counters of one session. Frame states: every emitted frame is exactly one of rendered / held /
    idle; `dropped` counts speech frames whose render was not ready by its tick (shown held or idle)."""

    latency_buckets_ms: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_MS
    render_buckets_ms: tuple[float, ...] = DEFAULT_RENDER_BUCKETS_MS
    window: int = 4096

    frames: int = 0            # video frames emitted
    frames_rendered: int = 0   # showing a fresh mouth rendered for their own audio
    frames_held: int = 0       # speech frames re-showing the last mouth (render missed)
    frames_idle: int = 0       # avatar loop, mouth at rest (silence, no input, or fade-out)
    frames_dropped: int = 0    # speech frames whose render missed its deadline
    frames_starved: int = 0    # frames whose audio had not arrived in time (input stall / late input)
    frames_submitted: int = 0  # render jobs handed to the worker
    audio_in_samples: int = 0  # after ingest (16 kHz)
    audio_out_samples: int = 0
    audio_underrun_samples: int = 0  # output samples of an open segment whose input had not arrived
    audio_refused_samples: int = 0   # input refused because the buffer was full
    segments: int = 0          # contiguous input runs (a new one starts after a stall or interrupt)
    stalls: int = 0            # segments ended because input stopped arriving
    interrupts: int = 0
    av_offset_ms: float = 0.0  # of the last frame that showed audio, from its pts and the audio pts
    av_offset_max_abs_ms: float = 0.0
    latency_ms: Histogram = field(init=False)
    render_ms: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.latency_ms = Histogram(self.latency_buckets_ms, self.window)
        self.render_ms = Histogram(self.render_buckets_ms, self.window)

    def observe_av_offset(self, offset_ms: float) -> None:
        self.av_offset_ms = float(offset_ms)
        self.av_offset_max_abs_ms = max(self.av_offset_max_abs_ms, abs(float(offset_ms)))

    def as_dict(self) -> dict:
        counters = {
            name: getattr(self, name)
            for name in (
                "frames", "frames_rendered", "frames_held", "frames_idle", "frames_dropped",
                "frames_starved", "frames_submitted", "audio_in_samples", "audio_out_samples",
                "audio_underrun_samples", "audio_refused_samples", "segments", "stalls", "interrupts",
                "av_offset_ms", "av_offset_max_abs_ms",
            )
        }
        counters["latency_ms"] = self.latency_ms.as_dict()
        counters["render_ms"] = self.render_ms.as_dict()
        return counters
