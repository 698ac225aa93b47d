"""Event-loop lag: how late the server's asyncio loop runs a callback that was due, measured continuously.

Every frame of every session is paced by a timer on the one event loop (tracks.py), so anything that
holds the loop (a decode, a big JSON body, a per-frame conversion left on it) shows up here first, as
late frames for every session at once. `LoopLagMonitor` sleeps `interval_s` in a loop and records how
much later than asked it woke up. /metrics exports the histogram (`lipsync_event_loop_lag_seconds`) and
the p99 of the last `window` samples (`lipsync_event_loop_lag_p99_seconds`), plus the number of live
asyncio tasks (`lipsync_asyncio_tasks`), which bench/soak.py watches for leaks.
"""
from __future__ import annotations

import asyncio
import logging
import time

from realtime.metrics import Histogram

log = logging.getLogger(__name__)

# Seconds. Fine at the low end, where the 20 ms target of a healthy loop lies.
LOOP_LAG_BUCKETS_S: tuple[float, ...] = (0.001, 0.002, 0.005, 0.010, 0.015, 0.020, 0.030, 0.050, 0.100,
                                         0.250, 0.500, 1.0)


class LoopLagMonitor:
    """Start with `start()` on the running loop; `stop()` cancels it. `lag` holds seconds late per wake-up."""

    def __init__(self, interval_s: float = 0.05, window: int = 1200) -> None:
        self.interval_s = float(interval_s)
        self.lag = Histogram(LOOP_LAG_BUCKETS_S, window=window)  # window 1200 x 50 ms = the last minute
        self._task: asyncio.Task | None = None

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

    async def _run(self) -> None:
        while True:
            due = time.monotonic() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.lag.observe(max(0.0, time.monotonic() - due))


def live_tasks() -> int:
    """asyncio tasks not yet done on the running loop."""
    return sum(1 for t in asyncio.all_tasks() if not t.done())
