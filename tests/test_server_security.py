"""Issue #12: each attack on a public deployment, reproduced against the in-process server and refused
with its status code, a JSON error, no 500 and no traceback in the log (the `clean_log` fixture).

Loopback only: the server and every client live on 127.0.0.1 (the loopback_only fixture).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from server_helpers import Client, start_server, tiny_engine

from bench.common import wav_bytes
from server.access.auth import Access, OperatorAuth, access_for, redact_query
from server.access.limits import ClientLimits, PoolBusy, WorkPool
from server.config import IceServer, ServerConfig
from server.errors import ApiError
from server.routes.signaling import OfferOptions
from server.routes.uploads import decode_upload, sniff_container
from server.state import STATE

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("loopback_only")]

OPERATOR = "operator-token-for-tests-0123456789"
EVIL = "https://evil.example"


@pytest.fixture
def clean_log(clean_log: list[str]) -> list[str]:
    """conftest's clean log, with the operator token among the secrets."""
    clean_log.append(OPERATOR)
    return clean_log


@pytest.fixture
async def engine():
    engine = tiny_engine()
    yield engine
    engine.close()


@pytest.fixture
def server_engine(engine):
    return engine  # the module's engine (it closes it)


@pytest.fixture
def server_settings(clean_log) -> dict:  # clean_log checks the log after the server has stopped
    return {"max_sessions": 4, "api_token": OPERATOR, "max_sessions_per_ip": 4}


async def connected(server, http, clean_log) -> Client:
    client = Client(server, http)
    await client.connect()
    clean_log.append(client.token)
    # Connected before the test goes on: a peer connection closed halfway through ICE leaves an aiortc
    # task whose "exception was never retrieved" would land in a later test's log (reaping owns that).
    await client.wait_for_video(1)
    return client


