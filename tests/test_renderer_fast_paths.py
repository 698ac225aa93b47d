"""The default renderer's cheaper steps give the same pixels as the plain numpy calls they replace
(realtime/renderers/mouth_warp.py `_power`, mouth_params.py `_envelope` and `_pad_bins`, compositor.py's blend
into the frame's region)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_default_renderer import synthetic_avatar

from realtime.audio.mel import MEL_STEP, N_MELS
from realtime.renderers import compositor, mouth_params, mouth_warp
from realtime.renderers.base import MouthPatch
from realtime.renderers.default import DefaultRenderer


@pytest.mark.parametrize("exponent", [0.55, 1.0, 1.3, 2.0])
def test_power_equals_numpys_power(exponent):
    s = np.linspace(-1.6, 1.6, 97, dtype=np.float32)[None, :] * np.linspace(0.2, 1.0, 33, dtype=np.float32)[:, None]
    base = np.clip(1.0 - s * s, 0.0, 1.0)
    assert (base == 0).any() and (base > 0).any()
    assert np.array_equal(mouth_warp._power(base, exponent), base ** np.float32(exponent))


@pytest.mark.parametrize("size", [320, 160])
def test_rendered_patches_equal_the_plain_path(monkeypatch, size):
    """Every patch of a speaking sequence (opening, spread, round, closure, bite, teeth) is the same with the
    plain calls; at 160 px the patch box is clipped by the frame border."""
    avatar = synthetic_avatar(n_frames=6, size=size)
    renderer = DefaultRenderer()
    rng = np.random.default_rng(3)
    params = rng.uniform(0.0, 1.0, (24, 6)).astype(np.float32)
    params[::4, 3:] = 0.0   # some frames without closure, bite or teeth
    indices = np.arange(24) % len(avatar.frames)
    fast = renderer.render_params(avatar, indices, params)
    monkeypatch.setattr(mouth_warp, "_power", lambda base, exponent: base ** np.float32(exponent))
    plain = renderer.render_params(avatar, indices, params)
    moved = 0
    for a, b, i in zip(fast, plain, indices, strict=True):
        assert a.box == b.box
        assert np.array_equal(a.image, b.image)
        y1, y2, x1, x2 = a.box
        moved += not np.array_equal(a.image, avatar.frames[i][y1:y2, x1:x2])
    assert moved >= 20


def _liftered(db: np.ndarray, keep: int) -> np.ndarray:
    """The liftering as the sum it is: envelope[b, i, t] = sum_j L[i, j] db[b, j, t]."""
    return np.einsum("ij,bjt->bit", mouth_params._lifter_matrix(db.shape[1], keep), db)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_envelope_is_the_liftering_sum(batch):
    rng = np.random.default_rng(batch)
    db = (rng.uniform(-40.0, 40.0, (batch, N_MELS, MEL_STEP))).astype(np.float32)
    got = mouth_params._envelope(db, 28)
    assert got.shape == (batch, N_MELS, MEL_STEP)
    np.testing.assert_allclose(got, _liftered(db, 28), rtol=0, atol=1e-9)


def _np_pad(e: np.ndarray) -> np.ndarray:
    return np.pad(e, ((0, 0), (1, 1), (0, 0)), mode="constant", constant_values=-np.inf)


@pytest.mark.parametrize("shape", [(1, 20, 16), (3, 1, 16), (2, 7, 1)])
def test_pad_bins_is_nps_pad(shape):
    e = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    e[0, 0, 0] = -np.inf
    got = mouth_params._pad_bins(e)
    assert got.dtype == e.dtype
    np.testing.assert_array_equal(got, _np_pad(e))


def test_mouth_params_are_the_same_as_with_the_liftering_sum_and_nps_pad(monkeypatch):
    """Per window and per batch, on speech-like mel windows (formant bands over silence and noise): the
    parameters do not move."""
    rng = np.random.default_rng(11)
    bins = np.arange(N_MELS)[None, :, None]
    mels = []
    for k in range(40):
        formants = sum(np.exp(-0.5 * ((bins - c) / 3.0) ** 2) for c in rng.uniform(5, 70, 3))
        level = rng.uniform(0.0, 1.0, (1, 1, MEL_STEP)) * (k % 5 != 0)
        mels.append(-4.0 + 3.5 * level * formants + 0.2 * rng.standard_normal((1, N_MELS, MEL_STEP)))
    windows = np.concatenate(mels).astype(np.float32)
    config = mouth_params.MouthParamsConfig()
    fast = [mouth_params.mouth_params(windows[s:s + b], config) for b in (1, 8) for s in range(0, 40, b)]
    monkeypatch.setattr(mouth_params, "_envelope", _liftered)
    monkeypatch.setattr(mouth_params, "_pad_bins", _np_pad)
    plain = [mouth_params.mouth_params(windows[s:s + b], config) for b in (1, 8) for s in range(0, 40, b)]
    assert any(float(p[:, 0].max()) > 0.1 for p in plain)   # some windows open the mouth
    for a, b in zip(fast, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _blend_by_copies(frame: np.ndarray, image: np.ndarray, box: tuple[int, int, int, int],
                     alpha: np.ndarray) -> np.ndarray:
    """The feathered paste as separate arrays: the region and the patch copied out, blended into a new
    array, assigned back (box inside the frame, patch at the box's size)."""
    out = frame.copy()
    y1, y2, x1, x2 = box
    region = np.ascontiguousarray(out[y1:y2, x1:x2])
    out[y1:y2, x1:x2] = cv2.blendLinear(np.ascontiguousarray(image), region, alpha, np.float32(1.0) - alpha)
    return out


@pytest.mark.parametrize("strength", [1.0, 0.35])
@pytest.mark.parametrize("with_alpha", [True, False])
def test_paste_blends_into_the_region_as_a_blend_of_copies(strength, with_alpha):
    rng = np.random.default_rng(4)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    box = (40, 90, 30, 100)
    alpha = rng.random((50, 70)).astype(np.float32) if with_alpha else compositor.default_mask(50, 70)
    patch = MouthPatch(image=image, box=box, alpha=alpha if with_alpha else None)
    got = compositor.paste(frame, patch, strength=strength)
    expected = _blend_by_copies(frame, image, box, np.ascontiguousarray(alpha * np.float32(strength)))
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, frame)
    inplace = frame.copy()
    assert compositor.paste(inplace, patch, strength=strength, inplace=True) is inplace
    np.testing.assert_array_equal(inplace, expected)
