"""The real-time engine in simulated time: a ManualClock, an inline render worker, fake renderers.

The driver below behaves like the server: every 20 ms it pushes the 20 ms chunk just "recorded" (so audio
arrives at the end of its own chunk), pulls 20 ms of output audio, and pulls a video frame every 1/fps.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np
import pytest

from realtime.audio.mel import mel_windows, melspectrogram
from realtime.avatars.avatar import loop_index
from realtime.config import EngineConfig
from realtime.renderers.base import MouthPatch, MouthRenderer
from realtime.scheduling.scheduler import InlineRenderWorker
from realtime.timeline.clock import LOOKAHEAD_SAMPLES, ManualClock
from realtime.timeline.session import HELD, IDLE, RENDERED, LipSyncSession, VideoOut

SR = 16000
STEP = 320  # 20 ms


class FakeAvatar:
    """10 frames of 128x128 noise, a fixed face box, ping-pong loop: what the engine needs of an Avatar."""

    loop = "pingpong"
    source = "fake"

    def __init__(self, n: int = 10, size: int = 128, fps: float = 25.0) -> None:
        rng = np.random.default_rng(0)
        self.frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.boxes = np.array([[20 + i % 3, 110 + i % 3, 24, 104] for i in range(n)])
        self.mouth = None
        self.fps = fps

    def __len__(self) -> int:
        return len(self.frames)

    def frame_index(self, tick: int) -> int:
        return loop_index(tick, len(self.frames))


class RecordingRenderer(MouthRenderer):
    """Returns a flat grey patch over the face box and records every call."""

    name = "recording"

    def __init__(self) -> None:
        self.calls = 0
        self.frames = 0
        self.mels: list[np.ndarray] = []

    def prepare(self, avatar) -> None:
        pass

    def render(self, avatar, frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        self.calls += 1
        self.frames += len(frame_indices)
        self.mels.extend(mels.copy())
        return [MouthPatch(np.full((96, 96, 3), 200, np.uint8), tuple(int(v) for v in avatar.boxes[i]))
                for i in frame_indices]


class SlowRenderer(RecordingRenderer):
    """Takes `factor` frame periods per frame on its own clock (the inline worker measures it)."""

    name = "slow"

    def __init__(self, render_clock: ManualClock, seconds_per_frame: float) -> None:
        super().__init__()
        self.render_clock = render_clock
        self.seconds_per_frame = seconds_per_frame

    def render(self, avatar, frame_indices, mels):
        self.render_clock.advance(self.seconds_per_frame * len(frame_indices))
        return super().render(avatar, frame_indices, mels)


@dataclass
class Run:
    frames: list[VideoOut] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)   # push_audio return values

    @property
    def audio_out(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


def drive(session: LipSyncSession, clock: ManualClock, wav: np.ndarray | None, seconds: float,
          run: Run | None = None, rate: int = SR, channels: int = 1, chunk_s: float = 0.02) -> Run:
    """Simulate `seconds` of real time from clock.t: push `wav` in chunks as it is 'recorded',
    pull 20 ms of audio every 20 ms and a video frame every 1/fps."""
    run = run or Run()
    t0 = clock.t
    chunk = round(rate * chunk_s) * channels
    pushed = 0
    next_push = t0 + chunk_s
    next_audio = t0
    next_video = t0
    end = t0 + seconds
    while True:
        t = min(next_push if wav is not None and pushed < len(wav) else np.inf, next_audio, next_video)
        if t >= end - 1e-9:
            break
        clock.set(t)
        if wav is not None and pushed < len(wav) and abs(t - next_push) < 1e-9:
            run.starts.append(session.push_audio(wav[pushed:pushed + chunk], rate, channels))
            pushed += chunk
            next_push += chunk_s
        if abs(t - next_audio) < 1e-9:
            run.audio.append(session.next_audio(STEP))
            next_audio += 0.02
        if abs(t - next_video) < 1e-9:
            run.frames.append(session.next_video_frame())
            next_video += 1.0 / session.fps
    clock.set(end)
    return run


def make_session(renderer: MouthRenderer | None = None, config: EngineConfig | None = None,
                 fps: float = 25.0, render_clock=None) -> tuple[LipSyncSession, ManualClock, MouthRenderer]:
    clock = ManualClock()
    renderer = renderer or RecordingRenderer()
    worker = InlineRenderWorker(renderer, clock=render_clock or ManualClock())
    session = LipSyncSession(FakeAvatar(fps=fps), worker, config or EngineConfig(), clock=clock)
    return session, clock, renderer


def with_audio(frames: list[VideoOut]) -> list[VideoOut]:
    return [f for f in frames if f.audio_start is not None]


def segment_audio(session: LipSyncSession, run: Run, clip: np.ndarray, audio_out: np.ndarray | None = None,
                  frames: list[VideoOut] | None = None) -> np.ndarray:
    """The audio played with the frames of an utterance that started from silence: from its first frame's
    start, silence up to the clip's first sample (the start is placed exactly, not at the next frame
    boundary), then the clip. `audio_out` (default run.audio_out) starts at output sample 0 and holds the
    clip after its last earlier sound; `frames` default to run.frames."""
    audio_out = run.audio_out if audio_out is None else audio_out
    frames = run.frames if frames is None else frames
    played = int(np.flatnonzero(audio_out)[-1]) - int(np.flatnonzero(clip)[-1])   # the clip is last
    np.testing.assert_array_equal(audio_out[played:played + len(clip)], clip)
    lead = played - session.timeline.frame_start(with_audio(frames)[0].pts_index)
    assert 0 <= lead < SR / session.fps
    return np.concatenate([np.zeros(lead, np.float32), clip])


# --- the acceptance tests -----------------------------------------------------------------

def test_frames_windows_and_audio_match_offline(speech_16k):
    session, clock, renderer = make_session()
    duration = len(speech_16k) / SR
    run = drive(session, clock, speech_16k, duration + 1.0)
    frames = with_audio(run.frames)
    # What plays with the frames: the clip, after up to a frame of silence (its first frame starts at or
    # before its first sample).
    played = segment_audio(session, run, speech_16k)
    # One frame per tick for that audio's duration.
    assert abs(len(frames) - len(played) / SR * session.fps) <= 1
    # Each frame's window is the official per-frame window of the audio played with it (frames past the
    # official count reuse its last window, as the official loop's last frame does).
    ref = mel_windows(melspectrogram(played), session.fps)
    assert len(ref) <= len(frames) <= len(ref) + 4
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.mel, ref[min(i, len(ref) - 1)], err_msg=f"frame {i}")
    # Frames are consecutive ticks and sit at their own audio time + L.
    ks = [f.pts_index for f in frames]
    assert ks == list(range(ks[0], ks[0] + len(ks)))
    L = session.latency_samples
    for f in frames:
        assert f.audio_start + L == round(f.pts_index * SR / session.fps)
    # The returned audio is the input, sample for sample, delayed by the reported latency.
    assert run.starts[0] == 0
    out = run.audio_out
    np.testing.assert_array_equal(out[L:L + len(speech_16k)], speech_16k)
    assert not out[:L].any()
    assert session.latency_ms == pytest.approx(1000 * L / SR)
    m = session.metrics()
    assert m.av_offset_max_abs_ms <= 20.0
    assert m.av_offset_max_abs_ms == 0.0  # 25 fps: exact by construction
    assert m.frames_dropped == 0 and m.frames_rendered > 0.5 * len(frames)
    # The renderer saw exactly the speech frames' windows.
    assert renderer.frames == m.frames_submitted == m.frames_rendered


def test_latency_is_lookahead_plus_budget(speech_16k):
    session, clock, _ = make_session()
    drive(session, clock, speech_16k, len(speech_16k) / SR + 1.0)
    lat = session.metrics().latency_ms
    assert lat.count > 50
    # A frame's own sample counts from when real time brought it (not from the end of its 20 ms chunk,
    # which would make it L - 0..20 ms depending on where it falls in the chunk): it waits exactly L.
    assert lat.p50 == pytest.approx(session.latency_ms, abs=1.0)
    assert lat.p99 <= session.latency_ms + 1e-6
    assert session.latency_ms <= 1000 * LOOKAHEAD_SAMPLES / SR + 3 * 1000 / session.fps


@pytest.mark.parametrize("shared_clock", [False, True])
def test_renderer_twice_too_slow_keeps_latency_and_reports_drops(speech_16k, shared_clock):
    """The slow renderer advances a ManualClock by 2 frame periods per frame: its own, or the session's
    (the inline worker runs renders in virtual time either way)."""
    fps = 25.0
    clock = ManualClock()
    render_clock = clock if shared_clock else ManualClock()
    renderer = SlowRenderer(render_clock, seconds_per_frame=2.0 / fps)
    worker = InlineRenderWorker(renderer, clock=render_clock)
    session = LipSyncSession(FakeAvatar(), worker, clock=clock)
    run = drive(session, clock, np.concatenate([speech_16k, speech_16k]), 2 * len(speech_16k) / SR + 1.0)
    m = session.metrics()
    speech_frames = m.frames_rendered + m.frames_dropped
    assert m.frames_dropped > 0.3 * speech_frames          # reported, roughly every other frame
    assert session.frames_dropped() == m.frames_dropped   # the capacity monitor's cheap read agrees
    assert m.frames_rendered > 0.3 * speech_frames          # the mouth still moves at ~half rate
    assert m.latency_ms.p95 <= session.lookahead_ms + 3 * 1000 / fps
    # No accumulation: the last rendered frames are as fresh as the first ones.
    assert m.latency_ms.p99 <= session.latency_ms + 1e-6
    # Drops are held mouths (bounded), never a growing queue; every tick still produced a frame.
    assert m.frames_held > 0 and sum(f.state == HELD for f in run.frames) == m.frames_held
    ks = [f.pts_index for f in run.frames]
    assert ks == list(range(len(ks)))
    assert all(f.dropped == (f.speech and f.state != RENDERED) for f in run.frames)


def test_latency_stays_bounded_when_sessions_overload_a_shared_worker(speech_16k):
    """Three sessions on one renderer that takes 1.5 frame periods per frame: 4.5x overload."""
    clock, render_clock = ManualClock(), ManualClock()
    renderer = SlowRenderer(render_clock, seconds_per_frame=1.5 / 25)
    worker = InlineRenderWorker(renderer, clock=render_clock)
    sessions = [LipSyncSession(FakeAvatar(), worker, clock=clock, name=str(i)) for i in range(3)]
    wav = np.concatenate([speech_16k, speech_16k])
    for step in range(int((len(wav) / SR + 1.0) / 0.02)):
        clock.set(step * 0.02)
        chunk = wav[(step - 1) * STEP:step * STEP] if step >= 1 else wav[:0]
        for s in sessions:
            if len(chunk):
                s.push_audio(chunk, SR)
            s.next_audio(STEP)
            if step % 2 == 0:
                s.next_video_frame()
    for s in sessions:
        m = s.metrics()
        assert m.frames_rendered > 10, m            # every session keeps a moving mouth
        assert m.frames_dropped > m.frames_rendered
        assert m.latency_ms.p99 <= s.latency_ms + 1e-6
    assert worker.stats().frames_skipped > 0


def test_silence_makes_no_renderer_calls():
    session, clock, renderer = make_session()
    rng = np.random.default_rng(1)
    silence = np.concatenate([np.zeros(SR, np.float32), (rng.standard_normal(SR) * 1e-4).astype(np.float32)])
    run = drive(session, clock, silence, 3.0)
    assert renderer.calls == 0
    assert all(f.state == IDLE and f.mouth_alpha == 0.0 for f in run.frames)
    assert len(with_audio(run.frames)) >= 45  # the frames did carry (silent) windows
    avatar = session.avatar
    for f in run.frames:
        np.testing.assert_array_equal(f.image, avatar.frames[f.avatar_index])


def test_gap_in_speech_is_idle_and_onset_is_ramped(speech_with_gap_16k):
    session, clock, renderer = make_session()
    run = drive(session, clock, speech_with_gap_16k, len(speech_with_gap_16k) / SR + 1.0)
    frames = with_audio(run.frames)
    speech_len = (len(speech_with_gap_16k) - 24000) // 2
    in_gap = [f for f in frames
              if f.audio_start - session._planner.hangover_samples > speech_len + 200  # after the first speech
              and f.audio_start + 3400 < speech_len + 24000]                            # before the second
    assert len(in_gap) > 10
    assert all(not f.speech and f.state == IDLE for f in in_gap)
    assert renderer.frames == sum(f.speech for f in frames)   # no renders outside speech frames
    # Onset / offset: the mouth alpha moves by at most 1/ramp_frames per frame, no pop.
    alphas = [f.mouth_alpha for f in run.frames]
    step = 1.0 / session.config.ramp_frames
    assert max(abs(a - b) for a, b in itertools.pairwise(alphas)) <= step + 1e-6
    assert max(alphas) == 1.0


def test_interrupt_returns_to_idle_within_one_frame(speech_16k):
    session, clock, renderer = make_session()
    # A TTS-like source pushes the whole utterance at once.
    clock.set(0.0)
    session.push_audio(speech_16k, SR)
    run = drive(session, clock, None, 1.5)
    assert run.frames[-1].state == RENDERED
    calls_before = renderer.frames
    session.interrupt()
    after = drive(session, clock, None, 1.0)
    first = after.frames[0]
    assert first.state == IDLE and first.mouth_alpha == 0.0 and not first.speech
    np.testing.assert_array_equal(first.image, session.avatar.frames[first.avatar_index])
    assert all(f.state == IDLE for f in after.frames)
    audio = after.audio_out
    assert not audio[80:].any()                                # silent after a 5 ms fade
    assert np.all(np.abs(audio[:80]) <= np.abs(run.audio[-1][-1]) + 1e-6)
    assert renderer.frames == calls_before                    # pending renders were dropped
    m = session.metrics()
    assert m.interrupts == 1 and m.buffered_input_ms == 0.0
    # Speaking again after the interrupt has the normal latency.
    base = session.metrics().audio_out_samples
    again = drive(session, clock, speech_16k, len(speech_16k) / SR + 0.5)
    start, L = again.starts[0], session.latency_samples
    assert abs(start - base) <= 2 * 640                        # anchored at the clock, no backlog
    out = again.audio_out
    np.testing.assert_array_equal(out[start + L - base:start + L - base + len(speech_16k)], speech_16k)
    assert any(f.state == RENDERED for f in again.frames)
    assert session.metrics().latency_ms.p99 <= session.latency_ms + 1e-6


def test_input_stall_gives_idle_frames_and_no_latency_growth(speech_16k):
    session, clock, _ = make_session()
    run = drive(session, clock, speech_16k, len(speech_16k) / SR)
    lat_before = session.metrics().latency_ms.p95
    n_before = session.metrics().latency_ms.count
    stall = drive(session, clock, None, 1.0)                    # 1 s with no input at all
    idle_tail = [f for f in stall.frames if f.audio_start is None]
    assert len(idle_tail) >= 15 and all(f.state == IDLE for f in idle_tail)
    assert not stall.audio_out[-SR // 2:].any()
    resumed = drive(session, clock, speech_16k, len(speech_16k) / SR + 1.0)
    m = session.metrics()
    assert m.stalls >= 1 and m.segments == 2
    assert m.latency_ms.count > n_before + 50
    assert m.latency_ms.p99 <= lat_before + 1e-6          # no growth after the stall
    # The second utterance leaves with the same fixed delay: input index s plays at s + L.
    start = resumed.starts[0]
    out = np.concatenate([run.audio_out, stall.audio_out, resumed.audio_out])
    L = session.latency_samples
    np.testing.assert_array_equal(out[start + L:start + L + len(speech_16k)], speech_16k)
    # ... and its start is where the clock was when it arrived (no jump, no backlog).
    assert abs(start - (len(run.audio_out) + len(stall.audio_out))) <= 2 * 640
    # Its windows are the official windows of the second clip as played (after up to a frame of silence).
    frames = [f for f in resumed.frames if f.audio_start is not None]
    ref = mel_windows(melspectrogram(segment_audio(session, resumed, speech_16k, out)), session.fps)
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.mel, ref[min(i, len(ref) - 1)])


# --- further properties ---------------------------------------------------------------------------

@pytest.mark.parametrize("rate,channels", [(48000, 2), (22050, 1), (24000, 1)])
def test_any_input_format_plays_in_sync(speech_16k, rate, channels):
    t_src = np.arange(len(speech_16k)) / SR
    t_dst = np.arange(int(len(speech_16k) * rate / SR)) / rate
    wav = np.interp(t_dst, t_src, speech_16k).astype(np.float32)
    pcm = np.clip(np.round(wav * 32767), -32768, 32767).astype(np.int16)
    if channels == 2:
        pcm = np.repeat(pcm, 2)
    session, clock, _ = make_session()
    run = drive(session, clock, pcm, len(speech_16k) / SR + 1.0, rate=rate, channels=channels)
    frames = with_audio(run.frames)
    assert abs(len(frames) - len(speech_16k) / SR * session.fps) <= 2
    out = run.audio_out[session.latency_samples:session.latency_samples + len(speech_16k)]
    # Same speech (up to resampling): strongly correlated at (nearly) zero lag.
    lag = np.argmax(np.correlate(out[4000:20000], speech_16k[4000:20000 - 64], mode="valid"))
    assert lag <= 32
    assert session.metrics().frames_rendered > 20


def test_av_offset_at_non_integer_samples_per_frame(speech_16k):
    session, clock, _ = make_session(fps=29.97)
    drive(session, clock, speech_16k, len(speech_16k) / SR + 1.0)
    m = session.metrics()
    assert m.frames_rendered > 20
    assert m.av_offset_max_abs_ms <= 1000.0 / SR  # within one sample


def test_end_of_audio_flushes_without_waiting(speech_16k):
    session, clock, _ = make_session()
    clock.set(0.0)
    session.push_audio(speech_16k, SR)
    session.end_of_audio()
    run = drive(session, clock, None, len(speech_16k) / SR + 1.0)
    frames = with_audio(run.frames)
    played = segment_audio(session, run, speech_16k)
    ref = mel_windows(melspectrogram(played), session.fps)
    assert abs(len(frames) - len(played) / SR * session.fps) <= 1
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.mel, ref[min(i, len(ref) - 1)])
    assert session.metrics().stalls == 0


def test_tts_burst_does_not_count_as_latency(speech_16k):
    """Audio pushed ahead of real time queues at the source's expense: every frame leaves at the
    utterance's delay (here the compute budget only: the audio was already here), however long the
    burst."""
    session, clock, _ = make_session()
    clock.set(0.0)
    session.push_audio(np.concatenate([speech_16k, speech_16k]), SR)
    drive(session, clock, None, 2 * len(speech_16k) / SR + 0.5)
    m = session.metrics()
    assert m.frames_dropped == 0
    assert m.utterance_delay_ms < session.latency_ms
    assert m.latency_ms.p50 == pytest.approx(m.utterance_delay_ms, abs=1e-6)
    assert m.latency_ms.p99 == pytest.approx(m.utterance_delay_ms, abs=1e-6)


def test_metrics_are_plain_data(speech_16k):
    import json

    session, clock, _ = make_session()
    drive(session, clock, speech_16k[:SR], 1.5)
    m = session.metrics()
    json.dumps(asdict(m))  # a dataclass of plain values: asdict is the JSON (GET /sessions/{id})
    assert m.frames == m.frames_rendered + m.frames_held + m.frames_idle
    assert m.latency_ms.buckets["+Inf"] == m.latency_ms.count
    assert set(asdict(m.latency_ms)) >= {"p50", "p95", "p99", "count", "sum", "buckets"}  # the JSON keys
    assert m.render_ms.count == m.frames_rendered


def test_session_without_worker_only_idles(speech_16k):
    clock = ManualClock()
    session = LipSyncSession(FakeAvatar(), None, clock=clock)
    run = drive(session, clock, speech_16k, 2.0)
    assert all(f.state == IDLE for f in run.frames)
    L = session.latency_samples
    np.testing.assert_array_equal(run.audio_out[L:L + 16000], speech_16k[:16000])


def test_two_sessions_share_one_worker(speech_16k):
    clock = ManualClock()
    renderer = RecordingRenderer()
    worker = InlineRenderWorker(renderer, clock=ManualClock())
    a = LipSyncSession(FakeAvatar(), worker, clock=clock, name="a")
    b = LipSyncSession(FakeAvatar(), worker, clock=clock, name="b")
    ra, rb = Run(), Run()
    wav = speech_16k
    for step in range(int((len(wav) / SR + 1.0) / 0.02)):
        clock.set(step * 0.02)
        chunk = wav[(step - 1) * STEP:step * STEP] if step >= 1 else wav[:0]
        for s, r in ((a, ra), (b, rb)):
            if len(chunk):
                s.push_audio(chunk, SR)
            r.audio.append(s.next_audio(STEP))
            if step % 2 == 0:
                r.frames.append(s.next_video_frame())
    ma, mb = a.metrics(), b.metrics()
    assert ma.frames_rendered == mb.frames_rendered > 20
    assert renderer.frames == ma.frames_rendered + mb.frames_rendered
    np.testing.assert_array_equal(ra.audio_out, rb.audio_out)


@pytest.mark.parametrize("chunk_ms", [10, 60, 100])
def test_real_time_chunks_of_any_size_play_continuously(speech_16k, chunk_ms):
    """A source pushing bigger chunks in real time lags by a chunk between pushes: no false stalls."""
    session, clock, _ = make_session()
    run = drive(session, clock, speech_16k, len(speech_16k) / SR + 1.0, chunk_s=chunk_ms / 1000)
    m = session.metrics()
    assert m.segments == 1 and m.audio_underrun_samples == 0
    L, start = session.latency_samples, run.starts[0]
    assert start <= chunk_ms * 16                               # anchored where the clock was
    np.testing.assert_array_equal(run.audio_out[start + L:start + L + len(speech_16k)], speech_16k)
    frames = with_audio(run.frames)
    played = segment_audio(session, run, speech_16k)
    ref = mel_windows(melspectrogram(played), session.fps)
    assert abs(len(frames) - len(played) / SR * session.fps) <= 1
    # Windows follow the official rule for every frame that was planned in time.
    for f in frames:
        i = f.pts_index - frames[0].pts_index
        np.testing.assert_array_equal(f.mel, ref[min(i, len(ref) - 1)])
    if chunk_ms <= 20:
        assert m.frames_dropped == 0


def test_memory_stays_bounded_on_a_long_live_session(speech_16k):
    """A live source for minutes (video pulled, audio not): buffers, plans and features stay small."""
    clock = ManualClock()
    session = LipSyncSession(FakeAvatar(), InlineRenderWorker(RecordingRenderer(), clock=ManualClock()),
                             clock=clock)
    wav = np.tile(speech_16k, 8)
    for step in range(1, len(wav) // STEP):
        clock.set(step * 0.02)
        session.push_audio(wav[(step - 1) * STEP:step * STEP], SR)
        if step % 2 == 0:
            session.next_video_frame()
    assert session._ring.stored < 2 * SR
    assert len(session._planner.plans) <= 2 * session.timeline.delay_frames
    assert len(session._planner.results) <= 2 * session.timeline.delay_frames
    seg = session._segments[0]
    assert seg._cols.shape[1] < 64 and len(seg.speech._decisions) < 64
    assert session.metrics().segments == 1


def test_budget_can_be_fitted_to_a_slow_renderer_at_session_start(speech_16k):
    render_clock = ManualClock()
    renderer = SlowRenderer(render_clock, seconds_per_frame=0.2)       # 5 frame periods per frame
    worker = InlineRenderWorker(renderer, clock=render_clock)
    worker.prepare(FakeAvatar(), warmup=True)                          # measures the cost
    clock = ManualClock()
    fixed = LipSyncSession(FakeAvatar(), worker, EngineConfig(), clock=clock)
    fitted = LipSyncSession(FakeAvatar(), worker, EngineConfig(fit_budget_to_renderer=True), clock=clock)
    assert fixed.latency_ms == 320.0
    assert fitted.latency_ms >= 212.5 + 20 + 1.5 * 200 and fitted.latency_ms <= 212.5 + 20 + 1000 + 40
    drive(fitted, clock, speech_16k, len(speech_16k) / SR + 1.5)
    m = fitted.metrics()
    assert m.frames_rendered > 10                                   # the mouth moves, at ~5 fps
    assert m.latency_ms.p99 <= fitted.latency_ms + 1e-6


# --- deadline-aware batching (one session, a renderer that only keeps up in batches) ----------------

class AffineRenderer(RecordingRenderer):
    """A batch of n costs `fixed + per_frame * n` seconds on its own clock (a GPU / batched CPU model)."""

    name = "affine"

    def __init__(self, render_clock: ManualClock, fixed: float, per_frame: float) -> None:
        super().__init__()
        self.render_clock = render_clock
        self.fixed, self.per_frame = fixed, per_frame
        self.batch_sizes: list[int] = []

    def render(self, avatar, frame_indices, mels):
        self.render_clock.advance(self.fixed + self.per_frame * len(frame_indices))
        self.batch_sizes.append(len(frame_indices))
        return super().render(avatar, frame_indices, mels)


def _affine_session(config: EngineConfig, fixed: float = 0.05, per_frame: float = 0.01):
    """cost(1) = 60 ms > one 40 ms period; cost(4) / 4 = 22.5 ms < a period."""
    render_clock = ManualClock()
    renderer = AffineRenderer(render_clock, fixed, per_frame)
    worker = InlineRenderWorker(renderer, max_batch=config.max_batch, clock=render_clock)
    avatar = FakeAvatar()
    worker.prepare(avatar, warmup=True)                                # measures cost(1), (2), (4), (8)
    renderer.batch_sizes.clear()
    clock = ManualClock()
    return LipSyncSession(avatar, worker, config, clock=clock), clock, renderer, worker


def test_single_session_keeps_up_by_batching_a_renderer_too_slow_per_frame(speech_16k):
    period = 1 / 25
    session, clock, renderer, worker = _affine_session(EngineConfig(fit_budget_to_renderer=True))
    assert worker.cost.estimate(1) > period and worker.cost.estimate(4) / 4 < period
    k = session.timeline.batch_frames
    assert 2 <= k <= 4
    # The fixed delay covers gathering k frames and rendering them, and stays under the cap.
    budget_ms = session.latency_ms - 212.5 - 20.0
    assert budget_ms >= 1000 * ((k - 1) * period + worker.cost.estimate(k))
    assert session.latency_ms <= 212.5 + 20.0 + 1000.0 + 40.0
    wav = np.concatenate([speech_16k, speech_16k])
    run = drive(session, clock, wav, len(wav) / SR + 1.5)
    m = session.metrics()
    speech = m.frames_rendered + m.frames_dropped
    assert speech > 50
    assert m.frames_rendered >= 0.95 * speech, m                    # keeps up
    assert m.frames_dropped <= 2                                     # at most at startup
    lat = m.latency_ms
    assert lat.p95 - lat.p50 < 1000 * period                      # constant latency
    assert lat.p99 <= session.latency_ms + 1e-6                      # nothing accumulates
    assert m.av_offset_max_abs_ms == 0.0
    assert worker.stats().mean_batch >= 2.0                          # it did batch
    assert max(renderer.batch_sizes) <= worker.max_batch
    ks = [f.pts_index for f in run.frames]
    assert ks == list(range(len(ks)))
    # The audio is the input, delayed by the fixed latency, sample for sample.
    L = session.latency_samples
    np.testing.assert_array_equal(run.audio_out[L:L + len(wav)], wav)


def test_same_renderer_without_batching_drops(speech_16k):
    """The control for the test above: it can fail. With batches of one (max_batch=1) the same renderer,
    given the per-frame fitted budget, drops about a third of the speech frames."""
    config = EngineConfig(fit_budget_to_renderer=True, max_batch=1)
    session, clock, _, _ = _affine_session(config)
    assert session.timeline.batch_frames == 1
    wav = np.concatenate([speech_16k, speech_16k])
    drive(session, clock, wav, len(wav) / SR + 1.5)
    m = session.metrics()
    speech = m.frames_rendered + m.frames_dropped
    assert m.frames_dropped > 0.2 * speech, m
    assert m.latency_ms.p99 <= session.latency_ms + 1e-6


def test_gathering_leaves_the_worker_headroom(speech_16k):
    """Without the batch-sized budget (batch_to_keep_up=False) the old per-frame fit only keeps up, in
    noise-free simulated time, by batching whatever queued behind a busy worker: the renderer is then
    busy almost every frame period. Gathering k frames renders the same frames with far less renderer
    time, the headroom a shared, noisy CPU needs."""
    wav = np.concatenate([speech_16k, speech_16k])
    busy = {}
    for keep_up in (True, False):
        config = EngineConfig(fit_budget_to_renderer=True, batch_to_keep_up=keep_up)
        session, clock, _, worker = _affine_session(config)
        drive(session, clock, wav, len(wav) / SR + 1.5)
        m = session.metrics()
        assert m.frames_dropped <= 2
        busy[keep_up] = worker.stats().busy_s / m.frames_rendered
    assert busy[True] < 0.8 / 25 < 0.95 / 25 < busy[False]


def test_cheap_renderer_gets_a_smaller_exact_delay_and_batch_one(speech_16k):
    """A renderer much cheaper than a period (4 ms a frame) gets a renderer-sized budget, 1.5 cost + one
    period = 46 ms (less than the fixed 60 ms), and L exact to the sample, 212.5 + 20 + 46 = 278.5 ms (not
    rounded up to 320); it is never held back to gather a batch, drops nothing, and A/V stays exact."""
    session, clock, renderer, _ = _affine_session(EngineConfig(fit_budget_to_renderer=True),
                                                  fixed=0.002, per_frame=0.002)
    assert session.latency_ms == pytest.approx(278.5, abs=1 / 16) and session.timeline.batch_frames == 1
    assert session.latency_samples % 640 != 0                        # not a whole number of frames
    run = drive(session, clock, speech_16k, len(speech_16k) / SR + 1.0)
    m = session.metrics()
    assert m.frames_dropped == 0 and m.frames_rendered > 30
    assert m.av_offset_max_abs_ms == 0.0
    assert m.latency_ms.p99 <= session.latency_ms + 1e-6
    assert set(renderer.batch_sizes) == {1}
    L = session.latency_samples
    np.testing.assert_array_equal(run.audio_out[L:L + len(speech_16k)], speech_16k)


def test_a_sessions_delay_comes_from_the_warmup_curve_not_the_live_cost(speech_16k):
    """Sessions opened while the worker happens to be slow get the same fixed delay as the others: L is
    sized from the cost measured at warm-up, while the live estimate (batching, deadlines) moves."""
    first, _, _, worker = _affine_session(EngineConfig(fit_budget_to_renderer=True), fixed=0.002, per_frame=0.002)
    for _ in range(10):
        worker.cost.observe(1, 0.030)                 # a busy spell: renders took 30 ms
    assert worker.cost.estimate(1) > 0.025
    later = LipSyncSession(first.avatar, worker, EngineConfig(fit_budget_to_renderer=True), clock=ManualClock())
    assert later.latency_samples == first.latency_samples
    assert later.timeline.budget_samples == first.timeline.budget_samples
