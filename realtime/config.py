"""EngineConfig: every knob of the real-time engine in one dataclass.

The derived numbers (lookahead, the fixed A/V delay) live in `realtime.timeline.clock.Timeline`, computed once per
session from this config and the avatar's fps.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

# The engine's one audio rate: Wav2Lip's mel spectrogram is defined at 16 kHz, so input is resampled to it,
# the output audio tracks play it, and every sample index on the media clock counts at it.
SAMPLE_RATE = 16000

DEFAULT_LATENCY_BUCKETS_MS: tuple[float, ...] = (
    50, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600, 750, 1000, 1500, 2000, 5000,
)
DEFAULT_RENDER_BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True)
class EngineConfig:
    # Video clock. The avatar's own fps wins when it has one; this is the fallback.
    fps: float = 25.0

    # Latency budget (see realtime/timeline/clock.py): delay = mel lookahead + input jitter + compute budget,
    # fixed for the life of a session; rounded up to whole video frames unless the budget is fitted.
    compute_budget_frames: float = 1.5   # time a frame may take from "its audio is complete" to "shown"
    input_jitter_ms: float = 20.0        # allowance for chunked / jittery input (one 20 ms WebRTC frame)
    deadline_margin_ms: float = 5.0      # a render must finish this long before its tick
    fit_budget_to_renderer: bool = False  # at session start, size the compute budget from the worker's
                                         # measured per-frame cost (1.5x + 1 frame: less than the fixed
                                         # budget for a cheap renderer, more for a slow one, up to the cap
                                         # below); L is then exact, not rounded to frames
    max_compute_budget_ms: float = 1000.0
    batch_to_keep_up: bool = True        # with fit_budget_to_renderer: when one frame costs more than
                                         # batch_max_utilization x the frame period but a batch of k <=
                                         # max_batch does not (worker's warm-up cost curve), size the budget
                                         # for gathering k frames ((k-1) periods + 1.5 cost(k)) and let the
                                         # worker wait for them (deadline-aware batching)
    batch_max_utilization: float = 0.8   # a batch size is chosen only if cost(k) <= this x k periods
    stall_after_ms: float = 40.0         # input this late ends the current segment (flushes its mel);
                                         # raised automatically for sources pushing larger real-time chunks

    # Render worker (realtime/scheduling/scheduler.py).
    max_batch: int = 8                   # frames per renderer call
    max_batch_wait_ms: float = 10.0      # how long the worker may wait to fill a batch when slack allows

    # Speech / silence (realtime/audio/vad.py).
    vad_aggressiveness: int = 2          # webrtcvad mode 0..3
    vad_block_ms: int = 20               # 10, 20 or 30 (webrtcvad frame sizes)
    energy_gate_dbfs: float = -50.0      # blocks quieter than this are silence whatever webrtcvad says
    vad_hangover_ms: float = 120.0       # keep rendering this long after the last speech block

    # Look of onset / offset / overload.
    ramp_frames: int = 3                 # patch alpha ramps 0 -> 1 (and back) over this many frames
    max_hold_frames: int = 4             # a missed frame re-shows the last mouth at most this many times
    paste_mode: str = "feather"          # "feather" (soft lower-face mask) or "official" (hard paste)

    # Buffers and metrics.
    max_buffered_s: float = 300.0        # input audio held ahead of playback before the oldest is refused
    max_queued_utterances: int = 256     # named utterances queued or playing; push_audio raises QueueLimit
                                         # beyond (a chatbot queues a few sentences, not hundreds)
    max_queued_segments: int = 512       # contiguous input runs not yet planned (each end_of_audio or
                                         # stall starts one); push_audio raises QueueLimit beyond
    latency_buckets_ms: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_MS
    render_buckets_ms: tuple[float, ...] = DEFAULT_RENDER_BUCKETS_MS
    latency_window: int = 4096           # recent values kept for exact p50 / p95 / p99

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.vad_block_ms not in (10, 20, 30):
            raise ValueError(f"vad_block_ms must be 10, 20 or 30 (webrtcvad), got {self.vad_block_ms}")
        if not 0 <= self.vad_aggressiveness <= 3:
            raise ValueError(f"vad_aggressiveness must be 0..3, got {self.vad_aggressiveness}")
        if self.paste_mode not in ("feather", "official"):
            raise ValueError(f"paste_mode must be 'feather' or 'official', got {self.paste_mode!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.compute_budget_frames < 0 or self.input_jitter_ms < 0:
            raise ValueError("compute_budget_frames and input_jitter_ms must be >= 0")
        if not 0 < self.batch_max_utilization <= 1:
            raise ValueError(f"batch_max_utilization must be in (0, 1], got {self.batch_max_utilization}")
        if self.max_queued_utterances < 1 or self.max_queued_segments < 1:
            raise ValueError("max_queued_utterances and max_queued_segments must be >= 1")
        if self.ramp_frames < 1:
            raise ValueError(f"ramp_frames must be >= 1, got {self.ramp_frames}")

    def with_overrides(self, **overrides: Any) -> "EngineConfig":
        """A copy with some fields changed (unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown EngineConfig fields: {sorted(unknown)}")
        return replace(self, **overrides)


__all__ = ["DEFAULT_LATENCY_BUCKETS_MS", "DEFAULT_RENDER_BUCKETS_MS", "EngineConfig"]
