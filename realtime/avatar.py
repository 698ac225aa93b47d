"""Avatars: a face video (or photo) prepared once -- frames, stable face boxes, lip landmarks, masks --
cached on disk, and played as a seamless loop.

- Detection: `models.face_detection` (BlazeFace + 468-point face mesh by default; OpenCV Haar without
  the mesh model files; the official S3FD from a user's s3fd.pth). The mesh tracks frame to frame.
- Stable boxes: frames where detection fails are filled from their neighbours (linear in time), then
  each coordinate is smoothed with a centred Gaussian (zero lag for steady motion, unlike the
  official forward mean of the next 5 boxes, which leads by 2 frames), then the official padding
  (top, bottom, left, right = 0, 10, 0, 0) is applied and the box clipped to the frame.
- Loop: ping-pong (0 1 .. N-1 N-2 .. 1 0 1 ..) by default, so playback never jumps; forward optional.
- Cache: `realtime.avatar_cache` (raw .npy, memory-mapped: a second start is milliseconds).
- Stills: a photo gets a few seconds of subtle idle motion (head sway, breathing) so it never looks
  frozen; the embedded default avatar is made the same way (scripts/make_default_avatar.py).

Boxes are (y1, y2, x1, x2) int32 (the official order); images BGR uint8; mouth points (x, y) float32.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from realtime import avatar_cache
from realtime.media_io import IMAGE_SUFFIXES, MediaError, read_image

log = logging.getLogger(__name__)

MOUTH_POINTS = ("left_corner", "right_corner", "upper_lip_top", "upper_lip_bottom",
                "lower_lip_top", "lower_lip_bottom", "chin")
LOOP_MODES = ("pingpong", "forward")
CROP_SIZE = 96  # Wav2Lip's input size; crops and masks of this size are cached with the avatar
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_AVATAR = ASSETS / "default_avatar.mp4"
DEFAULT_AVATAR_TRACK = ASSETS / "default_avatar.npz"

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

    def cache_params(self) -> dict:
        """What changes the prepared data (and so the cache key), with "auto" resolved and the model
        files identified: installing the mesh models later must not serve the Haar result."""
        from models.face_detection.model_files import model_fingerprint

        params = asdict(self)
        params.pop("loop")
        params.pop("device")
        params["pads"] = list(self.pads)
        params["detector"], params["models"] = model_fingerprint(self.detector, self.s3fd_weights)
        params.pop("s3fd_weights")
        return params


@dataclass(eq=False)
class Avatar:
    frames: np.ndarray            # (N, H, W, 3) uint8 BGR, stored once (read-only)
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
        if self.frames.flags.writeable:
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


def compute_crops(frames: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        out[i] = cv2.resize(frames[i][y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LINEAR)
    return out


# --------------------------------------------------------------------------------------------
# Decoding


def _fit_size(w: int, h: int, config: AvatarConfig) -> tuple[int, int]:
    """Downscaled (w, h) that fits max_width x max_height in either orientation; even sizes."""
    long_side, short_side = max(config.max_width, config.max_height), min(config.max_width, config.max_height)
    scale = min(1.0, long_side / max(w, h), short_side / min(w, h))
    if scale >= 1.0:
        return w, h
    return max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)


def _upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """Apply a container's display rotation (phones store portrait video sideways plus a matrix).
    `rotation` is counter-clockwise degrees, as ffmpeg reports it; ffmpeg's CLI turns it clockwise."""
    turn = round(-rotation) % 360
    codes = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}
    return cv2.rotate(image, codes[turn]) if turn in codes else image


