"""The render worker's queue: render jobs and results, the batch cost model, and the pick of the next batch.

`JobQueue.select` applies the shared batching rules (realtime/scheduling/batch_wait.py: `too_late`, `edf_batch`) with
the local worker's own additions: a fairness correction between sessions sharing an overloaded worker,
and the first frame of an utterance rendered without its own session's later frames. Both drivers of
realtime/scheduling/scheduler.py use it; the render tier's replica uses the same rules (render_tier/edf_batcher.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from realtime.avatars.avatar import Avatar
from realtime.renderers.base import MouthPatch
from realtime.scheduling.batch_wait import edf_batch, too_late


@dataclass(eq=False)
class RenderJob:
    owner: object                     # the submitting session (cancel() removes all of its jobs)
    key: int                          # the owner's id for this frame (its video frame index)
    avatar: Avatar
    avatar_index: int
    mel: np.ndarray                   # (80, 16) float32
    deadline: float                   # clock time by which the patch must be delivered
    ready_at: float                   # clock time the job became renderable (submission)
    deliver: Callable[["RenderResult"], None]
    batch_hint: int = 1               # frames per batch the owner's fixed delay was sized for: > 1 lets
                                      # the worker wait for that many jobs while deadlines allow it
    starts_utterance: bool = False    # the first frame of an utterance: never held back for a batch


@dataclass
class RenderResult:
    key: int
    patch: MouthPatch | None          # None: the renderer failed for this batch
    completed_at: float               # clock time the patch became available
    render_s: float                   # duration of the renderer call that made it
    batch_size: int


@dataclass
class CostModel:
    """Predicted seconds for a batch of b frames: per-size average when seen, else per-frame average."""

    smoothing: float = 0.3
    by_size: dict[int, float] = field(default_factory=dict)
    per_frame: float | None = None

    def estimate(self, b: int) -> float:
        """Seen sizes: their average. Between two seen sizes: linear interpolation. Above the largest:
        proportional to it; below the smallest: its cost (both err on the slow side for a + b * size).
        Nothing seen: the per-frame average times b."""
        if b in self.by_size:
            return self.by_size[b]
        if not self.by_size:
            return 0.0 if self.per_frame is None else self.per_frame * b
        sizes = sorted(self.by_size)
        below, above = [s for s in sizes if s < b], [s for s in sizes if s > b]
        if not below:
            return self.by_size[above[0]]
        if not above:
            return self.by_size[below[-1]] * b / below[-1]
        lo, hi = below[-1], above[0]
        c_lo, c_hi = self.by_size[lo], self.by_size[hi]
        return c_lo + (c_hi - c_lo) * (b - lo) / (hi - lo)

    def observe(self, b: int, seconds: float) -> None:
        a = self.smoothing
        old = self.by_size.get(b)
        self.by_size[b] = seconds if old is None else (1 - a) * old + a * seconds
        pf = seconds / max(b, 1)
        self.per_frame = pf if self.per_frame is None else (1 - a) * self.per_frame + a * pf


class JobQueue:
    """Pending jobs and the batching policy. Not thread-safe by itself.

    Order: earliest deadline first, with a fairness correction so that sessions sharing an overloaded
    worker take turns: an owner's deadlines count as later by one frame's cost for every frame it was
    served recently (more than the least-served owner waiting; decays with a 1 s half-life). With equal
    service this is plain EDF.
    """

    half_life_s = 1.0

    def __init__(self, mix_avatars: bool = False) -> None:
        self.jobs: list[RenderJob] = []
        # Whether one batch may hold frames of different avatars (the renderer's `mixes_avatars`).
        self.mix_avatars = mix_avatars
        self._served: dict[int, tuple[float, float]] = {}  # id(owner) -> (decayed frames, at time)

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, job: RenderJob) -> None:
        self.jobs.append(job)

    def remove_owner(self, owner: object) -> int:
        before = len(self.jobs)
        self.jobs = [j for j in self.jobs if j.owner is not owner]
        self._served.pop(id(owner), None)
        return before - len(self.jobs)

    def batchable(self, job: RenderJob, head: RenderJob) -> bool:
        """Whether `job` may join a batch led by `head`."""
        return self.mix_avatars or job.avatar is head.avatar

    def earliest_ready(self) -> float:
        return min(j.ready_at for j in self.jobs)

    def _share(self, owner: object, now: float) -> float:
        value, at = self._served.get(id(owner), (0.0, now))
        return float(value * 0.5 ** (max(now - at, 0.0) / self.half_life_s))

    def _mark_served(self, batch: list[RenderJob], now: float) -> None:
        for j in batch:
            self._served[id(j.owner)] = (self._share(j.owner, now) + 1.0, now)
        if len(self._served) > 4 * (len({id(j.owner) for j in self.jobs}) + 16):
            live = {id(j.owner) for j in self.jobs} | {id(j.owner) for j in batch}
            self._served = {o: v for o, v in self._served.items() if o in live}

    def select(self, now: float, cost: CostModel, max_batch: int, probe: bool,
               peek: bool = False) -> tuple[list[RenderJob], int]:
        """Pick the next batch at time `now`; returns (batch, jobs skipped as too late).

        A job is skipped (removed) when even a batch of one would miss its deadline; with `probe` (no
        render for a while, so the cost estimate may be stale) only jobs already past their deadline
        are. With `peek` the batch stays queued (the caller only wants to know what it would be).
        """
        single = 0.0 if probe else cost.estimate(1)
        ready: list[RenderJob] = []
        keep: list[RenderJob] = []
        skipped = 0
        for j in self.jobs:
            if j.ready_at > now:
                keep.append(j)
            elif too_late(j.deadline, now, single):
                skipped += 1
            else:
                ready.append(j)
        if not ready:
            self.jobs = keep
            return [], skipped
        shares = {id(j.owner): self._share(j.owner, now) for j in ready}
        floor = min(shares.values())
        per_frame = cost.estimate(1)

        def key(j: RenderJob) -> float:
            return j.deadline + per_frame * (shares[id(j.owner)] - floor)

        ready.sort(key=key)
        head = ready[0]
        # The first frame of an utterance goes without its own session's later frames: it sets when the
        # avatar is seen talking, and a batch of them (a quick start has all its frames ready at once)
        # would finish it later and, when the renderer runs slower than its estimate, miss its tick with
        # the whole batch. Other sessions' due frames may still join it (GPU batching across sessions).
        same = [j for j in ready if self.batchable(j, head)
                and not (head.starts_utterance and j is not head and j.owner is head.owner)]
        batch = edf_batch(same, now, cost.estimate, max_batch, deadline=lambda j: j.deadline)
        if peek:
            self.jobs = keep + ready
            return batch, skipped
        chosen = {id(j) for j in batch}
        self.jobs = keep + [j for j in ready if id(j) not in chosen]
        self._mark_served(batch, now)
        return batch, skipped
