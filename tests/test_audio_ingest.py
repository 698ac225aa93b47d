"""Audio ingest: any rate / layout / dtype / chunking in, 16 kHz mono float32 out; the sample-time ring."""
from __future__ import annotations

import numpy as np
import pytest

from realtime.audio.audio_ingest import AudioIngest, AudioRing, to_float_mono


def tone(rate: int, seconds: float, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def stream(ingest: AudioIngest, x: np.ndarray, rate: int, sizes: list[int], channels: int = 1) -> np.ndarray:
    out, i, n = [], 0, 0
    while i < len(x):
        size = sizes[n % len(sizes)] * channels
        out.append(ingest.convert(x[i:i + size], rate, channels))
        i += size
        n += 1
    return np.concatenate(out)


def test_16k_mono_passes_through_exactly():
    x = tone(16000, 0.5)
    ing = AudioIngest()
    out = stream(ing, x, 16000, [320, 1, 77, 1000])
    np.testing.assert_array_equal(out, x)
    assert out.dtype == np.float32


def test_int16_scaling_and_stereo_downmix():
    left = np.array([16384, -32768, 0, 32767], dtype=np.int16)
    right = np.array([0, -32768, 16384, 32767], dtype=np.int16)
    inter = np.stack([left, right], axis=1).reshape(-1)
    out = to_float_mono(inter, channels=2)
    np.testing.assert_allclose(out, [0.25, -1.0, 0.25, 32767 / 32768], atol=1e-6)
    np.testing.assert_allclose(to_float_mono(np.stack([left, right], axis=1)), out)
    with pytest.raises(ValueError):
        to_float_mono(inter[:-1], channels=2)


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
def test_resamples_any_rate_to_16k(rate):
    x = tone(rate, 1.0, hz=440.0)
    out = stream(AudioIngest(), x, rate, [rate // 50, 333, 1024])
    assert abs(len(out) - 16000) <= 40                 # minus the resampler's small filter delay
    seg = out[2000:14000]
    spectrum = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    peak_hz = np.argmax(spectrum) * 16000 / len(seg)
    assert peak_hz == pytest.approx(440.0, abs=3.0)
    assert np.sqrt(np.mean(seg ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.03)


def test_chunking_does_not_change_the_output():
    x = tone(48000, 0.6, hz=300.0)
    a = stream(AudioIngest(), x, 48000, [960])
    b = stream(AudioIngest(), x, 48000, [7, 4096, 129, 960])
    n = min(len(a), len(b))
    assert abs(len(a) - len(b)) <= 1
    np.testing.assert_allclose(a[:n], b[:n], atol=1e-5)


def test_48k_stereo_int16_webrtc_frames():
    x = tone(48000, 0.5, hz=200.0)
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    inter = np.repeat(pcm, 2)                          # identical L / R
    out = stream(AudioIngest(), inter, 48000, [960], channels=2)
    ref = stream(AudioIngest(), x, 48000, [960])
    n = min(len(out), len(ref))
    np.testing.assert_allclose(out[:n], ref[:n], atol=2e-4)


def test_rate_change_mid_stream_keeps_going():
    ing = AudioIngest()
    a = ing.convert(tone(48000, 0.2), 48000)
    b = ing.convert(tone(24000, 0.2), 24000)     # flushes the 48 kHz tail first
    c = ing.convert(tone(16000, 0.2), 16000)
    assert abs(len(a) + len(b) + len(c) - 3 * 3200) <= 40


def test_a_samples_arrival_is_when_real_time_brought_it_within_its_chunk():
    """Real-time chunks: each sample arrives when it was due (its chunk's arrival less the time after it),
    so where a frame's first sample falls in a chunk does not shift its latency. Never before the previous
    contiguous chunk arrived (a chunk ahead of real time), and the first chunk's samples arrive with it."""
    ring = AudioRing(max_samples=1000, sample_rate=100)
    ring.append(np.ones(10, np.float32), 0, arrival=1.0)
    ring.append(np.ones(10, np.float32), 10, arrival=1.1)      # real time: 10 samples in 0.1 s
    ring.append(np.ones(10, np.float32), 20, arrival=1.12)     # 5x faster than real time
    assert ring.arrival_of(0) == 1.0 and ring.arrival_of(9) == 1.0
    assert ring.arrival_of(10) == pytest.approx(1.0) and ring.arrival_of(15) == pytest.approx(1.05)
    assert ring.arrival_of(19) == pytest.approx(1.09)
    assert ring.arrival_of(20) == pytest.approx(1.1) and ring.arrival_of(29) == pytest.approx(1.11)


def test_ring_reads_stamps_and_gaps():
    ring = AudioRing(max_samples=1000)
    ring.append(np.ones(100, np.float32), 0, arrival=1.0)
    ring.append(2 * np.ones(100, np.float32), 150, arrival=2.0)   # 50-sample gap
    out = ring.read(90, 70)
    np.testing.assert_array_equal(out, np.r_[np.ones(10), np.zeros(50), 2 * np.ones(10)])
    assert ring.arrival_of(99) == 1.0 and ring.arrival_of(120) is None and ring.arrival_of(151) == 2.0
    assert ring.head == 250 and ring.covered(90, 70) == 20
    with pytest.raises(ValueError):
        ring.append(np.ones(5, np.float32), 200, arrival=3.0)
    ring.discard_before(120)
    assert ring.stored == 100 and not ring.read(0, 100).any()
    assert ring.append(np.ones(2000, np.float32), 250, arrival=4.0) == 900   # bounded
    assert ring.refused == 1100
    ring.clear(head=10)
    assert ring.stored == 0 and ring.head == 10


def test_convert_clip_is_the_streaming_conversion_with_its_tail():
    from realtime.audio.audio_ingest import convert_clip

    rng = np.random.default_rng(3)
    x = (rng.standard_normal(48000 * 2) * 3000).astype(np.int16)   # 1 s of 48 kHz stereo
    whole = convert_clip(x, 48000, 2)
    streamed = AudioIngest().convert(x, 48000, 2)
    assert len(whole) == 16000 and len(streamed) < len(whole)
    np.testing.assert_array_equal(whole[:len(streamed)], streamed)
    same = convert_clip(x[::2], 16000, 1)    # 16 kHz mono passes through, sample for sample
    np.testing.assert_array_equal(same, x[::2].astype(np.float32) / 32768.0)
