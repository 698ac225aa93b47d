"""The mel front end against the official numbers (golden file) and the official window loop."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import WAV2LIP_FACTS

from realtime.audio.mel import MEL_STEP, StreamingMel, mel_basis, mel_windows, melspectrogram, window_starts


@pytest.fixture(scope="module")
def golden():
    return np.load(WAV2LIP_FACTS / "golden_mel.npz")


def official_windows(mel: np.ndarray, fps: float) -> list[np.ndarray]:
    """The per-frame loop of the official inference.py, written out literally."""
    chunks, mult, i = [], 80.0 / fps, 0
    while True:
        start = int(i * mult)
        if start + MEL_STEP > mel.shape[1]:
            chunks.append(mel[:, mel.shape[1] - MEL_STEP:])
            return chunks
        chunks.append(mel[:, start:start + MEL_STEP])
        i += 1


def test_mel_basis_equals_official(golden):
    assert mel_basis().shape == (80, 401)
    assert np.abs(mel_basis() - golden["mel_basis"]).max() < 1e-7


def test_golden_mel(golden):
    mel = melspectrogram(golden["wav_int16"] / 32768.0)
    assert mel.shape == golden["mel"].shape
    assert np.abs(mel - golden["mel"]).max() < 1e-5
    # the edge columns are where librosa >= 0.10's zero padding differs: we must follow reflect
    assert np.abs(mel[:, :2] - golden["mel"][:, :2]).max() < 1e-5


def test_int16_input_is_scaled(golden):
    pcm = golden["wav_int16"]
    assert np.abs(melspectrogram(pcm) - melspectrogram(pcm / 32768.0)).max() < 1e-6


def test_golden_windows_at_25fps(golden):
    windows = mel_windows(golden["mel"], 25)
    assert windows.shape == golden["mel_chunks"].shape
    assert np.abs(windows - golden["mel_chunks"]).max() < 1e-6  # float32 of the float64 golden
    assert list(window_starts(golden["mel"].shape[1], 25)) == list(golden["mel_chunk_start"])


@pytest.mark.parametrize("fps", [25, 30, 29.97, 24, 23.976, 50, 60])
def test_window_rule_matches_official_loop(fps):
    rng = np.random.default_rng(int(fps * 100))
    for columns in (16, 17, 100, 257, 1001):
        mel = rng.uniform(-4, 4, size=(80, columns)).astype(np.float32)
        expected = official_windows(mel, fps)
        got = mel_windows(mel, fps)
        assert got.shape == (len(expected), 80, 16)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


def test_short_audio_gives_one_padded_window():
    mel = melspectrogram(np.zeros(1000))
    assert mel.shape[1] < 16
    windows = mel_windows(mel, 25)
    assert windows.shape == (len(window_starts(16, 25)), 80, 16)
    np.testing.assert_array_equal(windows[0, :, :mel.shape[1]], mel)
    assert (windows[0, :, mel.shape[1]:] == -4).all()


def test_matches_librosa_with_reflect_padding(speech_16k):
    librosa = pytest.importorskip("librosa")
    emphasised = np.append(speech_16k[0], speech_16k[1:] - 0.97 * speech_16k[:-1]).astype(np.float64)
    spec = np.abs(librosa.stft(emphasised, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect"))
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - 20
    reference = np.clip(8 * (db + 100) / 100 - 4, -4, 4)
    assert np.abs(melspectrogram(speech_16k) - reference).max() < 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_streaming_equals_offline_with_random_chunks(speech_16k, seed):
    rng = np.random.default_rng(seed)
    offline = melspectrogram(speech_16k)
    stream, parts, i = StreamingMel(), [], 0
    while i < len(speech_16k):
        n = int(rng.integers(1, 4001))
        parts.append(stream.push(speech_16k[i:i + n]))
        i += n
    live = np.concatenate(parts, axis=1)
    # everything before the end is final without knowing the stream will end
    assert live.shape[1] >= offline.shape[1] - 3
    assert np.abs(live - offline[:, :live.shape[1]]).max() <= 1e-4
    full = np.concatenate([live, stream.flush()], axis=1)
    assert full.shape == offline.shape
    assert np.abs(full - offline).max() <= 1e-4


def test_streaming_columns_are_final_as_soon_as_their_samples_arrive(speech_16k):
    stream = StreamingMel()
    assert stream.push(speech_16k[:400]).shape[1] == 0
    assert stream.push(speech_16k[400:401]).shape[1] == 1  # column 0 needs sample 400 (reflect pad)
    assert stream.push(speech_16k[401:599]).shape[1] == 0
    assert stream.push(speech_16k[599:600]).shape[1] == 1  # column 1 covers samples [-200, 600)
    assert stream.columns_emitted == 2


def test_streaming_one_sample_at_a_time_and_reset(golden):
    wav = golden["wav_int16"][:3000] / 32768.0
    stream = StreamingMel()
    parts = [stream.push(wav[i:i + 1]) for i in range(len(wav))] + [stream.flush()]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), melspectrogram(wav), atol=1e-4)
    with pytest.raises(RuntimeError):
        stream.push(wav[:10])
    stream.reset()
    again = np.concatenate([stream.push(wav), stream.flush()], axis=1)
    np.testing.assert_allclose(again, melspectrogram(wav), atol=1e-4)


def test_streaming_keeps_bounded_memory(speech_16k):
    stream = StreamingMel()
    for _ in range(20):
        for i in range(0, len(speech_16k), 320):
            stream.push(speech_16k[i:i + 320])
    assert len(stream._padded) < 2000


def test_frames_view_equals_sliding_window_view():
    """mel._frames is numpy's sliding window, HOP apart, cut to `count` (or to what fits), for the slices
    the streaming mel passes (any offset, so any start and length)."""
    from realtime.audio import mel

    signal = np.random.default_rng(3).standard_normal(5000)
    for start in (0, 1, 199, 777):
        for length in (mel.N_FFT, mel.N_FFT + 1, mel.N_FFT + mel.HOP - 1, mel.N_FFT + mel.HOP, 2000, 4000):
            piece = signal[start:start + length]
            for count in (1, 2, 3, 50):
                expected = np.lib.stride_tricks.sliding_window_view(piece, mel.N_FFT)[::mel.HOP][:count]
                got = mel._frames(piece, count)
                assert got.shape == expected.shape and np.array_equal(got, expected)
    with pytest.raises(ValueError):
        mel._frames(signal[:10], 1)
