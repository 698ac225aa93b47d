"""Sessions end cleanly whatever way they end, and leave nothing behind (tasks, threads, peers)."""
from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import threading
import time

import aiohttp
import pytest
from server_helpers import Client, PcmTrack, start_server, tiny_engine

from server.media.media_executor import start_default_executor
from server.state import STATE

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("loopback_only")]


@pytest.fixture
async def engine():
    engine = tiny_engine()
    yield engine
    engine.close()


def record_peers(server) -> list:
    """Every server-side RTCPeerConnection, as sessions are added."""
    manager = server.app[STATE].sessions
    peers = []
    add = manager.add

    def recording_add(session, reservation):
        peers.append(session.pc)
        add(session, reservation)

    manager.add = recording_add
    return peers


async def settle(predicate, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


def own_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")}


def other_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


async def test_twenty_sessions_leave_nothing_behind(engine, speech_16k):
    # The loop's default executor as server/runner.py gives it (aiortc encodes there): a fixed pool, all its
    # threads started now, whatever the loop's own default pool would be (asyncio's, uvloop's).
    start_default_executor(asyncio.get_running_loop())
    server = await start_server(engine, max_sessions=5, max_sessions_per_ip=5)  # all from 127.0.0.1
    peers = record_peers(server)
    manager = server.app[STATE].sessions
    try:
        async with aiohttp.ClientSession() as http:  # warm up: codecs, executor threads
            warm = Client(server, http)
            await warm.connect()
            await warm.wait_for_video(3)
            await warm.close()
            assert await settle(lambda: len(manager) == 0)
        await asyncio.sleep(0.5)
        tasks_before = other_tasks()
        threads_before = own_threads()

        async def one(i: int, http: aiohttp.ClientSession) -> None:
            client = Client(server, http)
            mic = PcmTrack(speech_16k) if i % 2 else None
            await client.connect(microphone=mic)
            await client.wait_for_video(3)
            if i % 3 == 0:
                async with http.delete(client.url(), headers=client.auth) as resp:
                    assert resp.status == 200
            await client.close()  # the others end by the client hanging up

        async with aiohttp.ClientSession() as http:
            for batch in range(4):
                await asyncio.gather(*(one(5 * batch + i, http) for i in range(5)))
                assert await settle(lambda: len(manager) == 0), [s.describe() for s in manager]
        assert len(peers) == 21
        assert all(pc.connectionState == "closed" for pc in peers)
        assert manager.opened_total == 21
        # Hang-ups are "connection closed", never mistaken for a failed sender (its send loop ends first).
        assert set(manager.closed_total) <= {"deleted", "connection closed", "microphone ended"}, manager.closed_total
        assert await settle(lambda: not (other_tasks() - tasks_before), within_s=10)
        # Threads other than the loop's fixed executor pool (aiortc encodes there) are all gone.
        assert await settle(lambda: own_threads() <= threads_before), threading.enumerate()
    finally:
        await server.stop()


CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, sys, aiohttp
    import aioice.ice
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]

    async def main(url):
        pc = RTCPeerConnection(configuration=RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        frames = asyncio.Event()
        async def read(track):
            while True:
                await track.recv()
                frames.set()
        pc.on("track", lambda t: asyncio.ensure_future(read(t)))
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                answer = await r.json()
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await frames.wait()
        print(answer["session_id"], flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1]))
