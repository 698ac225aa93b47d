"""A runnable Pipecat bot with a self-hosted lip-synced avatar: SmallWebRTC, a local TTS (espeak-ng) and
integrations.pipecat.LipSyncVideoService, no cloud service anywhere.

    pip install -e '.[pipecat]'          # and espeak-ng (apt-get install espeak-ng)
    python examples/pipecat_avatar_bot.py [--host 127.0.0.1] [--port 7860] [--avatar face.mp4]
                                          [--checkpoint wav2lip_gan.pth] [--device auto]

A WebRTC client POSTs its offer ({"sdp", "type"}) to /api/offer and gets the answer; the bot greets it,
then speaks every text it sends on the data channel (an app message: a string, or {"text": ...}).
The pipeline: transport.input() -> EspeakTTSService -> LipSyncVideoService -> transport.output();
the avatar service turns the TTS audio into the avatar video and the same audio, delayed to match.
There is no speech recognition or LLM here: put yours between the input and the TTS.

Tested (tests/test_examples_pipecat.py) on loopback with an aiortc client and no ICE servers.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
import wave
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from pipecat.frames.frames import Frame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from integrations.local_engine import LocalEngine, load_local_engine
from integrations.pipecat import LipSyncVideoService

log = logging.getLogger("pipecat_avatar_bot")

GREETING = "Hello! I am a self-hosted avatar. Send me some text and I will say it."


class EspeakTTSService(TTSService):
    """Local text to speech with the espeak-ng command line (its 22.05 kHz wav, resampled by Pipecat)."""

    def __init__(self, *, voice: str = "en", wpm: int = 160, **kwargs: Any) -> None:
        super().__init__(push_start_frame=True, push_stop_frames=True,
                         settings=TTSSettings(model=None, voice=voice, language=None), **kwargs)
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
        self._exe = exe
        self._voice = voice
        self._wpm = wpm

    def can_generate_metrics(self) -> bool:
        return False

    async def _synthesize(self, text: str) -> tuple[bytes, int]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "speech.wav"
            proc = await asyncio.create_subprocess_exec(
                self._exe, "-v", self._voice, "-s", str(self._wpm), "-w", str(path), "--", text,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            if await proc.wait() != 0:
                raise RuntimeError(f"espeak-ng failed ({proc.returncode})")
            with wave.open(str(path)) as w:
                return w.readframes(w.getnframes()), w.getframerate()

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        pcm, rate = await self._synthesize(text)

        async def chunks() -> AsyncIterator[bytes]:
            step = rate // 10 * 2   # 100 ms of s16 mono
            for i in range(0, len(pcm) - len(pcm) % 2, step):
                yield pcm[i:i + step]

        async for frame in self._stream_audio_frames_from_iterator(chunks(), in_sample_rate=rate,
                                                                   context_id=context_id):
            yield frame


class AvatarBot:
    """One pipeline per WebRTC connection; the avatar engine (avatar, renderer) is loaded once."""

    def __init__(self, engine: LocalEngine, greeting: str = GREETING) -> None:
        self.engine = engine
        self.greeting = greeting
        self.handler = SmallWebRTCRequestHandler(ice_servers=[])   # no STUN: LAN / loopback
        self.runs: set[asyncio.Task] = set()

    async def offer(self, request: web.Request) -> web.Response:
        body = await request.json()
        answer = await self.handler.handle_web_request(
            SmallWebRTCRequest(sdp=body["sdp"], type=body["type"], pc_id=body.get("pc_id")), self._start)
        return web.json_response(answer)

    async def _start(self, connection: SmallWebRTCConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._run(connection))
        self.runs.add(task)
        task.add_done_callback(self.runs.discard)

    async def _run(self, connection: SmallWebRTCConnection) -> None:
        width, height = self.engine.size
        transport = SmallWebRTCTransport(connection, TransportParams(
            audio_in_enabled=True, audio_out_enabled=True, audio_out_sample_rate=48000,
            video_out_enabled=True, video_out_is_live=True, video_out_width=width, video_out_height=height,
            video_out_framerate=round(self.engine.fps)))
        avatar = LipSyncVideoService(engine=self.engine)   # shares the loaded avatar and render worker
        pipeline = Pipeline([transport.input(), EspeakTTSService(), avatar, transport.output()])
        worker = PipelineWorker(pipeline, params=PipelineParams(), cancel_on_idle_timeout=False)

        @transport.event_handler("on_client_connected")
        async def greet(transport: Any, client: Any) -> None:
            await worker.queue_frame(TTSSpeakFrame(self.greeting))

        @transport.event_handler("on_app_message")
        async def say(transport: Any, message: Any, sender: Any) -> None:
            text = message.get("text") if isinstance(message, dict) else message
            if isinstance(text, str) and text.strip():
                await worker.queue_frame(TTSSpeakFrame(text))

        @transport.event_handler("on_client_disconnected")
        async def bye(transport: Any, client: Any) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    async def close(self) -> None:
        await self.handler.close()
        for task in list(self.runs):
            task.cancel()
        await asyncio.gather(*self.runs, return_exceptions=True)


def create_app(engine: LocalEngine, greeting: str = GREETING) -> web.Application:
    bot = AvatarBot(engine, greeting)
    app = web.Application()
    app.router.add_post("/api/offer", bot.offer)

    async def shutdown(app: web.Application) -> None:
        await bot.close()

    app.on_shutdown.append(shutdown)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--avatar", default=None, help="a face video or image (default: the embedded avatar)")
    parser.add_argument("--checkpoint", default=None, help="a Wav2Lip checkpoint (default: no-weights renderer)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    engine = load_local_engine(args.avatar, args.checkpoint, args.device)
    try:
        web.run_app(create_app(engine), host=args.host, port=args.port)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
