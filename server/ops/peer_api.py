"""What a worker of `--workers N` answers the other workers, on its peer socket (server/ops/worker_peers.py).

    GET    /sessions                this worker's sessions, as GET /sessions lists them
    GET    /metrics                 this worker's Prometheus page (the asker merges them)
    POST   /avatars/{id}/adopt      take in an upload another worker kept (AvatarLibrary.adopt_upload)
    POST   /avatars/{id}/reserve    the first step of a removal (409 while a session here uses it)
    POST   /avatars/{id}/cancel     a reserved removal called off (another worker refused it)
    DELETE /avatars/{id}            the second step: remove it here

Only the worker processes reach it (a Unix socket in the supervisor's mode-0700 directory, never the
network), so there is no access check here: the public request that caused the call passed the access
policy (server/access/auth.py) in the worker that took it. Errors are JSON with their status, like the public API.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from realtime.avatars.avatar_library import AvatarInUse, LibraryBusy, UnknownAvatar
from server.errors import ApiError, json_errors
from server.ops.metrics import render_metrics
from server.ops.prometheus import CONTENT_TYPE
from server.state import STATE, ServerState, state_of


def create_peer_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=1024)
    app[STATE] = state
    app.router.add_get("/sessions", sessions)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/avatars/{id}/adopt", adopt_avatar)
    app.router.add_post("/avatars/{id}/reserve", reserve_removal)
    app.router.add_post("/avatars/{id}/cancel", cancel_removal)
    app.router.add_delete("/avatars/{id}", remove_avatar)
    return app


async def sessions(request: web.Request) -> web.Response:
    return web.json_response({"sessions": [s.describe() for s in state_of(request).sessions]})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=render_metrics(state_of(request)).encode(), headers={"Content-Type": CONTENT_TYPE})


async def adopt_avatar(request: web.Request) -> web.Response:
    avatar_id = request.match_info["id"]
    try:
        entry = state_of(request).engine.avatars.adopt_upload(avatar_id)
    except UnknownAvatar as exc:
        raise ApiError(404, str(exc)) from None
    except LibraryBusy as exc:
        raise ApiError(503, str(exc)) from None
    return web.json_response({"id": entry.id, "state": entry.state.value}, status=202)


async def reserve_removal(request: web.Request) -> web.Response:
    avatar_id = request.match_info["id"]
    try:
        state_of(request).engine.avatars.reserve_removal(avatar_id)
    except UnknownAvatar as exc:
        raise ApiError(404, str(exc)) from None
    except AvatarInUse as exc:
        raise ApiError(409, str(exc)) from None
    return web.json_response({"id": avatar_id, "reserved": True})


async def cancel_removal(request: web.Request) -> web.Response:
    avatar_id = request.match_info["id"]
    state_of(request).engine.avatars.cancel_removal(avatar_id)
    return web.json_response({"id": avatar_id, "reserved": False})


async def remove_avatar(request: web.Request) -> web.Response:
    avatar_id = request.match_info["id"]
    try:
        await asyncio.to_thread(state_of(request).engine.avatars.remove, avatar_id)
    except UnknownAvatar as exc:
        raise ApiError(404, str(exc)) from None
    except AvatarInUse as exc:
        raise ApiError(409, str(exc)) from None
    return web.json_response({"id": avatar_id, "removed": True})
