"""What long-lived streams may cost: how many are open (`StreamSlots`) and how fast one WebSocket's
messages are handled (`MessagePacer`).

Each event stream (GET /sessions/{id}/events) and /stream WebSocket holds a file descriptor and a
subscriber that every playback event fans out to, for as long as the client keeps it open, and a session
token is all it takes to open one. So a session has at most `EVENT_STREAMS_PER_SESSION` event streams
and `WEBSOCKETS_PER_SESSION` /stream WebSocket; one more closes the session's oldest of that kind, with a
reason (an SSE `closed` event, a WebSocket close message). The newest wins because a session's token
belongs to one client, and the connection that client opens now (a page reload, a reconnect after a
network change) is the one it uses: the old one is most likely dead but not yet noticed (the WebSocket
heartbeat takes 10 s, an SSE keep-alive 15 s), and an EventSource that got a 429 would never retry. A
displaced stream still counts until its handler has returned, and a session whose displaced streams have
not gone yet gets 429, so the count per session stays bounded however fast a client reconnects.
Server-wide, at most `STREAMS_PER_SESSION_SERVER_WIDE` x max sessions streams are open (displaced ones
included); past that it is 429, never another session's stream closed (one session must not be able to
cut off another).

`MessagePacer` is a token bucket for one /stream WebSocket: every message costs one token (and its audio
its seconds in a second bucket); a client that outruns the buckets is not refused but read more slowly,
so TCP pushes back on it and it takes a bounded share of the event loop. A real TTS (tens of chunks a
second, 10x real time) never waits.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import Enum
from typing import Callable

from server.errors import ApiError

EVENT_STREAMS_PER_SESSION = 4
WEBSOCKETS_PER_SESSION = 1
STREAMS_PER_SESSION_SERVER_WIDE = 3   # the server-wide cap is this times --max-sessions (at least 8)

# One /stream WebSocket: messages per second and audio seconds per second, each with its burst.
STREAM_MESSAGES_PER_S = 1000.0
STREAM_MESSAGE_BURST = 500.0
STREAM_AUDIO_X_REAL_TIME = 50.0
STREAM_AUDIO_BURST_S = 60.0


class StreamKind(str, Enum):
    EVENTS = "events"     # GET /sessions/{id}/events (SSE)
    STREAM = "stream"     # GET /sessions/{id}/stream (WebSocket)


PER_SESSION = {StreamKind.EVENTS: EVENT_STREAMS_PER_SESSION, StreamKind.STREAM: WEBSOCKETS_PER_SESSION}


class StreamSlot:
    """One open stream. `displaced` is set when a newer stream of the session took its place; the
    handler then ends the stream with `reason`, and calls `release()` when it returns (idempotent)."""

    def __init__(self, release: Callable[["StreamSlot"], None]) -> None:
        self.displaced = asyncio.Event()
        self.reason = ""
        self._release = release
        self._released = False

    def displace(self, reason: str) -> None:
        self.reason = reason
        self.displaced.set()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self)


class StreamSlots:
    """Open streams by session and kind, and in all; see the module docstring for the policy."""

    def __init__(self, max_sessions: int) -> None:
        self.server_cap = max(8, STREAMS_PER_SESSION_SERVER_WIDE * max_sessions)
        self._open: dict[tuple[str, StreamKind], deque[StreamSlot]] = {}
        self.total = 0
        self.refused_total = 0     # 429s (server-wide cap, or a session's displaced streams still open)
        self.displaced_total = 0   # streams closed for a newer one of the same session

    def acquire(self, session_id: str, kind: StreamKind) -> StreamSlot:
        key = (session_id, kind)
        slots = self._open.setdefault(key, deque())
        cap = PER_SESSION[kind]
        active = [s for s in slots if not s.displaced.is_set()]   # at most 2 x cap entries
        if self.total >= self.server_cap:
            self.refused_total += 1
            raise ApiError(429, f"the server has {self.total} streams open (its limit); retry later",
                           {"Retry-After": "5"}, retry_after_s=5)
        if len(active) >= cap:
            if len(slots) >= 2 * cap:
                self.refused_total += 1
                raise ApiError(429, f"this session's earlier {kind.value} streams are still closing; retry",
                               {"Retry-After": "1"}, retry_after_s=1)
            self.displaced_total += 1
            active[0].displace(f"replaced by a newer {kind.value} connection of this session")
        slot = StreamSlot(lambda s: self._drop(key, s))
        slots.append(slot)
        self.total += 1
        return slot

    def _drop(self, key: tuple[str, StreamKind], slot: StreamSlot) -> None:
        slots = self._open.get(key)
        if slots is None or slot not in slots:
            return
        slots.remove(slot)
        self.total -= 1
        if not slots:
            del self._open[key]


class MessagePacer:
    """Token buckets over one connection's messages and audio seconds. `delay(audio_s)` books one
    message (carrying `audio_s` seconds of audio) and returns how long to wait before handling it."""

    def __init__(self, messages_per_s: float = STREAM_MESSAGES_PER_S, message_burst: float = STREAM_MESSAGE_BURST,
                 audio_x: float = STREAM_AUDIO_X_REAL_TIME, audio_burst_s: float = STREAM_AUDIO_BURST_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rates = (messages_per_s, audio_x)
        self._bursts = (message_burst, audio_burst_s)
        self._tokens = [message_burst, audio_burst_s]
        self._at = clock()
        self.waited_s = 0.0

    def delay(self, audio_s: float = 0.0) -> float:
        now = self._clock()
        elapsed, self._at = now - self._at, now
        wait = 0.0
        for i, cost in enumerate((1.0, audio_s)):
            self._tokens[i] = min(self._bursts[i], self._tokens[i] + elapsed * self._rates[i]) - cost
            if self._tokens[i] < 0:
                wait = max(wait, -self._tokens[i] / self._rates[i])
        self.waited_s += wait
        return wait
