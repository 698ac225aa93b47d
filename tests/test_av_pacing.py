"""Both outgoing tracks follow the one media clock under overload (issue #15: latency and A/V offset stay
bounded whatever the load): a starved event loop makes the audio skip, as the video does, instead of
falling behind in bursts."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from server.media.tracks import (
    AUDIO_MAX_LAG_S,
    AUDIO_RATE,
    AUDIO_SAMPLES,
    AvatarVideoTrack,
    MediaClock,
    SyncedAudioTrack,
)

FPS = 25.0
RAMP = 20000  # the fake engine's sample k is (k % RAMP + 0.5) / 32767: int16 k % RAMP after conversion


@dataclass
class _Out:
    image: np.ndarray


class CountingEngine:
    """An engine session whose audio sample k encodes k, so the sent frames show which samples they hold."""

    def __init__(self) -> None:
        self.audio_pos = 0
        self.video_frames = 0
        self._image = np.zeros((16, 16, 3), np.uint8)

    def next_audio(self, n: int) -> np.ndarray:
        k = np.arange(self.audio_pos, self.audio_pos + n)
        self.audio_pos += n
        return ((k % RAMP + 0.5) / 32767.0).astype(np.float32)

    def next_video_frame(self) -> _Out:
        self.video_frames += 1
        return _Out(self._image)


@dataclass
class Sent:
    """What a fake sender handed to the encoder: (wall time, pts, pcm) per frame."""

    at: list[float] = field(default_factory=list)
    pts: list[int] = field(default_factory=list)
    pcm: list[np.ndarray] = field(default_factory=list)


async def fake_sender(track, sent: Sent, encode_s: float) -> None:
    """Pull like aiortc's RTCRtpSender: the next frame as soon as the last one is handled. `encode_s`
    of blocking work per frame stands for the encode and send that a busy loop also pays for."""
    while True:
        frame = await track.recv()
        sent.at.append(time.monotonic())
        sent.pts.append(int(frame.pts))
        if track.kind == "audio":
            sent.pcm.append(frame.to_ndarray().reshape(-1))
        if encode_s:
            time.sleep(encode_s)  # noqa: ASYNC251 - the per-frame work that starves the loop


@dataclass
class Offsets:
    audio_lag_s: list[float] = field(default_factory=list)
    av_offset_s: list[float] = field(default_factory=list)


async def starve(clock: MediaClock, audio: Sent, video: Sent, offsets: Offsets, cycles: int,
                 block_s: float = 0.2, free_s: float = 0.05) -> None:
    """Hold the loop `block_s` of every `block_s + free_s` (a CPU-bound neighbour); at the end of each free
    spell, note how far the latest audio pts lags the wall clock and the two tracks' latest pts apart."""
    t0 = clock.origin()
    for _ in range(cycles):
        time.sleep(block_s)  # noqa: ASYNC251 - starve the loop on purpose
        await asyncio.sleep(free_s)
        now = time.monotonic() - t0
        audio_s = audio.pts[-1] / AUDIO_RATE
        video_s = video.pts[-1] / 90000
        offsets.audio_lag_s.append(now - audio_s)
        offsets.av_offset_s.append(video_s - audio_s)


async def run_starved(cycles: int) -> tuple[CountingEngine, SyncedAudioTrack, Sent, Sent, Offsets, float]:
    """Audio and video tracks of one session pulled by fake senders while the loop is starved; returns
    the engine, the audio track, what each sender sent, the offsets sampled and the clock's origin."""
    engine = CountingEngine()
    clock = MediaClock()
    audio_track = SyncedAudioTrack(engine, clock)  # type: ignore[arg-type]
    video_track = AvatarVideoTrack(engine, FPS, clock)  # type: ignore[arg-type]
    audio, video, offsets = Sent(), Sent(), Offsets()
    senders = [asyncio.ensure_future(fake_sender(audio_track, audio, encode_s=0.005)),
               asyncio.ensure_future(fake_sender(video_track, video, encode_s=0.0))]
    try:
        await asyncio.sleep(0.2)  # both tracks running on time first
        await starve(clock, audio, video, offsets, cycles)
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        audio_track.stop()
        video_track.stop()
    return engine, audio_track, audio, video, offsets, clock.origin()


