"""examples/pipecat_avatar_bot.py over WebRTC on loopback: an aiortc client (no ICE servers, aioice on
127.0.0.1 only) offers to receive audio and video; the bot greets it with espeak-ng speech through
LipSyncVideoService, then speaks a text sent as an app message on the data channel. The avatar is the
tiny test avatar with the loudness renderer (measurable mouth),
loaded through the example's own engine loader. Needs the [pipecat] extra and espeak-ng."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from server_helpers import LoudnessRenderer, TinyAvatar, mouth_level

from integrations.local_engine import load_local_engine

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("loopback_only")]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_avatar_bot.py"


def load_example():
    spec = importlib.util.spec_from_file_location("pipecat_avatar_bot", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def louder(chunks: list[tuple[float, np.ndarray]], level: float) -> bool:
    return any(float(np.sqrt(np.mean(a ** 2))) > level for _, a in chunks)


async def wait_for_quiet(audio: list[tuple[float, np.ndarray]], seconds: float, within_s: float = 20.0) -> None:
    """Until the last `seconds` of received audio were silent."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        recent = [(t, a) for t, a in audio if t > time.monotonic() - seconds]
        if len(recent) >= int(seconds * 40) and not louder(recent, 0.01):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the audio never went quiet")


async def test_bot_greets_with_a_moving_mouth_over_webrtc():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    example = load_example()
    engine = await asyncio.to_thread(load_local_engine, TinyAvatar(), renderer=LoudnessRenderer())
    runner = web.AppRunner(example.create_app(engine, greeting="Hello there, how are you today?"),
                           handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/offer"
    pc = RTCPeerConnection(configuration=RTCConfiguration(iceServers=[]))
    video: list[tuple[float, np.ndarray]] = []
    audio: list[tuple[float, np.ndarray]] = []
    tasks: list[asyncio.Task] = []

    async def read(track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                video.append((time.monotonic(), frame.to_ndarray(format="bgr24")))
            else:
                audio.append((time.monotonic(), frame.to_ndarray().astype(np.float32).reshape(-1) / 32768))

    pc.on("track", lambda track: tasks.append(asyncio.ensure_future(read(track))))
    channel = pc.createDataChannel("chat")   # the bot speaks the text of app messages sent here
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json={"sdp": pc.localDescription.sdp, "type": "offer"}) as resp:
                assert resp.status == 200
                answer = await resp.json()
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            loud = [a for _, a in audio if np.sqrt(np.mean(a ** 2)) > 0.02]
            if len(loud) > 25 and len(video) > 75:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        assert video, "no video received"
        assert video[0][1].shape[:2] == (64, 64)
        levels = [mouth_level(img) for _, img in video]
        resting = min(levels)
        assert max(levels) > resting + 20, levels       # the mouth moved with the greeting
        rms = [float(np.sqrt(np.mean(a ** 2))) for _, a in audio]
        assert max(rms) > 0.05, "no speech audio received"
        # Video arrives at the avatar's fps.
        times = np.array([t for t, _ in video[-50:]])
        fps = (len(times) - 1) / (times[-1] - times[0])
        assert 20.0 <= fps <= 30.0, fps
        # Once the greeting is over, an app message on the data channel is spoken too.
        await wait_for_quiet(audio, 0.6)
        n_before = len(audio)
        channel.send(json.dumps({"type": "say", "text": "Nice to meet you."}))
        for _ in range(150):
            if louder(audio[n_before:], 0.05):
                break
            await asyncio.sleep(0.1)
        assert louder(audio[n_before:], 0.05), "the app message was not spoken"
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        await asyncio.to_thread(engine.close)
