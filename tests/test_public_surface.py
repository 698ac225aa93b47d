"""Issue #25 items 6 and 7: credentials and facts off the public surface, and the smaller edges.

- The operator token is never read from a URL; `?token=` only on a session's /stream and /events.
- No absolute path or version in a public answer (/healthz, GET /avatars, `Server:`), and the page is
  served with anti-framing and no-sniff headers.
- Per-address limits key IPv6 by /64; operator routes open without a token answer only to IP-literal or
  declared Host names (DNS rebinding).

Loopback only: every server listens on 127.0.0.1 (a "LAN bind" is configured as 0.0.0.0 in-process).
"""
from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import web
from server_helpers import Client, RunningServer, TinyAvatar, start_server, tiny_engine

from server.access.limits import ClientLimits, address_key
from server.access.surface import public_text
from server.app import create_app
from server.config import ServerConfig
from server.errors import ApiError
from server.realtime_engine import RealtimeEngine

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("loopback_only")]

OPERATOR = "operator-token-for-surface-tests-01"
EVIL = "https://evil.example"


@pytest.fixture
def clean_log(caplog):
    """No ERROR, traceback or operator token in the log at the server's default level (INFO: aiohttp
    logs a request line it cannot parse at DEBUG, with a traceback, which is aiohttp's choice)."""
    caplog.set_level(logging.INFO)
    yield
    for record in caplog.get_records("call"):
        assert record.levelno < logging.ERROR and record.exc_info is None, record.getMessage()
        assert OPERATOR not in record.getMessage()


@pytest.fixture
async def engine():
    engine = tiny_engine()
    yield engine
    engine.close()


async def start_bound_as(engine, host: str, **overrides) -> RunningServer:
    """A server configured as bound to `host` (its policies are that bind's), listening on 127.0.0.1."""
    config = ServerConfig(host=host, port=0, **overrides)
    app = create_app(config, engine)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return RunningServer(f"http://127.0.0.1:{runner.addresses[0][1]}/", app, runner, engine)


# -- 6. tokens in URLs -----------------------------------------------------------------------------


async def test_the_operator_token_is_never_read_from_a_url(engine, http, clean_log):
    server = await start_server(engine, api_token=OPERATOR, max_sessions_per_ip=4)
    try:
        for path in ("/metrics", "/sessions"):
            async with http.get(server.endpoint(f"{path}?token={OPERATOR}")) as resp:
                assert resp.status == 401, path
                assert "never ?token=" in (await resp.json())["error"]
            async with http.get(server.endpoint(path), headers={"Authorization": f"Bearer {OPERATOR}"}) as resp:
                assert resp.status == 200, path
        client = Client(server, http)
        await client.connect()
        try:
            # Not on a session's other routes either, even its own token (a URL is logged by proxies).
            async with http.get(client.url(token=True)) as resp:
                assert resp.status == 401
            async with http.get(client.url(), headers=client.auth) as resp:
                assert resp.status == 200
            # Its WebSocket and EventSource take the session's token in the URL...
            async with http.ws_connect(client.url("/stream", token=True)) as ws:
                await ws.send_str('{"type": "status"}')
                assert (await ws.receive_json(timeout=5))["type"] == "status"
            async with http.get(client.url("/events", token=True)) as resp:
                assert resp.status == 200
            # ...but never the operator's.
            async with http.get(client.url("/events") + f"?token={OPERATOR}") as resp:
                assert resp.status == 403
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(client.url("/stream") + f"?token={OPERATOR}")
            assert refused.value.status == 403
        finally:
            await client.close()
    finally:
        await server.stop()


# -- 6. facts: paths, versions, headers ------------------------------------------------------------


def test_public_text_keeps_names_and_drops_paths():
    assert public_text("cannot open /srv/lipsync/avatars/bob.mp4: bad") == "cannot open bob.mp4: bad"
    assert public_text("C:\\Users\\op\\bob.mp4 failed") == "bob.mp4 failed"
    assert public_text("see https://example.org/a/b and 16/9") == "see https://example.org/a/b and 16/9"
    assert public_text("no face found") == "no face found"


async def test_healthz_shows_no_path(http, clean_log):
    engine = RealtimeEngine(TinyAvatar(), tiny_engine().worker.renderer,
                            info={"avatar": "tiny", "device": "cpu",
                                  "checkpoint": "/home/operator/secret-models/wav2lip_gan.pth"})
    server = await start_server(engine)
    try:
        async with http.get(server.endpoint("/healthz")) as resp:
            text = await resp.text()
            assert resp.status == 200
        assert json.loads(text)["checkpoint"] == "wav2lip_gan.pth"
        assert "/home" not in text and "secret-models" not in text
    finally:
        await server.stop()
        engine.close()


