"""Faults: each one is contained. A renderer batch that raises, a render thread that dies, a client that
stops sending mid-utterance or sends garbage, an encoder that raises, SIGTERM with sessions open."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from server_helpers import Client, LoudnessRenderer, PcmTrack, TinyAvatar, mouth_level, start_server
from test_engine import FakeAvatar, RecordingRenderer, drive

from realtime.config import EngineConfig
from realtime.scheduling.scheduler import InlineRenderWorker, RenderJob, ThreadedRenderWorker
from realtime.scheduling.supervised_thread import RestartBackoff
from realtime.timeline.clock import ManualClock
from realtime.timeline.session import HELD, RENDERED, LipSyncSession
from server.realtime_engine import RealtimeEngine
from server.sessions import received_packets
from server.state import STATE

ROOT = Path(__file__).resolve().parents[1]


def sid(client: Client) -> str:
    assert client.session_id is not None
    return client.session_id


async def settle(predicate, limit_s: float = 10.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


# -- the renderer raises for one batch ---------------------------------------------------------------


class FailsOnce(RecordingRenderer):
    """Raises on its `fail_at`-th call (counting from 1), renders normally otherwise."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.failed_keys: list[int] = []

    def render(self, avatar, frame_indices, mels):
        if self.calls + 1 == self.fail_at:
            self.calls += 1
            raise RuntimeError("renderer failure for one batch")
        return super().render(avatar, frame_indices, mels)


def test_one_failing_batch_is_held_and_the_session_goes_on(speech_16k):
    clock, render_clock = ManualClock(), ManualClock()
    renderer = FailsOnce(fail_at=10)
    worker = InlineRenderWorker(renderer, clock=render_clock)
    session = LipSyncSession(FakeAvatar(), worker, EngineConfig(), clock=clock)
    frames = drive(session, clock, speech_16k, 3.5).frames
    assert worker.errors == 1
    rendered = [i for i, f in enumerate(frames) if f.state == RENDERED]
    dropped = [i for i, f in enumerate(frames) if f.dropped]
    assert len(dropped) >= 1, "the failed batch's frames were not reported dropped"
    # Each frame of the failed batch re-shows the last mouth (held), and the session renders again after.
    assert all(frames[i].state == HELD for i in dropped)
    assert any(i > max(dropped) for i in rendered)
    assert session.metrics().frames_dropped == len(dropped)


# -- the render thread dies --------------------------------------------------------------------------


class ThreadKiller(BaseException):
    """Escapes the per-batch `except Exception` of the worker, as a native crash surfacing in Python would."""


class KillableRenderer(LoudnessRenderer):
    def __init__(self) -> None:
        self.kill_next = False
        self.calls = 0

    def render(self, avatar, frame_indices, mels):
        self.calls += 1
        if self.kill_next:
            self.kill_next = False
            raise ThreadKiller("render thread killed")
        return super().render(avatar, frame_indices, mels)


def _job(owner, key, avatar, deadline, results):
    return RenderJob(owner=owner, key=key, avatar=avatar, avatar_index=key % len(avatar),
                     mel=np.zeros((80, 16), np.float32), deadline=deadline, ready_at=time.monotonic(),
                     deliver=results.append)


