"""A live session through the impairment relay (bench/netimpair.py), seeded: NACKed packets resent, a lost
keyframe repaired by PLI (rate-limited), the Opus encoder told the reported loss, a 3 s outage survived,
a longer one ending the session with a reason; on a thin link the video's size steps down and back up
(the ladder driven by a simulated link, and live)."""
from __future__ import annotations

import asyncio
import itertools
import re
import time

import numpy as np
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
from server.media.link_quality import VIDEO_STEPS, VideoLadder, VideoRateControl, sender_encoder
from server.media.tracks import FULL, AvatarVideoTrack, MediaClock, VideoStep, scaled_frame
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
        down = relay.rtp["down"]
        await asyncio.sleep(4.0)
        # The seeded relay drops 5 % of all datagrams; how many of them are video depends on the timing of
        # the others: watch up to 8 s more until at least 3 video packets were lost, then one more second
        # for their retransmissions.
        for _ in range(16):
            if down.dropped.get(types["video"], 0) >= 3:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        lost = down.dropped.get(types["video"], 0)
        resent = down.packets.get(types["rtx"], 0)
        assert lost >= 3
        # Every lost video packet is NACKed and resent over RTX (a NACK or RTX packet can be lost too).
        assert resent >= 0.6 * lost, (lost, resent)
        seconds = time.monotonic() - t0
        frames = len([a for a, _, _ in client.received.video if a >= t0])
        assert frames >= 0.9 * 25 * seconds - 5
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


# -- thin links: the video's size and frame rate (server/media/link_quality.py VideoLadder) ----------------------

def test_video_step_sizes_are_even_and_scaled_once():
    assert VideoStep(0.75).size(512, 512) == (384, 384)
    assert VideoStep(0.5).size(512, 512) == (256, 256)
    assert VideoStep(0.75).size(500, 282) == (376, 212)       # each side even, for 4:2:0
    assert FULL.size(511, 287) == (511, 287)                  # full size is the engine's own
    image = np.zeros((512, 512, 3), np.uint8)
    image[200:300, 200:300] = 255
    frame = scaled_frame(image, VideoStep(0.75))
    assert (frame.width, frame.height, frame.format.name) == (384, 384, "yuv420p")
    luma = frame.to_ndarray()[:384]
    assert luma[150:225, 150:225].mean() > 200 and luma[:100, :100].mean() < 30   # the picture, scaled
    with pytest.raises(ValueError):
        VideoStep(0.0)
    with pytest.raises(ValueError):
        VideoStep(1.0, 0)


def simulate_link(link_kbps: list[float], remb_max_bps: int = 1_200_000, audio_bps: int = 100_000,
                  base_rtt_ms: float = 40.0, queue_cap_ms: float = 200.0, size: int = 512, fps: float = 25.0):
    """One report a second: the encoder sends min(REMB, cap) of video plus the audio into a link of
    `link_kbps[t]` with a tail-drop queue; the receiver reports that second's loss and the rtt with the
    queue. REMB starts at the codec's default and grows 8 % a second up to `remb_max_bps` whatever the
    link does (the worst case: a receiver estimate that never sees the congestion, so only the loss/delay
    cap can act). Deterministic (no randomness: the rule is what is checked). Yields (second, cap, step)."""
    control, ladder = VideoRateControl(), VideoLadder()
    encoder = encoders.RealtimeVp8Encoder()
    remb = float(encoder.target_bitrate)
    queue_ms = 0.0
    for t, kbps in enumerate(link_kbps):
        encoder.target_bitrate = int(remb)
        offered = encoder.target_bitrate + audio_bps
        link = 1000.0 * kbps
        queue_ms += 1000.0 * (offered - link) / link
        dropped = max(0.0, queue_ms - queue_cap_ms) * link / 1000.0
        queue_ms = min(max(queue_ms, 0.0), queue_cap_ms)
        loss = dropped / offered
        cap = control.update(loss, base_rtt_ms + queue_ms, encoder.target_bitrate)
        encoder.set_bitrate_cap(cap)
        remb = min(remb * 1.08, remb_max_bps)
        yield t, cap, ladder.update(cap, size, size, fps)


