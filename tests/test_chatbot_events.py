"""Playback events end to end: the WebSocket and SSE routes, utterance naming, and a chatbot-style run
checked against the audio an aiortc client receives over WebRTC on loopback."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest
from server_helpers import Client

from bench.playback_events import TONES, run_scenario
from server.state import STATE

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("loopback_only")]


async def test_two_utterances_interrupted_match_the_received_audio(server, http):
    result = await run_scenario(server.url, http, interrupt_after_s=1.5)
    playback = [e for e in result.events if e["type"] in ("speech_started", "speech_ended")]
    assert [(e["type"], e["utterance"]) for e in playback] == [
        ("speech_started", "one"), ("speech_ended", "one"), ("speech_started", "two"), ("speech_ended", "two")]
    acks = [e for e in result.events if e["type"] == "started"]
    assert [e["utterance"] for e in acks] == ["one", "two"]
    one, two = result.event("speech_ended", "one"), result.event("speech_ended", "two")
    assert one["interrupted"] is False and one["position_s"] == TONES["one"][1]
    assert two["interrupted"] is True
    assert 1.0 < two["position_s"] < 2.5, two   # interrupted about halfway through 3 s
    # position_s against what the client actually heard (tone edges through Opus), within 40 ms.
    assert abs(one["position_s"] - result.heard_s("one")) <= 0.040, (one, result.spans)
    assert abs(two["position_s"] - result.heard_s("two")) <= 0.040, (two, result.spans)
    # The events' order holds on the timeline too, and t comes before the client hears the sample.
    ts = [e["t"] for e in playback]
    assert ts == sorted(ts)
    lags = result.lags_ms()
    assert all(-40.0 <= v <= 1000.0 for k, v in lags.items() if k.endswith(".lag_ms")), lags
    queue = [e for e in result.events if e["type"] == "queue"]
    assert queue and queue[-1]["queued_s"] == 0.0


async def test_server_sent_events_and_utterance_names(server, http, speech_16k):
    client = Client(server, http)
    await client.connect()
    await client.wait_for_video(3)
    events: list[dict] = []

    async def read_sse() -> None:
        async with http.get(client.url("/events", token=True)) as resp:   # EventSource: ?token=
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            kind = None
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    assert data["type"] == kind
                    events.append(data)

    reader = asyncio.ensure_future(read_sse())
    await asyncio.sleep(0.3)
    pcm = (speech_16k[:8000] * 32767).astype(np.int16).tobytes()
    async with http.post(client.url("/audio", rate="16000", utterance="greeting-1"), data=pcm,
                         headers=client.auth) as resp:
        assert resp.status == 200 and (await resp.json())["utterance"] == "greeting-1"
    async with http.post(client.url("/audio", rate="16000"), data=pcm, headers=client.auth) as resp:
        generated = (await resp.json())["utterance"]
        assert resp.status == 200 and isinstance(generated, str) and generated
    async with http.post(client.url("/audio", rate="16000", utterance="bad id"), data=pcm,
                         headers=client.auth) as resp:
        assert resp.status == 400
    said = None
    if server.app[STATE].tts.available:   # espeak-ng installed: `say` names its utterance too
        async with http.post(client.url("/say"), json={"text": "Hi.", "utterance": "s1"},
                             headers=client.auth) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["utterance"] == "s1", body
            said = ("s1", body["queued_s"])
    last = "s1" if said else generated
    for _ in range(80):
        if any(e["type"] == "speech_ended" and e["utterance"] == last for e in events):
            break
        await asyncio.sleep(0.1)
    reader.cancel()
    ended = [(e["utterance"], e["position_s"], e["interrupted"]) for e in events if e["type"] == "speech_ended"]
    assert ended[:2] == [("greeting-1", 0.5, False), (generated, 0.5, False)]
    assert [e["utterance"] for e in events if e["type"] == "speech_started"][:2] == ["greeting-1", generated]
    if said:
        # (espeak-ng speaks at 22.05 kHz: the engine's streaming resampler keeps its last ~1 ms, unflushed)
        assert ended[2][0] == "s1" and ended[2][1] == pytest.approx(said[1], abs=0.002) and not ended[2][2]
    await client.close()


async def test_events_need_the_session_credentials(server, http):
    """GET /sessions/{id}/events sits under the server's session-credential check like every session route."""
    one, other = Client(server, http), Client(server, http)
    await one.connect()
    await other.connect()
    async with http.get(one.url("/events")) as resp:
        assert resp.status == 401                     # no credential
    async with http.get(one.url("/events"), headers=other.auth) as resp:
        assert resp.status == 403                     # another session's token
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:   # the WebSocket too
        await http.ws_connect(one.url("/stream"))
    assert refused.value.status == 401
    async with http.get(one.url("/events", token=True)) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
    await one.close()
    await other.close()


async def test_websocket_names_utterances_and_rejects_bad_ids(server, http, speech_16k):
    client = Client(server, http)
    await client.connect()
    async with http.ws_connect(client.url("/stream", rate="16000", token=True)) as ws:
        await ws.send_bytes((speech_16k[:1600] * 32767).astype(np.int16).tobytes())  # no start: one is made
        started = await ws.receive_json(timeout=5)
        assert started["type"] == "started" and started["utterance"]
        await ws.send_str(json.dumps({"type": "start", "utterance": "x y"}))
        while (error := await ws.receive_json(timeout=5))["type"] == "queue":
            pass
        assert error["type"] == "error" and error["status"] == 400
        await ws.send_str(json.dumps({"type": "end"}))
        while (msg := await ws.receive_json(timeout=5))["type"] != "ended":
            pass
        assert msg["utterance"] == started["utterance"]
    await client.close()
