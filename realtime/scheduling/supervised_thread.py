"""A daemon thread that is restarted with backoff when it dies, and that runs handed-over work in slices.

The render worker's thread (realtime/scheduling/scheduler.py) must outlive a crash outside the renderer
call (those are caught per batch): a BaseException from a native extension, a bug in the batching policy.
Sessions survive it because their jobs stay queued; in the meantime they show held or idle mouths, and
`healthy` is False so /healthz says degraded. This module is that supervision, apart from what the
thread does:

- `SupervisedThread(name, body, cond)` runs `body()` on a daemon thread once `start()` is called. When
  `body` raises (anything, BaseException included), the death is logged, `down_since` is set, and a timer
  starts the thread again after `RestartBackoff.delay_s(deaths_in_a_row)`: 0.2 s, 1 s, then 5 s for each
  further death in a row; a run that lasted `stable_after_s` counts as a fresh first death, so a thread
  that dies once a day is restarted quickly each time. When `body` returns, the thread ends for good
  (it returns only once `stopped` is set).
- Work handed to the thread (`run(steps)`, `call(fn)`) is an iterator of slices; the body runs at most one
  slice per loop turn (`run_task_slice()`), between its own units of work, so a long preparation never
  holds the thread for more than one slice. The caller blocks until the iterator ends and gets its last
  value, or its error.
- `close()` stops the thread, cancels a pending restart, joins (5 s at most), and fails every task that
  will never run, so no caller waits forever.

The body and this class share one `threading.Condition` (`cond`, an RLock inside): the body waits on it
for its own work and for tasks (`tasks_pending`), and checks `stopped` under it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RestartBackoff:
    """How long to wait before restarting a dead thread."""

    delays_s: tuple[float, ...] = (0.2, 1.0, 5.0)  # before the 1st, 2nd, 3rd and later restarts in a row
    stable_after_s: float = 30.0  # a run this long resets the count of deaths in a row

    def __post_init__(self) -> None:
        if not self.delays_s or min(self.delays_s) < 0 or self.stable_after_s < 0:
            raise ValueError(f"a restart backoff needs non-negative delays and stable time: {self}")

    def deaths_in_a_row(self, previous: int, ran_s: float) -> int:
        """The count after a death that ended a run of `ran_s` seconds."""
        return 1 if ran_s >= self.stable_after_s else previous + 1

    def delay_s(self, deaths_in_a_row: int) -> float:
        return self.delays_s[min(max(deaths_in_a_row, 1), len(self.delays_s)) - 1]


class _Task:
    """Work handed to the thread: an iterator of slices, run one per loop turn, and its outcome."""

    def __init__(self, steps: Generator[Any, None, None]) -> None:
        self.steps = steps
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def step(self) -> None:
        """Run one slice; the last value the iterator yields is the result."""
        try:
            self.result = next(self.steps)
        except StopIteration:
            self.done.set()
        except BaseException as exc:  # handed to the waiting caller, who re-raises it
            self.error = exc
            self.done.set()

    def abandon(self, thread_name: str) -> None:
        with contextlib.suppress(Exception):
            self.steps.close()
        self.error = RuntimeError(f"thread {thread_name} stopped before this task finished")
        self.done.set()


class SupervisedThread:
    """One supervised daemon thread (see the module docstring for the contract)."""

    def __init__(self, name: str, body: Callable[[], None], cond: threading.Condition, *,
                 backoff: RestartBackoff | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.cond = cond
        self.backoff = backoff or RestartBackoff()  # read at each death: a new value applies to the next one
        self._body = body
        self._clock = clock
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._restart_timer: threading.Timer | None = None
        self._tasks: deque[_Task] = deque()
        self.restarts = 0  # times the thread died and was started again
        self.down_since: float | None = None  # clock time the thread died; None while it runs
        self.deaths_in_a_row = 0

    def start(self) -> None:
        with self.cond:
            if self._thread is not None:
                raise RuntimeError(f"thread {self.name} already started")
            self._thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        thread.start()
        return thread

    def _main(self) -> None:
        started = time.monotonic()
        try:
            self._body()
        except BaseException:
            log.critical("%s: the thread died; restarting it", self.name, exc_info=True)
            self._schedule_restart(time.monotonic() - started)

    def _schedule_restart(self, ran_s: float) -> None:
        with self.cond:
            if self._stopped:
                return
            self.down_since = self._clock()
            self.deaths_in_a_row = self.backoff.deaths_in_a_row(self.deaths_in_a_row, ran_s)
            self._restart_timer = threading.Timer(self.backoff.delay_s(self.deaths_in_a_row), self._restart)
            self._restart_timer.daemon = True
            self._restart_timer.start()

    def _restart(self) -> None:
        with self.cond:
            if self._stopped:
                return
            self.restarts += 1
            self.down_since = None
            self._restart_timer = None
            self._thread = self._new_thread()
        log.warning("%s: thread restarted (%d restart(s) so far)", self.name, self.restarts)

    # -- state the body and the owner read ----------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def alive(self) -> bool:
        """The thread object exists and runs (during a restart's backoff: the dead one, so False)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Running: False from a death until its restart, before start and after close."""
        return not self._stopped and self.down_since is None and self.alive

    def on_thread(self) -> bool:
        """The caller runs on the supervised thread (e.g. a callback from the body)."""
        return self._thread is not None and threading.current_thread() is self._thread

    @property
    def tasks_pending(self) -> bool:
        """Handed-over work waits (read it under `cond`)."""
        return bool(self._tasks)

    # -- work handed to the thread ----------------------------------------------------------------
    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the thread between the body's units of work; return its result or raise its error."""
        def once() -> Generator[T, None, None]:
            yield fn()
        result: T = self.run(once())
        return result

    def run(self, steps: Generator[Any, None, None]) -> Any:
        """Run the slices of `steps` on the thread, one per `run_task_slice`; wait; return the last value."""
        if self.on_thread():  # already there: run it in place (waiting for ourselves would never end)
            result = None
            for result in steps:  # noqa: B007 (the last value is the result)
                pass
            return result
        task = _Task(steps)
        with self.cond:
            if self._stopped:
                raise RuntimeError(f"thread {self.name} is closed")
            self._tasks.append(task)
            self.cond.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def run_task_slice(self) -> None:
        """One slice of the oldest task (called by the body, on the thread, without holding `cond`)."""
        with self.cond:
            task = self._tasks[0] if self._tasks else None
        if task is None:
            return
        task.step()
        if task.done.is_set():
            with self.cond:
                self._tasks.popleft()

    # -- the end ------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the body to return (it checks `stopped` under `cond`) and cancel a pending restart."""
        with self.cond:
            self._stopped = True
            self.cond.notify_all()
            if self._restart_timer is not None:
                self._restart_timer.cancel()

    def close(self, join_timeout_s: float = 5.0) -> None:
        """`stop`, join the thread, and fail the tasks it will never run. Idempotent."""
        self.stop()
        thread = self._thread
        if thread is not None and threading.current_thread() is not thread:
            thread.join(timeout=join_timeout_s)
        with self.cond:
            if thread is None or not thread.is_alive():
                tasks, self._tasks = list(self._tasks), deque()
            else:
                tasks = []
        for task in tasks:
            task.abandon(self.name)