async def settle(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll `condition` until true or timeout (the server finishes closing in its own tasks)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def expect_error(resp: aiohttp.ClientResponse, status: int, *words: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["status"] == status and body["error"]
    for word in words:
        assert word.lower() in body["error"].lower(), body
    return body


def silent_wav(seconds: float, rate: int, channels: int = 1) -> bytes:
    return wav_bytes(np.zeros(int(seconds * rate) * channels, np.int16), rate, channels)


# -- 1. two secrets --------------------------------------------------------------------------------


async def test_session_routes_need_their_own_token(server, http, clean_log):
    alice = await connected(server, http, clean_log)
    mallory = await connected(server, http, clean_log)
    assert alice.token and alice.token != mallory.token and len(alice.token) >= 40
    routes = [("GET", ""), ("POST", "/audio?rate=16000"), ("POST", "/interrupt"), ("DELETE", "")]
    for method, path in routes:
        async with http.request(method, alice.url() + path, data=b"\x00\x00") as resp:
            await expect_error(resp, 401, "session_token")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.request(method, alice.url() + path, data=b"\x00\x00", headers=mallory.auth) as resp:
            await expect_error(resp, 403)
    async with http.post(alice.url("/say"), json={"text": "hi"}, headers=mallory.auth) as resp:
        await expect_error(resp, 403)
    async with http.get(alice.url(), headers=alice.auth) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == alice.session_id
    # ?token= only on the WebSocket and EventSource routes (they cannot set headers), never elsewhere
    # (issue #25: a URL ends up in proxy logs), never for a POST.
    async with http.get(alice.url(token=True)) as resp:
        await expect_error(resp, 401, "session_token")
    async with http.post(alice.url("/interrupt", token=True)) as resp:
        await expect_error(resp, 401)
    async with http.ws_connect(alice.url("/stream", token=True)) as ws:
        await ws.send_str('{"type": "status"}')
        assert (await ws.receive_json(timeout=5))["type"] == "status"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(alice.url("/stream"))
    assert refused.value.status == 401
    # The operator token opens any session's routes.
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    async with http.post(alice.url("/interrupt"), headers=operator) as resp:
        assert resp.status == 200
    async with http.delete(mallory.url(), headers=mallory.auth) as resp:
        assert resp.status == 200
    await alice.close()
    await mallory.close()


async def test_operator_routes_need_the_operator_token(server, http, clean_log):
    client = await connected(server, http, clean_log)
    for path in ("/sessions", "/metrics"):
        async with http.get(server.endpoint(path)) as resp:
            await expect_error(resp, 401, "operator")
        async with http.get(server.endpoint(path), headers=client.auth) as resp:  # a session's token
            await expect_error(resp, 403)
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    async with http.get(server.endpoint("/sessions"), headers=operator) as resp:
        listing = await resp.text()
        assert resp.status == 200 and client.session_id in listing
    assert client.token not in listing and OPERATOR not in listing  # tokens are never listed
    async with http.get(server.endpoint("/metrics"), headers=operator) as resp:
        metrics = await resp.text()
    assert client.session_id not in metrics and client.token not in metrics and "session=" not in metrics
    for path in ("/healthz", "/config", "/"):  # public
        async with http.get(server.endpoint(path)) as resp:
            assert resp.status == 200
    await client.close()


def test_the_policy_covers_routes_added_later():
    assert access_for("GET", "/sessions/{id}/events") is Access.SESSION  # chat's SSE
    assert access_for("GET", "/sessions/{id}") is Access.SESSION
    assert access_for("GET", "/sessions") is Access.OPERATOR
    assert access_for("GET", "/avatars") is Access.PUBLIC and access_for("HEAD", "/avatars") is Access.PUBLIC
    assert access_for("POST", "/avatars") is Access.OPERATOR
    assert access_for("DELETE", "/avatars/{id}") is Access.OPERATOR
    assert access_for("GET", "/something-new") is Access.OPERATOR  # fails closed
    assert access_for("POST", "/offer") is Access.PUBLIC


def test_operator_token_is_generated_beyond_loopback(caplog, capsys):
    from server.runner import announce_operator_token

    assert OperatorAuth.from_config(ServerConfig(host="127.0.0.1")).token is None
    assert OperatorAuth.from_config(ServerConfig(host="::1")).token is None
    given = OperatorAuth.from_config(ServerConfig(host="0.0.0.0", api_token=OPERATOR))
    assert given.token == OPERATOR and not given.generated
    made = OperatorAuth.from_config(ServerConfig(host="0.0.0.0"))
    assert made.generated and made.token and len(made.token) >= 40
    caplog.set_level(logging.INFO)
    config = ServerConfig(host="0.0.0.0")
    announce_operator_token(made, config)
    assert capsys.readouterr().out.count(made.token) == 2  # printed once (the line and its usage)
    assert all(made.token not in r.getMessage() for r in caplog.records)  # never logged
    with caplog.at_level(logging.WARNING):
        open_ = OperatorAuth.from_config(ServerConfig(host="0.0.0.0", no_auth=True))
    assert open_.token is None and any("--no-auth" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="contradict"):
        ServerConfig(api_token=OPERATOR, no_auth=True).validate()


async def test_secrets_stay_out_of_the_access_log(engine, caplog):
    from server.runner import serve_async

    assert redact_query("rate=16000&token=abc&x=1") == "rate=16000&token=REDACTED&x=1"
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    config = ServerConfig(port=0, ice_host_addresses=["127.0.0.1"])
    started = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_async(config, engine, started=started, stop=stop))
    port = await asyncio.wait_for(started, timeout=10)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/sessions/x/events?token=sekrit-value") as resp:
            assert resp.status == 404  # the EventSource route reads ?token= (then finds no session x)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any("/sessions/x/events?token=REDACTED" in line for line in lines), lines
    assert not any("sekrit" in line for line in lines)


# -- 2. cross-site ---------------------------------------------------------------------------------


async def test_cross_site_requests_are_refused(engine, http, clean_log):
    server = await start_server(engine, allowed_origins=["https://app.example.org"])
    try:
        client = await connected(server, http, clean_log)
        say = client.url("/say")
        # The attack: a page on another site posts text/plain (no CORS preflight) to the session.
        headers = {"Origin": EVIL, "Content-Type": "text/plain", **client.auth}
        async with http.post(say, data='{"text": "pwned"}', headers=headers) as resp:
            await expect_error(resp, 403, "cross-origin")
        async with http.post(say, data='{"text": "hi"}',
                             headers={"Content-Type": "text/plain", **client.auth}) as resp:
            await expect_error(resp, 415, "application/json")
        async with http.post(server.endpoint("/offer"), data="{}", headers={"Origin": EVIL}) as resp:
            await expect_error(resp, 403)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(client.url("/stream", token=True), origin=EVIL)
        assert refused.value.status == 403
        # DNS rebinding: evil.example resolving to 127.0.0.1 sends Host: evil.example.
        for host in ("evil.example", "[::1", "127.0.0.1.evil.example", ""):
            async with http.get(server.endpoint("/config"), headers={"Host": host}) as resp:
                await expect_error(resp, 403, "loopback")
        for origin in ("null", "http://[::1", "file://", "https://127.0.0.1.evil.example"):
            async with http.post(client.url("/interrupt"), headers={"Origin": origin, **client.auth}) as resp:
                await expect_error(resp, 403, "cross-origin")
        # The server's own origin, localhost names and listed origins pass.
        own = server.url.rstrip("/")
        async with http.post(client.url("/interrupt"), headers={"Origin": own, **client.auth}) as resp:
            assert resp.status == 200
        async with http.post(client.url("/interrupt"),
                             headers={"Origin": "https://app.example.org", **client.auth}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
        # A listed site's page may call with its bearer token (CORS preflight, then the request).
        preflight = {"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization"}
        async with http.options(client.url("/interrupt"), headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        async with http.options(client.url("/interrupt"), headers={**preflight, "Origin": EVIL}) as resp:
            await expect_error(resp, 403)
            assert "Access-Control-Allow-Origin" not in resp.headers
        port = own.rsplit(":", 1)[1]
        async with http.get(server.endpoint("/config"), headers={"Host": f"localhost:{port}"}) as resp:
            assert resp.status == 200
        await client.close()
    finally:
        await server.stop()


# -- 3. bounded work per request -------------------------------------------------------------------


async def test_bodies_are_capped_before_parsing(server, http, clean_log):
    client = await connected(server, http, clean_log)
    big_offer = json.dumps({"sdp": "v=0" + "x" * 70000, "type": "offer"})
    async with http.post(server.endpoint("/offer"), data=big_offer,
                         headers={"Content-Type": "application/json"}) as resp:
        await expect_error(resp, 413, "limit")

    async def chunked(size: int):  # no Content-Length: the cap holds while reading
        for _ in range(size // 4096):
            yield b" " * 4096

    async with http.post(server.endpoint("/offer"), data=chunked(128 * 1024),
                         headers={"Content-Type": "application/json"}) as resp:
        await expect_error(resp, 413)
    async with http.post(client.url("/say"), data=chunked(32 * 1024),
                         headers={"Content-Type": "application/json", **client.auth}) as resp:
        await expect_error(resp, 413)
    async with http.post(client.url("/say"), json={"text": "a" * 20000}, headers=client.auth) as resp:
        await expect_error(resp, 413)
    async with http.post(client.url("/interrupt"), data=b"x" * 20000, headers=client.auth) as resp:
        await expect_error(resp, 413)
    await client.close()


@pytest.mark.parametrize("name, value, words", [
    ("compute_budget_frames", float("inf"), ("compute_budget_frames", "finite")),
    ("compute_budget_frames", float("nan"), ("compute_budget_frames", "finite")),
    ("compute_budget_frames", 1e7, ("compute_budget_frames", "25")),
    ("compute_budget_frames", -1, ("compute_budget_frames",)),
    ("compute_budget_frames", "2", ("compute_budget_frames", "number")),
    ("vad_aggressiveness", 7, ("vad_aggressiveness", "3")),
    ("vad_aggressiveness", 1.5, ("vad_aggressiveness", "integer")),
    ("vad_aggressiveness", True, ("vad_aggressiveness",)),
    ("energy_gate_dbfs", 40.0, ("energy_gate_dbfs",)),
    ("paste_mode", "glue", ("paste_mode",)),
    ("video_codec", "av1", ("video_codec",)),
    ("max_batch", 1000, ("unknown", "max_batch")),
])
def test_offer_options_are_validated(name, value, words):
    with pytest.raises(ApiError) as refused:
        OfferOptions.from_dict({name: value})
    assert refused.value.status == 400
    for word in words:
        assert word in refused.value.message, refused.value.message


def test_offer_options_parse_into_a_dataclass():
    options = OfferOptions.from_dict({"video_codec": "H264", "compute_budget_frames": 3,
                                      "vad_aggressiveness": 0, "energy_gate_dbfs": -60})
    assert options.video_codec == "h264" and options.compute_budget_frames == 3.0
    assert options.engine_overrides() == {"compute_budget_frames": 3.0, "vad_aggressiveness": 0,
                                          "energy_gate_dbfs": -60.0, "fit_budget_to_renderer": False}
    assert OfferOptions.from_dict(None) == OfferOptions()


async def test_an_infinite_option_gets_400_not_500(server, http, clean_log):
    client = Client(server, http)
    client.pc.addTransceiver("video", direction="recvonly")
    await client.pc.setLocalDescription(await client.pc.createOffer())
    body = json.dumps({"sdp": client.pc.localDescription.sdp, "type": "offer",
                       "options": {"compute_budget_frames": float("inf")}})
    assert "Infinity" in body  # what a JavaScript client's JSON.stringify never sends, but Python reads
    async with http.post(server.endpoint("/offer"), data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        await expect_error(resp, 400, "compute_budget_frames")
    assert len(server.app[STATE].sessions) == 0
    await client.close()


def test_uploads_only_open_known_containers():
    assert sniff_container(silent_wav(0.1, 16000)) == "wav"
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/seg.ts\n#EXT-X-ENDLIST\n"
    for data in (playlist, b"ffconcat version 1.0\nfile '/etc/passwd'\n", b"<smil></smil>" * 4,
                 b"file:///etc/passwd\n" * 2):
        with pytest.raises(ApiError) as refused:
            decode_upload(data, 300.0)
        assert refused.value.status == 415


async def test_playlist_upload_fetches_nothing(server, http, clean_log):
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=silent_wav(1.0, 16000))

    bait = web.Application()
    bait.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(bait)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client = await connected(server, http, clean_log)
        playlist = (f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:{port}/a.wav\n"
                    "#EXT-X-ENDLIST\n").encode()
        async with http.post(client.url("/audio"), data=playlist,
                             headers={"Content-Type": "application/vnd.apple.mpegurl", **client.auth}) as resp:
            await expect_error(resp, 415)
        assert hits == []
        await client.close()
    finally:
        await runner.cleanup()


async def test_bad_headers_are_refused_before_decoding(server, http, clean_log):
    client = await connected(server, http, clean_log)
    cases = [(silent_wav(60, 1000), "1000 hz"), (silent_wav(0.5, 200000), "200000 hz"),
             (silent_wav(0.5, 16000, channels=9), "9 channels")]
    for data, words in cases:
        t0 = time.monotonic()
        async with http.post(client.url("/audio"), data=data,
                             headers={"Content-Type": "audio/wav", **client.auth}) as resp:
            await expect_error(resp, 415, words)
        assert time.monotonic() - t0 < 2.0
    await client.close()


def test_decoding_stops_at_the_queue_room():
    data = silent_wav(120, 16000)  # 2 minutes, 3.8 MB
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as refused:
            decode_upload(data, 10.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413 and "10.0 s" in refused.value.message
    room_bytes = 10 * 16000 * 4
    assert peak < 4 * room_bytes, peak  # a small multiple of the room, not of the file
    ok = decode_upload(silent_wav(2, 48000, channels=2), 10.0)
    assert ok.samples.dtype == np.float32 and abs(ok.samples.size - 32000) < 400
    assert (ok.source_rate, ok.source_channels) == (48000, 2)


async def test_an_upload_longer_than_the_queue_room_gets_413(server, http, clean_log):
    client = await connected(server, http, clean_log)
    data = silent_wav(310, 8000)  # 310 s > the 300 s a session may queue
    async with http.post(client.url("/audio"), data=data,
                         headers={"Content-Type": "audio/wav", **client.auth}) as resp:
        body = await expect_error(resp, 413, "queue")
    assert body["room_s"] <= 300
    async with http.get(client.url(), headers=client.auth) as resp:
        assert (await resp.json())["queued_audio_s"] == 0  # nothing of it was queued
    await client.close()


async def test_decodes_run_on_their_own_bounded_pool(engine, http, clean_log, monkeypatch):
    import server.routes.push_api as push_api

    server = await start_server(engine, max_concurrent_decodes=1)
    threads: list[str] = []
    release = asyncio.Event()
    real = push_api.decode_upload

    def slow_decode(data: bytes, room: float):
        import threading

        threads.append(threading.current_thread().name)
        while not release.is_set():
            time.sleep(0.01)
        return real(data, room)

    monkeypatch.setattr(push_api, "decode_upload", slow_decode)
    try:
        client = await connected(server, http, clean_log)
        upload = silent_wav(1.0, 16000)
        headers = {"Content-Type": "audio/wav", **client.auth}
        first = asyncio.create_task(http.post(client.url("/audio"), data=upload, headers=headers))
        assert await settle(lambda: bool(threads))
        other = await connected(server, http, clean_log)
        async with http.post(other.url("/audio"), data=upload,
                             headers={"Content-Type": "audio/wav", **other.auth}) as resp:
            await expect_error(resp, 503, "busy")
            assert resp.headers["Retry-After"] == "1"
        async with http.post(client.url("/audio"), data=upload, headers=headers) as resp:
            await expect_error(resp, 429, "already")  # one decode per session at a time
        release.set()
        resp = await first
        assert resp.status == 200
        resp.release()
        assert threads == ["lipsync-decode_0"]  # never asyncio's default executor (aiortc's encoders)
        await client.close()
        await other.close()
    finally:
        await server.stop()


async def test_work_pool_refuses_when_full():
    pool = WorkPool(1)
    with pool.slot():
        with pytest.raises(PoolBusy):
            await pool.run(sum, [1, 2])
    assert await pool.run(sum, [1, 2]) == 3 and pool.refused_total == 1
    pool.close()


def fake_tts(tmp_path: Path, seconds: float) -> str:
    """An espeak stand-in: sleeps, then writes 1 s of silence as a wav; counts its runs in a file."""
    script = tmp_path / "fake-tts"
    runs = tmp_path / "runs"
    script.write_text("#!/bin/sh\n"
                      f"echo run >> {runs}\n"
                      "cat > /dev/null\n"
                      f"sleep {seconds}\n"
                      f"cat {tmp_path / 'one.wav'}\n")
    script.chmod(0o755)
    (tmp_path / "one.wav").write_bytes(silent_wav(1.0, 22050))
    return str(script)


async def test_say_is_bounded(engine, http, clean_log, tmp_path):
    server = await start_server(engine, tts_command=fake_tts(tmp_path, 1.0), say_timeout_s=3.0,
                                max_concurrent_decodes=1)
    try:
        a = await connected(server, http, clean_log)
        b = await connected(server, http, clean_log)
        first = asyncio.create_task(http.post(a.url("/say"), json={"text": "one"}, headers=a.auth))
        await asyncio.sleep(0.3)
        async with http.post(a.url("/say"), json={"text": "two"}, headers=a.auth) as resp:
            await expect_error(resp, 429, "already")  # one at a time per session
        async with http.post(b.url("/say"), json={"text": "three"}, headers=b.auth) as resp:
            await expect_error(resp, 503, "busy")  # the global cap
            assert resp.headers["Retry-After"]
        resp = await first
        assert resp.status == 200 and (await resp.json())["queued_s"] == pytest.approx(1.0, abs=0.01)
        resp.release()
        # Too long to fit in the session's remaining queue room: refused before synthesis.
        runs = (tmp_path / "runs").read_text().count("run")
        pcm = np.zeros(295 * 8000, np.int16).tobytes()
        async with http.post(b.url("/audio", rate="8000"), data=pcm, headers=b.auth) as resp:
            assert resp.status == 200
        async with http.post(b.url("/say"), json={"text": "word " * 800}, headers=b.auth) as resp:
            await expect_error(resp, 413, "queue")
        assert (tmp_path / "runs").read_text().count("run") == runs
        await a.close()
        await b.close()
    finally:
        await server.stop()


async def test_say_timeout_is_a_504(engine, http, clean_log, tmp_path):
    server = await start_server(engine, tts_command=fake_tts(tmp_path, 10.0), say_timeout_s=0.5)
    try:
        client = await connected(server, http, clean_log)
        t0 = time.monotonic()
        async with http.post(client.url("/say"), json={"text": "hello"}, headers=client.auth) as resp:
            await expect_error(resp, 504, "longer than")
        assert time.monotonic() - t0 < 3.0
        assert server.app[STATE].pool.busy == 0 and not server.app[STATE].pool.sessions
        await client.close()
    finally:
        await server.stop()


def test_tts_starts_its_program_without_the_loops_subprocess_support(tmp_path):
    """uvloop's subprocess_exec runs Python's at-fork handlers in the child, which hung it before exec in a
    worker with media threads (the Chromium test's /say, then the worker's shutdown): the TTS starts
    espeak with CPython's fork-exec on a thread, never through the loop."""
    from server.ops.event_loop import DEFAULT_LOOP, loop_factory
    from server.routes.tts import LocalTts, TtsTimeout

    base = loop_factory(DEFAULT_LOOP)

    def no_subprocesses() -> asyncio.AbstractEventLoop:
        loop = base()

        async def refuse(*args, **kwargs):
            raise AssertionError("the TTS used the loop's subprocess_exec")

        loop.subprocess_exec = refuse  # type: ignore[method-assign]
        return loop

    async def say() -> tuple[int, int, float]:
        samples, rate = await LocalTts(fake_tts(tmp_path, 0.0)).synthesize("hello")
        t0 = time.monotonic()
        with pytest.raises(TtsTimeout):
            await LocalTts(fake_tts(tmp_path, 10.0), timeout_s=0.3).synthesize("hello")
        return len(samples), rate, time.monotonic() - t0

    with asyncio.Runner(loop_factory=no_subprocesses) as runner:
        n, rate, timed_out_after = runner.run(say())
    assert (n, rate) == (22050, 22050) and timed_out_after < 3.0  # the sleeping program was killed


# -- 4. fair slots ---------------------------------------------------------------------------------


async def test_sessions_and_offers_per_address_are_limited(engine, http, clean_log):
    server = await start_server(engine, max_sessions=4, max_sessions_per_ip=1, max_offers_per_minute=3)
    try:
        first = await connected(server, http, clean_log)
        second = Client(server, http)
        body = await second.connect(expect_status=429)
        assert body["max_sessions_per_ip"] == 1 and body["retry_after_s"] > 0
        third = Client(server, http)
        body = await third.connect(expect_status=429)  # the third offer this minute
        body = await Client(server, http).connect(expect_status=429)
        assert "a minute" in body["error"] and body["retry_after_s"] >= 50
        assert server.app[STATE].limits.refused_total == 3
        for client in (first, second, third):
            await client.close()
    finally:
        await server.stop()


def test_offer_rate_window_slides():
    limits = ClientLimits(max_sessions_per_ip=2, max_offers_per_minute=2)
    limits.check_rate("a", now=0.0)
    limits.check_rate("a", now=10.0)
    limits.check_rate("b", now=10.0)
    with pytest.raises(ApiError) as refused:
        limits.check_rate("a", now=30.0)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "30"
    limits.check_rate("a", now=60.5)  # the first one left the window
    with limits.negotiating("c"), limits.negotiating("c"):
        with pytest.raises(ApiError):
            limits.check_sessions("c", [])
    limits.check_sessions("c", ["c"])  # one live: a second may come
    with pytest.raises(ApiError):
        limits.check_sessions("c", ["c", "c"])


async def test_a_session_ends_at_max_session_s(engine, http, clean_log):
    server = await start_server(engine, max_session_s=1.5)
    try:
        client = await connected(server, http, clean_log)
        ws = await http.ws_connect(client.url("/stream", token=True))
        msg = await ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert "max-session-s" in (msg.extra or "")
        manager = server.app[STATE].sessions
        assert await settle(lambda: manager.closed_total == {"limit": 1})
        assert manager.closed_total == {"limit": 1} and len(manager) == 0
        await ws.close()
        await client.close()
    finally:
        await server.stop()


async def test_idle_keepalive_connections_are_closed(engine):
    from server.runner import serve_async

    config = ServerConfig(port=0, ice_host_addresses=["127.0.0.1"], keepalive_timeout_s=0.5)
    started = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_async(config, engine, started=started, stop=stop))
    port = await asyncio.wait_for(started, timeout=10)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"200" in head.split(b"\r\n", 1)[0]
    t0 = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), timeout=5):  # the body, then EOF when closed
        pass
    assert time.monotonic() - t0 < 3.0
    writer.close()
    stop.set()
    await asyncio.wait_for(task, timeout=10)


# -- 5. TURN ---------------------------------------------------------------------------------------


async def test_config_hands_out_turn_rest_credentials(engine, http, clean_log, caplog):
    secret = "coturn-static-auth-secret"
    clean_log.append(secret)
    server = await start_server(engine, turn_secret=secret, turn_urls=["turn:turn.example.org:3478"],
                                turn_ttl_s=600, ice_servers=[IceServer.parse("turn:bob:hunter2@relay.example")])
    try:
        async with http.get(server.endpoint("/config")) as resp:
            config = await resp.json()
        # The page's config carries no relay credential: those come from /ice-servers, one per attempt.
        assert config["turn"] is True and all("credential" not in s or s["urls"] == ["turn:relay.example"]
                                              for s in config["ice_servers"])
        async with http.get(server.endpoint("/ice-servers")) as resp:
            assert resp.headers["Cache-Control"] == "no-store"
            servers = (await resp.json())["ice_servers"]
        rest = next(s for s in servers if s["urls"] == ["turn:turn.example.org:3478"])
        expiry, tag = rest["username"].split(":")
        assert abs(float(expiry) - (time.time() + 600)) < 5 and tag
        assert any(r.getMessage() == "TURN credentials issued" and getattr(r, "ticket", None) == tag
                   and getattr(r, "remote", None) == "127.0.0.1" for r in caplog.records)
        digest = hmac.new(secret.encode(), rest["username"].encode(), hashlib.sha1).digest()
        assert rest["credential"] == base64.b64encode(digest).decode()
        assert any("every visitor" in r.getMessage() and "relay.example" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)
    finally:
        await server.stop()
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(turn_secret=secret).validate()
    with pytest.raises(ValueError, match="no user:password"):
        ServerConfig(turn_secret=secret, turn_urls=["turn:u:p@host"]).validate()


# -- 6. prepare-avatar -o --------------------------------------------------------------------------


def test_prepare_avatar_refuses_a_folder_that_is_not_an_avatar(tmp_path, capsys):
    from cli.main import main

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    rc = main(["prepare-avatar", str(tmp_path / "face.mp4"), "-o", str(precious)])
    assert rc == 2 and "not a prepared avatar" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"
    from cli.prepare_avatar import is_prepared_avatar
    from realtime.avatars import avatar_cache

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / avatar_cache.HEADER).write_text(json.dumps({"format": avatar_cache.FORMAT}))
    (prepared / "frames.npy").write_bytes(b"")
    assert is_prepared_avatar(prepared)
    (prepared / "notes.txt").write_text("mine")
    assert not is_prepared_avatar(prepared)  # something else lives there too


def test_security_flags_and_env():
    import argparse

    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    argv = ["--allowed-origin", "https://App.example.org/", "--max-sessions-per-ip", "3",
            "--turn-secret", "s3cret", "--turn-url", "turn:t.example:3478"]
    env = {"LIPSYNC_API_TOKEN": OPERATOR, "LIPSYNC_MAX_OFFERS_PER_MINUTE": "5", "LIPSYNC_MAX_SESSION_S": "60",
           "LIPSYNC_MAX_CONCURRENT_DECODES": "4"}
    config = ServerConfig.from_args(parser.parse_args(argv), env=env)
    config.validate()
    assert config.api_token == OPERATOR and OPERATOR not in repr(config) and "s3cret" not in repr(config)
    assert config.allowed_origins == ["https://app.example.org"] and config.max_sessions_per_ip == 3
    assert (config.max_offers_per_minute, config.max_session_s, config.max_concurrent_decodes) == (5, 60.0, 4)
    assert ServerConfig.from_args(parser.parse_args(["--no-auth"]), env={}).no_auth is True
    with pytest.raises(ValueError, match="finite"):
        ServerConfig.from_args(parser.parse_args([]), env={"LIPSYNC_MAX_SESSION_S": "inf"})
    with pytest.raises(ValueError, match="16 characters"):
        ServerConfig(api_token="short").validate()
    with pytest.raises(ValueError, match="allowed-origin"):
        ServerConfig(allowed_origins=["evil.example"]).validate()


async def test_routes_added_later_are_covered_without_changes(engine, http, clean_log):
    """What helpers add in parallel (chat's SSE, an operator page) gets the policy from its path."""
    from server.access.auth import RedactingAccessLogger
    from server.app import create_app

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = create_app(ServerConfig(host="127.0.0.1", port=0, api_token=OPERATOR), engine)
    app.router.add_get("/sessions/{id}/events", ok)
    app.router.add_get("/debug/state", ok)
    runner = web.AppRunner(app, access_log_class=RedactingAccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"

    class Running:
        url = base + "/"

        @staticmethod
        def endpoint(path: str) -> str:
            return base + path

    try:
        client = Client(Running(), http)  # type: ignore[arg-type]
        await client.connect()
        clean_log.append(client.token)
        await client.wait_for_video(1)
        async with http.get(client.url("/events")) as resp:
            await expect_error(resp, 401)
        async with http.get(client.url("/events", token=True)) as resp:  # EventSource passes ?token=
            assert resp.status == 200
        async with http.get(base + "/debug/state", headers=client.auth) as resp:
            await expect_error(resp, 403)  # not public, not a session's: the operator's
        async with http.get(base + "/debug/state", headers={"Authorization": f"Bearer {OPERATOR}"}) as resp:
            assert resp.status == 200
        await client.close()
    finally:
        await runner.cleanup()
