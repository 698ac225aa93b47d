"""The push API for chatbots: audio into a live session without WebRTC on the sending side.

    GET    /sessions                      the live sessions
    GET    /sessions/{id}                 one session's state and metrics
    DELETE /sessions/{id}                 end it
    POST   /sessions/{id}/audio           a wav/mp3/ogg/... upload (body or multipart field), or raw
                                          PCM with ?rate=R&channels=C[&format=s16|f32]; ?utterance=ID
    GET    /sessions/{id}/stream          WebSocket: binary messages are PCM chunks (?rate=&channels=
                                          &format= as above); text messages are JSON commands:
                                          {"type": "start", "utterance"?: ID} (a new utterance),
                                          {"type": "end"} (utterance complete), {"type": "interrupt"},
                                          {"type": "status"}; the server also sends the playback
                                          events (server/routes/events_api.py) as text messages. One per
                                          session (a newer one closes the older), messages paced
                                          (server/access/stream_limits.py)
    POST   /sessions/{id}/interrupt       stop talking now: drop queued and pending audio
    POST   /sessions/{id}/say             {"text": "...", "voice"?: "en", "wpm"?: 160, "utterance"?: ID},
                                          when a local TTS exists
    GET    /sessions/{id}/events          the playback events as Server-Sent Events (server/routes/events_api.py)

Pushed audio goes through the session's AudioInput, the same path as the microphone. Every upload, `say`
and WebSocket utterance is named: the client's ID, or one the server makes and returns ("utterance" in
the reply; {"type": "started", "utterance": ID} on the WebSocket, also when PCM arrives with no utterance
open). The playback events name it when it starts and ends playing.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from realtime.audio.audio_ingest import convert_clip
from realtime.timeline.playback import new_utterance_id, valid_utterance_id
from realtime.timeline.session import QueueLimit
from server.access.auth import client_address
from server.access.limits import Holder, address_key
from server.access.stream_limits import MessagePacer, StreamKind, StreamSlot
from server.errors import ApiError, parse_json_object, read_json
from server.media.audio_input import QueueFull
from server.routes.event_feed import EventFeed, SlowSubscriber, tracker_of
from server.routes.tts import SayRequest, TtsError, TtsTimeout
from server.routes.upload_body import form_parts, read_all, upload_policy
from server.routes.uploads import MAX_CHANNELS, MAX_RATE, MIN_RATE, TARGET_RATE, decode_upload
from server.sessions import Session
from server.state import session_of, state_of

log = logging.getLogger(__name__)

PCM_FORMATS: dict[str, type[np.generic]] = {"s16": np.int16, "s16le": np.int16, "f32": np.float32, "f32le": np.float32}
WS_MAX_MESSAGE = 4 * 1024 * 1024
MAX_COMMAND_CHARS = 4096   # a JSON command is a few dozen characters; parsing costs what it holds
# A clip longer than this that is not 16 kHz mono is converted on the WorkPool, not on the event loop:
# resampling costs the loop ~1 ms per second of 48 kHz audio (a 300 s raw PCM upload stalled every
# session's pacing for ~0.3 s); a WebSocket chunk or a short clip costs less than the hop.
CONVERT_OFF_LOOP_S = 1.0


def pcm_params(query: Mapping[str, str]) -> tuple[int, int, type[np.generic]]:
    """(rate, channels, dtype) from ?rate=&channels=&format=; 400 when out of range."""
    try:
        rate = int(query.get("rate", str(TARGET_RATE)))
        channels = int(query.get("channels", "1"))
    except ValueError:
        raise ApiError(400, "rate and channels must be integers") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ApiError(400, f"rate must be between {MIN_RATE} and {MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ApiError(400, f"channels must be between 1 and {MAX_CHANNELS}")
    fmt = query.get("format", "s16").lower()
    if fmt not in PCM_FORMATS:
        raise ApiError(400, f"format must be one of {sorted(set(PCM_FORMATS))}")
    return rate, channels, PCM_FORMATS[fmt]


def decode_pcm(data: bytes, channels: int, dtype: type) -> np.ndarray:
    width = np.dtype(dtype).itemsize * channels
    if len(data) % width:
        raise ApiError(400, f"raw PCM length {len(data)} is not a multiple of {width} bytes "
                            f"({channels} channel(s) of {np.dtype(dtype).name})")
    samples: np.ndarray = np.frombuffer(data, dtype=dtype)
    if dtype is np.float32:
        if not np.all(np.isfinite(samples)):
            raise ApiError(400, "float PCM contains NaN or infinity")
        samples = np.clip(samples, -1.0, 1.0)
    return samples


def utterance_id(value: object) -> str:
    """The client's utterance ID, or a new one when none is given; 400 when it is not a short token."""
    if value is None:
        return new_utterance_id()
    if not valid_utterance_id(value):
        raise ApiError(400, "utterance must be 1-128 printable characters without spaces")
    return str(value)


