"""SessionManager: the live sessions, their limit, and reaping them whatever way they end.

A session ends exactly once, through `SessionManager.close(id, reason)`: on DELETE, on ICE/connection
failure, on a peer that never connects (`connect_timeout_s`), on a peer gone quiet (no packets for
`peer_timeout_s`: a browser that vanished without a goodbye), when the microphone track ends, and on
shutdown. Closing cancels every task the session owns, stops its tracks, closes the peer connection
and the engine session, so nothing is left behind.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Coroutine, Iterator

from aiortc import MediaStreamTrack, RTCPeerConnection

from realtime.metrics import SessionStats
from server.access.capacity import CapacityModel
from server.engine import EngineSession
from server.media.audio_input import AudioInput
from server.media.link_quality import LinkQuality
from server.media.nack_policy import NackStats
from server.media.tracks import AvatarVideoTrack, MediaClock, SyncedAudioTrack
from server.ops.heap import HeapTrimmer
from server.ops.session_totals import SessionTotals

log = logging.getLogger(__name__)


class ServerFull(Exception):
    def __init__(self, limit: int, retry_after_s: int) -> None:
        super().__init__(f"all {limit} sessions are in use; retry in {retry_after_s} s")
        self.limit = limit
        self.retry_after_s = retry_after_s


class UnknownSession(KeyError):
    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"no session {self.session_id!r}"


@dataclass(eq=False)
class Session:
    id: str
    pc: RTCPeerConnection
    engine: EngineSession
    input: AudioInput
    clock: MediaClock
    video: AvatarVideoTrack
    audio: SyncedAudioTrack
    remote: str = ""
    token: str = field(default="", repr=False)  # the session_token: never listed, logged or described
    created: float = field(default_factory=time.monotonic)
    connected: float | None = None
    microphone: MediaStreamTrack | None = None  # the peer's audio track, when it sends one
    options: dict[str, Any] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    link: LinkQuality = field(default_factory=LinkQuality)  # the receiver's reports (server/media/link_quality.py)
    nack: NackStats = field(default_factory=NackStats)  # video retransmissions (server/media/nack_policy.py)
    # Where server notices for this session go (its event feeds register here; called on the loop).
    notices: set[Callable[[dict[str, Any]], None]] = field(default_factory=set)

    def notify(self, message: dict[str, Any]) -> None:
        for deliver in list(self.notices):
            deliver(message)

    @property
    def has_microphone(self) -> bool:
        return self.microphone is not None

    @property
    def state(self) -> str:
        return "closed" if self.closed.is_set() else self.pc.connectionState

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a task owned by this session: it is cancelled when the session closes."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{name}[{self.id[:8]}]")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: task %s failed", self.id, task.get_name(), exc_info=task.exception())

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        stats = safe_metrics(self.engine)
        return {
            "id": self.id,
            "state": self.state,
            "remote": self.remote,
            "age_s": round(now - self.created, 3),
            "connected_s": None if self.connected is None else round(now - self.connected, 3),
            "microphone": self.has_microphone,
            "speaking": self.input.speaking,
            "queued_audio_s": round(self.input.queued_s, 3),
            "video_fps": round(self.video.stats.fps(now), 2),
            "video_frames": self.video.stats.frames,
            "video_skipped": self.video.stats.skipped,
            "audio_skipped": self.audio.stats.skipped,
            "pacer_av_offset_ms": round(1000 * self.pacer_av_offset_s(), 2),
            "link": self.link.describe(),
            "nack": asdict(self.nack),
            "engine": {} if stats is None else asdict(stats),
        }

    def pacer_av_offset_s(self) -> float:
        """How much later video frames leave than audio frames, relative to their timestamps."""
        return self.video.stats.lateness_s - self.audio.stats.lateness_s


def safe_metrics(engine: EngineSession) -> SessionStats | None:
    try:
        return engine.metrics()
    except Exception:  # metrics must never take a request down
        log.exception("engine metrics failed")
        return None


def new_session_id(instance_id: str = "") -> str:
    """A random id; with an instance id, "<instance>-<random>": the owner's name comes first so a load
    balancer in front of several front-ends can route a session's routes by prefix (docs/scaling.md)."""
    token = secrets.token_urlsafe(12)
    return f"{instance_id}-{token}" if instance_id else token


