"""One render worker per device: RealtimeEngine places each new session on the least-loaded worker.

Runs on the CPU with two workers labelled "cpu" (cheap fake renderers, or the no-weights renderer through
`--device cpu,cpu`); the server part only talks to 127.0.0.1.
"""
from __future__ import annotations

import gc
import re
import time

import numpy as np
import pytest
from server_helpers import LoudnessRenderer, TinyAvatar, start_server

from models.checkpoints import CheckpointError
from realtime.metrics import WorkerStats
from realtime.timeline.session_options import SessionOptions
from server.config import ServerConfig, device_list
from server.realtime_engine import RealtimeEngine, gpu_curve_sizes, torch_devices


def named_renderer(name: str) -> LoudnessRenderer:
    renderer = LoudnessRenderer()
    renderer.name = name  # sessions report their worker's renderer name: that shows the placement
    return renderer


@pytest.fixture
def engine():
    engine = RealtimeEngine(TinyAvatar(), [named_renderer("r0"), named_renderer("r1")],
                            devices=["cpu", "cpu"], info={"avatar": "tiny"})
    yield engine
    engine.close()


def placement(session) -> str:
    return session.metrics().renderer


def test_sessions_spread_and_closing_frees_a_slot(engine):
    assert len(engine.workers) == 2 and engine.worker is engine.workers[0]
    assert engine.info["workers"] == "2"
    sessions = [engine.open_session(SessionOptions(), name=f"s{i}") for i in range(5)]
    assert [placement(s) for s in sessions] == ["r0", "r1", "r0", "r1", "r0"]
    assert engine.sessions_per_worker() == [3, 2]
    sessions[1].close()                                   # a session of worker 1 ends
    sessions[1].close()                                   # closing twice is harmless
    assert engine.sessions_per_worker() == [3, 1]
    s5 = engine.open_session(SessionOptions(), name="s5")
    assert placement(s5) == "r1"                          # takes the freed slot
    for s in sessions[::2]:
        s.close()
    assert engine.sessions_per_worker() == [0, 2]
    newer = [engine.open_session(SessionOptions(), name=f"t{i}") for i in range(3)]
    # the emptier worker fills first; a tie goes to the first worker
    assert [placement(s) for s in newer] == ["r0", "r0", "r0"]
    assert engine.sessions_per_worker() == [3, 2]


def test_a_session_dropped_without_close_frees_its_slot(engine):
    session = engine.open_session(SessionOptions())
    assert engine.sessions_per_worker() == [1, 0]
    del session
    gc.collect()
    assert engine.sessions_per_worker() == [0, 0]


def test_metrics_report_totals_and_each_worker(engine):
    a, b = engine.open_session(SessionOptions()), engine.open_session(SessionOptions())
    speech = (0.3 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    deadline = time.monotonic() + 10.0   # generous: only "both workers rendered", never a rate
    while time.monotonic() < deadline:
        loads = engine.metrics().workers
        if all(w.stats.frames_rendered > 0 for w in loads):
            break
        for s in (a, b):
            s.push_audio(speech[:320], 16000)
            s.next_audio(320)
            s.next_video_frame()
        time.sleep(0.02)
    m = engine.metrics()
    assert [(w.worker, w.device, w.sessions, w.stats.renderer) for w in m.workers] == [
        (0, "cpu", 1, "r0"), (1, "cpu", 1, "r1")]
    assert all(w.stats.frames_rendered > 0 for w in m.workers)
    assert m.sessions == 2
    for key in ("batches", "frames_rendered", "frames_skipped", "errors", "busy_s"):
        assert getattr(m.total, key) == pytest.approx(sum(getattr(w.stats, key) for w in m.workers))
    assert m.total.mean_batch == pytest.approx(m.total.frames_rendered / m.total.batches)


def test_one_worker_totals_equal_its_own_stats():
    engine = RealtimeEngine(TinyAvatar(), LoudnessRenderer())
    try:
        m = engine.metrics()
        stats = engine.worker.stats()
        assert m.total == stats
        assert len(m.workers) == 1 and m.workers[0].device == "cpu" and m.workers[0].stats == stats
    finally:
        engine.close()
    assert WorkerStats.combined([]).mean_batch == 0.0


async def test_metrics_page_has_a_series_per_worker(engine, http, loopback_only):
    sessions = [engine.open_session(SessionOptions()) for _ in range(3)]
    server = await start_server(engine)
    try:
        async with http.get(server.endpoint("/metrics")) as resp:
            text = await resp.text()
    finally:
        await server.stop()
    assert 'lipsync_worker_sessions{worker="0",device="cpu"} 2' in text
    assert 'lipsync_worker_sessions{worker="1",device="cpu"} 1' in text
    assert 'lipsync_worker_batches_total{worker="1",device="cpu"}' in text
    assert re.search(r"^lipsync_render_batches_total \d+", text, re.M)  # the unlabelled totals stay
    # Each worker family's samples are contiguous (one group per family, as the text format requires).
    names = [line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line.startswith("lipsync_worker_")]
    groups = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    assert len(groups) == len(set(groups))
    for s in sessions:
        s.close()


def test_device_list_flag():
    assert device_list("auto") == ["auto"]
    assert device_list("cuda:0,cuda:1") == ["cuda:0", "cuda:1"]
    assert device_list("cpu, cpu") == ["cpu", "cpu"]
    for bad, match in (("gpu", "expected"), ("cuda:0,cuda:0", "twice"), ("auto,cpu", "combined"),
                       ("cuda:all,cuda:1", "combined"), ("", "empty")):
        with pytest.raises(ValueError, match=match):
            device_list(bad)
    with pytest.raises(ValueError, match="--device"):
        ServerConfig(device="cuda:x").validate()
    assert torch_devices(["cpu", "cpu"])[1].type == "cpu"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA"):
            torch_devices(["cuda:all"])


def test_gpu_curve_sizes():
    assert gpu_curve_sizes(128) == (2, 4, 8, 16, 32, 64, 128)
    assert gpu_curve_sizes(100) == (2, 4, 8, 16, 32, 64, 100)
    assert gpu_curve_sizes(1) == ()


@pytest.mark.slow
def test_load_gives_the_no_weights_renderer_a_worker_per_cpu_entry():
    engine = RealtimeEngine.load(ServerConfig(device="cpu,cpu"))
    try:
        assert engine.devices == ["cpu", "cpu"] and engine.info["device"] == "cpu,cpu"
        assert engine.workers[0].renderer is engine.workers[1].renderer  # thread-safe: one instance
        a, b = engine.open_session(SessionOptions()), engine.open_session(SessionOptions())
        assert engine.sessions_per_worker() == [1, 1]
        a.close()
        b.close()
    finally:
        engine.close()
    single = RealtimeEngine.load(ServerConfig())
    try:
        assert len(single.workers) == 1 and single.info["device"] == "cpu"
    finally:
        single.close()