def _queue(session: Session, samples: np.ndarray, rate: int, channels: int,
           complete: bool = False, utterance: str | None = None) -> float:
    try:
        return session.input.push(samples, rate, channels, complete=complete, utterance=utterance)
    except QueueFull as exc:
        raise ApiError(413, str(exc)) from None
    except QueueLimit as exc:   # too many utterances or segments queued: try again once some played
        raise ApiError(429, str(exc), {"Retry-After": "1"}, retry_after_s=1) from None


# -- handlers --------------------------------------------------------------------------------------


async def list_sessions(request: web.Request) -> web.Response:
    """Every session of the server: with --workers N this worker's and the others' (server/ops/worker_peers.py:
    a worker that does not answer in time is named in `workers_missing`, never waited for)."""
    state = state_of(request)
    sessions = state.sessions
    listed = [s.describe() for s in sessions]
    if state.peers is None:
        return web.json_response({"sessions": listed, "max_sessions": sessions.max_sessions})
    missing = []
    for answer in await state.peers.ask("GET", "/sessions"):
        if answer.ok:
            listed.extend(answer.body["sessions"])
        else:
            missing.append(answer.missing())
    return web.json_response({"sessions": listed, "max_sessions": state.sessions_total() + state.free_slots(),
                              **({"workers_missing": missing} if missing else {})})


async def get_session(request: web.Request) -> web.Response:
    body = session_of(request).describe()
    notice = state_of(request).notice()
    if notice is not None:  # the page polls this every second and shows the notice
        body["server_notice"] = notice
    return web.json_response(body)


async def delete_session(request: web.Request) -> web.Response:
    session = session_of(request)
    await state_of(request).sessions.close_and_wait(session.id, "deleted")
    return web.json_response({"session_id": session.id, "closed": True})


async def interrupt(request: web.Request) -> web.Response:
    session = session_of(request)
    session.input.interrupt()
    return web.json_response({"session_id": session.id, "interrupted": True})


def holder_of(request: web.Request, session: Session) -> Holder:
    """The session and the client address (behind a trusted proxy, the client it names; an IPv6
    address by its /64) a decode slot is counted for."""
    return Holder(session.id, address_key(client_address(request)))


async def _read_upload(request: web.Request) -> tuple[bytes, str | None]:
    """The uploaded bytes and file name, from a raw body or the first file of a multipart form. The
    whole body is read first under `upload_policy`: every byte of a form counts against the cap."""
    body = await read_all(request, upload_policy(request))
    if not request.content_type.startswith("multipart/"):
        return body, None
    for part in form_parts(body, request.headers.get("Content-Type", "")):
        if part.filename is not None or part.name in ("audio", "file"):
            return body[part.start:part.end], part.filename
    raise ApiError(400, "the multipart form has no file field (name it 'audio')")


async def push_audio(request: web.Request) -> web.Response:
    session = session_of(request)
    utterance = utterance_id(request.query.get("utterance"))
    raw = "rate" in request.query or request.content_type in ("audio/l16", "audio/pcm")
    pcm = pcm_params(request.query) if raw else None  # the query is checked before the body is read
    data, filename = await _read_upload(request)
    if not data:
        raise ApiError(400, "empty upload")
    holder = holder_of(request, session)
    if pcm is not None:
        rate, channels, dtype = pcm
        samples = decode_pcm(data, channels, dtype)
        samples, rate, channels = await _at_engine_rate(request, holder, samples, rate, channels)
    else:
        samples, rate, channels = await _decode_file(request, session, holder, data, filename), TARGET_RATE, 1
    if session.closed.is_set():
        raise ApiError(404, f"session {session.id!r} closed")
    duration = _queue(session, samples, rate, channels, complete=True, utterance=utterance)
    return web.json_response({"session_id": session.id, "utterance": utterance, "queued_s": round(duration, 3),
                              "pending_s": round(session.input.queued_s, 3)})


