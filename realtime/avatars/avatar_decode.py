"""Decoding an avatar's source: a video (PyAV) or a photo, upright and fitted to the size limit.

Videos are decoded frame by frame (an iterator), so face tracking can start before the last frame is
read and a long clip is cut at `AvatarConfig.max_seconds` without decoding the rest.

A video may be an upload (POST /avatars), so its cost is bounded before and while it is decoded:
- only the containers of VIDEO_CONTAINERS, recognised by their first bytes and opened with that
  demuxer named (no probing: a playlist or script demuxer such as hls or concat would open other
  files or URLs), and no protocol but local files (`protocol_whitelist`);
- a frame budget from the duration and frame rate the container declares (at most `max_seconds`),
  counted while decoding: a file that declares 1 s and holds minutes of frames stops at 1 s;
- each frame's size is checked before it is converted (MAX_SOURCE_SIDE), and it is converted
  straight to the fitted size: no full-size BGR copy is made;
- the raw frames kept for tracking stay under MAX_RAW_BYTES (a longer loop is cut, with a warning):
  a small file of identical 720p frames at 120 fps no longer expands to gigabytes.
"""
from __future__ import annotations

import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import cv2
import numpy as np

from realtime.avatars.avatar import AvatarConfig, AvatarError
from realtime.media_io import MediaError, read_image

if TYPE_CHECKING:  # PyAV is imported where a file is opened (a heavy import)
    import av
    from av.container import InputContainer
    from av.video.stream import VideoStream

log = logging.getLogger(__name__)

VIDEO_CONTAINERS = "mp4/mov/m4v/3gp, webm/mkv, avi, mpeg-ts, gif"
MAX_FPS = 120.0
MAX_SOURCE_SIDE = 8192  # px: a frame wider or taller is refused before it is converted
MAX_RAW_BYTES = 2 * 1024**3  # the fitted BGR frames one preparation keeps for tracking


def sniff_video(head: bytes) -> str | None:
    """The FFmpeg demuxer of a supported video container, from its first bytes; None otherwise."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "mov"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:  # MPEG-TS sync bytes
        return "mpegts"
    return None


def open_video(path: Path) -> InputContainer:
    """The file opened with the demuxer its first bytes name (AvatarError for any other)."""
    import av

    with open(path, "rb") as f:
        head = f.read(512)
    fmt = sniff_video(head)
    if fmt is None and (head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3" or head[8:12] == b"WAVE"):
        raise AvatarError(f"{path}: contains no video stream (an audio-only file?); "
                          "give a video or a photo of a face")
    if fmt is None:
        raise AvatarError(f"{path}: not a video or image file that can be read (videos: {VIDEO_CONTAINERS}); "
                          "use an mp4/mov/webm video or a jpg/png photo")
    try:
        return av.open(str(path), mode="r", format=fmt, metadata_errors="ignore",
                       options={"protocol_whitelist": "file"})
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise AvatarError(f"{path}: not a video or image file that can be read (as {fmt}: {exc}); "
                          "use an mp4/mov/webm video or a jpg/png photo") from None


def declared_seconds(container: InputContainer, stream: VideoStream) -> float | None:
    """From the stream, else the container, else frames / rate: whichever the file states."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000
    rate = stream.average_rate or stream.base_rate
    if stream.frames and rate:
        return float(stream.frames) / float(rate)
    return None


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
    """(fps, expected frame count, frame iterator) for a video file via PyAV, within the frame budget."""
    import av

    container = open_video(path)
    if not container.streams.video:
        container.close()
        raise AvatarError(f"{path}: contains no video stream (an audio-only file?); "
                          "give a video or a photo of a face")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.base_rate or Fraction(25)
    fps = float(rate) if 1.0 <= float(rate) <= MAX_FPS else 25.0
    limit = frame_budget(declared_seconds(container, stream), fps, config)
    expected = min(int(stream.frames or 0) or limit, limit)

    def frames() -> Iterator[np.ndarray]:
        count = 0
        budget = limit
        try:
            for frame in container.decode(stream):
                image = fitted_frame(frame, config, path)
                if count == 0:
                    budget = min(limit, max(1, MAX_RAW_BYTES // image.nbytes))
                yield image
                count += 1
                if count >= budget:
                    log.warning("%s: using the first %d frames (%.1f s) as the avatar loop: the frame budget of "
                                "its declared length, --max-seconds and %d MB of frames", path, count,
                                count / fps, MAX_RAW_BYTES // 2**20)
                    break
        except av.error.FFmpegError as exc:
            if count == 0:
                raise AvatarError(f"{path}: the video cannot be decoded ({exc}); re-encode it as H.264 mp4") from None
            log.warning("%s: decoding stopped after %d frames (%s); using those", path, count, exc)
        finally:
            container.close()

    return fps, expected, frames()


def frame_budget(declared_s: float | None, fps: float, config: AvatarConfig) -> int:
    """Frames to decode at most: max_seconds at fps, or the declared duration plus half a second
    (rounding in the container's numbers) when that is shorter."""
    most = max(1, round(config.max_seconds * fps))
    if declared_s is None:
        return most
    return max(1, min(most, math.ceil((max(declared_s, 0.0) + 0.5) * fps)))


def fitted_frame(frame: av.VideoFrame, config: AvatarConfig, path: Path) -> np.ndarray:
    """One decoded frame as BGR, fitted and upright; its size is checked before it is converted."""
    if max(frame.width, frame.height) > MAX_SOURCE_SIDE:
        raise AvatarError(f"{path}: a frame of {frame.width}x{frame.height} px; at most {MAX_SOURCE_SIDE} px "
                          "wide and high is read")
    rotation = getattr(frame, "rotation", 0) or 0
    w, h = fit_size(frame.width, frame.height, config)
    if (w, h) != (frame.width, frame.height):
        frame = frame.reformat(width=w, height=h, interpolation="AREA")
    return upright(frame.to_ndarray(format="bgr24"), rotation)


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
    try:
        container = open_video(path)
    except AvatarError:
        return None
    try:
        return int(container.streams.video[0].codec_context.height)
    except Exception:  # only a hint for an error message: never fail on it
        return None
    finally:
        container.close()


def stack_frames(frames: list[np.ndarray]) -> np.ndarray:
    """Stack without holding two copies of a long clip: each frame is freed once copied."""
    out = np.empty((len(frames), *frames[0].shape), np.uint8)
    for i in range(len(frames)):
        out[i] = frames[i]
        frames[i] = None  # type: ignore[call-overload]
    return out