def _iter_video(path: Path, config: AvatarConfig) -> tuple[float, int, Iterator[np.ndarray]]:
    """(fps, expected frame count, frame iterator) for a video file via PyAV."""
    import av

    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise AvatarError(f"{path}: not a video or image file that can be read ({exc}); "
                          "use an mp4/mov/webm video or a jpg/png photo") from None
    if not container.streams.video:
        container.close()
        raise AvatarError(f"{path}: contains no video stream (an audio-only file?); "
                          "give a video or a photo of a face")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.base_rate or Fraction(25)
    fps = float(rate) if 1.0 <= float(rate) <= 120.0 else 25.0
    limit = max(1, round(config.max_seconds * fps))
    expected = min(int(stream.frames or 0) or limit, limit)

    def frames() -> Iterator[np.ndarray]:
        count = 0
        try:
            for frame in container.decode(stream):
                image = _upright(frame.to_ndarray(format="bgr24"), getattr(frame, "rotation", 0) or 0)
                w, h = _fit_size(image.shape[1], image.shape[0], config)
                if (w, h) != (image.shape[1], image.shape[0]):
                    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
                yield image
                count += 1
                if count >= limit:
                    log.warning("%s: using the first %.0f s (%d frames) as the avatar loop",
                                path, config.max_seconds, limit)
                    break
        except av.error.FFmpegError as exc:
            if count == 0:
                raise AvatarError(f"{path}: the video cannot be decoded ({exc}); re-encode it as H.264 mp4") from None
            log.warning("%s: decoding stopped after %d frames (%s); using those", path, count, exc)
        finally:
            container.close()

    return fps, expected, frames()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AvatarError(f"{path}: no such file; give a face video (mp4, mov, ...) or a photo (jpg, png)")
    if path.is_file() and path.stat().st_size == 0:
        raise AvatarError(f"{path}: the file is empty; give a face video or photo")


def _read_still(path: Path, config: AvatarConfig) -> tuple[np.ndarray, int]:
    """(the photo fitted to the size limit, its original height)."""
    try:
        image = read_image(path)
    except MediaError as exc:
        raise AvatarError(str(exc)) from None
    native = image.shape[0]
    w, h = _fit_size(image.shape[1], image.shape[0], config)
    if (w, h) != (image.shape[1], image.shape[0]):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return image, native


# --------------------------------------------------------------------------------------------
# Detection, gap filling, smoothing, padding


def _detector(config: AvatarConfig):
    from models.face_detection import DetectorError, create_detector

    try:
        return create_detector(config.detector, config.s3fd_weights, config.device)
    except DetectorError as exc:
        raise AvatarError(f"face detector: {exc}") from None


@dataclass
class Track:
    """Raw per-frame detections: NaN rows where detection failed."""
    boxes: np.ndarray                 # (N, 4) float64 x1, y1, x2, y2
    landmarks: np.ndarray | None      # (N, 468, 2) float32, NaN where missing; None: detector has none

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.boxes[:, 0])


def track_faces(frames: Iterable[np.ndarray], detector, total: int,
                keep: list[np.ndarray] | None = None, progress: Progress | None = None) -> Track:
    """Detect on every frame, tracking from the previous one; `keep` collects the frames seen."""
    boxes: list[np.ndarray] = []
    marks: list[np.ndarray | None] = []
    previous = None
    nan_box = np.full(4, np.nan)
    for i, frame in enumerate(frames):
        if keep is not None:
            keep.append(frame)
        result = detector.detect(frame, previous)
        previous = result
        boxes.append(nan_box if result is None else result.box.astype(np.float64))
        marks.append(None if result is None else result.landmarks)
        if progress is not None:
            progress(i + 1, max(total, i + 1))
    if not boxes:
        return Track(np.zeros((0, 4)), None)
    landmarks = None
    if any(m is not None for m in marks):
        landmarks = np.full((len(marks), 468, 2), np.nan, np.float32)
        for i, m in enumerate(marks):
            if m is not None:
                landmarks[i] = m
    return Track(np.stack(boxes), landmarks)


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """Rows that are NaN get the linear interpolation of their nearest found neighbours in time
    (the nearest one at the ends). values: (N, ...) float."""
    flat = values.reshape(len(values), -1).astype(np.float64)
    ok = ~np.isnan(flat).any(axis=1)
    if ok.all() or not ok.any():
        return flat.reshape(values.shape)
    idx = np.arange(len(flat))
    out = flat.copy()
    for c in range(flat.shape[1]):
        out[~ok, c] = np.interp(idx[~ok], idx[ok], flat[ok, c])
    return out.reshape(values.shape)


def smooth_series(values: np.ndarray, sigma: float) -> np.ndarray:
    """Centred Gaussian smoothing along time (axis 0), mirrored at the ends -- the same way ping-pong
    playback continues past them -- so it adds no lag and no end effects."""
    n = len(values)
    if sigma <= 0 or n < 3:
        return values.astype(np.float64)
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    flat = values.reshape(n, -1).astype(np.float64)
    idx = np.arange(-radius, n + radius)
    period = 2 * (n - 1)
    mirrored = np.abs(((idx % period) + period) % period)
    mirrored = np.where(mirrored >= n, period - mirrored, mirrored)
    padded = flat[mirrored]
    out = np.stack([np.convolve(padded[:, c], taps, mode="valid") for c in range(flat.shape[1])], axis=1)
    return out.reshape(values.shape)


