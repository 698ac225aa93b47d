"""POST /offer: an SDP offer in, the answer and a session id out.

The offer must ask to receive video (the avatar). If it also sends audio, that is the microphone; if
it asks to receive audio, the session sends the input audio delayed to match the video. Both outgoing
tracks are added by the same peer connection, so they share one MediaStream (one msid) and the
browser lip-syncs them.

Body: `{"sdp": "...", "type": "offer", "options": {"avatar": an id from GET /avatars (default: the
server's), "video_codec": "vp8"|"h264", ...engine options}}` (a top-level "avatar" is read as
options.avatar), parsed into an `OfferRequest` (every option type- and range-checked, 400 naming the bad
one; an unknown avatar 404, one still being prepared or failed 409). Answer: `{"sdp", "type": "answer",
"session_id", "session_token", "fps", "avatar", "max_session_s"}`: `session_token` is the secret the
session's routes need (server/access/auth.py). Offers are rate-limited per client address and count against
its session limit (server/access/limits.py). Before aiortc applies an offer, its ICE credentials and remote
candidates are screened (server/network/ice_filter.py: no probing of loopback, private or metadata addresses
from a public bind), and only audio and video m-lines are accepted (no data channel).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Iterator

from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpCodecCapability, RTCRtpSender, RTCSessionDescription
from aiortc.sdp import SessionDescription

from realtime.avatars.avatar_library import AvatarNotReady, UnknownAvatar
from realtime.timeline.session_options import SESSION_RULES, Choice, OptionError, Rule, SessionOptions
from server.access.auth import client_address, new_token
from server.access.surface import public_text
from server.config import ServerConfig
from server.errors import ApiError, read_json
from server.media import audio_jitter, nack_policy, pacer
from server.media.audio_input import AudioInput
from server.media.link_quality import watch_link
from server.media.tracks import AvatarVideoTrack, MediaClock, SyncedAudioTrack, drain, pump_microphone
from server.network.ice import ice_servers, rtc_configuration
from server.network.ice_filter import CandidatePolicy, screen_offer
from server.sessions import ServerFull, Session, new_session_id
from server.state import ServerState, state_of

log = logging.getLogger(__name__)

MAX_SDP_CHARS = 64 * 1024
VIDEO_CODECS = {"vp8": "video/VP8", "h264": "video/H264"}


# Every option a client may set in an offer: the session's (realtime/timeline/session_options.py) and the codec.
OPTION_RULES: dict[str, Rule] = {**SESSION_RULES, "video_codec": Choice(tuple(VIDEO_CODECS))}


@dataclass(frozen=True)
class OfferOptions(SessionOptions):
    """The validated `options` of an offer: the session's options (handed to `Engine.open_session` as they
    are) plus the video codec, which only the server's tracks read."""

    RULES: ClassVar[dict[str, Rule]] = OPTION_RULES

    video_codec: str | None = None

    @classmethod
    def from_dict(cls, options: object) -> "OfferOptions":
        try:
            return cls.from_mapping(options)
        except OptionError as exc:
            raise ApiError(400, str(exc)) from None


@dataclass(frozen=True)
class OfferRequest:
    """The body of POST /offer, validated: `{"sdp", "type": "offer", "options"?}` (a top-level "avatar"
    is read as options.avatar)."""

    sdp: str  # with the remote candidates `policy` refuses already removed (server/network/ice_filter.py)
    kinds: tuple[str, ...]  # media kinds of the offer's m-lines
    options: OfferOptions = field(default_factory=OfferOptions)
    candidates_dropped: int = 0

    @classmethod
    def from_dict(cls, body: dict[str, Any], policy: CandidatePolicy) -> "OfferRequest":
        sdp, kind = body.get("sdp"), body.get("type", "offer")
        if not isinstance(sdp, str) or not sdp.strip():
            raise ApiError(400, "missing 'sdp': expected {\"sdp\": \"v=0...\", \"type\": \"offer\"}")
        if kind != "offer":
            raise ApiError(400, f"'type' must be 'offer', got {str(kind)[:40]!r}")
        if len(sdp) > MAX_SDP_CHARS:
            raise ApiError(413, f"SDP larger than {MAX_SDP_CHARS} characters")
        if not sdp.lstrip().startswith("v=0"):
            raise ApiError(400, "malformed SDP: it must start with 'v=0'")
        screened = screen_offer(sdp, policy)  # before aiortc sees it: caps, ICE grammar, candidates
        kinds = _media_kinds(screened.sdp)
        raw = body.get("options")
        if body.get("avatar") and (raw is None or (isinstance(raw, dict) and "avatar" not in raw)):
            raw = {**(raw or {}), "avatar": body["avatar"]}
        return cls(sdp=screened.sdp, kinds=kinds, options=OfferOptions.from_dict(raw),
                   candidates_dropped=screened.dropped)

    def description(self) -> RTCSessionDescription:
        return RTCSessionDescription(sdp=self.sdp, type="offer")


