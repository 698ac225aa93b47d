"""Bad input: each gets its status code and a JSON error, and the server keeps serving a live session."""
from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
from server_helpers import Client

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("loopback_only")]


@pytest.fixture
def server_settings() -> dict:
    # Three sessions per address, so the global limit (2) is what refuses the third offer here.
    return {"max_sessions": 2, "max_upload_mb": 0.25, "max_sessions_per_ip": 3}


@pytest.fixture
async def live(server, http):
    """A connected session that must keep streaming through every bad request."""
    client = Client(server, http)
    await client.connect()
    await client.wait_for_video(5)
    yield client
    n = len(client.received.video)
    await asyncio.sleep(0.5)
    assert len(client.received.video) > n + 5, "the live session stopped streaming"
    await client.close()


async def expect_error(resp: aiohttp.ClientResponse, status: int, *words: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    for word in words:
        assert word.lower() in body["error"].lower(), body
    return body


async def test_malformed_offers_get_400(server, http, live):
    url = server.endpoint("/offer")
    async with http.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as resp:
        await expect_error(resp, 400, "json")
    async with http.post(url, data=b"", headers={"Content-Type": "application/json"}) as resp:
        await expect_error(resp, 400, "json")
    async with http.post(url, data=b"") as resp:  # not declared JSON: refused before reading
        await expect_error(resp, 415, "application/json")
    async with http.post(url, json=["a", "list"]) as resp:
        await expect_error(resp, 400, "object")
    async with http.post(url, json={"type": "offer"}) as resp:
        await expect_error(resp, 400, "sdp")
    async with http.post(url, json={"sdp": "hello", "type": "offer"}) as resp:
        await expect_error(resp, 400, "sdp")
    async with http.post(url, json={"sdp": "v=0\r\nm=audio x", "type": "offer"}) as resp:
        await expect_error(resp, 400, "sdp")
    async with http.post(url, json={"sdp": live.pc.localDescription.sdp, "type": "answer"}) as resp:
        await expect_error(resp, 400, "type")
    # An SDP that parses but has no ICE credentials is refused by the peer connection.
    sdp = "\r\n".join(s for s in live.pc.localDescription.sdp.split("\r\n") if not s.startswith("a=ice-"))
    async with http.post(url, json={"sdp": sdp, "type": "offer"}) as resp:
        await expect_error(resp, 400, "offer")
    audio_only = live.pc.localDescription.sdp.split("m=video")[0]
    async with http.post(url, json={"sdp": audio_only, "type": "offer"}) as resp:
        await expect_error(resp, 400, "video")
    async with http.post(url, json={"sdp": live.pc.localDescription.sdp, "type": "offer",
                                    "options": {"video_codec": "av1"}}) as resp:
        await expect_error(resp, 400, "video_codec")
    async with http.post(url, json={"sdp": live.pc.localDescription.sdp, "type": "offer",
                                    "options": {"paste_mode": "glue"}}) as resp:
        await expect_error(resp, 400, "paste_mode")
    async with http.get(url) as resp:
        await expect_error(resp, 405)
    async with http.get(server.endpoint("/nowhere")) as resp:
        await expect_error(resp, 404)
    assert len(server.engine.worker._prepared) == 1  # failed offers left nothing behind
    from server.state import STATE
    assert len(server.app[STATE].sessions) == 1


async def test_unknown_session_gets_404(server, http, live):
    for method, path in [("GET", "/sessions/nope"), ("DELETE", "/sessions/nope"),
                         ("POST", "/sessions/nope/audio"), ("POST", "/sessions/nope/interrupt"),
                         ("POST", "/sessions/nope/say"), ("GET", "/sessions/nope/stream")]:
        # With some session's token: the id is unknown. Without one: 401 (no probing for ids).
        async with http.request(method, server.endpoint(path), data=b"x", headers=live.auth) as resp:
            await expect_error(resp, 404, "session")
        async with http.request(method, server.endpoint(path), data=b"x") as resp:
            await expect_error(resp, 401)


async def test_more_sessions_than_the_limit_get_503(server, http, live):
    second = Client(server, http)
    await second.connect()
    third = Client(server, http)
    body = await third.connect(expect_status=503)
    assert body["status"] == 503 and body["retry_after_s"] > 0 and body["max_sessions"] == 2
    async with http.post(server.endpoint("/offer"),
                         json={"sdp": third.pc.localDescription.sdp, "type": "offer"}) as resp:
        await expect_error(resp, 503, "retry")
        assert int(resp.headers["Retry-After"]) > 0
    await third.pc.close()
    # Closing one frees a slot at once.
    async with http.delete(second.url(), headers=second.auth) as resp:
        assert resp.status == 200
    fourth = Client(server, http)
    await fourth.connect()
    await fourth.wait_for_video(3)
    await fourth.close()
    await second.close()


async def test_oversized_upload_gets_413(server, http, live):
    url = live.url("/audio")
    big = bytes(400 * 1024)  # the limit is 0.25 MB
    async with http.post(url, data=big, headers={"Content-Type": "audio/wav", **live.auth}) as resp:
        await expect_error(resp, 413)
    async with http.post(url + "?rate=16000", data=big, headers=live.auth) as resp:
        await expect_error(resp, 413)

    async def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield bytes(16 * 1024)

    async with http.post(url, data=chunks(), headers={"Content-Type": "audio/wav", **live.auth}) as resp:
        await expect_error(resp, 413)
    form = aiohttp.FormData()
    form.add_field("audio", big, filename="big.wav", content_type="audio/wav")
    async with http.post(url, data=form, headers=live.auth) as resp:
        await expect_error(resp, 413)
    body = (b'--xyz\r\nContent-Disposition: form-data; name="audio"; filename="big.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + big + b"\r\n--xyz--\r\n")

    async def multipart_chunks():  # a streamed form: no Content-Length either
        for i in range(0, len(body), 16 * 1024):
            yield body[i:i + 16 * 1024]

    async with http.post(url, data=multipart_chunks(),
                         headers={"Content-Type": "multipart/form-data; boundary=xyz", **live.auth}) as resp:
        await expect_error(resp, 413)
    async with http.post(live.url("/say"), json={"text": "a" * 5000}, headers=live.auth) as resp:
        await expect_error(resp, 413)


async def test_undecodable_audio_gets_415(server, http, live, speech_wav):
    url = live.url("/audio")
    auth = live.auth
    async with http.post(url, data=b"this is not audio at all" * 100,
                         headers={"Content-Type": "audio/mpeg", **auth}) as resp:
        await expect_error(resp, 415, "not a media file")
    truncated = speech_wav.read_bytes()[:40]  # a wav header and nothing else
    async with http.post(url, data=truncated, headers={"Content-Type": "audio/wav", **auth}) as resp:
        body = await expect_error(resp, 415)
    form = aiohttp.FormData()
    form.add_field("audio", b"\x00" * 1000, filename="song.mp3", content_type="audio/mpeg")
    async with http.post(url, data=form, headers=auth) as resp:
        body = await expect_error(resp, 415, "song.mp3")
    # Raw PCM with bad parameters is a 400 (the request is wrong, not the media).
    async with http.post(url + "?rate=abc", data=b"\x00\x00", headers=auth) as resp:
        await expect_error(resp, 400, "rate")
    async with http.post(url + "?rate=16000&channels=2", data=b"\x00\x00\x00", headers=auth) as resp:
        await expect_error(resp, 400, "multiple")
    async with http.post(url + "?rate=16000&format=f32",
                         data=np.array([np.nan], np.float32).tobytes(), headers=auth) as resp:
        await expect_error(resp, 400, "nan")
    async with http.post(url, data=b"", headers=auth) as resp:
        await expect_error(resp, 400, "empty")
    # A good upload still works afterwards.
    async with http.post(url, data=speech_wav.read_bytes(), headers={"Content-Type": "audio/wav", **auth}) as resp:
        assert resp.status == 200
    assert body["error"]


async def test_say_validates_its_input(server, http, live):
    url = live.url("/say")
    async with http.post(url, data=b"nope", headers={"Content-Type": "application/json", **live.auth}) as resp:
        await expect_error(resp, 400, "json")
    async with http.post(url, json={"text": "hi", "voice": "en; rm -rf /"}, headers=live.auth) as resp:
        await expect_error(resp, 400, "voice")
    async with http.post(url, json={"text": "hi", "wpm": 5}, headers=live.auth) as resp:
        await expect_error(resp, 400, "wpm")
