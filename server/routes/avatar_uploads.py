"""Checking an uploaded avatar (video or photo) from its headers, before any frame is decoded.

The size is capped while the body is read (server/routes/avatars_api.py). Here: a photo's dimensions come from
its header (Pillow reads it lazily, without decoding the pixels; only the formats of PHOTO_FORMATS); a
video's container gives its dimensions, duration and frame rate (PyAV opens the container with the
demuxer its first bytes name, from realtime/avatars/avatar_decode.py's allow-list, and reads the stream
parameters, never the frames). Anything over the limits, or not a picture at all, is refused with a
4xx that says why; only then does the avatar library decode and track it, on its own thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from realtime.avatars.avatar import AvatarError
from realtime.avatars.avatar_decode import declared_seconds, open_video
from server.errors import ApiError

# Pillow formats read as photos (what the preparation's OpenCV decoder reads too).
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")


class UploadKind(Enum):
    PHOTO = "photo"
    VIDEO = "video"


@dataclass(frozen=True)
class UploadLimits:
    max_seconds: float
    max_side: int  # px, width and height


@dataclass(frozen=True)
class UploadFacts:
    kind: UploadKind
    width: int
    height: int
    seconds: float  # 0 for a photo

    @property
    def suffix(self) -> str:
        """A file suffix the avatar preparation reads as this kind."""
        return ".png" if self.kind is UploadKind.PHOTO else ".mp4"


def check_upload(path: Path, limits: UploadLimits) -> UploadFacts:
    """The upload's kind and size, or ApiError (400 not a picture / no video stream, 413 too long or too
    large in pixels). Blocking (file I/O): call it off the event loop."""
    facts = _photo_facts(path) or _video_facts(path)
    if facts.width < 16 or facts.height < 16:
        raise ApiError(400, f"the {facts.kind.value} is {facts.width}x{facts.height} px; an avatar needs a "
                            "face at least 48 px tall")
    if max(facts.width, facts.height) > limits.max_side:
        raise ApiError(413, f"the {facts.kind.value} is {facts.width}x{facts.height} px; at most "
                            f"{limits.max_side} px wide and high is accepted (1280x720 is plenty)",
                       max_side=limits.max_side)
    if facts.seconds > limits.max_seconds:
        raise ApiError(413, f"the video is {facts.seconds:.1f} s long; at most {limits.max_seconds:g} s is "
                            "accepted (an avatar loop needs a few seconds)", max_seconds=limits.max_seconds)
    return facts


def _photo_facts(path: Path) -> UploadFacts | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=PHOTO_FORMATS) as image:  # reads the header only
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None  # not a photo: a video (an animated GIF included) or nothing
    except Image.DecompressionBombError:
        raise ApiError(413, "the photo's dimensions are absurdly large") from None
    return UploadFacts(UploadKind.PHOTO, int(width), int(height), 0.0)


def _video_facts(path: Path) -> UploadFacts:
    try:
        container = open_video(path)
    except AvatarError:
        raise ApiError(400, "not a video or photo that can be read; upload an mp4/mov/webm video or a "
                            "jpg/png photo") from None
    with container:
        if not container.streams.video:
            raise ApiError(400, "the upload has no video stream (an audio file?); upload a video or a "
                                "photo of a face")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        seconds = declared_seconds(container, stream)
    if seconds is None:
        raise ApiError(400, "the video does not say how long it is; re-encode it as H.264 mp4")
    return UploadFacts(UploadKind.VIDEO, width, height, seconds)
