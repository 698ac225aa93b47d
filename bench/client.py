"""The benches' aiortc client (harness): one peer connection to the server, offer/answer, the session's
credential, and a reader task per received track.

Every WebRTC bench measures through the same client, so a change to how the page talks to the server
(the /offer body, the session token, loopback-only ICE) is made once. What a bench measures stays in the
bench: it subclasses `PeerClient` and overrides `on_frame` (called for every received audio or video
frame with its arrival time) and, when it tunes aiortc's receivers (jitter buffers), `tune`.

The server may be another checkout's (`--root` / `--repo`): the client only speaks HTTP and WebRTC to it,
so it works against any server that answers POST /offer with {sdp, session_id[, session_token]}.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp
import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError


class OfferRefused(RuntimeError):
    """The server answered the offer with an error status."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"offer refused: {status} {body}")
        self.status = status
        self.body = body


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for a session or operator token (none without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


async def local_offer(video_only: bool = True) -> str:
    """The SDP of a real aiortc offer (recvonly video, and audio unless `video_only`), its peer closed:
    for benches that send the server crafted or repeated offers."""
    pc = RTCPeerConnection(configuration=RTCConfiguration(iceServers=[]))
    try:
        if not video_only:
            pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


class PeerClient:
    """One aiortc peer of the server at `base_url` (its root, e.g. http://127.0.0.1:8080), receiving the
    avatar's audio and video; a microphone track is sent when `connect` is given one. No ICE servers:
    loopback host candidates only."""

    def __init__(self, base_url: str, http: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.pc = RTCPeerConnection(configuration=RTCConfiguration(iceServers=[]))
        self.session_id = ""
        self.token: str | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.pc.on("track", self.on_track)

    def endpoint(self, path: str) -> str:
        """The server's URL of `path` ("/offer", "/sessions/..."); a client of a server behind a proxy
        overrides it."""
        return f"{self.base_url}/{path.lstrip('/')}"

    @property
    def auth(self) -> dict[str, str]:
        """The session's routes need its token (server/access/auth.py)."""
        return bearer(self.token)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` for as long as the client: `close` cancels it."""
        self._tasks.append(asyncio.ensure_future(coro))

    def on_track(self, track: MediaStreamTrack) -> None:
        """Read a received track (registered on `pc`; register it again on a peer connection that replaces it)."""
        self.spawn(self._read(track))

    # -- hooks a bench overrides --------------------------------------------------------------------
    def tune(self, transceiver: RTCRtpTransceiver) -> None:
        """Called for each transceiver before the offer is made (e.g. to replace a jitter buffer)."""

    def on_frame(self, kind: str, frame: av.AudioFrame | av.VideoFrame, arrival: float) -> None:
        """Called for every received frame (`kind` "audio" or "video"), `arrival` on time.monotonic."""

    # -- the connection -------------------------------------------------------------------------------
    async def connect(self, microphone: MediaStreamTrack | None = None, *, audio: bool = True,
                      headers: dict[str, str] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Offer (with `options` when given; without audio when `audio` is False and there is no
        microphone), apply the answer; returns the answer's JSON. Raises `OfferRefused` on an error status."""
        if microphone is not None:
            self.pc.addTrack(microphone)
        elif audio:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        for transceiver in self.pc.getTransceivers():
            self.tune(transceiver)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await self.offer(self.pc.localDescription.sdp, headers=headers, options=options)
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return answer

    async def offer(self, sdp: str, *, headers: dict[str, str] | None = None,
                    options: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /offer with `sdp` and take the session id and token from the answer, which it returns
        (the SDP exchange alone: a bench that rewrites the SDP on the way, e.g. through a relay, calls it
        with its own). Raises `OfferRefused` on an error status."""
        body: dict[str, Any] = {"sdp": sdp, "type": "offer"}
        if options is not None:
            body["options"] = options
        async with self.http.post(self.endpoint("/offer"), json=body, headers=headers or {}) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise OfferRefused(resp.status, answer)
        self.session_id = str(answer["session_id"])
        self.token = answer.get("session_token") or None
        return dict(answer)

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.on_frame(track.kind, frame, time.monotonic())

    async def stop_tasks(self) -> None:
        """End every task the client started (the track readers, a bench's own loops)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """End the client's tasks and close the peer connection."""
        await self.stop_tasks()
        await self.pc.close()
