"""LipSyncVideoGenerator offline (no LiveKit server can run here): video and audio paced together, the
segment end after the last audio, clear_buffer; and the generator behind LiveKit's own QueueAudioOutput
and AvatarRunner with a stand-in room (publishing is faked; the AV synchronizer and media sources are
LiveKit's own). Needs the [livekit] extra, which `scripts/setup.sh --test` installs (fails, never skips)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput
from server_helpers import LoudnessRenderer, TinyAvatar, best_lag, mouth_level

from integrations.livekit import LipSyncVideoGenerator

pytestmark = pytest.mark.timeout(120)

IN_RATE = 24000


def to_rate(samples: np.ndarray, src: int, dst: int) -> np.ndarray:
    t_dst = np.arange(int(len(samples) * dst / src)) / dst
    return np.interp(t_dst, np.arange(len(samples)) / src, samples).astype(np.float32)


def agent_frames(speech_16k: np.ndarray) -> list[rtc.AudioFrame]:
    """The agent's TTS audio as LiveKit hands it over: 24 kHz mono s16, 20 ms frames."""
    pcm = (to_rate(speech_16k, 16000, IN_RATE) * 32767).astype(np.int16)
    n = IN_RATE // 50
    return [rtc.AudioFrame(pcm[i:i + n].tobytes(), IN_RATE, 1, len(pcm[i:i + n])) for i in range(0, len(pcm), n)]


def image(frame: rtc.VideoFrame) -> np.ndarray:
    return np.frombuffer(bytes(frame.data), np.uint8).reshape(frame.height, frame.width, 3)


async def tiny_generator() -> LipSyncVideoGenerator:
    return await LipSyncVideoGenerator.load(TinyAvatar(), renderer=LoudnessRenderer())


class Collector:
    def __init__(self, generator: LipSyncVideoGenerator) -> None:
        self.items: list[tuple[float, object]] = []
        self.task = asyncio.ensure_future(self._run(generator))

    async def _run(self, generator: LipSyncVideoGenerator) -> None:
        async for item in generator:
            self.items.append((time.monotonic(), item))

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def of(self, kind: type) -> list[tuple[float, object]]:
        return [(t, x) for t, x in self.items if isinstance(x, kind)]


async def test_video_and_audio_paced_together_and_segment_end(speech_16k):
    generator = await tiny_generator()
    assert generator.avatar_options().video_width == 64 and generator.audio_sample_rate == 16000
    collector = Collector(generator)
    speech = speech_16k[: 2 * 16000]
    await asyncio.sleep(0.3)
    for frame in agent_frames(speech):
        await generator.push_audio(frame)
    await generator.push_audio(AudioSegmentEnd())
    await asyncio.sleep(len(speech) / 16000 + generator.latency_s + 0.6)
    await collector.stop()
    await generator.aclose()
    items = collector.items
    video = collector.of(rtc.VideoFrame)
    audio = collector.of(rtc.AudioFrame)
    times = np.array([t for t, _ in video])
    fps = (len(times) - 1) / (times[-1] - times[0])
    assert 23.0 <= fps <= 27.0, fps
    # Paced together: every audio frame follows its tick's video frame at once, 40 ms (640 samples) per
    # tick except the utterance's last, shorter one.
    for i, (t, item) in enumerate(items):
        if isinstance(item, rtc.AudioFrame):
            t_video, previous = items[i - 1]
            assert isinstance(previous, rtc.VideoFrame) and t - t_video < 0.005
    sizes = [f.samples_per_channel for _, f in audio]
    assert all(s == 640 for s in sizes[:-1]) and 0 < sizes[-1] <= 640
    # The audio is the agent's audio (16 kHz), complete (the ingest resampler keeps its last ~1 ms), from
    # the tick where it starts: silence up to its first sample (placed between ticks), then it.
    out = np.concatenate([np.frombuffer(bytes(f.data), np.int16) for _, f in audio]).astype(np.float32) / 32767
    expected = to_rate(to_rate(speech, 16000, IN_RATE), IN_RATE, 16000)
    lag, corr = best_lag(expected[:16000], out, max_lag=700)
    assert 0 <= lag < 640 and not out[:lag].any() and corr > 0.97, (lag, corr)
    assert 0 <= expected.size - (out.size - lag) <= 16, (out.size, lag, expected.size)
    # One segment end, right after the last audio frame.
    ends = [i for i, (_, x) in enumerate(items) if isinstance(x, AudioSegmentEnd)]
    last_audio = max(i for i, (_, x) in enumerate(items) if isinstance(x, rtc.AudioFrame))
    assert ends == [last_audio + 1]
    # The mouth moves while the audio plays and rests before.
    t_first_audio = audio[0][0]
    talking = [mouth_level(image(f)) for t, f in video if t_first_audio <= t <= audio[-1][0]]
    resting = [mouth_level(image(f)) for t, f in video if t < t_first_audio - 0.1]
    assert max(talking) > max(resting) + 20, (resting, talking)


