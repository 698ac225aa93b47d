"""GPU-style batching across sessions, on the CPU with fake clocks and a GPU-like cost curve.

The fake renderer's batch of n costs 5 ms + 1 ms per frame (launch-bound at small n, like a GPU), which
it "spends" by advancing a fake clock. Two drivers of the same policy (realtime/scheduling/scheduler.py):

- ThreadedRenderWorker (production) at the job level: jobs shaped like sessions' (ready at a tick,
  due a compute budget later) are submitted straight to the worker with a frozen fake clock, and the
  test waits for the deliveries before moving the clock. The worker only proceeds on events the test
  controls (a full batch, or the clock passing its fill wait), so the batches are deterministic.
- InlineRenderWorker (virtual time) with real LipSyncSessions on a ManualClock, aligned and staggered.
  The inline driver has no bounded wait for other sessions' jobs (max_wait_s = 0), so with aligned ticks
  it renders the first session's job alone and the rest together; these tests check drops, latency
  and the skip count, not a full batch per tick.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_engine import AffineRenderer, FakeAvatar

from realtime.config import EngineConfig
from realtime.scheduling.scheduler import InlineRenderWorker, RenderJob, RenderResult, ThreadedRenderWorker
from realtime.timeline.clock import ManualClock
from realtime.timeline.session import LipSyncSession

SR = 16000
FIXED_S, PER_FRAME_S = 0.005, 0.001   # a GPU-like batch: 5 ms + 1 ms per frame
PERIOD = 1 / 25
BUDGET_S = 2 * PERIOD                 # a session's default compute budget (2 frames)


def cost(n: int) -> float:
    return FIXED_S + PER_FRAME_S * n


class LockedClock(ManualClock):
    """A ManualClock two threads may move: the test sets it, the fake renderer advances it."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__(start)
        self._lock = threading.Lock()

    def advance(self, dt: float) -> float:
        with self._lock:
            self.t += float(dt)
            return self.t

    def set(self, t: float) -> None:
        with self._lock:
            self.t = float(t)


# -- the threaded worker, job by job ---------------------------------------------------------------

class Harness:
    """A ThreadedRenderWorker on a frozen LockedClock, with owners submitting jobs like sessions do."""

    def __init__(self, n_owners: int, max_batch: int, max_wait_s: float = 0.010) -> None:
        self.clock = LockedClock(10.0)
        self.renderer = AffineRenderer(self.clock, FIXED_S, PER_FRAME_S)
        self.worker = ThreadedRenderWorker(self.renderer, max_batch=max_batch, max_wait_s=max_wait_s,
                                           clock=self.clock)
        self.avatar = FakeAvatar()
        self.owners = [object() for _ in range(n_owners)]
        self.results: list[tuple[RenderJob, RenderResult]] = []
        self._arrived = threading.Condition()
        self.submitted = 0
        self.worker.prepare(self.avatar, warmup=True)     # measures cost(1), (2), (4), (8) on the fake clock
        self.renderer.batch_sizes.clear()

    def submit(self, owner: object, key: int, ready_at: float, deadline: float) -> RenderJob:
        job = RenderJob(owner=owner, key=key, avatar=self.avatar, avatar_index=key % len(self.avatar),
                        mel=np.zeros((80, 16), np.float32), deadline=deadline, ready_at=ready_at,
                        deliver=lambda r: None)
        job.deliver = lambda r, j=job: self._deliver(j, r)
        self.submitted += 1
        self.worker.submit(job)
        return job

    def _deliver(self, job: RenderJob, result: RenderResult) -> None:
        with self._arrived:
            self.results.append((job, result))
            self._arrived.notify_all()

    def wait_for(self, count: int, timeout_s: float = 10.0) -> None:
        """Until `count` results arrived (a deadlocked policy fails here; nothing is timed)."""
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.results) >= count, timeout=timeout_s), \
                f"{len(self.results)} of {count} results"

    def wait_through_fill(self, count: int) -> None:
        """Until `count` results arrived, moving the fake clock one bounded wait (max_wait_s) at a time
        whenever nothing arrives for a while: the worker starts its wait when its thread wakes, which
        the test does not control, so the clock is moved until that wait is over, however late it
        began. A step is 10 ms of fake time against a 2-frame budget: the deadlines need no luck."""
        while True:
            with self._arrived:
                if self._arrived.wait_for(lambda: len(self.results) >= count, timeout=0.5):
                    return
            self.clock.advance(self.worker.max_wait_s)

    def settle(self) -> None:
        """Warm-up: let every owner's first job through, nudging the fake clock past any fill wait."""
        t = self.clock()
        for i, owner in enumerate(self.owners):
            self.submit(owner, -1 - i, t, t + BUDGET_S)
        self.wait_through_fill(self.submitted)   # no assertion rides on how the warm-up tick batches
        self.results.clear()
        self.submitted = 0
        self.renderer.batch_sizes.clear()

    def close(self) -> None:
        self.worker.close()