def test_thin_link_steps_the_size_down_within_seconds_and_back_up_when_it_widens():
    """600 kbit/s for 40 s, then 3 Mbit/s: the size steps down within 5 reports, holds without flipping
    while the link stays thin, the frame rate stays 25 (the size step suffices), and full size is back
    once the link has widened."""
    steps = list(simulate_link([600.0] * 40 + [3000.0] * 60))
    thin = [step for t, _, step in steps if t < 40]
    first_small = next(t for t, _, step in steps if step.scale < 1.0)
    assert first_small < 5, [(t, cap, step) for t, cap, step in steps[:8]]
    assert all(step.fps_divisor == 1 for step in thin)
    changes = sum(1 for a, b in itertools.pairwise(thin) if a != b)
    assert changes <= 2, thin                                    # no flipping on a steady thin link
    assert all(step.scale < 1.0 for step in thin[first_small:])  # never full size at 600 kbit/s
    wide = [(t, cap, step) for t, cap, step in steps if t >= 40]
    back = next((t for t, cap, step in wide if step == FULL), None)
    assert back is not None and back < 40 + 30, wide
    assert all(step == FULL for t, _, step in wide if t >= back)


def test_ladder_steps_frame_rate_only_below_the_smallest_size_and_holds_near_a_threshold():
    ladder = VideoLadder()
    need = {step: ladder.need_bps(step, 512, 512, 25.0) for step in VIDEO_STEPS}
    assert need[FULL] == pytest.approx(0.08 * 512 * 512 * 25)
    assert ladder.update(None, 512, 512, 25.0) == FULL            # uncapped: full size
    assert ladder.update(need[FULL] * 1.01, 512, 512, 25.0) == FULL
    assert ladder.update(need[VideoStep(0.5)] * 1.01, 512, 512, 25.0) == VideoStep(0.5)  # two at once
    assert ladder.steps_down == 1
    assert ladder.update(need[VideoStep(0.5)] * 0.5, 512, 512, 25.0) == VideoStep(0.5, 2)  # then the rate
    assert ladder.update(1000.0, 512, 512, 25.0) == VideoStep(0.5, 2)                      # the last step
    # Back up: only after UP_REPORTS reports of UP_MARGIN x what the step above needs, one at a time.
    just_below = 0.99 * VideoLadder.UP_MARGIN * need[VideoStep(0.5)]
    for _ in range(10):
        assert ladder.update(just_below, 512, 512, 25.0) == VideoStep(0.5, 2)
    ample = VideoLadder.UP_MARGIN * need[VideoStep(0.5)]
    assert ladder.update(ample, 512, 512, 25.0) == VideoStep(0.5, 2)
    assert ladder.update(just_below, 512, 512, 25.0) == VideoStep(0.5, 2)   # the count restarts
    seen = [ladder.update(ample, 512, 512, 25.0) for _ in range(VideoLadder.UP_REPORTS)]
    assert seen[-1] == VideoStep(0.5) and seen[:-1] == [VideoStep(0.5, 2)] * (VideoLadder.UP_REPORTS - 1)
    for _ in range(4 * VideoLadder.UP_REPORTS):
        step = ladder.update(None, 512, 512, 25.0)
    assert step == FULL and ladder.steps_up == 3


class _Frames:
    """An engine session's video side: counts the ticks it was asked for, each a 64 px frame."""

    def __init__(self) -> None:
        self.calls = 0

    def next_video_frame(self):
        self.calls += 1
        image = np.full((64, 64, 3), self.calls % 256, np.uint8)

        class Out:
            pass

        out = Out()
        out.image = image   # type: ignore[attr-defined]
        return out


async def test_video_track_steps_keep_the_media_clock():
    """At half the frame rate every engine tick is still taken on its time and every sent frame keeps
    its tick's pts (A/V sync); a smaller step sends smaller frames."""
    source = _Frames()
    track = AvatarVideoTrack(source, 25.0, MediaClock())  # type: ignore[arg-type]
    first = await track.recv()
    assert (first.width, first.height, first.pts) == (64, 64, 0)
    assert track.source_size == (64, 64)
    track.set_step(VideoStep(0.5, 2))
    frames = [await track.recv() for _ in range(4)]
    assert [f.pts for f in frames] == [2 * 3600, 4 * 3600, 6 * 3600, 8 * 3600]   # even ticks only
    assert all((f.width, f.height) == (32, 32) for f in frames)
    assert source.calls == 9 and track.thinned == 4             # ticks 1, 3, 5, 7 taken, not sent
    track.set_step(FULL)
    nxt = await track.recv()
    assert (nxt.pts, nxt.width) == (9 * 3600, 64)
    track.stop()