class SessionManager:
    def __init__(self, capacity: CapacityModel, connect_timeout_s: float = 10.0,
                 peer_timeout_s: float = 4.0, disconnect_grace_s: float = 5.0,
                 trimmer: HeapTrimmer | None = None) -> None:
        self.capacity = capacity  # how many sessions may be live: measured (server/access/capacity.py) or fixed
        # Called after every change of the live or negotiating count (--workers: publish to the board at
        # once, so the supervisor never routes an offer by a count a session old).
        self.on_change: Callable[[], None] | None = None
        self.connect_timeout_s = connect_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self.disconnect_grace_s = disconnect_grace_s
        self._sessions: dict[str, Session] = {}
        self._reserved = 0
        self._closing: dict[str, asyncio.Task[None]] = {}
        self.opened_total = 0
        self.rejected_total = 0
        self.closed_total: dict[str, int] = {}
        self.retired = SessionTotals()  # engine figures of ended sessions
        self.trimmer = trimmer or HeapTrimmer(enabled=False)  # gives ended sessions' memory back

    # -- capacity ----------------------------------------------------------------------------------

    @property
    def max_sessions(self) -> int:
        """Sessions admitted in all now (live + negotiating): the capacity model's limit."""
        return self.capacity.limit(len(self._sessions))

    def free_slots(self) -> int:
        """Offers that would be admitted now: what /healthz tells a load balancer."""
        return max(self.max_sessions - len(self._sessions) - self._reserved, 0)

    @property
    def held(self) -> int:
        """Live and negotiating sessions."""
        return len(self._sessions) + self._reserved

    def reserve(self) -> "Reservation":
        """Claim a slot for a session being negotiated; raises ServerFull."""
        limit = self.max_sessions
        if len(self._sessions) + self._reserved >= limit:
            self.rejected_total += 1
            raise ServerFull(limit, retry_after_s=self.retry_hint_s())
        self._reserved += 1
        self._changed()
        return Reservation(self)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def retry_hint_s(self) -> int:
        return self.capacity.retry_after_s()

    def ticks(self) -> Iterator[tuple[str, int, int]]:
        """(id, video ticks, late ticks) of each live session, for the capacity monitor: a tick is late
        when the pacer skipped it or its speech frame's render missed its deadline."""
        for session in self:
            dropped = session.engine.frames_dropped()
            yield session.id, session.video.stats.frames + session.video.stats.skipped, \
                session.video.stats.skipped + dropped

    # -- lookup ------------------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(session_id)
        return session

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    # -- lifecycle ---------------------------------------------------------------------------------

    def add(self, session: Session, reservation: "Reservation") -> None:
        self._sessions[session.id] = session
        reservation.release()
        self.opened_total += 1
        session.pc.on("connectionstatechange", lambda: self._on_state(session))
        for track in (session.video, session.audio):
            track.on("ended", lambda kind=track.kind: self._on_track_ended(session, kind))
        session.spawn(self._watch(session), "watchdog")

    def close(self, session_id: str, reason: str) -> asyncio.Task[None] | None:
        """Start closing a session (idempotent); returns the closing task, None if unknown."""
        if session_id in self._closing:
            return self._closing[session_id]
        session = self._sessions.get(session_id)
        if session is None:
            return None
        task = asyncio.get_running_loop().create_task(self._close(session, reason),
                                                      name=f"close[{session_id[:8]}]")
        self._closing[session_id] = task
        return task

    async def close_and_wait(self, session_id: str, reason: str) -> None:
        task = self.close(session_id, reason)
        if task is None:
            raise UnknownSession(session_id)
        await asyncio.shield(task)

    async def close_all(self, reason: str) -> None:
        tasks = [self.close(s.id, reason) for s in self]
        tasks += list(self._closing.values())
        await asyncio.gather(*[t for t in tasks if t is not None], return_exceptions=True)

    async def _close(self, session: Session, reason: str) -> None:
        session.close_reason = reason
        session.closed.set()
        try:
            current = asyncio.current_task()
            owned = [t for t in session.tasks if t is not current]
            for task in owned:
                task.cancel()
            session.video.stop()
            session.audio.stop()
            try:
                await session.pc.close()
            except Exception:
                log.exception("session %s: closing the peer connection failed", session.id)
            await asyncio.gather(*owned, return_exceptions=True)
            stats = safe_metrics(session.engine)
            if stats is not None:
                self.retired.add(stats)
            try:
                session.engine.close()
            except Exception:
                log.exception("session %s: closing the engine session failed", session.id)
        finally:
            self._sessions.pop(session.id, None)
            self._closing.pop(session.id, None)
            self._changed()
            key = reason.split(":", 1)[0]
            self.closed_total[key] = self.closed_total.get(key, 0) + 1
            self.trimmer.request()
        log.info("session closed", extra={"session": session.id, "reason": reason,
                                          "duration_s": round(time.monotonic() - session.created, 2),
                                          "sessions": len(self._sessions)})

    # -- reaping -----------------------------------------------------------------------------------

    def _on_state(self, session: Session) -> None:
        state = session.pc.connectionState
        log.info("session %s: connection %s", session.id, state, extra={"session": session.id})
        if state == "connected" and session.connected is None:
            session.connected = time.monotonic()
        elif state in ("failed", "closed"):
            self.close(session.id, f"connection {state}")

    def _on_track_ended(self, session: Session, kind: str) -> None:
        """An outgoing track stopped while the session is live: aiortc's sender stops its track when the
        encoder (or anything else in its send loop) raises, and then sends nothing more, ever. End that
        session with a reason instead of leaving a frozen peer; the others are untouched. (When the
        session closes for any other reason it is already closing here, and this does nothing.)"""
        if session.id in self._closing or session.closed.is_set():
            return
        if session.pc.signalingState == "closed":
            return  # the peer connection is closing (it stops its senders first): "connection closed" follows
        transport = dtls_state(session.pc)
        if transport != "connected":
            # The peer hung up (DTLS close_notify): the send loop ended on the closed transport before
            # aiortc's own close reports the connection state.
            self.close(session.id, f"connection {transport}")
            return
        self.close(session.id, f"error: the {kind} sender stopped (encoder failed)")

    async def _watch(self, session: Session) -> None:
        """Reap a peer that never connects, stays disconnected, or stops sending anything."""
        deadline = session.created + self.connect_timeout_s
        while session.connected is None:
            if time.monotonic() >= deadline:
                self.close(session.id, f"timeout: peer never connected in {self.connect_timeout_s:g} s")
                return
            await asyncio.sleep(0.25)
        await self._watch_connected(session)

    async def _watch_connected(self, session: Session) -> None:
        """Media inactivity, not ICE consent: a live peer sends RTCP receiver reports for the avatar
        video at least every ~1.5 s (aiortc: 0.5-1.5 s; Chrome: ~1 s for video, plus transport-cc
        feedback), and RTP when it has a microphone. No packet at all for `peer_timeout_s` means it is
        gone; ICE consent expiry alone would take ~30 s (and aiortc never fails it on a silent peer)."""
        last_packets, last_change = -1, time.monotonic()
        disconnected_since: float | None = None
        period = min(0.5, self.peer_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if session.pc.connectionState == "disconnected":
                disconnected_since = disconnected_since or now
                if now - disconnected_since >= self.disconnect_grace_s:
                    self.close(session.id, "timeout: peer disconnected")
                    return
            else:
                disconnected_since = None
            packets = await received_packets(session.pc)
            if packets != last_packets:
                last_packets, last_change = packets, now
            elif now - last_change >= self.peer_timeout_s:
                self.close(session.id, f"timeout: nothing received for {self.peer_timeout_s:g} s")
                return


def dtls_state(pc: RTCPeerConnection) -> str:
    """The state of the connection's (bundled) DTLS transport: "connected" while media can flow."""
    states = {t.sender.transport.state for t in pc.getTransceivers() if t.sender.transport is not None}
    for state in ("failed", "closed", "connecting", "new"):
        if state in states:
            return state
    return "connected" if states else "new"


async def received_packets(pc: RTCPeerConnection) -> int:
    """Packets (RTP/RTCP/DTLS) received on the connection's transports so far."""
    total = 0
    try:
        report = await pc.getStats()
    except Exception:
        return -1
    for stats in report.values():
        if getattr(stats, "type", None) == "transport":
            total += getattr(stats, "packetsReceived", 0) or 0
    return total


class Reservation:
    """A session slot held while its offer is being answered."""

    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._manager._reserved -= 1
            self._manager._changed()

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
