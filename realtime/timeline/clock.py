"""The session's time base: the output timeline, the fixed A/V delay, and the video tick clock.

Timelines (all integers, no wall time):
- input timeline: 16 kHz sample index `n` of the session's audio input, after ingest;
- output timeline: video frame `k` has pts `k / fps`, output audio sample `j` has pts `j / 16000`.
Input sample `n` is played as output sample `n + L`; the frame that shows the audio starting at input
sample `n` is the frame with `frame_start(k) == n + L`. Both tracks therefore leave with the same delay L,
which makes the A/V offset zero by construction (up to the rounding of `k * 16000 / fps` to a sample).

Why L is fixed per session. A frame can be drawn once the part of its mel window that the renderer reads
is complete: the official window of a frame starting at sample n ends with mel column c + 15 (c = 80 n /
16000 columns), and that column is final once sample 200 (c + 15) + 400 has arrived, i.e.
LOOKAHEAD_SAMPLES = 3400 samples (212.5 ms) after the frame's own time. Each renderer declares what it
reads (`realtime.renderers.base.AudioNeeds`): Wav2Lip the whole window (212.5 ms; 172.5 ms with the
training alignment, whose window starts a frame earlier), the built-in renderer its first 5 columns
(75 ms). Add an allowance for chunked input (one 20 ms WebRTC frame) and a compute budget (1.5 frame
periods by default) and round up to whole frames: L = 8 frames = 320 ms at 25 fps for Wav2Lip's official
window, 4 frames = 160 ms for the built-in renderer. (The rounding is the renderer's slack: it is what lets
a renderer slower than the budget still draw every other frame. Where an utterance starts is not
rounded: a start from silence plays its first sample exactly where it was placed, and its first frame is
the one at or before it, with silence in between; see session.py.) Choosing L once means
the audio track is a plain delay line that never stretches, skips or waits, so A/V sync cannot drift and
latency cannot accumulate; a frame that is not ready in time is dropped or held instead (see session.py).
An adaptive L would have to resample or cut audio every time it moved. (With
`EngineConfig.fit_budget_to_renderer`, the compute budget is sized once, at session start, from the render
worker's measured per-frame cost, 1.5 cost + one frame period: a slow CPU renderer gets a larger, a cheap
one a smaller, still fixed L, and L is then exact to the sample, the frame period in the budget being the
slack that rounding gives a fixed budget. The built-in renderer, ~0.6 ms a frame, gets a 41 ms budget and
L = 75 + 20 + 41 = 136 ms instead of 160. When one frame costs more than a frame period but batches are
cheaper per frame (Wav2Lip on CPU, any GPU model), the budget instead covers gathering k frames, (k - 1)
periods, plus 1.5 cost(k): the render worker then waits for k consecutive frames before rendering them
together, and keeps up; see `Timeline.from_config`.)

L is the delay of audio that arrives in real time. Audio that is already here (an upload, `say`, a TTS
stream faster than real time) needs no look-ahead wait: at a start from silence the session may place the
utterance so that it plays only the compute budget after it arrived (realtime/timeline/utterance_start.py). The
input -> output mapping (input n plays at n + L) never changes; such an utterance is simply placed on the
input timeline less than L after the output clock, so audio and video stay sample-exact.

`ManualClock` is a settable clock for simulated-time tests and benchmarks.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

from realtime.audio.mel import HOP, MEL_STEP, N_FFT, SAMPLE_RATE, window_start_column
from realtime.config import EngineConfig
from realtime.renderers.base import OFFICIAL_WINDOW, AudioNeeds

# Samples after a frame's own time that its mel window needs: the last column (start + 15) covers
# samples up to 200 (start + 15) + 400, and start * 200 <= the frame's own sample.
LOOKAHEAD_SAMPLES = (MEL_STEP - 1) * HOP + N_FFT // 2  # 3400 = 212.5 ms
# Samples a window covers from its own start (used by the speech decision).
WINDOW_SAMPLES = MEL_STEP * HOP  # 3200 = 200 ms


@dataclass(frozen=True)
class Timeline:
    """Frame/sample arithmetic of one session; immutable once the session starts."""

    fps: float
    delay_samples: int      # L: output sample j plays input sample j - L
    batch_frames: int = 1   # frames the render worker may gather per batch (> 1 only when sized for it)
    lookahead_samples: int = LOOKAHEAD_SAMPLES  # future audio a frame's window needs (the renderer's)
    budget_samples: int = 0  # compute budget: "its audio is complete" -> "shown" (the quick-start delay)
    needs: AudioNeeds = OFFICIAL_WINDOW  # the part of each window the renderer reads

    @classmethod
    def from_config(cls, config: EngineConfig, fps: float | None = None,
                    render_cost_s: float | None = None,
                    batch_cost: Callable[[int], float] | None = None, max_batch: int = 1,
                    needs: AudioNeeds = OFFICIAL_WINDOW) -> "Timeline":
        """The session's timeline. With `config.fit_budget_to_renderer` and a measured per-frame render
        cost, the compute budget is sized to that renderer (`_fitted_budget`; still fixed for the
        session) and L is exact; otherwise the budget is `compute_budget_frames` and L whole frames."""
        fps = float(fps or config.fps)
        spf = SAMPLE_RATE / fps
        budget = config.compute_budget_frames * spf
        batch = 1
        if config.fit_budget_to_renderer and batch_cost is not None and not render_cost_s:
            render_cost_s = batch_cost(1)
        fitted = bool(config.fit_budget_to_renderer and render_cost_s)
        if fitted:
            assert render_cost_s is not None
            batch, budget_s = cls._fitted_budget(config, fps, render_cost_s, batch_cost, max_batch)
            budget = min(budget_s, config.max_compute_budget_ms / 1000.0) * SAMPLE_RATE
        lookahead = needs.lookahead_samples(fps)
        need = lookahead + config.input_jitter_ms * SAMPLE_RATE / 1000.0 + budget
        # A fitted budget carries its own slack (one frame period, or the batch's gathering time), so L is
        # exact to the sample. A fixed budget knows nothing of the renderer: L rounds up to whole frames,
        # and that rounding is the slack that lets a renderer slower than the budget still draw every
        # other frame.
        delay = (math.ceil(need - 1e-9) if fitted
                 else round(max(1, math.ceil(need / spf - 1e-9)) * SAMPLE_RATE / fps))
        return cls(fps=fps, delay_samples=max(1, delay), batch_frames=batch,
                   lookahead_samples=lookahead, budget_samples=math.ceil(budget), needs=needs)

    @classmethod
    def _fitted_budget(cls, config: EngineConfig, fps: float, cost_1: float,
                       batch_cost: Callable[[int], float] | None, max_batch: int) -> tuple[int, float]:
        """(batch frames, compute budget in seconds) sized to the renderer.

        One frame at a time: 1.5 cost(1) + one frame period (the period: a job may wait for the one
        before it). That is less than the fixed budget for a cheap renderer (the built-in one: ~41 ms,
        not 60) and more for a slow one. It is at least the room the worker needs to wait
        `max_batch_wait_ms` for other sessions' frames and still render a full batch before the
        deadline margin (what `batch_wait._fill_until` asks), but never more than the fixed budget for
        that: where filling costs more, the worker simply does not wait to fill, as with the fixed one.

        With a cost curve `batch_cost(b)` (seconds for a batch of b, measured at warm-up) and
        `config.batch_to_keep_up`: if one frame takes more than `batch_max_utilization` frame periods,
        the smallest k <= max_batch with cost(k) <= batch_max_utilization * k periods is chosen and the
        budget covers gathering k frames plus rendering them, (k - 1) periods + 1.5 cost(k), if that fits
        under `max_compute_budget_ms`; k > 1 tells the worker to gather."""
        if config.batch_to_keep_up and batch_cost is not None:
            plan = cls._batch_plan(config, fps, cost_1, batch_cost, max_batch)
            if plan is not None:
                return plan
        budget_s = 1.5 * cost_1 + 1.0 / fps
        if batch_cost is not None and max_batch > 1 and config.max_batch_wait_ms > 0:
            fill_room_s = (config.max_batch_wait_ms + config.deadline_margin_ms) / 1000.0 + batch_cost(max_batch)
            budget_s = max(budget_s, min(fill_room_s, config.compute_budget_frames / fps))
        return 1, budget_s

    @staticmethod
    def _batch_plan(config: EngineConfig, fps: float, cost_1: float, batch_cost: Callable[[int], float],
                    max_batch: int) -> tuple[int, float] | None:
        """(k, compute budget in seconds) for gathering batches of k, or None when batch 1 keeps up
        (or no batch size both keeps up and fits under the budget cap)."""
        period = 1.0 / fps
        util = config.batch_max_utilization
        if cost_1 <= util * period:
            return None
        for k in range(2, int(max_batch) + 1):
            cost_k = batch_cost(k)
            if cost_k <= util * k * period:
                budget_s = (k - 1) * period + 1.5 * cost_k
                if budget_s <= config.max_compute_budget_ms / 1000.0:
                    return k, budget_s
                return None
        return None

    @property
    def samples_per_frame(self) -> float:
        return SAMPLE_RATE / self.fps

    @property
    def delay_frames(self) -> int:
        """L in frame periods, rounded up."""
        return self.first_frame_at_or_after(self.delay_samples)

    def frame_at_or_before(self, sample: int) -> int:
        """Largest k with frame_start(k) <= sample (0 for a sample before frame 0)."""
        k = self.first_frame_at_or_after(sample)
        return k if self.frame_start(k) == sample or k == 0 else k - 1

    @property
    def delay_ms(self) -> float:
        return 1000.0 * self.delay_samples / SAMPLE_RATE

    @property
    def lookahead_ms(self) -> float:
        return 1000.0 * self.lookahead_samples / SAMPLE_RATE

    @property
    def frame_period_s(self) -> float:
        return 1.0 / self.fps

    def frame_start(self, k: int) -> int:
        """Output sample at which video frame k starts (its pts in samples)."""
        return round(k * SAMPLE_RATE / self.fps)

    def frame_pts(self, k: int) -> float:
        return k / self.fps

    def first_frame_at_or_after(self, sample: int) -> int:
        """Smallest k with frame_start(k) >= sample."""
        k = max(0, math.ceil(sample * self.fps / SAMPLE_RATE))
        while k > 0 and self.frame_start(k - 1) >= sample:
            k -= 1
        while self.frame_start(k) < sample:
            k += 1
        return k

    def window_start_column(self, i: int) -> int:
        """Official inference.py rule: int(i * 80 / fps), float product then truncation (shifted by the
        renderer's window offset: a negative start lies before the audio and reads as silence)."""
        return window_start_column(i, self.fps, self.needs.offset_frames)

    def frame_at_or_after(self, sample: int) -> int:
        """The frame boundary at or after `sample` (as a sample index)."""
        return self.frame_start(self.first_frame_at_or_after(sample))


class VideoClock:
    """Counts output video ticks and remembers when they happened (deadlines, latency stamps)."""

    def __init__(self, timeline: Timeline, history: int = 64) -> None:
        self._timeline = timeline
        self.next_index = 0
        self._times: deque[tuple[int, float]] = deque(maxlen=max(history, timeline.delay_frames + 2))

    def tick(self, now: float) -> int:
        k = self.next_index
        self._times.append((k, now))
        self.next_index += 1
        return k

    def time_of(self, k: int) -> float | None:
        """Wall time at which tick k was emitted, if it is recent enough to be remembered."""
        if not self._times:
            return None
        first_k = self._times[0][0]
        pos = k - first_k
        if 0 <= pos < len(self._times):
            return self._times[pos][1]
        return None

    def expected_time(self, k: int, now: float) -> float:
        """When tick k is expected: paced from the last tick, never earlier than 'now + frames to go'."""
        period = self._timeline.frame_period_s
        from_now = now + (k - self.next_index) * period
        if not self._times:
            return from_now
        last_k, last_t = self._times[-1]
        return max(last_t + (k - last_k) * period, from_now)

    def reset_history(self) -> None:
        self._times.clear()


class ManualClock:
    """A clock that only moves when told to: `clock()` returns the current time in seconds."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = float(start)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += float(dt)
        return self.t

    def set(self, t: float) -> None:
        self.t = float(t)
