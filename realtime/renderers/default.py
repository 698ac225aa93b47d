"""The no-weights default renderer: makes any avatar with lip landmarks speak, from the mel windows alone.

Nothing is downloaded or learned: mouth_params.py turns each frame's mel window (from one frame before
the frame to 72.5 ms after it) into visemes [open, spread, round, close, bite, teeth] (formants and band
levels of the spectral envelope, consonants relative to the loud columns around them, smoothed
statelessly inside the window), and mouth_warp.py deforms the avatar frame's own mouth and jaw
accordingly (lower lip and chin move down, lips widen, round, press together or meet the upper teeth, an
interior with upper and lower teeth and a tongue opens), returning a patch over the mouth and jaw only,
with its own feathered alpha: nothing outside that region changes.

Sharing: the parameter mapping has no per-stream state, and the per-avatar data (mouth frames, patch
boxes, alphas, interior colours) is read-only after `prepare`, so one instance can serve any number of
sessions and avatars from any number of threads; results do not depend on how frames are batched.

Cost: bench/default_renderer.py; a frame at rest (no opening, closure or width change) returns the
avatar's own pixels without any warp.
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

from realtime.audio.mel import MEL_STEP, N_MELS
from realtime.avatars.avatar import Avatar
from realtime.renderers.base import MouthPatch, MouthRenderer, RendererTraits
from realtime.renderers.mouth_params import MouthParamsConfig, mouth_params
from realtime.renderers.mouth_warp import (
    FrameGeometry,
    MouthWarpConfig,
    Palette,
    estimate_palette,
    feather_alpha,
    frame_geometry,
    rendered_landmarks,
    warp_mouth,
)

log = logging.getLogger(__name__)

MIN_HALF_WIDTH_PX = 4.0  # a mouth narrower than 8 px cannot be deformed meaningfully


class MissingLandmarksError(ValueError):
    """The avatar has no usable lip landmarks, which the default renderer needs."""


@dataclass(frozen=True)
class DefaultRendererConfig:
    params: MouthParamsConfig = field(default_factory=MouthParamsConfig)
    warp: MouthWarpConfig = field(default_factory=MouthWarpConfig)


@dataclass(frozen=True)
class _Prepared:
    """Everything per avatar that does not depend on audio (read-only once built)."""
    points: np.ndarray                      # (N, 7, 2) float32, gaps filled
    geometry: tuple[FrameGeometry, ...]     # per frame
    palette: Palette                        # one per avatar: colours must not flicker between frames
    alphas: tuple[np.ndarray, ...]          # per frame feathered patch alpha (shared between equal boxes)


def _alpha_key(geom: FrameGeometry, shape: tuple[int, ...]) -> tuple[int, int, bool, bool, bool, bool]:
    """Alphas depend only on the box size and on which edges are clipped by the frame border."""
    y1, y2, x1, x2 = geom.box
    return y2 - y1, x2 - x1, y1 == 0, x1 == 0, y2 == shape[0], x2 == shape[1]


def _describe(avatar: Avatar) -> str:
    return avatar.source or type(avatar).__name__


def _valid_points(avatar: Avatar) -> np.ndarray:
    """(N, 7, 2) float32 landmarks with missing frames filled from the nearest good one, or a clear error."""
    mouth = avatar.mouth
    name = _describe(avatar)
    if mouth is None:
        raise MissingLandmarksError(
            f"avatar {name!r} has no lip landmarks (avatar.mouth is None). The no-weights default renderer "
            "deforms the avatar's own mouth and needs them: prepare the avatar with the face-mesh detector "
            "(`lipsync prepare-avatar --detector mesh`, or detector 'auto' with the mesh model files present), "
            "or run with a Wav2Lip checkpoint (--checkpoint) instead.")
    points = np.asarray(mouth, dtype=np.float32)
    n = len(avatar.frames)
    if points.shape != (n, 7, 2):
        raise MissingLandmarksError(f"avatar {name!r}: mouth landmarks have shape {points.shape}, "
                                    f"expected ({n}, 7, 2) (one set of 7 (x, y) points per frame)")
    widths = np.linalg.norm(points[:, 1] - points[:, 0], axis=1)
    good = np.isfinite(points).all(axis=(1, 2)) & (widths >= 2 * MIN_HALF_WIDTH_PX)
    if not good.any():
        raise MissingLandmarksError(f"avatar {name!r}: no frame has usable lip landmarks "
                                    f"(all missing, or mouth narrower than {2 * MIN_HALF_WIDTH_PX:.0f} px)")
    if not good.all():
        # Nearest good frame: idle motion is small, so a neighbour's mouth is a close stand-in.
        good_idx = np.flatnonzero(good)
        nearest = good_idx[np.abs(np.arange(n)[:, None] - good_idx[None, :]).argmin(axis=1)]
        log.warning("avatar %r: %d of %d frames lack lip landmarks; using the nearest frame's",
                    name, int((~good).sum()), n)
        points = points[nearest]
    return points


class DefaultRenderer(MouthRenderer):
    """MouthRenderer that needs no learned weights (see the module docstring)."""

    name = "default"

    def __init__(self, config: DefaultRendererConfig | None = None) -> None:
        self.config = config or DefaultRendererConfig()
        # Only the kernels' columns are read, from one frame before the frame's time: the engine waits
        # for 72.5 ms of future audio, not 212.5 ms (mouth_params.py, 5.). Per-frame work on per-avatar
        # data: frames of any avatars share a batch.
        self.traits = RendererTraits(mixes_avatars=True, audio_needs=self.config.params.audio_needs)
        self._lock = threading.Lock()
        # Per-avatar data, keyed weakly so a dropped avatar frees it; objects that cannot be weakly
        # referenced fall back to an id-keyed table that holds the avatar (identity checked on lookup).
        self._prepared: weakref.WeakKeyDictionary[Avatar, _Prepared] = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[object, _Prepared]] = {}

    # -- protocol ---------------------------------------------------------------------------------
    def prepare(self, avatar: Avatar) -> None:
        self._get(avatar)

    def render(self, avatar: Avatar, frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        """One patch per (avatar frame index, (80, 16) mel window), in order."""
        mels = np.asarray(mels, dtype=np.float32)
        indices = np.asarray(frame_indices).reshape(-1)
        if mels.ndim != 3 or mels.shape[1:] != (N_MELS, MEL_STEP) or len(mels) != len(indices):
            raise ValueError(f"expected {len(indices)} mel windows of shape (80, 16), got {mels.shape}")
        return self.render_params(avatar, indices, mouth_params(mels, self.config.params))

    def render_mixed(self, avatars: list[Avatar], frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        """`render` for a batch whose frames come from different avatars (`avatars[k]` for frame k)."""
        mels = np.asarray(mels, dtype=np.float32)
        indices = np.asarray(frame_indices).reshape(-1)
        if mels.ndim != 3 or mels.shape[1:] != (N_MELS, MEL_STEP) or not len(mels) == len(indices) == len(avatars):
            raise ValueError(f"expected {len(indices)} avatars and mel windows of shape (80, 16), got "
                             f"{len(avatars)} and {mels.shape}")
        params = mouth_params(mels, self.config.params)
        return [self.render_params(avatar, indices[k:k + 1], params[k:k + 1])[0] for k, avatar in enumerate(avatars)]

    # -- building blocks (also used by tests, the bench and offline rendering) ---------------------
    def params(self, mels: np.ndarray) -> np.ndarray:
        """(B, 80, 16) mel windows (cut per `audio_needs`) -> (B, 6) `mouth_params.PARAMS`."""
        return mouth_params(mels, self.config.params)

    def render_params(self, avatar: Avatar, frame_indices: np.ndarray, params: np.ndarray) -> list[MouthPatch]:
        prepared = self._get(avatar)
        n = len(prepared.geometry)
        patches = []
        for index, p in zip(np.asarray(frame_indices).reshape(-1), np.asarray(params, dtype=np.float32), strict=True):
            i = int(index)
            if not 0 <= i < n:
                raise IndexError(f"avatar frame index {i} out of range (avatar has {n} frames)")
            patches.append(warp_mouth(avatar.frames[i], prepared.geometry[i], p, prepared.palette,
                                      prepared.alphas[i], self.config.warp))
        return patches

    def rendered_landmarks(self, avatar: Avatar, frame_index: int, params: np.ndarray) -> np.ndarray:
        """The (7, 2) mouth points as rendered for `params` on avatar frame `frame_index`."""
        prepared = self._get(avatar)
        i = int(frame_index)
        return rendered_landmarks(prepared.points[i], np.asarray(params, np.float32), prepared.geometry[i],
                                  self.config.warp)

    def patch_box(self, avatar: Avatar, frame_index: int) -> tuple[int, int, int, int]:
        """The (y1, y2, x1, x2) region this renderer may change on avatar frame `frame_index`."""
        return self._get(avatar).geometry[int(frame_index)].box

    def release(self, avatar: Avatar) -> None:
        """Drop an avatar's prepared data now (it also goes when the avatar is garbage-collected)."""
        with self._lock:
            try:
                self._prepared.pop(avatar, None)
            except TypeError:
                self._strong.pop(id(avatar), None)

    # -- per-avatar cache --------------------------------------------------------------------------
    def _get(self, avatar: Avatar) -> _Prepared:
        found = self._lookup(avatar)
        if found is not None:
            return found
        with self._lock:  # build once even when several sessions start together
            found = self._lookup(avatar)
            if found is None:
                found = self._build(avatar)
                try:
                    self._prepared[avatar] = found
                except TypeError:
                    self._strong[id(avatar)] = (avatar, found)
            return found

    def _lookup(self, avatar: Avatar) -> _Prepared | None:
        try:
            return self._prepared.get(avatar)
        except TypeError:
            entry = self._strong.get(id(avatar))
            return entry[1] if entry is not None and entry[0] is avatar else None

    def _build(self, avatar: Avatar) -> _Prepared:
        points = _valid_points(avatar)
        frames = avatar.frames
        shape = frames.shape[1:]
        geometry = tuple(frame_geometry(points[i], shape, self.config.warp) for i in range(len(points)))
        shared: dict[tuple[int, int, bool, bool, bool, bool], np.ndarray] = {}
        for geom in geometry:
            key = _alpha_key(geom, shape)
            if key not in shared:
                shared[key] = feather_alpha(geom, shape, self.config.warp.margin_px)
                shared[key].setflags(write=False)
        alphas = tuple(shared[_alpha_key(geom, shape)] for geom in geometry)
        palette = estimate_palette(np.asarray(frames[0]), geometry[0])
        log.info("default renderer: prepared avatar %r (%d frames, mouth %.0f px wide, patch %dx%d)",
                 _describe(avatar), len(points), 2 * geometry[0].half_width,
                 geometry[0].box[3] - geometry[0].box[2], geometry[0].box[1] - geometry[0].box[0])
        return _Prepared(points=points, geometry=geometry, palette=palette, alphas=alphas)
