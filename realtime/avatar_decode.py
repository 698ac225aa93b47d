"""Decoding an avatar's source: a video (PyAV) or a photo, upright and fitted to the size limit.

Videos are decoded frame by frame (an iterator), so face tracking can start before the last frame is
read and a long clip is cut at `AvatarConfig.max_seconds` without decoding the rest.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from realtime.avatar import AvatarConfig, AvatarError
from realtime.media_io import MediaError, read_image

log = logging.getLogger(__name__)


def fit_size(w: int, h: int, config: AvatarConfig) -> tuple[int, int]:
    """Downscaled (w, h) that fits max_width x max_height in either orientation; even sizes."""
    long_side, short_side = max(config.max_width, config.max_height), min(config.max_width, config.max_height)
    scale = min(1.0, long_side / max(w, h), short_side / min(w, h))
    if scale >= 1.0:
        return w, h
    return max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)


def upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """Apply a container's display rotation (phones store portrait video sideways plus a matrix).
    `rotation` is counter-clockwise degrees, as ffmpeg reports it; ffmpeg's CLI turns it clockwise."""
    turn = round(-rotation) % 360
    codes = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}
    return cv2.rotate(image, codes[turn]) if turn in codes else image


def iter_video(path: Path, config: AvatarConfig) -> tuple[float, int, Iterator[np.ndarray]]:
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
                image = upright(frame.to_ndarray(format="bgr24"), getattr(frame, "rotation", 0) or 0)
                w, h = fit_size(image.shape[1], image.shape[0], config)
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


def check_file(path: Path) -> None:
    if not path.exists():
        raise AvatarError(f"{path}: no such file; give a face video (mp4, mov, ...) or a photo (jpg, png)")
    if path.is_file() and path.stat().st_size == 0:
        raise AvatarError(f"{path}: the file is empty; give a face video or photo")


def read_still(path: Path, config: AvatarConfig) -> tuple[np.ndarray, int]:
    """(the photo fitted to the size limit, its original height)."""
    try:
        image = read_image(path)
    except MediaError as exc:
        raise AvatarError(str(exc)) from None
    native = image.shape[0]
    w, h = fit_size(image.shape[1], image.shape[0], config)
    if (w, h) != (image.shape[1], image.shape[0]):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return image, native


def native_height(path: Path) -> int | None:
    """The video's coded height, for messages only."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            ctx = container.streams.video[0].codec_context
            return int(ctx.height)
    except Exception:  # only a hint for an error message: never fail on it
        return None


def stack_frames(frames: list[np.ndarray]) -> np.ndarray:
    """Stack without holding two copies of a long clip: each frame is freed once copied."""
    out = np.empty((len(frames), *frames[0].shape), np.uint8)
    for i in range(len(frames)):
        out[i] = frames[i]
        frames[i] = None  # type: ignore[call-overload]
    return out
