"""`lipsync render` without weights: the built-in renderer, a photo or a video + any speech file -> mp4.

The photo is the embedded default avatar's first frame saved as a PNG (a 512 px face the detector finds),
the speech comes from espeak-ng (tests/conftest.py) with 1.5 s of silence in the middle. What a user
would check on the file: H.264 + AAC, one frame per 1/25 s of speech, the mouth moving while the avatar
speaks and still while it does not (read back from the output by the face-mesh detector).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from conftest import write_wav

from cli.main import main
from models.face_detection import mesh_models_available
from models.face_detection.model_files import INSTALL_HINT
from realtime.audio.mel import SAMPLE_RATE, mel_windows, melspectrogram
from realtime.avatars.avatar import AvatarConfig
from realtime.avatars.default_avatar import load_default_avatar
from realtime.avatars.face_tracking import detect_face_boxes
from realtime.media_io import Mp4Writer
from realtime.offline_builtin import frame_windows

REPO = Path(__file__).resolve().parents[1]
FPS = 25

needs_mesh = pytest.mark.skipif(not mesh_models_available(), reason=INSTALL_HINT)


def encode_audio(samples: np.ndarray, path: Path, codec: str) -> Path:
    """16 kHz float32 mono -> a compressed file (mp3, ogg/opus, ...) through PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=48000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = None
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="mono",
                                      rate=48000, frame_size=stream.codec_context.frame_size or 1152)
        for out in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(out))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def default_frames() -> np.ndarray:
    return np.array(load_default_avatar().frames[:50])


@pytest.fixture(scope="module")
def photo(tmp_path_factory, default_frames) -> Path:
    path = tmp_path_factory.mktemp("photo") / "presenter.png"
    cv2.imwrite(str(path), default_frames[0])
    return path


@pytest.fixture(scope="module")
def speech_mp3(tmp_path_factory, speech_with_gap_16k) -> Path:
    return encode_audio(speech_with_gap_16k, tmp_path_factory.mktemp("audio") / "talk.mp3", "libmp3lame")