async def test_thin_link_steps_the_video_size_down_live_and_back_up(engine, http, loopback_only, monkeypatch):
    """A live session, its video capped by heavy loss: the client receives smaller frames, still 25 a
    second from the server; the loss gone, larger ones again. The tiny test avatar is 64 px, so the
    ladder's bits per pixel are scaled by (512 / 64) ** 2: it then needs what the default 512 px one
    does."""
    monkeypatch.setattr(VideoLadder, "MIN_BITS_PER_PIXEL", VideoLadder.MIN_BITS_PER_PIXEL * 64)
    server = await start_server(engine)
    relay = await Relay(down=Impairment(loss=0.25), seed=21).start()
    client = Client(server, http)

    def widths(since: float) -> list[int]:
        return [image.shape[1] for a, _, image in client.received.video if a >= since]

    try:
        await connect_through(client, relay)
        await client.wait_for_video(5, within_s=20)
        assert set(widths(0.0)) == {64}
        session = server_session(server, client)
        start = time.monotonic()
        deadline = start + 15
        while not widths(start) or min(widths(start)) >= 64:
            assert time.monotonic() < deadline, session.link.describe()
            await asyncio.sleep(0.2)
        assert session.video.step.scale < 1.0 and session.video.step.fps_divisor == 1
        assert session.link.describe()["video_scale"] == session.video.step.scale
        sent = session.video.stats.frames
        await asyncio.sleep(2.0)
        assert session.video.stats.frames - sent >= 0.9 * 25 * 2.0 - 3   # the size step, not the rate
        assert session.video.thinned == 0
        smallest = min(widths(start))
        relay.set("down", Impairment())
        widened = time.monotonic()
        deadline = widened + 40
        while not any(w > smallest for w in widths(widened + 1.0)):
            assert time.monotonic() < deadline, (smallest, session.link.describe())
            await asyncio.sleep(0.2)
        assert session.link.video_ladder is not None and session.link.video_ladder.steps_up >= 1
    finally:
        await client.close()
        relay.close()
        await server.stop()


def _first_keyframe_bytes(cap: int | None) -> tuple[int, dict]:
    import fractions

    import av
    import cv2

    encoder = encoders.RealtimeVp8Encoder()
    encoder.set_bitrate_cap(cap)
    encoder.target_bitrate = 450_000
    image = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8), (9, 9), 3)
    frame = av.VideoFrame.from_ndarray(image, format="bgr24")
    frame.pts, frame.time_base = 0, fractions.Fraction(1, 90000)
    payloads, _ = encoder.encode(frame)
    return sum(len(p) for p in payloads), dict(encoder.codec._options)


def test_keyframes_are_bounded_only_while_the_bitrate_is_capped():
    """A capped (thin or lossy) link: the codec opens with libvpx's intra-frame bound, so the keyframe of
    a size or bitrate step does not overflow the link's queue by itself; uncapped: aiortc's settings."""
    free, free_options = _first_keyframe_bytes(None)
    capped, capped_options = _first_keyframe_bytes(450_000)
    assert "max-intra-rate" not in free_options
    assert capped_options["max-intra-rate"] == str(encoders.KEYFRAME_MAX_PCT_CAPPED)
    assert capped < 0.5 * free, (capped, free)


def test_a_size_step_reopens_the_encoder_with_a_keyframe_at_the_new_size():
    """What the size steps rely on in aiortc's VP8 encoder: a frame of another size gets a new codec
    context at that size, and its first frame is a keyframe (the receiver's decoder follows)."""
    import fractions

    from aiortc.codecs.vpx import vp8_depayload

    encoder = encoders.RealtimeVp8Encoder()
    image = np.full((512, 512, 3), 120, np.uint8)
    keyframes = []
    for k, step in enumerate([FULL, FULL, VideoStep(0.75), VideoStep(0.75)]):
        frame = scaled_frame(image, step)
        frame.pts, frame.time_base = k * 3600, fractions.Fraction(1, 90000)
        payloads, _ = encoder.encode(frame)
        bitstream = b"".join(vp8_depayload(p) for p in payloads)
        keyframes.append(bitstream[0] & 1 == 0)   # VP8 frame tag: bit 0 clear on a keyframe
        assert (encoder.codec.width, encoder.codec.height) == step.size(512, 512)
    assert keyframes == [True, False, True, False]
    assert isinstance(encoder.codec, encoders.TunedContext)        # the new context got our settings too
