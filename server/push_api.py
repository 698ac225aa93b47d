"""The push API for chatbots: audio into a live session without WebRTC on the sending side.

    GET    /sessions                      the live sessions
    GET    /sessions/{id}                 one session's state and metrics
    DELETE /sessions/{id}                 end it
    POST   /sessions/{id}/audio           a wav/mp3/ogg/... upload (body or multipart field), or raw
                                          PCM with ?rate=R&channels=C[&format=s16|f32]
    GET    /sessions/{id}/stream          WebSocket: binary messages are PCM chunks (?rate=&channels=
                                          &format= as above); text messages are JSON commands:
                                          {"type": "end"} (utterance complete), {"type": "interrupt"},
                                          {"type": "status"}
    POST   /sessions/{id}/interrupt       stop talking now: drop queued and pending audio
    POST   /sessions/{id}/say             {"text": "...", "voice"?: "en", "wpm"?: 160}, when a local TTS exists

Pushed audio goes through the session's AudioInput, the same path as the microphone.
"""
from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
from aiohttp import BodyPartReader, WSMsgType, web

from realtime.media_io import MediaError, load_audio
from server.audio_input import QueueFull
from server.errors import ApiError, read_json
from server.sessions import Session, UnknownSession
from server.state import state_of
from server.tts import MAX_TEXT_CHARS, TtsError

log = logging.getLogger(__name__)

PCM_FORMATS = {"s16": np.int16, "s16le": np.int16, "f32": np.float32, "f32le": np.float32}
MAX_RATE = 192000
MAX_CHANNELS = 8
WS_MAX_MESSAGE = 4 * 1024 * 1024


def session_of(request: web.Request) -> Session:
    try:
        return state_of(request).sessions.get(request.match_info["id"])
    except UnknownSession as exc:
        raise ApiError(404, str(exc)) from None


def pcm_params(query) -> tuple[int, int, type]:
    """(rate, channels, dtype) from ?rate=&channels=&format=; 400 when out of range."""
    try:
        rate = int(query.get("rate", "16000"))
        channels = int(query.get("channels", "1"))
    except ValueError:
        raise ApiError(400, "rate and channels must be integers") from None
    if not 1000 <= rate <= MAX_RATE:
        raise ApiError(400, f"rate must be between 1000 and {MAX_RATE} Hz")
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


def _queue(session: Session, samples: np.ndarray, rate: int, channels: int,
           complete: bool = False) -> float:
    try:
        return session.input.push(samples, rate, channels, complete=complete)
    except QueueFull as exc:
        raise ApiError(413, str(exc)) from None


# -- handlers --------------------------------------------------------------------------------------


async def list_sessions(request: web.Request) -> web.Response:
    sessions = state_of(request).sessions
    return web.json_response({"sessions": [s.describe() for s in sessions],
                              "max_sessions": sessions.max_sessions})


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(session_of(request).describe())


async def delete_session(request: web.Request) -> web.Response:
    session = session_of(request)
    await state_of(request).sessions.close_and_wait(session.id, "deleted")
    return web.json_response({"session_id": session.id, "closed": True})


async def interrupt(request: web.Request) -> web.Response:
    session = session_of(request)
    session.input.interrupt()
    return web.json_response({"session_id": session.id, "interrupted": True})


async def _read_upload(request: web.Request) -> tuple[bytes, str | None]:
    """The uploaded bytes and file name, from a raw body or the first file of a multipart form."""
    limit = state_of(request).config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"upload of {request.content_length} bytes is over the "
                            f"{limit} byte limit", limit_bytes=limit)
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):  # a nested multipart: not a file field
                continue
            if part.filename is not None or part.name in ("audio", "file"):
                data = bytearray()
                while chunk := await part.read_chunk():
                    data += chunk
                    if len(data) > limit:
                        raise ApiError(413, f"upload is over the {limit} byte limit", limit_bytes=limit)
                return bytes(data), part.filename
        raise ApiError(400, "the multipart form has no file field (name it 'audio')")
    return await request.read(), None


