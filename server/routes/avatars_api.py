"""The avatars as a resource: list them, add one by upload, watch it being prepared, remove it.

    GET    /avatars                  public: every avatar (id, name, state, size, fps, frames, poster URL)
    GET    /avatars/{id}             public: one avatar; while preparing its progress, then ready or the error
    GET    /avatars/{id}/poster.jpg  public: a small picture of it (the page's picker shows these)
    POST   /avatars                  operator: a video or photo upload (multipart field "file", optional
                                     field "name"; or the raw body with ?name=). Checked from its headers
                                     (size, duration, dimensions) before any frame is decoded, then
                                     prepared on the library's thread: 202 with the id at once
    DELETE /avatars/{id}             operator: remove it (409 while a session uses it, in any worker)

With --workers N each worker process holds its own library: an upload is kept on disk by the worker that
takes it and taken in by every other one (server/ops/worker_peers.py), a removal reaches every worker or none;
an answer that lacks a worker (it did not answer in time) names it in `workers_missing`.

A session picks an avatar with POST /offer {"options": {"avatar": id}}. The preparation and the renderer
work happen off the event loop (realtime/avatars/avatar_library.py); running sessions are never disturbed.

Who may call which: the server's access policy (server/access/auth.py) classifies these routes; POST and
DELETE are operator-only (`--api-token`), the GETs public.
"""
from __future__ import annotations

import asyncio
import logging
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from realtime.avatars.avatar_library import (
    AvatarEntry,
    AvatarInUse,
    AvatarLibrary,
    LibraryBusy,
    UnknownAvatar,
)
from server.access.surface import public_text
from server.errors import ApiError
from server.ops.worker_peers import WorkerPeers
from server.routes.avatar_uploads import UploadFacts, UploadLimits, check_upload
from server.routes.upload_body import form_parts, receive, upload_policy
from server.state import state_of

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MAX_NAME_CHARS = 80
MAX_NAME_BYTES = 4 * MAX_NAME_CHARS  # UTF-8: at most 4 bytes a character


def add_routes(app: web.Application) -> None:
    app.router.add_get("/avatars", list_avatars)
    app.router.add_post("/avatars", add_avatar)
    app.router.add_get("/avatars/{id}", get_avatar)
    app.router.add_delete("/avatars/{id}", remove_avatar)
    app.router.add_get("/avatars/{id}/poster.jpg", poster)


def library_of(request: web.Request) -> AvatarLibrary:
    return state_of(request).engine.avatars


def entry_of(request: web.Request) -> AvatarEntry:
    try:
        return library_of(request).get(request.match_info["id"])
    except UnknownAvatar as exc:
        raise ApiError(404, str(exc)) from None


def describe(request: web.Request, entry: AvatarEntry) -> dict[str, Any]:
    out = entry.describe()
    if "error" in out:  # a failed --avatars file is named in it: by its name, never its path
        out["error"] = public_text(out["error"])
    out["url"] = f"/avatars/{entry.id}"
    if entry.poster is not None:
        out["poster_url"] = f"/avatars/{entry.id}/poster.jpg"
    return out


async def list_avatars(request: web.Request) -> web.Response:
    library = library_of(request)
    return web.json_response({"default": library.default_id,
                              "avatars": [describe(request, e) for e in library.entries()]})


async def get_avatar(request: web.Request) -> web.Response:
    return web.json_response(describe(request, entry_of(request)))


async def poster(request: web.Request) -> web.Response:
    entry = entry_of(request)
    if entry.poster is None:
        raise ApiError(404, f"avatar {entry.id!r} has no poster yet ({entry.state.value})")
    return web.Response(body=entry.poster, content_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})


def _shared_uploads(request: web.Request) -> None:
    """With --workers N every worker takes in an upload from the kept uploads (`--avatar-cache-dir`'s
    uploads folder, AvatarLibrary.adopt_upload): an engine that keeps none cannot share one."""
    state = state_of(request)
    if state.peers is not None and state.engine.avatars.uploads_dir is None:
        raise ApiError(409, "this server runs several worker processes and keeps no uploads to share between "
                            "them: add avatars with --avatars DIR (and restart), or run --workers 1")


async def remove_avatar(request: web.Request) -> web.Response:
    """Removed from every worker process or from none: with --workers N, first each one reserves the
    removal (refused while one of its sessions uses the avatar; its new sessions are refused it meanwhile),
    then each removes it; a worker that refuses or does not answer in time calls it off everywhere."""
    state = state_of(request)
    library = library_of(request)
    avatar_id = request.match_info["id"]
    try:
        if state.peers is not None:
            library.reserve_removal(avatar_id)
            await _reserve_everywhere(state.peers, library, avatar_id)
        await asyncio.to_thread(library.remove, avatar_id)  # renderers free their caches: not on the loop
    except UnknownAvatar as exc:
        raise ApiError(404, str(exc)) from None
    except AvatarInUse as exc:
        raise ApiError(409, str(exc)) from None
    body: dict[str, Any] = {"id": avatar_id, "removed": True}
    if state.peers is not None:
        missing = [a.missing() for a in await state.peers.ask("DELETE", f"/avatars/{avatar_id}")
                   if not a.ok and a.status != 404]
        if missing:  # reserved there but not removed: its reservation lapses (REMOVAL_HOLD_S), the avatar stays
            log.warning("avatar %s removed, but not from worker(s) %s", avatar_id, missing)
            body["workers_missing"] = missing
    return web.json_response(body)


