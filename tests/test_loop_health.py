"""What keeps the server's one event loop and its memory healthy over long runs: the loop-lag monitor and
its /metrics series, per-frame work off the loop, and the heap settings."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
from server_helpers import start_server, tiny_engine
from test_engine import FakeAvatar, RecordingRenderer, drive

from realtime.config import EngineConfig
from realtime.scheduling.scheduler import InlineRenderWorker
from realtime.timeline.clock import ManualClock
from realtime.timeline.session import RENDERED, LipSyncSession
from server.media.media_executor import OTHER_THREADS, encoder_threads, start_default_executor
from server.media.tracks import AvatarVideoTrack, MediaClock
from server.ops import heap
from server.ops.loop_monitor import LoopLagMonitor


async def test_loop_lag_monitor_sees_a_blocked_loop():
    monitor = LoopLagMonitor(interval_s=0.01)
    monitor.start()
    try:
        await asyncio.sleep(0.1)
        assert monitor.p99_s() < 0.05
        time.sleep(0.15)  # noqa: ASYNC251 - hold the loop on purpose, as a decode on it would
        await asyncio.sleep(0.05)
        assert monitor.lag.snapshot().count > 5
        assert monitor.p99_s() >= 0.1
    finally:
        await monitor.stop()


@pytest.mark.usefixtures("loopback_only")
async def test_metrics_export_loop_lag_tasks_and_workers_down():
    engine = tiny_engine()
    server = await start_server(engine)
    try:
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http, http.get(server.endpoint("/metrics")) as resp:
            text = await resp.text()
        assert 'lipsync_event_loop_lag_seconds_bucket{le="0.02"}' in text
        assert "lipsync_event_loop_lag_p99_seconds " in text
        assert "lipsync_asyncio_tasks " in text
        assert "lipsync_render_workers_down 0" in text
    finally:
        await server.stop()
        engine.close()


def test_video_out_is_composed_only_when_its_image_is_read(speech_16k):
    clock = ManualClock()
    session = LipSyncSession(FakeAvatar(), InlineRenderWorker(RecordingRenderer(), clock=ManualClock()),
                             EngineConfig(), clock=clock)
    frames = drive(session, clock, speech_16k, 2.0).frames
    rendered = [f for f in frames if f.state == RENDERED]
    assert rendered and all(f._image is None for f in frames)  # nothing pasted yet
    image = rendered[0].image
    assert rendered[0]._image is image and not image.flags.writeable
    assert (image != session.avatar.frames[rendered[0].avatar_index]).any()  # the mouth is on it


async def test_video_track_composites_and_converts_on_the_executor(speech_16k):
    clock = ManualClock()
    session = LipSyncSession(FakeAvatar(), InlineRenderWorker(RecordingRenderer(), clock=ManualClock()),
                             EngineConfig(), clock=clock)
    threads: set[str] = set()

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def next_video_frame(self):
            out = self.inner.next_video_frame()
            compose = out.compose

            def traced():
                threads.add(threading.current_thread().name)
                return compose()

            out.compose = traced
            return out

    pool = ThreadPoolExecutor(1, thread_name_prefix="frame-prep")
    track = AvatarVideoTrack(Recording(session), 25.0, MediaClock(), executor=pool)  # type: ignore[arg-type]
    try:
        for _ in range(3):
            frame = await track.recv()
            assert frame.format.name == "yuv420p"
        assert threads == {"frame-prep_0"}
    finally:
        track.stop()
        pool.shutdown()


def test_heap_settings_apply_on_glibc():
    if heap._LIBC is None:
        pytest.skip("not glibc: arenas and malloc_trim do not apply")
    assert heap.limit_arenas(2) is True
    assert heap.limit_arenas(0) is False  # 0 keeps the default: nothing set
    trimmer = heap.HeapTrimmer(min_interval_s=0.0)
    trimmer.request()
    trimmer.request()  # coalesced with the pending one
    deadline = time.monotonic() + 5
    while trimmer.trims < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert trimmer.trims == 1
    trimmer.close()


def test_the_default_executor_has_all_its_threads_before_any_work():
    """aiortc encodes every frame on the loop's default executor. ThreadPoolExecutor adds threads one by
    one as submissions find none idle, which a 30-minute soak saw as a thread leaked; the server's loop
    gets a MediaExecutor whose threads all exist from the start (as many as the cores the loop leaves),
    so work never changes the thread count."""
    def pool_threads() -> int:
        return sum(t.name.startswith("media-encode") for t in threading.enumerate())

    loop = asyncio.new_event_loop()
    try:
        pool = start_default_executor(loop)
        assert pool._max_workers == encoder_threads()
        size = pool._max_workers + OTHER_THREADS  # encoders, and the other work's own threads
        assert pool_threads() == size

        async def burst() -> None:
            await asyncio.gather(*[loop.run_in_executor(None, time.sleep, 0.005) for _ in range(3 * size + 4)])

        loop.run_until_complete(burst())
        assert pool_threads() == size
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    assert pool_threads() == 0
