"""The /metrics page: live sessions, the render worker and ended sessions, in Prometheus text.

The page is built on request from the live objects (SessionManager, the engine, the histograms the
handlers feed), so there is no second copy of the state to keep in step.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Mapping

from server.prometheus import Histogram, Page, merge_histograms

if TYPE_CHECKING:
    from server.state import ServerState

log = logging.getLogger(__name__)

OFFER_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # time to answer an offer


class Totals:
    """Engine counters and histograms of sessions that have ended, kept for the server-wide figures."""

    COUNTERS = ("frames", "frames_rendered", "frames_held", "frames_idle", "frames_dropped",
                "frames_starved", "audio_in_samples", "audio_out_samples", "audio_underrun_samples",
                "interrupts")
    HISTOGRAMS = ("latency_ms", "render_ms")

    def __init__(self) -> None:
        self.counters: dict[str, float] = {name: 0 for name in self.COUNTERS}
        self.histograms: dict[str, dict] = {name: merge_histograms([]) for name in self.HISTOGRAMS}

    def add(self, metrics: Mapping) -> None:
        for name in self.COUNTERS:
            value = metrics.get(name)
            if isinstance(value, (int, float)):
                self.counters[name] += value
        for name in self.HISTOGRAMS:
            if isinstance(metrics.get(name), Mapping):
                self.histograms[name] = merge_histograms([self.histograms[name], metrics[name]])


# -- the /metrics page -------------------------------------------------------------------------------

# engine counter -> (metric name, help): summed over live sessions as gauges (they fall when a session
# ends), no labels.
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


def render_metrics(state: "ServerState") -> str:
    page = Page()
    sessions = state.sessions
    live = [(s, _engine_metrics(s.engine)) for s in sessions]
    page.gauge("lipsync_up", "1 while the server accepts sessions.", 0 if state.closing else 1)
    page.gauge("lipsync_sessions", "Live sessions.", len(live))
    page.gauge("lipsync_sessions_max", "The --max-sessions limit.", sessions.max_sessions)
    page.counter("lipsync_sessions_opened_total", "Sessions opened.", sessions.opened_total)
    page.counter("lipsync_sessions_rejected_total", "Offers refused because the server was full.",
                 sessions.rejected_total)
    for reason, count in sorted(sessions.closed_total.items()):
        page.counter("lipsync_sessions_closed_total", "Sessions closed, by reason.", count,
                     {"reason": reason})
    page.histogram("lipsync_offer_seconds", "Time to answer an offer.", state.offer_seconds)

    # Server-wide engine figures: ended sessions plus live ones.
    retired = sessions.retired
    for name in ("frames", "frames_rendered", "frames_dropped", "frames_starved"):
        value = retired.counters[name] + sum(_num(m.get(name)) for _, m in live)
        page.counter(f"lipsync_{name}_total", f"Video frames ({name.replace('_', ' ')}), all sessions.",
                     value)
    page.cumulative_histogram(
        "lipsync_latency_milliseconds",
        "Audio in to mouth on screen (server side), per rendered frame, all sessions.",
        merge_histograms([retired.histograms["latency_ms"], *(m.get("latency_ms") for _, m in live)]))
    page.cumulative_histogram(
        "lipsync_render_milliseconds", "Renderer time per frame, all sessions.",
        merge_histograms([retired.histograms["render_ms"], *(m.get("render_ms") for _, m in live)]))

    worker = _worker_metrics(state)
    for key, (name, help_text, kind) in WORKER_METRICS.items():
        stat = worker.get(key)
        if isinstance(stat, (int, float)) and not isinstance(stat, bool):
            (page.counter if kind == "counter" else page.gauge)(name, help_text, stat)
    _per_worker(page, worker.get("workers"))

    _live_sessions(page, live)
    return page.render()


SESSION_FPS_BUCKETS = (5.0, 10.0, 15.0, 20.0, 22.0, 24.0, 26.0, 30.0)


def _live_sessions(page: Page, live: list) -> None:
    """Live sessions in aggregate. No series carries a session label: ids are secrets' neighbours (an
    id plus a leaked token is a session), and per-session series grow without bound. Per-session
    detail is GET /sessions/{id}."""
    now = time.monotonic()
    fps = Histogram(SESSION_FPS_BUCKETS)
    for session, _ in live:
        fps.observe(session.video.stats.fps(now))
    page.histogram("lipsync_live_session_fps", "Video frames sent per second (last 2 s), one "
                   "observation per live session at scrape time.", fps)
    page.gauge("lipsync_live_video_frames", "Video frames sent by the live sessions.",
               sum(s.video.stats.frames for s, _ in live))
    page.gauge("lipsync_live_pacer_skipped", "Video ticks skipped by a late sender, live sessions.",
               sum(s.video.stats.skipped for s, _ in live))
    for key, (name, help_text) in SESSION_COUNTERS.items():
        page.gauge(name, f"{help_text} Live sessions, summed.", sum(_num(m.get(key)) for _, m in live))
    page.gauge("lipsync_live_av_offset_max_abs_milliseconds", "Largest |A/V offset| of any live session.",
               max((abs(_num(m.get("av_offset_max_abs_ms"))) for _, m in live), default=0))
    page.gauge("lipsync_live_pacer_av_offset_max_abs_seconds",
               "Largest |video minus audio hand-over lateness| of any live session.",
               max((abs(s.pacer_av_offset_s()) for s, _ in live), default=0.0))
    page.gauge("lipsync_live_audio_queued_seconds", "Pushed audio not played yet, live sessions summed.",
               sum(s.input.queued_s for s, _ in live))


WORKER_METRICS = {
    "batches": ("lipsync_render_batches_total", "Renderer calls.", "counter"),
    "frames_rendered": ("lipsync_render_frames_total", "Mouths rendered.", "counter"),
    "frames_skipped": ("lipsync_render_skipped_total", "Render jobs skipped: past their deadline.",
                       "counter"),
    "errors": ("lipsync_render_errors_total", "Renderer calls that failed.", "counter"),
    "busy_s": ("lipsync_render_busy_seconds_total", "Time spent in the renderer.", "counter"),
    "queued": ("lipsync_render_queue", "Render jobs waiting.", "gauge"),
    "mean_batch": ("lipsync_render_mean_batch", "Mean frames per renderer call.", "gauge"),
    "est_ms_per_frame": ("lipsync_render_estimated_milliseconds_per_frame",
                         "The scheduler's cost estimate per frame.", "gauge"),
}


def _per_worker(page: Page, workers) -> None:
    """One labelled series per render worker (one per GPU), families grouped as the text format wants.
    The unlabelled lipsync_render_* families above are the all-worker totals."""
    if not isinstance(workers, list) or not workers:
        return
    labelled = [(w, {"worker": str(w.get("worker", i)), "device": str(w.get("device", ""))})
                for i, w in enumerate(workers) if isinstance(w, Mapping)]
    for w, labels in labelled:
        page.gauge("lipsync_worker_sessions", "Open sessions placed on this render worker.",
                   _num(w.get("sessions")), labels)
    for key, (name, help_text, kind) in WORKER_METRICS.items():
        for w, labels in labelled:
            value = w.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                (page.counter if kind == "counter" else page.gauge)(
                    name.replace("lipsync_render_", "lipsync_worker_", 1), f"{help_text} Per render worker.",
                    value, labels)


def _num(value) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _engine_metrics(engine) -> dict:
    try:
        return dict(engine.metrics())
    except Exception:  # metrics must never take the page down
        log.exception("engine session metrics failed")
        return {}


def _worker_metrics(state: "ServerState") -> dict:
    try:
        return dict(state.engine.metrics())
    except Exception:
        log.exception("engine metrics failed")
        return {}
