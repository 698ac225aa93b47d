"""Playback events of a session, for chatbots: GET /sessions/{id}/events (Server-Sent Events).

The same events go out as text messages on the /sessions/{id}/stream WebSocket (server/push_api.py).
They come from the engine's output timeline (realtime/playback.py), i.e. when the audio actually leaves
the server, not when it was queued:

    {"type": "speech_started", "utterance": ID, "t": ...}
    {"type": "speech_ended", "utterance": ID, "position_s": ..., "interrupted": bool, "t": ...}
    {"type": "queue", "queued_s": ...,"t": ...}     on a step change (audio queued, queue ran empty, interrupt)

`t` is Unix time in seconds on the server's clock: when that sample leaves the server. Each SSE message
is `event: <type>` + `data: <the JSON above>`; a comment line every 15 s keeps proxies from closing an
idle stream. The stream ends when the session does. Authentication: these routes sit under
/sessions/{id}/, which the server's session-credential check covers (EventSource sends `?token=`).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from aiohttp import web

from server.event_feed import EventFeed, SlowSubscriber, tracker_of
from server.sessions import Session
from server.state import session_of

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0


async def _sse_messages(session: Session, feed: EventFeed) -> AsyncIterator[bytes]:
    closed = asyncio.ensure_future(session.closed.wait())
    try:
        while not session.closed.is_set():
            getter = asyncio.ensure_future(feed.next())
            done, _ = await asyncio.wait({getter, closed}, timeout=KEEPALIVE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if closed not in done:
                    yield b": keep-alive\n\n"
                continue
            message = getter.result()
            yield f"event: {message['type']}\ndata: {json.dumps(message)}\n\n".encode()
    finally:
        closed.cancel()


async def events(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    feed = EventFeed(tracker_of(session))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b": playback events of session " + session.id.encode() + b"\n\n")
        async for chunk in _sse_messages(session, feed):
            await response.write(chunk)
    except SlowSubscriber:
        log.warning("session %s: SSE subscriber too slow; stream closed", session.id)
    except ConnectionResetError:
        pass
    finally:
        feed.close()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/sessions/{id}/events", events)