def test_dead_render_thread_is_restarted_and_keeps_its_queue():
    renderer = KillableRenderer()
    worker = ThreadedRenderWorker(renderer, max_batch=1, restart_backoff=RestartBackoff((0.5,)))
    avatar = TinyAvatar()
    results: list = []
    try:
        renderer.kill_next = True
        worker.submit(_job("a", 0, avatar, time.monotonic() + 10, results))
        deadline = time.monotonic() + 5
        while worker.healthy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not worker.healthy and worker.thread.down_since is not None
        # Jobs submitted while the thread is down are kept and rendered once it is back.
        worker.submit(_job("a", 1, avatar, time.monotonic() + 10, results))
        while not worker.healthy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.healthy and worker.restarts == 1
        while len(results) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.key for r in results] == [1] and results[0].patch is not None
        assert worker.stats().restarts == 1 and worker.stats().alive is True
    finally:
        worker.close()
    assert not worker.healthy


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("loopback_only")
async def test_render_thread_death_degrades_healthz_until_restarted(speech_16k):
    renderer = KillableRenderer()
    engine = RealtimeEngine(TinyAvatar(), renderer, info={"avatar": "tiny", "device": "cpu"})
    engine.worker.thread.backoff = RestartBackoff((1.5,))
    server = await start_server(engine)
    manager = server.app[STATE].sessions
    try:
        async with aiohttp.ClientSession() as http:
            looping = np.tile(speech_16k, 6)
            client = Client(server, http)
            await client.connect(microphone=PcmTrack(looping))
            await client.wait_for_video(25)
            async with http.get(server.endpoint("/healthz")) as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
            session = manager.get(sid(client))
            before = session.engine.metrics()
            renderer.kill_next = True
            assert await settle(lambda: not engine.worker.healthy, 10)
            async with http.get(server.endpoint("/healthz")) as resp:
                body = await resp.json()
                assert resp.status == 503 and body["status"] == "degraded", body
                assert body["render_workers_down"] == ["0:cpu"]
            async with http.get(server.endpoint("/metrics")) as resp:
                assert "lipsync_render_workers_down 1" in await resp.text()
            down_frames = len(client.received.video)
            assert await settle(lambda: engine.worker.healthy, 10)
            async with http.get(server.endpoint("/healthz")) as resp:
                body = await resp.json()
                assert resp.status == 200 and body["status"] == "ok" and body["render_worker_restarts"] == 1
            await asyncio.sleep(2.0)
            after = session.engine.metrics()
            # The session survived, kept sending frames while the thread was down (held / idle mouths),
            # and renders fresh mouths again after the restart.
            assert manager.get(sid(client)) is session and session.state == "connected"
            assert len(client.received.video) > down_frames + 30
            assert after.frames_rendered > before.frames_rendered + 10
            assert after.frames_held + after.frames_idle > before.frames_held + before.frames_idle
            await client.close()
    finally:
        await server.stop()
        engine.close()


# -- clients misbehaving -----------------------------------------------------------------------------


class StopsMidUtterance(PcmTrack):
    """A microphone that sends `stop_after_s` of speech, then nothing at all (no RTP), without hanging up."""

    def __init__(self, samples: np.ndarray, stop_after_s: float) -> None:
        super().__init__(samples)
        self._stop_after = int(stop_after_s * 16000)

    async def recv(self):
        if self._pos >= self._stop_after:
            await asyncio.Event().wait()  # silent forever: no frame, no end
        return await super().recv()


@pytest.fixture
async def engine():
    engine = RealtimeEngine(TinyAvatar(), LoudnessRenderer(), info={"avatar": "tiny", "device": "cpu"})
    yield engine
    engine.close()


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("loopback_only")
async def test_client_that_stops_sending_mid_utterance_goes_idle_and_stays(engine, speech_16k):
    server = await start_server(engine)
    manager = server.app[STATE].sessions
    try:
        async with aiohttp.ClientSession() as http:
            client = Client(server, http)
            await client.connect(microphone=StopsMidUtterance(np.tile(speech_16k, 3), stop_after_s=1.5))
            await client.wait_for_video(25)
            session = manager.get(sid(client))
            # Longer than the peer timeout: RTCP still flows, so the peer is not reaped, and the mouth
            # goes back to rest instead of freezing open; the video keeps its rate.
            await asyncio.sleep(manager.peer_timeout_s + 2.0)
            assert manager.get(sid(client)) is session
            n = len(client.received.video)
            await asyncio.sleep(1.0)
            recent = client.received.video[n:]
            assert len(recent) >= 20
            assert all(abs(mouth_level(image) - 90) < 3 for _, _, image in recent[-5:])
            m = session.engine.metrics()
            assert m.frames_rendered > 0 and m.stalls >= 1
            await client.close()
    finally:
        await server.stop()


