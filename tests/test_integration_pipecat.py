"""LipSyncVideoService driven by pipecat.tests.utils.run_test: images at the avatar's fps, the TTS audio
out delayed by the engine's latency, the mouth moving with speech, and interruption within one frame.

The engine is the real one in-process with the tiny avatar and the loudness renderer of the server tests
(so the mouth level is measurable); one test loads the defaults (embedded avatar, no-weights renderer).
Needs the [pipecat] extra, which `scripts/setup.sh --test` installs: a missing install fails, never skips."""
from __future__ import annotations

import time

import numpy as np
import pytest
from pipecat.frames.frames import (
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.tests.utils import SleepFrame, run_test
from server_helpers import LoudnessRenderer, TinyAvatar, best_lag, mouth_level

from integrations.pipecat import LipSyncVideoService

pytestmark = pytest.mark.timeout(120)

TTS_RATE = 24000


class PushTimes(BaseObserver):
    """When each frame was pushed by `service` (wall clock), in order, and when TTS audio reached it."""

    def __init__(self, service) -> None:
        super().__init__()
        self.service = service
        self.pushed: list[tuple[float, object]] = []
        self.tts_in: list[float] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.source is self.service:
            self.pushed.append((time.monotonic(), data.frame))
        elif data.destination is self.service and isinstance(data.frame, TTSAudioRawFrame):
            self.tts_in.append(time.monotonic())

    def of(self, kind: type) -> list[tuple[float, object]]:
        return [(t, f) for t, f in self.pushed if isinstance(f, kind)]


def to_rate(samples: np.ndarray, src: int, dst: int) -> np.ndarray:
    t_dst = np.arange(int(len(samples) * dst / src)) / dst
    return np.interp(t_dst, np.arange(len(samples)) / src, samples).astype(np.float32)


def tts_frames(speech_16k: np.ndarray, context: str) -> list:
    pcm = (to_rate(speech_16k, 16000, TTS_RATE) * 32767).astype(np.int16)
    chunks = np.array_split(pcm, max(1, len(pcm) // (TTS_RATE // 10)))
    return [TTSAudioRawFrame(audio=c.tobytes(), sample_rate=TTS_RATE, num_channels=1, context_id=context)
            for c in chunks]


def tiny_service() -> LipSyncVideoService:
    return LipSyncVideoService(avatar=TinyAvatar(), renderer=LoudnessRenderer())


def rgb(frame: OutputImageRawFrame) -> np.ndarray:
    w, h = frame.size
    return np.frombuffer(frame.image, np.uint8).reshape(h, w, 3)


async def test_images_at_fps_audio_delayed_mouth_moves(speech_16k):
    service = tiny_service()
    seen = PushTimes(service)
    speech = speech_16k[: 2 * 16000]
    frames = [SleepFrame(sleep=0.5), *tts_frames(speech, "ctx-1"), TTSStoppedFrame(context_id="ctx-1"),
              SleepFrame(sleep=len(speech) / 16000 + 1.2)]
    await run_test(service, frames_to_send=frames, observers=[seen], start_timeout=30.0)
    images = seen.of(OutputImageRawFrame)
    audio = seen.of(SpeechOutputAudioRawFrame)
    # Images: the avatar's size, RGB, at 25 fps of wall time.
    assert all(f.size == (64, 64) and f.format == "RGB" for _, f in images)
    times = np.array([t for t, _ in images])
    fps = (len(times) - 1) / (times[-1] - times[0])
    assert 23.0 <= fps <= 27.0, fps
    # pts on the output timeline: 40 ms apart; a tick the pacer reached more than a frame late drops its
    # image (never its audio), as the server's video track does: rare, on a loaded machine only.
    steps = np.diff(np.array([f.pts for _, f in images]))
    assert np.all(steps % 40_000_000 == 0) and np.all(steps > 0)
    assert np.mean(steps == 40_000_000) >= 0.95, steps
    # Audio out: exactly the TTS audio (16 kHz), as a contiguous run of samples on the output timeline,
    # from the tick where it starts: silence up to its first sample (placed between ticks), then it.
    out = np.concatenate([np.frombuffer(f.audio, np.int16) for _, f in audio]).astype(np.float32) / 32767
    expected = to_rate(to_rate(speech, 16000, TTS_RATE), TTS_RATE, 16000)
    lag, corr = best_lag(expected[:16000], out, max_lag=700)
    assert 0 <= lag < 640 and not out[:lag].any() and corr > 0.97, (lag, corr)
    # (the streaming resampler of the engine's ingest keeps its last ~1 ms: at most 16 samples short)
    assert 0 <= expected.size - (out.size - lag) <= 16, (out.size, lag, expected.size)
    audio_pts = [f.pts for _, f in audio]
    spans = np.diff(audio_pts)
    assert np.all(spans == 40_000_000), spans   # one 40 ms block per tick, no gaps
    # Delayed by the utterance's delay: TTS audio that arrives ahead of real time starts after the
    # compute budget only (realtime/timeline/utterance_start.py), never later than the fixed latency L, counted
    # from the output clock when the TTS audio came in. Its first sample plays exactly there; its block
    # leaves at the tick before (up to 40 ms earlier, the silence before the sample in front); 10-30 ms
    # of tolerance for the pacing task's wake-ups on a loaded machine.
    assert audio_pts[0] % 40_000_000 == 0
    delay = audio[0][0] - seen.tts_in[0]
    utterance_delay = service.utterance_delay_s
    assert service.latency_s > 0 and utterance_delay is not None and 0 < utterance_delay <= service.latency_s
    assert utterance_delay - 0.04 - 0.01 <= delay <= utterance_delay + 0.03, (delay, utterance_delay)
    # Mouth moves with speech, rests otherwise.
    image_at = {f.pts: rgb(f) for _, f in images}
    talking = [mouth_level(image_at[p]) for p in range(audio_pts[0], audio_pts[-1], 40_000_000) if p in image_at]
    resting = [mouth_level(rgb(f)) for _, f in images[:5]]
    assert max(talking) > max(resting) + 20, (resting, talking)
    assert max(resting) - min(resting) < 1.0
    # The TTSStoppedFrame comes out after its audio, not before.
    stop_t = [t for t, f in seen.pushed if isinstance(f, TTSStoppedFrame)]
    assert len(stop_t) == 1 and stop_t[0] >= audio[-1][0]


async def test_interruption_stops_within_one_frame(speech_16k):
    service = tiny_service()
    seen = PushTimes(service)
    speech = np.tile(speech_16k, 2)
    frames = [*tts_frames(speech, "long"), SleepFrame(sleep=1.5), InterruptionFrame(), SleepFrame(sleep=1.0)]
    down, _ = await run_test(service, frames_to_send=frames, observers=[seen], start_timeout=30.0)
    assert any(isinstance(f, InterruptionFrame) for f in down)   # passed on
    t_int = next(t for t, f in seen.pushed if isinstance(f, InterruptionFrame))
    audio = seen.of(SpeechOutputAudioRawFrame)
    images = seen.of(OutputImageRawFrame)
    assert any(t < t_int for t, _ in audio), "no speech before the interruption"
    frame_s = 1 / 25
    assert not [t for t, _ in audio if t > t_int + frame_s], "audio went on after the interruption"
    after = [mouth_level(rgb(f)) for t, f in images if t > t_int + frame_s]
    before = [mouth_level(rgb(f)) for t, f in images if t_int - 0.5 < t < t_int]
    assert after and max(after) < 91.0, after            # the resting avatar (90) from the next frame on
    assert max(before) > 110, before


async def test_defaults_load_the_embedded_avatar():
    service = LipSyncVideoService()
    seen = PushTimes(service)
    await run_test(service, frames_to_send=[SleepFrame(sleep=0.5)], observers=[seen], start_timeout=60.0)
    images = seen.of(OutputImageRawFrame)
    assert images
    w, h = images[0][1].size
    assert len(images[0][1].image) == w * h * 3 and w >= 64 and h >= 64