""")


async def test_vanished_client_is_reaped_within_seconds(engine):
    server = await start_server(engine, peer_timeout_s=3.0)
    manager = server.app[STATE].sessions
    peers = record_peers(server)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT_SCRIPT, server.url, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        session_id = line.decode().strip()
        assert manager.get(session_id).state == "connected"
        proc.kill()  # no goodbye: no DTLS close, no DELETE, no ICE failure for a while
        await proc.wait()
        killed = time.monotonic()
        assert await settle(lambda: len(manager) == 0, within_s=15)
        reaped_after = time.monotonic() - killed
        assert reaped_after < 8.0, reaped_after
        assert peers[0].connectionState == "closed"
        assert manager.closed_total.get("timeout", 0) + manager.closed_total.get("connection failed", 0) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.stop()


async def test_killed_client_is_reaped_within_5_s_by_default(engine):
    """Default settings: media inactivity (no RTP/RTCP for --peer-timeout 4 s), not ICE consent (~30 s)."""
    server = await start_server(engine)
    manager = server.app[STATE].sessions
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT_SCRIPT, server.url, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        session_id = line.decode().strip()
        assert manager.get(session_id).state == "connected"
        await asyncio.sleep(2.0)  # connected for a while: RTCP flowing, the watchdog has seen packets
        assert manager.get(session_id)
        proc.kill()
        await proc.wait()
        killed = time.monotonic()
        assert await settle(lambda: len(manager) == 0, within_s=15)
        reaped_after = time.monotonic() - killed
        assert reaped_after <= 5.0, reaped_after
        assert manager.closed_total == {"timeout": 1}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.stop()


async def test_peer_that_never_connects_is_reaped_after_10_s_by_default(engine):
    server = await start_server(engine)
    manager = server.app[STATE].sessions
    async with aiohttp.ClientSession() as http:
        client = Client(server, http)
        client.pc.addTransceiver("video", direction="recvonly")
        await client.pc.setLocalDescription(await client.pc.createOffer())
        async with http.post(server.endpoint("/offer"),
                             json={"sdp": client.pc.localDescription.sdp, "type": "offer"}) as resp:
            assert resp.status == 200
            session_id = (await resp.json())["session_id"]
        offered = time.monotonic()
        await client.pc.close()  # never connects: the slot must not be held past 10 s
        await asyncio.sleep(8.0)
        assert manager.get(session_id)
        assert await settle(lambda: len(manager) == 0, within_s=6)
        assert 9.0 <= time.monotonic() - offered <= 11.5
        assert manager.closed_total == {"timeout": 1}
    await server.stop()


async def test_peer_that_never_connects_is_reaped(engine):
    server = await start_server(engine, connect_timeout_s=1.5)
    manager = server.app[STATE].sessions
    async with aiohttp.ClientSession() as http:
        client = Client(server, http)
        client.pc.addTransceiver("video", direction="recvonly")
        await client.pc.setLocalDescription(await client.pc.createOffer())
        async with http.post(server.endpoint("/offer"),
                             json={"sdp": client.pc.localDescription.sdp, "type": "offer"}) as resp:
            assert resp.status == 200
            session_id = (await resp.json())["session_id"]
        await client.pc.close()  # the answer is never applied: the server's ICE never completes
        assert manager.get(session_id)
        assert await settle(lambda: len(manager) == 0, within_s=8)
        assert manager.closed_total == {"timeout": 1}
    await server.stop()


async def test_video_only_offer_still_runs_the_audio_clock(engine):
    server = await start_server(engine)
    async with aiohttp.ClientSession() as http:
        client = Client(server, http)
        await client.connect(audio=False)
        await client.wait_for_video(25)
        session = server.app[STATE].sessions.get(client.session_id)
        assert session.audio.stats.frames > 40  # drained at its pace: ~50 per second
        await client.close()
    await server.stop()


async def test_shutdown_closes_every_peer(engine):
    server = await start_server(engine)
    manager = server.app[STATE].sessions
    peers = record_peers(server)
    async with aiohttp.ClientSession() as http:
        clients = [Client(server, http) for _ in range(2)]
        for client in clients:
            await client.connect()
            await client.wait_for_video(3)
        ws = await http.ws_connect(clients[0].url("/stream", token=True))
        t0 = time.monotonic()
        await server.stop()
        assert time.monotonic() - t0 < 5.0
        assert len(manager) == 0 and all(pc.connectionState == "closed" for pc in peers)
        assert manager.closed_total == {"shutdown": 2}
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        for client in clients:
            await client.close()


def self_signed(tmp_path) -> tuple:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_runner_serves_https_and_stops_gracefully(engine, tmp_path):
    from server.config import ServerConfig
    from server.runner import serve_async

    cert_file, key_file = self_signed(tmp_path)
    config = ServerConfig(port=0, cert_file=cert_file, key_file=key_file,
                          ice_host_addresses=["127.0.0.1"])
    started = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_async(config, engine, started=started, stop=stop))
    port = await asyncio.wait_for(started, timeout=10)
    assert config.url == f"https://127.0.0.1:{port}/"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{port}/healthz", ssl=False) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
    stop.set()
    await asyncio.wait_for(task, timeout=10)


async def test_engine_failure_ends_only_that_session(engine):
    server = await start_server(engine)
    manager = server.app[STATE].sessions
    open_session = engine.open_session
    opened = []

    def open_and_break_the_first(options, name=""):
        session = open_session(options, name)
        if not opened:
            def broken():
                raise RuntimeError("boom")
            session.next_video_frame = broken
        opened.append(session)
        return session

    engine.open_session = open_and_break_the_first
    try:
        async with aiohttp.ClientSession() as http:
            bad = Client(server, http)
            await bad.connect()
            good = Client(server, http)
            await good.connect()
            await good.wait_for_video(10)
            assert await settle(lambda: len(manager) == 1)
            assert manager.get(good.session_id)
            assert manager.closed_total == {"error": 1}
            n = len(good.received.video)
            await asyncio.sleep(0.5)
            assert len(good.received.video) > n + 5
            await bad.close()
            await good.close()
    finally:
        del engine.open_session
        await server.stop()
