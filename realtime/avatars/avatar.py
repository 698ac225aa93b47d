"""The Avatar type: a face video (or photo) prepared once -- frames, stable face boxes, lip landmarks,
masks -- and played as a seamless loop (ping-pong 0 1 .. N-1 N-2 .. 1 0 1 .. by default, so playback
never jumps; forward optional).

Where the rest lives, one concern per module:
- avatar_decode.py: a video or photo decoded upright and fitted to the size limit.
- face_tracking.py: detection on every frame, tracked, then checked, filled, smoothed and padded
  (track_smoothing.py holds the time-series steps).
- face_masks.py: lower-face masks in 96x96 crop coordinates.
- still_animation.py: idle motion (head sway, breathing) for a photo.
- avatar_prepare.py: prepare_avatar / save_avatar / load_prepared, with the cache (avatar_cache.py).
- default_avatar.py: the embedded default avatar.
- avatar_library.py: many avatars by id (a server's set; added, listed, removed).

Boxes are (y1, y2, x1, x2) int32 (the official order); images BGR uint8; mouth points (x, y) float32.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from realtime.avatars.encoded_frames import JPEG_QUALITY, EncodedFrames

log = logging.getLogger(__name__)

MOUTH_POINTS = ("left_corner", "right_corner", "upper_lip_top", "upper_lip_bottom",
                "lower_lip_top", "lower_lip_bottom", "chin")
LOOP_MODES = ("pingpong", "forward")
CROP_SIZE = 96  # Wav2Lip's input size; crops and masks of this size are cached with the avatar

Progress = Callable[[int, int], None]


class AvatarError(Exception):
    """An avatar that cannot be prepared or loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class AvatarConfig:
    detector: str = "auto"          # auto | mesh | haar | s3fd (see models.face_detection)
    s3fd_weights: Path | None = None
    device: str = "cpu"             # for s3fd only
    pads: tuple[int, int, int, int] = (0, 10, 0, 0)  # top, bottom, left, right (official default)
    smooth: bool = True
    smooth_sigma: float = 2.0       # frames; centred Gaussian on each box coordinate
    # pingpong | forward; None: ping-pong, or what a prepared folder was saved with. Playback only,
    # so not part of the cache key.
    loop: str | None = None
    max_width: int = 1280           # larger inputs are downscaled to fit 1280x720 (or 720x1280)
    max_height: int = 720
    max_seconds: float = 20.0       # longer videos are cut (a loop needs seconds, not minutes of RAM)
    min_face: int = 48              # px; a smaller face gives a blurry 96x96 crop
    fps: float = 25.0               # for a still image
    still_seconds: float = 4.0      # idle-motion length for a still image (0: a single frame)
    # Keep the frames JPEG-encoded in memory (realtime/avatars/encoded_frames.py): ~20x less memory, ~3 ms of
    # decoding per shown 720p frame. What a server's avatar library uses; off for the CLI and tests.
    encode_frames: bool = False

    def cache_params(self) -> dict[str, Any]:
        """What changes the prepared data (and so the cache key), with "auto" resolved and the model
        files identified: installing the mesh models later must not serve the Haar result."""
        from models.face_detection.model_files import model_fingerprint

        params = asdict(self)
        params.pop("loop")
        if not self.encode_frames:  # keeps the keys of existing raw cache entries
            params.pop("encode_frames")
        params.pop("device")
        params["pads"] = list(self.pads)
        params["detector"], params["models"] = model_fingerprint(self.detector, self.s3fd_weights)
        params.pop("s3fd_weights")
        return params


@dataclass(eq=False)
class Avatar:
    # (N, H, W, 3) uint8 BGR, stored once (read-only): raw, or JPEG in memory (EncodedFrames)
    frames: np.ndarray | EncodedFrames
    boxes: np.ndarray             # (N, 4) int32 (y1, y2, x1, x2), padded + smoothed Wav2Lip crop box
    mouth: np.ndarray | None      # (N, 7, 2) float32 MOUTH_POINTS per frame, None without landmarks
    fps: float
    loop: str                     # "pingpong" | "forward"
    source: str                   # file name it came from
    # (N, 96, 96) uint8 lower-face mask in crop coordinates (255 = face below the nose, feathered);
    # None without landmarks. Usable as a paste alpha for a 96x96 mouth patch.
    masks: np.ndarray | None = None
    _crops: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.loop not in LOOP_MODES:
            raise AvatarError(f"{self.source}: loop must be one of {LOOP_MODES}, not {self.loop!r}")
        # Shared by every session: nobody may paint into it by accident. A read-only view leaves the
        # caller's own array writable.
        if isinstance(self.frames, np.ndarray) and self.frames.flags.writeable:
            self.frames = self.frames.view()
            self.frames.flags.writeable = False

    def __repr__(self) -> str:
        w, h = self.size
        return (f"Avatar({self.source!r}, {len(self)} frames {w}x{h} at {self.fps:g} fps, loop={self.loop}, "
                f"mouth={'yes' if self.mouth is not None else 'no'})")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def frame_index(self, tick: int) -> int:
        return loop_index(tick, len(self), self.loop)

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data held (frames, cached crops, masks); memory-mapped frames count in full."""
        crops = sum(c.nbytes for c in self._crops.values())
        return int(self.frames.nbytes + crops + (0 if self.masks is None else self.masks.nbytes))

    def with_encoded_frames(self, quality: int = JPEG_QUALITY) -> Avatar:
        """The same avatar with its frames JPEG-encoded in memory. The 96x96 crops are computed from the
        raw frames first, so Wav2Lip sees exactly what it would have seen."""
        if isinstance(self.frames, EncodedFrames):
            return self
        crops = self.face_crops(CROP_SIZE)
        out = Avatar(frames=EncodedFrames.encode(self.frames, quality), boxes=self.boxes, mouth=self.mouth,
                     fps=self.fps, loop=self.loop, source=self.source, masks=self.masks)
        out._crops[CROP_SIZE] = crops
        return out

    def face_crops(self, size: int = CROP_SIZE) -> np.ndarray:
        """(N, size, size, 3) uint8 BGR: frame[y1:y2, x1:x2] resized with INTER_LINEAR (official)."""
        with self._lock:
            if size not in self._crops:
                self._crops[size] = compute_crops(self.frames, self.boxes, size)
            return self._crops[size]


def loop_index(tick: int, n: int, loop: str = "pingpong") -> int:
    """Stored frame for output tick `tick`. Ping-pong never repeats a frame at the turn-arounds:
    0 1 2 .. n-1 n-2 .. 1 0 1 ..., period 2(n-1)."""
    if n <= 1:
        return 0
    if loop == "forward":
        return tick % n
    t = tick % (2 * (n - 1))
    return t if t < n else 2 * (n - 1) - t


def compute_crops(frames: np.ndarray | EncodedFrames, boxes: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        out[i] = cv2.resize(frames[i][y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LINEAR)
    return out