@pytest.mark.parametrize("n, max_batch", [(8, 8), (8, 16)])
def test_threaded_worker_renders_aligned_ticks_as_one_batch(n, max_batch):
    """N owners whose ticks are aligned: every tick is one batch of N, each result before its deadline.
    With N = max_batch the batch starts at once (deterministic: the fake clock does not move); with
    N < max_batch the worker first waits up to max_wait_s for more (the deadlines allow it), then
    renders the N it has."""
    h = Harness(n, max_batch)
    try:
        h.settle()
        t = h.clock() + PERIOD
        ticks = 12
        for tick in range(ticks):
            h.clock.set(t)
            for owner in h.owners:
                h.submit(owner, tick, ready_at=t, deadline=t + BUDGET_S)
            if n == max_batch:
                h.wait_for((tick + 1) * n)
            else:
                h.wait_through_fill((tick + 1) * n)
            t = max(t + PERIOD, h.clock())
        assert h.renderer.batch_sizes == [n] * ticks          # mean batch = N, one batch per tick
        for job, result in h.results:
            assert result.patch is not None and result.batch_size == n
            if n == max_batch:
                assert result.completed_at == pytest.approx(job.ready_at + cost(n))
            else:
                assert result.completed_at >= job.ready_at + h.worker.max_wait_s + cost(n) - 1e-9
            assert result.completed_at <= job.deadline
        assert h.worker.stats().frames_skipped == 0
    finally:
        h.close()


def test_threaded_worker_does_not_wait_when_the_deadline_forbids_it():
    """Several owners are active, but this job's deadline leaves no room for the bounded wait plus a full
    batch: it is rendered at once (the fake clock never moves, so a wait would never end)."""
    h = Harness(4, max_batch=16)
    try:
        h.settle()
        t = h.clock() + PERIOD
        h.clock.set(t)
        est_full = h.worker.cost.estimate(h.worker.max_batch)
        tight = t + h.worker.max_wait_s + est_full - 0.001
        job = h.submit(h.owners[0], 1, ready_at=t, deadline=tight)
        h.wait_for(1)
        (_, result), = h.results
        assert result.batch_size == 1 and result.completed_at == pytest.approx(t + cost(1))
        assert result.completed_at <= job.deadline
    finally:
        h.close()


def test_threaded_fill_wait_never_costs_a_later_tighter_job_its_deadline():
    """Job A (loose deadline) starts a fill wait at t; job X of another owner arrives at t + 2 ms due at
    t + 14 ms: rendered at once it would finish at t + 8 ms. The worker keeps waiting until t + 10 ms,
    where X could no longer make it (6 ms for one frame) if the wait only minded A's deadline. The wait
    re-checks every ready job's deadline, so X is rendered."""
    h = Harness(4, max_batch=16)
    try:
        h.settle()
        before = h.worker.stats()
        t = h.clock() + PERIOD
        h.clock.set(t)
        h.submit(h.owners[0], 1, ready_at=t, deadline=t + BUDGET_S)
        time.sleep(0.2)                        # the worker picks A and starts waiting for company
        h.clock.set(t + 0.002)
        x = h.submit(h.owners[1], 1, ready_at=t + 0.002, deadline=t + 0.014)
        h.wait_through_fill(1)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:     # X is either rendered or counted as skipped
            now = h.worker.stats()
            if (now.frames_rendered - before.frames_rendered) + (now.frames_skipped - before.frames_skipped) >= 2:
                break
            time.sleep(0.01)
        assert x in [job for job, _ in h.results]
    finally:
        h.close()


