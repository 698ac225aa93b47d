"""The one batching policy: which jobs make the next batch, and how long it may wait for more.

Pure functions of the waiting work and the time, used by both local render-worker drivers
(realtime/scheduling/scheduler.py: the thread and the simulated-time worker) and by the render tier's replica
(realtime/render_tier/edf_batcher.py): earliest deadline first (`too_late`, `edf_batch`), the same-avatar
rule (`BatchWaitPolicy.batchable`, or a replica's avatar key), a bounded wait for other senders' work
(`waits_for_others`), and the first frame of an utterance never waits (`batch_wait_until`).

When the render worker starts its next batch:

A pure function of the queued jobs and the time (plus the worker's cost curve and settings): it reads no
clock, takes no lock and changes nothing, so `ThreadedRenderWorker` (waits on a condition variable until
the returned time or the next submission) and `InlineRenderWorker` (jumps virtual time to the next
arrival or the returned time) follow exactly the same rule, and the rule is tested on its own
(tests/test_batch_wait.py). After every arrival the driver asks again; each answer is bounded by the
deadlines of the jobs ready at that moment, so a wait always ends in time.

Two reasons to wait, both only while every ready job's deadline allows it:
- gathering (`batch_hint` > 1): the head job's owner sized its fixed delay for batches of k frames
  (`Timeline.from_config`), so the worker holds it while fewer than k jobs of its avatar are ready and a
  batch one larger (`gather_safety` x its predicted cost) still meets the head's deadline;
- filling: with several sessions on the worker, a batch below `max_batch` may wait up to `max_wait_s`
  (counted from when its oldest job became ready) for other sessions' jobs, while the earliest deadline
  leaves room for a full batch after the wait.
Never for the first frame of an utterance (`starts_utterance`): that frame sets how soon the avatar is
seen talking, so it is rendered as soon as the worker is free; batching may gather later frames only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class PendingJob(Protocol):
    """What the policy reads of a queued render job (realtime.scheduling.scheduler.RenderJob has these fields)."""

    @property
    def avatar(self) -> Any: ...
    @property
    def deadline(self) -> float: ...
    @property
    def ready_at(self) -> float: ...
    @property
    def batch_hint(self) -> int: ...
    @property
    def starts_utterance(self) -> bool: ...


@dataclass(frozen=True)
class BatchWaitPolicy:
    max_batch: int                # frames per renderer call
    max_wait_s: float             # bounded wait for other sessions' jobs (0: never fill)
    gather_safety: float = 1.25   # a gathering batch stops waiting when this x the cost of one more would miss
    mix_avatars: bool = False     # the renderer takes several avatars' frames in one call

    def batchable(self, job: PendingJob, head: PendingJob) -> bool:
        """Whether `job` may join a batch led by `head`."""
        return self.mix_avatars or job.avatar is head.avatar


def batch_wait_until(jobs: Sequence[PendingJob], now: float, cost: Callable[[int], float],
                     policy: BatchWaitPolicy, *, several_owners: bool) -> float | None:
    """The time until which the next batch may wait for more jobs, or None to start it at `now`.

    `cost(b)`: predicted seconds for a batch of b; `several_owners`: more than one session submitted
    recently (only then can waiting bring other sessions' jobs)."""
    ready = [j for j in jobs if j.ready_at <= now]
    if not ready or any(j.starts_utterance for j in ready):
        return None
    head = min(ready, key=lambda j: j.deadline)
    waits = [_gather_until(ready, head, cost, policy),
             _fill_until(ready, head, cost, policy) if several_owners else None]
    until = max((w for w in waits if w is not None), default=None)
    return until if until is not None and until > now else None


def _gather_until(ready: list[PendingJob], head: PendingJob, cost: Callable[[int], float],
                  policy: BatchWaitPolicy) -> float | None:
    """Hold the head job for the batch its owner's delay was sized for (only batchable jobs waiting)."""
    target = min(int(policy.max_batch), int(head.batch_hint))
    if target <= 1 or len(ready) >= target or not all(policy.batchable(j, head) for j in ready):
        return None
    return head.deadline - policy.gather_safety * cost(len(ready) + 1)


def _fill_until(ready: list[PendingJob], head: PendingJob, cost: Callable[[int], float],
                policy: BatchWaitPolicy) -> float | None:
    """Wait up to max_wait_s (from the oldest ready job) for other sessions' jobs that can join the head's batch,
    while the earliest deadline still leaves room for a full batch after the wait."""
    if policy.max_wait_s <= 0:
        return None
    if sum(1 for j in ready if policy.batchable(j, head)) >= policy.max_batch:
        return None
    fill_until = min(j.ready_at for j in ready) + policy.max_wait_s
    if not waits_for_others(head.deadline, fill_until, cost(policy.max_batch)):
        return None
    return fill_until


def too_late(deadline: float, now: float, alone_s: float) -> bool:
    """Work that misses its deadline even rendered alone now: answered at once (held mouth), never queued."""
    return deadline < now + alone_s


def waits_for_others(head_deadline: float, wait_until: float, full_batch_s: float, safety: float = 1.0) -> bool:
    """Whether a batch may wait until `wait_until` for other senders' work: only while its tightest
    deadline still leaves room (x `safety`) for a full batch after the wait."""
    return head_deadline - wait_until > safety * full_batch_s


def edf_batch(candidates: Sequence[T], now: float, cost: Callable[[int], float], max_batch: int,
              deadline: Callable[[T], float], frames: Callable[[T], int] = lambda _: 1) -> list[T]:
    """The batch led by `candidates[0]` (the head: earliest deadline, after any fairness correction):
    the candidates in order (each may join the head: same avatar, or a renderer that mixes them) while
    their frames fit in `max_batch`, then cut from the end until the predicted finish meets every deadline
    in it. The head alone always stays."""
    batch: list[T] = []
    total = 0
    for c in candidates:
        n = frames(c)
        if batch and total + n > max_batch:
            continue
        batch.append(c)
        total += n
    while len(batch) > 1 and now + cost(total) > min(deadline(c) for c in batch):
        total -= frames(batch.pop())
    return batch


__all__ = ["BatchWaitPolicy", "PendingJob", "batch_wait_until", "edf_batch", "too_late", "waits_for_others"]
