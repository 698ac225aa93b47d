"""`FramePlanner`: per output frame, its mel window and speech decision, and its render job.

Frame i of a segment is planned once its mel window (the columns the renderer reads) is final and its
speech decision is made; a speech frame is submitted to the render worker then, which is the delay minus
the compute budget before its tick. A frame whose tick has already passed is skipped (the session counts
it as starved). Results come back on the worker's thread into an inbox, tagged with the generation they
were submitted in, and are moved to `results` on the session's thread (`drain`); `interrupt` bumps the
generation so late results of cancelled jobs are ignored. Plans and results are keyed by output frame k
and taken by the session when frame k is shown.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial

import numpy as np

from realtime.audio.audio_ingest import AudioRing
from realtime.audio.mel import HOP, SAMPLE_RATE
from realtime.avatars.avatar import Avatar
from realtime.config import EngineConfig
from realtime.metrics import SessionMetrics
from realtime.scheduling.render_queue import RenderJob, RenderResult
from realtime.scheduling.scheduler import RenderWorker
from realtime.timeline.clock import Timeline, VideoClock
from realtime.timeline.input_segment import InputSegment


@dataclass
class FramePlan:
    frame: int            # output frame k
    audio_start: int      # input sample of the frame's own time
    mel: np.ndarray
    speech: bool
    avatar_index: int
    arrival: float | None  # when the frame's first audio sample arrived (None: no audio stored there)
    delay_samples: int    # its utterance's delay: from "its audio reached the output clock" to shown


class FramePlanner:
    def __init__(self, owner: object, avatar: Avatar, worker: RenderWorker | None, config: EngineConfig,
                 timeline: Timeline, video_clock: VideoClock, ring: AudioRing,
                 metrics: SessionMetrics) -> None:
        self._owner = owner             # the session: the worker cancels its jobs by it
        self._avatar = avatar
        self._worker = worker
        self._timeline = timeline
        self._video_clock = video_clock
        self._ring = ring
        self._metrics = metrics
        self.hangover_samples = round(config.vad_hangover_ms * SAMPLE_RATE / 1000)
        self._deadline_margin_s = config.deadline_margin_ms / 1000.0
        # Samples of a frame's audio the speech decision looks at: what the renderer reads, whole VAD
        # blocks only, so the decision never waits for audio beyond the renderer's look-ahead.
        needs = timeline.needs
        block = round(config.vad_block_ms * SAMPLE_RATE / 1000)
        span = needs.columns * HOP + round(needs.offset_frames * timeline.samples_per_frame)
        self._speech_span = max(block, span // block * block)
        self.plans: dict[int, FramePlan] = {}
        self.results: dict[int, RenderResult] = {}
        self._inbox: deque[tuple[int, RenderResult]] = deque()  # filled by the worker thread
        self._generation = 0            # bumped by cancel(): results of older jobs are ignored

    def plan(self, seg: InputSegment, now: float) -> None:
        """Plan (and submit) every frame of `seg` whose window and speech decision are ready, then drop
        the mel columns and VAD decisions no later frame needs."""
        tl = self._timeline
        samples_per_frame = tl.samples_per_frame
        n_frames = seg.frame_count(samples_per_frame)
        while n_frames is None or seg.next_frame < n_frames:
            i = seg.next_frame
            mel = seg.window(tl.window_start_column(i), tl.needs.columns)
            if mel is None:
                break
            offset = round(i * samples_per_frame)   # the frame's first sample within the segment
            speech = seg.speech.speech_in(offset - self.hangover_samples, offset + self._speech_span)
            if speech is None:
                break
            seg.next_frame += 1
            k = seg.first_frame + i
            if k < self._video_clock.next_index:
                continue  # its tick has passed: the input came too late (counted as starved)
            audio_start = tl.frame_start(k) - tl.delay_samples
            plan = FramePlan(k, audio_start, mel, speech, self._avatar.frame_index(k),
                             self._ring.arrival_of(audio_start), seg.delay_samples)
            self.plans[k] = plan
            starts_utterance = speech and not seg.last_speech
            seg.last_speech = speech
            if speech and self._worker is not None:
                self._worker.submit(RenderJob(
                    owner=self._owner, key=k, avatar=self._avatar, avatar_index=plan.avatar_index, mel=mel,
                    deadline=self._video_clock.expected_time(k, now) - self._deadline_margin_s,
                    ready_at=now, deliver=partial(self._receive, self._generation),
                    batch_hint=tl.batch_frames, starts_utterance=starts_utterance))
                self._metrics.frames_submitted += 1
        next_frame = seg.next_frame
        seg.discard_columns_before(tl.window_start_column(next_frame))
        seg.speech.discard_before(round(next_frame * samples_per_frame) - self.hangover_samples)

    def _receive(self, generation: int, result: RenderResult) -> None:
        """The worker thread's delivery: tagged with the generation its job was submitted in."""
        self._inbox.append((generation, result))

    def drain(self) -> None:
        """Move delivered results of this generation, for frames still to come, to `results`."""
        while self._inbox:
            generation, res = self._inbox.popleft()
            if generation != self._generation or res.key < self._video_clock.next_index:
                continue
            self.results[res.key] = res
            if res.patch is not None:
                self._metrics.render_ms.observe(1000.0 * res.render_s / max(res.batch_size, 1))

    def take(self, k: int) -> tuple[FramePlan | None, RenderResult | None]:
        """Frame k's plan and render result (either may be missing), removed."""
        return self.plans.pop(k, None), self.results.pop(k, None)

    def cancel(self) -> None:
        """Forget every plan and result; results of jobs already submitted are ignored when they come."""
        self._generation += 1
        self._inbox.clear()
        self.plans.clear()
        self.results.clear()