async def push_audio(request: web.Request) -> web.Response:
    session = session_of(request)
    data, filename = await _read_upload(request)
    if not data:
        raise ApiError(400, "empty upload")
    if "rate" in request.query or request.content_type in ("audio/l16", "audio/pcm"):
        rate, channels, dtype = pcm_params(request.query)
        samples = decode_pcm(data, channels, dtype)
    else:
        try:
            samples = await asyncio.to_thread(load_audio, data, 16000)
        except MediaError as exc:
            what = f"{filename}: " if filename else ""
            raise ApiError(415, f"{what}{exc}".replace("the uploaded data: ", "")) from None
        rate, channels = 16000, 1
    if session.closed.is_set():
        raise ApiError(404, f"session {session.id!r} closed")
    duration = _queue(session, samples, rate, channels, complete=True)
    return web.json_response({"session_id": session.id, "queued_s": round(duration, 3),
                              "pending_s": round(session.input.queued_s, 3)})


async def say(request: web.Request) -> web.Response:
    state = state_of(request)
    session = session_of(request)
    if not state.tts.available:
        raise ApiError(501, "no local TTS on this server (install espeak-ng)")
    body = await read_json(request)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "missing 'text'")
    if len(text) > MAX_TEXT_CHARS:
        raise ApiError(413, f"text longer than {MAX_TEXT_CHARS} characters")
    voice = body.get("voice")
    if voice is not None and (not isinstance(voice, str) or not voice.replace("-", "").replace("+", "")
                              .replace("_", "").isalnum()):
        raise ApiError(400, "'voice' must be a voice name like 'en' or 'en-us'")
    wpm = body.get("wpm")
    if wpm is not None and (not isinstance(wpm, int) or not 80 <= wpm <= 450):
        raise ApiError(400, "'wpm' must be an integer between 80 and 450")
    try:
        samples, rate = await state.tts.synthesize(text, voice, wpm)
    except TtsError as exc:
        raise ApiError(500, str(exc)) from None
    if session.closed.is_set():
        raise ApiError(404, f"session {session.id!r} closed")
    duration = _queue(session, samples, rate, 1, complete=True)
    return web.json_response({"session_id": session.id, "queued_s": round(duration, 3)})


async def stream(request: web.Request) -> web.WebSocketResponse:
    """PCM chunks over a WebSocket as a TTS synthesises them; ends when either side closes."""
    session = session_of(request)
    rate, channels, dtype = pcm_params(request.query)
    ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=WS_MAX_MESSAGE)
    await ws.prepare(request)
    watcher = asyncio.get_running_loop().create_task(_close_with_session(ws, session))
    received = 0.0
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                try:
                    received += _queue(session, decode_pcm(msg.data, channels, dtype), rate, channels)
                except ApiError as exc:
                    await ws.send_json({"type": "error", "error": exc.message, "status": exc.status})
            elif msg.type == WSMsgType.TEXT:
                await ws.send_json(_command(session, msg.data))
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        watcher.cancel()
    log.debug("session %s: stream closed after %.2f s of audio", session.id, received)
    return ws


def _command(session: Session, text: str) -> dict:
    try:
        command = json.loads(text)
        kind = command.get("type") if isinstance(command, dict) else None
    except ValueError:
        kind = None
    if kind == "interrupt":
        session.input.interrupt()
        return {"type": "interrupted"}
    if kind == "end":
        session.input.end_of_audio()
        return {"type": "ended"}
    if kind == "status":
        return {"type": "status", "pending_s": round(session.input.queued_s, 3),
                "speaking": session.input.speaking}
    return {"type": "error", "error": "unknown command; expected {\"type\": \"interrupt\"|\"end\"|\"status\"}"}


async def _close_with_session(ws: web.WebSocketResponse, session: Session) -> None:
    await session.closed.wait()
    await ws.close(message=b"session closed")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/sessions", list_sessions)
    app.router.add_get("/sessions/{id}", get_session)
    app.router.add_delete("/sessions/{id}", delete_session)
    app.router.add_post("/sessions/{id}/audio", push_audio)
    app.router.add_get("/sessions/{id}/stream", stream)
    app.router.add_post("/sessions/{id}/interrupt", interrupt)
    app.router.add_post("/sessions/{id}/say", say)
