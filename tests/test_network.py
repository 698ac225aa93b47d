"""A live session through the impairment relay (bench/netimpair.py), seeded: NACKed packets resent, a lost
keyframe repaired by PLI (rate-limited), the Opus encoder told the reported loss, a 3 s outage survived,
a longer one ending the session with a reason."""
from __future__ import annotations

import asyncio
import re
import time

import pytest
from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket
from server_helpers import Client, PcmTrack, start_server, tiny_engine

from bench.netimpair import (
    GilbertElliott,
    Impairment,
    Relay,
    negotiate_through,
    rtp_payload_type,
    use_give_up_jitter_buffer,
)
from server.media import encoders
from server.media.link_quality import VideoRateControl, sender_encoder
from server.state import STATE

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def engine():
    engine = tiny_engine()
    yield engine
    engine.close()


def payload_types(sdp: str) -> dict[str, int]:
    """{"video": VP8's payload type, "rtx": its RTX type, "audio": Opus'} from an SDP."""
    types: dict[str, int] = {}
    for pt, name in re.findall(r"a=rtpmap:(\d+) ([\w-]+)/", sdp):
        if name.lower() == "vp8" and "video" not in types:
            types["video"] = int(pt)
        if name.lower() == "opus":
            types["audio"] = int(pt)
    video = types.get("video")
    for pt, apt in re.findall(r"a=fmtp:(\d+) apt=(\d+)", sdp):
        if video is not None and int(apt) == video:
            types["rtx"] = int(pt)
    return types


async def connect_through(client: Client, relay: Relay, microphone=None) -> dict[str, int]:
    if microphone is not None:
        client.pc.addTrack(microphone)
    else:
        client.pc.addTransceiver("audio", direction="recvonly")
    client.pc.addTransceiver("video", direction="recvonly")
    use_give_up_jitter_buffer(client.pc)  # a browser's receiver: a hole is waited for 0.2 s, then a PLI

    async def post(sdp: str) -> str:
        async with client.http.post(client.server.endpoint("/offer"), json={"sdp": sdp, "type": "offer"},
                                    headers={"Content-Type": "application/json"}) as resp:
            client.answer = await resp.json()
            assert resp.status == 200, client.answer
        client.session_id = client.answer["session_id"]
        client.token = client.answer["session_token"]
        return client.answer["sdp"]

    await negotiate_through(relay, client.pc, post)
    return payload_types(client.answer["sdp"])


def server_session(server, client: Client):
    return server.app[STATE].sessions.get(client.session_id)


def video_encoder(session):
    sender = next(s for s in session.pc.getSenders() if s.kind == "video")
    return sender_encoder(sender)


async def frames_after(client: Client, t0: float, count: int, within_s: float) -> float:
    """Seconds from t0 until `count` video frames have arrived after t0."""
    deadline = t0 + within_s
    while True:
        arrived = [a for a, _, _ in client.received.video if a >= t0]
        if len(arrived) >= count:
            return arrived[count - 1] - t0
        assert time.monotonic() < deadline, f"{len(arrived)} of {count} frames within {within_s} s"
        await asyncio.sleep(0.02)


async def test_nacked_video_packets_are_resent(engine, http, loopback_only):
    server = await start_server(engine)
    relay = await Relay(down=Impairment(loss=0.05), seed=11).start()
    client = Client(server, http)
    try:
        types = await connect_through(client, relay)
        assert "rtx" in types
        await client.wait_for_video(10, within_s=20)
        t0 = time.monotonic()
        await asyncio.sleep(4.0)
        down = relay.rtp["down"]
        lost = down.dropped.get(types["video"], 0)
        resent = down.packets.get(types["rtx"], 0)
        assert lost >= 3
        # Every lost video packet is NACKed and resent over RTX (a NACK or RTX packet can be lost too).
        assert resent >= 0.6 * lost, (lost, resent)
        frames = len([a for a, _, _ in client.received.video if a >= t0])
        assert frames >= 0.9 * 25 * 4.0 - 5
    finally:
        await client.close()
        relay.close()
        await server.stop()


