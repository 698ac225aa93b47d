"""examples/livekit_avatar_agent.py offline: an AgentSession without a room (as LiveKit's own tests run
it) says the greeting with the example's espeak-ng TTS into the example's QueueAudioOutput + AvatarRunner
wiring (a stand-in room: no LiveKit server can run here); the agent side hears playback finish with the
whole greeting played. Needs the [livekit] extra and espeak-ng."""
from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path

import pytest
from server_helpers import LoudnessRenderer, TinyAvatar
from test_integration_livekit import FakeRoom

from integrations.livekit import LipSyncVideoGenerator

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "livekit_avatar_agent.py"


def load_example():
    spec = importlib.util.spec_from_file_location("livekit_avatar_agent", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_agent_greets_through_the_avatar_runner():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    example = load_example()
    # How long the greeting is, from the same TTS.
    spoken = 0.0
    async with example.EspeakTTS().synthesize(example.GREETING) as stream:
        async for audio in stream:
            spoken += audio.frame.duration
    assert spoken > 1.0
    generator = await LipSyncVideoGenerator.load(TinyAvatar(), renderer=LoudnessRenderer())
    room = FakeRoom()
    audio_out, runner = await example.start_avatar(room, generator)
    finished: list[tuple[float, bool]] = []
    audio_out.on("playback_finished", lambda ev: finished.append((ev.playback_position, ev.interrupted)))
    session = await example.start_agent(audio_out)
    try:
        session.say(example.GREETING)
        for _ in range(int((spoken + 5) * 10)):
            if finished:
                break
            await asyncio.sleep(0.1)
        assert finished, "the greeting never finished playing"
        position, interrupted = finished[0]
        assert interrupted is False
        assert position == pytest.approx(spoken, abs=0.040), (position, spoken)
        assert len(room.local_participant.published) == 2
    finally:
        await session.aclose()
        await runner.aclose()
        await generator.aclose()
