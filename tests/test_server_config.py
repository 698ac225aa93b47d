"""ServerConfig from flags and env, ICE settings, and the Prometheus text format (no network)."""
from __future__ import annotations

import argparse
from pathlib import Path

import aioice.ice
import pytest

from server.config import IceServer, ServerConfig
from server.network.ice import rtc_configuration, use_host_addresses
from server.ops.prometheus import Histogram, Page


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    return ServerConfig.from_args(parser.parse_args(argv), env=env or {})


def test_defaults_serve_localhost_8080_with_no_weights():
    config = parse([])
    assert (config.host, config.port, config.checkpoint, config.avatar) == ("127.0.0.1", 8080, None, None)
    assert config.url == "http://127.0.0.1:8080/"
    assert config.ice_servers == [] and config.ice_host_addresses == []
    config.validate()


def test_flags_win_over_env_and_env_over_defaults(tmp_path):
    ckpt = tmp_path / "wav2lip_gan.pth"
    ckpt.write_bytes(b"x")
    env = {"LIPSYNC_PORT": "9000", "LIPSYNC_MAX_SESSIONS": "7", "LIPSYNC_DEVICE": "cpu",
           "LIPSYNC_ICE_SERVER": "stun:stun.example.org:3478, turn:u:p@turn.example.org?transport=tcp",
           "LIPSYNC_ICE_HOST_ADDRESSES": "127.0.0.1", "LIPSYNC_CONNECT_TIMEOUT": "12.5",
           "LIPSYNC_CHECKPOINT": str(ckpt)}
    config = parse(["--port", "9100", "--max-upload-mb", "2"], env)
    assert config.port == 9100 and config.max_sessions == 7 and config.device == "cpu"
    assert config.max_upload_bytes == 2 * 1024 * 1024
    assert config.connect_timeout_s == 12.5
    assert config.checkpoint == Path(ckpt)
    assert config.ice_host_addresses == ["127.0.0.1"]
    assert [s.url for s in config.ice_servers] == ["stun:stun.example.org:3478",
                                                   "turn:turn.example.org?transport=tcp"]
    assert config.ice_servers[1].username == "u" and config.ice_servers[1].credential == "p"
    config.validate()
    flagged = parse(["--ice-server", "stun:a.example:19302", "--ice-server", "turn:x:y@b.example"], env)
    assert [s.url for s in flagged.ice_servers] == ["stun:a.example:19302", "turn:b.example"]


def test_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="--checkpoint"):
        parse(["--checkpoint", str(tmp_path / "missing.pth")]).validate()
    with pytest.raises(ValueError, match="--key-file"):
        parse(["--cert-file", __file__]).validate()
    with pytest.raises(ValueError, match="max-sessions"):
        parse(["--max-sessions", "0"]).validate()
    with pytest.raises(ValueError, match="turn"):
        IceServer.parse("turn:turn.example.org")  # TURN without credentials
    with pytest.raises(ValueError, match="stun"):
        IceServer.parse("http://example.org")
    with pytest.raises(ValueError, match="LIPSYNC_PORT"):
        parse([], {"LIPSYNC_PORT": "eighty"})


def test_tls_url_and_ice_json():
    config = ServerConfig(cert_file=Path("c.pem"), key_file=Path("k.pem"), host="0.0.0.0", port=443)
    assert config.url == "https://0.0.0.0:443/"
    turn = IceServer.parse("turns:user:secret:with:colons@turn.example.org:5349?transport=tcp")
    assert turn.to_json() == {"urls": ["turns:turn.example.org:5349?transport=tcp"],
                              "username": "user", "credential": "secret:with:colons"}


def test_peer_connections_never_fall_back_to_a_public_stun_server():
    assert rtc_configuration([]).iceServers == []
    servers = rtc_configuration([IceServer.parse("turn:u:p@turn.example.org:3478")]).iceServers
    assert servers[0].urls == "turn:turn.example.org:3478" and servers[0].username == "u"


