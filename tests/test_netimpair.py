"""The impairment tool itself (bench/netimpair.py): each effect in simulated time with a seeded generator,
then the relay forwarding real datagrams on loopback."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.netimpair import GilbertElliott, Impairment, Link, Relay, rewrite_candidates, rtp_payload_type

PERIOD = 0.005  # a datagram every 5 ms


def run(link: Link, n: int, size: int = 1000, period: float = PERIOD) -> list[float | None]:
    return [link.admit(i * period, size) for i in range(n)]


def test_clean_link_forwards_everything_at_once():
    out = run(Link(), 1000)
    assert out == [i * PERIOD for i in range(1000)]


def test_random_loss_rate_and_seed():
    a = run(Link(Impairment(loss=0.05), seed=7), 40000)
    b = run(Link(Impairment(loss=0.05), seed=7), 40000)
    assert a == b  # seeded: reproducible
    lost = sum(x is None for x in a) / len(a)
    assert 0.045 < lost < 0.055
    c = run(Link(Impairment(loss=0.05), seed=8), 40000)
    assert a != c


def test_gilbert_elliott_bursts():
    ge = GilbertElliott.for_loss(0.05, mean_burst=4.0)
    assert ge.mean_loss == pytest.approx(0.05)
    out = run(Link(Impairment(burst=ge), seed=3), 200000)
    lost = np.array([x is None for x in out])
    assert 0.04 < lost.mean() < 0.06
    # Mean run length of consecutive losses ~ 4 (random loss at 5 % would give ~1.05).
    edges = np.flatnonzero(np.diff(np.concatenate([[0], lost.astype(int), [0]])))
    runs = edges[1::2] - edges[::2]
    assert 3.3 < runs.mean() < 4.7
    random_runs = run(Link(Impairment(loss=0.05), seed=3), 200000)
    rl = np.array([x is None for x in random_runs]).astype(int)
    e2 = np.flatnonzero(np.diff(np.concatenate([[0], rl, [0]])))
    assert (e2[1::2] - e2[::2]).mean() < 1.2


def test_delay_and_jitter_keep_order_by_default():
    link = Link(Impairment(delay_ms=30, jitter_ms=15), seed=1)
    out = run(link, 5000, period=0.020)
    delays = np.array([t - i * 0.020 for i, t in enumerate(out)])  # type: ignore[operator]
    assert np.all(np.diff(np.array(out, dtype=float)) >= 0)  # never reordered
    assert 0.025 < np.median(delays) < 0.040
    assert delays.min() >= 0.0 and delays.max() <= 0.030 + 2.5 * 0.015 + 0.020
    assert delays.std() > 0.008  # really jittered


def test_reorder_lets_later_packets_overtake():
    link = Link(Impairment(reorder=0.1, reorder_ms=20), seed=2)
    out = np.array(run(link, 2000, period=0.005), dtype=float)
    overtaken = np.sum(out[:-1] > out[1:])
    assert link.stats.reordered > 150
    assert overtaken > 100


def test_rate_limit_throughput_and_queue_tail_drop():
    # 1200-byte datagrams every 5 ms = 1920 kbit/s offered into a 600 kbit/s link with a 200 ms queue.
    link = Link(Impairment(rate_kbps=600, queue_ms=200, burst_bytes=0))
    out = run(link, 4000, size=1200)
    delivered = [t for t in out if t is not None]
    span = delivered[-1] - delivered[0]
    kbps = (len(delivered) - 1) * 1200 * 8 / span / 1000
    assert 590 < kbps < 610
    delays = [t - i * PERIOD for i, t in enumerate(out) if t is not None]
    assert max(delays) <= 0.200 + 1e-9  # the queue never holds more than its limit
    assert link.stats.dropped_queue > 2000


def test_rate_limit_passes_traffic_below_the_rate_untouched():
    link = Link(Impairment(rate_kbps=600, burst_bytes=15000))
    out = run(link, 1000, size=500, period=0.020)  # 200 kbit/s
    assert all(t is not None and t - i * 0.020 < 0.01 for i, t in enumerate(out))


def test_outage_drops_everything_then_recovers():
    link = Link(Impairment(loss=0.0))
    link.outage(1.0, 3.0)
    out = run(link, 1000, period=0.005)  # 0 .. 5 s
    for i, t in enumerate(out):
        now = i * 0.005
        assert (t is None) == (1.0 <= now < 4.0)
    assert link.stats.dropped_outage == 600


def test_impairment_validates():
    with pytest.raises(ValueError):
        Impairment(loss=1.5)
    with pytest.raises(ValueError):
        Impairment(rate_kbps=0)


def test_rtp_payload_type_ignores_rtcp_and_stun():
    rtp = bytes([0x80, 0x60]) + bytes(10)      # PT 96
    rtcp = bytes([0x80, 0xC9]) + bytes(10)     # RR (201)
    stun = bytes([0x00, 0x01]) + bytes(18)
    assert rtp_payload_type(rtp) == 96
    assert rtp_payload_type(rtcp) is None
    assert rtp_payload_type(stun) is None


def test_rewrite_candidates():
    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n"
           "a=candidate:a 1 udp 2130706431 127.0.0.1 5000 typ host\r\n"
           "a=candidate:b 1 tcp 1 127.0.0.1 9 typ host tcptype active\r\n"
           "a=candidate:c 1 udp 100 10.0.0.1 6000 typ srflx raddr 0.0.0.0 rport 0\r\n"
           "m=video 9 UDP/TLS/RTP/SAVPF 97\r\n"
           "a=candidate:d 1 udp 2130706431 127.0.0.1 5002 typ host\r\n")
    out, real = rewrite_candidates(sdp, ("127.0.0.1", 7777))
    assert real == ("127.0.0.1", 5000)
    cands = [ln for ln in out.splitlines() if ln.startswith("a=candidate:")]
    assert cands == ["a=candidate:a 1 udp 2130706431 127.0.0.1 7777 typ host",
                     "a=candidate:d 1 udp 2130706431 127.0.0.1 7777 typ host"]


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        self.got.append((data, addr))


@pytest.mark.timeout(30)
async def test_relay_forwards_both_ways_through_its_two_sockets():
    loop = asyncio.get_running_loop()
    server_t, server = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    client_t, client = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    relay = await Relay(server=server_t.get_extra_info("sockname")[:2],
                        up=Impairment(delay_ms=20), down=Impairment(loss=1.0)).start()
    try:
        for i in range(10):
            client_t.sendto(b"up%d" % i, relay.client_address)
        await asyncio.sleep(0.1)
        assert [d for d, _ in server.got] == [b"up%d" % i for i in range(10)]
        assert all(a == relay.server_address for _, a in server.got)  # the server sees the relay
        relay.set("down", Impairment())
        server_t.sendto(b"down", relay.server_address)
        await asyncio.sleep(0.1)
        assert client.got == [(b"down", relay.client_address)]
        relay.outage(0.3)
        client_t.sendto(b"lost", relay.client_address)
        await asyncio.sleep(0.05)
        assert len(server.got) == 10
        await asyncio.sleep(0.35)
        client_t.sendto(b"back", relay.client_address)
        await asyncio.sleep(0.1)
        assert server.got[-1][0] == b"back"
        assert relay.links["up"].stats.dropped_outage == 1
        # A second source (a browser's other host candidate) gets no path: one path, as a NAT pins it.
        other_t, _ = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
        other_t.sendto(b"other", relay.client_address)
        await asyncio.sleep(0.1)
        assert server.got[-1][0] == b"back"
        other_t.close()
    finally:
        relay.close()
        server_t.close()
        client_t.close()


@pytest.mark.timeout(30)
async def test_relay_keeps_order_when_jitter_ties_delivery_times():
    """An order-keeping jittery link gives a datagram that a faster one follows the same delivery time
    (packets sent in a burst: a video frame's); the relay still delivers them in the order they came.
    The event loop's timer heap alone does not (it reordered most such runs)."""
    loop = asyncio.get_running_loop()
    server_t, server = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    client_t, _ = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    relay = await Relay(server=server_t.get_extra_info("sockname")[:2],
                        up=Impairment(delay_ms=30, jitter_ms=15), seed=5).start()
    try:
        sent = [b"%d" % i for i in range(300)]
        for k in range(0, len(sent), 6):          # bursts of 6 datagrams every 5 ms
            for data in sent[k:k + 6]:
                client_t.sendto(data, relay.client_address)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)
        assert len(server.got) == len(sent)
        assert [d for d, _ in server.got] == sent
    finally:
        relay.close()
        server_t.close()
        client_t.close()
