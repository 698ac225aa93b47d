"""Offline lip-sync with the no-weights built-in renderer: a face video or photo + speech -> mp4.

The server's default path, done to a file: the face is prepared as the server prepares an avatar
(`prepare_avatar`: detection, lip landmarks, idle motion for a photo, ping-pong loop), each output frame
gets the mel window the streaming engine would give it, `DefaultRenderer` deforms the mouth, and the
compositor pastes the patch with its own feathered alpha. Nothing is downloaded and torch is not imported.

Frame count: the official Wav2Lip rule stops ~0.2 s before the audio ends (it needs a whole 200 ms window
per frame); here the video covers the whole speech, `round(seconds * fps)` frames, and the frames past
the official count reuse the last window, as the streaming engine does at the end of a segment
(realtime/timeline/session.py). So the video is within half a frame of the audio track.

Speed (bench/offline_builtin.py, 20 s of speech, 512 px, 2 cores shared with other jobs): 2.9x real time
from a photo, 3.1x from a video, best of 3 (the slowest run 1.5x). The mouth itself costs ~0.6 ms per
frame; the rest is preparation (the face mesh on every idle-motion or video frame), the paste and H.264.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from realtime.audio.mel import SAMPLE_RATE, MelAlignment, mel_windows, melspectrogram
from realtime.avatars.avatar import Avatar, AvatarConfig
from realtime.avatars.avatar_prepare import prepare_avatar
from realtime.media_io import Mp4Writer, load_audio
from realtime.renderers.base import OFFICIAL_WINDOW, AudioNeeds
from realtime.renderers.compositor import paste
from realtime.renderers.default import DefaultRenderer

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class RenderPhase(str, Enum):
    PREPARING = "preparing the face"
    RENDERING = "rendering"


PhaseProgress = Callable[[RenderPhase, int, int], None]


@dataclass(frozen=True)
class BuiltinRenderOptions:
    pads: tuple[int, int, int, int] = (0, 10, 0, 0)  # top, bottom, left, right (official default)
    smooth: bool = True              # smooth face boxes and landmarks over time
    fps: float = 25.0                # for a still photo
    max_height: int = 720            # downscale larger inputs, as the server does (memory: frames are kept)
    still_seconds: float = 4.0       # idle head motion made from a photo (0: a frozen photo)
    detector: str = "auto"           # the built-in renderer needs lip landmarks: mesh (auto picks it)
    batch_size: int = 25             # frames per render call
    output_audio_rate: int = 48000   # the speech track is re-read from the file at this rate


@dataclass(frozen=True)
class RenderSummary:
    frames: int
    fps: float
    width: int
    height: int
    seconds: float          # video duration, frames / fps
    audio_seconds: float    # speech duration
    prepare_seconds: float  # face preparation (detection, landmarks, idle motion)
    render_seconds: float   # mouths, paste and encoding


def frame_windows(speech_16k: np.ndarray, fps: float, needs: AudioNeeds = OFFICIAL_WINDOW) -> np.ndarray:
    """(round(seconds * fps), 80, 16) mel windows: the official ones (each starting where `needs` says,
    as the engine cuts them), then the last one repeated."""
    alignments = {a.offset_frames: a for a in MelAlignment}
    if needs.offset_frames not in alignments:
        raise ValueError(f"no mel alignment starts {needs.offset_frames} frames before the frame")
    windows = mel_windows(melspectrogram(speech_16k), fps, alignments[needs.offset_frames])
    count = max(1, round(len(speech_16k) / SAMPLE_RATE * fps))
    if count > len(windows):
        tail = np.repeat(windows[-1:], count - len(windows), axis=0)
        windows = np.concatenate([windows, tail])
    return windows[:count]


def render_avatar_speech(avatar: Avatar, speech_16k: np.ndarray, output: str | Path,
                         renderer: DefaultRenderer | None = None, audio: np.ndarray | None = None,
                         audio_rate: int = SAMPLE_RATE, batch_size: int = 25,
                         progress: Progress | None = None) -> int:
    """Write `output` (H.264 + AAC) of `avatar` saying `speech_16k`; returns the number of frames.

    `audio` (at `audio_rate`) is the track written to the file; default: the 16 kHz speech itself.
    """
    renderer = renderer or DefaultRenderer()
    fps = float(avatar.fps)
    windows = frame_windows(speech_16k, fps, renderer.traits.audio_needs)
    params = renderer.params(windows)
    height, width = avatar.frames.shape[1:3]
    track = speech_16k if audio is None else audio
    with Mp4Writer(output, width, height, fps, audio=track, audio_rate=audio_rate) as writer:
        for start in range(0, len(windows), batch_size):
            ticks = range(start, min(len(windows), start + batch_size))
            indices = np.array([avatar.frame_index(k) for k in ticks])
            patches = renderer.render_params(avatar, indices, params[start:start + len(indices)])
            for i, patch in zip(indices, patches, strict=True):
                writer.write(paste(avatar.frames[i], patch, mode="feather"))
            if progress:
                progress(start + len(indices), len(windows))
    return len(windows)


def render_builtin(face: str | Path, audio: str | Path, output: str | Path,
                   options: BuiltinRenderOptions | None = None,
                   progress: PhaseProgress | None = None) -> RenderSummary:
    """Face video/photo + speech file -> `output` mp4 with the built-in renderer.

    Raises MediaError (unreadable audio), AvatarError (no face, unreadable face file) or
    MissingLandmarksError (a face without lip landmarks), each naming the file and the fix.
    """
    options = options or BuiltinRenderOptions()
    started = time.perf_counter()
    speech = load_audio(audio, SAMPLE_RATE)  # first: a bad audio file fails before the slow part
    seconds = len(speech) / SAMPLE_RATE
    config = AvatarConfig(detector=options.detector, pads=options.pads, smooth=options.smooth,
                          max_height=options.max_height, max_width=round(options.max_height * 16 / 9),
                          # a video needs no more frames than the speech lasts (plus one for rounding)
                          max_seconds=seconds + 1.0, fps=options.fps, still_seconds=options.still_seconds,
                          loop="pingpong")
    avatar = prepare_avatar(face, config=config, progress=_phase(progress, RenderPhase.PREPARING),
                            use_cache=False)
    renderer = DefaultRenderer()
    renderer.prepare(avatar)  # raises MissingLandmarksError before any file is written
    prepared = time.perf_counter()
    track = load_audio(audio, options.output_audio_rate)
    frames = render_avatar_speech(avatar, speech, output, renderer, audio=track,
                                  audio_rate=options.output_audio_rate, batch_size=options.batch_size,
                                  progress=_phase(progress, RenderPhase.RENDERING))
    done = time.perf_counter()
    width, height = avatar.size
    summary = RenderSummary(frames=frames, fps=float(avatar.fps), width=width - width % 2,
                            height=height - height % 2, seconds=frames / float(avatar.fps),
                            audio_seconds=seconds, prepare_seconds=prepared - started,
                            render_seconds=done - prepared)
    log.info("%s: %d frames at %.3f fps for %.2f s of speech (prepare %.1f s, render %.1f s)",
             Path(output).name, frames, summary.fps, seconds, summary.prepare_seconds, summary.render_seconds)
    return summary


def _phase(progress: PhaseProgress | None, phase: RenderPhase) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total: progress(phase, done, total)
