"""LipSyncSession: live audio in, a lip-synced avatar video and the matching delayed audio out.

No network code and no waiting: every method returns immediately, so the server calls them straight from
its asyncio loop, and tests call them in simulated time with a `ManualClock`. Rendering happens on a
`RenderWorker` (realtime/scheduling/scheduler.py) that may be shared by many sessions.

API (all times in seconds from the injected `clock`, default time.monotonic)
----------------------------------------------------------------------------
    session = LipSyncSession(avatar, worker, config=EngineConfig(), clock=time.monotonic, name="")
        `avatar`: realtime.avatars.avatar.Avatar or anything with .frames (N,H,W,3) uint8 BGR, .boxes (N,4),
        .fps, .frame_index(tick). `worker`: a RenderWorker (None = never render, the avatar just idles).
        The constructor calls worker.prepare(avatar) (slow the first time per avatar: build sessions off
        the event loop, or prepare the avatar on the worker beforehand).

    session.push_audio(samples: np.ndarray, sample_rate: int, channels: int = 1, *, utterance=None,
                       live=False) -> int
        Any rate, any chunk size; int16 (or int32/uint8) or float32 in [-1, 1]; interleaved when
        channels > 1 (or shaped (N, channels)). Returns the input-timeline index (16 kHz) where the
        converted chunk starts. Audio pushed faster than real time (TTS) simply queues. `utterance`
        names the speech it belongs to, for the playback events (`session.playback`, a
        realtime.timeline.playback.PlaybackTracker: speech_started / speech_ended with the exact played
        position); None for untracked audio (a microphone). Raises `QueueLimit` (nothing queued) when
        the chunk would start an utterance past `config.max_queued_utterances` or a segment past
        `config.max_queued_segments`: the cost of a push is constant, but each queued utterance and
        segment holds memory, and a source sending one-sample utterances would otherwise queue millions.
        `live=True` declares a real-time capture (the server's microphone): its arrival jitter widens
        the stall threshold, and delay a late burst added is given back in its pauses
        (realtime/timeline/live_arrival.py). Never for pushed speech, whose pauses are content.
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

Parts (the session coordinates them): realtime/timeline/input_segment.py (a segment's mel and VAD),
realtime/timeline/frame_planner.py (per-frame windows, speech decisions, render jobs and results),
realtime/timeline/mouth_hold.py (held / idle mouth and its alpha ramp), realtime/timeline/output_audio.py (the delayed
output track), realtime/timeline/stall_threshold.py (when a pause closes a segment), realtime/timeline/video_out.py
(VideoOut, FrameState; re-exported here).

Simulated time (tests, benchmarks): pass `clock=ManualClock()` (realtime/timeline/clock.py) and an
`InlineRenderWorker` (realtime/scheduling/scheduler.py); set the clock before each call. Nothing else reads time.

Timing model (see realtime/timeline/clock.py for why L is fixed)
------------------------------------------------------
The output clock is whatever paces the caller; "now" on the output timeline is the start of the latest
video tick or audio block pulled. Live input sample n is expected to arrive around output position n and
is played at n + L. Input is stored in *segments*: contiguous runs of pushed audio. A segment starts on
a frame boundary of the output (its first sample is shown by frame k0 and played at frame_start(k0)). A
start from silence is placed exactly (look-ahead delay L from the output clock minus the jitter
allowance, or sooner for audio already here: realtime/timeline/utterance_start.py) and its segment begins at the
frame at or before that point with leading silence, so no sound waits for the next frame boundary; audio
that resumes after a stall while earlier audio still plays starts at the next frame boundary after it.
A segment ends when input stops arriving for `stall_after_ms` (raised to 1.5x the chunk of
a source pushing bigger chunks in real time, or to the jitter allowance plus the arrival jitter a live
input showed, at most L / 2) or on end_of_audio(): its
mel is flushed with the offline end padding and its frames follow the official rule, so each frame's mel
window equals `mel_windows(melspectrogram(segment audio), fps)` (frames past the official count reuse the
last window). Frame i of a segment is submitted for rendering when its 200 ms window is complete, which
is L minus the compute budget before its tick. When the budget was sized for batching
(`timeline.batch_frames` k > 1, see realtime/timeline/clock.py) the job says so and the worker may hold it while it
gathers up to k frames, never past what the job's deadline allows.

Latency reported per rendered frame = tick time - arrival time of the frame's own first audio sample
(when real time brought it, within its chunk: `AudioRing.arrival_of`); audio pushed ahead of real time
counts from when the output clock reached it (its queueing time is the source's, not ours).
A/V offset per frame = pts(frame) - pts(output audio sample that carries the frame's first audio sample),
zero by construction.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from functools import partial
from typing import Callable

import numpy as np

from realtime.audio.audio_ingest import AudioIngest, AudioRing
from realtime.audio.mel import SAMPLE_RATE
from realtime.avatars.avatar import Avatar
from realtime.config import EngineConfig
from realtime.metrics import SessionMetrics, SessionStats
from realtime.rate_limited_log import RateLimitedLog
from realtime.renderers.base import OFFICIAL_WINDOW, MouthPatch
from realtime.scheduling.scheduler import RenderWorker
from realtime.timeline.clock import Timeline, VideoClock
from realtime.timeline.frame_planner import FramePlan, FramePlanner
from realtime.timeline.input_segment import InputSegment
from realtime.timeline.live_arrival import LiveArrival
from realtime.timeline.mouth_hold import MouthHold
from realtime.timeline.output_audio import DelayedAudioOut
from realtime.timeline.playback import PlaybackTracker
from realtime.timeline.stall_threshold import StallThreshold
from realtime.timeline.utterance_start import PendingStart, choose_start
from realtime.timeline.video_out import HELD, IDLE, RENDERED, FrameState, VideoOut, composed_image, unchanged_image

__all__ = ["HELD", "IDLE", "RENDERED", "FrameState", "LipSyncSession", "QueueLimit", "VideoOut"]

log = logging.getLogger(__name__)


class QueueLimit(Exception):
    """push_audio refused the chunk: the session already queues as many utterances (or segments) as
    its config allows. Nothing of the chunk was queued; retry once some has played."""


class LipSyncSession:
    def __init__(self, avatar: Avatar, worker: RenderWorker | None, config: EngineConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, name: str = "", *, avatar_id: str = "default",
                 on_close: Callable[[LipSyncSession], None] | None = None) -> None:
        """`avatar_id`: the id the avatar has in its library (what the server answers with); `on_close`:
        called once when the session closes (an engine gives its worker slot and avatar back)."""
        self.config = config or EngineConfig()
        self.avatar = avatar
        self.avatar_id = avatar_id
        self.name = name
        self._on_close = on_close
        self._worker = worker
        self._clock = clock
        if worker is not None:
            worker.prepare(avatar)
        fps = float(avatar.fps or self.config.fps)
        sizing = None if worker is None else (worker.warmup_cost if worker.warmup_cost.by_size else worker.cost)
        cost = (sizing.estimate(1) or None) if sizing is not None else None
        curve = sizing.estimate if sizing is not None and cost else None
        max_batch = min(self.config.max_batch, worker.max_batch) if worker is not None else 1
        needs = worker.renderer.traits.audio_needs if worker is not None else OFFICIAL_WINDOW
        self.timeline = Timeline.from_config(self.config, fps, render_cost_s=cost, batch_cost=curve,
                                             max_batch=max_batch, needs=needs)
        self._delay_samples = self.timeline.delay_samples
        self._samples_per_frame = self.timeline.samples_per_frame
        self._vclock = VideoClock(self.timeline)
        self._ingest = AudioIngest(SAMPLE_RATE)
        self._ring = AudioRing(int(self.config.max_buffered_s * SAMPLE_RATE))
        self._metrics = SessionMetrics(self.config.latency_buckets_ms, self.config.render_buckets_ms,
                                       self.config.latency_window)
        self._jitter_samples = round(self.config.input_jitter_ms * SAMPLE_RATE / 1000)
        self._stall = StallThreshold(self.config.stall_after_ms, self._delay_samples, self._jitter_samples)
        self._live = LiveArrival(window=round(self.config.live_window_ms * SAMPLE_RATE / 1000),
                                 jitter=self._jitter_samples,
                                 min_quiet=round(self.config.vad_hangover_ms * SAMPLE_RATE / 1000),
                                 quiet_rms=10.0 ** (self.config.energy_gate_dbfs / 20.0))
        self._utterance_delay_ms: float | None = None   # the delay the latest utterance started with
        self._quick_starts = 0                          # utterances that started with the compute budget only
        self._out_anchor: tuple[int, float] | None = None   # (output position, wall time) of the latest pull

        self._segments: deque[InputSegment] = deque()
        # Input index after the last pushed sample (or the next start): it ends playing at in_head + L.
        # Before any input, -L: nothing is queued to play.
        self._in_head = -self._delay_samples
        self._ring.clear(head=self._in_head)
        self._audio_out = DelayedAudioOut(self._ring, self._delay_samples)
        self._planner = FramePlanner(self, avatar, worker, self.config, self.timeline, self._vclock,
                                     self._ring, self._metrics)
        self._mouth = MouthHold(avatar, self.config.ramp_frames, self.config.max_hold_frames)
        self._closed = False
        self._closed_log = RateLimitedLog(log)
        # Utterance bookkeeping on the output timeline (realtime/timeline/playback.py): fed by the hooks below.
        self.playback = PlaybackTracker(self._delay_samples)

    # -- properties -------------------------------------------------------------------------------
    @property
    def fps(self) -> float:
        return self.timeline.fps

    @property
    def latency_samples(self) -> int:
        return self._delay_samples

    @property
    def latency_ms(self) -> float:
        return self.timeline.delay_ms

    @property
    def lookahead_ms(self) -> float:
        return self.timeline.lookahead_ms

    # -- input ------------------------------------------------------------------------------------
    def push_audio(self, samples: np.ndarray, sample_rate: int, channels: int = 1, *,
                   utterance: str | None = None, live: bool = False) -> int:
        if self._closed:
            self._closed_log("session %s: push_audio after close ignored", self.name)
            return self._in_head
        if np.size(samples) == 0:
            return self._in_head
        now = self._clock()
        now_out = self._now_out()
        self._check_stall(now_out)
        opens = not self._segments or self._segments[-1].end is not None
        self._check_room(opens, utterance)   # before the resampler sees the chunk: a refusal changes nothing
        converted = self._ingest.convert(samples, sample_rate, channels)
        if len(converted) == 0:
            return self._in_head
        if opens:
            self._open_segment(now_out, self._output_position(now))
        start = self._in_head
        received = len(converted)
        self._stall.note_chunk(received, start, now_out)
        if live:
            trim = self._live.note(converted, start, self._output_position(now),
                                   may_trim=not opens and self._segments[-1].pending is None)
            self._stall.note_spread(self._live.spread)
            if trim:   # quiet input: a pause plays shorter, giving back delay the link no longer needs
                converted = converted[trim:]
                self._metrics.live_trimmed_samples += trim
        kept = self._ring.append(converted, start, now) if len(converted) else 0
        self._in_head += kept
        self.playback.on_input(utterance, start, kept, now)
        self._metrics.audio_in_samples += received
        self._metrics.audio_refused_samples += len(converted) - kept
        self._metrics.audio_refused_chunks += int(kept < len(converted))
        self._advance(now)
        return start

    def _check_room(self, opens_segment: bool, utterance: str | None) -> None:
        if opens_segment and len(self._segments) >= self.config.max_queued_segments:
            raise QueueLimit(f"{len(self._segments)} audio segments are queued (the limit); wait for "
                             "some to play or interrupt")
        if (utterance is not None and utterance != self.playback.current
                and self.playback.queued_utterances >= self.config.max_queued_utterances):
            raise QueueLimit(f"{self.playback.queued_utterances} utterances are queued (the limit); wait "
                             "for some to play or interrupt")

    def end_of_audio(self) -> None:
        self.playback.finish(self._clock())
        if self._segments and self._segments[-1].end is None:
            seg = self._segments[-1]
            seg.end = self._in_head - seg.start
            self._advance(self._clock())

    def _open_segment(self, now_out: int, position: int) -> None:
        """A new segment. Audio that continues the input before it (no silence between) is placed with
        the look-ahead delay right after it, from the next frame on. A start from silence is stored where
        it arrived (the output clock minus the jitter allowance) and stays pending until `_settle_start`
        decides where it plays (realtime/timeline/utterance_start.py). `position`: the output clock now (not the
        start of the latest tick or block, `now_out`, which is up to a block behind: a start placed from
        that would eat into the compute budget of every frame of the utterance)."""
        from_silence = self._in_head + self._delay_samples <= self._next_free_out()   # nothing queued to play
        if from_silence:
            start, first_frame = max(self._in_head, position - self._jitter_samples), -1   # frame: with the start
            pending = PendingStart(opened_out=position, lookahead_start=start + self._delay_samples,
                                   earliest=self._in_head + self._delay_samples)
        else:
            earliest = max(self._in_head, now_out - self._jitter_samples)
            first_frame = self.timeline.first_frame_at_or_after(earliest + self._delay_samples)
            first_frame = max(first_frame, self._vclock.next_index)
            start, pending = self.timeline.frame_start(first_frame) - self._delay_samples, None
            self._utterance_delay_ms = self.latency_ms
        self._segments.append(InputSegment(start, first_frame, self.config, self._delay_samples, pending))
        if from_silence:
            self._live.restart(position)
        else:
            self._live.moved(start - self._in_head)   # the gap a stall leaves: the input plays later
        self._in_head = start
        self._metrics.segments += 1
        log.debug("session %s: segment %d starts at input %d%s", self.name, self._metrics.segments, start,
                  " (pending)" if pending else f" (frame {first_frame})")

    def _next_free_out(self) -> int:
        """The first output sample that is neither shown nor played yet."""
        return max(self.timeline.frame_start(self._vclock.next_index), self._audio_out.position)

    def _settle_start(self, seg: InputSegment, position: int) -> None:
        """Decide a pending segment's start (the per-utterance delay) when `choose_start` can, and place
        it there: its first sample plays exactly at the chosen output sample (its stored audio and the
        input head move with it, so the mapping input n -> output n + L stays exact), and its frames start
        with the frame at or before that sample, the audio in between being silence (leading zeros of
        the segment, as in a clip that starts with a pause): no wait for the next frame boundary."""
        assert seg.pending is not None
        received = (seg.end if seg.end is not None else self._in_head - seg.start)
        next_free = self._next_free_out()
        out_start = choose_start(seg.pending, received=received, ended=seg.end is not None, now_out=position,
                                 next_free=next_free, timeline=self.timeline, jitter=self._jitter_samples)
        if out_start is None:
            return
        first_frame = max(self.timeline.frame_at_or_before(out_start), self.timeline.first_frame_at_or_after(next_free))
        out_start = max(out_start, self.timeline.frame_start(first_frame))
        delta = out_start - self._delay_samples - seg.start
        if delta:
            self._ring.move_from(seg.start, delta)
            self.playback.on_input_moved(seg.start, delta)
            self._in_head += delta
        lead = out_start - self.timeline.frame_start(first_frame)   # silence before its first sample
        seg.start += delta - lead
        if seg.end is not None:
            seg.end += lead
        seg.first_frame = first_frame
        if out_start < seg.pending.lookahead_start:
            self._quick_starts += 1
            # Its frames' latency counts from when its audio reached the output clock (it was here before
            # real time would have brought it), i.e. is its delay.
            seg.delay_samples = out_start - seg.pending.opened_out
        self._utterance_delay_ms = 1000.0 * (out_start - seg.pending.opened_out) / SAMPLE_RATE
        seg.pending = None
        self._live.moved(delta)
        log.debug("session %s: utterance starts at output %d, frame %d (delay %.0f ms)", self.name, out_start,
                  first_frame, self._utterance_delay_ms)

    def _output_position(self, now: float) -> int:
        """The output clock at wall time `now`: the latest tick or block pulled, plus the time since."""
        if self._out_anchor is None:
            return self._now_out()
        position, at = self._out_anchor
        return max(self._now_out(), position + int((now - at) * SAMPLE_RATE))

    def _note_output(self, position: int, now: float) -> None:
        if self._out_anchor is None or position >= self._out_anchor[0]:
            self._out_anchor = (position, now)

    def _now_out(self) -> int:
        last = self._vclock.next_index - 1
        video = self.timeline.frame_start(last) if last >= 0 else 0
        return max(video, self._audio_out.block_start)

    def _check_stall(self, now_out: int) -> None:
        if self._segments and self._segments[-1].end is None and self._in_head < now_out - self._stall.samples:
            seg = self._segments[-1]
            seg.end = self._in_head - seg.start
            self._metrics.stalls += 1
            log.debug("session %s: input stalled at %d; segment closed", self.name, self._in_head)

    # -- features, speech decisions and render jobs ------------------------------------------------
    def _advance(self, now: float) -> None:
        now_out = self._now_out()
        self._check_stall(now_out)
        horizon = now_out + self._delay_samples  # features further ahead are not needed yet (bounds work per call)
        # Segments are in input order: the first that starts at or past the horizon has nothing to do yet,
        # nor has any after it, so the work per call does not grow with the queue. (A pending segment is
        # the last one and starts where the output clock is: before the horizon.)
        i = 0
        while i < len(self._segments):
            seg = self._segments[i]
            if seg.pending is None and seg.start >= horizon:
                break
            if seg.pending is not None:
                self._settle_start(seg, self._output_position(now))
                if seg.pending is not None:
                    i += 1
                    continue  # stored, not fed: its place on the timeline is not decided yet
            limit = seg.end if seg.end is not None else self._in_head - seg.start
            upto = min(limit, horizon - seg.start)
            if upto > seg.fed:
                seg.feed(self._ring.read(seg.start + seg.fed, upto - seg.fed))
            if seg.end is not None and seg.fed >= seg.end and not seg.flushed:
                seg.flush()
            self._planner.plan(seg, now)
            if seg.flushed and seg.next_frame >= (seg.frame_count(self._samples_per_frame) or 0):
                del self._segments[i]
            else:
                i += 1
        # Input still needed: by the audio track (which may lag the video a little, or not run at all)
        # and by the features of the oldest segment.
        keep_from = max(self._audio_out.position, now_out - SAMPLE_RATE) - self._delay_samples
        if self._segments:
            keep_from = min(keep_from, self._segments[0].start + self._segments[0].fed)
        self._ring.discard_before(keep_from)
        if self._worker is not None:
            self._worker.kick(now)
        self._planner.drain()

    # -- output -----------------------------------------------------------------------------------
    def next_video_frame(self) -> VideoOut:
        now = self._clock()
        k = self._vclock.tick(now)
        self._note_output(self.timeline.frame_start(k), now)
        self._advance(now)
        plan, result = self._planner.take(k)
        metrics = self._metrics
        metrics.frames += 1
        idx = plan.avatar_index if plan is not None else int(self.avatar.frame_index(k))
        base = self.avatar.frames[idx]
        show: MouthPatch | None = None
        dropped = False
        if plan is not None and plan.speech and self._worker is not None:
            if result is not None and result.patch is not None and result.completed_at <= now:
                state = RENDERED
                show = result.patch
                self._mouth.rendered(result.patch, idx)
                metrics.frames_rendered += 1
                self._observe_latency(plan, k, now)
            else:
                dropped = True
                metrics.frames_dropped += 1
                state, show = self._hold_or_fade(idx)
        else:
            if plan is None and self._covers_input(k):
                metrics.frames_starved += 1
                state, show = self._hold_or_fade(idx)
            else:
                state, show = IDLE, self._mouth.fade(idx)
                metrics.frames_idle += 1
        if plan is not None:
            metrics.observe_av_offset(1000.0 * (k / self.fps - (plan.audio_start + self._delay_samples) / SAMPLE_RATE))
        if show is not None and self._mouth.gain > 0.0:
            compose = partial(composed_image, base, show, self.config.paste_mode, self._mouth.gain)
        else:
            compose = partial(unchanged_image, base)
        return VideoOut(
            compose=compose, pts_index=k, pts=k / self.fps, state=state,
            speech=bool(plan is not None and plan.speech), dropped=dropped, avatar_index=idx,
            audio_start=plan.audio_start if plan is not None else None,
            mel=plan.mel if plan is not None else None,
            mouth_alpha=self._mouth.gain if show is not None else 0.0,
        )

    def _hold_or_fade(self, idx: int) -> tuple[FrameState, MouthPatch | None]:
        state, show = self._mouth.hold_or_fade(idx)
        if state == HELD:
            self._metrics.frames_held += 1
        else:
            self._metrics.frames_idle += 1
        return state, show

    def _covers_input(self, k: int) -> bool:
        """Does frame k fall inside a segment (audio expected) whose features were not ready?"""
        audio_start = self.timeline.frame_start(k) - self._delay_samples
        for seg in self._segments:   # in input order: stop at the first that starts after the frame
            if seg.start > audio_start:
                return False
            if seg.covers(audio_start):
                return True
        return False

    def _observe_latency(self, plan: FramePlan, k: int, now: float) -> None:
        if plan.arrival is None:
            return
        arrival = plan.arrival
        # The reference: the tick whole frames before k, plus the rest of the delay (so a late tick counts).
        frames = max(1, math.ceil(plan.delay_samples / self._samples_per_frame - 1e-9))
        slot = self._vclock.time_of(k - frames)
        if slot is not None:
            arrival = max(arrival, slot + (frames * self._samples_per_frame - plan.delay_samples) / SAMPLE_RATE)
        self._metrics.latency_ms.observe(1000.0 * (now - arrival))

    def next_audio(self, n_samples: int) -> np.ndarray:
        n = int(n_samples)
        if n <= 0:
            return np.zeros(0, dtype=np.float32)
        now = self._clock()
        out_start, out = self._audio_out.read(n)
        self._note_output(out_start, now)
        self._count_underrun(out_start - self._delay_samples, n)
        self._metrics.audio_out_samples += n
        self.playback.on_output(out_start, n, now)
        self._advance(now)
        return out

    def _count_underrun(self, in_start: int, n: int) -> None:
        """Samples of [in_start, in_start + n) that an open segment expected but did not receive yet."""
        if not self._segments or self._segments[-1].end is not None:
            return
        seg = self._segments[-1]
        missing_from = max(in_start, self._in_head, seg.start)
        if in_start + n > missing_from:
            self._metrics.audio_underrun_samples += in_start + n - missing_from

    # -- control ----------------------------------------------------------------------------------
    def interrupt(self) -> None:
        if self._worker is not None:
            self._worker.cancel(self)
        self._planner.cancel()
        self._segments.clear()
        self._ingest.reset()
        # New input starts after everything already shown or played.
        self._in_head = self._next_free_out() - self._delay_samples
        self._ring.clear(head=min(self._ring.head, self._in_head))
        self._mouth.reset()
        self._audio_out.interrupt()
        self._metrics.interrupts += 1
        self.playback.on_interrupt(self._audio_out.position, self._clock())
        log.debug("session %s: interrupted", self.name)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.interrupt()
            self._metrics.interrupts -= 1
        finally:
            self._closed = True
            if self._on_close is not None:
                self._on_close(self)

    def frames_dropped(self) -> int:
        """Speech frames whose render missed their tick so far: the one counter the server's capacity
        monitor reads every second for every session, where `metrics()` would sort each histogram's
        recent window three times to give percentiles nobody reads there."""
        return self._metrics.frames_dropped

    def metrics(self) -> SessionStats:
        self._planner.drain()
        # Input stored but not played yet: from the input sample the audio track plays next to the head.
        unplayed = self._ring.head - (self._audio_out.position - self._delay_samples)
        margin = self._live.margin
        return SessionStats.of(
            self._metrics, name=self.name, renderer=None if self._worker is None else self._worker.name,
            fps=self.fps, latency_budget_ms=self.latency_ms, lookahead_ms=self.lookahead_ms,
            utterance_delay_ms=self._utterance_delay_ms, quick_starts=self._quick_starts,
            delay_frames=self.timeline.delay_frames, batch_frames=self.timeline.batch_frames,
            buffered_input_ms=(1000.0 * max(0, unplayed) / SAMPLE_RATE
                               if self._ring.stored else 0.0),
            live_jitter_ms=None if margin is None else 1000.0 * self._live.spread / SAMPLE_RATE,
            live_margin_ms=None if margin is None else 1000.0 * margin / SAMPLE_RATE)
