"""Server integration tests: a real offer/answer over loopback with aiortc as the client, in-process.

The engine is the real LipSyncSession with a tiny avatar and a loudness renderer (server_helpers);
test_server_engine.py drives the embedded default avatar and the default renderer.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from server_helpers import Client, PcmTrack, echo_delays, mouth_level

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("loopback_only")]


async def test_frames_arrive_at_avatar_fps(server, http):
    client = Client(server, http)
    answer = await client.connect()
    assert answer["type"] == "answer" and answer["session_id"]
    assert answer["fps"] == 25.0
    await client.wait_for_video(10)
    t_first = client.received.video[0][0]
    n_first = len(client.received.video)
    await asyncio.sleep(3.0)
    frames = client.received.video[n_first - 1:]
    fps = (len(frames) - 1) / (frames[-1][0] - frames[0][0])
    assert 22.0 <= fps <= 28.0, fps
    pts = [p for _, p, _ in client.received.video]
    steps = np.diff(pts)
    assert np.all(steps > 0)
    assert np.median(steps) == 3600  # 90 kHz / 25 fps
    assert client.received.video[-1][2].shape == (64, 64, 3)
    assert client.received.audio, "no audio received"
    assert t_first > 0
    await client.close()


async def session_metrics(client: Client, http) -> dict:
    async with http.get(client.url(), headers=client.auth) as resp:
        assert resp.status == 200
        return await resp.json()


def to_16k(signal_48k: np.ndarray) -> np.ndarray:
    return signal_48k[::3]  # Opus from a 16 kHz source holds nothing above 8 kHz


async def test_returned_audio_matches_sent_audio(server, http, speech_16k):
    client = Client(server, http)
    mic = PcmTrack(speech_16k)
    await client.connect(microphone=mic)
    await client.wait_for_video(5)
    await asyncio.sleep(len(speech_16k) / 16000 + 1.5)
    received = to_16k(client.audio_signal())
    assert client.received.audio_rate == 48000
    matches = echo_delays(speech_16k, received, mic.started_at - client.received.audio[0][0])
    good = [delay for corr, delay in matches if corr > 0.8]
    assert len(good) >= 0.8 * len(matches), matches
    # The echo is the sent speech delayed by the engine's fixed latency plus transport; never early.
    assert all(0.3 <= delay <= 1.0 for delay in good), matches
    metrics = await session_metrics(client, http)
    assert metrics["engine"]["audio_in_samples"] >= 0.9 * speech_16k.size
    await client.close()


async def test_the_microphone_reaches_the_engine_as_16k_mono(server, http, speech_16k, monkeypatch):
    """The server decodes its microphone straight to the engine's input format (server/media/opus_fec.py): no
    48 kHz stereo frame is made, averaged and resampled per 20 ms; the test client's own receiver (same
    process) still gets aiortc's 48 kHz."""
    from server.media.audio_input import AudioInput

    seen: list[tuple[int, int, int]] = []
    original = AudioInput.microphone

    def microphone(self, samples, sample_rate, channels):
        seen.append((sample_rate, channels, len(samples)))
        return original(self, samples, sample_rate, channels)

    monkeypatch.setattr(AudioInput, "microphone", microphone)
    client = Client(server, http)
    await client.connect(microphone=PcmTrack(speech_16k))
    await client.wait_for_video(5)
    await asyncio.sleep(1.0)
    assert len(seen) >= 25
    assert set(seen) == {(16000, 1, 320)}
    assert client.received.audio_rate == 48000
    await client.close()


