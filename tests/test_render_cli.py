"""`lipsync render` end to end on a 2 s clip with a checkpoint in the official layout built here."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import write_wav

from cli.main import main
from realtime.audio.mel import window_starts
from realtime.media_io import Mp4Writer


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory) -> Path:
    from models.wav2lip import Wav2Lip

    torch.manual_seed(0)
    model = Wav2Lip()
    path = tmp_path_factory.mktemp("ckpt") / "wav2lip_gan.pth"
    state = {"module." + k: v for k, v in model.state_dict().items()}  # DataParallel-style keys
    torch.save({"state_dict": state, "optimizer": None, "global_step": 1, "global_epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory) -> Path:
    """A 1.2 s, 160x128 clip at 25 fps with a moving bright 'face' rectangle."""
    path = tmp_path_factory.mktemp("face") / "face.mp4"
    with Mp4Writer(path, 160, 128, 25) as out:
        for i in range(30):
            frame = np.full((128, 160, 3), 40, np.uint8)
            frame[20 + i % 4:110, 40:120] = (90, 140, 200)
            out.write(frame)
    return path


@pytest.fixture(scope="module")
def speech_2s(speech_16k, tmp_path_factory) -> Path:
    return write_wav(tmp_path_factory.mktemp("audio") / "speech2s.wav", speech_16k[:32000], 16000)


def test_render_cli_writes_synced_mp4(official_checkpoint, face_clip, speech_2s, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    rc = main(["render", "--face", str(face_clip), "--audio", str(speech_2s), "--checkpoint",
               str(official_checkpoint), "-o", str(out), "--box", "10", "120", "30", "130", "--batch-size", "16"])
    assert rc == 0, capsys.readouterr().err
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio
        assert (video.codec_context.width, video.codec_context.height) == (160, 128)
        assert float(video.average_rate) == pytest.approx(25)
        frames = sum(1 for _ in container.decode(video))
        assert len(audio) == 1 and audio[0].codec_context.name == "aac"
        duration = container.duration / 1e6
    # 2.0 s of audio -> 161 mel columns -> the official rule stops once a full window no longer fits
    # (start 147 + 16 > 161): 47 frames, the last one with the clamped final window
    assert frames == len(window_starts(161, 25)) == 47
    assert duration == pytest.approx(2.0, abs=0.1)  # the audio track is kept whole


def test_render_cli_photo_input(official_checkpoint, speech_2s, tmp_path):
    import cv2

    photo = tmp_path / "face.png"
    img = np.full((100, 100, 3), 60, np.uint8)
    img[10:90, 20:80] = (80, 120, 190)
    cv2.imwrite(str(photo), img)
    out = tmp_path / "photo.mp4"
    assert main(["render", "--face", str(photo), "--audio", str(speech_2s), "--checkpoint", str(official_checkpoint),
                 "-o", str(out), "--box", "0", "-1", "0", "-1", "--fps", "30"]) == 0
    with av.open(str(out)) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(30)


def test_render_cli_missing_file(tmp_path, capsys, speech_2s, face_clip):
    rc = main(["render", "--face", str(face_clip), "--audio", str(speech_2s), "--checkpoint",
               str(tmp_path / "nope.pth"), "-o", str(tmp_path / "o.mp4")])
    assert rc == 2
    assert "nope.pth" in capsys.readouterr().err


def test_render_cli_bad_checkpoint(tmp_path, capsys, speech_2s, face_clip):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    rc = main(["render", "--face", str(face_clip), "--audio", str(speech_2s), "--checkpoint", str(bad),
               "-o", str(tmp_path / "o.mp4"), "--box", "0", "-1", "0", "-1"])
    assert rc == 1
    assert "broken.pth" in capsys.readouterr().err


def test_render_cli_undecodable_audio(official_checkpoint, tmp_path, capsys, face_clip):
    bad = tmp_path / "speech.mp3"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    rc = main(["render", "--face", str(face_clip), "--audio", str(bad), "--checkpoint", str(official_checkpoint),
               "-o", str(tmp_path / "o.mp4"), "--box", "0", "-1", "0", "-1"])
    assert rc == 1
    assert "speech.mp3" in capsys.readouterr().err


def test_render_cli_feathered_paste(official_checkpoint, face_clip, speech_2s, tmp_path):
    outputs = {}
    for paste in ("official", "feather"):
        out = tmp_path / f"{paste}.mp4"
        assert main(["render", "--face", str(face_clip), "--audio", str(speech_2s), "--checkpoint",
                     str(official_checkpoint), "-o", str(out), "--box", "10", "120", "30", "130",
                     "--paste", paste]) == 0
        with av.open(str(out)) as container:
            outputs[paste] = [f.to_ndarray(format="bgr24").astype(int) for f in container.decode(video=0)]
    official, feather = outputs["official"], outputs["feather"]
    assert len(feather) == len(official) == 47
    inside = np.zeros(official[0].shape[:2], bool)
    inside[10:120, 30:130] = True
    diff = np.abs(feather[10] - official[10])
    assert diff[~inside].mean() < 1.0  # both pastes stay inside the face box
    assert diff[inside].mean() > 2.0   # and the feathered one blends instead of overwriting it
