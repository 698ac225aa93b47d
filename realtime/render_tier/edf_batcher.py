"""A replica's batching: due frames from every front-end, earliest deadline first.

Each request (one front-end's batch for one avatar) carries the time by which its patches are due. The
batcher renders the request with the earliest deadline together with the other waiting requests for the
same avatar, up to `max_batch` frames, as long as the predicted batch time still meets every deadline in
it. While more than one front-end is sending, it may hold a batch for up to `max_wait_s` to let another
front-end's frames join, but only while the tightest deadline leaves room for a full batch after the
wait. A request that cannot be made in time even alone is answered at once with no patches: the
front-end shows the held mouth, and nothing queues up behind it (the same rule as the local worker,
realtime/scheduling/scheduler.py).

`plan_batch` is the policy as a pure function of the waiting requests and the time, built from the same
rules as the local render worker's (realtime/scheduling/batch_wait.py: `too_late`, `edf_batch`, `waits_for_others`);
`EdfBatcher` is the asyncio driver around it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from realtime.avatars.avatar import Avatar
from realtime.renderers.base import MouthPatch
from realtime.scheduling.batch_wait import edf_batch, too_late, waits_for_others
from realtime.scheduling.render_queue import CostModel

log = logging.getLogger(__name__)

RenderBatch = Callable[[Any, np.ndarray, np.ndarray], Awaitable[list[MouthPatch]]]


@dataclass(eq=False)
class Waiting:
    """One request in the queue."""

    sender: str
    key: str                    # avatar fingerprint: only the same avatar batches together
    avatar: Avatar
    indices: np.ndarray         # (B,)
    mels: np.ndarray            # (B, 80, 16)
    deadline: float             # batcher clock
    arrived: float
    future: asyncio.Future[Outcome] = field(repr=False)

    @property
    def frames(self) -> int:
        return len(self.indices)


@dataclass
class Plan:
    late: list[Waiting]              # cannot be made in time even alone: answer with no patches
    batch: list[Waiting]             # render these now (empty: nothing to do, or wait)
    wait_until: float | None = None  # hold the batch until then (or until the next arrival)


@dataclass
class Outcome:
    patches: list[MouthPatch] | None
    batch_size: int
    queued_s: float
    render_s: float


@dataclass
class BatcherStats:
    batches: int = 0
    frames: int = 0
    late_frames: int = 0
    errors: int = 0
    busy_s: float = 0.0
    senders: int = 0

    @property
    def mean_batch(self) -> float:
        return self.frames / self.batches if self.batches else 0.0


def plan_batch(waiting: list[Waiting], now: float, cost: CostModel, max_batch: int,
               fill_until: float | None, safety: float = 1.25) -> Plan:
    """What to do at `now`. `fill_until`: the end of the current wait for other front-ends' frames
    (None: do not wait)."""
    late = [w for w in waiting if too_late(w.deadline, now, cost.estimate(w.frames))]
    live = sorted((w for w in waiting if w not in late), key=lambda w: w.deadline)
    if not live:
        return Plan(late, [])
    head = live[0]
    same = [w for w in live if w.key == head.key]  # the same-avatar rule (a replica never mixes)
    batch = edf_batch(same, now, cost.estimate, max_batch, deadline=lambda w: w.deadline, frames=lambda w: w.frames)
    frames = sum(w.frames for w in batch)
    if (fill_until is not None and now < fill_until and frames < max_batch
            and waits_for_others(head.deadline, fill_until, cost.estimate(max_batch), safety)):
        return Plan(late, [], wait_until=fill_until)
    return Plan(late, batch)


class EdfBatcher:
    """Asyncio driver of `plan_batch`: `await submit(...)` returns when the request's patches are made
    (or it was found too late). One renderer call at a time."""

    several_senders_window_s = 1.0

    def __init__(self, render: RenderBatch, *, max_batch: int = 8, max_wait_s: float = 0.004,
                 safety: float = 1.25, clock: Callable[[], float] = time.monotonic) -> None:
        self._render = render
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.safety = safety
        self.clock = clock
        self.cost = CostModel()
        self.stats = BatcherStats()
        self._waiting: list[Waiting] = []
        self._arrival = asyncio.Event()
        self._senders: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def submit(self, sender: str, key: str, avatar: Avatar, indices: np.ndarray, mels: np.ndarray,
                     deadline: float) -> Outcome:
        now = self.clock()
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append(Waiting(sender, key, avatar, indices, mels, deadline, now, future))
        self._senders[sender] = now
        self._arrival.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="edf-batcher")
        return await future

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for w in self._waiting:
            if not w.future.done():
                w.future.cancel()
        self._waiting.clear()

    def _several_senders(self, now: float) -> bool:
        self._senders = {s: t for s, t in self._senders.items() if now - t < self.several_senders_window_s}
        self.stats.senders = len(self._senders)
        return len(self._senders) > 1

    async def _run(self) -> None:
        fill_until: float | None = None
        while True:
            if not self._waiting:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            now = self.clock()
            if fill_until is None and self.max_wait_s > 0 and self._several_senders(now):
                fill_until = now + self.max_wait_s
            plan = plan_batch(self._waiting, now, self.cost, self.max_batch, fill_until, self.safety)
            for w in plan.late:
                self._waiting.remove(w)
                self.stats.late_frames += w.frames
                _resolve(w.future, Outcome(None, 0, now - w.arrived, 0.0))
            if plan.wait_until is not None:
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), timeout=max(plan.wait_until - now, 0.0))
                except TimeoutError:
                    pass
                continue
            fill_until = None
            if plan.batch:
                for w in plan.batch:
                    self._waiting.remove(w)
                await self._render_and_answer(plan.batch)

    async def _render_and_answer(self, batch: list[Waiting]) -> None:
        indices = np.concatenate([w.indices for w in batch])
        mels = np.concatenate([w.mels for w in batch])
        start = self.clock()
        patches: list[MouthPatch] | None
        try:
            made = list(await self._render(batch[0].avatar, indices, mels))
            if len(made) != len(indices):
                raise RuntimeError(f"renderer returned {len(made)} patches for {len(indices)} frames")
            patches = made
        except Exception:
            self.stats.errors += 1
            log.exception("render replica: a batch of %d frames failed", len(indices))
            patches = None
        seconds = self.clock() - start
        if patches is not None:
            self.cost.observe(len(indices), seconds)
        self.stats.batches += 1
        self.stats.frames += len(indices)
        self.stats.busy_s += seconds
        offset = 0
        for w in batch:
            part = None if patches is None else patches[offset:offset + w.frames]
            offset += w.frames
            _resolve(w.future, Outcome(part, len(indices), start - w.arrived, seconds))


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():  # the caller may have gone (cancelled)
        future.set_result(outcome)