async def test_push_upload_drives_the_mouth(server, http, speech_wav):
    client = Client(server, http)
    await client.connect()  # recvonly: no microphone, audio comes from the push API
    await client.wait_for_video(10)
    idle = [mouth_level(img) for _, _, img in client.received.video[-5:]]
    n0 = len(client.received.video)
    url = client.url("/audio")
    async with http.post(url, data=speech_wav.read_bytes(),
                         headers={"Content-Type": "audio/wav", **client.auth}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert 2.0 < body["queued_s"] < 6.0
    await asyncio.sleep(2.0)
    talking = [mouth_level(img) for _, _, img in client.received.video[n0:]]
    assert max(talking) > max(idle) + 20, (idle, talking)
    async with http.get(client.url(), headers=client.auth) as resp:
        state = await resp.json()
        assert state["speaking"] is True and state["microphone"] is False
    await client.close()


async def test_push_raw_pcm_and_websocket_stream(server, http, speech_16k):
    client = Client(server, http)
    await client.connect()
    await client.wait_for_video(3)
    pcm = (speech_16k[:16000] * 32767).astype(np.int16)
    url = client.url("/audio", rate="16000", channels="1")
    async with http.post(url, data=pcm.tobytes(), headers=client.auth) as resp:
        assert resp.status == 200
        assert abs((await resp.json())["queued_s"] - 1.0) < 1e-3
    # The stream: 48 kHz stereo float32 chunks, as a TTS might produce them.
    stereo = np.repeat(np.interp(np.arange(48000) / 3, np.arange(16000), speech_16k[:16000]), 2)
    ws_url = client.url("/stream", rate="48000", channels="2", format="f32", token=True)  # no headers on a browser WS
    async with http.ws_connect(ws_url) as ws:
        for chunk in np.array_split(stereo.astype(np.float32), 10):
            await ws.send_bytes(chunk.tobytes())
        await ws.send_str('{"type": "status"}')
        # The first chunk opens an utterance ({"type": "started"}); playback events come in between.
        while (status := await ws.receive_json(timeout=5))["type"] in ("started", "queue", "speech_started"):
            pass
        assert status["type"] == "status" and status["speaking"] is True
        await ws.send_bytes(b"\x00\x01\x02")  # not a whole number of frames: an error, not a disconnect
        while (error := await ws.receive_json(timeout=5))["type"] in ("queue", "speech_started"):
            pass
        assert error["type"] == "error" and error["status"] == 400
    metrics = await session_metrics(client, http)
    assert metrics["engine"]["audio_in_samples"] >= 32000 - 320  # both seconds reached the engine
    await client.close()


async def test_interrupt_stops_talking(server, http, speech_16k):
    client = Client(server, http)
    await client.connect()
    await client.wait_for_video(3)
    long_speech = np.tile(speech_16k, 4)
    url = client.url("/audio", rate="16000")
    async with http.post(url, data=(long_speech * 32767).astype(np.int16).tobytes(), headers=client.auth) as resp:
        assert resp.status == 200
    await asyncio.sleep(1.5)
    t0 = time.monotonic()
    async with http.post(client.url("/interrupt"), headers=client.auth) as resp:
        assert resp.status == 200 and (await resp.json())["interrupted"] is True
    assert time.monotonic() - t0 < 0.5
    await asyncio.sleep(0.6)  # the delay line and the jitter buffer drain
    n0 = len(client.received.video)
    audio_before = len(client.received.audio)
    await asyncio.sleep(1.0)
    after = [mouth_level(img) for _, _, img in client.received.video[n0:]]
    assert max(after) < 100, after  # the mouth is back at rest (90)
    tail = np.concatenate([a for _, a in client.received.audio[audio_before:]])
    assert np.sqrt(np.mean(tail ** 2)) < 0.005
    metrics = await session_metrics(client, http)
    assert metrics["engine"]["interrupts"] == 1
    assert metrics["queued_audio_s"] == 0
    await client.close()


@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_video_codecs(server, http, codec):
    client = Client(server, http)
    answer = await client.connect(options={"video_codec": codec})
    video_section = answer["sdp"].split("m=video", 1)[1]
    assert {"vp8": "VP8/90000", "h264": "H264/90000"}[codec] in video_section
    assert {"vp8": "H264/90000", "h264": "VP8/90000"}[codec] not in video_section
    await client.wait_for_video(10)
    assert client.received.video[-1][2].shape == (64, 64, 3)
    await client.close()


async def test_say_uses_local_tts(server, http):
    from server.state import STATE

    if not server.app[STATE].tts.available:
        pytest.skip("espeak-ng is not installed")
    client = Client(server, http)
    await client.connect()
    await client.wait_for_video(3)
    url = client.url("/say")
    async with http.post(url, json={"text": "Hello from the push API."}, headers=client.auth) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert body["queued_s"] > 0.5
    async with http.post(url, json={"text": ""}, headers=client.auth) as resp:
        assert resp.status == 400
    await client.close()


async def test_sessions_listing_health_and_metrics(server, http):
    client = Client(server, http)
    await client.connect()
    await client.wait_for_video(30)
    async with http.get(server.endpoint("/sessions")) as resp:
        listing = await resp.json()
    assert [s["id"] for s in listing["sessions"]] == [client.session_id]
    assert listing["sessions"][0]["state"] == "connected"
    async with http.get(server.endpoint("/healthz")) as resp:
        health = await resp.json()
        assert resp.status == 200 and health["status"] == "ok" and health["sessions"] == 1
    async with http.get(server.endpoint("/metrics")) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert "# TYPE lipsync_sessions gauge" in text
    assert "lipsync_sessions 1" in text
    # Live sessions in aggregate, never a series per session (ids and tokens stay out of /metrics).
    assert client.session_id not in text and client.token not in text and "session=" not in text
    assert 'lipsync_live_session_fps_bucket{le="15.0"} 0' in text
    assert 'lipsync_live_session_fps_bucket{le="30.0"} 1' in text
    assert 'lipsync_offer_seconds_bucket{le="+Inf"} 1' in text
    async with http.get(server.endpoint("/config")) as resp:
        config = await resp.json()
        assert config["ice_servers"] == [] and config["fps"] == 25.0 and config["avatar"] == "tiny"
        assert config["runtime"] == "" and config["precision"] == ""  # the no-weights renderer has neither
    async with http.get(server.endpoint("/")) as resp:
        assert resp.status == 200 and "<video" in await resp.text()
    await client.close()


async def test_a_long_raw_pcm_upload_is_converted_off_the_event_loop(server, http, speech_16k, monkeypatch):
    """Resampling a long clip costs the loop ~1 ms per second of 48 kHz audio: it runs on the WorkPool."""
    import threading

    from server.routes import push_api

    threads: list[str] = []

    def recording_convert(*args):
        threads.append(threading.current_thread().name)
        return convert_clip(*args)

    convert_clip = push_api.convert_clip
    monkeypatch.setattr(push_api, "convert_clip", recording_convert)
    client = Client(server, http)
    await client.connect()
    await client.wait_for_video(3)
    clip = np.tile(speech_16k[:16000], 2)
    stereo48 = np.repeat(np.interp(np.arange(3 * clip.size) / 3, np.arange(clip.size), clip), 2)
    url = client.url("/audio", rate="48000", channels="2")
    async with http.post(url, data=(stereo48 * 32767).astype(np.int16).tobytes(), headers=client.auth) as resp:
        assert resp.status == 200
        assert abs((await resp.json())["queued_s"] - 2.0) < 2e-3
    assert threads and threads[0] != threading.main_thread().name, threads
    metrics = await session_metrics(client, http)
    assert abs(metrics["engine"]["audio_in_samples"] - 32000) <= 16
    await client.close()
