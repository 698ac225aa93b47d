"""The engine as the server sees it: shared heavy objects (avatar, renderer, render worker) loaded once,
handing out one `LipSyncSession` per WebRTC session.

`server.realtime_engine.load_engine(config)` builds the real one from `realtime/`; `create_app` takes any
object that provides the `Engine` protocol, so the server never reaches the model through globals. The
protocols declare everything the server uses: mypy checks it, nothing is probed at run time.
`EngineSession` is the one description of what the server (its tracks, audio input and session manager)
needs of a session; mypy checks that `realtime.timeline.session.LipSyncSession` provides it (through `load_engine`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from realtime.avatars.avatar_library import AvatarLibrary
from realtime.metrics import SessionStats, WorkerStats
from realtime.timeline.playback import PlaybackTracker
from realtime.timeline.session import VideoOut
from realtime.timeline.session_options import SessionOptions

log = logging.getLogger(__name__)


class EngineSession(Protocol):
    """What the server uses of a realtime.timeline.session.LipSyncSession. Each call returns immediately."""

    avatar_id: str                 # its avatar's id in the engine's library
    playback: PlaybackTracker      # utterance events and queued audio on the output timeline

    @property
    def fps(self) -> float: ...    # its avatar's

    @property
    def latency_ms(self) -> float: ...  # the fixed delay from audio in to the same audio (and mouth) out

    def push_audio(self, samples: np.ndarray, sample_rate: int, channels: int = 1, *,
                   utterance: str | None = None, live: bool = False) -> int: ...
    # its input position; utterance: for the playback events; live: a real-time capture (the microphone)

    def next_video_frame(self) -> VideoOut: ...  # .image (H, W, 3) BGR uint8

    def next_audio(self, n_samples: int) -> np.ndarray: ...  # float32 16 kHz mono

    def interrupt(self) -> None: ...

    def end_of_audio(self) -> None: ...  # the pushed utterance is complete

    def metrics(self) -> SessionStats: ...

    def frames_dropped(self) -> int: ...  # metrics().frames_dropped, without building the rest

    def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerLoad:
    """One render worker (one per device) and the sessions placed on it."""

    worker: int
    device: str
    sessions: int
    stats: WorkerStats


@dataclass(frozen=True)
class EngineStats:
    """`Engine.metrics()`: all render workers together, and each one."""

    total: WorkerStats            # counts added over the workers (WorkerStats.combined)
    sessions: int                 # open sessions, all workers
    workers: tuple[WorkerLoad, ...]


@dataclass(frozen=True)
class EngineHealth:
    """Whether every render worker thread runs (one that died is restarted; until then: degraded)."""

    workers_down: list[str] = field(default_factory=list)  # names of render threads not running now
    restarts: int = 0  # render thread restarts since start

    @property
    def ok(self) -> bool:
        return not self.workers_down


class Engine(Protocol):
    """What the server uses of its engine (server.realtime_engine.RealtimeEngine provides it)."""

    fps: float            # the default avatar's (a session's own: EngineSession.fps)
    info: dict[str, str]  # what was loaded, for logs and /healthz
    avatars: AvatarLibrary  # the server's avatars by id (GET/POST /avatars, offers' options.avatar)

    # UnknownAvatar / AvatarNotReady for options.avatar; ValueError: valid options it cannot serve.
    def open_session(self, options: SessionOptions, name: str = "") -> EngineSession: ...

    def metrics(self) -> EngineStats: ...

    def health(self) -> EngineHealth: ...

    def close(self) -> None: ...
