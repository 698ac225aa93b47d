"""Avatar preparation: stable boxes, gap filling, ping-pong loop, cache, bad inputs, default avatar, CLI."""
from __future__ import annotations

import itertools
import wave
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from models.face_detection import mesh_models_available
from models.face_detection.model_files import INSTALL_HINT
from realtime.avatars import avatar_cache, avatar_prepare, face_tracking
from realtime.avatars.avatar import MOUTH_POINTS, Avatar, AvatarConfig, AvatarError, loop_index
from realtime.avatars.avatar_prepare import prepare_avatar, save_avatar
from realtime.avatars.default_avatar import DEFAULT_AVATAR, DEFAULT_AVATAR_TRACK, load_default_avatar
from realtime.avatars.face_tracking import detect_face_boxes
from realtime.avatars.track_smoothing import fill_gaps, smooth_series
from realtime.media_io import Mp4Writer

needs_mesh = pytest.mark.skipif(not mesh_models_available(), reason=INSTALL_HINT)


def write_clip(path: Path, frames, fps: float = 25.0) -> Path:
    h, w = frames[0].shape[:2]
    with Mp4Writer(path, w, h, fps) as out:
        for frame in frames:
            out.write(np.ascontiguousarray(frame))
    return path


@pytest.fixture(scope="module")
def default_avatar() -> Avatar:
    return load_default_avatar()


@pytest.fixture(scope="module")
def face_frames(default_avatar) -> np.ndarray:
    """30 frames of a gently moving head (the default avatar's idle motion), 512x512."""
    return np.array(default_avatar.frames[:30])


@pytest.fixture(scope="module")
def clip(tmp_path_factory, face_frames) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "face.mp4", face_frames)


# ---- loop ----


