"""Talking sooner, in simulated time (ManualClock + InlineRenderWorker): the per-utterance delay chosen
only at starts from silence, sample-exact A/V within an utterance, the look-ahead delay kept by a stream
that arrives in real time, the renderer-sized look-ahead, and the first frame of an utterance never
waiting for a batch (realtime/timeline/utterance_start.py, realtime/scheduling/batch_wait.py)."""
from __future__ import annotations

import numpy as np
import pytest
from test_engine import (
    SR,
    AffineRenderer,
    FakeAvatar,
    RecordingRenderer,
    Run,
    drive,
    make_session,
    segment_audio,
    with_audio,
)

from realtime.audio.mel import MelAlignment, mel_windows, melspectrogram
from realtime.config import EngineConfig
from realtime.renderers.base import AudioNeeds, RendererTraits
from realtime.scheduling.scheduler import InlineRenderWorker, RenderJob, RenderResult
from realtime.timeline.clock import ManualClock, Timeline
from realtime.timeline.session import LipSyncSession
from realtime.timeline.utterance_start import PendingStart, choose_start

JITTER_MS = EngineConfig().input_jitter_ms   # a live stream's first chunk arrives this long after its first sample


def played_at(out: np.ndarray, clip: np.ndarray) -> int:
    """The output sample where `clip` starts, asserting it is there sample for sample."""
    nz = int(np.flatnonzero(out)[0])
    first = int(np.flatnonzero(clip)[0])
    start = nz - first
    np.testing.assert_array_equal(out[start:start + len(clip)], clip)
    return start


def assert_frames_show_their_audio(session: LipSyncSession, frames) -> None:
    """Every frame with audio sits at its audio's output position: frame_start(k) = audio_start + L."""
    L = session.latency_samples
    for f in with_audio(frames):
        assert f.audio_start + L == session.timeline.frame_start(f.pts_index)
    assert session.metrics().av_offset_max_abs_ms == 0.0


# --- the delay is chosen at starts from silence only ------------------------------------------------

def test_delay_is_chosen_at_starts_from_silence_only(speech_16k):
    session, clock, _ = make_session()
    budget_ms = 1000 * session.timeline.budget_samples / SR
    L = session.latency_samples
    run = Run()
    drive(session, clock, None, 0.5, run)                       # idle avatar, nothing queued
    # 1. A burst from silence (an upload): starts after the compute budget, not the look-ahead delay.
    t_push = clock.t
    session.push_audio(speech_16k, SR)
    first_delay = session.metrics().utterance_delay_ms
    # The compute budget after the first output sample not yet played (<= one 20 ms block away).
    assert budget_ms <= first_delay <= budget_ms + 20 < session.latency_ms
    # 2. More audio while the first still plays: not a start from silence, so no new choice; it plays
    #    right after the first clip, on the same timeline.
    drive(session, clock, None, 0.5, run)
    session.push_audio(speech_16k, SR)
    assert session.metrics().utterance_delay_ms == first_delay
    assert session.metrics().quick_starts == 1
    drive(session, clock, None, 2 * len(speech_16k) / SR + 0.5, run)
    out = run.audio_out
    start = played_at(out, speech_16k)
    # The delay counts from the output clock when the audio arrived: exactly.
    assert start / SR - t_push == pytest.approx(first_delay / 1000, abs=1 / SR)
    np.testing.assert_array_equal(out[start + len(speech_16k):start + 2 * len(speech_16k)], speech_16k)
    # 3. After silence, a real-time stream: a new choice, the look-ahead placement (L after its first
    #    sample's capture, one 20 ms chunk before it arrived).
    stream = drive(session, clock, speech_16k, len(speech_16k) / SR + 1.0)
    assert session.metrics().utterance_delay_ms == pytest.approx(session.latency_ms - JITTER_MS)
    assert session.metrics().quick_starts == 1
    # 4. After silence again, a burst: the compute budget again.
    session.push_audio(speech_16k, SR)
    assert budget_ms <= session.metrics().utterance_delay_ms <= budget_ms + 20
    later = drive(session, clock, None, len(speech_16k) / SR + 0.5)
    for part in (run, stream, later):
        assert_frames_show_their_audio(session, part.frames)
    assert session.metrics().frames_dropped == 0
    assert L == session.latency_samples                          # the mapping itself never changed


