"""ServerState: what the request handlers share, stored once on the aiohttp app under STATE."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from server.access.auth import OperatorAuth
from server.access.capacity import CapacityMonitor
from server.access.limits import ClientLimits, WorkPool, started_pool
from server.access.stream_limits import StreamSlots
from server.config import ServerConfig
from server.engine import Engine
from server.errors import ApiError
from server.ops.loop_monitor import LoopLagMonitor
from server.ops.prometheus import Histogram
from server.ops.worker_board import WorkerSeat
from server.ops.worker_peers import WorkerPeers
from server.routes.tts import LocalTts
from server.sessions import Session, SessionManager, UnknownSession

OFFER_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # time to answer an offer (/metrics)


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    sessions: SessionManager
    tts: LocalTts
    operator: OperatorAuth
    pool: WorkPool  # upload decodes and TTS, never asyncio's default executor
    limits: ClientLimits
    streams: StreamSlots  # open event streams and /stream WebSockets (server/access/stream_limits.py)
    started: float = field(default_factory=time.monotonic)
    offer_seconds: Histogram = field(default_factory=lambda: Histogram(OFFER_BUCKETS_S))
    requests_failed: dict[int, int] = field(default_factory=dict)
    closing: bool = False
    # Draining (SIGTERM, server/runner.py): no new sessions; live ones run until this monotonic time.
    drain_until: float | None = None
    loop_lag: LoopLagMonitor = field(default_factory=LoopLagMonitor)
    # Compositing and colour conversion of every session's video frames (server/media/tracks.py), off the loop
    # and apart from aiortc's encoders (the default executor) and upload decodes.
    frame_pool: ThreadPoolExecutor = field(default_factory=lambda: started_pool(2, "frame-prep"))
    # With --workers N: this process's row on the board the front-ends share (server/ops/worker_board.py),
    # and its way to ask the other workers for the server-wide answers (server/ops/worker_peers.py).
    seat: WorkerSeat | None = None
    peers: WorkerPeers | None = None
    # Live session costs and late ticks into the admission model (server/access/capacity.py).
    capacity_monitor: CapacityMonitor = field(init=False)

    def __post_init__(self) -> None:
        self.capacity_monitor = CapacityMonitor(self.sessions.capacity, self.sessions.ticks)


    def free_slots(self) -> int:
        """Offers the server admits now: this process's, plus (with --workers) the other workers' rows,
        capped by what the shared cores still take (each worker's row counts the same cores)."""
        own = self.sessions.free_slots()
        if self.seat is None:
            return own
        others = [r for r in self.seat.board.rows() if r.index != self.seat.index and r.ready]
        total = own + sum(r.free_slots for r in others)
        room = self.sessions.capacity.shared_room(self.sessions.held)
        return total if room is None else min(total, room)

    def sessions_total(self) -> int:
        """Live and negotiating sessions of the whole server (with --workers, every ready worker's row)."""
        own = self.sessions.held
        if self.seat is None:
            return own
        return own + self.seat.others_sessions()

    @property
    def draining(self) -> bool:
        return self.drain_until is not None

    def notice(self) -> dict[str, Any] | None:
        """What a live session's page is told while the server drains (GET /sessions/{id})."""
        if self.drain_until is None:
            return None
        return {"type": "server_restarting", "message": "the server is restarting",
                "ends_in_s": round(max(self.drain_until - time.monotonic(), 0.0), 1)}


STATE = web.AppKey("state", ServerState)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]


def session_of(request: web.Request) -> Session:
    """The session named by the route's {id}; 404 when there is none."""
    try:
        return state_of(request).sessions.get(request.match_info["id"])
    except UnknownSession as exc:
        raise ApiError(404, str(exc)) from None
