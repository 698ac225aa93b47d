"""LipSyncSession: live audio in, a lip-synced avatar video and the matching delayed audio out.

No network code and no waiting: every method returns immediately, so the server calls them straight from
its asyncio loop, and tests call them in simulated time with a `ManualClock`. Rendering happens on a
`RenderWorker` (realtime/scheduler.py) that may be shared by many sessions.

API (all times in seconds from the injected `clock`, default time.monotonic)
----------------------------------------------------------------------------
    session = LipSyncSession(avatar, worker, config=EngineConfig(), clock=time.monotonic, name="")
        `avatar`: realtime.avatar.Avatar or anything with .frames (N,H,W,3) uint8 BGR, .boxes (N,4),
        .fps, .frame_index(tick). `worker`: a RenderWorker (None = never render, the avatar just idles).
        The constructor calls worker.prepare(avatar) (slow the first time per avatar: build sessions off
        the event loop, or prepare the avatar on the worker beforehand).

    session.push_audio(samples: np.ndarray, sample_rate: int, channels: int = 1, *, utterance=None) -> int
        Any rate, any chunk size; int16 (or int32/uint8) or float32 in [-1, 1]; interleaved when
        channels > 1 (or shaped (N, channels)). Returns the input-timeline index (16 kHz) where the
        converted chunk starts. Audio pushed faster than real time (TTS) simply queues. `utterance`
        names the speech it belongs to, for the playback events (`session.playback`, a
        realtime.playback.PlaybackTracker: speech_started / speech_ended with the exact played
        position); None for untracked audio (a microphone).
    session.end_of_audio() -> None
        Optional: the current utterance is complete (also for the playback events). Its last frames
        are made right away with the official end-of-clip windows instead of after the stall timeout (`stall_after_ms`).
    session.next_video_frame() -> VideoOut
        Call once per video tick (the caller paces it, e.g. every 1/fps s of wall time). Returns frame
        k = 0, 1, 2, ... with pts k / fps. Never waits: a frame whose render is not ready shows the
        held mouth (or the resting avatar) and counts as dropped.
    session.next_audio(n_samples: int) -> np.ndarray
        The next n samples of the output track: float32, 16 kHz, mono. Output sample j (pts j / 16000)
        is input sample j - latency_samples; silence where there is no input. Always continuous.
    session.interrupt() -> None
        Barge-in: drops queued audio and pending renders. The next frame is the resting avatar and the
        next audio block is silent (after a 5 ms fade from the last sample, no click).
    session.metrics() -> SessionStats  a snapshot (realtime/metrics.py): the counters, histograms and
                                     A/V offset, plus name, renderer, fps, latency_budget_ms,
                                     lookahead_ms, delay_frames, batch_frames, buffered_input_ms
    session.close() -> None          cancels pending renders; later pushes are ignored
    Properties: fps, latency_samples (L), latency_ms, lookahead_ms, timeline.

VideoOut fields: image (read-only BGR), pts_index k, pts (s), state (FrameState: RENDERED | HELD | IDLE),
speech, dropped, avatar_index, audio_start (input sample of the frame's own time, None without audio),
mel (the (80, 16) window of the frame, None without audio), mouth_alpha.

Simulated time (tests, benchmarks): pass `clock=ManualClock()` (realtime/clock.py) and an
`InlineRenderWorker` (realtime/scheduler.py); set the clock before each call. Nothing else reads time.

Timing model (see realtime/clock.py for why L is fixed)
------------------------------------------------------
The output clock is whatever paces the caller; "now" on the output timeline is the start of the latest
video tick or audio block pulled. Live input sample n is expected to arrive around output position n and
is played at n + L. Input is stored in *segments*: contiguous runs of pushed audio. A segment starts on
a frame boundary of the output (its first sample is shown by frame k0 and played at frame_start(k0)) at
the current output position, so a source that starts, or resumes after a stall, gets exactly latency L,
never more. A segment ends when input stops arriving for `stall_after_ms` (raised to 1.5x the chunk of
a source pushing bigger chunks in real time, at most L / 2) or on end_of_audio(): its
mel is flushed with the offline end padding and its frames follow the official rule, so each frame's mel
window equals `mel_windows(melspectrogram(segment audio), fps)` (frames past the official count reuse the
last window). Frame i of a segment is submitted for rendering when its 200 ms window is complete, which
is L minus the compute budget before its tick. When the budget was sized for batching
(`timeline.batch_frames` k > 1, see realtime/clock.py) the job says so and the worker may hold it while it
gathers up to k frames, never past what the job's deadline allows.

Latency reported per rendered frame = tick time - arrival time of the frame's own first audio sample;
audio pushed ahead of real time counts from when the output clock reached it (its queueing time is the
source's, not ours). A/V offset per frame = pts(frame) - pts(output audio sample that carries the frame's
first audio sample), zero by construction.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any, Callable

import numpy as np

from realtime import compositor
from realtime.audio_ingest import AudioIngest, AudioRing
from realtime.clock import Timeline, VideoClock
from realtime.config import EngineConfig
from realtime.mel import HOP, MEL_STEP, N_MELS, SAMPLE_RATE, SILENCE, StreamingMel
from realtime.metrics import SessionMetrics, SessionStats
from realtime.playback import PlaybackTracker
from realtime.renderers.base import OFFICIAL_WINDOW, MouthPatch, audio_needs_of
from realtime.scheduler import RenderJob, RenderResult, RenderWorker
from realtime.utterance_start import PendingStart, choose_start
from realtime.vad import SpeechDetector, SpeechTrack

log = logging.getLogger(__name__)


class FrameState(StrEnum):
    """What a video frame shows. A StrEnum: its members equal their strings ("rendered", ...), as before."""
    RENDERED = "rendered"   # a fresh mouth, rendered for this frame's audio
    HELD = "held"           # speech, but the render missed its tick: the last mouth is shown again
    IDLE = "idle"           # the avatar loop with the mouth at rest (possibly fading out the last mouth)


RENDERED, HELD, IDLE = FrameState.RENDERED, FrameState.HELD, FrameState.IDLE  # the short names used below

_FADE_SAMPLES = 80      # 5 ms audio fade after an interrupt


@dataclass
class VideoOut:
    pts_index: int               # k: pts = k / fps on the output timeline
    pts: float                   # seconds
    state: FrameState
    speech: bool                 # the speech decision for this frame
    dropped: bool                # a speech frame whose render was not ready in time
    avatar_index: int            # which avatar frame is underneath
    audio_start: int | None      # input-timeline sample of this frame's own audio time (None: no audio)
    mel: np.ndarray | None       # (80, 16) window this frame's mouth is made from (None: no audio)
    mouth_alpha: float           # strength the mouth patch was pasted with (0 = untouched avatar)
    compose: Callable[[], np.ndarray] = field(repr=False, compare=False)  # makes `image`
    _image: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 BGR, read-only (may be the avatar's own frame). The mouth is pasted on first
        access, from values fixed when the frame was made: the server reads it on a worker thread, so
        the paste stays off its event loop, and a frame nobody looks at (a skipped tick) costs nothing."""
        if self._image is None:
            self._image = self.compose()
        return self._image


