"""A LiveKit Agents agent with a self-hosted lip-synced avatar, wired like the in-process bitHuman plugin:
the agent session's audio output is a `QueueAudioOutput`, and an `AvatarRunner` turns it into the avatar's
video and audio tracks with integrations.livekit.LipSyncVideoGenerator.

    pip install -e '.[livekit]'          # and espeak-ng (apt-get install espeak-ng)
    export LIVEKIT_URL=ws://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/livekit_avatar_agent.py dev
    (options through the environment: LIPSYNC_AVATAR=face.mp4, LIPSYNC_CHECKPOINT=wav2lip_gan.pth,
     LIPSYNC_DEVICE=auto)

The speech comes from a local espeak-ng TTS (EspeakTTS below) and the agent only greets: plug your STT
and LLM into the AgentSession for a conversation. It needs a LiveKit server, which could not be run where
this was written: the generator, EspeakTTS and the QueueAudioOutput + AvatarRunner wiring are tested
offline (tests/test_integration_livekit.py, tests/test_examples_livekit.py); a real room was not.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import wave
from pathlib import Path

from livekit import rtc
from livekit.agents import Agent, AgentSession, JobContext, RoomOutputOptions, WorkerOptions, cli, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions
from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

from integrations.livekit import LipSyncVideoGenerator

GREETING = "Hello! I am a self-hosted avatar, speaking through LiveKit."


class EspeakTTS(tts.TTS):
    """Local text to speech with the espeak-ng command line (22.05 kHz mono)."""

    def __init__(self, voice: str = "en", wpm: int = 160) -> None:
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False), sample_rate=22050, num_channels=1)
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
        self.exe, self.voice, self.wpm = exe, voice, wpm

    def synthesize(self, text: str, *,
                   conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> tts.ChunkedStream:
        return _EspeakStream(tts=self, input_text=text, conn_options=conn_options)


class _EspeakStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        engine = self._tts
        assert isinstance(engine, EspeakTTS)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "speech.wav"
            proc = await asyncio.create_subprocess_exec(
                engine.exe, "-v", engine.voice, "-s", str(engine.wpm), "-w", str(path), "--", self._input_text,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            if await proc.wait() != 0:
                raise RuntimeError(f"espeak-ng failed ({proc.returncode})")
            with wave.open(str(path)) as w:
                rate, pcm = w.getframerate(), w.readframes(w.getnframes())
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=rate, num_channels=1,
                                  mime_type="audio/pcm")
        output_emitter.push(pcm)
        output_emitter.flush()


async def start_avatar(room: rtc.Room, generator: LipSyncVideoGenerator) -> tuple[QueueAudioOutput, AvatarRunner]:
    """The agent's speech goes into a queue; the runner feeds it to the generator and publishes the
    avatar's synced video and audio in `room` (the agent publishes no audio of its own)."""
    audio_out = QueueAudioOutput(sample_rate=generator.audio_sample_rate)
    runner = AvatarRunner(room, audio_recv=audio_out, video_gen=generator, options=generator.avatar_options())
    await runner.start()
    return audio_out, runner


async def start_agent(audio_out: QueueAudioOutput, room: rtc.Room | None = None) -> AgentSession:
    """An agent session speaking into `audio_out` (add your STT and LLM here)."""
    session: AgentSession = AgentSession(tts=EspeakTTS())
    session.output.audio = audio_out
    agent = Agent(instructions="You are a friendly avatar.")
    if room is None:
        await session.start(agent=agent)
    else:
        await session.start(agent=agent, room=room, room_output_options=RoomOutputOptions(audio_enabled=False))
    return session


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    generator = await LipSyncVideoGenerator.load(os.environ.get("LIPSYNC_AVATAR"),
                                                 os.environ.get("LIPSYNC_CHECKPOINT"),
                                                 os.environ.get("LIPSYNC_DEVICE", "auto"))
    audio_out, runner = await start_avatar(ctx.room, generator)
    ctx.add_shutdown_callback(runner.aclose)
    ctx.add_shutdown_callback(generator.aclose)
    session = await start_agent(audio_out, ctx.room)
    session.say(GREETING)


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
