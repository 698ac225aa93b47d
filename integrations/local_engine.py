"""LocalEngine: the engine in-process for a framework adapter (no server): one avatar, one renderer on
one render worker thread, handing out `LipSyncSession`s paced by the adapter's own clock.

    engine = load_local_engine(avatar=None, checkpoint=None, device="auto")   # slow: call off the loop
    session = engine.open_session("bot-1")

`avatar`: None (the embedded default avatar), a video or image path (prepared and cached as the CLI
does), or an already prepared avatar object (realtime.avatars.avatar.Avatar or anything with .frames, .boxes,
.fps, .frame_index). `checkpoint`: None (the no-weights renderer, CPU) or a Wav2Lip checkpoint, run on
`device` ("auto": CUDA when present, else CPU). `renderer`: a ready MouthRenderer instead (tests).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from realtime.avatars.avatar import Avatar
from realtime.config import SAMPLE_RATE, EngineConfig
from realtime.renderers.base import MouthRenderer
from realtime.scheduling.scheduler import ThreadedRenderWorker
from realtime.timeline.session import LipSyncSession, VideoOut

log = logging.getLogger(__name__)


@dataclass
class LocalEngine:
    avatar: Avatar
    worker: ThreadedRenderWorker
    config: EngineConfig

    @property
    def fps(self) -> float:
        return float(self.avatar.fps or self.config.fps)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the avatar's frames."""
        height, width = self.avatar.frames[0].shape[:2]
        return int(width), int(height)

    def open_session(self, name: str = "") -> LipSyncSession:
        return LipSyncSession(self.avatar, self.worker, self.config, name=name)

    def close(self) -> None:
        self.worker.close()


def _load_avatar(avatar: Avatar | str | Path | None) -> Avatar:
    from realtime.avatars.avatar_prepare import prepare_avatar
    from realtime.avatars.default_avatar import load_default_avatar

    if avatar is None:
        return load_default_avatar()
    if isinstance(avatar, (str, Path)):
        return prepare_avatar(avatar)
    return avatar


def _load_renderer(checkpoint: str | Path | None, device: str) -> MouthRenderer:
    if checkpoint is None:
        from realtime.renderers.default import DefaultRenderer

        return DefaultRenderer()
    from models.checkpoints import resolve_device
    from models.wav2lip import load_wav2lip
    from realtime.renderers.wav2lip import Wav2LipRenderer

    return Wav2LipRenderer(load_wav2lip(checkpoint, "cpu"), device=resolve_device(device))


def load_local_engine(avatar: Avatar | str | Path | None = None, checkpoint: str | Path | None = None,
                      device: str = "auto", *, renderer: MouthRenderer | None = None,
                      config: EngineConfig | None = None) -> LocalEngine:
    """Load the avatar and renderer and warm the worker up (seconds; call it from a thread)."""
    avatar_obj = _load_avatar(avatar)
    mouth = renderer if renderer is not None else _load_renderer(checkpoint, device)
    # Size the (fixed) delay from the renderer's measured cost, as the server does: a Wav2Lip checkpoint
    # on a small CPU needs more than the default compute budget, the built-in renderer much less.
    engine_config = config or EngineConfig(fit_budget_to_renderer=True)
    worker = ThreadedRenderWorker(mouth, max_batch=engine_config.max_batch,
                                  max_wait_s=engine_config.max_batch_wait_ms / 1000.0, name="render-local")
    try:
        worker.prepare(avatar_obj, warmup=True)
    except BaseException:
        worker.close()
        raise
    log.info("local lip-sync engine ready", extra={"renderer": worker.name, "frames": len(avatar_obj.frames)})
    return LocalEngine(avatar_obj, worker, engine_config)


@dataclass(frozen=True)
class Tick:
    """One output tick of a session: video frame `index` and the audio that plays with it."""
    index: int            # video frame k, at t0 + k / fps
    sample: int           # the first output audio sample of this tick (pts j / SAMPLE_RATE)
    video: VideoOut
    pcm: bytes | None     # the utterance audio of the tick as int16 PCM, None when it carries none
    late: bool            # the next tick was already due when this one was pulled


async def paced_ticks(session: LipSyncSession, fps: float) -> AsyncIterator[Tick]:
    """The adapters' one clock: a tick at t0 + k / fps (never early), each pulling its image and the
    audio samples up to the next tick, so image k and its audio come from the same session state. The
    adapter decides what a late tick drops (an image, never the audio)."""
    t0 = time.monotonic()
    k = 0
    j = 0
    while True:
        delay = t0 + k / fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        n = round((k + 1) * SAMPLE_RATE / fps) - round(k * SAMPLE_RATE / fps)
        video = session.next_video_frame()
        pcm = session.playback.last_block_pcm16(session.next_audio(n))
        late = time.monotonic() - (t0 + (k + 1) / fps) > 0
        yield Tick(k, j, video, pcm, late)
        k += 1
        j += n
