"""Preparation on the render worker's own thread, in slices between live batches (issue #20 fixes 4 and 6).

Wall-clock runs with fake renderers (no model): short, with bounds far from the expected values
(the CPU is shared).
"""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
from test_engine import FakeAvatar, RecordingRenderer

from realtime.renderers.base import MouthRenderer
from realtime.scheduling.scheduler import RenderJob, RenderResult, ThreadedRenderWorker

WORKER = "render-test"


class ThreadRecorder(RecordingRenderer):
    """Records the thread of every prepare and render call, and the warm-up context's use."""

    def __init__(self) -> None:
        super().__init__()
        self.prepare_threads: list[str] = []
        self.render_threads: list[str] = []
        self.in_warmup_context = False
        self.renders_in_context = 0

    def prepare(self, avatar) -> None:
        self.prepare_threads.append(threading.current_thread().name)

    def render(self, avatar, frame_indices, mels):
        self.render_threads.append(threading.current_thread().name)
        self.renders_in_context += self.in_warmup_context
        return super().render(avatar, frame_indices, mels)

    @contextlib.contextmanager
    def warmup_context(self):
        self.in_warmup_context = True
        try:
            yield
        finally:
            self.in_warmup_context = False


class SlicedPrepare(RecordingRenderer):
    """prepare_steps: `slices` slices of `slice_s` seconds each (a slow prepare, e.g. a GPU capture)."""

    def __init__(self, slices: int, slice_s: float) -> None:
        super().__init__()
        self.slices, self.slice_s = slices, slice_s
        self.step_threads: set[str] = set()

    def prepare_steps(self, avatar):
        for _ in range(self.slices):
            self.step_threads.add(threading.current_thread().name)
            time.sleep(self.slice_s)
            yield

    def render(self, avatar, frame_indices, mels):
        time.sleep(0.003)
        return super().render(avatar, frame_indices, mels)


class MonolithicPrepare(SlicedPrepare):
    """The same slow prepare in one piece (no prepare_steps): what the slices avoid."""

    prepare_steps = MouthRenderer.prepare_steps  # the base's: `prepare` in one piece

    def prepare(self, avatar) -> None:
        time.sleep(self.slices * self.slice_s)


def test_prepare_and_warmup_run_on_the_worker_thread():
    """Fix 4: the renderer's prepare and every warm-up render run on the worker's thread (cuDNN caches
    plans per thread), the warm-up renders inside the renderer's warm-up context (cuDNN autotuning)."""
    renderer = ThreadRecorder()
    worker = ThreadedRenderWorker(renderer, max_batch=8, name=WORKER)
    try:
        worker.prepare(FakeAvatar(), warmup=True)
        assert renderer.prepare_threads == [WORKER]
        assert renderer.render_threads and set(renderer.render_threads) == {WORKER}
        assert renderer.renders_in_context == len(renderer.render_threads)
        assert sorted(worker.cost.by_size) == [1, 2, 4, 8]
        assert not renderer.in_warmup_context
    finally:
        worker.close()


def test_call_runs_on_the_worker_thread_and_hands_back_result_and_errors():
    worker = ThreadedRenderWorker(RecordingRenderer(), name=WORKER)
    try:
        assert worker.call(lambda: threading.current_thread().name) == WORKER

        def broken() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            worker.call(broken)
        assert worker.call(lambda: 42) == 42  # the worker survives a failed task
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.call(lambda: None)


def test_sliced_prepare_runs_every_slice_on_the_worker_thread():
    renderer = SlicedPrepare(slices=5, slice_s=0.001)
    worker = ThreadedRenderWorker(renderer, name=WORKER)
    try:
        worker.prepare(FakeAvatar(), warmup=False)
        assert renderer.step_threads == {WORKER}
    finally:
        worker.close()


def serve_while_preparing(renderer: RecordingRenderer,
                          seconds: float = 1.6) -> tuple[float, list[tuple[RenderResult, float]], int, int]:
    """Avatar A served (a job every 40 ms, 250 ms deadline) while avatar B prepares on the same worker.
    Returns (B's prepare seconds, A's results during it with their submission times, jobs submitted
    during it, frames skipped)."""
    worker = ThreadedRenderWorker(renderer, max_batch=4, name=WORKER)
    served, other = FakeAvatar(), FakeAvatar()
    results: list[RenderResult] = []
    lock = threading.Lock()

    def deliver(result: RenderResult) -> None:
        with lock:
            results.append(result)

    try:
        worker.prepare(served, warmup=True)
        window: dict[str, float] = {}

        def prepare_other() -> None:
            window["start"] = time.monotonic()
            worker.prepare(other, warmup=False)
            window["end"] = time.monotonic()

        preparer = threading.Thread(target=prepare_other)
        t0 = time.monotonic()
        submitted_at: list[float] = []
        k = 0
        while time.monotonic() - t0 < seconds:
            now = time.monotonic()
            if k == 3:
                preparer.start()
            worker.submit(RenderJob(owner=served, key=k, avatar=served, avatar_index=0,
                                    mel=np.zeros((80, 16), np.float32), deadline=now + 0.25, ready_at=now,
                                    deliver=deliver))
            submitted_at.append(now)
            k += 1
            time.sleep(max(0.0, t0 + 0.04 * k - time.monotonic()))
        preparer.join(timeout=10)
        time.sleep(0.3)  # the last jobs' deadlines
        start, end = window["start"], window["end"]
        during = [(r, submitted_at[r.key]) for r in results if start <= r.completed_at <= end]
        n_during = sum(1 for t in submitted_at if start <= t <= end - 0.25)
        return end - start, during, n_during, worker.frames_skipped
    finally:
        worker.close()


def test_a_running_worker_keeps_rendering_while_another_avatar_prepares():
    """Fix 6: a 1 s prepare in 50 ms slices; the served avatar's jobs keep their deadlines meanwhile."""
    prepare_s, during, n_during, skipped = serve_while_preparing(SlicedPrepare(slices=20, slice_s=0.05))
    assert prepare_s >= 1.0
    assert n_during >= 10 and len(during) >= n_during  # every job submitted in the window was rendered
    assert skipped == 0 and all(r.patch is not None for r, _ in during)
    latency = max(r.completed_at - submitted for r, submitted in during)
    assert latency < 0.15  # one 50 ms slice plus a render, not the 1 s prepare


def test_the_same_prepare_in_one_piece_would_stall_the_worker():
    """The control: without slices the worker renders nothing for the whole prepare (jobs are dropped),
    which is what the test above rules out."""
    prepare_s, during, n_during, skipped = serve_while_preparing(MonolithicPrepare(slices=20, slice_s=0.05))
    assert prepare_s >= 1.0 and n_during >= 10
    assert len(during) <= 2 and skipped >= n_during // 2