async def test_lost_keyframe_is_repaired_by_pli(engine, http, loopback_only):
    server = await start_server(engine)
    relay = await Relay(seed=3).start()
    client = Client(server, http)
    dropped = {"n": 0}
    types: dict[str, int] = {}

    def drop_first_video(data: bytes) -> bool:
        """The first 10 video packets (the first keyframe and what follows) and every retransmission."""
        pt = rtp_payload_type(data)
        if pt == types.get("rtx"):
            return True
        if pt == types.get("video") and dropped["n"] < 10:
            dropped["n"] += 1
            return True
        return False

    try:
        client.pc.on("track", lambda track: None)
        # The rule must be in place before the first packet: the answer's types are known only after
        # the offer, and no media flows before ICE, so set it from inside the post.
        relay.filters["down"] = lambda data: bool(types) and drop_first_video(data)
        types.update(await connect_through(client, relay))
        session_start = time.monotonic()
        await client.wait_for_video(5, within_s=20)
        assert dropped["n"] == 10
        encoder = video_encoder(server_session(server, client))
        assert encoder.__dict__.get("keyframes_forced", 0) >= 1   # the PLI made one
        assert client.received.video[0][0] - session_start < 5.0
    finally:
        await client.close()
        relay.close()
        await server.stop()


def test_keyframe_requests_are_rate_limited_and_never_dropped():
    encoder = encoders.RealtimeVp8Encoder()
    t = 100.0
    assert encoder._keyframe_due(True, now=t) is True
    assert encoder._keyframe_due(True, now=t + 0.1) is False      # inside the interval: kept pending
    assert encoder._keyframe_due(False, now=t + 0.2) is False
    assert encoder._keyframe_due(True, now=t + 0.3) is False
    assert encoder._keyframe_due(False, now=t + encoders.KEYFRAME_MIN_INTERVAL_S) is True  # served
    assert encoder._keyframe_due(False, now=t + 2.0) is False     # one keyframe for three requests
    assert encoder.__dict__["keyframes_forced"] == 2


async def test_pli_burst_makes_one_keyframe_per_interval(engine, http, loopback_only):
    server = await start_server(engine)
    relay = await Relay().start()
    client = Client(server, http)
    try:
        types = await connect_through(client, relay)
        assert types
        await client.wait_for_video(10, within_s=20)
        encoder = video_encoder(server_session(server, client))
        before = encoder.__dict__.get("keyframes_forced", 0)
        receiver = next(t.receiver for t in client.pc.getTransceivers() if t.kind == "video")
        ssrc = next(s for s in receiver.getSynchronizationSources()).source
        for _ in range(10):   # ten PLIs in 0.2 s
            await receiver._send_rtcp(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=receiver._RTCRtpReceiver__rtcp_ssrc,
                                                     media_ssrc=ssrc))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.8)
        forced = encoder.__dict__.get("keyframes_forced", 0) - before
        assert 1 <= forced <= 2, forced
    finally:
        await client.close()
        relay.close()
        await server.stop()


async def test_reported_audio_loss_turns_on_opus_fec(engine, http, loopback_only, speech_16k):
    server = await start_server(engine)
    relay = await Relay(down=Impairment(burst=GilbertElliott.for_loss(0.08, 2.0)), seed=5).start()
    client = Client(server, http)
    try:
        await connect_through(client, relay, microphone=PcmTrack(speech_16k))
        await client.wait_for_video(10, within_s=20)
        session = server_session(server, client)
        audio = next(s for s in session.pc.getSenders() if s.kind == "audio")
        deadline = time.monotonic() + 15
        # aiortc computes the rtt only from a report on its latest sender report: it can take a few.
        while not (sender_encoder(audio) is not None and sender_encoder(audio).loss_pct > 0
                   and session.link.describe()["rtt_ms"] is not None):
            assert time.monotonic() < deadline, session.link.describe()
            await asyncio.sleep(0.2)
        async with http.get(client.url(), headers=client.auth) as resp:
            link = (await resp.json())["link"]
        assert link["loss_pct"] > 0 and link["rtt_ms"] is not None
    finally:
        await client.close()
        relay.close()
        await server.stop()


async def test_three_second_outage_is_survived_and_video_resumes(engine, http, loopback_only):
    server = await start_server(engine, peer_timeout_s=4.0)
    relay = await Relay(seed=1).start()
    client = Client(server, http)
    try:
        await connect_through(client, relay)
        await client.wait_for_video(25, within_s=20)
        relay.outage(3.0)
        await asyncio.sleep(3.0)
        back = time.monotonic()
        resumed = await frames_after(client, back, 5, within_s=5.0)
        assert resumed < 1.0 + 0.2   # 5 frames = 0.16 s of video at 25 fps
        session = server_session(server, client)
        assert not session.closed.is_set()
        # No burst of stale frames: what arrives in the first second after the outage is at most
        # about a second's worth (plus what NACK repairs of the last moment before it).
        await asyncio.sleep(1.0)
        burst = [a for a, _, _ in client.received.video if back <= a < back + 1.0]
        assert len(burst) <= 25 + 8
    finally:
        await client.close()
        relay.close()
        await server.stop()