async def _reserve_everywhere(peers: WorkerPeers, library: AvatarLibrary, avatar_id: str) -> None:
    """The other workers' reservations (a worker that does not know the avatar has nothing to hold);
    on a refusal or a silence every reservation is called off and the request answered with why."""
    answers = await peers.ask("POST", f"/avatars/{avatar_id}/reserve")
    refused = [a for a in answers if a.status == 409]
    silent = [a for a in answers if not a.ok and a.status not in (404, 409)]
    if not refused and not silent:
        return
    library.cancel_removal(avatar_id)
    await peers.ask("POST", f"/avatars/{avatar_id}/cancel")
    if refused:
        raise ApiError(409, f"worker process {refused[0].worker}: {refused[0].missing()['error']}")
    names = ", ".join(f"{a.worker} ({a.missing()['error']})" for a in silent)
    raise ApiError(503, f"worker process(es) {names} did not answer: nothing was removed; retry shortly",
                   {"Retry-After": "2"}, retry_after_s=2)


async def add_avatar(request: web.Request) -> web.Response:
    _shared_uploads(request)
    state = state_of(request)
    library = library_of(request)
    query_name = _checked_name(request.query.get("name", "").encode())  # before the body is read
    fd, name_of_file = tempfile.mkstemp(prefix="lipsync-avatar-", suffix=".upload")
    os.close(fd)
    path = media = typed = Path(name_of_file)
    try:
        await _receive(request, path)
        name = query_name
        if request.content_type.startswith("multipart/"):
            media = path.with_suffix(".part")
            name = await asyncio.to_thread(_file_of_form, path, media,
                                           request.headers.get("Content-Type", "")) or query_name
        limits = UploadLimits(state.config.max_avatar_seconds, state.config.max_avatar_side)
        facts, typed = await asyncio.to_thread(_checked, media, limits)
        try:
            entry = library.add_file(typed, _clean_name(name))
        except LibraryBusy as exc:
            raise ApiError(503, str(exc), {"Retry-After": "30"}, retry_after_s=30) from None
    except BaseException:
        await asyncio.to_thread(_discard, path, media, typed)
        raise
    if media != path:
        await asyncio.to_thread(_discard, path)
    # From here the library owns the file and deletes it when the preparation is done.
    log.info("avatar upload accepted", extra={"avatar": entry.id, "kind": facts.kind.value,
                                             "size": f"{facts.width}x{facts.height}", "seconds": facts.seconds})
    body = describe(request, entry)
    if state.peers is not None:  # every other worker takes it in, from the kept upload (a cache hit there)
        missing = [a.missing() for a in await state.peers.ask("POST", f"/avatars/{entry.id}/adopt")
                   if not a.ok]
        if missing:
            log.warning("avatar %s not taken in by worker(s) %s", entry.id, missing)
            body["workers_missing"] = missing
    return web.json_response(body, status=202, headers={"Location": body["url"]})


async def _receive(request: web.Request, path: Path) -> None:
    """Spool the whole body to `path` under the upload rules every upload route shares
    (server/routes/upload_body.py: the cap counts every byte, a deadline and a minimum rate)."""
    with open(path, "wb") as out:  # noqa: ASYNC230 (small writes into the page cache)
        size = await receive(request, upload_policy(request), out.write)
    if size == 0:
        raise ApiError(400, "empty upload; send a video or photo of a face")


def _file_of_form(body_path: Path, media: Path, content_type: str) -> str:
    """Copy the form's 'file' field out of a spooled multipart body into `media`; returns its
    'name' field (or the file's name). Blocking: run it off the loop."""
    with open(body_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as body:
        parts = form_parts(body, content_type)
        file_part = next((p for p in parts if p.name == "file"), None)
        if file_part is None or file_part.size == 0:
            raise ApiError(400, "multipart upload without a 'file' field" if file_part is None else
                                "empty upload; send a video or photo of a face")
        name = next((_checked_name(body[p.start:p.end]) for p in parts if p.name == "name"), "")
        with open(media, "wb") as out:
            for start in range(file_part.start, file_part.end, CHUNK):
                out.write(body[start:min(start + CHUNK, file_part.end)])
    return name or Path(file_part.filename or "").stem


def _checked_name(raw: bytes) -> str:
    """An avatar's name as given (query or form field): 400 over MAX_NAME_BYTES."""
    if len(raw) > MAX_NAME_BYTES:
        raise ApiError(400, f"the avatar's name is longer than {MAX_NAME_BYTES} bytes; at most "
                            f"{MAX_NAME_CHARS} characters are kept")
    return raw.decode("utf-8", errors="replace")


def _clean_name(name: str) -> str:
    return " ".join(name.split())[:MAX_NAME_CHARS] or "avatar"


def _checked(path: Path, limits: UploadLimits) -> tuple[UploadFacts, Path]:
    """Check the upload's headers; the preparation reads a photo or a video by its suffix, so the file
    gets the one its headers say."""
    facts = check_upload(path, limits)
    return facts, path.rename(path.with_suffix(facts.suffix))


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
