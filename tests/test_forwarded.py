"""Issue #26 item 1, in process: the public name, trusted proxies and the client address they name.

The real nginx in front of the real server is tests/test_deploy.py; here each rule is checked on its own
against the in-process server, with clients on distinct loopback addresses (127.0.0.x) standing for a
proxy and for strangers.
"""
from __future__ import annotations

import logging

import aiohttp
import pytest
from server_helpers import start_server, tiny_engine

from server.access.auth import ForwardedClients, OperatorAuth, public_origin
from server.config import ServerConfig

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loopback_only")]

PUBLIC = "https://avatar.example.org"


@pytest.fixture
async def engine():
    engine = tiny_engine()
    yield engine
    engine.close()


def session_from(address: str) -> aiohttp.ClientSession:
    """An HTTP client whose connections come from `address` (any 127.0.0.0/8 address is loopback)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), force_close=True))


async def offer_status(http: aiohttp.ClientSession, url: str, **headers: str) -> int:
    """An offer that counts against the per-address rate (checked before the SDP is read): 400 when
    admitted (the SDP is empty), 429 when the address is over its limit."""
    async with http.post(url + "offer", json={"sdp": "", "type": "offer"}, headers=headers) as resp:
        return resp.status


def test_public_origins_compare_scheme_host_and_port():
    assert public_origin("https://Avatar.example.org/") == ("https", "avatar.example.org", 443)
    assert public_origin("https://avatar.example.org:443") == public_origin(PUBLIC)
    assert public_origin("http://avatar.example.org") != public_origin(PUBLIC)
    assert public_origin("https://avatar.example.org:8443") != public_origin(PUBLIC)
    assert public_origin("null") is None and public_origin("https://[::1") is None
    with pytest.raises(ValueError, match="public-url"):
        ServerConfig(public_urls=["avatar.example.org"]).validate()
    with pytest.raises(ValueError, match="public-url"):
        ServerConfig(public_urls=["https://avatar.example.org/app"]).validate()
    with pytest.raises(ValueError, match="trusted-proxy"):
        ServerConfig(trusted_proxies=["nginx"]).validate()


def test_flags_and_env():
    import argparse

    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    config = ServerConfig.from_args(parser.parse_args(["--public-url", "https://Avatar.example.org/",
                                                       "--trusted-proxy", "127.0.0.1"]),
                                    env={"LIPSYNC_TRUSTED_PROXY": "10.0.0.0/8"})
    config.validate()
    assert config.public_urls == [PUBLIC] and config.trusted_proxies == ["127.0.0.1"]
    config = ServerConfig.from_args(parser.parse_args([]), env={"LIPSYNC_PUBLIC_URL": PUBLIC,
                                                               "LIPSYNC_TRUSTED_PROXY": "10.0.0.0/8 ::1"})
    assert config.public_urls == [PUBLIC] and config.trusted_proxies == ["10.0.0.0/8", "::1"]
    assert config.turn_ttl_s <= 600  # TURN credentials live minutes by default


def test_a_proxy_or_public_name_makes_the_operator_token_mandatory():
    """A loopback bind behind a same-host proxy is reachable from the internet."""
    assert OperatorAuth.from_config(ServerConfig(host="127.0.0.1")).token is None
    for config in (ServerConfig(host="127.0.0.1", public_urls=[PUBLIC]),
                   ServerConfig(host="127.0.0.1", trusted_proxies=["127.0.0.1"])):
        operator = OperatorAuth.from_config(config)
        assert operator.generated and operator.token and len(operator.token) >= 40
    assert OperatorAuth.from_config(ServerConfig(host="127.0.0.1", public_urls=[PUBLIC], no_auth=True)).token is None


def test_forwarded_chain_is_read_from_the_right():
    clients = ForwardedClients(["127.0.0.1", "10.0.0.0/8"])
    assert clients.is_trusted("10.1.2.3") and clients.is_trusted("::ffff:127.0.0.1")
    assert not clients.is_trusted("127.0.0.2") and not clients.is_trusted("garbage")
    assert not ForwardedClients([]).is_trusted("127.0.0.1")


async def test_public_name_passes_the_host_and_origin_checks(engine):
    server = await start_server(engine, public_urls=[PUBLIC], api_token="operator-token-0123456789")
    try:
        async with aiohttp.ClientSession() as http:
            for host in ("avatar.example.org", "avatar.example.org:443", "AVATAR.example.org"):
                async with http.get(server.endpoint("/config"), headers={"Host": host}) as resp:
                    assert resp.status == 200, host
            for host in ("avatar.example.org:8443", "evil.example", "avatar.example.org.evil.example"):
                async with http.get(server.endpoint("/config"), headers={"Host": host}) as resp:
                    assert resp.status == 403, host
            headers = {"Host": "avatar.example.org", "Origin": PUBLIC}
            assert await offer_status(http, server.url, **headers) == 400  # past the checks: a bad SDP
            for origin in ("http://avatar.example.org", "https://avatar.example.org:8443", "https://evil.example"):
                assert await offer_status(http, server.url, **{**headers, "Origin": origin}) == 403, origin
            # Operator routes need the token now.
            async with http.get(server.endpoint("/sessions"), headers={"Host": "avatar.example.org"}) as resp:
                assert resp.status == 401
    finally:
        await server.stop()


async def test_trusted_proxy_names_the_client_and_strangers_cannot(engine, caplog):
    caplog.set_level(logging.INFO)
    server = await start_server(engine, trusted_proxies=["127.0.0.1"], max_offers_per_minute=1,
                                api_token="operator-token-0123456789")
    try:
        async with session_from("127.0.0.1") as proxy, session_from("127.0.0.3") as stranger:
            # Two clients behind the proxy get a slot each.
            assert await offer_status(proxy, server.url, **{"X-Forwarded-For": "198.51.100.7"}) == 400
            assert await offer_status(proxy, server.url, **{"X-Forwarded-For": "198.51.100.8"}) == 400
            assert await offer_status(proxy, server.url, **{"X-Forwarded-For": "198.51.100.7"}) == 429
            # Right-most untrusted entry: what the client wrote to the left proves nothing.
            assert await offer_status(proxy, server.url, **{"X-Forwarded-For": "203.0.113.1, 198.51.100.8"}) == 429
            # The RFC 7239 header, when the proxy sends it instead.
            assert await offer_status(proxy, server.url, Forwarded='for="[2001:db8::9]:4711";proto=https') == 400
            assert await offer_status(proxy, server.url, Forwarded='for="[2001:db8::9]"') == 429
            # A stranger's forged header changes nothing: it is counted as itself, every time.
            assert await offer_status(stranger, server.url, **{"X-Forwarded-For": "192.0.2.50"}) == 400
            assert await offer_status(stranger, server.url, **{"X-Forwarded-For": "192.0.2.51"}) == 429
            # A malformed header from the proxy is the client's 400, never a 500.
            async with proxy.get(server.endpoint("/config"), headers={"X-Forwarded-For": "not-an-ip"}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]
            # /ice-servers shares the offers' per-address rate.
            async with proxy.get(server.endpoint("/ice-servers"), headers={"X-Forwarded-For": "198.51.100.9"}) as resp:
                assert resp.status == 200
            assert await offer_status(proxy, server.url, **{"X-Forwarded-For": "198.51.100.9"}) == 429
    finally:
        await server.stop()
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(line.startswith("198.51.100.7 ") for line in access), access
    assert any(line.startswith("127.0.0.3 ") for line in access) and not any("192.0.2.5" in a for a in access)


async def test_forwarded_proto_must_match_the_origin_scheme(engine):
    """Behind a TLS proxy that says the client used https, an http Origin is not this site."""
    server = await start_server(engine, trusted_proxies=["127.0.0.1"])
    try:
        async with session_from("127.0.0.1") as proxy:
            host = server.url.split("//")[1].rstrip("/")
            base = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}
            assert await offer_status(proxy, server.url, **base, Origin=f"https://{host}") == 400
            assert await offer_status(proxy, server.url, **base, Origin=f"http://{host}") == 403
    finally:
        await server.stop()