# -- real sessions in virtual time (InlineRenderWorker) ---------------------------------------------

def run_sessions(speech: np.ndarray, n: int, offsets_s: list[float], max_batch: int = 32,
                 max_wait_s: float = 0.0):
    """n sessions on one inline worker with the GPU-like renderer; session i runs its 20 ms push /
    20 ms audio / 40 ms video schedule shifted by offsets_s[i]. Returns (sessions, worker, renderer)."""
    render_clock, clock = ManualClock(), ManualClock()
    renderer = AffineRenderer(render_clock, FIXED_S, PER_FRAME_S)
    worker = InlineRenderWorker(renderer, max_batch=max_batch, clock=render_clock, max_wait_s=max_wait_s)
    avatar = FakeAvatar()
    worker.prepare(avatar, warmup=True)
    renderer.batch_sizes.clear()
    config = EngineConfig(fit_budget_to_renderer=True, max_batch=max_batch)
    sessions = [LipSyncSession(avatar, worker, config, clock=clock, name=str(i)) for i in range(n)]
    seconds = len(speech) / SR + 1.0
    # (time, session, kind): pushes of the chunk just recorded, audio pulls, video ticks.
    events = []
    for i, off in enumerate(offsets_s):
        steps = int(seconds / 0.02)
        for step in range(steps):
            t = off + step * 0.02
            if step >= 1:
                events.append((t, i, 0, step))
            events.append((t, i, 1, step))
            if step % 2 == 0:
                events.append((t, i, 2, step))
    events.sort()
    for t, i, kind, step in events:
        clock.set(t)
        s = sessions[i]
        if kind == 0:
            chunk = speech[(step - 1) * 320:step * 320]
            if len(chunk):
                s.push_audio(chunk, SR)
        elif kind == 1:
            s.next_audio(320)
        else:
            s.next_video_frame()
    return sessions, worker, renderer


def check_sessions(sessions, worker) -> None:
    for s in sessions:
        m = s.metrics()
        speech = m.frames_rendered + m.frames_dropped
        assert speech > 40, m
        assert m.frames_dropped == 0, m
        assert m.latency_ms.p99 <= s.latency_ms + 1e-6      # within the session's fixed budget
        assert m.av_offset_max_abs_ms == 0.0
        assert s.timeline.batch_frames == 1                          # cheap per frame: no gathering
    assert worker.stats().frames_skipped == 0


@pytest.mark.parametrize("n", [8, 24])
def test_aligned_sessions_share_batches_without_drops(speech_16k, n):
    sessions, worker, renderer = run_sessions(speech_16k, n, [0.0] * n)
    check_sessions(sessions, worker)
    # Sessions share batches. (The inline driver has no bounded wait for other sessions, so it renders
    # the first job of a tick alone and the other n - 1 together: the mean is about n / 2.)
    assert worker.stats().mean_batch >= n / 2 - 0.5
    assert max(renderer.batch_sizes) <= n


@pytest.mark.parametrize("n", [8, 24])
def test_with_the_servers_fill_wait_aligned_sessions_render_as_one_batch_per_tick(speech_16k, n):
    """The same sessions with the worker's bounded wait for other sessions' jobs (EngineConfig's 10 ms, as the
    server runs it): each tick's frames from all n sessions go out as one batch."""
    sessions, worker, renderer = run_sessions(speech_16k, n, [0.0] * n, max_wait_s=0.010)
    check_sessions(sessions, worker)
    assert worker.stats().mean_batch >= n - 0.5, worker.stats()
    assert max(renderer.batch_sizes) <= n


@pytest.mark.parametrize("max_wait_s", [0.0, 0.010])
def test_staggered_sessions_never_miss_a_deadline(speech_16k, max_wait_s):
    n = 8
    sessions, worker, renderer = run_sessions(speech_16k, n, [i * PERIOD / n for i in range(n)],
                                              max_wait_s=max_wait_s)
    check_sessions(sessions, worker)
    assert max(renderer.batch_sizes) <= n
