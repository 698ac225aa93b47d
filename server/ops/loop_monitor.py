"""Event-loop lag: how late the server's asyncio loop runs a callback that was due, measured continuously.

Every frame of every session is paced by a timer on the one event loop (tracks.py), so anything that
holds the loop (a decode, a big JSON body, a per-frame conversion left on it) shows up here first, as
late frames for every session at once. `LoopLagMonitor` sleeps `interval_s` in a loop and records how
much later than asked it woke up. /metrics exports the histogram (`lipsync_event_loop_lag_seconds`),
the p99 of the last `window` samples (`lipsync_event_loop_lag_p99_seconds`), the worst lag of the last
minute (`lipsync_event_loop_lag_max_seconds`) and a counter of stalls over `STALL_S`
(`lipsync_event_loop_stalls_total`), plus the number of live asyncio tasks (`lipsync_asyncio_tasks`),
which bench/soak.py watches for leaks. The max and the counter are there because a freeze is one sample:
a loop held for 12 s wakes the monitor once, 12 s late, among 1 200 samples a minute, so the p99 does not
move while every session stood still.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable

from realtime.metrics import Histogram
from realtime.rate_limited_log import RateLimitedLog

log = logging.getLogger(__name__)

# Seconds. Fine at the low end, where the 20 ms target of a healthy loop lies.
LOOP_LAG_BUCKETS_S: tuple[float, ...] = (0.001, 0.002, 0.005, 0.010, 0.015, 0.020, 0.030, 0.050, 0.100,
                                         0.250, 0.500, 1.0)
STALL_S = 0.25            # a lag this long is a stall: every session's video and audio stood still
MAX_WINDOW_S = 60.0       # the worst lag is over this much recent time


class LoopLagMonitor:
    """Start with `start()` on the running loop; `stop()` cancels it. `lag` holds seconds late per wake-up."""

    def __init__(self, interval_s: float = 0.05, window: int = 1200,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = float(interval_s)
        self.lag = Histogram(LOOP_LAG_BUCKETS_S, window=window)  # window 1200 x 50 ms = the last minute
        self.stalls_total = 0     # lags over STALL_S since start
        self._clock = clock
        self._stall_log = RateLimitedLog(log)
        # (time, lag) with decreasing lags: the front is the worst of the last MAX_WINDOW_S (a running max).
        self._worst: deque[tuple[float, float]] = deque()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def p99_s(self) -> float:
        value = self.lag.quantile(0.99)
        return 0.0 if value is None else value

    def max_s(self) -> float:
        """The worst lag seen in the last MAX_WINDOW_S seconds (0 when none)."""
        self._expire(self._clock())
        return self._worst[0][1] if self._worst else 0.0

    def record(self, lag_s: float) -> None:
        """One wake-up `lag_s` late (the monitor's own samples; tests call it too)."""
        now = self._clock()
        self.lag.observe(lag_s)
        if lag_s > STALL_S:
            self.stalls_total += 1
            self._stall_log("event loop stalled for %.3f s", lag_s)
        while self._worst and self._worst[-1][1] <= lag_s:
            self._worst.pop()
        self._worst.append((now, lag_s))
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._worst and self._worst[0][0] < now - MAX_WINDOW_S:
            self._worst.popleft()

    async def _run(self) -> None:
        while True:
            due = self._clock() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, self._clock() - due))


def live_tasks() -> int:
    """asyncio tasks not yet done on the running loop."""
    return sum(1 for t in asyncio.all_tasks() if not t.done())
