"""The engine as the server sees it: shared heavy objects (avatar, renderer, render worker) loaded once,
handing out one `LipSyncSession` per WebRTC session.

`load_engine(config)` builds the real one from `realtime/`; tests hand `create_app` any object with the
same shape (`Engine` protocol), so the server never reaches the model through globals.
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from server.config import ServerConfig

log = logging.getLogger(__name__)


class EngineSession(Protocol):
    """The calls the server makes on a realtime.session.LipSyncSession."""

    def push_audio(self, samples: np.ndarray, sample_rate: int, channels: int = 1) -> int: ...

    def next_video_frame(self) -> Any: ...  # VideoOut: .image (H, W, 3) BGR uint8

    def next_audio(self, n_samples: int) -> np.ndarray: ...  # float32 16 kHz mono

    def interrupt(self) -> None: ...

    def end_of_audio(self) -> None: ...  # optional: the pushed utterance is complete

    def metrics(self) -> dict: ...

    def close(self) -> None: ...


class Engine(Protocol):
    fps: float
    info: dict[str, str]  # what was loaded, for logs and /healthz

    def open_session(self, options: dict, name: str = "") -> EngineSession: ...  # ValueError: bad options

    def metrics(self) -> dict: ...  # render worker totals (queue depth, batches, ...); "workers": one dict each

    def close(self) -> None: ...


def load_engine(config: ServerConfig) -> Engine:
    """Load avatar, renderer and worker as configured. Slow (model load, face detection): call it
    from a thread, not the event loop."""
    from server.realtime_engine import RealtimeEngine

    return RealtimeEngine.load(config)
