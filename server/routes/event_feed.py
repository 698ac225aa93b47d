"""EventFeed: one subscriber's queue of a session's playback events (realtime/timeline/playback.py), as the JSON
the push API sends: on the /sessions/{id}/stream WebSocket (server/routes/push_api.py) and as Server-Sent Events
(server/routes/events_api.py). `t` becomes Unix time in seconds on the server's clock. Server notices about the
session (`Session.notices`: `server_restarting` while the server drains) go out on the same feeds.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

from realtime.timeline.playback import PlaybackEvent, PlaybackTracker
from server.sessions import Session

MAX_PENDING_EVENTS = 1024   # a subscriber this far behind is cut off rather than growing without bound


class SlowSubscriber(Exception):
    pass


class EventFeed:
    """One subscriber's queue of a session's playback events, as JSON dicts in Unix time.

    The tracker calls listeners from whichever thread pulls the session's media; delivery hops onto
    the event loop the feed was made on."""

    def __init__(self, tracker: PlaybackTracker, notices: set[Callable[[dict[str, Any]], None]] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._overflowed = False
        # The session clock is time.monotonic: shift to Unix time once, so all events share one offset.
        self._to_unix = time.time() - time.monotonic()
        self._unsubscribe = tracker.subscribe(self._on_event)
        # Server notices for this session (`Session.notices`, e.g. "the server is restarting"), on the loop.
        self._notices = notices
        if notices is not None:
            notices.add(self._put)

    def _on_event(self, event: PlaybackEvent) -> None:
        message = event.as_json(self._to_unix)
        if threading.get_ident() == self._loop_thread:
            self._put(message)
        else:
            self._loop.call_soon_threadsafe(self._put, message)

    def _put(self, message: dict[str, Any]) -> None:
        if self._queue.qsize() >= MAX_PENDING_EVENTS:
            if not self._overflowed:
                self._overflowed = True
                self._queue.put_nowait(None)
            return
        self._queue.put_nowait(message)

    async def next(self) -> dict[str, Any]:
        """The next event; SlowSubscriber when this feed fell behind."""
        message = await self._queue.get()
        if message is None:
            raise SlowSubscriber(f"more than {MAX_PENDING_EVENTS} events pending")
        return message

    def close(self) -> None:
        self._unsubscribe()
        if self._notices is not None:
            self._notices.discard(self._put)


def tracker_of(session: Session) -> PlaybackTracker:
    return session.engine.playback
