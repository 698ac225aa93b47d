"""POST /offer: an SDP offer in, the answer and a session id out.

The offer must ask to receive video (the avatar). If it also sends audio, that is the microphone; if
it asks to receive audio, the session sends the input audio delayed to match the video. Both outgoing
tracks are added by the same peer connection, so they share one MediaStream (one msid) and the
browser lip-syncs them.

Body: `{"sdp": "...", "type": "offer", "avatar": optional name, "options": {"video_codec": "vp8"|"h264",
...engine options}}`. Answer: `{"sdp", "type": "answer", "session_id", "fps", "ice_servers"}`.
"""
from __future__ import annotations

import logging
import time

from aiohttp import web
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.sdp import SessionDescription

from server import audio_jitter
from server.audio_input import AudioInput
from server.errors import ApiError, read_json
from server.ice import rtc_configuration
from server.sessions import ServerFull, Session, new_session_id
from server.state import ServerState, state_of
from server.tracks import AvatarVideoTrack, MediaClock, SyncedAudioTrack, drain, pump_microphone

log = logging.getLogger(__name__)

MAX_SDP_CHARS = 64 * 1024
VIDEO_CODECS = {"vp8": "video/VP8", "h264": "video/H264"}


def parse_offer(body: dict, state: ServerState) -> tuple[RTCSessionDescription, list[str], dict]:
    """Validate the request body; returns (offer, media kinds in it, options)."""
    sdp, kind = body.get("sdp"), body.get("type", "offer")
    if not isinstance(sdp, str) or not sdp.strip():
        raise ApiError(400, "missing 'sdp': expected {\"sdp\": \"v=0...\", \"type\": \"offer\"}")
    if kind != "offer":
        raise ApiError(400, f"'type' must be 'offer', got {kind!r}")
    if len(sdp) > MAX_SDP_CHARS:
        raise ApiError(413, f"SDP larger than {MAX_SDP_CHARS} characters")
    if not sdp.lstrip().startswith("v=0"):
        raise ApiError(400, "malformed SDP: it must start with 'v=0'")
    try:
        kinds = [m.kind for m in SessionDescription.parse(sdp).media]
    except Exception as exc:
        raise ApiError(400, f"malformed SDP: {type(exc).__name__} {exc}".rstrip()) from None
    if "video" not in kinds:
        raise ApiError(400, "the offer has no video m-line: add a recvonly video transceiver "
                            "to receive the avatar")
    if kinds.count("video") > 1 or kinds.count("audio") > 1:
        raise ApiError(400, "the offer must have one video m-line and at most one audio m-line")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be a JSON object")
    codec = options.get("video_codec")
    if codec is not None and str(codec).lower() not in VIDEO_CODECS:
        raise ApiError(400, f"options.video_codec must be one of {sorted(VIDEO_CODECS)}")
    avatar = body.get("avatar")
    known = state.engine.info.get("avatar", "default")
    if avatar not in (None, "", "default", known):
        raise ApiError(400, f"unknown avatar {avatar!r}; this server has {known!r}")
    return RTCSessionDescription(sdp=sdp, type="offer"), kinds, options


def video_codecs(codec: str) -> list:
    """Capabilities for one video codec (every profile of it) plus RTX."""
    mime = VIDEO_CODECS[codec.lower()]
    caps = RTCRtpSender.getCapabilities("video").codecs
    return [c for c in caps if c.mimeType == mime] + [c for c in caps if c.mimeType == "video/rtx"]


async def handle_offer(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.closing:
        raise ApiError(503, "the server is shutting down", {"Retry-After": "10"}, retry_after_s=10)
    body = await read_json(request)
    offer, kinds, options = parse_offer(body, state)
    try:
        reservation = state.sessions.reserve()
    except ServerFull as exc:
        raise ApiError(503, str(exc), {"Retry-After": str(exc.retry_after_s)},
                       retry_after_s=exc.retry_after_s, max_sessions=exc.limit) from None
    started = time.monotonic()
    with reservation:
        session = await answer_offer(state, offer, kinds, options, remote=request.remote or "")
        state.sessions.add(session, reservation)
    start_session(state, session)
    state.offer_seconds.observe(time.monotonic() - started)
    log.info("session opened", extra={"session": session.id, "remote": session.remote,
                                      "media": ",".join(kinds), "microphone": session.has_microphone,
                                      "sessions": len(state.sessions)})
    return web.json_response({
        "sdp": session.pc.localDescription.sdp,
        "type": session.pc.localDescription.type,
        "session_id": session.id,
        "fps": state.engine.fps,
    })


async def answer_offer(state: ServerState, offer: RTCSessionDescription, kinds: list[str],
                       options: dict, remote: str) -> Session:
    """A peer connection answering `offer`, with the engine session and tracks behind it. On any
    failure everything made so far is closed again."""
    session_id = new_session_id()
    pc = RTCPeerConnection(configuration=rtc_configuration(state.config.ice_servers))
    remote_tracks: list = []
    pc.on("track", remote_tracks.append)
    engine_session = None
    try:
        try:
            engine_session = state.engine.open_session(options, name=session_id)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, f"bad session options: {exc}") from None

        def engine_failed(exc: BaseException) -> None:
            state.sessions.close(session_id, f"error: engine failed ({type(exc).__name__})")

        clock = MediaClock()
        # Our transceivers exist before the offer is applied, so it binds to them (and our codec
        # preference counts when the answer is made).
        video = AvatarVideoTrack(engine_session, state.engine.fps, clock, engine_failed)
        video_transceiver = pc.addTransceiver(video, direction="sendonly")
        if options.get("video_codec"):
            video_transceiver.setCodecPreferences(video_codecs(str(options["video_codec"])))
        audio = SyncedAudioTrack(engine_session, clock, engine_failed)
        if "audio" in kinds:
            pc.addTransceiver(audio, direction="sendrecv")
        try:
            await pc.setRemoteDescription(offer)
        except Exception as exc:
            raise ApiError(400, f"the SDP offer was refused: {type(exc).__name__} {exc}".rstrip()) from None
        await pc.setLocalDescription(await pc.createAnswer())
        audio_jitter.install(pc)  # the microphone's delay must not creep up after a lost packet
    except BaseException:
        await pc.close()
        if engine_session is not None:
            engine_session.close()
        raise
    microphone = next((t for t in remote_tracks if t.kind == "audio"), None)
    return Session(id=session_id, pc=pc, engine=engine_session, input=AudioInput(engine_session),
                   clock=clock, video=video, audio=audio, remote=remote,
                   microphone=microphone if _peer_sends_audio(pc) else None, options=options)


def start_session(state: ServerState, session: Session) -> None:
    """The session's own tasks: the microphone reader, or a drain for audio nobody listens to."""
    if not _we_send_audio(session.pc):
        # Nobody pulls the delayed audio: drain it at its pace anyway, so the engine's output clock
        # and buffers move exactly as with a listening peer.
        session.spawn(drain(session.audio, session.clock), "audio-drain")
    if session.microphone is not None:
        session.spawn(pump_microphone(session.microphone, session.input.microphone,
                                      on_end=lambda: state.sessions.close(session.id, "microphone ended")),
                      "microphone")


def _we_send_audio(pc: RTCPeerConnection) -> bool:
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio" and transceiver.currentDirection in ("sendrecv", "sendonly"):
            return True
    return False


def _peer_sends_audio(pc: RTCPeerConnection) -> bool:
    """Whether the remote peer offered to send audio (sendrecv/sendonly from its side)."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio" and transceiver.currentDirection in ("sendrecv", "recvonly"):
            return True
    return False