def _media_kinds(sdp: str) -> tuple[str, ...]:
    try:
        kinds = tuple(m.kind for m in SessionDescription.parse(sdp).media)
    except Exception as exc:  # aiortc's parser raises whatever it meets; all of it is a bad request
        raise ApiError(400, f"malformed SDP: {type(exc).__name__} {exc}".rstrip()[:300]) from None
    if set(kinds) - {"audio", "video"}:
        raise ApiError(400, "the offer may only have audio and video m-lines (no data channel): "
                            f"got {sorted(set(kinds) - {'audio', 'video'})}")
    if "video" not in kinds:
        raise ApiError(400, "the offer has no video m-line: add a recvonly video transceiver "
                            "to receive the avatar")
    if kinds.count("video") > 1 or kinds.count("audio") > 1:
        raise ApiError(400, "the offer must have one video m-line and at most one audio m-line")
    return kinds


def parse_offer(body: dict[str, Any], state: ServerState) -> OfferRequest:
    """The request body validated against this server (its avatars: 404 unknown, 409 not ready), before
    any work is done for it."""
    offer = OfferRequest.from_dict(body, candidate_policy(state.config))
    if offer.options.avatar is not None:
        with avatar_refusals():
            state.engine.avatars.ready(offer.options.avatar)
    return offer


def candidate_policy(config: ServerConfig) -> CandidatePolicy:
    """Which remote ICE candidates this server may probe: from its bind and --ice-allow-private. A server
    behind a reverse proxy or with a public name is bound to loopback but reached from the internet: a
    stranger's offer must not make it probe its own machine, so it is screened as a public bind."""
    public = bool(config.public_urls) or bool(config.trusted_proxies)
    policy = CandidatePolicy.for_bind(config.host, allow_private=config.ice_allow_private, public=public)
    if config.ice_allow_loopback:
        return replace(policy, allow_loopback=True)
    return policy


@contextlib.contextmanager
def avatar_refusals() -> Iterator[None]:
    """The avatar library's refusals as answers: 404 for an id it does not have, 409 for one not ready
    (its preparation error without the server's paths)."""
    try:
        yield
    except UnknownAvatar as exc:
        raise ApiError(404, str(exc)) from None
    except AvatarNotReady as exc:
        raise ApiError(409, public_text(str(exc))) from None


def video_codecs(codec: str) -> list[RTCRtpCodecCapability]:
    """Capabilities for one video codec (every profile of it) plus RTX."""
    mime = VIDEO_CODECS[codec.lower()]
    caps = RTCRtpSender.getCapabilities("video").codecs
    return [c for c in caps if c.mimeType == mime] + [c for c in caps if c.mimeType == "video/rtx"]