async def test_outage_longer_than_the_peer_timeout_ends_the_session(engine, http, loopback_only):
    server = await start_server(engine, peer_timeout_s=2.0)
    relay = await Relay(seed=1).start()
    client = Client(server, http)
    try:
        await connect_through(client, relay)
        await client.wait_for_video(10, within_s=20)
        session = server_session(server, client)
        relay.outage(6.0)
        await asyncio.wait_for(session.closed.wait(), timeout=5.0)
        assert session.close_reason.startswith("timeout: nothing received")
    finally:
        await client.close()
        relay.close()
        await server.stop()


def test_video_rate_control_steps_down_on_loss_and_queueing_then_back_up():
    control = VideoRateControl()
    assert control.update(0.0, 40.0, 500_000) is None          # clean: uncapped, REMB rules
    cap = control.update(0.20, 45.0, 500_000)                   # 20 % loss: -10 %
    assert cap == 450_000
    cap = control.update(0.05, 45.0, cap)                       # between: hold
    assert cap == 450_000
    cap = control.update(0.0, 45.0 + 150.0, cap)                # a queue builds (rtt +150 ms): -15 %
    assert cap == int(450_000 * 0.85)
    for _ in range(3):
        cap = control.update(0.0, 45.0, cap)                    # clean again: +8 % a report
    assert cap == int(450_000 * 0.85 * 1.08 ** 3)
    while cap is not None:
        cap = control.update(0.0, 45.0, cap)
    assert control.cap is None                                  # back to uncapped at the ceiling
    for _ in range(50):
        cap = control.update(0.5, None, cap or 500_000)
    assert cap == control.floor


def test_encoder_target_is_remb_capped_within_bounds():
    encoder = encoders.RealtimeVp8Encoder()
    assert encoder.target_bitrate == 500_000                    # aiortc's default before any REMB
    encoder.target_bitrate = 1_200_000                          # what aiortc's sender does on REMB
    assert encoder.target_bitrate == 1_200_000
    encoder.set_bitrate_cap(300_000)
    assert encoder.target_bitrate == 300_000
    encoder.set_bitrate_cap(10_000)
    assert encoder.target_bitrate == encoders.RealtimeVp8Encoder.MIN_BPS
    encoder.set_bitrate_cap(None)
    encoder.target_bitrate = 10_000_000
    assert encoder.target_bitrate == encoders.RealtimeVp8Encoder.MAX_BPS


async def test_video_bitrate_steps_down_under_loss_and_back_up(engine, http, loopback_only):
    """The loss control's cap on a live session (the target is min(REMB, cap): the tiny test avatar's
    stream is so small that the client's REMB alone keeps its target near the floor, so the cap is
    what is checked here; the min is checked above)."""
    server = await start_server(engine)
    relay = await Relay(down=Impairment(loss=0.25), seed=9).start()
    client = Client(server, http)
    try:
        await connect_through(client, relay)
        await client.wait_for_video(5, within_s=20)
        session = server_session(server, client)
        encoder = video_encoder(session)

        def cap() -> float:
            value = encoder.__dict__.get("bitrate_cap")
            return float("inf") if value is None else float(value)

        start = encoder.MAX_BPS
        deadline = time.monotonic() + 15
        while cap() > 0.8 * start or session.link.video_control.steps_down < 2:
            assert time.monotonic() < deadline, session.link.describe()
            await asyncio.sleep(0.2)
        assert encoder.target_bitrate <= cap()
        relay.set("down", Impairment())
        await asyncio.sleep(1.5)   # the last lossy report may still come in
        low = cap()
        deadline = time.monotonic() + 15
        while cap() < 1.15 * low:
            assert time.monotonic() < deadline, (low, cap(), session.link.describe())
            await asyncio.sleep(0.2)
        assert session.link.video_control.steps_up >= 2
    finally:
        await client.close()
        relay.close()
        await server.stop()
