"""`MediaExecutor`: the event loop's default executor, where aiortc encodes every audio and video frame.

aiortc's RTCRtpSender encodes each frame with `loop.run_in_executor(None, encoder.encode, ...)`, so the
default executor carries every session's Opus and VP8/H.264 work. asyncio's own default has
min(32, cores + 4) threads, 6 on a 2-core machine, for work that is mostly C code releasing the GIL. With 8
sessions those threads fought the event loop for the cores and the GIL: the loop thread waited in the run
queue for a third of the time, its lag grew and the audio track skipped frames (lost audio). Two changes:

- As many threads as the cores the event loop leaves (`encoder_threads`): 1 on 2 cores. More threads than
  free cores only add switching: a video frame costs far more than an Opus frame, but both are short.
- Audio first (`is_audio_encode`): one thread serves 25 video and 50 audio frames a second per session,
  and an audio frame queued behind a tick's worth of video frames reached its sender late (FIFO, one
  thread). Audio encodes, tiny and due every 20 ms, go before any queued video work, FIFO within each
  class. A late video frame is only late (or skipped: the picture holds).

The measurements behind both (thread counts x FIFO / audio first, `bench/soak.py --minutes 2 --sessions 8`)
are in bench/RESULTS.md "Encoder executor".

Only encodes run on these threads (`is_encode`). Everything else asyncio's default executor is asked to
run goes to a separate small pool (`OTHER_THREADS`): aioice resolves STUN/TURN host names there with
`socket.gethostbyname`, and aiohttp reads files there; a DNS lookup that hangs for seconds must never
hold every session's encoder.

Eight sessions are more than this box holds with its clients in it (the video is what gives); the loop
and the audio are what this protects. Giving the threads a lower OS priority instead (nice 10) changed
nothing, nor did a 0.5 ms GIL switch interval.

Works by giving ThreadPoolExecutor a priority queue in place of its FIFO `_work_queue` (CPython's workers
only `get()` from it; `shutdown` puts None there and drains it with `get_nowait`; asyncio requires a
ThreadPoolExecutor instance): tests/test_media_executor.py guards that. Threads are started up front so
the thread count is flat from the first session on (a lazily grown pool looked like a leak in the soak).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import MethodType
from typing import Any, Callable

import cv2
from aiortc.codecs.base import Encoder
from aiortc.codecs.g711 import PcmEncoder
from aiortc.codecs.opus import OpusEncoder

AUDIO, VIDEO, SHUTDOWN = 0, 1, 2
OTHER_THREADS = 2  # DNS lookups for ICE servers, file reads: rare, and never on the encoder threads


def is_encode(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is an aiortc encoder's bound method (what RTCRtpSender runs in the executor)."""
    return isinstance(fn, MethodType) and isinstance(fn.__self__, Encoder)


def is_audio_encode(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is an audio encoder's bound method (aiortc's Opus and G.711 encoders, ours included)."""
    return isinstance(fn, MethodType) and isinstance(fn.__self__, (OpusEncoder, PcmEncoder))


def encoder_threads() -> int:
    """The cores this process may use, less the event loop's own; at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


OPENCV_THREADS = 1


def limit_native_threads() -> None:
    """OpenCV's own thread pool down to `OPENCV_THREADS` (process-wide): the renderer's warp, the mouth paste
    and the BGR -> I420 conversion of every session run in the thread that calls them (render worker, frame
    pool). Those calls are small (a 512 px frame, under a millisecond each); OpenCV split each over a pool
    of one thread per core and woke it per call, which on a server whose cores are already shared by the
    sessions (the parallelism is the sessions, as for the encoders' one thread each) only added hand-offs:
    the pool's threads took more CPU than the same work costs in the calling threads (bench/RESULTS.md "Each
    session cheaper"). Results are the same: OpenCV's parallel loops split rows, not arithmetic."""
    cv2.setNumThreads(OPENCV_THREADS)


def start_every_thread(pool: ThreadPoolExecutor) -> None:
    """Create all of `pool`'s threads now (ThreadPoolExecutor adds them lazily, one per submission that
    finds none idle), so the server's thread count is flat from its first session on and a leak check
    compares like with like. Uses the base class's submit, so it fills the pool it is given."""
    size = pool._max_workers
    barrier = threading.Barrier(size)
    for future in [ThreadPoolExecutor.submit(pool, barrier.wait) for _ in range(size)]:
        future.result()


class _PriorityWorkQueue:
    """The `queue.SimpleQueue` interface ThreadPoolExecutor uses (put, get, get_nowait), served by class:
    audio encodes, then video encodes, then the shutdown sentinel (None), FIFO within a class."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Any]] = []
        self._order = itertools.count()
        self._ready = threading.Condition(threading.Lock())

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            rank = SHUTDOWN
        else:
            rank = AUDIO if is_audio_encode(item.fn) else VIDEO
        with self._ready:
            heapq.heappush(self._heap, (rank, next(self._order), item))
            self._ready.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self._ready:
            if not block:
                timeout = 0.0
            if not self._ready.wait_for(lambda: self._heap, timeout):
                raise queue.Empty
            return heapq.heappop(self._heap)[2]

    def get_nowait(self) -> Any:
        return self.get(block=False)


class MediaExecutor(ThreadPoolExecutor):
    """`workers` threads, all started now, for encodes (audio first); other work goes to a small pool of
    its own (`OTHER_THREADS`, also started now)."""

    def __init__(self, workers: int | None = None, name: str = "media-encode") -> None:
        workers = encoder_threads() if workers is None else workers
        super().__init__(max_workers=workers, thread_name_prefix=name)
        self._work_queue = _PriorityWorkQueue()  # type: ignore[assignment]  # before any thread exists
        self._other = ThreadPoolExecutor(max_workers=OTHER_THREADS, thread_name_prefix=f"{name}-other")
        start_every_thread(self)
        start_every_thread(self._other)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if is_encode(fn):
            return super().submit(fn, *args, **kwargs)
        return self._other.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        self._other.shutdown(wait=wait, cancel_futures=cancel_futures)


def start_default_executor(loop: asyncio.AbstractEventLoop) -> MediaExecutor:
    """Give `loop` a `MediaExecutor` as its default executor; `asyncio.Runner.close` shuts it down."""
    pool = MediaExecutor()
    loop.set_default_executor(pool)
    return pool


__all__ = ["MediaExecutor", "encoder_threads", "is_audio_encode", "is_encode", "limit_native_threads",
           "start_default_executor", "start_every_thread"]