def assert_engine_samples_in_order(sent: Sent) -> int:
    """Every frame holds the engine's samples from its pts on, in order; returns the frames skipped."""
    skipped = 0
    for i, (pts, pcm) in enumerate(zip(sent.pts, sent.pcm, strict=True)):
        assert pts % AUDIO_SAMPLES == 0
        np.testing.assert_array_equal(pcm, np.arange(pts, pts + AUDIO_SAMPLES) % RAMP)
        if i:
            gap = pts - sent.pts[i - 1]
            assert gap >= AUDIO_SAMPLES  # never reordered or repeated
            skipped += gap // AUDIO_SAMPLES - 1
    return skipped


async def test_a_starved_loop_makes_audio_skip_and_keeps_av_bounded():
    cycles = 12  # 3 s: without the bound the audio falls ~50 ms further behind every cycle
    engine, track, audio, video, offsets, t0 = await run_starved(cycles)
    elapsed = time.monotonic() - t0

    # No audio frame leaves more than the bound late (the check runs in the same step as the hand-over).
    lags = [at - (t0 + pts / AUDIO_RATE) for at, pts in zip(audio.at, audio.pts, strict=True)]
    assert max(lags) <= AUDIO_MAX_LAG_S + 0.02, max(lags)
    # Sampled after each stall: the audio is near the wall clock and next to the video.
    assert max(offsets.audio_lag_s) <= AUDIO_MAX_LAG_S + AUDIO_SAMPLES / AUDIO_RATE + 0.02, offsets.audio_lag_s
    assert max(abs(o) for o in offsets.av_offset_s) <= AUDIO_MAX_LAG_S + 1 / FPS + 0.02, offsets.av_offset_s
    # The skipped frames are counted, and are exactly the gaps in what was sent.
    skipped = assert_engine_samples_in_order(audio)
    assert track.stats.skipped == skipped > 0
    # The engine's audio timeline stayed on the wall clock: the skipped span was taken from it too.
    assert engine.audio_pos == audio.pts[-1] + AUDIO_SAMPLES
    assert engine.audio_pos / AUDIO_RATE >= elapsed - AUDIO_MAX_LAG_S - 0.1
    assert video.pts[-1] / 90000 >= elapsed - 0.25  # the video kept to the clock too (skipping ticks)


async def test_ordinary_pacing_never_skips_audio():
    engine = CountingEngine()
    clock = MediaClock()
    track = SyncedAudioTrack(engine, clock)  # type: ignore[arg-type]
    sent = Sent()
    sender = asyncio.ensure_future(fake_sender(track, sent, encode_s=0.0005))
    try:
        await asyncio.sleep(1.0)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        track.stop()
    assert track.stats.skipped == 0
    assert assert_engine_samples_in_order(sent) == 0
    assert len(sent.pts) >= 40


async def test_a_late_start_bursts_within_the_bound_and_skips_beyond_it():
    for late_s, expect_skip in ((0.04, False), (0.5, True)):
        engine = CountingEngine()
        clock = MediaClock()
        t0 = clock.origin() - late_s  # the video started the clock `late_s` ago
        clock._t0 = t0
        track = SyncedAudioTrack(engine, clock)  # type: ignore[arg-type]
        frame = await track.recv()
        pts = int(frame.pts or 0)
        lateness = time.monotonic() - (t0 + pts / AUDIO_RATE)
        if expect_skip:  # the first frame is the one due now; the missed span was taken and dropped
            assert pts >= (late_s - AUDIO_MAX_LAG_S) * AUDIO_RATE
            assert track.stats.skipped == pts // AUDIO_SAMPLES
            assert lateness <= AUDIO_MAX_LAG_S
        else:  # a small late start still hands the missed frames over at once, from the first
            assert pts == 0 and track.stats.skipped == 0
        assert engine.audio_pos == pts + AUDIO_SAMPLES
        track.stop()
