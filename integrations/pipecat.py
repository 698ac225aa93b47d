"""LipSyncVideoService: a self-hosted lip-synced avatar for Pipecat, the engine in-process (no server).

    from integrations.pipecat import LipSyncVideoService
    avatar = LipSyncVideoService(avatar=None, checkpoint=None, device="auto")
    pipeline = Pipeline([transport.input(), stt, llm, tts, avatar, transport.output()])

Like Pipecat's hosted avatar services (Simli, Tavus, HeyGen), it takes the TTS audio and returns synced
video and audio, and the transport plays the service's audio, not the TTS's:
- consumes `TTSAudioRawFrame` (any rate, mono or interleaved stereo s16) and `TTSStoppedFrame`; each TTS
  context (`context_id`, or the audio up to a `TTSStoppedFrame`) is one utterance of the engine;
- on `InterruptionFrame` the engine drops what is queued (the next frame is the resting avatar and the
  audio stops within one frame); the frame is passed on;
- emits, paced by its own clock at the avatar's fps: one `OutputImageRawFrame` (RGB, the avatar's size)
  per tick and, while an utterance plays, the delayed speech as `SpeechOutputAudioRawFrame` (16 kHz mono
  s16: the output transport resamples), exactly the utterance's samples, aligned with the images; the
  `TTSStoppedFrame` goes on when its utterance has finished playing (or was interrupted);
- passes every other frame on.
Output frames carry `pts` (ns) on the engine's output timeline: image k at k / fps, audio sample j at
j / 16000.

Loading (avatar preparation, renderer warm-up) runs in a thread at `StartFrame`.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from integrations.local_engine import LocalEngine, load_local_engine, paced_ticks
from realtime.avatars.avatar import Avatar
from realtime.config import SAMPLE_RATE, EngineConfig
from realtime.renderers.base import MouthRenderer
from realtime.timeline.playback import PlaybackEvent, SpeechEnded, SpeechStarted, new_utterance_id
from realtime.timeline.session import LipSyncSession

log = logging.getLogger(__name__)

OUTPUT_RATE = SAMPLE_RATE
NS = 1_000_000_000


class LipSyncVideoService(AIService):
    def __init__(self, avatar: Avatar | str | Path | None = None, checkpoint: str | Path | None = None,
                 device: str = "auto", *, renderer: MouthRenderer | None = None,
                 engine_config: EngineConfig | None = None, engine: LocalEngine | None = None,
                 **kwargs: Any) -> None:
        """`avatar`: None (embedded default), a video/image path, or a prepared avatar. `checkpoint`: a
        Wav2Lip checkpoint (None: the no-weights renderer). `renderer`: a ready MouthRenderer (tests).
        `engine`: an already loaded LocalEngine shared by several bots (then the others are ignored and
        the engine is left open at the end)."""
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self._load_args = (avatar, checkpoint, device, renderer, engine_config)
        self._shared_engine = engine
        self._engine: LocalEngine | None = None
        self._session: LipSyncSession | None = None
        self._pacer: asyncio.Task[None] | None = None
        self._utterance: str | None = None
        self._context: str | None = None
        self._events: list[PlaybackEvent] = []
        self._utterance_delay_s: float | None = None
        self._stops: dict[str, TTSStoppedFrame] = {}   # held back until their utterance has played
        self._latency_s = 0.0

    # -- properties ------------------------------------------------------------------------------------
    @property
    def fps(self) -> float:
        return self._engine.fps if self._engine is not None else 0.0

    @property
    def latency_s(self) -> float:
        """The engine's fixed delay from TTS audio in to the same audio (and its mouth) out (0 before
        StartFrame)."""
        return self._latency_s

    @property
    def utterance_delay_s(self) -> float | None:
        """The delay the latest utterance started with: `latency_s`, or less when its TTS audio arrived
        ahead of real time (realtime/timeline/utterance_start.py). None before any utterance started playing."""
        return self._utterance_delay_s

    def can_generate_metrics(self) -> bool:
        return False

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        avatar, checkpoint, device, renderer, config = self._load_args
        if self._shared_engine is not None:
            self._engine = self._shared_engine
        else:
            self._engine = await asyncio.to_thread(load_local_engine, avatar, checkpoint, device,
                                                   renderer=renderer, config=config)
        self._session = self._engine.open_session(self.name)
        self._session.playback.subscribe(self._events.append)
        self._latency_s = self._session.latency_ms / 1000.0
        self._pacer = self.create_task(self._pace(), name="lipsync-pacer")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._shutdown()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._shutdown()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._pacer is not None:
            await self.cancel_task(self._pacer)
            self._pacer = None
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._engine is not None and self._engine is not self._shared_engine:
            await asyncio.to_thread(self._engine.close)
        self._engine = None

    # -- frames in -------------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction is FrameDirection.DOWNSTREAM:
            self._push_tts(frame)
        elif isinstance(frame, TTSStoppedFrame) and direction is FrameDirection.DOWNSTREAM:
            await self._end_utterance(frame)
        elif isinstance(frame, InterruptionFrame):
            self._interrupt()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _push_tts(self, frame: TTSAudioRawFrame) -> None:
        if self._session is None:
            return
        context = frame.context_id
        if self._utterance is None or (context is not None and context != self._context):
            self._utterance = context or new_utterance_id()
            self._context = context
        samples = np.frombuffer(frame.audio, dtype=np.int16)
        self._session.push_audio(samples, frame.sample_rate, frame.num_channels, utterance=self._utterance)

    async def _end_utterance(self, frame: TTSStoppedFrame) -> None:
        if self._session is None or self._utterance is None:
            await self.push_frame(frame)
            return
        self._stops[self._utterance] = frame
        self._session.end_of_audio()
        self._utterance = None
        self._context = None
        await self._flush_events()   # an utterance that had already played out ends now

    def _interrupt(self) -> None:
        if self._session is not None:
            self._session.interrupt()
        self._utterance = None
        self._context = None

    # -- frames out ------------------------------------------------------------------------------------
    async def _pace(self) -> None:
        """One image per tick at the avatar's fps, and the audio of that tick, on one clock."""
        session = self._session
        assert session is not None and self._engine is not None
        fps = self._engine.fps
        width, height = self._engine.size
        async for tick in paced_ticks(session, fps):
            if not tick.late:  # behind by a whole frame: skip the image, never the audio
                image = OutputImageRawFrame(image=cv2.cvtColor(tick.video.image, cv2.COLOR_BGR2RGB).tobytes(),
                                            size=(width, height), format="RGB")
                image.pts = round(tick.index * NS / fps)
                await self.push_frame(image)
            if tick.pcm is not None:
                speech = SpeechOutputAudioRawFrame(audio=tick.pcm, sample_rate=OUTPUT_RATE, num_channels=1)
                speech.pts = round(tick.sample * NS / OUTPUT_RATE)
                await self.push_frame(speech)
            await self._flush_events()

    async def _flush_events(self) -> None:
        events, self._events[:] = list(self._events), []
        for event in events:
            if isinstance(event, SpeechStarted) and self._session is not None:
                delay_ms = self._session.metrics().utterance_delay_ms
                self._utterance_delay_s = None if delay_ms is None else delay_ms / 1000.0
            if isinstance(event, SpeechEnded):
                stop = self._stops.pop(event.utterance, None)
                if stop is not None:
                    await self.push_frame(stop)
