"""The engine as the server sees it: shared heavy objects (avatar, renderer, render worker) loaded once,
handing out one `LipSyncSession` per WebRTC session.

`server.realtime_engine.load_engine(config)` builds the real one from `realtime/`; tests hand `create_app`
any object with the same shape (`Engine` protocol), so the server never reaches the model through globals.
`EngineSession` is the one description of what the server (its tracks, audio input and session manager)
needs of a session; mypy checks that `realtime.session.LipSyncSession` provides it (through `load_engine`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from realtime.metrics import SessionStats, WorkerStats
from realtime.session import VideoOut

log = logging.getLogger(__name__)


class EngineSession(Protocol):
    """The calls the server makes on a realtime.session.LipSyncSession. Each returns immediately."""

    def push_audio(self, samples: np.ndarray, sample_rate: int, channels: int = 1, *,
                   utterance: str | None = None) -> int: ...  # its input position; utterance: for the playback events

    def next_video_frame(self) -> VideoOut: ...  # .image (H, W, 3) BGR uint8

    def next_audio(self, n_samples: int) -> np.ndarray: ...  # float32 16 kHz mono

    def interrupt(self) -> None: ...

    def end_of_audio(self) -> None: ...  # the pushed utterance is complete

    def metrics(self) -> SessionStats: ...

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


def engine_health(engine: Any) -> EngineHealth:
    """`engine.health()` when the engine reports it (test doubles may not): healthy otherwise."""
    health = getattr(engine, "health", None)
    return health() if callable(health) else EngineHealth()


class Engine(Protocol):
    fps: float
    info: dict[str, str]  # what was loaded, for logs and /healthz

    def open_session(self, options: dict, name: str = "") -> EngineSession: ...  # ValueError: bad options

    def metrics(self) -> EngineStats: ...

    def close(self) -> None: ...