def pad_boxes(boxes_xyxy: np.ndarray, pads: Sequence[int], width: int, height: int) -> np.ndarray:
    """(N, 4) float x1 y1 x2 y2 -> (N, 4) int32 (y1, y2, x1, x2) with the official padding, clipped."""
    top, bottom, left, right = pads
    x1 = np.clip(np.round(boxes_xyxy[:, 0] - left), 0, width - 2)
    y1 = np.clip(np.round(boxes_xyxy[:, 1] - top), 0, height - 2)
    x2 = np.clip(np.round(boxes_xyxy[:, 2] + right), x1 + 2, width)
    y2 = np.clip(np.round(boxes_xyxy[:, 3] + bottom), y1 + 2, height)
    return np.stack([y1, y2, x1, x2], axis=1).astype(np.int32)


@dataclass
class FaceTrack:
    """The finished per-frame face data of a clip."""
    boxes: np.ndarray               # (N, 4) int32 (y1, y2, x1, x2)
    mouth: np.ndarray | None        # (N, 7, 2) float32
    landmarks: np.ndarray | None    # (N, 468, 2) float32 (filled + smoothed)
    detected: np.ndarray            # (N,) bool: where the detector itself found the face


def finish_track(track: Track, config: AvatarConfig, width: int, height: int, source: str,
                 native_height: int | None = None) -> FaceTrack:
    """Check, fill, smooth and pad raw detections. `native_height`: the input's height before
    downscaling, so a "too small" message can say that a larger --max-height would help."""
    found = track.found
    n = len(found)
    if n == 0 or not found.any():
        raise AvatarError(f"{source}: no face found in any of its {n} frame(s); use a video or photo "
                          f"with one clearly visible, roughly frontal face at least {config.min_face} px tall")
    heights = track.boxes[found, 3] - track.boxes[found, 1]
    if float(np.median(heights)) < config.min_face:
        fix = "Use a closer shot or a higher-resolution file"
        if native_height and native_height > height:
            fix = (f"It was downscaled from {native_height} to {height} px high: use --max-height "
                   f"{native_height} (max_height), a closer shot, or a higher-resolution file")
        raise AvatarError(f"{source}: the face is only {int(np.median(heights))} px tall; at least "
                          f"{config.min_face} px is needed. {fix}")
    if not found.all():
        log.info("%s: no face on %d of %d frames; filled from their neighbours", source, n - found.sum(), n)
    sigma = config.smooth_sigma if config.smooth else 0.0
    boxes = smooth_series(fill_gaps(track.boxes), sigma)
    landmarks = None
    mouth = None
    if track.landmarks is not None:
        # Lips move on their own: smooth them less than the box, just enough to remove jitter.
        landmarks = smooth_series(fill_gaps(track.landmarks), min(sigma, 1.0)).astype(np.float32)
        from models.face_detection.face_mesh import MOUTH

        mouth = landmarks[:, list(MOUTH)].copy()
    return FaceTrack(pad_boxes(boxes, config.pads, width, height), mouth, landmarks, found)