async def handle_offer(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.closing or state.draining:
        raise ApiError(503, "the server is restarting", {"Retry-After": "10"}, retry_after_s=10)
    address = client_address(request)
    state.limits.check_rate(address)
    offer = parse_offer(await read_json(request), state)
    state.limits.check_sessions(address, (s.remote for s in state.sessions))
    try:
        reservation = state.sessions.reserve()
    except ServerFull as exc:
        raise ApiError(503, str(exc), {"Retry-After": str(exc.retry_after_s)},
                       retry_after_s=exc.retry_after_s, max_sessions=exc.limit) from None
    started = time.monotonic()
    with reservation, state.limits.negotiating(address):
        session = await answer_offer(state, offer, remote=address)
        state.sessions.add(session, reservation)
    start_session(state, session)
    state.offer_seconds.observe(time.monotonic() - started)
    log.info("session opened", extra={"session": session.id, "remote": session.remote,
                                      "media": ",".join(offer.kinds), "microphone": session.has_microphone,
                                      "candidates_dropped": offer.candidates_dropped,
                                      "sessions": len(state.sessions)})
    return web.json_response({
        "sdp": session.pc.localDescription.sdp,
        "type": session.pc.localDescription.type,
        "session_id": session.id,
        "session_token": session.token,  # the only time it is sent: the session's routes need it
        "fps": session.engine.fps,  # its avatar's
        "avatar": session.engine.avatar_id,
        "max_session_s": state.config.max_session_s,
    })


async def answer_offer(state: ServerState, offer: OfferRequest, remote: str) -> Session:
    """A peer connection answering `offer`, with the engine session and tracks behind it. On any
    failure everything made so far is closed again."""
    session_id = new_session_id(state.config.instance_id)
    # The server's own side takes --ice-server entries only, no TURN REST allocation: the relay runs beside
    # the server, whose host candidates it reaches, so a server-side allocation per session would only
    # double the relay's load and quota.
    pc = RTCPeerConnection(configuration=rtc_configuration(ice_servers(state.config)))
    remote_tracks: list[MediaStreamTrack] = []
    pc.on("track", remote_tracks.append)
    engine_session = None
    try:
        try:
            with avatar_refusals():  # an avatar removed between the check and here
                engine_session = state.engine.open_session(offer.options, name=session_id)
        except ValueError as exc:  # what this server cannot do for valid options (a paste mode)
            raise ApiError(400, f"bad session options: {exc}") from None
        fps = engine_session.fps  # the session's avatar's

        def engine_failed(exc: BaseException) -> None:
            state.sessions.close(session_id, f"error: engine failed ({type(exc).__name__})")

        clock = MediaClock()
        # Our transceivers exist before the offer is applied, so it binds to them (and our codec
        # preference counts when the answer is made).
        video = AvatarVideoTrack(engine_session, fps, clock, engine_failed, executor=state.frame_pool)
        video_transceiver = pc.addTransceiver(video, direction="sendonly")
        nack = nack_policy.apply(video_transceiver.sender)  # no stale frames resent; a keyframe instead
        if offer.options.video_codec:
            video_transceiver.setCodecPreferences(video_codecs(offer.options.video_codec))
        audio = SyncedAudioTrack(engine_session, clock, engine_failed)
        if "audio" in offer.kinds:
            pc.addTransceiver(audio, direction="sendrecv")
        try:
            await pc.setRemoteDescription(offer.description())
        except Exception as exc:
            raise ApiError(400, f"the SDP offer was refused: {type(exc).__name__} {exc}".rstrip()[:300]) from None
        pacer.install(video_transceiver.sender)  # after BUNDLE set its transport: a keyframe is no burst
        await pc.setLocalDescription(await pc.createAnswer())
        audio_jitter.install(pc)  # the microphone's delay must not creep up after a lost packet
    except BaseException:
        await pc.close()
        if engine_session is not None:
            engine_session.close()
        raise
    microphone = next((t for t in remote_tracks if t.kind == "audio"), None)
    return Session(id=session_id, pc=pc, engine=engine_session, input=AudioInput(engine_session),
                   clock=clock, video=video, audio=audio, remote=remote, token=new_token(),
                   microphone=microphone if _peer_sends_audio(pc) else None,
                   options=asdict(offer.options), nack=nack)


def start_session(state: ServerState, session: Session) -> None:
    """The session's own tasks: the microphone reader, or a drain for audio nobody listens to."""
    if not _we_send_audio(session.pc):
        # Nobody pulls the delayed audio: drain it at its pace anyway, so the engine's output clock
        # and buffers move exactly as with a listening peer.
        session.spawn(drain(session.audio, session.clock), "audio-drain")
    if session.microphone is not None:
        session.spawn(pump_microphone(session.microphone, session.input.microphone,
                                      on_end=lambda: _close(state, session, "microphone ended")),
                      "microphone")
    session.spawn(_end_after(state, session, state.config.max_session_s), "max-session")
    session.spawn(watch_link(session.pc, session.link, session.video), "link-quality")


def _close(state: ServerState, session: Session, reason: str) -> None:
    state.sessions.close(session.id, reason)


async def _end_after(state: ServerState, session: Session, seconds: float) -> None:
    """--max-session-s: a session cannot hold its slot forever."""
    await asyncio.sleep(seconds)
    state.sessions.close(session.id, f"limit: session reached --max-session-s {seconds:g} s")


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
