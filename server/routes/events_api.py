"""Playback events of a session, for chatbots: GET /sessions/{id}/events (Server-Sent Events).

The same events go out as text messages on the /sessions/{id}/stream WebSocket (server/routes/push_api.py).
They come from the engine's output timeline (realtime/timeline/playback.py), i.e. when the audio actually leaves
the server, not when it was queued:

    {"type": "speech_started", "utterance": ID, "t": ...}
    {"type": "speech_ended", "utterance": ID, "position_s": ..., "interrupted": bool, "t": ...}
    {"type": "queue", "queued_s": ...,"t": ...}     on a step change (audio queued, queue ran empty, interrupt)

`t` is Unix time in seconds on the server's clock: when that sample leaves the server. Each SSE message
is `event: <type>` + `data: <the JSON above>`; a comment line every 15 s keeps proxies from closing an
idle stream. The stream ends when the session does, or after
    {"type": "closed", "reason": "..."}             a newer event stream of the session took its place
(a session has at most a few; server/access/stream_limits.py). Authentication: these routes sit under
/sessions/{id}/, which the server's session-credential check covers (EventSource sends `?token=`).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from aiohttp import web

from server.access.stream_limits import StreamKind, StreamSlot
from server.routes.event_feed import EventFeed, SlowSubscriber, tracker_of
from server.sessions import Session
from server.state import session_of, state_of

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0


async def _sse_messages(session: Session, feed: EventFeed, slot: StreamSlot) -> AsyncIterator[bytes]:
    waits = [asyncio.ensure_future(session.closed.wait()), asyncio.ensure_future(slot.displaced.wait())]
    ended = asyncio.ensure_future(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED))
    try:
        while not session.closed.is_set() and not slot.displaced.is_set():
            getter = asyncio.ensure_future(feed.next())
            done, _ = await asyncio.wait({getter, ended}, timeout=KEEPALIVE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if ended not in done:
                    yield b": keep-alive\n\n"
                continue
            message = getter.result()
            yield f"event: {message['type']}\ndata: {json.dumps(message)}\n\n".encode()
        if slot.displaced.is_set() and not session.closed.is_set():
            closed = {"type": "closed", "reason": slot.reason}
            yield f"event: closed\ndata: {json.dumps(closed)}\n\n".encode()
    finally:
        for future in (ended, *waits):
            future.cancel()


async def events(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    tracker = tracker_of(session)
    slot = state_of(request).streams.acquire(session.id, StreamKind.EVENTS)   # 429: server-wide cap
    feed = EventFeed(tracker, session.notices)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b": playback events of session " + session.id.encode() + b"\n\n")
        async for chunk in _sse_messages(session, feed, slot):
            await response.write(chunk)
    except SlowSubscriber:
        log.warning("session %s: SSE subscriber too slow; stream closed", session.id)
    except ConnectionResetError:
        pass
    finally:
        feed.close()
        slot.release()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/sessions/{id}/events", events)
