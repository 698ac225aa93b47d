"""Media files in and out with PyAV: decode audio/video/images, write H.264 + AAC mp4.

Everything goes through PyAV's bundled ffmpeg: no temporary files, no ffmpeg executable.
Images stay BGR uint8 and audio float32 mono, the contracts of `realtime/`.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Iterator

import av
import cv2
import numpy as np

from realtime.config import SAMPLE_RATE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class MediaError(Exception):
    """A media file that cannot be used; the message names the file and what to do."""


Source = str | Path | bytes | BinaryIO


def _describe(source: Source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return "the uploaded data"


def _open(source: Source) -> av.container.InputContainer:
    what = _describe(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise MediaError(f"{what}: no such file")
        if path.is_dir():
            raise MediaError(f"{what}: is a directory, expected a media file")
        if path.stat().st_size == 0:
            raise MediaError(f"{what}: the file is empty")
        target: str | BinaryIO = str(path)
    else:
        target = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return av.open(target, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(f"{what}: not a media file ffmpeg can read ({exc})") from None


def load_audio(source: Source, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of a file (any format PyAV reads) to float32 mono at `target_rate`."""
    what = _describe(source)
    with _open(source) as container:
        if not container.streams.audio:
            raise MediaError(f"{what}: contains no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
        parts: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise MediaError(f"{what}: the audio cannot be decoded ({exc})") from None
    if not parts:
        raise MediaError(f"{what}: the audio stream holds no samples")
    return np.concatenate(parts).astype(np.float32, copy=False)


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frame_count: int  # 0 when the container does not say
    is_image: bool


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | Path) -> np.ndarray:
    """A still image as BGR uint8."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise MediaError(f"{path}: no such file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise MediaError(f"{path}: not an image OpenCV can read (use jpg, png, bmp or webp)")
    return image


def probe_video(path: str | Path) -> VideoInfo:
    if is_image_path(path):
        image = read_image(path)
        return VideoInfo(image.shape[1], image.shape[0], 25.0, 1, True)
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: contains no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.base_rate or Fraction(25)
        return VideoInfo(stream.codec_context.width, stream.codec_context.height, float(rate),
                         int(stream.frames or 0), False)


def iter_video_frames(path: str | Path, max_height: int | None = None) -> Iterator[np.ndarray]:
    """Yield BGR uint8 frames; frames taller than `max_height` are downscaled keeping the aspect."""
    if is_image_path(path):
        yield _limit_height(read_image(path), max_height)
        return
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: contains no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield _limit_height(frame.to_ndarray(format="bgr24"), max_height)
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: the video cannot be decoded ({exc})") from None


def _limit_height(image: np.ndarray, max_height: int | None) -> np.ndarray:
    h, w = image.shape[:2]
    if max_height is None or h <= max_height:
        return image
    width = round(w * max_height / h) // 2 * 2  # even sizes keep yuv420p encoders happy
    return cv2.resize(image, (width, max_height), interpolation=cv2.INTER_AREA)


class Mp4Writer:
    """H.264 (yuv420p) + AAC mp4, fed BGR frames one at a time; audio given up front.

    Usage: `with Mp4Writer(path, w, h, fps, audio=samples) as out: out.write(frame)`.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float,
                 audio: np.ndarray | None = None, audio_rate: int = SAMPLE_RATE, crf: int = 18) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        rate = Fraction(fps).limit_denominator(1001)
        self._rate = rate
        self._video = self._container.add_stream("libx264", rate=rate)
        self._video.width, self._video.height = width - width % 2, height - height % 2
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": str(crf), "preset": "veryfast"}
        self._audio = None
        self._pending_audio = audio
        self._audio_rate = audio_rate
        if audio is not None:
            self._audio = self._container.add_stream("aac", rate=48000)
            self._audio.layout = "mono"
        self.frames_written = 0
        self._closed = False

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, frame_bgr: np.ndarray) -> None:
        if self.frames_written == 0:
            self._write_audio()  # audio first: the whole track is known, and muxing stays interleaved
        h, w = self._video.height, self._video.width
        if frame_bgr.shape[0] != h or frame_bgr.shape[1] != w:
            frame_bgr = frame_bgr[:h, :w]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_bgr), format="bgr24")
        frame.pts = self.frames_written
        frame.time_base = 1 / self._rate
        self._container.mux(self._video.encode(frame))
        self.frames_written += 1

    def _write_audio(self) -> None:
        if self._audio is None or self._pending_audio is None:
            return
        samples = np.asarray(self._pending_audio, dtype=np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = self._audio_rate
        frame.pts = None
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=48000,
                                      frame_size=self._audio.codec_context.frame_size or 1024)
        pts = 0
        for out in list(resampler.resample(frame)) + list(resampler.resample(None)):
            out.pts = pts
            pts += out.samples
            self._container.mux(self._audio.encode(out))
        self._container.mux(self._audio.encode(None))
        self._pending_audio = None

    def close(self) -> None:
        if self._closed:
            return
        self._container.mux(self._video.encode(None))
        self._write_audio()
        self._container.close()
        self._closed = True
