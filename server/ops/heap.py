"""Keep the C heap from holding on to memory that sessions freed (glibc malloc arenas, malloc_trim).

The leak the soak bench found was not a Python object leak (a census of gc objects after 20 sessions
opened and closed: +146 weakrefs, nothing else over 100) but glibc's allocator: every thread that
allocates (aiortc's encoder and decoder threads, the render thread, the executor) gets its own malloc
arena, up to 8 per core, and an arena keeps the pages of freed video frames, codec contexts and numpy
buffers instead of returning them. Measured in-process (bench/RESULTS.md "Heap"): RSS grew round after
round with glibc's defaults; a trim after each round kept it lowest, and two arenas kept it flat.

So the server caps the number of arenas at start (`limit_arenas`, before the media threads exist; the
`--malloc-arenas` flag, 0 keeps glibc's default) and, after sessions close, returns free pages to the
system with `malloc_trim(0)` on a background thread (`HeapTrimmer`, at most once per `min_interval_s`).
Both are no-ops where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # Only glibc has all three (musl, macOS: no malloc_trim / arena cap).
    needed = ("gnu_get_libc_version", "malloc_trim", "mallopt")
    return libc if all(hasattr(libc, symbol) for symbol in needed) else None


_LIBC = _glibc()


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at `count` (0: leave the default). True if the cap was set."""
    if count <= 0 or _LIBC is None:
        return False
    ok = bool(_LIBC.mallopt(M_ARENA_MAX, int(count)))
    log.debug("malloc arenas capped at %d: %s", count, ok)
    return ok


def trim() -> bool:
    """Return free heap pages to the system now (blocking: call it off the event loop)."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


class HeapTrimmer:
    """`request()` from the event loop when a session ends: trims on a short-lived daemon thread, at most
    once per `min_interval_s` (a burst of closes leads to one trim after the burst)."""

    def __init__(self, min_interval_s: float = 5.0, enabled: bool = True) -> None:
        self.min_interval_s = float(min_interval_s)
        self.enabled = enabled and _LIBC is not None
        self.trims = 0
        self._lock = threading.Lock()
        self._pending: threading.Timer | None = None
        self._last = float("-inf")

    def request(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._pending is not None:
                return
            delay = max(0.5, self._last + self.min_interval_s - time.monotonic())
            self._pending = threading.Timer(delay, self._run)
            self._pending.name = "heap-trim"
            self._pending.daemon = True
            self._pending.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        trim()
        with self._lock:
            self._pending = None
            self._last = time.monotonic()
            self.trims += 1
        log.debug("heap trimmed in %.1f ms", 1000 * (time.monotonic() - t0))

    def close(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
