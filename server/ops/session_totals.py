"""The engine figures of sessions that have ended, kept for the server-wide totals on /metrics."""
from __future__ import annotations

from realtime.metrics import HistogramSnapshot, SessionCounters, SessionStats


class SessionTotals:
    """Ended sessions' counters (every SessionCounters field, summed) and latency / render histograms."""

    def __init__(self) -> None:
        self.counters = SessionCounters()
        self.latency_ms = HistogramSnapshot()
        self.render_ms = HistogramSnapshot()

    def add(self, stats: SessionStats) -> None:
        self.counters.add(stats)
        self.latency_ms = HistogramSnapshot.merge([self.latency_ms, stats.latency_ms])
        self.render_ms = HistogramSnapshot.merge([self.render_ms, stats.render_ms])