def read_output(path: Path) -> dict:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        info = {"video_codec": video.codec_context.name, "audio_codec": audio.codec_context.name,
                "fps": float(video.average_rate), "size": (video.codec_context.width, video.codec_context.height)}
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video)]
    with av.open(str(path)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
        info["audio_seconds"] = samples / container.streams.audio[0].sample_rate
    info["frames"] = frames
    return info


def inner_lip_gap(frames: list[np.ndarray]) -> np.ndarray:
    """Per frame: distance between the inner upper and inner lower lip, as the face mesh reads it, in px."""
    _boxes, mouth = detect_face_boxes(frames, AvatarConfig(detector="mesh", smooth=False), source="output")
    assert mouth is not None
    return np.asarray(mouth[:, 4, 1] - mouth[:, 3, 1], dtype=float)


@needs_mesh
def test_photo_and_mp3_render_to_a_talking_mp4_without_weights(photo, speech_mp3, speech_with_gap_16k, tmp_path,
                                                               capsys, artifacts_dir):
    out = artifacts_dir / "render_builtin_photo.mp4"
    rc = main(["render", "--face", str(photo), "--audio", str(speech_mp3), "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "built-in renderer" in captured.out
    # Progress: one bar while the face is prepared, then one while frames are rendered, each finished.
    assert "preparing the face [##############################] 100/100" in captured.err, captured.err
    assert "rendering [##############################]" in captured.err, captured.err
    info = read_output(out)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert info["fps"] == pytest.approx(FPS) and info["size"] == (512, 512)
    speech_seconds = len(speech_with_gap_16k) / SAMPLE_RATE
    frames = info["frames"]
    assert len(frames) == round(speech_seconds * FPS)
    video_seconds = len(frames) / FPS
    assert abs(video_seconds - speech_seconds) <= 1 / FPS
    # The AAC track holds the whole speech (mp3 and AAC each add at most a few ms of codec delay).
    assert abs(info["audio_seconds"] - speech_seconds) <= 1 / FPS, (info["audio_seconds"], speech_seconds)

    # The mouth on the output: open and moving while speaking, closed in the silent gap.
    gap = inner_lip_gap(frames)
    first_end = np.flatnonzero(np.abs(speech_with_gap_16k[: len(speech_with_gap_16k) // 2]) > 1e-3)[-1] / SAMPLE_RATE
    t = np.arange(len(frames)) / FPS
    talking = gap[(t > 0.3) & (t < first_end - 0.1)]
    silent = gap[(t > first_end + 0.3) & (t < first_end + 1.3)]
    print(f"inner lip gap px: talking mean {talking.mean():.2f} max {talking.max():.2f} std {talking.std():.2f}; "
          f"silent mean {silent.mean():.2f} max {silent.max():.2f} std {silent.std():.2f}")
    assert talking.max() >= silent.max() + 4.0     # the mouth opens several px while speaking
    assert talking.std() >= 3 * max(silent.std(), 0.3)  # and keeps moving, while it rests in the gap
    assert talking.mean() >= silent.mean() + 1.5


def test_no_face_photo_is_a_clear_error_with_nonzero_exit(tmp_path, speech_wav):
    blank = tmp_path / "wall.png"
    yy, xx = np.mgrid[0:256, 0:256]
    cv2.imwrite(str(blank), np.dstack([xx, yy, (xx + yy) // 2]).astype(np.uint8))
    out = tmp_path / "never.mp4"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "render", "--face", str(blank), "--audio",
                           str(speech_wav), "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "lipsync render: " in proc.stderr and "wall.png" in proc.stderr and "no face" in proc.stderr, proc.stderr
    assert not out.exists()


def test_unreadable_audio_is_a_clear_error(photo, tmp_path, capsys):
    bad = tmp_path / "speech.ogg"
    bad.write_bytes(b"OggS not really" * 50)
    rc = main(["render", "--face", str(photo), "--audio", str(bad), "-o", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "speech.ogg" in err and "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--renderer", "wav2lip"], "--renderer wav2lip needs --checkpoint"),
    (["--renderer", "builtin", "--checkpoint", "x.pth"], "--checkpoint is for --renderer wav2lip"),
    (["--box", "0", "-1", "0", "-1"], "--box is for --renderer wav2lip"),
])
def test_renderer_choice_contradictions_are_usage_errors(photo, speech_wav, tmp_path, capsys, flags, message):
    rc = main(["render", "--face", str(photo), "--audio", str(speech_wav), "-o", str(tmp_path / "o.mp4"), *flags])
    assert rc == 2
    assert message in capsys.readouterr().err


@needs_mesh
def test_video_input_plays_its_frames_for_the_speech(default_frames, speech_16k, tmp_path):
    clip = tmp_path / "clip.mp4"
    with Mp4Writer(clip, 512, 512, FPS) as writer:
        for frame in default_frames[:30]:
            writer.write(frame)
    speech = write_wav(tmp_path / "two_seconds.wav", speech_16k[: 2 * SAMPLE_RATE], SAMPLE_RATE)
    out = tmp_path / "video.mp4"
    assert main(["render", "--renderer", "builtin", "--face", str(clip), "--audio", str(speech), "-o", str(out),
                 "--max-height", "384"]) == 0
    info = read_output(out)
    assert len(info["frames"]) == 2 * FPS and info["size"] == (384, 384)
    assert info["audio_codec"] == "aac"


def test_frame_windows_cover_the_whole_speech_and_repeat_the_last_official_window(speech_16k):
    official = mel_windows(melspectrogram(speech_16k), FPS)
    windows = frame_windows(speech_16k, FPS)
    assert len(windows) == round(len(speech_16k) / SAMPLE_RATE * FPS) > len(official)
    np.testing.assert_array_equal(windows[: len(official)], official)
    np.testing.assert_array_equal(windows[len(official):], np.repeat(official[-1:], len(windows) - len(official), 0))
    assert len(frame_windows(np.zeros(800, np.float32), FPS)) == 1  # 50 ms of audio still gets a frame