def test_pingpong_never_repeats_a_frame_at_the_turns():
    seq = [loop_index(t, 4) for t in range(14)]
    assert seq == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]
    assert all(abs(a - b) == 1 for a, b in itertools.pairwise(seq))
    assert [loop_index(t, 3, "forward") for t in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert loop_index(99, 1) == 0


# ---- smoothing and filling ----


def test_fill_gaps_interpolates_between_neighbours_and_holds_the_ends():
    v = np.array([[np.nan], [2.0], [np.nan], [np.nan], [8.0], [np.nan]])
    np.testing.assert_allclose(fill_gaps(v)[:, 0], [2, 2, 4, 6, 8, 8])


def test_centred_smoothing_has_no_lag_on_steady_motion():
    ramp = np.arange(40, dtype=float)[:, None] * 3.0
    out = smooth_series(ramp, 2.0)
    np.testing.assert_allclose(out[8:-8], ramp[8:-8], atol=1e-9)  # the official forward mean leads by 6 px
    noisy = np.random.default_rng(0).normal(0, 1, (400, 1))
    assert smooth_series(noisy, 2.0).std() < noisy.std() / 2.2  # at least the 5-box mean's sqrt(5)


@needs_mesh
def test_still_head_box_jitter_at_most_2px(tmp_path, face_frames):
    rng = np.random.default_rng(1)
    still = [np.clip(face_frames[0] + rng.normal(0, 3, face_frames[0].shape), 0, 255).astype(np.uint8)
             for _ in range(25)]
    avatar = prepare_avatar(write_clip(tmp_path / "still.mp4", still), use_cache=False)
    assert np.abs(np.diff(avatar.boxes.astype(int), axis=0)).max() <= 2
    assert np.abs(np.diff(avatar.mouth, axis=0)).max() <= 2


@needs_mesh
def test_blanked_frame_is_filled_from_neighbours(tmp_path, face_frames):
    frames = face_frames[:20].copy()
    frames[10] = 128
    found = face_tracking.track_faces(frames, face_tracking.avatar_detector(AvatarConfig()), len(frames)).found
    assert not found[10] and found[np.arange(20) != 10].all()
    boxes, mouth = detect_face_boxes(list(frames), AvatarConfig(smooth=False))
    assert boxes.dtype == np.int32 and boxes.shape == (20, 4) and mouth.shape == (20, len(MOUTH_POINTS), 2)
    assert np.abs(boxes[10] - (boxes[9] + boxes[11]) / 2).max() <= 1
    np.testing.assert_allclose(mouth[10], (mouth[9] + mouth[11]) / 2, atol=0.01)


@needs_mesh
def test_official_padding_is_applied(face_frames):
    plain, _ = detect_face_boxes(list(face_frames[:3]), AvatarConfig(pads=(0, 0, 0, 0)))
    padded, _ = detect_face_boxes(list(face_frames[:3]), AvatarConfig())
    np.testing.assert_array_equal(padded - plain, [[0, 10, 0, 0]] * 3)


# ---- prepare, crops, cache ----


def test_haar_detector_prepares_without_landmarks(tmp_path, clip):
    avatar = prepare_avatar(clip, use_cache=False, config=AvatarConfig(detector="haar"))
    assert avatar.mouth is None and avatar.masks is None and avatar.face_crops().shape == (30, 96, 96, 3)
    assert np.abs(np.diff(avatar.boxes.astype(int), axis=0)).max() <= 3


@needs_mesh
def test_prepare_video_and_face_crops(tmp_path, clip):
    avatar = prepare_avatar(clip, cache_dir=tmp_path)
    assert len(avatar) == 30 and avatar.fps == 25.0 and avatar.loop == "pingpong" and avatar.source == "face.mp4"
    assert avatar.frames.shape == (30, 512, 512, 3) and not avatar.frames.flags.writeable
    crops = avatar.face_crops()
    y1, y2, x1, x2 = avatar.boxes[3]
    np.testing.assert_array_equal(crops[3], cv2.resize(np.array(avatar.frames[3][y1:y2, x1:x2]), (96, 96)))
    assert avatar.face_crops() is crops and avatar.face_crops(48).shape == (30, 48, 48, 3)
    assert avatar.masks.shape == (30, 96, 96) and avatar.masks[:, 80, 48].min() > 200  # chin area
    assert avatar.masks[:, 5, 48].max() == 0  # forehead stays untouched


@needs_mesh
def test_cache_round_trip_is_bit_identical_and_invalidates(tmp_path, clip, monkeypatch):
    calls = []
    real = avatar_prepare.prepare_fresh
    monkeypatch.setattr(avatar_prepare, "prepare_fresh", lambda *a: calls.append(1) or real(*a))
    first = prepare_avatar(clip, cache_dir=tmp_path)
    second = prepare_avatar(clip, cache_dir=tmp_path, config=AvatarConfig(loop="forward"))
    assert len(calls) == 1 and second.loop == "forward"
    assert isinstance(second.frames, np.memmap)
    for name in ("frames", "boxes", "mouth", "masks"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert np.array_equal(first.face_crops(), second.face_crops())
    prepare_avatar(clip, cache_dir=tmp_path, config=AvatarConfig(pads=(0, 20, 0, 0)))  # parameter change
    assert len(calls) == 2
    changed = tmp_path / "changed.mp4"
    changed.write_bytes(clip.read_bytes() + b"\0")  # same name pattern, different content
    prepare_avatar(changed, cache_dir=tmp_path)
    assert len(calls) == 3
    prepare_avatar(clip, cache_dir=tmp_path)
    assert len(calls) == 3


@needs_mesh
def test_cache_dir_env_and_damaged_entry(tmp_path, clip, monkeypatch):
    monkeypatch.setenv(avatar_cache.CACHE_ENV, str(tmp_path / "env"))
    prepare_avatar(clip)
    (entry,) = (tmp_path / "env").iterdir()
    (entry / "boxes.npy").write_bytes(b"garbage")
    again = prepare_avatar(clip)  # a damaged entry is prepared again, not trusted
    assert len(again) == 30


@needs_mesh
def test_prepared_folder_loads_directly(tmp_path, clip):
    avatar = prepare_avatar(clip, use_cache=False)
    save_avatar(avatar, tmp_path / "avatars" / "me")
    loaded = prepare_avatar(tmp_path / "avatars" / "me")
    assert np.array_equal(loaded.frames, avatar.frames) and np.array_equal(loaded.boxes, avatar.boxes)
    header = avatar_cache.load(tmp_path / "avatars" / "me")[1]
    header["version"] = 0
    (tmp_path / "avatars" / "me" / "avatar.json").write_text(__import__("json").dumps(header))
    with pytest.raises(AvatarError, match="prepare it again"):
        prepare_avatar(tmp_path / "avatars" / "me")


@needs_mesh
def test_photo_gets_idle_motion_and_huge_inputs_are_downscaled(tmp_path, face_frames):
    big = cv2.resize(face_frames[0], (1080, 1080), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((1440, 2560, 3), 90, np.uint8)
    canvas[180:1260, 740:1820] = big
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), canvas)
    avatar = prepare_avatar(photo, use_cache=False, config=AvatarConfig(still_seconds=0.4))
    assert avatar.size == (1280, 720) and len(avatar) == 10
    assert np.abs(avatar.frames[0].astype(int) - avatar.frames[5]).max() > 0  # not frozen
    assert avatar.mouth is not None


# ---- bad inputs ----


def _wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(1600, np.int16).tobytes())
    return path