def detect_face_boxes(frames: Sequence[np.ndarray], config: AvatarConfig | None = None, *,
                      source: str = "the frames", progress: Progress | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """Face boxes for a list of frames with the avatar pipeline (track, fill, smooth, pad).

    Returns ((N, 4) int32 (y1, y2, x1, x2), (N, 7, 2) float32 mouth points or None).
    Raises AvatarError when no frame holds a face.
    """
    config = config or AvatarConfig()
    if len(frames) == 0:
        raise AvatarError(f"{source}: no frames to detect faces in")
    track = track_faces(frames, _detector(config), len(frames), progress=progress)
    h, w = frames[0].shape[:2]
    face = finish_track(track, config, w, h, source)
    return face.boxes, face.mouth


# --------------------------------------------------------------------------------------------
# Lower-face masks (in 96x96 crop coordinates)


def lower_face_masks(landmarks: np.ndarray, boxes: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """(N, size, size) uint8: the face outline below the nose, feathered, in each frame's crop."""
    from models.face_detection.face_mesh import FACE_OVAL, NOSE_BOTTOM

    out = np.zeros((len(boxes), size, size), np.uint8)
    ramp = max(2, size // 16)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        pts = landmarks[i]
        sx, sy = size / max(1, x2 - x1), size / max(1, y2 - y1)
        poly = _to_crop(pts[list(FACE_OVAL)], x1, y1, sx, sy)
        mask: np.ndarray = np.zeros((size, size), np.float32)
        cv2.fillPoly(mask, [np.round(poly * 4).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=2)
        nose_y = float(_to_crop(pts[[NOSE_BOTTOM]], x1, y1, sx, sy)[0, 1])
        rows = np.clip((np.arange(size) - nose_y) / ramp + 0.5, 0, 1)  # soft edge under the nose
        mask *= rows[:, None]
        # Keep the feather inside the outline, then soften: the patch fades out before the cheek edge.
        mask = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=max(1, size // 48))
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=size / 48)
        out[i] = np.clip(mask * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def _to_crop(points: np.ndarray, x1: float, y1: float, sx: float, sy: float) -> np.ndarray:
    """Frame-pixel (x, y[, z]) points -> (N, 2) coordinates in a crop whose corner is (x1, y1), scaled by (sx, sy)."""
    return np.stack([(points[:, 0] - x1) * sx, (points[:, 1] - y1) * sy], axis=1)


# --------------------------------------------------------------------------------------------
# Idle motion for stills


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def idle_motion(n_frames: int, face_height: float, amplitude: float = 1.0) -> np.ndarray:
    """(n, 4) per-frame head roll (radians), shift x, shift y (px) and breathing rise (px).

    Only cos(k*pi*t/(n-1)) with even k: each signal is at rest (zero velocity) at both ends and
    equal at the first and last frame, so the clip loops seamlessly ping-pong and forward."""
    if n_frames <= 1:
        return np.zeros((max(n_frames, 0), 4))
    u = np.pi * np.arange(n_frames) / (n_frames - 1)
    a = amplitude
    roll = np.radians(1.0 * a) * (0.75 * np.cos(2 * u) + 0.25 * np.cos(6 * u))
    shift_x = 0.012 * a * face_height * (np.cos(4 * u) - 0.3 * np.cos(2 * u))
    shift_y = 0.006 * a * face_height * np.cos(6 * u)
    rise = 0.008 * a * face_height * (1 - np.cos(4 * u)) / 2  # breathing: shoulders and head rise
    return np.stack([roll, shift_x, shift_y, rise], axis=1)


def _motion_weights(shape: tuple[int, int], box: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Soft masks: head (moves with the head) and body (rises with breathing); the neck pivot."""
    h, w = shape
    x1, y1, x2, y2 = (float(v) for v in box)
    fh = y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - 0.12 * fh
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # Ellipse around face and hair; full weight inside, fading to 0 well outside it.
    r = np.sqrt(((xs - cx) / (0.95 * fh)) ** 2 + ((ys - cy) / (1.05 * fh)) ** 2)
    head = 1.0 - _smoothstep((r - 0.9) / 0.7)
    pivot = (cx, y2 + 0.35 * fh)
    below = _smoothstep((ys - (y2 - 0.2 * fh)) / (0.6 * fh))
    across = 1.0 - _smoothstep((np.abs(xs - cx) - 1.2 * fh) / (0.8 * fh))
    body = np.maximum(head, below * across)
    return head.astype(np.float32), body.astype(np.float32), pivot


def animate_still(image: np.ndarray, face_box: np.ndarray, n_frames: int, amplitude: float = 1.0,
                  progress: Progress | None = None,
                  base: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """(n, H, W, 3) uint8: the photo with a slow head sway and breathing (smooth local warps).

    `base(i)`, when given, supplies frame i's picture before the motion (e.g. with blinks painted in)."""
    h, w = image.shape[:2]
    fh = float(face_box[3] - face_box[1])
    head, body, (px, py) = _motion_weights((h, w), face_box)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n_frames, h, w, 3), np.uint8)
    bottom_rise = _smoothstep((h - ys) / max(1.0, h - py))  # breathing fades to 0 at the frame bottom
    for i, (roll, sx, sy, rise) in enumerate(idle_motion(n_frames, fh, amplitude).tolist()):
        c, s = math.cos(roll), math.sin(roll)
        # Forward displacement of a head point under a rotation about the neck pivot plus a shift;
        # sampling at p - d(p) is its inverse to first order (displacements are a few pixels).
        dx = (c - 1) * (xs - px) - s * (ys - py) + sx
        dy = s * (xs - px) + (c - 1) * (ys - py) + sy
        map_x = (xs - head * dx).astype(np.float32)
        map_y = (ys - head * dy + body * rise * bottom_rise).astype(np.float32)
        source = image if base is None else base(i)
        out[i] = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if progress is not None:
            progress(i + 1, n_frames)
    return out


# --------------------------------------------------------------------------------------------
# Preparing, caching, loading


def _build(frames: np.ndarray, face: FaceTrack, fps: float, loop: str, source: str) -> Avatar:
    masks = None if face.landmarks is None else lower_face_masks(face.landmarks, face.boxes)
    avatar = Avatar(frames=frames, boxes=face.boxes, mouth=face.mouth, fps=fps, loop=loop,
                    source=source, masks=masks)
    return avatar


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    """Stack without holding two copies of a long clip: each frame is freed once copied."""
    out = np.empty((len(frames), *frames[0].shape), np.uint8)
    for i in range(len(frames)):
        out[i] = frames[i]
        frames[i] = None  # type: ignore[call-overload]
    return out


def _prepare_fresh(path: Path, config: AvatarConfig, loop: str, progress: Progress | None) -> Avatar:
    detector = _detector(config)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image, still_height = _read_still(path, config)
        return _prepare_still(image, still_height, detector, config, loop, str(path), progress)
    fps, expected, frames_iter = _iter_video(path, config)
    native = _native_height(path)
    kept: list[np.ndarray] = []
    track = track_faces(frames_iter, detector, expected, keep=kept, progress=progress)
    if not kept:
        raise AvatarError(f"{path}: the video stream holds zero frames; give a video with at least one frame")
    if len(kept) == 1:  # a one-frame video is a still
        return _prepare_still(kept[0], native, detector, config, loop, str(path), progress)
    h, w = kept[0].shape[:2]
    face = finish_track(track, config, w, h, str(path), native)
    return _build(_stack(kept), face, fps, loop, path.name)


def _native_height(path: Path) -> int | None:
    """The video's coded height, for messages only."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            ctx = container.streams.video[0].codec_context
            return int(ctx.height)
    except Exception:  # only a hint for an error message: never fail on it
        return None


def _prepare_still(image: np.ndarray, native: int | None, detector, config: AvatarConfig, loop: str,
                   source: str, progress: Progress | None) -> Avatar:
    h, w = image.shape[:2]
    first = track_faces([image], detector, 1)
    face = finish_track(first, config, w, h, source, native)  # raises for no face / too small
    name = Path(source).name
    n = max(1, round(config.still_seconds * config.fps))
    if n == 1:
        return _build(image[None].copy(), face, config.fps, loop, name)
    frames = animate_still(image, first.boxes[0], n, progress=progress)
    track = track_faces(frames, detector, n)
    return _build(frames, finish_track(track, config, w, h, source), config.fps, loop, name)


def _from_arrays(arrays: dict[str, np.ndarray], header: dict, loop: str) -> Avatar:
    avatar = Avatar(frames=arrays["frames"], boxes=arrays["boxes"].astype(np.int32),
                    mouth=arrays.get("mouth"), fps=float(header["fps"]), loop=loop,
                    source=str(header.get("source", "")), masks=arrays.get("masks96"))
    if "crops96" in arrays:
        avatar._crops[CROP_SIZE] = arrays["crops96"]
    return avatar


def save_avatar(avatar: Avatar, directory: str | Path, extra: dict | None = None) -> Path:
    """Write a prepared avatar folder (the format `prepare_avatar(folder)` loads)."""
    arrays = {"frames": avatar.frames, "boxes": avatar.boxes, "mouth": avatar.mouth,
              "crops96": avatar.face_crops(CROP_SIZE), "masks96": avatar.masks}
    meta = {"source": avatar.source, "fps": avatar.fps, "loop": avatar.loop,
            "size": list(avatar.size), "frames": len(avatar), "mouth_points": list(MOUTH_POINTS),
            **(extra or {})}
    return avatar_cache.save(directory, arrays, meta)


def load_prepared(directory: str | Path, loop: str | None = None) -> Avatar:
    """Load a folder written by `save_avatar` / `lipsync prepare-avatar`."""
    try:
        arrays, header = avatar_cache.load(directory)
    except avatar_cache.CacheFormatError as exc:
        raise AvatarError(f"{exc}; prepare it again with: lipsync prepare-avatar VIDEO -o {directory}") from None
    return _from_arrays(arrays, header, loop or header.get("loop", "pingpong"))


def prepare_avatar(path: str | Path, *, config: AvatarConfig | None = None, cache_dir: Path | None = None,
                   progress: Progress | None = None, use_cache: bool = True,
                   write_cache: bool = True) -> Avatar:
    """A video, a photo, or a prepared avatar folder -> Avatar (cached by content hash + parameters).

    `use_cache=False` neither reads nor writes the cache; `write_cache=False` only reads it (the
    prepare-avatar command writes its own folder and need not store the pixels twice)."""
    config = config or AvatarConfig()
    path = Path(path)
    if config.loop is not None and config.loop not in LOOP_MODES:
        raise AvatarError(f"{path}: loop must be one of {LOOP_MODES}, not {config.loop!r}")
    loop = config.loop or "pingpong"
    if path.is_dir():
        if not avatar_cache.is_prepared_dir(path):
            raise AvatarError(f"{path}: a folder that is not a prepared avatar; give a video, a photo, "
                              "or a folder written by lipsync prepare-avatar")
        return load_prepared(path, config.loop)
    _check_file(path)
    entry = None
    if use_cache:
        start = time.perf_counter()
        key = avatar_cache.cache_key(avatar_cache.content_hash(path), config.cache_params())
        entry = avatar_cache.entry_dir(avatar_cache.cache_root(cache_dir), path, key)
        if avatar_cache.is_prepared_dir(entry):
            try:
                arrays, header = avatar_cache.load(entry)
                log.info("%s: prepared avatar loaded from cache %s in %.3f s", path.name, entry,
                         time.perf_counter() - start)
                return _from_arrays(arrays, header, loop)
            except avatar_cache.CacheFormatError as exc:
                log.warning("ignoring a damaged cache entry (%s); preparing again", exc)
    start = time.perf_counter()
    avatar = _prepare_fresh(path, config, loop, progress)
    log.info("%s: prepared %d frames %dx%d at %.2f fps in %.1f s", path.name, len(avatar), *avatar.size,
             avatar.fps, time.perf_counter() - start)
    if entry is not None and write_cache:
        try:
            save_avatar(avatar, entry, {"params": config.cache_params()})
        except OSError as exc:  # a read-only home must not stop the server: it just re-prepares next time
            log.warning("could not write the avatar cache %s (%s); continuing without it", entry, exc)
    return avatar


def close_loop(frames: np.ndarray, ramp: int = 25) -> np.ndarray:
    """Spread the codec's drift over the last `ramp` frames so the last frame equals the first.

    For clips whose first and last frames show the same pose (the default avatar's motion is periodic)
    the only seam left after H.264 is coding noise: the first frame is a keyframe, the last one ends a
    long chain of predicted frames. Ramping the difference away (< 0.1 grey level per frame) makes the
    forward loop as seamless as the ping-pong one."""
    ramp = min(ramp, len(frames) - 1)
    if ramp < 1:
        return frames
    residual = frames[-1].astype(np.float32) - frames[0].astype(np.float32)
    for k in range(ramp):
        i = len(frames) - ramp + k
        frames[i] = np.clip(frames[i] - residual * ((k + 1) / ramp) + 0.5, 0, 255).astype(np.uint8)
    return frames


def decode_default_frames() -> np.ndarray:
    """The default avatar's frames exactly as the app uses them (decoded, loop closed)."""
    _fps, _expected, frames_iter = _iter_video(DEFAULT_AVATAR, AvatarConfig(max_seconds=3600.0))
    return close_loop(_stack(list(frames_iter)))


def load_default_avatar(loop: str = "pingpong") -> Avatar:
    """The embedded avatar (realtime/assets): an H.264 clip plus its shipped face track, so it needs no
    detector and no cache. Its boxes/landmarks were computed on exactly these decoded frames."""
    if not DEFAULT_AVATAR.is_file() or not DEFAULT_AVATAR_TRACK.is_file():
        raise AvatarError(f"{DEFAULT_AVATAR}: the embedded default avatar is missing; "
                          "rebuild it with: python scripts/make_default_avatar.py")
    with np.load(DEFAULT_AVATAR_TRACK, allow_pickle=False) as track:
        boxes = track["boxes"].astype(np.int32)
        mouth = track["mouth"].astype(np.float32) if "mouth" in track else None
        masks = track["masks"] if "masks" in track else None
        fps = float(track["fps"])
    frames = decode_default_frames()
    if len(frames) != len(boxes):
        raise AvatarError(f"{DEFAULT_AVATAR}: {len(frames)} frames but {len(boxes)} boxes; "
                          "rebuild it with: python scripts/make_default_avatar.py")
    return Avatar(frames=frames, boxes=boxes, mouth=mouth, fps=fps, loop=loop, source=DEFAULT_AVATAR.name,
                  masks=masks)
