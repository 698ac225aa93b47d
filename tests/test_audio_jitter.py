"""The microphone's receive jitter buffer (server/media/audio_jitter.py) and the aiortc internals it relies on."""
from __future__ import annotations

import random

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs import get_decoder as aiortc_get_decoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from server.media import opus_fec
from server.media.audio_jitter import GapSkippingJitterBuffer, install
from server.media.opus_fec import FecOpusDecoder, JitterBatch


def packets(numbers):
    out = []
    for n in numbers:
        p = RtpPacket(payload_type=111, sequence_number=n, timestamp=960 * n, payload=bytes([n % 256]))
        p._data = p.payload  # type: ignore[attr-defined]  # what the receiver sets (depacketized)
        out.append(p)
    return out


def released(frame: JitterFrame | None) -> list[int]:
    """The packet numbers (timestamp / 960) one `add` released: none, one, or a batch."""
    if frame is None:
        return []
    if isinstance(frame, JitterBatch):
        return [(frame.timestamp + offset) // 960 for _, offset in frame.parts]
    return [frame.timestamp // 960]


def delivered(buffer: JitterBuffer, numbers) -> list[int | None]:
    """The newest packet number each arriving packet releases (None: none)."""
    out = []
    for p in packets(numbers):
        _, frame = buffer.add(p)
        out.append(released(frame)[-1] if frame is not None else None)
    return out


def batches(buffer: JitterBuffer, numbers) -> list[list[int]]:
    """Every packet number each arriving packet releases."""
    return [released(buffer.add(p)[1]) for p in packets(numbers)]


LOST_ONE = [n for n in range(60) if n != 10]


def test_aiortc_alone_creeps_after_one_lost_packet():
    """The control: aiortc's own audio buffer, after packet 10 is lost, releases nothing until 16
    packets wait behind the gap, and from then on stays that far behind."""
    out = delivered(JitterBuffer(capacity=16, prefetch=4), LOST_ONE)
    assert out[-1] is not None and LOST_ONE[-1] - out[-1] >= 14


def test_gap_skipping_buffer_releases_in_order_packets_on_arrival():
    assert delivered(GapSkippingJitterBuffer(), range(60)) == list(range(60))


def test_gap_skipping_buffer_puts_a_reordered_packet_back_within_its_window():
    out = batches(GapSkippingJitterBuffer(skip_after=2), [0, 1, 3, 2, 4, 5])
    assert out == [[0], [1], [], [2, 3], [4], [5]]   # 3 waits for 2, both leave with 2: no delay after


def test_gap_skipping_buffer_is_back_to_no_delay_once_a_hole_is_given_up():
    """After a loss every packet that queued behind the hole leaves with the one that ends the wait, so
    from the next packet on each leaves on its own arrival (aiortc's receiver takes one frame per
    arriving packet: a buffer releasing one packet per arrival never caught up), and more losses do not
    add up. The widest window (5) and the default one (1)."""
    for skip_after, waited in ((5, 4), (1, 0)):
        buffer = GapSkippingJitterBuffer(skip_after=skip_after, max_skip_after=5)
        out = batches(buffer, LOST_ONE)
        assert out[10:10 + waited] == [[]] * waited                 # 11.. wait for 10 (reordering)
        assert out[10 + waited] == list(range(11, 12 + waited))     # then all leave at once
        assert all(out[i] == [LOST_ONE[i]] for i in range(11 + waited, len(LOST_ONE)))  # no delay
        assert buffer.skipped == 1 and buffer.skip_after == skip_after
    lost_three = [n for n in range(200) if n not in (10, 70, 130)]
    buffer = GapSkippingJitterBuffer(skip_after=5)
    out = delivered(buffer, lost_three)
    assert out[-1] == lost_three[-1] and buffer.skipped == 3


def test_the_reordering_window_widens_when_a_given_up_packet_comes_and_narrows_again():
    buffer = GapSkippingJitterBuffer(narrow_after=100)
    assert buffer.skip_after == 1
    assert batches(buffer, [0, 1, 3, 2]) == [[0], [1], [3], []]   # 2 given up (a loss), then late
    assert buffer.late == 1 and buffer.skip_after == 2           # this link reorders: wait one packet
    assert batches(buffer, [4, 6, 5, 7]) == [[4], [], [5, 6], [7]]   # the next swap is put right
    assert buffer.late == 1
    out = batches(buffer, range(8, 8 + 100))
    assert all(o == [n] for o, n in zip(out, range(8, 108), strict=True))
    assert buffer.skip_after == 1                                 # 100 packets without reordering
    assert batches(buffer, [109, 108]) == [[109], []] and buffer.skip_after == 2
    buffer = GapSkippingJitterBuffer(max_skip_after=3)
    for start in range(0, 100, 4):   # every group reordered by two: widens to the cap, no further
        batches(buffer, [start, start + 2, start + 3, start + 1])
    assert buffer.skip_after == 3


def test_seeded_lossy_reordering_stream_keeps_order_and_minimal_delay():
    """2 % loss and 2 % adjacent swaps, seeded: every packet leaves once, in order; a packet is held only
    while a hole before it is within the window, so the buffer never holds more than the window allows
    and is empty whenever no packet before the newest is missing."""
    rng = random.Random(27)
    order = [n for n in range(3000) if rng.random() >= 0.02]
    for i in range(len(order) - 1):
        if rng.random() < 0.02:
            order[i], order[i + 1] = order[i + 1], order[i]
    buffer = GapSkippingJitterBuffer()
    out: list[int] = []
    newest = -1
    for p in packets(order):
        out += released(buffer.add(p)[1])
        newest = max(newest, p.sequence_number)
        held = [q for q in buffer._packets if q is not None]
        assert len(held) < buffer.skip_after
        if not held:
            assert out[-1] == newest   # nothing held: everything that came has left
    assert out == sorted(set(out))
    assert len(out) + buffer.late == len(order)
    assert buffer.late > 0 and buffer.skipped > 0 and buffer.batches > 0


def test_clean_stream_adds_no_delay_and_no_batches():
    buffer = GapSkippingJitterBuffer()
    assert batches(buffer, range(2000)) == [[n] for n in range(2000)]
    assert buffer.batches == 0 and buffer.skipped == 0


def test_every_release_is_a_microphone_frame():
    """What the server's buffer releases is marked as its microphone, so opus_fec decodes it at 16 kHz mono."""
    buffer = GapSkippingJitterBuffer(skip_after=2)
    frames = [buffer.add(p)[1] for p in packets([0, 1, 3, 2, 4])]
    assert all(isinstance(f, opus_fec.MicrophoneFrame) for f in frames if f is not None)
    assert any(isinstance(f, JitterBatch) for f in frames) and sum(f is not None for f in frames) >= 3


def test_a_batch_after_a_loss_is_decoded_with_fec_and_catches_up(speech_16k):
    """The receive path end to end: packet k lost, the packets behind it wait for the window, then leave
    as one batch: the decoder rebuilds k from the next packet's FEC data and hands out everything up to
    the newest packet at once (no gap, nothing left behind)."""
    from tests.test_opus_fec import ArrivalClock, browser_packets, decode, loud_packet

    encoded = browser_packets(speech_16k, fec=True)
    clean = decode(FecOpusDecoder(clock=ArrivalClock()), encoded)
    k = loud_packet(encoded, clean)
    clock = ArrivalClock()
    decoder = FecOpusDecoder(clock=clock)
    buffer = GapSkippingJitterBuffer(skip_after=3)
    out: list[np.ndarray] = []
    for n, (data, ts) in enumerate(encoded):
        if n == k:
            continue
        p = RtpPacket(payload_type=111, sequence_number=n, timestamp=ts, payload=data)
        p._data = data  # type: ignore[attr-defined]
        clock.now = ts / 48000
        _, frame = buffer.add(p)
        if frame is not None:
            out += [f.to_ndarray().reshape(-1, 2)[:, 0].astype(np.float64) for f in decoder.decode(frame)]
        if n == k + 3:
            assert isinstance(frame, JitterBatch) and len(frame.parts) == 3
        if n not in (k + 1, k + 2):
            assert sum(len(x) for x in out) == (n + 1) * 960   # caught up: everything up to n decoded
    assert decoder.fec_frames == 1 and decoder.concealed_frames == 0
    whole = np.concatenate(out)
    assert len(whole) == len(clean)
    assert np.array_equal(whole[:k * 960], clean[:k * 960])


def test_other_audio_codecs_decode_a_batch_part_by_part():
    codec = RTCRtpCodecParameters(mimeType="audio/PCMU", clockRate=8000, payloadType=0)
    decoder = opus_fec.get_decoder(codec)
    batch = JitterBatch([(bytes([0xFF]) * 160, 0), (bytes([0x7F]) * 160, 160)], timestamp=1000)
    frames = decoder.decode(batch)
    reference = aiortc_get_decoder(codec)
    assert [f.pts for f in frames] == [f.pts for f in reference.decode(JitterFrame(bytes([0xFF]) * 160, 1000))] + \
        [f.pts for f in reference.decode(JitterFrame(bytes([0x7F]) * 160, 1160))]
    assert sum(f.samples for f in frames) == 320


async def test_install_needs_the_batch_decoder(monkeypatch):
    monkeypatch.setattr(opus_fec, "_decoder_installed", False)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        with pytest.raises(RuntimeError, match="install_decoder"):
            install(pc)
    finally:
        await pc.close()


async def test_install_replaces_aiortcs_audio_receive_buffer():
    """Guards the private aiortc attribute the server relies on (RTCRtpReceiver.__jitter_buffer).
    Async: aiortc's peer connection needs a running event loop (a sync test fails once another test
    has closed the default loop)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        audio = pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="sendonly")
        assert isinstance(audio.receiver._RTCRtpReceiver__jitter_buffer, JitterBuffer)
        opus_fec.install_decoder()
        assert install(pc) == 1
        assert isinstance(audio.receiver._RTCRtpReceiver__jitter_buffer, GapSkippingJitterBuffer)
    finally:
        await pc.close()
