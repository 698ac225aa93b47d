"""LipSyncVideoGenerator: a self-hosted lip-synced avatar for LiveKit Agents, the engine in-process.

A `livekit.agents.voice.avatar.VideoGenerator`, wired the way the in-process bitHuman plugin is: the
agent's audio goes to a `QueueAudioOutput`, an `AvatarRunner` feeds it to this generator and publishes
what the generator yields (examples/livekit_avatar_agent.py):

    generator = await LipSyncVideoGenerator.load(avatar=None, checkpoint=None, device="auto")
    audio_out = QueueAudioOutput(sample_rate=generator.audio_sample_rate)
    runner = AvatarRunner(room, audio_recv=audio_out, video_gen=generator, options=generator.avatar_options())

- `push_audio(rtc.AudioFrame)`: any rate, s16, mono or interleaved; frames up to an `AudioSegmentEnd` are
  one utterance of the engine; `push_audio(AudioSegmentEnd())` completes it;
- `clear_buffer()`: barge-in; the engine drops what is queued: the next frame is the resting avatar and
  no more audio of that segment is yielded (the runner reports the interruption itself);
- iterating yields, paced by the generator's clock at the avatar's fps, one `rtc.VideoFrame` (RGB24, the
  avatar's size) per tick, followed, while an utterance plays, by that tick's delayed speech as an
  `rtc.AudioFrame` (16 kHz mono: the utterance's samples, the first frame from the tick's start with
  the silence before the utterance's first sample, which the engine places between ticks; so the runner,
  which publishes frames back to back, keeps audio and images in sync, and its playback position, the sum
  of the audio frames' durations, is the engine's plus that silence, under one frame), and
  `AudioSegmentEnd` right after the last audio frame of a segment that played to its end.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import cv2
import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions, VideoGenerator

from integrations.local_engine import LocalEngine, load_local_engine, paced_ticks
from realtime.avatars.avatar import Avatar
from realtime.config import SAMPLE_RATE
from realtime.renderers.base import MouthRenderer
from realtime.timeline.playback import PlaybackEvent, SpeechEnded, new_utterance_id
from realtime.timeline.session import LipSyncSession

log = logging.getLogger(__name__)

OUTPUT_RATE = SAMPLE_RATE

Output = rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd


class LipSyncVideoGenerator(VideoGenerator):
    def __init__(self, engine: LocalEngine, *, owns_engine: bool = False) -> None:
        """`engine`: a loaded LocalEngine (see `load`); closed by `aclose()` when `owns_engine`."""
        self._engine = engine
        self._owns_engine = owns_engine
        self._session: LipSyncSession = engine.open_session("livekit")
        self._events: list[PlaybackEvent] = []
        self._session.playback.subscribe(self._events.append)
        self._utterance: str | None = None

    @classmethod
    async def load(cls, avatar: Avatar | str | Path | None = None, checkpoint: str | Path | None = None,
                   device: str = "auto", *, renderer: MouthRenderer | None = None) -> LipSyncVideoGenerator:
        """Load the avatar and renderer in a thread (seconds) and make a generator that owns them."""
        engine = await asyncio.to_thread(load_local_engine, avatar, checkpoint, device, renderer=renderer)
        return cls(engine, owns_engine=True)

    # -- what AvatarOptions needs -------------------------------------------------------------------------
    @property
    def video_resolution(self) -> tuple[int, int]:
        return self._engine.size

    @property
    def video_fps(self) -> float:
        return self._engine.fps

    @property
    def audio_sample_rate(self) -> int:
        return OUTPUT_RATE

    @property
    def latency_s(self) -> float:
        return self._session.latency_ms / 1000.0

    def avatar_options(self) -> AvatarOptions:
        width, height = self.video_resolution
        return AvatarOptions(video_width=width, video_height=height, video_fps=self.video_fps,
                             audio_sample_rate=OUTPUT_RATE, audio_channels=1)

    # -- VideoGenerator ---------------------------------------------------------------------------------
    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            if self._utterance is not None:
                self._session.end_of_audio()
                self._utterance = None
            return
        if self._utterance is None:
            self._utterance = new_utterance_id()
        samples = np.frombuffer(frame.data, dtype=np.int16)
        self._session.push_audio(samples, frame.sample_rate, frame.num_channels, utterance=self._utterance)

    def clear_buffer(self) -> None:
        self._session.interrupt()
        self._utterance = None

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._stream()

    async def _stream(self) -> AsyncGenerator[Output, None]:
        width, height = self._engine.size
        async for tick in paced_ticks(self._session, self._engine.fps):
            rgb = cv2.cvtColor(tick.video.image, cv2.COLOR_BGR2RGB)
            yield rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, rgb.tobytes())
            if tick.pcm is not None:
                yield rtc.AudioFrame(tick.pcm, OUTPUT_RATE, 1, len(tick.pcm) // 2)
            events, self._events[:] = list(self._events), []
            for event in events:
                if isinstance(event, SpeechEnded) and not event.interrupted:
                    yield AudioSegmentEnd()

    async def aclose(self) -> None:
        self._session.close()
        if self._owns_engine:
            await asyncio.to_thread(self._engine.close)
