"""The render worker: takes due render jobs from any number of sessions, batches them, calls the renderer.

One worker per renderer (model / device); sessions share it. Jobs carry a deadline (the wall time of the
video tick that will show them). The worker serves the earliest deadline first, batches jobs for the same
avatar (for any avatars when the renderer `mixes_avatars`: one `render_mixed` call) up to `max_batch`
while the predicted batch time still meets the earliest deadline, and skips jobs
that can no longer finish in time (a drop: the session shows the held mouth instead). Skipping, rather
than rendering late, is what keeps latency fixed under overload: the mouth-update rate falls, nothing
queues up. Batch cost is predicted from an exponential average of measured batch times per batch size
(interpolated between sizes; the warm-up measures a curve for sizes 1, 2, 4, 8).

When the next batch starts is one policy, `realtime.scheduling.batch_wait.batch_wait_until`, a pure function of
the queued jobs and the time that both drivers call: gathering the frames a job's owner sized its delay
for (`batch_hint`, see `Timeline.from_config`), filling a batch with other sessions' jobs for up to
`max_wait_s`, both only while the deadlines allow it, and never for the first frame of an utterance,
which is also rendered without its own session's later frames (`realtime.scheduling.render_queue.JobQueue.select`).

Two drivers of that policy:
- `ThreadedRenderWorker`: a daemon thread (production), supervised (restarted with backoff when it dies)
  by `realtime.scheduling.supervised_thread.SupervisedThread`. Rendering never runs on the asyncio loop;
  it waits on a condition variable until the policy's time or the next submission, then asks again.
- `InlineRenderWorker`: no thread; `kick(now)` runs, in the caller's thread, every batch a free worker
  would have started by `now`, in *virtual time*: a wait jumps to the next job's arrival (or the wait's
  end), and a batch that starts at t and takes d seconds (measured with the worker's own `clock`)
  completes at t + d, and the worker is busy until then. With a `ManualClock` that a fake renderer
  advances, "a renderer 2x too slow" is simulated deterministically; the worker then sets that clock
  back to where the render started (the render happened on the "worker", not in the caller's time), so
  the sessions may share the same ManualClock.

Preparation runs where the batches run. `prepare` (the renderer's per-avatar precompute, CUDA graph
capture, and the warm-up that measures the cost curve) runs on the threaded worker's own thread: cuDNN
caches its plans per thread, so a warm-up elsewhere would leave the live path to rebuild them on real
frames, and the cost curve would measure the wrong thing. A renderer with `prepare_steps(avatar)` (an
iterator of short slices) is prepared one slice per loop turn, between batches, so preparing another
avatar while serving delays a running session's batch by one slice at most, never by the whole prepare
(each CUDA graph capture synchronises the device). `warmup_context()`, when the renderer has it, wraps the
warm-up renders (cuDNN autotuning on CUDA). `ThreadedRenderWorker.call(fn)` runs any callable there.

A session submits `RenderJob`s and receives `RenderResult`s through the job's `deliver` callback; in the
threaded worker that callback runs on the worker thread, so it must only hand the result over (e.g.
append to a deque).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from dataclasses import replace
from typing import Any, Callable, TypeVar

import numpy as np

from realtime.avatars.avatar import Avatar
from realtime.metrics import WorkerStats
from realtime.renderers.base import MouthPatch, MouthRenderer
from realtime.scheduling.batch_wait import BatchWaitPolicy, batch_wait_until
from realtime.scheduling.render_queue import CostModel, JobQueue, RenderJob, RenderResult
from realtime.scheduling.supervised_thread import RestartBackoff, SupervisedThread
from realtime.scheduling.warmup import warmup_steps
from realtime.timeline.clock import ManualClock

log = logging.getLogger(__name__)

Clock = Callable[[], float]
T = TypeVar("T")


class RenderWorker:
    """Common part of the two drivers: renderer preparation, the renderer call, statistics."""

    probe_after_s = 0.5  # render at least one job this often so the cost estimate can recover
    gather_safety = 1.25  # a gathering batch stops waiting when 1.25x the cost of one more would miss
    curve_sizes: tuple[int, ...] = (2, 4, 8)  # batch sizes measured at warm-up (capped at max_batch): the cost curve

    def __init__(self, renderer: MouthRenderer, *, max_batch: int = 8, max_wait_s: float = 0.010,
                 clock: Clock = time.monotonic) -> None:
        self.renderer = renderer
        self.name = renderer.label
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.clock = clock
        self.cost = CostModel()          # live: every batch updates it (deadline predictions, batching)
        # The curve measured at warm-up only: sessions size their fixed delay from it, so a session's L
        # does not depend on how busy the worker happened to be when it opened (the live estimate moves
        # with every batch: a busy spell of slow renders would give the next sessions a longer delay).
        self.warmup_cost = CostModel()
        mix = renderer.traits.mixes_avatars  # one call may render several avatars' frames
        self._wait_policy = BatchWaitPolicy(self.max_batch, self.max_wait_s, self.gather_safety, mix_avatars=mix)
        self._queue = JobQueue(mix_avatars=mix)
        self._prepared: dict[int, Any] = {}   # id(avatar) -> avatar (kept alive so ids stay unique)
        self._prepare_lock = threading.Lock()
        self._last_render_at: float | None = None
        self._recent_owners: dict[int, float] = {}  # id(owner) -> ready_at of its latest job
        self.batches = 0
        self.frames_rendered = 0
        self.frames_skipped = 0
        self.errors = 0
        self.busy_s = 0.0

    # -- API used by sessions -------------------------------------------------------------------
    def prepare(self, avatar: Avatar, warmup: bool = False) -> None:
        """Run the renderer's per-avatar precompute once (slow: call it off the event loop).
        With `warmup`, also render throw-away frames so the first real frame is not the slow one, and
        measure the cost curve: cost(b) for b = 1 and `curve_sizes` up to max_batch (each size once
        untimed, then the fastest of 3 timed calls for b = 1 and of 2 for larger b, so a noise spike on
        a shared CPU does not set a session's fixed delay), which sessions use to size a fixed delay
        that allows batching. Here in the caller's thread; the threaded worker runs it on its own."""
        with self._prepare_lock:
            if id(avatar) not in self._prepared:
                for _ in self._prepare_steps(avatar, warmup):
                    pass

    def _prepare_steps(self, avatar: Avatar, warmup: bool) -> Generator[None, None, None]:
        """`prepare` as slices: the renderer's `prepare_steps`, then one per warm-up size."""
        yield from self.renderer.prepare_steps(avatar)
        self._prepared[id(avatar)] = avatar
        if not warmup:
            return
        sizes = [1, *sorted({min(b, self.max_batch) for b in self.curve_sizes} - {1})]
        yield from warmup_steps(self.renderer, avatar, sizes, self.clock, self._observe_warmup)

    def _observe_warmup(self, b: int, seconds: float) -> None:
        self.cost.observe(b, seconds)
        self.warmup_cost.observe(b, seconds)

    def forget(self, avatar: Avatar) -> None:
        """Drop a removed avatar: the worker's reference and the renderer's per-avatar data (if it can)."""
        with self._prepare_lock:
            self._prepared.pop(id(avatar), None)
        self.renderer.release(avatar)

    def submit(self, job: RenderJob) -> None:
        raise NotImplementedError

    def cancel(self, owner: object) -> int:
        """Remove every queued job of `owner`; returns how many. A batch in flight still delivers."""
        raise NotImplementedError

    def kick(self, now: float) -> None:
        """Give the worker a chance to run (the inline driver renders here; the thread ignores it)."""

    def close(self) -> None:
        pass

    def stats(self) -> WorkerStats:
        return WorkerStats(
            renderer=self.name, batches=self.batches, frames_rendered=self.frames_rendered,
            frames_skipped=self.frames_skipped, errors=self.errors, queued=len(self._queue), busy_s=self.busy_s,
            est_ms_per_frame=None if self.cost.per_frame is None else 1000.0 * self.cost.per_frame)

    # -- shared internals -----------------------------------------------------------------------
    def _note_owner(self, job: RenderJob) -> None:
        self._recent_owners[id(job.owner)] = job.ready_at

    def _several_owners(self, now: float) -> bool:
        """More than one session submitted within the last second (then waiting to fill a batch pays)."""
        self._recent_owners = {o: t for o, t in self._recent_owners.items() if now - t < 1.0}
        return len(self._recent_owners) > 1

    def _wait_until(self, now: float) -> float | None:
        """The batching-wait policy (realtime/scheduling/batch_wait.py) for the queue as it is at `now`."""
        return batch_wait_until(self._queue.jobs, now, self.cost.estimate, self._wait_policy,
                                several_owners=self._several_owners(now))

    def _probe(self, now: float) -> bool:
        """Render one job even if predicted late when nothing was rendered for a while (the estimate may
        be stale), at most ~10% of the time for a renderer that is always too slow."""
        interval = max(self.probe_after_s, 10.0 * self.cost.estimate(1))
        return self._last_render_at is None or now - self._last_render_at > interval

    def _call_renderer(self, batch: list[RenderJob]) -> tuple[list[MouthPatch | None], float]:
        avatar = batch[0].avatar
        indices = np.fromiter((j.avatar_index for j in batch), dtype=np.int64, count=len(batch))
        mels = np.stack([j.mel for j in batch]).astype(np.float32, copy=False)
        t0 = self.clock()
        try:
            patches: list[MouthPatch | None]
            if not all(j.avatar is avatar for j in batch):  # only when traits.mixes_avatars: one call for all
                patches = list(self.renderer.render_mixed([j.avatar for j in batch], indices, mels))
            elif self.renderer.traits.wants_deadline:  # a remote renderer orders the replica's batches by it
                deadline_in_s = min(j.deadline for j in batch) - t0
                patches = list(self.renderer.render_before(avatar, indices, mels, deadline_in_s))
            else:
                patches = list(self.renderer.render(avatar, indices, mels))
            if len(patches) != len(batch):
                raise RuntimeError(f"renderer {self.name} returned {len(patches)} patches for {len(batch)} frames")
        except Exception:
            self.errors += 1
            log.exception("renderer %s failed on a batch of %d", self.name, len(batch))
            patches = [None] * len(batch)
        seconds = self.clock() - t0
        if patches and patches[0] is not None:
            self.cost.observe(len(batch), seconds)
        self.batches += 1
        self.frames_rendered += len(batch)
        self.busy_s += seconds
        return patches, seconds

    @staticmethod
    def _deliver(batch: list[RenderJob], patches: list[MouthPatch | None], completed_at: float,
                 seconds: float) -> None:
        for job, patch in zip(batch, patches, strict=True):
            try:
                job.deliver(RenderResult(job.key, patch, completed_at, seconds, len(batch)))
            except Exception:
                log.exception("delivering a render result failed")


class ThreadedRenderWorker(RenderWorker):
    """The production driver: one supervised daemon thread per renderer, shared by every session using it.

    The thread's start, restart with backoff after a death, health and the work handed to it (`call`,
    the sliced `prepare`) are `SupervisedThread`'s (realtime/scheduling/supervised_thread.py); this class
    is the loop that runs on it: one task slice, then wait for the batching policy, then one batch."""

    def __init__(self, renderer: MouthRenderer, *, max_batch: int = 8, max_wait_s: float = 0.010,
                 clock: Clock = time.monotonic, name: str | None = None,
                 restart_backoff: RestartBackoff | None = None) -> None:
        super().__init__(renderer, max_batch=max_batch, max_wait_s=max_wait_s, clock=clock)
        self._cond = threading.Condition()
        self.thread = SupervisedThread(name or f"render-{self.name}", self._run, self._cond,
                                       backoff=restart_backoff, clock=clock)
        self.thread.start()

    @property
    def healthy(self) -> bool:
        """The render thread is running (False from its death until its restart, and after close)."""
        return self.thread.healthy

    @property
    def restarts(self) -> int:
        """Times the render thread died and was started again."""
        return self.thread.restarts

    def stats(self) -> WorkerStats:
        return replace(super().stats(), alive=self.healthy, restarts=self.restarts)

    def submit(self, job: RenderJob) -> None:
        with self._cond:
            if self.thread.stopped:
                return
            self._queue.add(job)
            self._note_owner(job)
            self._cond.notify()

    def cancel(self, owner: object) -> int:
        with self._cond:
            return self._queue.remove_owner(owner)

    def forget(self, avatar: Avatar) -> None:
        """`RenderWorker.forget` on the worker thread, between batches (a renderer frees device memory there)."""
        self.call(lambda: RenderWorker.forget(self, avatar))

    def prepare(self, avatar: Avatar, warmup: bool = False) -> None:
        """`RenderWorker.prepare`, run on the worker thread in slices between batches; waits for it."""
        with self._prepare_lock:
            if id(avatar) not in self._prepared:
                self.thread.run(self._prepare_steps(avatar, warmup))

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the worker thread between batches and return its result (or raise its error)."""
        return self.thread.call(fn)

    def close(self) -> None:
        with self._cond:
            self._queue.jobs.clear()
            self.thread.stop()
        self.thread.close()

    def _run(self) -> None:
        thread = self.thread
        while True:
            thread.run_task_slice()  # at most one slice of a prepare/warm-up between two batches
            with self._cond:
                while not thread.stopped and not self._queue and not thread.tasks_pending:
                    self._cond.wait()
                if thread.stopped:
                    return
                if not self._queue:
                    continue  # woken for a task
                now = self.clock()
                until = self._wait_until(now)
                if until is not None:
                    # Wait for more jobs; a submission wakes the thread early and the policy is asked
                    # again (a tighter job that arrives during the wait shortens it).
                    self._cond.wait(timeout=max(until - now, 0.0))
                    continue
                batch, skipped = self._queue.select(now, self.cost, self.max_batch, self._probe(now))
                self.frames_skipped += skipped
            if not batch:
                continue
            patches, seconds = self._call_renderer(batch)
            now = self.clock()
            self._last_render_at = now
            self._deliver(batch, patches, now, seconds)


class InlineRenderWorker(RenderWorker):
    """Synchronous driver in virtual time, for simulated-time tests (see the module docstring)."""

    def __init__(self, renderer: MouthRenderer, *, max_batch: int = 8, clock: Clock = time.perf_counter,
                 max_wait_s: float = 0.0) -> None:
        super().__init__(renderer, max_batch=max_batch, max_wait_s=max_wait_s, clock=clock)
        self.free_at = float("-inf")   # virtual time at which the worker finishes its current batch

    def submit(self, job: RenderJob) -> None:
        self._queue.add(job)
        self._note_owner(job)

    def cancel(self, owner: object) -> int:
        return self._queue.remove_owner(owner)

    def kick(self, now: float) -> None:
        while self._queue:
            start = max(self.free_at, self._queue.earliest_ready())
            if start > now:
                return
            start_at = self._wait_in_virtual_time(start, now)
            if start_at is None:
                return  # still waiting at `now`: a later kick (with later submissions) decides
            start = start_at
            batch, skipped = self._queue.select(start, self.cost, self.max_batch, self._probe(start))
            self.frames_skipped += skipped
            if not batch:
                continue
            t0 = self.clock()
            patches, seconds = self._call_renderer(batch)
            if isinstance(self.clock, ManualClock):
                # Virtual time: the render "ran on the worker", so a settable clock shared with the
                # sessions (a ManualClock the fake renderer advanced) is put back for the caller.
                self.clock.set(t0)
            self.free_at = start + seconds
            self._last_render_at = self.free_at
            self._deliver(batch, patches, self.free_at, seconds)

    def _wait_in_virtual_time(self, start: float, now: float) -> float | None:
        """When a worker free at `start` begins its next batch under the batching-wait policy: follow
        the jobs that arrive while it waits; None if it would still be waiting at `now`."""
        while True:
            until = self._wait_until(start)
            if until is None:
                return start
            arrival = min((j.ready_at for j in self._queue.jobs if start < j.ready_at <= until), default=None)
            if arrival is not None:
                start = arrival
                continue
            return None if until > now else until
