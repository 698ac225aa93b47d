"""The avatars as a resource over HTTP: list, upload (good and bad), progress, poster, offer by id, delete,
operator token; and two sessions on two avatars at once over real WebRTC (loopback only).

The engine is the real one with the tiny grey avatar and the loudness renderer (server_helpers);
uploads go through the real preparation (face mesh tracking) on the library's thread.
"""
from __future__ import annotations

import asyncio
import re
import struct
import time
import zlib
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest
from server_helpers import Client, start_server, tiny_engine
from test_avatar import write_clip

from models.face_detection import mesh_models_available
from models.face_detection.model_files import INSTALL_HINT
from realtime.avatars.default_avatar import load_default_avatar

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("loopback_only"),
              pytest.mark.skipif(not mesh_models_available(), reason=INSTALL_HINT)]

TOKEN = "operator-secret-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def face_frames() -> np.ndarray:
    """20 frames of the default avatar's moving head at 384x384."""
    frames = [cv2.resize(np.ascontiguousarray(f), (384, 384), interpolation=cv2.INTER_AREA)
              for f in load_default_avatar().frames[:20]]
    return np.array(frames)


@pytest.fixture(scope="module")
def media(tmp_path_factory, face_frames) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("avatar-media")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(d / "photo.png"), face_frames[0])
    wide = np.full((64, 5000, 3), 128, np.uint8)
    cv2.imwrite(str(d / "wide.png"), wide)
    (d / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (d / "notes.txt").write_bytes(b"this is not a video at all\n" * 50)
    (d / "noise.bin").write_bytes(rng.integers(0, 256, 3 * 1024 * 1024, dtype=np.uint8).tobytes())
    return {
        "face": write_clip(d / "face.mp4", face_frames),
        "photo": d / "photo.png",
        "noface": write_clip(d / "noface.mp4", [np.full((128, 128, 3), (40, 90, 160), np.uint8)] * 10),
        "long": write_clip(d / "long.mp4", [np.full((64, 64, 3), 100, np.uint8)] * 75),  # 3 s
        "wide": d / "wide.png",
        "bomb": d / "bomb.png",
        "text": d / "notes.txt",
        "big": d / "noise.bin",
    }


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny (truncated) data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture
def server_engine(tmp_path):
    engine = tiny_engine(avatar_cache_dir=tmp_path / "cache")
    yield engine
    engine.close()


@pytest.fixture
def server_settings() -> dict:
    return {"max_sessions": 3, "connect_timeout_s": 10.0, "api_token": TOKEN, "max_upload_mb": 2.0,
            "max_avatar_seconds": 2.0}


async def upload(http: aiohttp.ClientSession, server, path: Path, name: str | None = None,
                 headers: dict | None = None) -> tuple[int, dict]:
    form = aiohttp.FormData()
    form.add_field("file", await asyncio.to_thread(path.read_bytes), filename=path.name)
    if name:
        form.add_field("name", name)
    async with http.post(server.endpoint("/avatars"), data=form, headers=AUTH if headers is None else headers) as r:
        return r.status, await r.json()


async def wait_ready(http, server, avatar_id: str, within_s: float = 90.0) -> dict:
    deadline = time.monotonic() + within_s
    seen_progress = []
    while True:
        async with http.get(server.endpoint(f"/avatars/{avatar_id}")) as r:
            assert r.status == 200
            body = await r.json()
        if body["state"] != "preparing":
            body["seen_progress"] = seen_progress
            return body
        seen_progress.append(body["progress"])
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def test_list_shows_the_default_with_a_poster(server, http):
    async with http.get(server.endpoint("/avatars")) as r:
        assert r.status == 200
        body = await r.json()
    assert body["default"] == "tiny"
    (tiny,) = body["avatars"]
    assert tiny["id"] == "tiny" and tiny["state"] == "ready" and tiny["builtin"]
    assert (tiny["width"], tiny["height"], tiny["fps"], tiny["frames"]) == (64, 64, 25.0, 10)
    async with http.get(server.endpoint(tiny["poster_url"])) as r:
        assert r.status == 200 and r.content_type == "image/jpeg"
        poster = cv2.imdecode(np.frombuffer(await r.read(), np.uint8), cv2.IMREAD_COLOR)
    assert poster.shape[1] == 256 and abs(float(poster.mean()) - 90) < 3
    async with http.get(server.endpoint("/avatars/nobody")) as r:
        assert r.status == 404 and "unknown avatar" in (await r.json())["error"]
    async with http.get(server.endpoint("/avatars/nobody/poster.jpg")) as r:
        assert r.status == 404


async def test_upload_prepares_off_the_loop_then_offer_by_id_and_delete(server, http, media):
    t0 = time.monotonic()
    status, body = await upload(http, server, media["face"], name="Presenter One")
    answered_s = time.monotonic() - t0
    assert status == 202, body
    assert body["state"] == "preparing" and body["id"].startswith("presenter-one-")
    assert answered_s < 2.0  # the id comes back at once; the tracking runs on the library's thread
    # While it prepares, the event loop still answers.
    async with http.get(server.endpoint("/healthz")) as r:
        assert r.status == 200
    ready = await wait_ready(http, server, body["id"])
    assert ready["state"] == "ready", ready
    assert (ready["width"], ready["height"], ready["frames"], ready["fps"]) == (384, 384, 20, 25.0)
    async with http.get(server.endpoint("/avatars")) as r:
        ids = [a["id"] for a in (await r.json())["avatars"]]
    assert ids == ["tiny", body["id"]]

    client = Client(server, http)
    answer = await client.connect(options={"avatar": body["id"]})
    assert answer["avatar"] == body["id"]
    await client.wait_for_video(5)
    assert client.received.video[-1][2].shape == (384, 384, 3)
    # In use: not removable, and the session keeps running.
    async with http.delete(server.endpoint(f"/avatars/{body['id']}"), headers=AUTH) as r:
        assert r.status == 409 and "used by 1 session" in (await r.json())["error"]
    n = len(client.received.video)
    await asyncio.sleep(0.5)
    assert len(client.received.video) > n
    await client.close()
    async with http.delete(client.url(), headers=client.auth) as r:
        assert r.status in (200, 404)
    deadline = time.monotonic() + 10
    while True:
        async with http.delete(server.endpoint(f"/avatars/{body['id']}"), headers=AUTH) as r:
            if r.status == 200:
                break
            assert r.status == 409 and time.monotonic() < deadline
        await asyncio.sleep(0.2)
    async with http.get(server.endpoint(f"/avatars/{body['id']}")) as r:
        assert r.status == 404
    async with http.delete(server.endpoint(f"/avatars/{body['id']}"), headers=AUTH) as r:
        assert r.status == 404
    async with http.delete(server.endpoint("/avatars/tiny"), headers=AUTH) as r:
        assert r.status == 409 and "built in" in (await r.json())["error"]


async def test_a_photo_upload_becomes_an_animated_avatar(server, http, media):
    photo = await asyncio.to_thread(media["photo"].read_bytes)
    async with http.post(server.endpoint("/avatars?name=Still"), data=photo,
                         headers={**AUTH, "Content-Type": "image/png"}) as r:
        assert r.status == 202
        body = await r.json()
    ready = await wait_ready(http, server, body["id"])
    assert ready["state"] == "ready" and ready["frames"] == 100  # 4 s of idle motion at 25 fps


async def test_no_face_fails_with_the_reason(server, http, media):
    status, body = await upload(http, server, media["noface"])
    assert status == 202
    done = await wait_ready(http, server, body["id"])
    assert done["state"] == "failed" and "no face found" in done["error"], done
    client = Client(server, http)
    answer = await client.connect(options={"avatar": body["id"]}, expect_status=409)
    assert "no face found" in answer["error"]
    await client.close()
    async with http.delete(server.endpoint(f"/avatars/{body['id']}"), headers=AUTH) as r:
        assert r.status == 200  # a failed one can be removed


@pytest.mark.parametrize("item, status, words", [
    ("text", 400, "not a video or photo"),
    ("big", 413, "byte limit"),  # refused from its Content-Length, before any of it is read
    ("long", 413, "at most 2 s"),
    ("wide", 413, "5000x64 px"),
    ("bomb", 413, "absurdly large"),
])
async def test_bad_uploads_are_refused_before_decoding(server, http, media, item, status, words):
    got, body = await upload(http, server, media[item])
    assert got == status and words in body["error"], body
    async with http.get(server.endpoint("/avatars")) as r:
        assert len((await r.json())["avatars"]) == 1  # nothing was added


async def test_empty_and_fieldless_uploads(server, http):
    async with http.post(server.endpoint("/avatars"), data=b"", headers=AUTH) as r:
        assert r.status == 400 and "empty" in (await r.json())["error"]
    form = aiohttp.FormData()
    form.add_field("name", "x", content_type="text/plain")  # forces multipart
    async with http.post(server.endpoint("/avatars"), data=form, headers=AUTH) as r:
        assert r.status == 400 and "'file'" in (await r.json())["error"]


async def test_operator_token_guards_add_and_remove(server, http, media):
    status, body = await upload(http, server, media["face"], headers={})
    assert status == 401 and "operator token" in body["error"]
    status, body = await upload(http, server, media["face"], headers={"Authorization": "Bearer wrong"})
    assert status == 403
    async with http.delete(server.endpoint("/avatars/tiny")) as r:
        assert r.status == 401
    async with http.get(server.endpoint("/avatars")) as r:
        assert r.status == 200  # listing is public, and so are the posters the page shows
        poster_url = (await r.json())["avatars"][0]["poster_url"]
    async with http.get(server.endpoint(poster_url)) as r:
        assert r.status == 200


async def test_unknown_avatar_in_an_offer_is_404(server, http):
    client = Client(server, http)
    answer = await client.connect(options={"avatar": "nobody"}, expect_status=404)
    assert "unknown avatar 'nobody'" in answer["error"]
    await client.close()
    client = Client(server, http)
    answer = await client.connect(options={"avatar": 7}, expect_status=400)
    await client.close()


async def test_two_sessions_on_two_avatars_at_once(server, http, media):
    """Each session returns its own avatar's picture, both at the full 25 fps, on one render worker."""
    _status, body = await upload(http, server, media["face"], name="face")
    assert (await wait_ready(http, server, body["id"]))["state"] == "ready"
    face = server.engine.avatars.get(body["id"]).avatar
    a, b = Client(server, http), Client(server, http)
    await a.connect(options={"avatar": "tiny"})
    await b.connect(options={"avatar": body["id"]})
    await asyncio.gather(a.wait_for_video(10), b.wait_for_video(10))
    start = (len(a.received.video), len(b.received.video))
    await asyncio.sleep(3.0)
    for client, n0 in zip((a, b), start, strict=True):
        frames = client.received.video[n0 - 1:]
        fps = (len(frames) - 1) / (frames[-1][0] - frames[0][0])
        assert 22.0 <= fps <= 28.0, fps
    tiny_image = a.received.video[-1][2]
    face_image = b.received.video[-1][2]
    assert tiny_image.shape == (64, 64, 3) and abs(float(tiny_image.mean()) - 90) < 4
    assert face_image.shape == (384, 384, 3)
    # The face session shows the uploaded face: close to one of its frames, far from a flat picture.
    best = max(cv2.PSNR(face_image, np.asarray(face.frames[i])) for i in range(len(face.frames)))
    assert best > 28.0, best
    assert float(face_image.std()) > 20.0
    assert len(server.engine.workers) == 1 and server.engine.sessions_per_worker() == [2]
    await a.close()
    await b.close()


async def test_cli_lists_adds_and_removes(server, media, capsys):
    from cli.main import main

    def lipsync(*args: str) -> int:
        return main(["avatars", *args, "--server", server.url])

    assert await asyncio.to_thread(lipsync, "add", str(media["face"]), "--name", "CLI face") == 1
    assert "401" in capsys.readouterr().err  # no token
    assert await asyncio.to_thread(lipsync, "add", str(media["face"]), "--name", "CLI face", "--token", TOKEN) == 0
    out = capsys.readouterr().out
    avatar_id = re.search(r"id (\S+), preparing", out).group(1)
    assert f"{avatar_id}: ready (384x384, 20 frames at 25 fps)" in out
    assert await asyncio.to_thread(lipsync, "list") == 0
    listing = capsys.readouterr().out
    assert re.search(r"^tiny .* ready .*64x64 .*\(default\)$", listing, re.M), listing
    assert re.search(rf"^{avatar_id} +CLI face +ready +384x384 +20 @ 25 fps", listing, re.M), listing
    assert await asyncio.to_thread(lipsync, "add", str(media["noface"]), "--token", TOKEN) == 1
    assert "no face found" in capsys.readouterr().err
    assert await asyncio.to_thread(lipsync, "remove", avatar_id, "--token", TOKEN) == 0
    assert await asyncio.to_thread(lipsync, "remove", avatar_id, "--token", TOKEN) == 1
    assert "404" in capsys.readouterr().err


async def test_a_chunked_upload_is_capped_while_it_is_read(server, http, media):
    """No Content-Length to refuse up front: the body is counted as it streams in."""
    data = await asyncio.to_thread(media["big"].read_bytes)

    async def chunks():
        for start in range(0, len(data), 256 * 1024):
            yield data[start:start + 256 * 1024]

    async with http.post(server.endpoint("/avatars?name=big"), data=chunks(), headers=AUTH) as r:
        assert r.status == 413 and "larger than 2 MB" in (await r.json())["error"]
    async with http.get(server.endpoint("/avatars")) as r:
        assert len((await r.json())["avatars"]) == 1


async def test_uploads_survive_a_restart_with_their_ids(tmp_path, http, media):
    """#26 item 6: an avatar added over the API comes back after a restart with the same id, prepared
    again from the cache (not re-uploaded); DELETE forgets it for the next run too; a failed one is not kept."""
    cache, uploads = tmp_path / "cache", tmp_path / "cache" / "uploads"

    async def run_server():
        engine = tiny_engine(avatar_cache_dir=cache, uploads_dir=uploads)
        restored = await asyncio.to_thread(engine.avatars.restore_uploads)
        running = await start_server(engine, api_token=TOKEN, max_upload_mb=2.0, max_avatar_seconds=2.0)
        return engine, running, restored

    engine, first, restored = await run_server()
    try:
        assert restored == []
        status, kept = await upload(http, first, media["face"], name="Kept")
        assert status == 202
        status, failed = await upload(http, first, media["noface"], name="No face")
        assert status == 202
        assert (await wait_ready(http, first, kept["id"]))["state"] == "ready"
        assert (await wait_ready(http, first, failed["id"]))["state"] == "failed"
        cached = sorted(p.name for p in cache.iterdir() if p.name != "uploads")
    finally:
        await first.stop()
        engine.close()
    assert sorted(p.name for p in uploads.iterdir()) == [f"{kept['id']}.json", f"{kept['id']}.mp4"]

    engine, second, restored = await run_server()
    try:
        assert [e.id for e in restored] == [kept["id"]]
        async with http.get(second.endpoint(f"/avatars/{kept['id']}")) as r:
            again = await r.json()
        assert again["state"] == "ready" and again["name"] == "Kept" and again["frames"] == 20
        assert sorted(p.name for p in cache.iterdir() if p.name != "uploads") == cached  # a cache hit
        client = Client(second, http)
        assert (await client.connect(options={"avatar": kept["id"]}))["avatar"] == kept["id"]
        await client.wait_for_video(3)
        await client.close()
        async with http.delete(client.url(), headers=client.auth):
            pass
        deadline = time.monotonic() + 10
        while True:
            async with http.delete(second.endpoint(f"/avatars/{kept['id']}"), headers=AUTH) as r:
                if r.status == 200:
                    break
                assert r.status == 409 and time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert list(uploads.iterdir()) == []
    finally:
        await second.stop()
        engine.close()
    engine, third, restored = await run_server()
    await third.stop()
    engine.close()
    assert restored == []
