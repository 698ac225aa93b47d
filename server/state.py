"""ServerState: what the request handlers share, stored once on the aiohttp app under STATE."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from server.auth import OperatorAuth
from server.config import ServerConfig
from server.engine import Engine
from server.limits import ClientLimits, WorkPool
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
    operator: OperatorAuth
    pool: WorkPool  # upload decodes and TTS, never asyncio's default executor
    limits: ClientLimits
    saying: set[str] = field(default_factory=set)  # session ids with a /say being synthesised
    started: float = field(default_factory=time.monotonic)
    offer_seconds: Histogram = field(default_factory=lambda: Histogram(OFFER_BUCKETS_S))
    requests_failed: dict[int, int] = field(default_factory=dict)
    closing: bool = False


STATE = web.AppKey("state", ServerState)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]