async def test_clear_buffer_stops_audio_and_mouth_within_a_frame(speech_16k):
    generator = await tiny_generator()
    collector = Collector(generator)
    for frame in agent_frames(np.tile(speech_16k, 2)):
        await generator.push_audio(frame)
    await asyncio.sleep(generator.latency_s + 1.2)
    t_clear = time.monotonic()
    generator.clear_buffer()
    await asyncio.sleep(0.6)
    await collector.stop()
    await generator.aclose()
    audio = collector.of(rtc.AudioFrame)
    assert any(t < t_clear for t, _ in audio)
    assert not [t for t, _ in audio if t > t_clear + 0.04], "audio went on after clear_buffer"
    assert not collector.of(AudioSegmentEnd)      # interrupted, not finished: the runner reports it
    after = [mouth_level(image(f)) for t, f in collector.of(rtc.VideoFrame) if t > t_clear + 0.04]
    assert after and max(after) < 91.0, after


class _Publication:
    async def wait_for_subscription(self) -> None:
        return None


class _Participant:
    def __init__(self) -> None:
        self.published: list[object] = []

    async def publish_track(self, track: object, options: object) -> _Publication:
        self.published.append(track)
        return _Publication()


class FakeRoom(rtc.EventEmitter):
    """What AvatarRunner touches of a connected rtc.Room, minus the network."""

    def __init__(self) -> None:
        super().__init__()
        self.local_participant = _Participant()

    def isconnected(self) -> bool:
        return True


async def test_behind_queue_audio_output_and_avatar_runner(speech_16k):
    """The bitHuman wiring: QueueAudioOutput -> AvatarRunner -> our generator -> LiveKit's AV synchronizer.
    The agent side sees playback start and finish with the played position (its own frame count)."""
    generator = await tiny_generator()
    audio_out = QueueAudioOutput(sample_rate=IN_RATE)
    finished: list[tuple[float, bool]] = []
    audio_out.on("playback_finished", lambda ev: finished.append((ev.playback_position, ev.interrupted)))
    room = FakeRoom()
    runner = AvatarRunner(room, audio_recv=audio_out, video_gen=generator,  # type: ignore[arg-type]
                          options=generator.avatar_options())
    await runner.start()
    speech = speech_16k[:16000]
    try:
        for frame in agent_frames(speech):
            await audio_out.capture_frame(frame)
        audio_out.flush()
        for _ in range(60):
            if finished:
                break
            await asyncio.sleep(0.1)
        assert finished, "no playback_finished from the runner"
        position, interrupted = finished[0]
        assert interrupted is False
        # All of the 1 s utterance, by its frames, after the silence from the tick to its first sample.
        assert 1.0 - 0.002 <= position < 1.0 + 0.04 + 0.002, position
        assert len(room.local_participant.published) == 2  # the avatar's audio and video tracks
        # Barge-in through the agent's side: clear_buffer reaches the generator, the runner reports it.
        for frame in agent_frames(np.tile(speech_16k, 2)):
            await audio_out.capture_frame(frame)
        await asyncio.sleep(generator.latency_s + 0.8)
        audio_out.clear_buffer()
        for _ in range(30):
            if len(finished) > 1:
                break
            await asyncio.sleep(0.1)
        assert len(finished) == 2 and finished[1][1] is True and 0.3 < finished[1][0] < 2.0, finished
    finally:
        await runner.aclose()
        await generator.aclose()