async def test_a_failed_avatar_file_is_listed_by_name_not_path(engine, http, tmp_path, clean_log, caplog):
    folder = tmp_path / "private-avatars"
    folder.mkdir()
    (folder / "broken.mp4").write_bytes(b"not a video at all" * 100)
    with caplog.at_level(logging.CRITICAL, logger="realtime.avatars.avatar_library"):  # its warning names the path
        engine.avatars.add_folder(folder)
    server = await start_server(engine)
    try:
        async with http.get(server.endpoint("/avatars")) as resp:
            text = await resp.text()
        entry = next(a for a in json.loads(text)["avatars"] if a["id"] == "broken")
        assert entry["state"] == "failed" and entry["error"]
        assert str(tmp_path) not in text and "private-avatars" not in text, entry["error"]
        async with http.get(server.endpoint("/avatars/broken")) as resp:
            assert str(tmp_path) not in await resp.text()
        client = Client(server, http)  # an offer for it: 409 with the error, by name
        try:
            refused = await client.connect(options={"avatar": "broken"}, expect_status=409)
        finally:
            await client.close()
        assert "failed" in refused["error"] and str(tmp_path) not in refused["error"], refused
    finally:
        await server.stop()


SECURITY_HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin"}


async def test_every_answer_has_the_security_headers_and_no_version(engine, http, clean_log):
    server = await start_server(engine)
    try:
        for path, status in (("/", 200), ("/static/app.js", 200), ("/healthz", 200), ("/config", 200),
                             ("/nope", 404), ("/sessions/x", 401)):
            async with http.get(server.endpoint(path)) as resp:
                assert resp.status == status, path
                for name, value in SECURITY_HEADERS.items():
                    assert resp.headers.get(name) == value, (path, name)
                assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
                assert resp.headers["Server"] == "lipsync", path
        # An answer aiohttp makes itself (a request line it cannot parse) names no version either.
        port = int(server.url.rstrip("/").rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT HTTP\r\n\r\n")
        await writer.drain()
        head = (await asyncio.wait_for(reader.read(4096), 5)).decode(errors="replace")
        writer.close()
        assert head.startswith("HTTP/1.") and " 400 " in head.split("\r\n")[0]
        assert "Server: lipsync" in head and "aiohttp" not in head and "Python" not in head
    finally:
        await server.stop()


# -- 7. DNS rebinding with open operator routes ----------------------------------------------------


async def test_open_operator_routes_answer_only_to_ip_or_declared_hosts(engine, http, caplog):
    """--no-auth on a LAN bind: `evil.example` rebound to the server's address was same-origin with
    GET /sessions; now its Host is refused, and IP literals and declared names still work."""
    server = await start_bound_as(engine, "0.0.0.0", no_auth=True,
                                  allowed_origins=["http://avatar.lan:8080"])
    port = server.url.rstrip("/").rsplit(":", 1)[1]
    try:
        for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "[::1"):
            async with http.get(server.endpoint("/sessions"), headers={"Host": host}) as resp:
                assert resp.status == 403, host
                assert "--no-auth" in (await resp.json())["error"]
        for host in (f"127.0.0.1:{port}", "192.168.1.20:8080", "[fe80::1]:8080", "avatar.lan:8080", "localhost"):
            async with http.get(server.endpoint("/sessions"), headers={"Host": host}) as resp:
                assert resp.status == 200, host
    finally:
        await server.stop()
    # With an operator token the routes are closed to a rebound page anyway: no Host check there.
    server = await start_bound_as(engine, "0.0.0.0", api_token=OPERATOR)
    try:
        async with http.get(server.endpoint("/healthz"), headers={"Host": "lipsync.example.org"}) as resp:
            assert resp.status == 200
        async with http.get(server.endpoint("/sessions"), headers={"Host": "evil.example"}) as resp:
            assert resp.status == 401
    finally:
        await server.stop()


# -- 7. IPv6 limits by /64 -------------------------------------------------------------------------


def test_address_key_groups_ipv6_by_64():
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("") == ""


def test_one_64_shares_one_limit():
    limits = ClientLimits(max_sessions_per_ip=2, max_offers_per_minute=3)
    for i in range(3):
        limits.check_rate(f"2001:db8:0:7::{i + 1:x}", now=100.0)
    with pytest.raises(ApiError) as refused:
        limits.check_rate("2001:db8:0:7:dead:beef:0:1", now=100.0)
    assert refused.value.status == 429
    limits.check_rate("2001:db8:0:8::1", now=100.0)   # the next /64 is someone else
    live = ["2001:db8:0:7::a", "2001:db8:0:7::b"]
    with pytest.raises(ApiError):
        limits.check_sessions("2001:db8:0:7::c", live)
    limits.check_sessions("2001:db8:0:9::c", live)
    with limits.negotiating("2001:db8:0:9::1"), pytest.raises(ApiError):
        limits.check_sessions("2001:db8:0:9::2", ["2001:db8:0:9::3"])
