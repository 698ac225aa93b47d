"""PyAV-based media I/O: decode anything to 16 kHz mono, write H.264 + AAC, clear errors."""
from __future__ import annotations

import av
import numpy as np
import pytest
from conftest import write_wav

from realtime.media_io import MediaError, Mp4Writer, iter_video_frames, load_audio, probe_video


def test_load_audio_resamples_any_rate_to_16k_mono(tmp_path):
    rate = 44100
    t = np.arange(rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = write_wav(tmp_path / "tone.wav", tone, rate)
    out = load_audio(path, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) <= 32
    # still a 440 Hz tone of the same level
    spectrum = np.abs(np.fft.rfft(out[1000:15000]))
    assert abs(np.argmax(spectrum) * 16000 / 14000 - 440) < 3
    assert np.sqrt(np.mean(out[1000:15000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_load_audio_from_bytes(speech_wav):
    assert len(load_audio(speech_wav.read_bytes())) == len(load_audio(speech_wav))


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"RIFF1234WAVEjunk" * 8, "not a media file"),
])
def test_load_audio_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=message) as info:
        load_audio(path)
    assert "bad.wav" in str(info.value)


def test_load_audio_missing_file(tmp_path):
    with pytest.raises(MediaError, match="no such file"):
        load_audio(tmp_path / "missing.mp3")


def test_video_without_audio_stream_is_reported(tmp_path):
    path = tmp_path / "silent.mp4"
    with Mp4Writer(path, 64, 48, 25) as out:
        for _ in range(5):
            out.write(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(path)


def test_mp4_round_trip(tmp_path):
    path = tmp_path / "clip.mp4"
    audio = (0.2 * np.sin(np.arange(16000) * 2 * np.pi * 300 / 16000)).astype(np.float32)
    with Mp4Writer(path, 96, 64, 30, audio=audio) as out:
        for i in range(30):
            out.write(np.full((64, 96, 3), (i * 8, 100, 200), np.uint8))
    info = probe_video(path)
    assert (info.width, info.height, info.fps) == (96, 64, 30.0)
    frames = list(iter_video_frames(path))
    assert len(frames) == 30
    assert np.abs(frames[10].astype(int) - (80, 100, 200)).max() < 6  # BGR order survives
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.duration / 1e6 == pytest.approx(1.0, abs=0.08)


def test_iter_video_frames_downscales(tmp_path):
    path = tmp_path / "big.mp4"
    with Mp4Writer(path, 320, 240, 25) as out:
        for _ in range(3):
            out.write(np.zeros((240, 320, 3), np.uint8))
    frames = list(iter_video_frames(path, max_height=120))
    assert frames[0].shape == (120, 160, 3)
