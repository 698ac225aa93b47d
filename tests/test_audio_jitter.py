"""The microphone's receive jitter buffer (server/audio_jitter.py) and the aiortc internals it relies on."""
from __future__ import annotations

from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from server.audio_jitter import GapSkippingJitterBuffer, install


def packets(numbers):
    out = []
    for n in numbers:
        p = RtpPacket(payload_type=111, sequence_number=n, timestamp=960 * n, payload=bytes([n % 256]))
        p._data = p.payload  # type: ignore[attr-defined]  # what the receiver sets (depacketized)
        out.append(p)
    return out


def delivered(buffer: JitterBuffer, numbers) -> list[int | None]:
    """The timestamp / 960 of the frame each arriving packet releases (None: none)."""
    out = []
    for p in packets(numbers):
        _, frame = buffer.add(p)
        out.append(None if frame is None else frame.timestamp // 960)
    return out


LOST_ONE = [n for n in range(60) if n != 10]


def test_aiortc_alone_creeps_after_one_lost_packet():
    """The control: aiortc's own audio buffer, after packet 10 is lost, releases nothing until 16
    packets wait behind the gap, and from then on stays that far behind."""
    out = delivered(JitterBuffer(capacity=16, prefetch=4), LOST_ONE)
    assert out[-1] is not None and LOST_ONE[-1] - out[-1] >= 14


def test_gap_skipping_buffer_releases_in_order_packets_on_arrival():
    assert delivered(GapSkippingJitterBuffer(), range(60)) == list(range(60))


def test_gap_skipping_buffer_waits_for_a_reordered_packet():
    out = delivered(GapSkippingJitterBuffer(), [0, 1, 3, 2, 4, 5])
    assert out == [0, 1, None, 2, 3, 4]   # 3 waits for 2; from then on one frame (20 ms) behind


def test_gap_skipping_buffer_stays_bounded_behind_after_losses():
    """After a loss it lags by skip_after - 1 packets at most, and more losses do not add to that."""
    buffer = GapSkippingJitterBuffer()
    out = delivered(buffer, LOST_ONE)
    assert LOST_ONE[-1] - out[-1] == buffer.skip_after - 1
    assert buffer.skipped == 1
    assert 10 not in out and sorted(x for x in out if x is not None) == [x for x in out if x is not None]
    lost_three = [n for n in range(200) if n not in (10, 70, 130)]
    buffer = GapSkippingJitterBuffer()
    out = delivered(buffer, lost_three)
    assert lost_three[-1] - out[-1] == buffer.skip_after - 1 and buffer.skipped == 3


async def test_install_replaces_aiortcs_audio_receive_buffer():
    """Guards the private aiortc attribute the server relies on (RTCRtpReceiver.__jitter_buffer).
    Async: aiortc's peer connection needs a running event loop (a sync test fails once another test
    has closed the default loop)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        audio = pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="sendonly")
        assert isinstance(audio.receiver._RTCRtpReceiver__jitter_buffer, JitterBuffer)
        assert install(pc) == 1
        assert isinstance(audio.receiver._RTCRtpReceiver__jitter_buffer, GapSkippingJitterBuffer)
    finally:
        await pc.close()