def _composed(base: np.ndarray, patch: MouthPatch, mode: str, strength: float) -> np.ndarray:
    image = compositor.paste(base, patch, mode, strength=strength)
    image.flags.writeable = False
    return image


def _as_is(base: np.ndarray) -> np.ndarray:
    image = base.view()
    image.flags.writeable = False
    return image


@dataclass
class _FramePlan:
    k: int
    audio_start: int
    mel: np.ndarray
    speech: bool
    avatar_index: int
    arrival: float | None
    delay_frames: int     # its utterance's delay: frames from "its audio reached the output clock" to shown


class _Segment:
    """A contiguous run of input audio and its streaming features."""

    def __init__(self, start: int, first_k: int, config: EngineConfig, delay_frames: int,
                 pending: PendingStart | None = None) -> None:
        self.start = start              # input-timeline index of the segment's first sample
        self.first_k = first_k          # output frame that shows it
        self.delay_frames = delay_frames  # its delay in frames (the latency reference of its frames)
        self.pending = pending          # a start from silence not decided yet: stored, not fed
        self.last_speech = False        # was the last planned frame speech (the next one starts none)
        self.end: int | None = None     # length in samples, once the segment is closed
        self.fed = 0                    # samples given to the mel / VAD so far
        self.flushed = False
        self.mel = StreamingMel()
        self.speech = SpeechTrack(SpeechDetector(config.vad_aggressiveness, config.vad_block_ms,
                                                 config.energy_gate_dbfs))
        self._cols = np.zeros((N_MELS, 0), dtype=np.float32)
        self._col_base = 0
        self.next_i = 0                 # next segment frame to plan

    def feed(self, samples: np.ndarray) -> None:
        if len(samples):
            self._add(self.mel.push(samples))
            self.speech.push(samples)
            self.fed += len(samples)

    def flush(self) -> None:
        self._add(self.mel.flush())
        self.speech.end()
        self.flushed = True

    def _add(self, cols: np.ndarray) -> None:
        if cols.shape[1]:
            self._cols = np.concatenate([self._cols, cols], axis=1)

    def n_frames(self, spf: float) -> int | None:
        if not self.flushed:
            return None
        return math.ceil((self.end or 0) / spf - 1e-9)

    def window(self, start_col: int, columns: int = MEL_STEP) -> np.ndarray | None:
        """The (80, 16) window starting at `start_col` (clamped at the end once flushed), or None while
        its first `columns` columns (what the renderer reads) are not final. Columns before the audio
        (a negative start), past a short flushed segment, or past `columns` read as silence."""
        total = self.mel.columns_emitted
        if self.flushed:
            start_col = min(start_col, max(total - MEL_STEP, 0))
        elif start_col + columns > total:
            return None
        out = np.full((N_MELS, MEL_STEP), SILENCE, dtype=np.float32)
        lo, hi = max(start_col, 0), min(start_col + columns, total)
        if hi > lo:
            out[:, lo - start_col:hi - start_col] = self._cols[:, lo - self._col_base:hi - self._col_base]
        return out

    def discard_columns_before(self, col: int) -> None:
        col = min(col, self.mel.columns_emitted - MEL_STEP)
        drop = col - self._col_base
        if drop > 0:
            self._cols = self._cols[:, drop:]
            self._col_base += drop