def server_candidate_port(answer_sdp: str) -> int:
    match = re.search(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 (\d+) typ host", answer_sdp)
    assert match, answer_sdp
    return int(match.group(1))


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("loopback_only")
async def test_garbage_rtp_is_ignored(engine, caplog):
    server = await start_server(engine)
    manager = server.app[STATE].sessions
    rng = random.Random(7)
    try:
        async with aiohttp.ClientSession() as http:
            target, bystander = Client(server, http), Client(server, http)
            await target.connect()
            await bystander.connect()
            await target.wait_for_video(10)
            await bystander.wait_for_video(10)
            session = manager.get(sid(target))
            port = server_candidate_port(target.answer["sdp"])
            packets_before = await received_packets(session.pc)
            caplog.set_level(logging.ERROR)
            n_garbage = 600
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for i in range(n_garbage):
                    first = rng.choice([0x80, 0x90, 0xBF, 22, 23, 0x00, 0x01])  # RTP/RTCP, DTLS, STUN-ish
                    body = bytes([first]) + rng.randbytes(rng.randint(1, 400))
                    sock.sendto(body, ("127.0.0.1", port))
                    if i % 50 == 0:
                        await asyncio.sleep(0.01)
            # The datagrams reached the session's transport (counted there), and nothing broke.
            await asyncio.sleep(1.0)
            packets_after = await received_packets(session.pc)
            assert packets_after - packets_before >= n_garbage * 0.9, (packets_before, packets_after)
            n_target, n_bystander = len(target.received.video), len(bystander.received.video)
            await asyncio.sleep(1.0)
            assert len(target.received.video) >= n_target + 15
            assert len(bystander.received.video) >= n_bystander + 15
            assert session.state == "connected" and len(manager) == 2
            async with http.get(server.endpoint("/healthz")) as resp:
                assert resp.status == 200
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            await target.close()
            await bystander.close()
    finally:
        await server.stop()


# -- the encoder raises --------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("loopback_only")
async def test_encoder_failure_ends_only_that_session(engine, monkeypatch):
    import aiortc.rtcrtpsender

    from server.media import encoders

    server = await start_server(engine)  # installs the real-time encoders
    manager = server.app[STATE].sessions
    made: list = []

    class BrokenVp8(encoders.RealtimeVp8Encoder):
        frames = 0

        def encode(self, frame, force_keyframe=False):
            self.frames += 1
            if self.frames > 10:
                raise RuntimeError("encoder failure")
            return super().encode(frame, force_keyframe)

    def first_video_encoder_breaks(codec):
        if codec.mimeType.lower() == "video/vp8" and not made:
            made.append(codec)
            return BrokenVp8()
        return encoders.get_encoder(codec)

    monkeypatch.setattr(aiortc.rtcrtpsender, "get_encoder", first_video_encoder_breaks)
    try:
        async with aiohttp.ClientSession() as http:
            bad = Client(server, http)
            await bad.connect()
            await bad.wait_for_video(5)
            good = Client(server, http)
            await good.connect()
            await good.wait_for_video(10)
            assert await settle(lambda: len(manager) == 1, 10)
            assert manager.get(sid(good))
            assert manager.closed_total == {"error": 1}
            n = len(good.received.video)
            await asyncio.sleep(1.0)
            assert len(good.received.video) >= n + 15
            await bad.close()
            await good.close()
    finally:
        await server.stop()


# -- SIGTERM with sessions open ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(port: int, log_path: Path) -> subprocess.Popen:
    """`python -m server` (the no-weights renderer) on 127.0.0.1:port, its output into log_path. One process
    (its log says what it closed), and `--drain-s 0`: SIGTERM ends live sessions at once (the drain that
    lets them run on first is tests/test_drain.py's)."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
             "--ice-host-addresses", "127.0.0.1", "--log-level", "info", "--workers", "1", "--drain-s", "0"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])})


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("loopback_only")
async def test_sigterm_closes_sessions_gracefully_and_exits_0(tmp_path):
    port = _free_port()
    log_path = tmp_path / "server.log"
    proc = spawn_server(port, log_path)
    try:
        url = f"http://127.0.0.1:{port}/"

        class Remote:
            def endpoint(self, path: str) -> str:
                return url.rstrip("/") + path

        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    async with http.get(url + "healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the server did not start"
                await asyncio.sleep(0.3)
            clients = [Client(Remote(), http) for _ in range(2)]  # type: ignore[arg-type]
            for client in clients:
                await client.connect()
            for client in clients:
                await client.wait_for_video(10)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 10)
            took = time.monotonic() - t0
            assert proc.returncode == 0, log_path.read_text()
            assert took < 5.0, took
            # Both peers were closed by the server (DTLS close: the clients see the connection end).
            assert await settle(lambda: all(c.pc.connectionState == "closed" for c in clients), 10)
            for client in clients:
                await client.close()
        text = log_path.read_text()
        assert "drained: ending 2 session(s)" in text and "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
