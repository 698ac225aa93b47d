"""The default renderer's cheaper steps give the same pixels as the plain numpy calls they replace
(realtime/renderers/mouth_warp.py `_power`)."""
from __future__ import annotations

import numpy as np
import pytest
from test_default_renderer import synthetic_avatar

from realtime.renderers import mouth_warp
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
