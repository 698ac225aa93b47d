"""The loop's default executor (server/media/media_executor.py): audio encodes first, threads fixed, shutdown clean.

These also guard what it borrows from CPython's ThreadPoolExecutor (its workers read `_work_queue` with
`get`, shutdown writes None there and drains it with `get_nowait`) and the call shape of aiortc's sender
(`loop.run_in_executor(None, encoder.encode, frame, force_keyframe)`)."""
from __future__ import annotations

import asyncio
import threading

import pytest
from aiortc.codecs.g711 import PcmuEncoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder

from server.media.media_executor import OTHER_THREADS, MediaExecutor, encoder_threads, is_audio_encode, is_encode
from server.media.opus_encoder import RealtimeOpusEncoder


class _Recording:
    """An encoder whose encode records its tag instead of encoding (no codec is opened); a tag that is
    a callable is called (to block, or to raise)."""

    def __init__(self, order: list[str] | None = None) -> None:
        self.order = [] if order is None else order

    def encode(self, tag, force_keyframe: bool = False):
        if callable(tag):
            return tag()
        self.order.append(tag)
        return tag


class FakeOpus(_Recording, OpusEncoder):
    pass


class FakeVp8(_Recording, Vp8Encoder):
    pass


def pool_threads(prefix: str) -> int:
    return sum(t.name.startswith(prefix) for t in threading.enumerate())


def test_encoders_are_recognised_by_kind():
    assert is_audio_encode(RealtimeOpusEncoder().encode) and is_encode(RealtimeOpusEncoder().encode)
    assert is_audio_encode(PcmuEncoder().encode)
    assert is_encode(Vp8Encoder().encode) and not is_audio_encode(Vp8Encoder().encode)
    assert not is_encode(print) and not is_encode(threading.Event().wait)
    assert encoder_threads() >= 1


def test_an_audio_encode_overtakes_queued_video_work_through_run_in_executor():
    """One thread busy, four video frames queued, then an audio frame: the audio frame runs next, the
    video frames keep their order (one 8-session tick used to make each audio frame wait for all of them)."""
    order: list[str] = []
    gate = threading.Event()
    loop = asyncio.new_event_loop()
    pool = MediaExecutor(workers=1, name="test-media")
    loop.set_default_executor(pool)
    audio, video = FakeOpus(order), FakeVp8(order)

    async def scenario() -> list[str]:
        blocker = loop.run_in_executor(None, video.encode, gate.wait, False)
        await asyncio.sleep(0.05)  # the one encoder thread is now inside gate.wait
        jobs = [loop.run_in_executor(None, video.encode, f"v{i}", False) for i in range(4)]
        jobs.append(loop.run_in_executor(None, audio.encode, "a0", False))
        jobs.append(loop.run_in_executor(None, video.encode, "v4", False))
        gate.set()
        await blocker
        return list(await asyncio.gather(*jobs))

    try:
        results = loop.run_until_complete(scenario())
    finally:
        gate.set()
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    assert results == ["v0", "v1", "v2", "v3", "a0", "v4"]  # each caller gets its own result
    assert order == ["a0", "v0", "v1", "v2", "v3", "v4"]


def test_a_hanging_dns_lookup_never_holds_the_encoders():
    """aioice resolves STUN/TURN names with socket.gethostbyname on the default executor: work that is
    not an encode runs on its own threads, so encodes go on while all of those hang, and the other way."""
    gate = threading.Event()
    pool = MediaExecutor(workers=1, name="test-split")
    try:
        hung = [pool.submit(gate.wait) for _ in range(OTHER_THREADS + 1)]
        assert pool.submit(FakeVp8().encode, "v0", False).result(timeout=5) == "v0"
        assert pool.submit(FakeOpus().encode, "a0", False).result(timeout=5) == "a0"
        assert not any(f.done() for f in hung)
        gate.set()
        assert all(f.result(timeout=5) for f in hung)
        gate.clear()
        busy = pool.submit(FakeVp8().encode, gate.wait, False)   # the encoder thread hangs now
        assert pool.submit(sum, [2, 3]).result(timeout=5) == 5
        assert not busy.done()
    finally:
        gate.set()
        pool.shutdown(wait=True)


def test_every_thread_exists_before_any_work_and_shutdown_joins_them():
    pool = MediaExecutor(workers=3, name="test-threads")
    assert pool_threads("test-threads") == 3 + OTHER_THREADS
    encodes = [pool.submit(FakeVp8().encode, f"v{i}", False) for i in range(30)]
    others = [pool.submit(sum, [i, 1]) for i in range(30)]
    assert [f.result(timeout=5) for f in encodes] == [f"v{i}" for i in range(30)]
    assert [f.result(timeout=5) for f in others] == [i + 1 for i in range(30)]
    assert pool_threads("test-threads") == 3 + OTHER_THREADS
    pool.shutdown(wait=True)
    assert pool_threads("test-threads") == 0
    with pytest.raises(RuntimeError):
        pool.submit(FakeVp8().encode, "late", False)


def test_an_exception_reaches_its_caller_and_the_thread_goes_on():
    pool = MediaExecutor(workers=1, name="test-errors")
    try:
        with pytest.raises(ZeroDivisionError):
            pool.submit(FakeVp8().encode, lambda: 1 / 0, False).result(timeout=5)
        assert pool.submit(FakeVp8().encode, "v0", False).result(timeout=5) == "v0"
    finally:
        pool.shutdown(wait=True)


def test_shutdown_with_cancel_futures_cancels_what_is_still_queued():
    gate, started = threading.Event(), threading.Event()
    pool = MediaExecutor(workers=1, name="test-cancel")
    running = pool.submit(FakeVp8().encode, lambda: started.set() or gate.wait(), False)
    assert started.wait(5)
    queued = [pool.submit(FakeOpus().encode, f"a{i}", False) for i in range(5)]
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert running.result(timeout=5) is True
    assert all(f.cancelled() for f in queued)
    pool.shutdown(wait=True)
    assert pool_threads("test-cancel") == 0


def test_opencv_runs_in_the_calling_thread_with_the_same_results():
    """The server's frame work (mouth paste, BGR -> I420) gives the same bytes with OpenCV's pool off, and
    create_app turns it off for the whole process (server/media/media_executor.limit_native_threads)."""
    import cv2
    import numpy as np

    from realtime.renderers import compositor
    from realtime.renderers.base import MouthPatch
    from server.app import create_app
    from server.config import ServerConfig
    from server.media.media_executor import OPENCV_THREADS, limit_native_threads
    from server.media.tracks import video_frame
    from tests.server_helpers import tiny_engine

    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    mouth = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    before = cv2.getNumThreads()

    def work() -> tuple[np.ndarray, np.ndarray]:
        pasted = compositor.paste(frame, MouthPatch(image=mouth, box=(200, 300, 330, 420)))
        return pasted, video_frame(pasted).to_ndarray()

    try:
        cv2.setNumThreads(4)
        pooled = work()
        limit_native_threads()
        assert cv2.getNumThreads() == OPENCV_THREADS == 1
        alone = work()
        assert all(np.array_equal(a, b) for a, b in zip(pooled, alone, strict=True))
        cv2.setNumThreads(4)
        engine = tiny_engine()
        try:
            create_app(ServerConfig(host="127.0.0.1", port=0), engine)
            assert cv2.getNumThreads() == 1
        finally:
            engine.close()
    finally:
        cv2.setNumThreads(before)
