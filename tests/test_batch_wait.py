"""The batching-wait policy (realtime/scheduling/batch_wait.py) on its own: a pure function of jobs and time."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from realtime.scheduling.batch_wait import BatchWaitPolicy, batch_wait_until


@dataclass
class Job:
    deadline: float
    ready_at: float = 0.0
    batch_hint: int = 1
    starts_utterance: bool = False
    avatar: object = field(default=None)


A, B = object(), object()
POLICY = BatchWaitPolicy(max_batch=4, max_wait_s=0.010, gather_safety=1.25)


def cost(b: int) -> float:
    return 0.002 + 0.001 * b   # 3 ms for one frame, 6 ms for four


def wait(jobs, now, several=True, policy=POLICY):
    return batch_wait_until(jobs, now, cost, policy, several_owners=several)


def test_nothing_ready_means_nothing_to_wait_for():
    assert wait([], 0.0) is None
    assert wait([Job(1.0, ready_at=0.5, avatar=A)], 0.0) is None


def test_fill_waits_max_wait_from_the_oldest_ready_job_with_several_sessions():
    jobs = [Job(1.0, ready_at=0.000, avatar=A), Job(1.0, ready_at=0.004, avatar=A)]
    assert wait(jobs, 0.005) == pytest.approx(0.010)
    assert wait(jobs, 0.010) is None                      # the wait has run out
    assert wait(jobs, 0.005, several=False) is None        # one session: nobody else to wait for


def test_fill_stops_at_a_full_batch_and_when_a_deadline_needs_the_time():
    full = [Job(1.0, ready_at=0.0, avatar=A) for _ in range(4)]
    assert wait(full, 0.001) is None
    # earliest deadline - (ready + max_wait) must exceed cost(max_batch) = 6 ms
    assert wait([Job(0.010 + 0.0061, avatar=A)], 0.0) == pytest.approx(0.010)
    assert wait([Job(0.010 + 0.0059, avatar=A)], 0.0) is None
    tight_newcomer = [Job(1.0, ready_at=0.0, avatar=A), Job(0.014, ready_at=0.002, avatar=B)]
    assert wait(tight_newcomer, 0.001) == pytest.approx(0.010)   # not ready yet: does not count
    assert wait(tight_newcomer, 0.002) is None                    # ready: its deadline ends the wait


def test_no_fill_without_a_wait_budget():
    assert wait([Job(1.0, avatar=A)], 0.0, policy=BatchWaitPolicy(4, 0.0)) is None


def test_gathering_holds_for_the_owners_batch_size_within_the_deadline():
    jobs = [Job(0.100, batch_hint=3, avatar=A)]
    assert wait(jobs, 0.0, several=False) == pytest.approx(0.100 - 1.25 * cost(2))
    jobs.append(Job(0.140, ready_at=0.04, batch_hint=3, avatar=A))
    assert wait(jobs, 0.04, several=False) == pytest.approx(0.100 - 1.25 * cost(3))
    jobs.append(Job(0.180, ready_at=0.08, batch_hint=3, avatar=A))
    assert wait(jobs, 0.08, several=False) is None        # the batch it was sized for is here
    assert wait(jobs[:1], 0.100 - 1.25 * cost(2), several=False) is None   # the bound is reached


def test_gathering_is_capped_by_max_batch_and_not_done_across_avatars():
    assert wait([Job(0.1, batch_hint=8, avatar=A) for _ in range(4)], 0.0, several=False) is None
    assert wait([Job(0.1, batch_hint=3, avatar=A), Job(0.1, batch_hint=3, avatar=B)], 0.0,
                several=False) is None


def test_first_frame_of_an_utterance_never_waits():
    """Neither for a gathered batch nor for other sessions' jobs, whatever the deadline allows."""
    first = Job(1.0, batch_hint=4, starts_utterance=True, avatar=A)
    assert wait([first], 0.0) is None
    assert wait([first, Job(1.0, avatar=A)], 0.0) is None
    assert wait([Job(1.0, batch_hint=4, avatar=A)], 0.0) is not None   # a later frame may wait


def test_the_policy_is_pure():
    jobs = [Job(1.0, ready_at=0.0, batch_hint=3, avatar=A)]
    before = list(jobs)
    assert wait(jobs, 0.001) == wait(jobs, 0.001)
    assert jobs == before


# -- the shared EDF rules (realtime/scheduling/batch_wait.py), as the local worker and the replica use them ----------

def test_edf_batch_fills_in_order_then_cuts_until_every_deadline_is_met():
    from realtime.scheduling.batch_wait import edf_batch

    cost = lambda b: 0.010 * b  # noqa: E731  (10 ms a frame)
    deadlines = [0.050, 0.060, 0.029, 1.0, 1.0]  # in priority order; the third is tight
    batch = edf_batch(list(range(5)), 0.0, cost, max_batch=8, deadline=lambda i: deadlines[i])
    assert batch == [0, 1]  # 3 frames would finish at 30 ms, after the third's deadline (29 ms)
    assert edf_batch([0, 1, 2], 0.0, cost, max_batch=2, deadline=lambda i: 1.0) == [0, 1]
    # frames per item (a replica's requests): one that does not fit is passed over, later ones still join
    sizes = {"a": 3, "b": 6, "c": 2}
    got = edf_batch(["a", "b", "c"], 0.0, cost, max_batch=8, deadline=lambda _: 1.0, frames=sizes.__getitem__)
    assert got == ["a", "c"]
    # the head alone always stays, even when it is predicted late
    assert edf_batch([0, 1], 0.0, cost, max_batch=8, deadline=lambda _: 0.001) == [0]


def test_too_late_and_waits_for_others():
    from realtime.scheduling.batch_wait import too_late, waits_for_others

    assert too_late(deadline=0.009, now=0.0, alone_s=0.010) and not too_late(0.010, 0.0, 0.010)
    assert waits_for_others(head_deadline=0.100, wait_until=0.010, full_batch_s=0.080)
    assert not waits_for_others(0.100, 0.010, 0.080, safety=1.25)  # 90 ms left < 1.25 x 80 ms
    assert not waits_for_others(0.100, 0.020, 0.080)  # exactly a full batch left: do not wait
