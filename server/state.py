"""ServerState: what the request handlers share, stored once on the aiohttp app under STATE."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from server.config import ServerConfig
from server.engine import Engine
from server.loop_monitor import LoopLagMonitor
from server.metrics import OFFER_BUCKETS_S
from server.prometheus import Histogram
from server.sessions import SessionManager
from server.tts import LocalTts


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    sessions: SessionManager
    tts: LocalTts
    started: float = field(default_factory=time.monotonic)
    offer_seconds: Histogram = field(default_factory=lambda: Histogram(OFFER_BUCKETS_S))
    requests_failed: dict[int, int] = field(default_factory=dict)
    closing: bool = False
    loop_lag: LoopLagMonitor = field(default_factory=LoopLagMonitor)


STATE = web.AppKey("state", ServerState)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]