def _zero_frame_video(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    return path


def test_each_bad_input_gets_its_message(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_text("this is not a video")
    blank = write_clip(tmp_path / "blank.mp4", [np.full((128, 128, 3), 200, np.uint8)] * 3)
    cases = [
        (tmp_path / "missing.mp4", "missing.mp4: no such file"),
        (empty, "empty.mp4: the file is empty"),
        (junk, "junk.mp4: not a video or image file"),
        (_wav(tmp_path / "speech.wav"), "speech.wav: contains no video stream"),
        (_zero_frame_video(tmp_path / "zero.avi"), "zero.avi: the video stream holds zero frames"),
        (blank, "blank.mp4: no face found in any of its 3 frame"),
        (tmp_path, "not a prepared avatar"),
    ]
    for path, message in cases:
        with pytest.raises(AvatarError, match=message):
            prepare_avatar(path, use_cache=False)


def test_face_too_small_is_named(tmp_path, face_frames):
    photo = tmp_path / "small.png"
    cv2.imwrite(str(photo), face_frames[0])
    with pytest.raises(AvatarError, match=r"small.png: the face is only \d+ px tall; at least 400 px"):
        prepare_avatar(photo, use_cache=False, config=AvatarConfig(min_face=400, still_seconds=0))


# ---- the embedded default avatar ----


def test_default_avatar_is_small_and_has_a_face_in_every_frame(default_avatar):
    assert DEFAULT_AVATAR.stat().st_size + DEFAULT_AVATAR_TRACK.stat().st_size <= 3 * 1024 * 1024
    a = default_avatar
    assert len(a) >= 50 and a.fps == 25.0 and a.loop == "pingpong"
    assert a.boxes.shape == (len(a), 4) and a.mouth.shape == (len(a), 7, 2) and a.masks.shape == (len(a), 96, 96)
    heights = a.boxes[:, 1] - a.boxes[:, 0]
    assert heights.min() > 64
    if mesh_models_available():
        from models.face_detection import create_detector

        det, prev = create_detector("mesh"), None
        for i in range(len(a)):
            prev = det.detect(np.asarray(a.frames[i]), prev)
            assert prev is not None, f"no face in default avatar frame {i}"
            y1, y2, x1, x2 = a.boxes[i]
            cx, cy = (prev.box[0] + prev.box[2]) / 2, (prev.box[1] + prev.box[3]) / 2
            assert x1 < cx < x2 and y1 < cy < y2


def test_default_avatar_mouth_is_closed(default_avatar):
    m = default_avatar.mouth
    width = np.linalg.norm(m[:, 1] - m[:, 0], axis=1)
    gap = m[:, 4, 1] - m[:, 3, 1]  # lower lip top (inner) - upper lip bottom (inner)
    assert (gap < 0.06 * width).all()


def test_default_avatar_loop_seam_is_no_bigger_than_a_step(default_avatar):
    frames = np.asarray(default_avatar.frames).astype(np.int16)
    steps = [np.abs(frames[i + 1] - frames[i]).mean() for i in range(len(frames) - 1)]
    for loop in ("pingpong", "forward"):
        n = len(frames)
        period = 2 * (n - 1) if loop == "pingpong" else n
        last, first = loop_index(period - 1, n, loop), loop_index(period, n, loop)
        assert np.abs(frames[last] - frames[first]).mean() <= max(steps), loop
    assert min(steps) > 0  # it moves: never frozen


# ---- CLI ----


@needs_mesh
def test_cli_prepare_avatar_writes_a_loadable_folder(tmp_path, clip, capsys):
    from cli.main import main

    out = tmp_path / "avatars" / "name"
    assert main(["prepare-avatar", str(clip), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--loop", "forward"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = prepare_avatar(out)
    assert len(loaded) == 30 and loaded.loop == "forward" and loaded.mouth is not None
    assert main(["prepare-avatar", str(tmp_path / "nope.mp4"), "-o", str(out)]) == 1
    assert "nope.mp4: no such file" in capsys.readouterr().err
