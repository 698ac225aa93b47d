"""Compositing a MouthPatch: official hard paste (parity) and the feathered paste (no seam)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from realtime.renderers.base import MouthPatch
from realtime.renderers.compositor import default_mask, paste, shifted


@pytest.fixture
def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)


@pytest.fixture
def patch() -> MouthPatch:
    img = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    return MouthPatch(img, (60, 200, 70, 190))


def test_official_is_a_hard_inter_linear_paste(frame, patch):
    out = paste(frame, patch, mode="official")
    y1, y2, x1, x2 = patch.box
    expected = frame.copy()
    expected[y1:y2, x1:x2] = cv2.resize(patch.image, (x2 - x1, y2 - y1))
    np.testing.assert_array_equal(out, expected)
    assert not np.shares_memory(out, frame)


def test_feather_has_no_seam_and_touches_only_the_lower_face(frame, patch):
    out = paste(frame, patch)
    y1, y2, x1, x2 = patch.box
    outside = np.ones(frame.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(out[outside], frame[outside])
    # The box border equals the frame (mask ~0 there): no seam.
    diff = np.abs(out.astype(int) - frame.astype(int))
    assert diff[y1, x1:x2].max() == 0 and diff[y2 - 1, x1:x2].max() <= 2
    assert diff[y1:y2, x1].max() <= 2 and diff[y1:y2, x2 - 1].max() <= 2
    # The upper face is untouched, the mouth area is the patch.
    assert diff[y1:y1 + (y2 - y1) // 3, x1:x2].max() == 0
    resized = cv2.resize(patch.image, (x2 - x1, y2 - y1))
    cy, cx = y1 + int(0.75 * (y2 - y1)), (x1 + x2) // 2
    assert np.abs(out[cy, cx].astype(int) - resized[cy - y1, cx - x1].astype(int)).max() <= 1


def test_feather_matches_a_float_blend(frame, patch):
    out = paste(frame, patch)
    y1, y2, x1, x2 = patch.box
    a = default_mask(y2 - y1, x2 - x1)[..., None]
    resized = cv2.resize(patch.image, (x2 - x1, y2 - y1)).astype(np.float32)
    ref = resized * a + frame[y1:y2, x1:x2].astype(np.float32) * (1 - a)
    assert np.abs(out[y1:y2, x1:x2].astype(np.float32) - ref).max() <= 1.0


def test_patch_alpha_and_strength(frame, patch):
    alpha = np.zeros((96, 96), np.float32)
    alpha[48:, :] = 1.0
    out = paste(frame, MouthPatch(patch.image, patch.box, alpha))
    y1, y2, x1, x2 = patch.box
    np.testing.assert_array_equal(out[y1:y1 + 60, x1:x2], frame[y1:y1 + 60, x1:x2])
    np.testing.assert_array_equal(paste(frame, patch, strength=0.0), frame)
    half = paste(frame, patch, strength=0.5).astype(int)
    full = paste(frame, patch).astype(int)
    mid = (y1 + int(0.75 * (y2 - y1)), (x1 + x2) // 2)
    expected = (full[mid] + frame[mid].astype(int)) / 2
    assert np.abs(half[mid] - expected).max() <= 1.5


def test_boxes_partly_outside_the_frame(frame, patch):
    for box in [(-40, 100, 200, 300), (200, 300, -30, 60)]:
        for mode in ("feather", "official"):
            out = paste(frame, MouthPatch(patch.image, box), mode=mode)
            assert out.shape == frame.shape
    off = paste(frame, MouthPatch(patch.image, (300, 400, 300, 400)))
    np.testing.assert_array_equal(off, frame)


def test_inplace_and_shift(frame, patch):
    target = frame.copy()
    assert paste(target, patch, inplace=True) is target
    moved = shifted(patch, 3, -2)
    assert moved.box == (63, 203, 68, 188) and moved.image is patch.image


def test_feather_paste_is_fast(patch):
    import time

    big = np.zeros((720, 720, 3), np.uint8)
    p = MouthPatch(patch.image, (200, 520, 200, 520))
    paste(big, p)
    t0 = time.perf_counter()
    for _ in range(50):
        paste(big, p)
    assert (time.perf_counter() - t0) / 50 < 0.02   # generous: shared CI cores
