"""The supervisor of the render thread (realtime/scheduling/supervised_thread.py), apart from rendering.

Real threads and real timers, so every wait is generous and every timing check is a lower bound (a loaded
box may restart late, never early)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator

import pytest

from realtime.scheduling.supervised_thread import RestartBackoff, SupervisedThread

pytestmark = pytest.mark.timeout(60)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class Body:
    """A thread body that dies (BaseException, as a native crash would) on the runs listed in `die_on`,
    after running `run_s` seconds on runs listed in `long_runs`; otherwise serves tasks until stopped."""

    def __init__(self, die_on: set[int], long_runs: frozenset[int] = frozenset(), run_s: float = 0.0) -> None:
        self.die_on, self.long_runs, self.run_s = die_on, long_runs, run_s
        self.cond = threading.Condition()
        self.started_at: list[float] = []
        self.died_at: list[float] = []
        self.thread: SupervisedThread | None = None

    def __call__(self) -> None:
        run = len(self.started_at)
        self.started_at.append(time.monotonic())
        if run in self.long_runs:
            time.sleep(self.run_s)
        if run in self.die_on:
            self.died_at.append(time.monotonic())
            raise KeyboardInterrupt(f"run {run} dies")  # a BaseException, not an Exception
        thread = self.thread
        assert thread is not None
        while True:
            thread.run_task_slice()
            with self.cond:
                while not thread.stopped and not thread.tasks_pending:
                    self.cond.wait()
                if thread.stopped:
                    return


def supervised(body: Body, backoff: RestartBackoff) -> SupervisedThread:
    thread = SupervisedThread("supervised-test", body, body.cond, backoff=backoff)
    body.thread = thread
    thread.start()
    return thread


def test_backoff_counts_deaths_in_a_row_and_a_stable_run_resets_it():
    b = RestartBackoff((0.2, 1.0, 5.0), stable_after_s=30.0)
    assert [b.delay_s(n) for n in (1, 2, 3, 4, 9)] == [0.2, 1.0, 5.0, 5.0, 5.0]
    assert b.deaths_in_a_row(0, 0.1) == 1 and b.deaths_in_a_row(2, 29.9) == 3
    assert b.deaths_in_a_row(5, 30.0) == 1
    with pytest.raises(ValueError):
        RestartBackoff(())
    with pytest.raises(ValueError):
        RestartBackoff((-1.0,))


def test_a_thread_that_dies_is_restarted_after_a_growing_backoff():
    body = Body(die_on={0, 1})
    thread = supervised(body, RestartBackoff((0.1, 0.4), stable_after_s=30.0))
    try:
        assert wait_for(lambda: len(body.started_at) == 3 and thread.healthy)
        assert thread.restarts == 2 and thread.deaths_in_a_row == 2 and thread.down_since is None
        # Each restart waited at least its backoff after the death: 0.1 s, then 0.4 s.
        assert body.started_at[1] - body.died_at[0] >= 0.1
        assert body.started_at[2] - body.died_at[1] >= 0.4
        # The restarted thread serves the work handed to it.
        assert thread.call(lambda: threading.current_thread().name) == "supervised-test"
    finally:
        thread.close()
    assert not thread.healthy and not thread.alive


def test_unhealthy_while_down_and_a_stable_run_resets_the_backoff():
    body = Body(die_on={0, 1, 2}, long_runs=frozenset({2}), run_s=0.3)
    thread = supervised(body, RestartBackoff((0.05, 0.5, 5.0), stable_after_s=0.25))
    try:
        assert wait_for(lambda: len(body.started_at) == 4 and thread.healthy)
        # Deaths 1 and 2 came in a row (0.05 s, 0.5 s); run 2 lasted past stable_after_s, so its death
        # counts as a first one again: 0.05 s, not 5 s.
        assert thread.deaths_in_a_row == 1 and thread.restarts == 3
        assert body.started_at[2] - body.died_at[1] >= 0.5
        assert body.started_at[3] - body.died_at[2] < 4.0
    finally:
        thread.close()


def test_close_joins_the_thread_cancels_a_pending_restart_and_fails_waiting_work():
    body = Body(die_on={0})
    thread = supervised(body, RestartBackoff((60.0,)))
    assert wait_for(lambda: thread.down_since is not None)
    assert not thread.healthy and thread.restarts == 0
    errors: list[BaseException] = []

    def waiting_caller() -> None:
        try:
            thread.call(lambda: 1)
        except RuntimeError as exc:
            errors.append(exc)

    caller = threading.Thread(target=waiting_caller)
    caller.start()
    assert wait_for(lambda: thread.tasks_pending)
    thread.close()
    caller.join(10)
    assert [str(e) for e in errors] == ["thread supervised-test stopped before this task finished"]
    time.sleep(0.1)
    assert thread.restarts == 0 and not thread.alive and thread.stopped
    with pytest.raises(RuntimeError, match="closed"):
        thread.call(lambda: 1)

    body = Body(die_on=set())
    thread = supervised(body, RestartBackoff())
    assert wait_for(lambda: thread.healthy)
    thread.close()
    assert not thread.alive  # joined: the body returned
    thread.close()  # idempotent


def test_tasks_run_one_slice_per_turn_on_the_thread_and_errors_reach_the_caller():
    body = Body(die_on=set())
    thread = supervised(body, RestartBackoff())
    seen: list[str] = []

    def steps() -> Generator[int, None, None]:
        for i in range(3):
            seen.append(threading.current_thread().name)
            yield i

    def fails() -> int:
        raise ValueError("task error")

    try:
        assert thread.run(steps()) == 2 and seen == ["supervised-test"] * 3
        with pytest.raises(ValueError, match="task error"):
            thread.call(fails)
        # Called from the thread itself, a task runs in place instead of waiting on itself.
        assert thread.call(lambda: thread.call(lambda: 7)) == 7
    finally:
        thread.close()
