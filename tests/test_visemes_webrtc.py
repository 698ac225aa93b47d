"""The pieces of `bench/visemes.py --webrtc` that place returned media in time (pure functions: no server,
no network). The whole measurement is the bench's; these keep its clock from silently drifting."""
from __future__ import annotations

import numpy as np
from aiortc.rtp import RtpPacket

from bench.netimpair import PerPacketAudioBuffer
from bench.visemes import Track, locate, received_audio_16k


def test_rtp_timestamps_unwrap_across_the_32_bit_wrap():
    start = 2**32 - 3 * 960
    frames = [(0.0, (start + k * 960) % 2**32, np.zeros(960, np.float32)) for k in range(6)]
    assert np.array_equal(Track(48000, frames).unwrapped(), np.arange(6) * 960.0)


def test_frames_handed_over_late_keep_their_place_on_the_media_clock():
    """A loaded client hands some frames over late: their time comes from their RTP timestamp plus the
    transport's fastest delay, not from when they arrived."""
    rng = np.random.default_rng(3)
    delay = 0.030
    late = rng.uniform(0.0, 0.2, 100) * (rng.random(100) < 0.3)  # 30 % of frames up to 200 ms late
    origin = 123456
    frames = [(10.0 + k * 0.04 + delay + late[k], origin + k * 3600, np.zeros(1)) for k in range(100)]
    times = Track(90000, frames).times()
    np.testing.assert_allclose(times, 10.0 + np.arange(100) * 0.04 + delay, atol=0.002)


def test_a_clip_is_found_in_the_returned_audio():
    rng = np.random.default_rng(5)
    clip = (rng.standard_normal(8000) * np.hanning(8000)).astype(np.float32)
    signal = (0.01 * rng.standard_normal(48000)).astype(np.float32)
    signal[21_337:21_337 + 8000] += 0.5 * clip  # quieter, and noisy, as a codec returns it
    start, peak = locate(clip, signal, 10_000, 40_000)
    assert start == 21_337 and peak > 0.9
    assert locate(clip, signal, 25_000, 48_000)[1] < 0.5  # not in that span: a weak peak says so


def test_returned_audio_is_laid_out_on_its_timestamps_with_gaps_as_silence():
    tone = np.ones(960, np.float32)
    frames = [(1.0, 1000, tone), (1.02, 1960, tone), (1.06, 3880, tone)]  # one frame (2920) missing
    audio, t0 = received_audio_16k(Track(48000, frames))
    assert len(audio) == (3880 + 960 - 1000) // 3
    assert audio[:640].min() == 1.0 and audio[640:960].max() == 0.0 and audio[960:].min() == 1.0
    assert abs(t0 - (1.0 - 0.0)) < 1e-9


def test_each_audio_packet_is_handed_on_as_it_arrives():
    """aiortc's buffer would hold a packet until the next one arrives (20 ms late against the video)."""
    buffer = PerPacketAudioBuffer()
    for k in range(3):
        packet = RtpPacket(payload_type=111, sequence_number=100 + k, timestamp=960 * k, payload=bytes([k]))
        packet._data = packet.payload  # type: ignore[attr-defined]  # the receiver sets it (depayloaded)
        _, frame = buffer.add(packet)
        assert frame is not None and frame.timestamp == 960 * k and frame.data == bytes([k])
