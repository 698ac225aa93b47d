"""Guards for the aiortc / aioice internals the server replaces or relies on (listed in ARCHITECTURE.md).

Each patch works only while aiortc and aioice look the patched name up where we replace it. A release
that moves the lookup would not fail anywhere: the server would silently run aiortc's desktop encoder
settings, or offer interfaces it was told not to. These tests run the real libraries end to end over
loopback and check that the replacement is what actually ran.
"""
from __future__ import annotations

import asyncio
import fractions
import ipaddress

import aioice.ice
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, VideoStreamTrack
from aiortc.codecs.g711 import PcmuEncoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.sdp import SessionDescription
from av import AudioFrame, VideoFrame

from server.media import encoders
from server.media.opus_encoder import RealtimeOpusEncoder
from server.network.ice import rtc_configuration, use_host_addresses


class _MovingPattern(VideoStreamTrack):
    """A small moving test picture at aiortc's video clock."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        image = np.zeros((96, 128, 3), np.uint8)
        image[:, (4 * self.count) % 128:] = 200
        self.count += 1
        frame = VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts, frame.time_base = pts, time_base
        return frame


def _candidate_addresses(sdp: str) -> set[str]:
    return {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}


async def _connect_and_send(mime: str) -> tuple[object, set[str], set[str]]:
    """Two aiortc peers over loopback; the sender offers only `mime`. Returns the sender's encoder once
    the receiver has decoded a frame, and both peers' candidate addresses."""
    sender_pc = RTCPeerConnection(rtc_configuration([]))
    receiver_pc = RTCPeerConnection(rtc_configuration([]))
    received: asyncio.Future = asyncio.get_running_loop().create_future()
    readers: list[asyncio.Task] = []

    @receiver_pc.on("track")
    def on_track(track) -> None:
        async def first_frame() -> None:
            frame = await track.recv()
            if not received.done():
                received.set_result(frame)
        readers.append(asyncio.ensure_future(first_frame()))

    try:
        transceiver = sender_pc.addTransceiver(_MovingPattern(), direction="sendonly")
        codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() == mime]
        transceiver.setCodecPreferences(codecs)
        await sender_pc.setLocalDescription(await sender_pc.createOffer())
        await receiver_pc.setRemoteDescription(sender_pc.localDescription)
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender_pc.setRemoteDescription(receiver_pc.localDescription)
        await asyncio.wait_for(received, timeout=20)
        # The encoder aiortc's RTCRtpSender made for this stream (a private, name-mangled attribute:
        # exactly the internal this test guards).
        encoder = transceiver.sender._RTCRtpSender__encoder
        return (encoder, _candidate_addresses(sender_pc.localDescription.sdp),
                _candidate_addresses(receiver_pc.localDescription.sdp))
    finally:
        for reader in readers:
            reader.cancel()
        await sender_pc.close()
        await receiver_pc.close()


@pytest.fixture
def realtime_encoders(monkeypatch):
    import aiortc.rtcrtpsender

    monkeypatch.setattr(aiortc.rtcrtpsender, "get_encoder", aiortc.rtcrtpsender.get_encoder)
    encoders.install()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("mime", "cls"), [
    ("video/vp8", encoders.RealtimeVp8Encoder),
    ("video/h264", encoders.RealtimeH264Encoder),
])
async def test_a_live_sender_encodes_with_the_realtime_encoder(realtime_encoders, loopback_only, mime, cls):
    """server/media/encoders.py: RTCRtpSender must call `aiortc.rtcrtpsender.get_encoder` per sender, and the
    encoder must keep its codec context in `self.codec` (so that our overrides reach the codec it opens;
    tests/test_server_encoding.py checks what the overrides do to the stream)."""
    encoder, _, _ = await _connect_and_send(mime)
    assert type(encoder) is cls, type(encoder)
    codec = encoder.codec
    assert isinstance(codec, encoders.TunedContext), type(codec)
    assert codec.is_open  # the context aiortc opened and encodes with is the tuned one
    if cls is encoders.RealtimeH264Encoder:
        assert codec.thread_count == encoders.H264_THREADS


@pytest.mark.timeout(60)
async def test_aioice_gathers_host_candidates_through_the_replaced_function():
    """server/network/ice.py: aioice's Connection.gather_candidates must look up `aioice.ice.get_host_addresses`
    at call time: with 127.0.0.1 installed (which aioice itself never offers) every candidate is on it."""
    calls: list[tuple[bool, bool]] = []
    restore = use_host_addresses(["127.0.0.1"])
    policy = aioice.ice.get_host_addresses

    def spy(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        calls.append((use_ipv4, use_ipv6))
        return policy(use_ipv4=use_ipv4, use_ipv6=use_ipv6)

    aioice.ice.get_host_addresses = spy
    try:
        _, sender_addresses, receiver_addresses = await _connect_and_send("video/vp8")
    finally:
        aioice.ice.get_host_addresses = policy
        restore()
    assert calls, "aioice never called aioice.ice.get_host_addresses"
    assert sender_addresses == receiver_addresses == {"127.0.0.1"}
    assert all(ipaddress.ip_address(a).is_loopback for a in sender_addresses)


async def test_offer_media_kinds_come_from_aiortcs_sdp_parser():
    """server/routes/signaling.py validates offers with `aiortc.sdp.SessionDescription.parse` (not a public
    module): it must keep returning the m-lines with their kinds, in order."""
    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        offer = await pc.createOffer()
    finally:
        await pc.close()
    assert [m.kind for m in SessionDescription.parse(offer.sdp).media] == ["audio", "video"]



@pytest.mark.parametrize(("encoder_class", "rtp_rate"),
                         [(OpusEncoder, 48000), (RealtimeOpusEncoder, 48000), (PcmuEncoder, 8000)])
def test_audio_rtp_timestamps_follow_frame_pts_across_a_skip(encoder_class: type, rtp_rate: int) -> None:
    """SyncedAudioTrack skips a starved span by jumping frame.pts; the receiver sees the gap (and conceals
    it as loss) only while aiortc's audio encoders derive the RTP timestamp from frame.pts (through PyAV's
    resampler and codec), not from a count of the frames they were given."""
    encoder = encoder_class()
    rng = np.random.default_rng(0)

    def timestamp_of(frame_index: int) -> int | None:
        pcm = (rng.standard_normal((1, 320)) * 1000).astype(np.int16)
        frame = AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 16000
        frame.pts = frame_index * 320
        frame.time_base = fractions.Fraction(1, 16000)
        return encoder.encode(frame)[1]

    skipped = 5
    indices = list(range(10)) + list(range(10 + skipped, 20 + skipped))
    stamps = [ts for ts in map(timestamp_of, indices) if ts is not None]
    per_frame = rtp_rate // 50  # 20 ms at the codec's RTP clock
    assert set(np.diff(stamps).tolist()) == {per_frame, (skipped + 1) * per_frame}
