"""The aiohttp application: routes, JSON errors, operations endpoints, graceful shutdown.

`create_app(config, engine)` takes an already loaded engine (its avatars, renderers and render
workers for the whole server) and never loads anything itself; `server.runner.serve` does the loading.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from server.access.auth import Guard, OperatorAuth, client_address
from server.access.capacity import AUTO_SESSIONS_BOUND, CapacityModel, unmeasured_capacity
from server.access.limits import ClientLimits, WorkPool
from server.access.stream_limits import StreamSlots
from server.access.surface import add_security_headers, hide_server_version, public_text
from server.config import ServerConfig
from server.engine import Engine
from server.errors import json_errors
from server.media import encoders, opus_fec
from server.media.media_executor import limit_native_threads
from server.network.ice import client_ice_servers, new_ticket
from server.ops.heap import HeapTrimmer
from server.ops.metrics import render_metrics, render_server_metrics
from server.ops.prometheus import CONTENT_TYPE
from server.routes import avatars_api, events_api, push_api, signaling
from server.routes.tts import LocalTts
from server.sessions import SessionManager, UnknownSession
from server.state import STATE, ServerState, state_of

log = logging.getLogger(__name__)

CLIENT_DIR = Path(__file__).resolve().parent.parent / "client_web"


def create_app(config: ServerConfig, engine: Engine, capacity: CapacityModel | None = None) -> web.Application:
    """The app; every request goes through `json_errors` (JSON errors) and the access policy
    (server/access/auth.py: credentials, cross-site checks, body caps). `capacity`: the admission model with
    the session cost measured at start (runner.py); without one, `--max-sessions` (or the auto default)
    admits a fixed number (server/access/capacity.py)."""
    encoders.install()  # real-time H.264 / VP8 settings for every session's RTCRtpSender
    opus_fec.install()  # Opus in-band FEC offered; the microphone decoded with FEC and concealment
    limit_native_threads()  # OpenCV's calls in the threads that make them (server/media/media_executor.py)
    hide_server_version()  # no Python / aiohttp version in any answer (server/access/surface.py)
    if capacity is None:
        capacity = unmeasured_capacity(config, engine.fps)
    sessions = SessionManager(capacity, connect_timeout_s=config.connect_timeout_s,
                              peer_timeout_s=config.peer_timeout_s,
                              disconnect_grace_s=config.disconnect_grace_s, trimmer=HeapTrimmer())
    operator = OperatorAuth.from_config(config)
    guard = Guard(config, operator, session_token_of=lambda sid: _session_token(sessions, sid))
    app = web.Application(client_max_size=config.max_upload_bytes + 64 * 1024,
                          middlewares=[json_errors, guard.middleware])
    app[STATE] = ServerState(config=config, engine=engine, sessions=sessions,
                             tts=LocalTts(config.tts_command, timeout_s=config.say_timeout_s),
                             operator=operator, pool=WorkPool(config.max_concurrent_decodes, config.max_decodes_per_ip),
                             limits=ClientLimits(config.max_sessions_per_ip, config.max_offers_per_minute),
                             streams=StreamSlots(config.max_sessions or AUTO_SESSIONS_BOUND))
    for server in config.ice_servers:
        if server.credential is not None:
            log.warning("--ice-server %s has a static username and credential: every visitor receives "
                        "them from /config (an open relay for anyone); use --turn-secret and --turn-url "
                        "for short-lived TURN REST credentials", server.url)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/config", client_config)
    app.router.add_get("/ice-servers", client_ice_servers_now)
    app.router.add_post("/offer", signaling.handle_offer)
    push_api.add_routes(app)
    events_api.add_routes(app)
    avatars_api.add_routes(app)
    app.router.add_static("/static/", CLIENT_DIR, show_index=False)
    app.on_response_prepare.append(guard.add_cors_headers)
    app.on_response_prepare.append(add_security_headers)
    app.on_startup.append(_start_monitors)
    app.on_shutdown.append(_close_sessions)
    app.on_cleanup.append(_close_pool)
    app.on_cleanup.append(_stop_monitors)
    return app


def _session_token(sessions: SessionManager, session_id: str) -> str | None:
    try:
        return sessions.get(session_id).token
    except UnknownSession:
        return None


async def _close_pool(app: web.Application) -> None:
    app[STATE].pool.close()


async def _start_monitors(app: web.Application) -> None:
    app[STATE].loop_lag.start()
    app[STATE].capacity_monitor.start()


async def _stop_monitors(app: web.Application) -> None:
    await app[STATE].loop_lag.stop()
    await app[STATE].capacity_monitor.stop()
    app[STATE].sessions.trimmer.close()
    app[STATE].frame_pool.shutdown(wait=False, cancel_futures=True)


async def _close_sessions(app: web.Application) -> None:
    state = app[STATE]
    state.closing = True
    count = len(state.sessions)
    await state.sessions.close_all("shutdown")
    if count:
        log.info("closed %d session(s) on shutdown", count)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(CLIENT_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def client_config(request: web.Request) -> web.Response:
    """What the page needs before it makes an offer."""
    state = state_of(request)
    return web.json_response({
        "ice_servers": client_ice_servers(state.config),  # --ice-server only: TURN REST is /ice-servers
        "turn": bool(state.config.turn_secret),
        "say": state.tts.available,
        "fps": state.engine.fps,
        "avatar": _default_avatar_id(state.engine),
        "renderer": state.engine.info.get("renderer", ""),
        "runtime": state.engine.info.get("runtime", ""),      # Wav2Lip only: openvino / torch
        "precision": state.engine.info.get("precision", ""),  # Wav2Lip only: fp32 / bf16 / fp16
        "max_sessions": state.sessions.max_sessions,
        "max_upload_bytes": state.config.max_upload_bytes,
    })


async def client_ice_servers_now(request: web.Request) -> web.Response:
    """The ICE servers for one connection attempt, TURN credentials included. The page calls it just
    before its offer; it counts against the same per-address rate limit as offers, so an address cannot
    collect relay credentials faster than it may connect. Each answer gets its own ticket, logged with
    the address it went to: coturn's log names the ticket in the username."""
    state = state_of(request)
    address = client_address(request)
    state.limits.check_rate(address)
    ticket = new_ticket()
    if state.config.turn_secret:
        log.info("TURN credentials issued", extra={"ticket": ticket, "remote": address,
                                                   "ttl_s": state.config.turn_ttl_s})
    return web.json_response({"ice_servers": client_ice_servers(state.config, ticket),
                              "ttl_s": state.config.turn_ttl_s if state.config.turn_secret else None},
                             headers={"Cache-Control": "no-store"})