async def _at_engine_rate(request: web.Request, holder: Holder, samples: np.ndarray, rate: int,
                          channels: int) -> tuple[np.ndarray, int, int]:
    """A whole clip as the engine takes it (16 kHz mono), converted on the WorkPool (a slot of its own:
    503 when none is free) when it is long enough to matter; as given otherwise."""
    if not _convert_off_loop(samples, rate, channels):
        return samples, rate, channels
    converted = await state_of(request).pool.run(convert_clip, samples, rate, channels, holder=holder)
    return converted, TARGET_RATE, 1


def _convert_off_loop(samples: np.ndarray, rate: int, channels: int) -> bool:
    return not (rate == TARGET_RATE and channels == 1) and len(samples) >= CONVERT_OFF_LOOP_S * rate * channels


async def _decode_file(request: web.Request, session: Session, holder: Holder, data: bytes,
                       filename: str | None) -> np.ndarray:
    """A media upload, already received in full, decoded on the WorkPool: a slot is taken only now
    (503 when none is free, 429 when this session or address already holds its share)."""
    room_s = session.input.max_queued_s - session.input.queued_s
    try:
        decoded = await state_of(request).pool.run(decode_upload, data, room_s, holder=holder)
    except ApiError as exc:
        if filename and exc.status == 415:
            exc.message = f"{filename}: {exc.message}"
        raise
    return decoded.samples


async def say(request: web.Request) -> web.Response:
    """Text to speech into the session: one synthesis or decode at a time per session, at most
    --max-concurrent-decodes (shared with upload decodes) server-wide and --max-decodes-per-ip per
    address, the text's length checked first."""
    state = state_of(request)
    session = session_of(request)
    if not state.tts.available:
        raise ApiError(501, "no local TTS on this server (install espeak-ng)")
    body = await read_json(request)
    request_ = SayRequest.from_dict(body)
    utterance = utterance_id(body.get("utterance"))
    room_s = session.input.max_queued_s - session.input.queued_s
    if request_.min_duration_s > room_s:
        raise ApiError(413, f"this text takes at least {request_.min_duration_s:.0f} s to say; the "
                            f"session can queue {room_s:.0f} s more", room_s=round(room_s, 3))
    try:
        with state.pool.slot(holder_of(request, session)):  # one per session, a share per address
            samples, rate = await state.tts.synthesize(request_.text, request_.voice, request_.wpm,
                                                       state.pool.run_in_slot)
            if _convert_off_loop(samples, rate, 1):
                samples, rate = await state.pool.run_in_slot(convert_clip, samples, rate, 1), TARGET_RATE
    except TtsTimeout as exc:
        raise ApiError(504, str(exc)) from None
    except TtsError as exc:
        raise ApiError(502, str(exc)) from None
    if session.closed.is_set():
        raise ApiError(404, f"session {session.id!r} closed")
    duration = _queue(session, samples, rate, 1, complete=True, utterance=utterance)
    return web.json_response({"session_id": session.id, "utterance": utterance, "queued_s": round(duration, 3)})


