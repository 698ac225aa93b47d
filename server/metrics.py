"""The /metrics page: live sessions, the render worker and ended sessions, in Prometheus text.

The page is built on request from the live objects (SessionManager, the engine, the histograms the
handlers feed), so there is no second copy of the state to keep in step.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Mapping

from server.prometheus import Page, merge_histograms

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

SESSION_COUNTERS = {  # engine counter -> (metric name, help)
    "frames_rendered": ("lipsync_session_frames_rendered_total", "Frames showing a freshly rendered mouth."),
    "frames_dropped": ("lipsync_session_frames_dropped_total",
                       "Speech frames whose render missed its tick (held or idle mouth shown)."),
    "frames_held": ("lipsync_session_frames_held_total", "Frames re-showing the last mouth."),
    "frames_starved": ("lipsync_session_frames_starved_total", "Frames whose audio arrived too late."),
    "audio_underrun_samples": ("lipsync_session_audio_underrun_samples_total",
                               "Output samples of an open utterance whose input had not arrived."),
    "interrupts": ("lipsync_session_interrupts_total", "Interrupts."),
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

    now = time.monotonic()
    for session, metrics in live:
        labels = {"session": session.id}
        page.gauge("lipsync_session_fps", "Video frames sent per second (last 2 s).",
                   round(session.video.stats.fps(now), 3), labels)
        page.counter("lipsync_session_frames_total", "Video frames sent.", session.video.stats.frames,
                     labels)
        page.counter("lipsync_session_pacer_skipped_total", "Video ticks skipped by a late sender.",
                     session.video.stats.skipped, labels)
        for key, (name, help_text) in SESSION_COUNTERS.items():
            page.counter(name, help_text, _num(metrics.get(key)), labels)
        page.gauge("lipsync_session_av_offset_milliseconds",
                   "A/V offset of the last speech frame from its timestamps (engine).",
                   _num(metrics.get("av_offset_ms")), labels)
        page.gauge("lipsync_session_av_offset_max_abs_milliseconds", "Largest |A/V offset| so far.",
                   _num(metrics.get("av_offset_max_abs_ms")), labels)
        page.gauge("lipsync_session_pacer_av_offset_seconds",
                   "Video hand-over lateness minus audio hand-over lateness (sender side).",
                   session.pacer_av_offset_s(), labels)
        page.gauge("lipsync_session_latency_budget_milliseconds", "The session's fixed A/V delay.",
                   _num(metrics.get("latency_budget_ms")), labels)
        page.gauge("lipsync_session_audio_queued_seconds", "Pushed audio not played yet.",
                   session.input.queued_s, labels)
        if isinstance(metrics.get("latency_ms"), Mapping):
            page.cumulative_histogram("lipsync_session_latency_milliseconds",
                                      "Audio in to mouth on screen (server side), per rendered frame.",
                                      metrics["latency_ms"], labels)
    return page.render()


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