def test_a_stream_faster_than_real_time_starts_early_and_keeps_its_delay(speech_16k):
    """A TTS stream at 4x real time (20 ms chunks every 5 ms): the choice waits until the audio runs
    ahead of real time by the look-ahead, then starts after the compute budget; nothing starves."""
    session, clock, _ = make_session()
    drive(session, clock, None, 0.3)
    t0 = clock.t
    run = Run()
    pushed, step = 0, 320
    while pushed < len(speech_16k):
        clock.set(t0 + 0.005 * (pushed // step + 1))
        session.push_audio(speech_16k[pushed:pushed + step], SR)
        pushed += step
        if abs(clock.t / 0.02 - round(clock.t / 0.02)) < 1e-9:
            run.audio.append(session.next_audio(320))
        if abs(clock.t / 0.04 - round(clock.t / 0.04)) < 1e-9:
            run.frames.append(session.next_video_frame())
    session.end_of_audio()
    drive(session, clock, None, len(speech_16k) / SR + 0.5, run)
    m = session.metrics()
    assert m.quick_starts == 1
    assert m.utterance_delay_ms < session.latency_ms - 100
    start = played_at(run.audio_out, speech_16k) / SR     # run.audio_out starts at t0
    # The delay counts from the output clock when its first chunk arrived (t0 + 5 ms): exactly.
    assert start == pytest.approx(0.005 + m.utterance_delay_ms / 1000, abs=1 / SR)
    assert m.frames_starved == 0 and m.frames_dropped == 0 and m.audio_underrun_samples == 0
    assert_frames_show_their_audio(session, run.frames)


# --- within an utterance: sample-exact, fixed --------------------------------------------------------

def test_quick_start_is_sample_exact_and_fixed_within_the_utterance(speech_16k):
    session, clock, renderer = make_session()
    clock.set(0.0)
    session.push_audio(speech_16k, SR)
    session.end_of_audio()
    run = drive(session, clock, None, len(speech_16k) / SR + 0.5)
    m = session.metrics()
    frames = with_audio(run.frames)
    # The returned audio is the input, sample for sample, from the utterance's start.
    start = played_at(run.audio_out, speech_16k)
    assert start == round(m.utterance_delay_ms * SR / 1000)
    # Its frames start at the frame at or before its first sample; the audio between is silence.
    first = session.timeline.frame_start(frames[0].pts_index)
    lead = start - first
    assert 0 <= lead < SR / session.fps
    # Each frame shows the window of its own audio: the official windows of that audio, in order.
    segment = np.concatenate([np.zeros(lead, np.float32), speech_16k])
    ref = mel_windows(melspectrogram(segment), session.fps)
    assert abs(len(frames) - len(segment) / SR * session.fps) <= 1
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.mel, ref[min(i, len(ref) - 1)])
        assert session.timeline.frame_start(f.pts_index) == first + round(i * SR / session.fps)
    assert_frames_show_their_audio(session, run.frames)
    # One delay for the whole utterance: every frame's latency is the same.
    lat = m.latency_ms
    assert lat.p50 == pytest.approx(m.utterance_delay_ms) and lat.p99 == pytest.approx(lat.p50)
    assert m.frames_dropped == 0 and renderer.frames == m.frames_rendered


# --- a real-time stream keeps the look-ahead delay -------------------------------------------------

@pytest.mark.parametrize("needs", [AudioNeeds(), AudioNeeds(columns=5), AudioNeeds(offset_frames=-1)])
def test_a_real_time_stream_keeps_the_lookahead_delay(speech_16k, needs):
    renderer = RecordingRenderer()
    renderer.traits = RendererTraits(audio_needs=needs)
    session, clock, _ = make_session(renderer)
    assert session.timeline.lookahead_samples == needs.lookahead_samples(25.0)
    run = drive(session, clock, speech_16k, len(speech_16k) / SR + 1.0)
    m = session.metrics()
    assert m.quick_starts == 0
    assert m.utterance_delay_ms == pytest.approx(session.latency_ms - JITTER_MS)
    # Audio arrives at the end of each 20 ms chunk, so a frame's own sample waits L - 20 ms plus where
    # in its chunk it lies (the same for every frame).
    assert session.latency_ms - 20.0 - 1.0 <= m.latency_ms.p50 < session.latency_ms
    assert m.latency_ms.p99 == pytest.approx(m.latency_ms.p50, abs=1.0)
    assert m.frames_dropped == 0 and m.frames_starved == 0
    L = session.latency_samples
    np.testing.assert_array_equal(run.audio_out[L:L + len(speech_16k)], speech_16k)
    assert_frames_show_their_audio(session, run.frames)


def test_lookahead_follows_the_renderer():
    """L = look-ahead + 20 ms jitter + 1.5-frame budget, rounded up to frames (25 fps)."""
    config = EngineConfig()
    official = Timeline.from_config(config, 25.0)
    training = Timeline.from_config(config, 25.0, needs=AudioNeeds(offset_frames=-1))
    builtin = Timeline.from_config(config, 25.0, needs=AudioNeeds(columns=5))
    assert (official.lookahead_ms, training.lookahead_ms, builtin.lookahead_ms) == (212.5, 172.5, 75.0)
    assert (official.delay_ms, training.delay_ms, builtin.delay_ms) == (320.0, 280.0, 160.0)


def test_training_alignment_windows_start_a_frame_earlier(speech_16k):
    """A Wav2Lip-like renderer with the training alignment sees, per frame, the offline windows of
    `mel_windows(..., MelAlignment.TRAINING)`: the window of the frame before (silence before the audio)."""
    renderer = RecordingRenderer()
    renderer.traits = RendererTraits(audio_needs=AudioNeeds(offset_frames=-1))
    session, clock, _ = make_session(renderer)
    run = drive(session, clock, speech_16k, len(speech_16k) / SR + 1.0)
    frames = with_audio(run.frames)
    segment = segment_audio(session, run, speech_16k)
    ref = mel_windows(melspectrogram(segment), session.fps, MelAlignment.TRAINING)
    official = mel_windows(melspectrogram(segment), session.fps)
    assert len(ref) == len(official)
    np.testing.assert_array_equal(ref[5], official[4])
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.mel, ref[min(i, len(ref) - 1)])