class _Stream:
    """One /stream WebSocket: the utterance its PCM belongs to, and one writer for replies and events."""

    def __init__(self, session: Session, ws: web.WebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.utterance: str | None = None
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_json(message)

    async def forward_events(self, feed: EventFeed) -> None:
        try:
            while not self.ws.closed:
                await self.send(await feed.next())
        except SlowSubscriber:
            await self.ws.close(message=b"too many playback events pending")
        except ConnectionResetError:
            pass

    async def pcm(self, samples: np.ndarray, rate: int, channels: int) -> float:
        if self.utterance is None:
            await self.start(None)
        return _queue(self.session, samples, rate, channels, utterance=self.utterance)

    async def start(self, requested: object) -> None:
        utterance = utterance_id(requested)
        if self.utterance is not None:
            self.session.input.end_of_audio()  # a new utterance completes the open one
        self.utterance = utterance
        await self.send({"type": "started", "utterance": utterance})

    async def command(self, text: str) -> None:
        if len(text) > MAX_COMMAND_CHARS:
            raise ApiError(400, f"a command is at most {MAX_COMMAND_CHARS} characters")
        command = parse_json_object(text)
        kind = command.get("type")
        if kind == "start":
            await self.start(command.get("utterance"))
        elif kind == "interrupt":
            self.session.input.interrupt()
            self.utterance = None
            await self.send({"type": "interrupted"})
        elif kind == "end":
            self.session.input.end_of_audio()
            ended, self.utterance = self.utterance, None
            await self.send({"type": "ended", "utterance": ended})
        elif kind == "status":
            await self.send({"type": "status", "pending_s": round(self.session.input.queued_s, 3),
                             "speaking": self.session.input.speaking, "utterance": self.utterance})
        else:
            await self.send({"type": "error", "error": "unknown command; expected {\"type\": "
                                                       "\"start\"|\"end\"|\"interrupt\"|\"status\"}"})


async def stream(request: web.Request) -> web.WebSocketResponse:
    """PCM chunks over a WebSocket as a TTS synthesises them, commands, and the playback events back;
    ends when either side closes, when the session ends, or when a newer /stream of the session takes
    its place. Every message costs the same bounded work; the loop yields after each one and paces a
    client that sends faster than `MessagePacer` allows, so a flood of tiny messages cannot hold the
    event loop. Bad input of any kind is answered with {"type": "error"} and the socket stays usable."""
    session = session_of(request)
    rate, channels, dtype = pcm_params(request.query)
    slot = state_of(request).streams.acquire(session.id, StreamKind.STREAM)   # 429: server-wide cap
    try:
        return await _serve_stream(request, session, slot, rate, channels, dtype)
    finally:
        slot.release()


async def _serve_stream(request: web.Request, session: Session, slot: StreamSlot, rate: int, channels: int,
                        dtype: type) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=WS_MAX_MESSAGE)
    await ws.prepare(request)
    conn = _Stream(session, ws)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_close_with_session(ws, session)), loop.create_task(_close_when_displaced(ws, slot))]
    feed: EventFeed | None = None
    try:
        feed = EventFeed(tracker_of(session), session.notices)
        tasks.append(loop.create_task(conn.forward_events(feed)))
    except ApiError:
        log.debug("session %s: engine without playback events", session.id)
    pacer = MessagePacer()
    bytes_per_s = np.dtype(dtype).itemsize * channels * rate
    received = 0.0
    try:
        async for msg in ws:
            audio_s = len(msg.data) / bytes_per_s if msg.type == WSMsgType.BINARY else 0.0
            await asyncio.sleep(pacer.delay(audio_s))   # sleep(0) too: other clients run between messages
            try:
                if msg.type == WSMsgType.BINARY:
                    received += await conn.pcm(decode_pcm(msg.data, channels, dtype), rate, channels)
                elif msg.type == WSMsgType.TEXT:
                    await conn.command(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
            except ApiError as exc:
                await conn.send({"type": "error", "error": exc.message, "status": exc.status})
    finally:
        for task in tasks:
            task.cancel()
        if feed is not None:
            feed.close()
    log.debug("session %s: stream closed after %.2f s of audio (paced %.2f s)", session.id, received,
              pacer.waited_s)
    return ws


async def _close_when_displaced(ws: web.WebSocketResponse, slot: StreamSlot) -> None:
    await slot.displaced.wait()
    await ws.close(code=4000, message=slot.reason.encode()[:120])


async def _close_with_session(ws: web.WebSocketResponse, session: Session) -> None:
    await session.closed.wait()
    reason = f"session closed: {session.close_reason}" if session.close_reason else "session closed"
    await ws.close(message=reason.encode()[:120])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/sessions", list_sessions)
    app.router.add_get("/sessions/{id}", get_session)
    app.router.add_delete("/sessions/{id}", delete_session)
    app.router.add_post("/sessions/{id}/audio", push_audio)
    app.router.add_get("/sessions/{id}/stream", stream)
    app.router.add_post("/sessions/{id}/interrupt", interrupt)
    app.router.add_post("/sessions/{id}/say", say)