def _default_avatar_id(engine: Engine) -> str:
    return engine.avatars.default_id


async def healthz(request: web.Request) -> web.Response:
    """200 ok; 503 "degraded" while a render thread is down (it is being restarted: sessions show held
    or idle mouths meanwhile), 503 "draining" after SIGTERM (a load balancer sends new visitors
    elsewhere while live sessions finish), 503 "shutting down" once shutdown began."""
    state = state_of(request)
    health = state.engine.health()
    status = "shutting down" if state.closing else "draining" if state.draining else \
        "ok" if health.ok else "degraded"
    free = state.free_slots()
    return web.json_response({
        "status": status,
        # With --workers N the whole server's (the workers' board), as /metrics and GET /sessions say them.
        "sessions": len(state.sessions) if state.seat is None else state.sessions_total(),
        "max_sessions": state.sessions.max_sessions if state.seat is None else state.sessions_total() + free,
        # For a load balancer in front of several front-ends: send the next /offer to the one with the most.
        # The measured capacity (server/access/capacity.py) less the live and negotiating sessions: exactly the
        # offers that would be admitted now.
        "free_slots": free,
        "capacity": state.sessions.capacity.describe(),
        **({} if state.seat is None else {"worker": state.seat.index, "worker_processes": state.seat.board.describe()}),
        "instance": state.config.instance_id,
        "uptime_s": round(time.monotonic() - state.started, 1),
        "render_workers_down": health.workers_down,
        "render_worker_restarts": health.restarts,
        **public_engine_info(state.engine.info),
    }, status=200 if status == "ok" else 503)


def public_engine_info(info: dict[str, Any]) -> dict[str, str]:
    """The engine's facts for /healthz, without where its files are: the checkpoint by its file name."""
    out = {k: public_text(str(v)) for k, v in info.items()}
    if info.get("checkpoint") not in (None, "none"):
        out["checkpoint"] = Path(str(info["checkpoint"])).name
    return out


async def metrics(request: web.Request) -> web.Response:
    """This process's page; with --workers N the whole server's, merged from every worker's (a worker that
    does not answer within server/ops/worker_peers.PEER_TIMEOUT_S is left out: `lipsync_process_scraped` 0)."""
    state = state_of(request)
    if state.peers is None:
        text = render_metrics(state)
    else:
        answers = await state.peers.ask("GET", "/metrics", text=True)
        text = render_server_metrics(state, [(a.worker, a.body if a.ok else None) for a in answers])
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})