class LipSyncSession:
    def __init__(self, avatar: Any, worker: RenderWorker | None, config: EngineConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, name: str = "") -> None:
        self.config = config or EngineConfig()
        self.avatar = avatar
        self.name = name
        self._worker = worker
        self._clock = clock
        if worker is not None:
            worker.prepare(avatar)
        fps = float(getattr(avatar, "fps", 0) or self.config.fps)
        cost = (worker.cost.estimate(1) or None) if worker is not None else None
        curve = worker.cost.estimate if worker is not None and cost else None
        max_batch = min(self.config.max_batch, worker.max_batch) if worker is not None else 1
        needs = audio_needs_of(worker.renderer) if worker is not None else OFFICIAL_WINDOW
        self.timeline = Timeline.from_config(self.config, fps, render_cost_s=cost, batch_cost=curve,
                                             max_batch=max_batch, needs=needs)
        self._L = self.timeline.delay_samples
        self._spf = self.timeline.samples_per_frame
        self._vclock = VideoClock(self.timeline)
        self._ingest = AudioIngest(SAMPLE_RATE)
        self._ring = AudioRing(int(self.config.max_buffered_s * SAMPLE_RATE))
        self._metrics = SessionMetrics(self.config.latency_buckets_ms, self.config.render_buckets_ms,
                                       self.config.latency_window)
        self._jitter = round(self.config.input_jitter_ms * SAMPLE_RATE / 1000)
        self._stall = round(self.config.stall_after_ms * SAMPLE_RATE / 1000)
        self._stall_tol = self._stall   # grows with the source's chunk size (see _note_chunk)
        self._paced_chunks: deque[int] = deque(maxlen=16)
        self._hangover = round(self.config.vad_hangover_ms * SAMPLE_RATE / 1000)
        self._margin = self.config.deadline_margin_ms / 1000.0
        self._gain_step = 1.0 / self.config.ramp_frames
        # Samples of a frame's audio the speech decision looks at: what the renderer reads, whole VAD
        # blocks only, so the decision never waits for audio beyond the renderer's look-ahead.
        block = round(self.config.vad_block_ms * SAMPLE_RATE / 1000)
        span = needs.columns * HOP + round(needs.offset_frames * self._spf)
        self._speech_span = max(block, span // block * block)
        self._utterance_delay_ms: float | None = None   # the delay the latest utterance started with
        self._quick_starts = 0                          # utterances that started with the compute budget only

        self._segments: deque[_Segment] = deque()
        # Input index after the last pushed sample (or the next start): it ends playing at in_head + L.
        # Before any input, -L: nothing is queued to play.
        self._in_head = -self._L
        self._ring.clear(head=self._in_head)
        self._audio_pos = 0             # output samples returned so far
        self._audio_now = 0             # output position of the start of the last audio block pulled
        self._plans: dict[int, _FramePlan] = {}
        self._results: dict[int, RenderResult] = {}
        self._inbox: deque[tuple[int, RenderResult]] = deque()  # filled by the worker thread
        self._gen = 0                   # bumped by interrupt(): results of older jobs are ignored
        self._gain = 0.0                # current mouth alpha
        self._held: tuple[MouthPatch, int] | None = None  # last rendered patch and its avatar frame
        self._hold_count = 0
        self._last_sample = 0.0
        self._fade_from: float | None = None
        self._closed = False
        # Utterance bookkeeping on the output timeline (realtime/playback.py): fed by the hooks below.
        self.playback = PlaybackTracker(self._L)

    # -- properties -------------------------------------------------------------------------------
    @property
    def fps(self) -> float:
        return self.timeline.fps

    @property
    def latency_samples(self) -> int:
        return self._L

    @property
    def latency_ms(self) -> float:
        return self.timeline.delay_ms

    @property
    def lookahead_ms(self) -> float:
        return self.timeline.lookahead_ms

    # -- input ------------------------------------------------------------------------------------
    def push_audio(self, samples: np.ndarray, sample_rate: int, channels: int = 1, *,
                   utterance: str | None = None) -> int:
        if self._closed:
            log.warning("session %s: push_audio after close ignored", self.name)
            return self._in_head
        now = self._clock()
        x = self._ingest.convert(samples, sample_rate, channels)
        if len(x) == 0:
            return self._in_head
        now_out = self._now_out()
        self._check_stall(now_out)
        if not self._segments or self._segments[-1].end is not None:
            self._open_segment(now_out)
        start = self._in_head
        self._note_chunk(len(x), start, now_out)
        kept = self._ring.append(x, start, now)
        self._in_head += kept
        self.playback.on_input(utterance, start, kept, now)
        self._metrics.audio_in_samples += len(x)
        self._metrics.audio_refused_samples += len(x) - kept
        self._advance(now)
        return start

    def end_of_audio(self) -> None:
        self.playback.finish(self._clock())
        if self._segments and self._segments[-1].end is None:
            seg = self._segments[-1]
            seg.end = self._in_head - seg.start
            self._advance(self._clock())

    def _open_segment(self, now_out: int) -> None:
        """A new segment, placed with the look-ahead delay: right after the input before it, or (a start
        from silence) at the output clock minus the jitter allowance. A start from silence stays pending
        until `_settle_start` decides whether it may start sooner (realtime/utterance_start.py)."""
        from_silence = self._in_head + self._L <= self._next_free_out()   # nothing queued to play
        earliest = max(self._in_head, now_out - self._jitter)
        k0 = self.timeline.first_frame_at_or_after(earliest + self._L)
        k0 = max(k0, self._vclock.next_index)
        start = self.timeline.frame_start(k0) - self._L
        pending = PendingStart(opened_out=now_out, lookahead_start=self.timeline.frame_start(k0),
                               earliest=self._in_head + self._L) if from_silence else None
        self._segments.append(_Segment(start, k0, self.config, self.timeline.delay_frames, pending))
        self._in_head = start
        self._metrics.segments += 1
        if pending is None:
            self._utterance_delay_ms = self.latency_ms
        log.debug("session %s: segment %d starts at input %d (frame %d)%s", self.name,
                  self._metrics.segments, start, k0, " (pending)" if pending else "")

    def _next_free_out(self) -> int:
        """The first output sample that is neither shown nor played yet."""
        return max(self.timeline.frame_start(self._vclock.next_index), self._audio_pos)

    def _settle_start(self, seg: _Segment, now_out: int) -> None:
        """Decide a pending segment's start (the per-utterance delay) when `choose_start` can, and move
        it there: its stored audio, its first frame and the input head move together, so the mapping
        input n -> output n + L stays exact."""
        assert seg.pending is not None
        received = (seg.end if seg.end is not None else self._in_head - seg.start)
        out_start = choose_start(seg.pending, received=received, ended=seg.end is not None, now_out=now_out,
                                 next_free=self._next_free_out(), timeline=self.timeline, jitter=self._jitter)
        if out_start is None:
            return
        delta = out_start - self._L - seg.start
        if delta:
            self._ring.move_from(seg.start, delta)
            self.playback.on_input_moved(seg.start, delta)
            seg.start += delta
            self._in_head += delta
            seg.first_k = self.timeline.first_frame_at_or_after(out_start)
            arrived_k = self.timeline.first_frame_at_or_after(seg.pending.opened_out + 1) - 1
            seg.delay_frames = seg.first_k - max(arrived_k, 0)
            self._quick_starts += 1
        self._utterance_delay_ms = 1000.0 * (out_start - seg.pending.opened_out) / SAMPLE_RATE
        seg.pending = None
        log.debug("session %s: utterance starts at output %d (delay %.0f ms)", self.name, out_start,
                  self._utterance_delay_ms)

    def _note_chunk(self, n: int, start: int, now_out: int) -> None:
        """Learn the pacing of the source: a real-time source pushing C-sample chunks lags by up to C
        between pushes, so the stall threshold becomes 1.5 C (at least stall_after_ms, at most L / 2).
        Chunks pushed ahead of the clock (TTS bursts) or longer than L / 2 say nothing about pacing."""
        if start <= now_out + n and n <= self._L // 2:
            self._paced_chunks.append(n)
            self._stall_tol = min(max(self._stall, int(1.5 * max(self._paced_chunks))), self._L // 2)

    def _now_out(self) -> int:
        last = self._vclock.next_index - 1
        video = self.timeline.frame_start(last) if last >= 0 else 0
        return max(video, self._audio_now)

    def _check_stall(self, now_out: int) -> None:
        if self._segments and self._segments[-1].end is None and self._in_head < now_out - self._stall_tol:
            seg = self._segments[-1]
            seg.end = self._in_head - seg.start
            self._metrics.stalls += 1
            log.debug("session %s: input stalled at %d; segment closed", self.name, self._in_head)

    # -- features, speech decisions and render jobs ------------------------------------------------
    def _advance(self, now: float) -> None:
        now_out = self._now_out()
        self._check_stall(now_out)
        horizon = now_out + self._L  # features further ahead are not needed yet (bounds work per call)
        for seg in list(self._segments):
            if seg.pending is not None:
                self._settle_start(seg, now_out)
                if seg.pending is not None:
                    continue  # stored, not fed: its place on the timeline is not decided yet
            limit = seg.end if seg.end is not None else self._in_head - seg.start
            upto = min(limit, horizon - seg.start)
            if upto > seg.fed:
                seg.feed(self._ring.read(seg.start + seg.fed, upto - seg.fed))
            if seg.end is not None and seg.fed >= seg.end and not seg.flushed:
                seg.flush()
            self._plan(seg, now)
            if seg.flushed and seg.next_i >= (seg.n_frames(self._spf) or 0):
                self._segments.remove(seg)
        # Input still needed: by the audio track (which may lag the video a little, or not run at all)
        # and by the features of the oldest segment.
        keep_from = max(self._audio_pos, now_out - SAMPLE_RATE) - self._L
        if self._segments:
            keep_from = min(keep_from, self._segments[0].start + self._segments[0].fed)
        self._ring.discard_before(keep_from)
        if self._worker is not None:
            self._worker.kick(now)
        self._drain()

    def _plan(self, seg: _Segment, now: float) -> None:
        tl = self.timeline
        n_frames = seg.n_frames(self._spf)
        while n_frames is None or seg.next_i < n_frames:
            i = seg.next_i
            mel = seg.window(tl.window_start_column(i), tl.needs.columns)
            if mel is None:
                break
            a = round(i * self._spf)
            speech = seg.speech.speech_in(a - self._hangover, a + self._speech_span)
            if speech is None:
                break
            seg.next_i += 1
            k = seg.first_k + i
            if k < self._vclock.next_index:
                continue  # its tick has passed: the input came too late (counted as starved)
            audio_start = tl.frame_start(k) - self._L
            plan = _FramePlan(k, audio_start, mel, speech, self.avatar.frame_index(k),
                              self._ring.arrival_of(audio_start), seg.delay_frames)
            self._plans[k] = plan
            starts_utterance = speech and not seg.last_speech
            seg.last_speech = speech
            if speech and self._worker is not None:
                self._worker.submit(RenderJob(
                    owner=self, key=k, avatar=self.avatar, avatar_index=plan.avatar_index, mel=mel,
                    deadline=self._vclock.expected_time(k, now) - self._margin, ready_at=now,
                    deliver=partial(self._receive, self._gen),
                    batch_hint=self.timeline.batch_frames, starts_utterance=starts_utterance))
                self._metrics.frames_submitted += 1
        i_next = seg.next_i
        seg.discard_columns_before(tl.window_start_column(i_next))
        seg.speech.discard_before(round(i_next * self._spf) - self._hangover)

    def _receive(self, gen: int, result: RenderResult) -> None:
        """The worker thread's delivery: tagged with the generation its job was submitted in."""
        self._inbox.append((gen, result))

    def _drain(self) -> None:
        while self._inbox:
            gen, res = self._inbox.popleft()
            if gen != self._gen or res.key < self._vclock.next_index:
                continue
            self._results[res.key] = res
            if res.patch is not None:
                self._metrics.render_ms.observe(1000.0 * res.render_s / max(res.batch_size, 1))

    # -- output -----------------------------------------------------------------------------------
    def next_video_frame(self) -> VideoOut:
        now = self._clock()
        k = self._vclock.tick(now)
        self._advance(now)
        plan = self._plans.pop(k, None)
        result = self._results.pop(k, None)
        m = self._metrics
        m.frames += 1
        idx = plan.avatar_index if plan is not None else int(self.avatar.frame_index(k))
        base = self.avatar.frames[idx]
        show: MouthPatch | None = None
        dropped = False
        if plan is not None and plan.speech and self._worker is not None:
            if result is not None and result.patch is not None and result.completed_at <= now:
                state = RENDERED
                show = result.patch
                self._held = (result.patch, idx)
                self._hold_count = 0
                self._gain = min(1.0, self._gain + self._gain_step)
                m.frames_rendered += 1
                self._observe_latency(plan, k, now)
            else:
                dropped = True
                m.frames_dropped += 1
                state, show = self._hold_or_fade(idx)
        else:
            if plan is None and self._covers_input(k):
                m.frames_starved += 1
                state, show = self._hold_or_fade(idx)
            else:
                state, show = IDLE, self._fade(idx)
                m.frames_idle += 1
        if plan is not None:
            m.observe_av_offset(1000.0 * (k / self.fps - (plan.audio_start + self._L) / SAMPLE_RATE))
        if show is not None and self._gain > 0.0:
            compose = partial(_composed, base, show, self.config.paste_mode, self._gain)
        else:
            compose = partial(_as_is, base)
        return VideoOut(
            compose=compose, pts_index=k, pts=k / self.fps, state=state,
            speech=bool(plan is not None and plan.speech), dropped=dropped, avatar_index=idx,
            audio_start=plan.audio_start if plan is not None else None,
            mel=plan.mel if plan is not None else None,
            mouth_alpha=self._gain if show is not None else 0.0,
        )

    def _hold_or_fade(self, idx: int) -> tuple[FrameState, MouthPatch | None]:
        """A speech frame without its own mouth: re-show the last one (bounded), else fade to rest."""
        if self._held is not None and self._hold_count < self.config.max_hold_frames and self._gain > 0:
            self._hold_count += 1
            self._metrics.frames_held += 1
            return HELD, self._moved_held(idx)
        self._metrics.frames_idle += 1
        return IDLE, self._fade(idx)

    def _fade(self, idx: int) -> MouthPatch | None:
        self._gain = max(0.0, self._gain - self._gain_step)
        if self._gain <= 0.0 or self._held is None:
            self._held = None
            self._gain = 0.0
            return None
        return self._moved_held(idx)

    def _moved_held(self, idx: int) -> MouthPatch | None:
        if self._held is None:
            return None
        patch, from_idx = self._held
        boxes = getattr(self.avatar, "boxes", None)
        if boxes is None or from_idx == idx:
            return patch
        dy = int(boxes[idx][0]) - int(boxes[from_idx][0])
        dx = int(boxes[idx][2]) - int(boxes[from_idx][2])
        return compositor.shifted(patch, dy, dx)

    def _covers_input(self, k: int) -> bool:
        """Does frame k fall inside a segment (audio expected) whose features were not ready?"""
        x = self.timeline.frame_start(k) - self._L
        for seg in self._segments:
            if seg.start <= x and (seg.end is None or x < seg.start + seg.end):
                return True
        return False

    def _observe_latency(self, plan: _FramePlan, k: int, now: float) -> None:
        if plan.arrival is None:
            return
        arrival = plan.arrival
        slot = self._vclock.time_of(k - plan.delay_frames)
        if slot is not None:
            arrival = max(arrival, slot)
        self._metrics.latency_ms.observe(1000.0 * (now - arrival))

    def next_audio(self, n_samples: int) -> np.ndarray:
        n = int(n_samples)
        if n <= 0:
            return np.zeros(0, dtype=np.float32)
        now = self._clock()
        j = self._audio_pos
        x = j - self._L
        out = self._ring.read(x, n)
        self._count_underrun(x, n)
        if self._fade_from is not None:
            m = min(_FADE_SAMPLES, n)
            out[:m] += self._fade_from * np.linspace(1.0, 0.0, m, endpoint=False, dtype=np.float32)
            self._fade_from = None
        self._last_sample = float(out[-1])
        self._audio_now = j
        self._audio_pos = j + n
        self._metrics.audio_out_samples += n
        self.playback.on_output(j, n, now)
        self._advance(now)
        return out

    def _count_underrun(self, x: int, n: int) -> None:
        if not self._segments or self._segments[-1].end is not None:
            return
        seg = self._segments[-1]
        lo = max(x, self._in_head, seg.start)
        if x + n > lo:
            self._metrics.audio_underrun_samples += x + n - lo

    # -- control ----------------------------------------------------------------------------------
    def interrupt(self) -> None:
        self._gen += 1
        if self._worker is not None:
            self._worker.cancel(self)
        self._inbox.clear()
        self._plans.clear()
        self._results.clear()
        self._segments.clear()
        self._ingest.reset()
        # New input starts after everything already shown or played.
        self._in_head = max(self._audio_pos, self.timeline.frame_start(self._vclock.next_index)) - self._L
        self._ring.clear(head=min(self._ring.head, self._in_head))
        self._gain = 0.0
        self._held = None
        self._hold_count = 0
        self._fade_from = self._last_sample if self._last_sample != 0.0 else None
        self._last_sample = 0.0
        self._metrics.interrupts += 1
        self.playback.on_interrupt(self._audio_pos, self._clock())
        log.debug("session %s: interrupted", self.name)

    def close(self) -> None:
        if self._closed:
            return
        self.interrupt()
        self._metrics.interrupts -= 1
        self._closed = True

    def metrics(self) -> SessionStats:
        self._drain()
        return SessionStats.of(
            self._metrics, name=self.name, renderer=None if self._worker is None else self._worker.name,
            fps=self.fps, latency_budget_ms=self.latency_ms, lookahead_ms=self.lookahead_ms,
            utterance_delay_ms=self._utterance_delay_ms, quick_starts=self._quick_starts,
            delay_frames=self.timeline.delay_frames, batch_frames=self.timeline.batch_frames,
            buffered_input_ms=(1000.0 * max(0, self._ring.head - (self._audio_pos - self._L)) / SAMPLE_RATE
                               if self._ring.stored else 0.0))
