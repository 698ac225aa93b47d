"""The statistics dataclasses (realtime/metrics.py, server/engine.py) and the /metrics tables over them."""
from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest

from realtime.metrics import (
    Histogram,
    HistogramSnapshot,
    SessionCounters,
    SessionMetrics,
    SessionStats,
    WorkerStats,
)
from server.ops import metrics as page
from server.ops.session_totals import SessionTotals


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def stats_of(metrics: SessionMetrics, name: str = "s") -> SessionStats:
    return SessionStats.of(metrics, name=name, renderer="r", fps=25.0, latency_budget_ms=320.0,
                           lookahead_ms=200.0, utterance_delay_ms=None, quick_starts=0, delay_frames=8,
                           batch_frames=1, buffered_input_ms=0.0)


def test_the_metrics_page_reads_only_existing_fields():
    """The /metrics tables name dataclass fields (one list of names: the dataclasses')."""
    assert set(page.SERVER_COUNTERS) <= field_names(SessionCounters)
    assert set(page.SESSION_COUNTERS) <= field_names(SessionStats)
    assert set(page.WORKER_METRICS) <= field_names(WorkerStats)


def test_counters_add_field_by_field_and_snapshots_copy_them():
    metrics = SessionMetrics()
    for i, f in enumerate(fields(SessionCounters)):
        setattr(metrics, f.name, i + 1)
    metrics.observe_av_offset(-3.0)
    stats = stats_of(metrics)
    assert stats.counts() == metrics.counts() == {f.name: i + 1 for i, f in enumerate(fields(SessionCounters))}
    assert stats.av_offset_ms == -3.0 and stats.av_offset_max_abs_ms == 3.0
    metrics.frames += 100
    assert stats.frames == 1  # a snapshot, not a view
    total = SessionCounters()
    total.add(stats)
    total.add(stats)
    assert total.counts() == {name: 2 * v for name, v in stats.counts().items()}


def test_histogram_snapshots_merge():
    a, b = Histogram((10.0, 20.0)), Histogram((10.0, 20.0))
    for v in (5.0, 15.0, 25.0):
        a.observe(v)
    b.observe(12.0)
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.buckets == {"10": 1, "20": 2, "+Inf": 3} and sa.count == 3 and sa.sum == 45.0
    assert sa.p50 == pytest.approx(15.0)
    merged = HistogramSnapshot.merge([sa, sb, HistogramSnapshot()])
    assert merged.buckets == {"10": 1, "20": 3, "+Inf": 4} and merged.count == 4 and merged.sum == 57.0
    assert merged.p50 is None  # window percentiles do not add up


def test_ended_sessions_add_up():
    one, two = SessionMetrics(), SessionMetrics()
    one.frames, two.frames, two.frames_dropped = 10, 5, 2
    one.latency_ms.observe(100.0)
    two.latency_ms.observe(300.0)
    totals = SessionTotals()
    totals.add(stats_of(one))
    totals.add(stats_of(two))
    assert totals.counters.frames == 15 and totals.counters.frames_dropped == 2
    assert totals.latency_ms.count == 2 and totals.latency_ms.sum == 400.0
    assert totals.render_ms.count == 0


def test_worker_stats_combine():
    a = WorkerStats("r0", batches=2, frames_rendered=6, frames_skipped=1, errors=0, queued=3, busy_s=0.5,
                    est_ms_per_frame=10.0)
    b = WorkerStats("r1", batches=1, frames_rendered=1, errors=1, busy_s=0.25)
    assert a.mean_batch == 3.0 and b.mean_batch == 1.0
    both = WorkerStats.combined([a, b])
    assert (both.renderer, both.batches, both.frames_rendered, both.frames_skipped, both.errors, both.queued,
            both.busy_s, both.est_ms_per_frame) == ("r0", 3, 7, 1, 1, 3, 0.75, 10.0)
    assert both.mean_batch == pytest.approx(7 / 3)


def test_session_stats_are_the_json_the_page_reads():
    """GET /sessions/{id} sends asdict(stats) as "engine"; client_web/app.js reads these keys."""
    metrics = SessionMetrics()
    metrics.latency_ms.observe(250.0)
    data = json.loads(json.dumps(asdict(stats_of(metrics))))
    assert data["frames_dropped"] == 0 and data["latency_budget_ms"] == 320.0
    assert data["latency_ms"]["p50"] == 250.0 and data["latency_ms"]["buckets"]["+Inf"] == 1
