"""Face tracking over an avatar's frames: detect on every frame (tracking from the previous one), then
check, fill, smooth and pad the raw detections into the boxes and lip landmarks an Avatar keeps.

Detection is `models.face_detection` (BlazeFace + 468-point face mesh by default; OpenCV Haar without
the mesh model files; the official S3FD from a user's s3fd.pth). The time-series steps are in
realtime/avatars/track_smoothing.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from realtime.avatars.avatar import AvatarConfig, AvatarError, Progress
from realtime.avatars.track_smoothing import fill_gaps, pad_boxes, smooth_series

if TYPE_CHECKING:  # the detectors are imported when one is made
    from models.face_detection import FaceDetector

log = logging.getLogger(__name__)


def avatar_detector(config: AvatarConfig) -> FaceDetector:
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
        found: np.ndarray = ~np.isnan(self.boxes[:, 0])
        return found


def track_faces(frames: Iterable[np.ndarray], detector: FaceDetector, total: int,
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
    track = track_faces(frames, avatar_detector(config), len(frames), progress=progress)
    h, w = frames[0].shape[:2]
    face = finish_track(track, config, w, h, source)
    return face.boxes, face.mouth
