"""The /metrics page: live sessions, the render worker and ended sessions, in Prometheus text.

The page is built on request from the live objects (SessionManager, the engine, the histograms the
handlers feed), so there is no second copy of the state to keep in step. The engine's figures arrive as
dataclasses (realtime/metrics.py SessionStats and WorkerStats, server/engine.py EngineStats); the tables
below map some of their fields (by field name, checked by tests/test_stats.py) to metric names.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

from realtime.metrics import HistogramSnapshot, SessionCounters, SessionStats
from server.engine import EngineStats, WorkerLoad
from server.ops.loop_monitor import live_tasks
from server.ops.prometheus import Histogram, Page, merge_pages
from server.sessions import Session, safe_metrics
from server.state import ServerState

log = logging.getLogger(__name__)

SERVER_COUNTERS = ("frames", "frames_rendered", "frames_dropped", "frames_starved")  # SessionCounters fields

# SessionStats field -> (metric name, help): summed over live sessions as gauges (they fall when a
# session ends), no labels.
SESSION_COUNTERS = {
    "frames_rendered": ("lipsync_live_frames_rendered", "Frames showing a freshly rendered mouth."),
    "frames_dropped": ("lipsync_live_frames_dropped",
                       "Speech frames whose render missed its tick (held or idle mouth shown)."),
    "frames_held": ("lipsync_live_frames_held", "Frames re-showing the last mouth."),
    "frames_starved": ("lipsync_live_frames_starved", "Frames whose audio arrived too late."),
    "audio_underrun_samples": ("lipsync_live_audio_underrun_samples",
                               "Output samples of an open utterance whose input had not arrived."),
    "interrupts": ("lipsync_live_interrupts", "Interrupts."),
}


def render_metrics(state: ServerState) -> str:
    page = Page()
    sessions = state.sessions
    live = [(s, safe_metrics(s.engine)) for s in sessions]
    stats = [m for _, m in live if m is not None]
    page.gauge("lipsync_up", "1 while the server accepts sessions.", 0 if state.closing or state.draining else 1)
    page.gauge("lipsync_render_workers_down", "Render threads down now (restart pending; /healthz degraded).",
               len(state.engine.health().workers_down))
    page.gauge("lipsync_sessions", "Live sessions.", len(live))
    page.gauge("lipsync_sessions_max", "Sessions admitted now: the measured capacity, capped by --max-sessions "
               "(server/access/capacity.py).", sessions.max_sessions)
    page.gauge("lipsync_free_slots", "Offers that would be admitted now.", sessions.free_slots())
    cost = sessions.capacity.cost()
    if cost is not None:
        page.gauge("lipsync_session_cpu_ms_per_frame", "CPU per video frame of one session, as admission "
                   "counts it (start-up probe, raised by live measurements).", cost.cpu_ms)
        page.gauge("lipsync_session_loop_ms_per_frame", "Of it on the event loop.", cost.loop_ms)
    page.gauge("lipsync_admission_overloaded", "1 while late video ticks hold admission at the live count.",
               int(sessions.capacity.overloaded()))
    page.counter("lipsync_sessions_opened_total", "Sessions opened.", sessions.opened_total)
    page.counter("lipsync_sessions_rejected_total", "Offers refused because the server was full.",
                 sessions.rejected_total)
    for reason, count in sorted(sessions.closed_total.items()):
        page.counter("lipsync_sessions_closed_total", "Sessions closed, by reason.", count,
                     {"reason": reason})
    page.histogram("lipsync_offer_seconds", "Time to answer an offer.", state.offer_seconds)
    page.cumulative_histogram("lipsync_event_loop_lag_seconds",
                              "How late the event loop ran a due timer (sampled every 50 ms).",
                              state.loop_lag.lag.snapshot())
    page.gauge("lipsync_event_loop_lag_p99_seconds", "p99 of the event-loop lag over the last minute.",
               state.loop_lag.p99_s())
    page.gauge("lipsync_event_loop_lag_max_seconds", "Worst event-loop lag over the last minute (a freeze "
               "is one sample: the p99 does not show it).", state.loop_lag.max_s())
    page.counter("lipsync_event_loop_stalls_total", "Event-loop lags over 250 ms (every session stood still).",
                 state.loop_lag.stalls_total)
    page.gauge("lipsync_asyncio_tasks", "Live asyncio tasks on the server's loop.", live_tasks())
    page.gauge("lipsync_streams_open", "Event streams and /stream WebSockets open.", state.streams.total)
    page.gauge("lipsync_streams_max", "Server-wide cap on open streams.", state.streams.server_cap)
    page.counter("lipsync_streams_displaced_total", "Streams closed for a newer one of the same session.",
                 state.streams.displaced_total)
    page.counter("lipsync_streams_refused_total", "Streams refused with 429 (server-wide cap, or a session's "
                 "replaced streams still closing).", state.streams.refused_total)

    # Server-wide engine figures: ended sessions plus live ones.
    retired = sessions.retired
    totals = SessionCounters()
    for counters in (retired.counters, *stats):
        totals.add(counters)
    for name in SERVER_COUNTERS:
        page.counter(f"lipsync_{name}_total", f"Video frames ({name.replace('_', ' ')}), all sessions.",
                     getattr(totals, name))
    page.counter("lipsync_audio_refused_chunks_total", "Pushed audio chunks cut short or refused because a "
                 "session's input buffer was full (a source faster than real time), all sessions.",
                 totals.audio_refused_chunks)
    page.counter("lipsync_audio_refused_samples_total", "Input samples refused that way, all sessions.",
                 totals.audio_refused_samples)
    page.cumulative_histogram(
        "lipsync_latency_milliseconds",
        "Audio in to mouth on screen (server side), per rendered frame, all sessions.",
        HistogramSnapshot.merge([retired.latency_ms, *(m.latency_ms for m in stats)]))
    page.cumulative_histogram(
        "lipsync_render_milliseconds", "Renderer time per frame, all sessions.",
        HistogramSnapshot.merge([retired.render_ms, *(m.render_ms for m in stats)]))

    engine = _engine_stats(state)
    if engine is not None:
        for key, (name, help_text, kind) in WORKER_METRICS.items():
            stat = getattr(engine.total, key)
            if stat is not None:
                (page.counter if kind == "counter" else page.gauge)(name, help_text, stat)
        _per_worker(page, engine.workers)

    _live_sessions(page, live)
    return page.render()


SESSION_FPS_BUCKETS = (5.0, 10.0, 15.0, 20.0, 22.0, 24.0, 26.0, 30.0)


def _live_sessions(page: Page, live: list[tuple[Session, SessionStats | None]]) -> None:
    """Live sessions in aggregate. No series carries a session label: ids are secrets' neighbours (an
    id plus a leaked token is a session), and per-session series grow without bound. Per-session
    detail is GET /sessions/{id}."""
    now = time.monotonic()
    stats = [m for _, m in live if m is not None]
    fps = Histogram(SESSION_FPS_BUCKETS)
    for session, _ in live:
        fps.observe(session.video.stats.fps(now))
    page.histogram("lipsync_live_session_fps", "Video frames sent per second (last 2 s), one "
                   "observation per live session at scrape time.", fps)
    page.gauge("lipsync_live_video_frames", "Video frames sent by the live sessions.",
               sum(s.video.stats.frames for s, _ in live))
    page.gauge("lipsync_live_pacer_skipped", "Video ticks skipped by a late sender, live sessions.",
               sum(s.video.stats.skipped for s, _ in live))
    page.gauge("lipsync_live_audio_pacer_skipped", "Audio frames (20 ms) skipped by a late sender, live "
               "sessions.", sum(s.audio.stats.skipped for s, _ in live))
    for key, (name, help_text) in SESSION_COUNTERS.items():
        page.gauge(name, f"{help_text} Live sessions, summed.", sum(getattr(m, key) for m in stats))
    page.gauge("lipsync_live_av_offset_max_abs_milliseconds", "Largest |A/V offset| of any live session.",
               max((abs(m.av_offset_max_abs_ms) for m in stats), default=0))
    page.gauge("lipsync_live_pacer_av_offset_max_abs_seconds",
               "Largest |video minus audio hand-over lateness| of any live session.",
               max((abs(s.pacer_av_offset_s()) for s, _ in live), default=0.0))
    page.gauge("lipsync_live_audio_queued_seconds", "Pushed audio not played yet, live sessions summed.",
               sum(s.input.queued_s for s, _ in live))


WORKER_METRICS = {  # WorkerStats field -> (metric name, help, kind)
    "batches": ("lipsync_render_batches_total", "Renderer calls.", "counter"),
    "frames_rendered": ("lipsync_render_frames_total", "Mouths rendered.", "counter"),
    "frames_skipped": ("lipsync_render_skipped_total", "Render jobs skipped: past their deadline.",
                       "counter"),
    "errors": ("lipsync_render_errors_total", "Renderer calls that failed.", "counter"),
    "restarts": ("lipsync_render_thread_restarts_total", "Render threads that died and were restarted.",
                 "counter"),
    "busy_s": ("lipsync_render_busy_seconds_total", "Time spent in the renderer.", "counter"),
    "queued": ("lipsync_render_queue", "Render jobs waiting.", "gauge"),
    "mean_batch": ("lipsync_render_mean_batch", "Mean frames per renderer call.", "gauge"),
    "est_ms_per_frame": ("lipsync_render_estimated_milliseconds_per_frame",
                         "The scheduler's cost estimate per frame.", "gauge"),
}


def _per_worker(page: Page, workers: tuple[WorkerLoad, ...]) -> None:
    """One labelled series per render worker (one per GPU), families grouped as the text format wants.
    The unlabelled lipsync_render_* families above are the all-worker totals."""
    labelled = [(w, {"worker": str(w.worker), "device": w.device}) for w in workers]
    for w, labels in labelled:
        page.gauge("lipsync_worker_sessions", "Open sessions placed on this render worker.", w.sessions, labels)
    for key, (name, help_text, kind) in WORKER_METRICS.items():
        for w, labels in labelled:
            value = getattr(w.stats, key)
            if value is not None:
                (page.counter if kind == "counter" else page.gauge)(
                    name.replace("lipsync_render_", "lipsync_worker_", 1), f"{help_text} Per render worker.",
                    value, labels)


def _engine_stats(state: ServerState) -> EngineStats | None:
    try:
        return state.engine.metrics()
    except Exception:  # metrics must never take the page down
        log.exception("engine metrics failed")
        return None


# -- --workers N: one page for the whole server ---------------------------------------------------------------

# How a family combines over the worker processes (server/prometheus.merge_pages); unnamed ones are summed
# (counters, histograms, and the additive gauges: sessions, queues, streams, frames).
PROCESS_MERGE = {
    "lipsync_up": "min",                       # 0 while any worker drains or shuts down
    "lipsync_admission_overloaded": "max",
    "lipsync_session_cpu_ms_per_frame": "mean",
    "lipsync_session_loop_ms_per_frame": "mean",
    "lipsync_event_loop_lag_p99_seconds": "max",
    "lipsync_event_loop_lag_max_seconds": "max",
    "lipsync_render_mean_batch": "mean",
    "lipsync_render_estimated_milliseconds_per_frame": "mean",
    "lipsync_live_av_offset_max_abs_milliseconds": "max",
    "lipsync_live_pacer_av_offset_max_abs_seconds": "max",
    # Render worker 0 exists in every process: its series are told apart by a process label.
    "lipsync_worker_sessions": "per_process",
    **{name.replace("lipsync_render_", "lipsync_worker_", 1): "per_process" for name, _, _ in WORKER_METRICS.values()},
}


def render_server_metrics(state: ServerState, others: Sequence[tuple[int, str | None]]) -> str:
    """The page of a server of several worker processes, from this worker's own page and the others'
    (`others`: (worker, its page, None when it did not answer)): families merged by PROCESS_MERGE, the
    admission figures the whole server's (as /healthz says them), and per process whether its page is in
    the sums and its sessions."""
    assert state.seat is not None, "render_server_metrics is for a worker of --workers N"
    pages = [(str(state.seat.index), render_metrics(state))]
    pages += [(str(worker), text) for worker, text in others if text is not None]
    free = state.free_slots()
    merged = merge_pages(pages, PROCESS_MERGE, overrides={
        "lipsync_free_slots": free, "lipsync_sessions_max": state.sessions_total() + free})
    scraped = {int(process) for process, _ in pages}
    page = Page()
    rows = state.seat.board.rows()
    for row in rows:
        page.gauge("lipsync_process_scraped", "1 when this worker process's page is in the sums above (0: it "
                   "did not answer in time, or it is restarting).", int(row.index in scraped),
                   {"process": str(row.index)})
    for row in rows:
        page.gauge("lipsync_process_sessions", "Sessions of this worker process (its row on the workers' board).",
                   row.sessions if row.ready else 0, {"process": str(row.index)})
    return merged + page.render()