def test_host_address_policy_is_installed_and_restored():
    original = aioice.ice.get_host_addresses
    restore = use_host_addresses(["127.0.0.1"])
    try:
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(False, True) == []
    finally:
        restore()
    assert aioice.ice.get_host_addresses is original
    restore = use_host_addresses([], add_loopback=True)
    try:
        assert "127.0.0.1" in aioice.ice.get_host_addresses(True, False)
    finally:
        restore()
    with pytest.raises(ValueError):
        use_host_addresses(["not-an-ip"])


def test_prometheus_text_format():
    hist = Histogram([0.1, 0.5])
    for v in (0.05, 0.2, 0.7, float("nan")):
        hist.observe(v)
    page = Page()
    page.gauge("x_sessions", "Live sessions.", 2)
    page.counter("x_total", "Things.", 3, {"reason": 'a "quoted"\nvalue'})
    page.counter("x_total", "Things.", 4, {"reason": "b"})
    page.histogram("x_seconds", "Latency.", hist, {"session": "s1"})
    text = page.render()
    assert text.count("# TYPE x_total counter") == 1
    assert 'x_total{reason="a \\"quoted\\"\\nvalue"} 3' in text
    assert 'x_seconds_bucket{session="s1",le="0.1"} 1' in text
    assert 'x_seconds_bucket{session="s1",le="0.5"} 2' in text
    assert 'x_seconds_bucket{session="s1",le="+Inf"} 3' in text
    assert 'x_seconds_count{session="s1"} 3' in text
    assert text.endswith("\n")


def test_prometheus_families_stay_contiguous_whatever_the_call_order():
    """Per-session metrics are added session by session (a then b, a then b); the page must still list
    each family's samples together, or strict Prometheus parsers reject it."""
    page = Page()
    for session in ("s1", "s2", "s3"):
        page.gauge("x_fps", "Frames per second.", 25, {"session": session})
        page.counter("x_drops_total", "Drops.", 1, {"session": session})
    lines = page.render().splitlines()
    families = [line.split("{")[0].split()[-1] if not line.startswith("#") else line.split()[2] for line in lines]
    seen: list[str] = []
    for name in families:
        if not seen or seen[-1] != name:
            assert name not in seen, f"{name} split across the page:\n" + "\n".join(lines)
            seen.append(name)
    assert seen == ["x_fps", "x_drops_total"]
    assert lines[0] == "# HELP x_fps Frames per second." and lines[2] == 'x_fps{session="s1"} 25'


def test_udp_port_range_applies_to_ice_host_candidates():
    import asyncio

    from aiortc import RTCPeerConnection

    from server.network.udp_ports import parse_port_range
    from server.ops.event_loop import LOOPS, loop_factory

    assert parse_port_range("40000-40009") == (40000, 40009)
    with pytest.raises(ValueError, match="udp-ports"):
        parse_port_range("9-5")
    assert parse(["--udp-ports", "41000-41003"]).udp_ports == (41000, 41003)

    async def candidate_ports() -> list[int]:
        ports = []
        for _ in range(3):
            pc = RTCPeerConnection(configuration=rtc_configuration([]))
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            ports += [int(line.split()[5]) for line in pc.localDescription.sdp.splitlines()
                      if line.startswith("a=candidate:")]
            await pc.close()
        return ports

    restore = use_host_addresses(["127.0.0.1"])
    try:
        for kind in LOOPS:  # either --event-loop binds inside the range
            with asyncio.Runner(loop_factory=loop_factory(kind, (41000, 41003))) as runner:
                ports = runner.run(candidate_ports())
            assert len(ports) == 3 and all(41000 <= p <= 41003 for p in ports), (kind, ports)
    finally:
        restore()


def test_event_loop_flag_defaults_to_uvloop_and_falls_back_to_asyncio():
    assert parse([]).event_loop == "uvloop"
    assert parse(["--event-loop", "asyncio"]).event_loop == "asyncio"
    with pytest.raises(SystemExit):
        parse(["--event-loop", "trio"])


async def test_async_tests_run_on_the_loop_the_server_serves_on():
    """tests/conftest.py's loop factory: the servers the tests start run on the default --event-loop's loop."""
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
