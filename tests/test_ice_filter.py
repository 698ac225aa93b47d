"""Issue #25 item 4: the server is no UDP prober. Remote ICE candidates and credentials are screened
before `setRemoteDescription` (server/network/ice_filter.py): a pure function of the SDP and the bind policy,
unit-tested here, plus the attack through POST /offer with STUN packets counted on loopback sockets.

Loopback only: the "public" server is configured as bound to 0.0.0.0 but listens on 127.0.0.1, and every
probed target is a UDP socket of this test on 127.0.0.x.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
from aiohttp import web
from aiortc import RTCPeerConnection
from server_helpers import RunningServer, start_server, tiny_engine

from server.app import create_app
from server.config import ServerConfig
from server.errors import ApiError
from server.network.ice import rtc_configuration
from server.network.ice_filter import MAX_CANDIDATES_PER_MLINE, CandidatePolicy, refusal, screen_offer
from server.routes.signaling import OfferRequest

OPERATOR = "operator-token-for-ice-tests-0123"
LOCAL = CandidatePolicy.for_bind("127.0.0.1")
PUBLIC = CandidatePolicy.for_bind("0.0.0.0")
PUBLIC_LAN = CandidatePolicy.for_bind("0.0.0.0", allow_private=True)

SDP_HEAD = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
MEDIA = ("m=video 9 UDP/TLS/RTP/SAVPF 97\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\n"
         "a=rtpmap:97 VP8/90000\r\na=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n"
         "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n")
UFRAG, PWD = "abcd", "0123456789abcdefghijkl"


def candidate(address: str, port: int = 9999, n: int = 1) -> str:
    return f"a=candidate:{n} 1 udp 2130706431 {address} {port} typ host\r\n"


def offer_sdp(candidates: list[str], ufrag: str = UFRAG, pwd: str = PWD, extra: str = "") -> str:
    return SDP_HEAD + MEDIA.format(ufrag=ufrag, pwd=pwd) + "".join(candidates) + \
        "a=end-of-candidates\r\n" + extra


# -- the pure function -----------------------------------------------------------------------------


def test_the_bind_decides_the_policy():
    assert CandidatePolicy.for_bind("127.0.0.1") == CandidatePolicy(allow_loopback=True, allow_private=True)
    assert CandidatePolicy.for_bind("::1").allow_loopback and CandidatePolicy.for_bind("localhost").allow_loopback
    assert CandidatePolicy.for_bind("192.168.1.5") == CandidatePolicy(allow_loopback=False, allow_private=True)
    for public in ("0.0.0.0", "::", "8.8.8.8", "lipsync.example.org"):
        assert CandidatePolicy.for_bind(public) == CandidatePolicy(allow_loopback=False, allow_private=False)
    assert CandidatePolicy.for_bind("0.0.0.0", allow_private=True).allow_private
    # Behind a reverse proxy: bound to loopback, reached from the internet.
    assert CandidatePolicy.for_bind("127.0.0.1", public=True) == PUBLIC


def test_a_proxied_or_named_server_is_screened_as_public():
    """Issue #26 meets #25: behind nginx on the same host the bind is loopback, but strangers send the
    offers, so their loopback candidates (the host's own services) are never probed."""
    from server.routes.signaling import candidate_policy

    assert candidate_policy(ServerConfig(host="127.0.0.1")) == LOCAL
    assert candidate_policy(ServerConfig(host="127.0.0.1", trusted_proxies=["127.0.0.1"])) == PUBLIC
    assert candidate_policy(ServerConfig(host="127.0.0.1", public_urls=["https://a.example.org"])) == PUBLIC
    # The one-machine deployment tests (tests/test_deploy.py) say so explicitly.
    tested = candidate_policy(ServerConfig(host="127.0.0.1", trusted_proxies=["127.0.0.1"], ice_allow_loopback=True))
    assert tested.allow_loopback and not tested.allow_private


@pytest.mark.parametrize(("address", "local", "public", "public_lan"), [
    ("8.8.8.8", None, None, None),
    ("2001:4860:4860::8888", None, None, None),
    ("127.0.0.1", None, "loopback", "loopback"),
    ("127.9.9.9", None, "loopback", "loopback"),
    ("::1", None, "loopback", "loopback"),
    ("::ffff:127.0.0.1", None, "loopback", "loopback"),   # IPv4-mapped: judged as IPv4
    ("10.1.2.3", None, "private", None),
    ("192.168.0.10", None, "private", None),
    ("172.16.5.5", None, "private", None),
    ("100.64.1.1", None, "private", None),                # carrier-grade NAT
    ("fd12:3456::1", None, "private", None),              # ULA
    ("169.254.169.254", "reserved", "reserved", "reserved"),  # link-local: the metadata service
    ("fe80::1", "reserved", "reserved", "reserved"),
    ("224.0.0.251", "reserved", "reserved", "reserved"),  # multicast
    ("ff02::1", "reserved", "reserved", "reserved"),
    ("255.255.255.255", "reserved", "reserved", "reserved"),
    ("0.0.0.0", "reserved", "reserved", "reserved"),
    ("0.1.2.3", "reserved", "reserved", "reserved"),
    ("::", "reserved", "reserved", "reserved"),
    ("100.100.100.200", "metadata", "metadata", "metadata"),
    ("168.63.129.16", "metadata", "metadata", "metadata"),
    ("fd00:ec2::254", "metadata", "metadata", "metadata"),
    ("1f2e3d4c-aaaa-bbbb-cccc-0123456789ab.local", None, "mdns", None),
    ("internal.corp.example", "hostname", "hostname", "hostname"),
])
def test_which_addresses_are_never_probed(address, local, public, public_lan):
    assert refusal(address, LOCAL) == local
    assert refusal(address, PUBLIC) == public
    assert refusal(address, PUBLIC_LAN) == public_lan


def test_screening_drops_refused_candidates_and_keeps_the_rest_verbatim():
    sdp = offer_sdp([candidate("8.8.8.8", 5000, 1), candidate("127.0.0.1", 19999, 2),
                     candidate("10.0.0.7", 5001, 3), candidate("169.254.169.254", 80, 4)])
    public = screen_offer(sdp, PUBLIC)
    assert (public.kept, public.dropped) == (1, 3)
    assert public.dropped_reasons == {"loopback": 1, "private": 1, "reserved": 1}
    assert public.sdp == sdp.replace(candidate("127.0.0.1", 19999, 2), "").replace(
        candidate("10.0.0.7", 5001, 3), "").replace(candidate("169.254.169.254", 80, 4), "")
    local = screen_offer(sdp, LOCAL)
    assert (local.kept, local.dropped) == (3, 1)
    assert "127.0.0.1 19999" in local.sdp and "169.254.169.254" not in local.sdp


def test_candidates_per_mline_are_capped_before_filtering():
    at_cap = [candidate("127.0.0.1", 20000 + i, i) for i in range(MAX_CANDIDATES_PER_MLINE)]
    assert screen_offer(offer_sdp(at_cap), PUBLIC).dropped == MAX_CANDIDATES_PER_MLINE
    with pytest.raises(ApiError) as refused:
        screen_offer(offer_sdp([*at_cap, candidate("8.8.8.8", 1)]), LOCAL)
    assert refused.value.status == 400 and "too many ICE candidates" in refused.value.message
    # 950 candidates (the attack's 58 KB offer) refused before a single one is applied.
    many = [candidate("127.0.0.1", 20000 + i, i) for i in range(950)]
    with pytest.raises(ApiError):
        screen_offer(offer_sdp(many), LOCAL)
    # The cap is per m-line: two m-lines may each carry the cap.
    two = offer_sdp(at_cap) + MEDIA.replace("video", "audio").replace("mid:0", "mid:1").format(
        ufrag=UFRAG, pwd=PWD) + "".join(at_cap)
    assert screen_offer(two, LOCAL).kept == 2 * MAX_CANDIDATES_PER_MLINE


@pytest.mark.parametrize(("ufrag", "pwd"), [
    ("ab|:cd", PWD),              # the attack: '|' and ':' into the STUN USERNAME
    ("abc", PWD),                 # too short
    ("a" * 257, PWD),             # too long
    ("abcd efgh", PWD),
    ("abcd\x01", PWD),
    ("", PWD),
    (UFRAG, "tooshort"),
    (UFRAG, PWD + "|"),
    (UFRAG, "p" * 257),
])
def test_ice_credentials_follow_the_ice_grammar(ufrag, pwd):
    with pytest.raises(ApiError) as refused:
        screen_offer(offer_sdp([], ufrag=ufrag, pwd=pwd), LOCAL)
    assert refused.value.status == 400 and "RFC 8839" in refused.value.message


def test_grammar_edges_pass():
    screen_offer(offer_sdp([], ufrag="a+/Z", pwd="x" * 22), LOCAL)
    screen_offer(offer_sdp([], ufrag="u" * 256, pwd="p" * 256), LOCAL)
    # A session-level ufrag is checked too.
    with pytest.raises(ApiError):
        screen_offer(offer_sdp([]).replace("t=0 0\r\n", "t=0 0\r\na=ice-ufrag:x|y:z\r\n"), LOCAL)


@pytest.mark.parametrize("line", [
    "a=candidate:1 1 udp 2130706431 127.0.0.1\r\n",               # no port
    "a=candidate:1 1 udp 2130706431 127.0.0.1 99999 typ host\r\n",  # not a port
    "a=candidate:1 1 udp 2130706431 127.0.0.1 0 typ host\r\n",
    "a=candidate:1 x udp 2130706431 127.0.0.1 5000 typ host\r\n",
    "a=candidate:1 1 udp 2130706431 127.0.0.1 5000 type host\r\n",
])
def test_malformed_candidate_lines_are_refused(line):
    with pytest.raises(ApiError) as refused:
        screen_offer(offer_sdp([line]), LOCAL)
    assert refused.value.status == 400


def test_a_candidate_outside_any_mline_is_refused():
    sdp = offer_sdp([]).replace("t=0 0\r\n", "t=0 0\r\n" + candidate("8.8.8.8"))
    with pytest.raises(ApiError):
        screen_offer(sdp, LOCAL)


def test_only_audio_and_video_mlines():
    data_channel = ("m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\n"
                    f"a=ice-ufrag:{UFRAG}\r\na=ice-pwd:{PWD}\r\na=sctp-port:5000\r\n")
    with pytest.raises(ApiError) as refused:
        OfferRequest.from_dict({"sdp": offer_sdp([], extra=data_channel), "type": "offer"}, LOCAL)
    assert refused.value.status == 400 and "data channel" in refused.value.message
    offer = OfferRequest.from_dict({"sdp": offer_sdp([candidate("127.0.0.1")]), "type": "offer"}, PUBLIC)
    assert offer.kinds == ("video",) and offer.candidates_dropped == 1 and "127.0.0.1 9999" not in offer.sdp


# -- the attack through POST /offer ----------------------------------------------------------------


class StunCounter:
    """UDP sockets on loopback addresses that count the STUN requests they receive."""

    def __init__(self, addresses: list[str]) -> None:
        self.sockets = []
        for address in addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, 0))
            sock.setblocking(False)
            self.sockets.append(sock)
        self.packets: dict[tuple[str, int], int] = {}
        self.usernames: set[bytes] = set()

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [s.getsockname() for s in self.sockets]

    def drain(self) -> None:
        for sock in self.sockets:
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                if len(data) >= 20 and data[4:8] == b"\x21\x12\xa4\x42":  # the STUN magic cookie
                    key = sock.getsockname()
                    self.packets[key] = self.packets.get(key, 0) + 1
                    self.usernames.add(_stun_username(data))

    async def count_for(self, seconds: float, stop_at_first: bool = False) -> int:
        """Packets received within `seconds` (or as soon as there is one, with `stop_at_first`)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop_at_first and self.packets):
            self.drain()
            await asyncio.sleep(0.05)
        self.drain()
        return sum(self.packets.values())

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def _stun_username(packet: bytes) -> bytes:
    pos = 20
    while pos + 4 <= len(packet):
        kind, length = struct.unpack("!HH", packet[pos:pos + 4])
        if kind == 0x0006:
            return packet[pos + 4:pos + 4 + length]
        pos += 4 + length + (-length % 4)
    return b""


async def client_offer_with(targets: list[tuple[str, int]], ufrag: str | None = None) -> str:
    """A real aiortc offer (recvonly video) whose m-line also names `targets` as host candidates."""
    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
    finally:
        await pc.close()
    lines = "".join(candidate(host, port, 100 + k) for k, (host, port) in enumerate(targets))
    sdp = sdp.replace("a=end-of-candidates\r\n", lines + "a=end-of-candidates\r\n", 1)
    if ufrag is not None:
        old = next(line for line in sdp.split("\r\n") if line.startswith("a=ice-ufrag:"))
        sdp = sdp.replace(old, "a=ice-ufrag:" + ufrag)
    return sdp


async def start_public_server(engine) -> RunningServer:
    """The server as bound to 0.0.0.0 (its candidate policy is a public bind's), listening on 127.0.0.1."""
    config = ServerConfig(host="0.0.0.0", port=0, api_token=OPERATOR, max_sessions=4, max_sessions_per_ip=4)
    app = create_app(config, engine)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return RunningServer(f"http://127.0.0.1:{runner.addresses[0][1]}/", app, runner, engine)


@pytest.fixture
async def engine():
    engine = tiny_engine()
    yield engine
    engine.close()


@pytest.fixture
def stun():
    counter = StunCounter(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    yield counter
    counter.close()


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("loopback_only")
async def test_a_public_server_sends_no_stun_to_loopback_candidates(engine, http, stun, caplog):
    """Reproduced on a loopback bind (the policy allows loopback there: the control shows the sockets
    do receive the server's checks), refused on a public bind: no packet at all."""
    local = await start_server(engine, max_sessions_per_ip=4)
    try:
        sdp = await client_offer_with(stun.targets)
        async with http.post(local.endpoint("/offer"), json={"sdp": sdp, "type": "offer"}) as resp:
            assert resp.status == 200, await resp.text()
        assert await stun.count_for(20.0, stop_at_first=True) > 0
        await stun.count_for(2.0)
        assert {host for host, _ in stun.packets} == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    finally:
        await local.stop()
    stun.packets.clear()
    await stun.count_for(1.0)  # retransmissions of the closed server, if any, are drained
    stun.packets.clear()

    public = await start_public_server(engine)
    try:
        sdp = await client_offer_with(stun.targets)
        async with http.post(public.endpoint("/offer"), json={"sdp": sdp, "type": "offer"}) as resp:
            assert resp.status == 200, await resp.text()
        assert await stun.count_for(5.0) == 0, stun.packets
        # The attack's other forms: too many candidates and bytes of the attacker's in USERNAME.
        many = [("127.0.0.2", 20000 + i) for i in range(950)]
        async with http.post(public.endpoint("/offer"),
                             json={"sdp": await client_offer_with(many), "type": "offer"}) as resp:
            assert resp.status == 400 and "too many ICE candidates" in (await resp.json())["error"]
        async with http.post(public.endpoint("/offer"), json={
                "sdp": await client_offer_with([], ufrag="ab|:cd"), "type": "offer"}) as resp:
            assert resp.status == 400 and "ice-ufrag" in (await resp.json())["error"]
        assert await stun.count_for(1.0) == 0
    finally:
        await public.stop()
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info]


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("loopback_only")
async def test_attacker_bytes_never_reach_stun_usernames(engine, http, stun):
    """On main a ufrag of 'ab|:cd' went into the USERNAME of the server's checks; now 400, and the checks
    of a valid offer carry only ICE characters."""
    local = await start_server(engine, max_sessions_per_ip=4)
    try:
        async with http.post(local.endpoint("/offer"), json={
                "sdp": await client_offer_with(stun.targets, ufrag="ab|:cd"), "type": "offer"}) as resp:
            assert resp.status == 400
        assert await stun.count_for(1.5) == 0
        async with http.post(local.endpoint("/offer"), json={
                "sdp": await client_offer_with(stun.targets), "type": "offer"}) as resp:
            assert resp.status == 200
        assert await stun.count_for(20.0, stop_at_first=True) > 0
    finally:
        await local.stop()
    for username in stun.usernames:
        remote, _, ours = username.partition(b":")
        assert remote and ours and b"|" not in username and username.count(b":") == 1, username
