"""Issue #26 item 6: a rolling restart loses no live session. `run_server.py` in a child process, an
aiortc client on loopback: SIGTERM drains (no new sessions, /healthz 503 "draining", the session told
and kept running up to --drain-s, then ended with that reason, exit 0); a second SIGTERM exits at once.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest
from deployment import lipsync_server
from server_helpers import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), pytest.mark.usefixtures("loopback_only")]


class Direct:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/"

    def endpoint(self, path: str) -> str:
        return self.url.rstrip("/") + path


async def wait_exit(proc, within_s: float) -> float:
    start = time.monotonic()
    while proc.poll() is None:
        assert time.monotonic() - start < within_s, "the server did not exit"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_sigterm_drains_live_sessions_then_exits(tmp_path):
    with lipsync_server(tmp_path, ["--drain-s", "4"]) as server:
        direct = Direct(server.port)
        async with aiohttp.ClientSession() as http:
            client = Client(direct, http)  # type: ignore[arg-type]
            try:
                await client.connect()
                await client.wait_for_video(5)
                ws = await http.ws_connect(client.url("/stream", token=True))
                sse = await http.get(client.url("/events"), headers=client.auth)
                assert sse.status == 200
                await sse.content.readline()  # the stream's opening comment: it is subscribed
                server.proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                told = json.loads((await ws.receive(timeout=10)).data)  # a chatbot on the WebSocket hears it
                assert told["type"] == "server_restarting" and told["ends_in_s"] == 4, told
                line = b"\n"
                while line == b"\n":  # past the blank line that ends the opening comment
                    line = await asyncio.wait_for(sse.content.readline(), 10)
                assert line == b"event: server_restarting\n", line
                deadline = sent + 5
                while True:  # the load balancer's health check turns away new visitors
                    async with http.get(direct.endpoint("/healthz")) as resp:
                        body = await resp.json()
                    if resp.status == 503:
                        break
                    assert time.monotonic() < deadline, body
                    await asyncio.sleep(0.05)
                assert body["status"] == "draining", body
                async with http.post(direct.endpoint("/offer"), json={"sdp": "", "type": "offer"}) as resp:
                    assert resp.status == 503 and "restarting" in (await resp.json())["error"]
                    assert resp.headers["Retry-After"]
                async with http.get(client.url(), headers=client.auth) as resp:
                    notice = (await resp.json())["server_notice"]
                assert notice["type"] == "server_restarting" and 0 < notice["ends_in_s"] <= 4
                frames = len(client.received.video)
                await asyncio.sleep(1.0)
                assert len(client.received.video) >= frames + 15  # the live session still plays
                await wait_exit(server.proc, 20)
                elapsed = time.monotonic() - sent
            finally:
                await client.close()
                await ws.close()
                sse.close()
        assert server.proc.returncode == 0, server.text()
        assert 3.5 <= elapsed, elapsed  # it let the session run its --drain-s
        assert "reason=server restarting" in server.text(), server.text()


async def test_a_second_sigterm_exits_at_once(tmp_path):
    with lipsync_server(tmp_path, ["--drain-s", "60"]) as server:
        async with aiohttp.ClientSession() as http:
            client = Client(Direct(server.port), http)  # type: ignore[arg-type]
            try:
                await client.connect()
                await client.wait_for_video(3)
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                assert server.proc.poll() is None  # draining, up to 60 s
                server.proc.send_signal(signal.SIGTERM)
                assert await wait_exit(server.proc, 10) < 10
            finally:
                await client.close()
        assert server.proc.returncode == 0, server.text()


async def test_sigterm_without_sessions_exits_at_once(tmp_path):
    with lipsync_server(tmp_path, []) as server:
        server.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(server.proc, 10) < 10  # --drain-s 30 is for live sessions only
        assert server.proc.returncode == 0, server.text()
