"""A log line that a stranger can make repeat without bound (one per refused audio chunk, one per loop
stall) goes out through `RateLimitedLog`: the first one, then at most one per `interval_s`, each saying
how many like it were held back since. The caller keeps the count of occurrences where /metrics reads it
(a session counter, a monitor's counter), so nothing is lost by logging less.
"""
from __future__ import annotations

import logging
import time
from typing import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._level = level
        self._interval_s = float(interval_s)
        self._clock = clock
        self._last: float | None = None   # when the latest line went out
        self.held = 0                     # occurrences not logged since that line

    def __call__(self, msg: str, *args: object) -> bool:
        """Log `msg % args` unless a line went out less than `interval_s` ago; True when it was logged."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval_s:
            self.held += 1
            return False
        if self.held:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, self.held, now - (self._last or now))
        self._logger.log(self._level, msg, *args)
        self._last, self.held = now, 0
        return True
