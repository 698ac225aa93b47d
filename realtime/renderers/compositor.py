"""Paste a MouthPatch onto an avatar frame: feathered (default) or the official hard paste.

- "official": `cv2.resize(image, (x2 - x1, y2 - y1))` (INTER_LINEAR) and overwrite the box, exactly as the
  official inference.py does (parity; it leaves a visible seam at the box edge).
- "feather": the resized patch is blended through a soft mask: the patch's own alpha if it has one,
  else a default mask that covers the lower face and fades to zero at every box edge, so no seam shows.
  `strength` scales the mask (speech onset / offset ramps).

Only the box region is touched; the default masks are computed once per box size.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from realtime.renderers.base import MouthPatch

MODES = ("feather", "official")


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    result: np.ndarray = x * x * (3.0 - 2.0 * x)
    return result


@lru_cache(maxsize=64)
def default_mask(h: int, w: int) -> np.ndarray:
    """(h, w) float32 lower-face mask: 0 above ~45% of the box height, 1 over the mouth and jaw,
    fading to 0 over the last ~12% towards the left, right and bottom edges."""
    y = (np.arange(h, dtype=np.float32) + 0.5) / max(h, 1)
    x = (np.arange(w, dtype=np.float32) + 0.5) / max(w, 1)
    top = _smoothstep((y - 0.42) / 0.18)            # rises from 0.42 h to 0.60 h
    bottom = _smoothstep((1.0 - y) / 0.10)          # falls over the last 10% of the height
    sides = _smoothstep(np.minimum(x, 1.0 - x) / 0.14)
    mask: np.ndarray = ((top * bottom)[:, None] * sides[None, :]).astype(np.float32)
    mask.setflags(write=False)
    return mask


def _clip_box(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int, int, int]:
    """Clip (y1, y2, x1, x2) to the frame; also return the matching crop of the full-box patch."""
    y1, y2, x1, x2 = (int(v) for v in box)
    H, W = shape[:2]
    cy1, cy2, cx1, cx2 = max(y1, 0), min(y2, H), max(x1, 0), min(x2, W)
    return cy1, cy2, cx1, cx2, cy1 - y1, cy2 - y1, cx1 - x1, cx2 - x1


def paste(frame: np.ndarray, patch: MouthPatch, mode: str = "feather", strength: float = 1.0,
          inplace: bool = False) -> np.ndarray:
    """Return `frame` with `patch` pasted (a copy unless inplace=True)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = frame if inplace else frame.copy()
    y1, y2, x1, x2 = (int(v) for v in patch.box)
    h, w = y2 - y1, x2 - x1
    if h <= 0 or w <= 0 or strength <= 0.0:
        return out
    cy1, cy2, cx1, cx2, py1, py2, px1, px2 = _clip_box(patch.box, out.shape)
    if cy2 <= cy1 or cx2 <= cx1:
        return out
    image = patch.image
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    resized = image if image.shape[:2] == (h, w) else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    resized = resized[py1:py2, px1:px2]
    region = out[cy1:cy2, cx1:cx2]
    if mode == "official" and strength >= 1.0:
        region[...] = resized
        return out
    if mode == "official":
        alpha: np.ndarray = np.full(region.shape[:2], strength, dtype=np.float32)
    elif patch.alpha is not None:
        alpha = patch.alpha.astype(np.float32, copy=False)
        if alpha.shape != (h, w):
            alpha = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)
        alpha = np.clip(alpha[py1:py2, px1:px2], 0.0, 1.0)
        if strength < 1.0:
            alpha = alpha * np.float32(strength)
    else:
        alpha = default_mask(h, w)[py1:py2, px1:px2]
        if strength < 1.0:
            alpha = alpha * np.float32(strength)
    alpha = np.ascontiguousarray(alpha, dtype=np.float32)
    # Blended straight into the frame's region (OpenCV takes the strided view as it is; each pixel
    # depends on its own inputs only, so reading and writing the region in one pass is safe): no copy
    # of the region in, none of the result out.
    blended = cv2.blendLinear(resized, region, alpha, np.float32(1.0) - alpha, dst=region)
    if blended is not region:   # OpenCV made a new array (it does not for a matching uint8 view)
        region[...] = blended
    return out


def shifted(patch: MouthPatch, dy: int, dx: int) -> MouthPatch:
    """The same patch moved by (dy, dx) pixels (re-showing a held mouth on a frame whose face moved)."""
    if dy == 0 and dx == 0:
        return patch
    y1, y2, x1, x2 = patch.box
    return MouthPatch(image=patch.image, box=(y1 + dy, y2 + dy, x1 + dx, x2 + dx), alpha=patch.alpha)
