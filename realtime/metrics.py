"""Session and render-worker statistics as dataclasses: counters, fixed-bucket histograms, percentiles.

`Histogram` keeps Prometheus-style cumulative buckets (`le` upper bounds, plus +Inf), sum and count for
the whole session, and a bounded window of recent values for exact p50 / p95 / p99; `snapshot()` gives
them as a `HistogramSnapshot`.

`SessionCounters` is the one list of a session's counters: `SessionMetrics` (what a session updates)
and `SessionStats` (what `LipSyncSession.metrics()` returns, a snapshot) both extend it, and the server
sums ended sessions' counters field by field (`SessionCounters.add`), so a new counter is added here
only. `WorkerStats` is what `RenderWorker.stats()` returns. `dataclasses.asdict` of any of them is
plain JSON data (the server's session listing).
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

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
        # bisect on the tuple: np.searchsorted would first copy the bounds into a new array, on every
        # frame (NaN counts above every bound, as searchsorted put it)
        i = len(self.buckets) if value != value else bisect_left(self.buckets, value)
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

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            cumulative, running = {}, 0
            for bound, c in zip(self.buckets, self._counts[:-1], strict=True):  # [-1]: +Inf, below
                running += c
                cumulative[_fmt(bound)] = running
            cumulative["+Inf"] = running + self._counts[-1]
            count, total = self.count, self.sum
        return HistogramSnapshot(cumulative, count, total, p50=self.quantile(0.50),
                                 p95=self.quantile(0.95), p99=self.quantile(0.99))


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram at one moment: cumulative counts by upper bound (label text, "+Inf" last), count and
    sum of every value, and percentiles of the recent window (None when empty, or merged)."""

    buckets: dict[str, int] = field(default_factory=dict)
    count: int = 0
    sum: float = 0.0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    @staticmethod
    def merge(parts: Iterable[HistogramSnapshot]) -> HistogramSnapshot:
        """The sum of histograms that share bucket bounds (one server's sessions do). Percentiles of a
        window do not add up, so the sum has none."""
        buckets: dict[str, int] = {}
        count, total = 0, 0.0
        for part in parts:
            for bound, n in part.buckets.items():
                buckets[bound] = buckets.get(bound, 0) + n
            count += part.count
            total += part.sum
        return HistogramSnapshot(buckets, count, total)


@dataclass(kw_only=True)
class SessionCounters:
    """The counters of one session (all only grow). Frame states: every emitted frame is exactly one of
    rendered / held / idle; `dropped` counts speech frames whose render was not ready by its tick
    (shown held or idle)."""

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
    audio_refused_chunks: int = 0    # pushes cut short or refused for that reason (logged rate-limited)
    segments: int = 0          # contiguous input runs (a new one starts after a stall or interrupt)
    stalls: int = 0            # segments ended because input stopped arriving
    live_trimmed_samples: int = 0  # pause samples of a live input not stored (delay a late burst added, given back)
    interrupts: int = 0

    def counts(self) -> dict[str, int]:
        """Every counter by name (the fields of SessionCounters, also when called on a subclass)."""
        return {f.name: getattr(self, f.name) for f in fields(SessionCounters)}

    def add(self, other: SessionCounters) -> None:
        """Add `other`'s counters to these, field by field."""
        for name, value in other.counts().items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class SessionMetrics(SessionCounters):
    """What a session updates as it runs: the counters, the A/V offset and the two histograms."""

    latency_buckets_ms: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_MS
    render_buckets_ms: tuple[float, ...] = DEFAULT_RENDER_BUCKETS_MS
    window: int = 4096

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


@dataclass(kw_only=True)
class SessionStats(SessionCounters):
    """`LipSyncSession.metrics()`: a snapshot of the counters and histograms, and the session's setup."""

    av_offset_ms: float
    av_offset_max_abs_ms: float
    latency_ms: HistogramSnapshot    # audio in to mouth on screen, per rendered frame
    render_ms: HistogramSnapshot     # renderer time per frame
    name: str
    renderer: str | None             # the render worker's renderer; None without a worker
    fps: float
    latency_budget_ms: float         # the fixed A/V delay L
    lookahead_ms: float
    utterance_delay_ms: float | None  # the latest utterance's delay (L, or less for audio already here); None: none yet
    quick_starts: int                # utterances started with less than L (their audio was already here)
    delay_frames: int
    batch_frames: int
    buffered_input_ms: float         # pushed input not yet played
    live_jitter_ms: float | None = None   # a live input's arrival-lateness spread lately (None: no live input)
    live_margin_ms: float | None = None   # the delay its placement had to spare lately (timeline/live_arrival.py)

    @staticmethod
    def of(metrics: SessionMetrics, *, name: str, renderer: str | None, fps: float, latency_budget_ms: float,
           lookahead_ms: float, utterance_delay_ms: float | None, quick_starts: int, delay_frames: int,
           batch_frames: int, buffered_input_ms: float, live_jitter_ms: float | None = None,
           live_margin_ms: float | None = None) -> SessionStats:
        return SessionStats(**metrics.counts(), av_offset_ms=metrics.av_offset_ms,
                            av_offset_max_abs_ms=metrics.av_offset_max_abs_ms,
                            latency_ms=metrics.latency_ms.snapshot(), render_ms=metrics.render_ms.snapshot(),
                            name=name, renderer=renderer, fps=fps, latency_budget_ms=latency_budget_ms,
                            lookahead_ms=lookahead_ms, utterance_delay_ms=utterance_delay_ms,
                            quick_starts=quick_starts, delay_frames=delay_frames, batch_frames=batch_frames,
                            buffered_input_ms=buffered_input_ms, live_jitter_ms=live_jitter_ms,
                            live_margin_ms=live_margin_ms)


@dataclass(frozen=True)
class WorkerStats:
    """`RenderWorker.stats()`: one render worker's totals (or several workers' combined)."""

    renderer: str
    batches: int = 0              # renderer calls
    frames_rendered: int = 0      # mouths rendered
    frames_skipped: int = 0       # jobs dropped: past their deadline
    errors: int = 0               # renderer calls that failed
    queued: int = 0               # jobs waiting now
    busy_s: float = 0.0           # time spent in the renderer
    est_ms_per_frame: float | None = None  # the scheduler's cost estimate per frame (None: nothing seen)
    alive: bool = True            # the render thread runs (a dead one is restarted; meanwhile False)
    restarts: int = 0             # render thread restarts since start
    mean_batch: float = field(init=False)  # frames per renderer call

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_batch", self.frames_rendered / self.batches if self.batches else 0.0)

    @staticmethod
    def combined(parts: Sequence[WorkerStats]) -> WorkerStats:
        """Several workers as one: counts added, the mean of the cost estimates, the first's renderer."""
        estimates = [p.est_ms_per_frame for p in parts if p.est_ms_per_frame is not None]
        return WorkerStats(
            renderer=parts[0].renderer if parts else "", batches=sum(p.batches for p in parts),
            frames_rendered=sum(p.frames_rendered for p in parts),
            frames_skipped=sum(p.frames_skipped for p in parts), errors=sum(p.errors for p in parts),
            queued=sum(p.queued for p in parts), busy_s=sum(p.busy_s for p in parts),
            est_ms_per_frame=sum(estimates) / len(estimates) if estimates else None,
            alive=all(p.alive for p in parts), restarts=sum(p.restarts for p in parts))