def test_choose_start_rules():
    tl = Timeline.from_config(EngineConfig(), 25.0, needs=AudioNeeds(columns=5))   # L = 2560, budget 960
    pending = PendingStart(opened_out=6400, lookahead_start=6400 + 2560, earliest=0)
    kw = dict(timeline=tl, jitter=320)
    # Real time (ahead by one chunk): wait, then the look-ahead placement once waiting cannot help.
    assert choose_start(pending, received=640, ended=False, now_out=6720, next_free=7040, **kw) is None
    assert choose_start(pending, received=2240, ended=False, now_out=8320, next_free=8320,
                        **kw) == pending.lookahead_start
    # Ahead of real time by look-ahead + jitter, or complete: the compute budget from the next free sample
    # (exactly: the session starts the frames at the frame before, with silence up to it).
    assert choose_start(pending, received=1520, ended=False, now_out=6400, next_free=6400, **kw) == 7360
    assert choose_start(pending, received=200, ended=True, now_out=6400, next_free=6400, **kw) == 7360
    # Never before the audio queued ahead of it.
    late = PendingStart(opened_out=6400, lookahead_start=8960, earliest=8320)
    assert choose_start(late, received=9999, ended=True, now_out=6400, next_free=6400, **kw) == 8320


# --- the first frame of an utterance is not batched -------------------------------------------------

class RecordingWorker(InlineRenderWorker):
    """Records each job with the result it got."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[RenderJob, RenderResult]] = []

    def submit(self, job: RenderJob) -> None:
        deliver = job.deliver

        def record(result: RenderResult, job: RenderJob = job) -> None:
            self.log.append((job, result))
            deliver(result)
        job.deliver = record
        super().submit(job)


def test_a_bursts_first_frame_is_rendered_alone(speech_16k):
    """An upload (a quick start) has all its frames ready at once: the first frame of the utterance still
    goes without them (alone: no other session here), the frames after it in batches. A batch would finish
    the first frame later, and miss its tick together with the whole batch whenever the renderer runs
    slower than its estimate."""
    config = EngineConfig(fit_budget_to_renderer=True)
    clock = ManualClock()
    worker = RecordingWorker(AffineRenderer(clock, fixed=0.008, per_frame=0.004), max_batch=config.max_batch,
                             clock=clock)
    avatar = FakeAvatar()
    worker.prepare(avatar, warmup=True)
    session = LipSyncSession(avatar, worker, config, clock=clock)
    drive(session, clock, None, 0.5)
    session.push_audio(speech_16k, SR)
    drive(session, clock, None, len(speech_16k) / SR + 0.5)
    assert session.metrics().quick_starts == 1 and session.metrics().frames_dropped == 0
    firsts = [r for j, r in worker.log if j.starts_utterance]
    assert firsts and all(r.batch_size == 1 for r in firsts)
    assert max(r.batch_size for j, r in worker.log if not j.starts_utterance) > 1   # the rest do batch


def test_first_frame_of_an_utterance_is_not_batched(speech_with_gap_16k):
    """A renderer that only keeps up in batches (the session's delay is sized for gathering k frames):
    later frames wait for company, but the first frame of each utterance starts rendering the moment it
    is ready, alone."""
    config = EngineConfig(fit_budget_to_renderer=True)
    render_clock, clock = ManualClock(), ManualClock()
    renderer = AffineRenderer(render_clock, fixed=0.05, per_frame=0.01)   # cost(1) 60 ms > a 40 ms period
    worker = RecordingWorker(renderer, max_batch=config.max_batch, clock=render_clock)
    avatar = FakeAvatar()
    worker.prepare(avatar, warmup=True)
    session = LipSyncSession(avatar, worker, config, clock=clock)
    assert session.timeline.batch_frames > 1
    drive(session, clock, speech_with_gap_16k, len(speech_with_gap_16k) / SR + 1.0)
    firsts = [(j, r) for j, r in worker.log if j.starts_utterance]
    assert len(firsts) >= 2                                      # one per utterance (speech, gap, speech)
    for job, result in firsts:
        assert result.batch_size == 1
        # It starts as soon as it is ready, or as soon as the batch rendering when it arrived ends.
        start = result.completed_at - result.render_s
        busy_until = max((r.completed_at for _, r in worker.log if r.completed_at - r.render_s < start - 1e-9),
                         default=-np.inf)
        assert start == pytest.approx(max(job.ready_at, busy_until))
    later = [(j, r) for j, r in worker.log if not j.starts_utterance]
    assert max(r.batch_size for _, r in later) > 1                                     # others gather
    assert any(r.completed_at - r.render_s > j.ready_at + 1e-9 for j, r in later)      # ... and wait
    m = session.metrics()
    assert m.frames_dropped <= 2


def test_mic_and_push_share_one_timeline(speech_16k):
    """A real-time (microphone) stream, then pushed audio while the microphone's audio still plays:
    one input timeline, the push plays right after, nothing overlaps or jumps."""
    session, clock, _ = make_session()
    mic = speech_16k[: SR // 2]
    run = drive(session, clock, mic, 0.5 + 0.01)
    session.push_audio(speech_16k, SR)                            # queued behind the microphone's audio
    m = session.metrics()
    assert m.quick_starts == 0 and m.utterance_delay_ms == pytest.approx(session.latency_ms - JITTER_MS)
    drive(session, clock, None, len(speech_16k) / SR + 1.0, run)
    out = run.audio_out
    L = session.latency_samples
    np.testing.assert_array_equal(out[L:L + len(mic)], mic)
    np.testing.assert_array_equal(out[L + len(mic):L + len(mic) + len(speech_16k)], speech_16k)
    assert_frames_show_their_audio(session, run.frames)

