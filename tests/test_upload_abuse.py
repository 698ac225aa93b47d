"""Issue #25, items 2 and 7 (uploads): each attack reproduced against the in-process server (or the avatar
decoder) and refused with its status, no 500 and no traceback in the log (`clean_log`).

- the decode slots held by uploads that declare a large body, send a WAV header and stall;
- a raw PCM upload that stalls (a slowloris with no body deadline);
- a multipart body whose non-file parts went past --max-upload-mb;
- operator avatar uploads: demuxers probed, frames beyond the declared length, an unbounded name,
  failed entries kept forever.
And what must keep working: a slow but steady upload, a chunked multipart form within the cap.
Loopback only; the stalling clients are raw sockets so the test controls every byte.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import av
import numpy as np
import pytest
from server_helpers import start_server, tiny_engine
from test_server_security import OPERATOR, connected, expect_error, fake_tts

from bench.common import wav_bytes as bench_wav_bytes
from realtime.avatars.avatar import AvatarConfig, AvatarError
from realtime.avatars.avatar_decode import iter_video, sniff_video
from server.access.limits import Holder, PoolBusy, WorkPool
from server.errors import ApiError
from server.routes.upload_body import GRACE_S, form_parts
from server.state import STATE

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("loopback_only")]


def wav_bytes(seconds: float, rate: int) -> bytes:
    """A mono PCM16 wav of `seconds` of silence."""
    return bench_wav_bytes(np.zeros(int(seconds * rate), np.int16), rate)


@pytest.fixture
def clean_log(clean_log: list[str]) -> list[str]:
    """conftest's clean log, with the operator token among the secrets."""
    clean_log.append(OPERATOR)
    return clean_log


@pytest.fixture
async def engine():
    engine = tiny_engine()
    yield engine
    engine.close()


class RawRequest:
    """One HTTP request written byte by byte on its own connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.opened = time.monotonic()

    @classmethod
    async def send(cls, url: str, path: str, headers: dict[str, str], head: bytes) -> "RawRequest":
        host, port = url.split("//")[1].rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + head)
        await writer.drain()
        return cls(reader, writer)

    async def status(self, within_s: float) -> tuple[int, dict, float]:
        """(status, JSON body, seconds since sent) of the answer, or TimeoutError."""
        line = await asyncio.wait_for(self.reader.readline(), within_s)
        status = int(line.split()[1])
        length = 0
        while (header := await asyncio.wait_for(self.reader.readline(), within_s)) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = json.loads(await self.reader.readexactly(length)) if length else {}
        return status, body, time.monotonic() - self.opened

    async def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within `seconds` (the client sends nothing more)."""
        try:
            while await asyncio.wait_for(self.reader.read(4096), seconds):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


def session_path(client, route: str) -> str:
    """The path of a session's route, e.g. /sessions/ID/audio."""
    return "/" + client.url(route).split("/", 3)[3]


# -- the decode slots ------------------------------------------------------------------------------


async def test_stalled_uploads_hold_no_decode_slot(engine, http, clean_log, tmp_path):
    """Two uploads that declare 1 MB, send a WAV header and stall held both decode/TTS slots until the
    read timeout: every other session's uploads and /say got 503. Now the body is read before a slot is
    taken: the other session is served at once, and the stalled senders get 408 within seconds."""
    server = await start_server(engine, tts_command=fake_tts(tmp_path, 0.2), max_concurrent_decodes=2,
                                max_decodes_per_ip=0, max_sessions_per_ip=4)
    try:
        attacker = await connected(server, http, clean_log)
        victim = await connected(server, http, clean_log)
        header = wav_bytes(0.0, 16000)[:24]
        stalled = [await RawRequest.send(server.url, session_path(attacker, "/audio"),
                                         {"Content-Type": "audio/wav", "Content-Length": str(1 << 20),
                                          **attacker.auth}, header) for _ in range(2)]
        await asyncio.sleep(0.5)
        async with http.post(victim.url("/say"), json={"text": "hello"}, headers=victim.auth) as resp:
            assert resp.status == 200, await resp.text()
        async with http.post(victim.url("/audio"), data=wav_bytes(0.5, 16000),
                             headers={"Content-Type": "audio/wav", **victim.auth}) as resp:
            assert resp.status == 200, await resp.text()
        for status, body, seconds in await asyncio.gather(*(r.status(GRACE_S + 15.0) for r in stalled)):
            assert status == 408 and "slower than" in body["error"], body
            assert seconds < GRACE_S + 5.0, seconds
        # aiohttp's lingering close (10 s), then the connection is gone
        assert all(await asyncio.gather(*(r.closed_within(15.0) for r in stalled)))
        for request in stalled:
            request.close()
        assert server.app[STATE].pool.busy == 0
        await attacker.close()
        await victim.close()
    finally:
        await server.stop()


async def test_raw_pcm_upload_has_a_body_deadline(engine, http, clean_log):
    """POST /audio?rate=16000 that stalls after a few bytes was still open after 45 s."""
    server = await start_server(engine)
    try:
        client = await connected(server, http, clean_log)
        request = await RawRequest.send(server.url, session_path(client, "/audio") + "?rate=16000",
                                        {"Content-Length": str(1 << 20), **client.auth}, b"\0\0\0\0")
        status, body, seconds = await request.status(GRACE_S + 15.0)
        assert status == 408 and "slower than" in body["error"], body
        assert seconds < GRACE_S + 5.0, seconds
        assert await request.closed_within(15.0)
        request.close()
        await client.close()
    finally:
        await server.stop()


async def test_the_whole_body_has_a_deadline_and_a_steady_slow_upload_works(engine, http, clean_log):
    """A sender above the minimum rate is served after the grace; the whole body still has its deadline."""
    server = await start_server(engine, upload_timeout_s=60.0, min_upload_rate_kb=16.0)
    try:
        client = await connected(server, http, clean_log)
        data = wav_bytes(12.0, 16000)  # 384 KB at ~48 KB/s: about 8 s, past the grace

        async def trickle(chunk: int = 12 * 1024, pause: float = 0.25):
            for start in range(0, len(data), chunk):
                yield data[start:start + chunk]
                await asyncio.sleep(pause)

        t0 = time.monotonic()
        async with http.post(client.url("/audio"), data=trickle(),
                             headers={"Content-Type": "audio/wav", **client.auth}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["queued_s"] == pytest.approx(12.0, abs=0.01)
        assert time.monotonic() - t0 > GRACE_S
        async with http.post(client.url("/interrupt"), headers=client.auth) as resp:
            assert resp.status == 200
        await client.close()
    finally:
        await server.stop()
    server = await start_server(engine, upload_timeout_s=2.0)
    try:
        client = await connected(server, http, clean_log)
        async with http.post(client.url("/audio"), data=trickle(16 * 1024, 0.2),
                             headers={"Content-Type": "audio/wav", **client.auth}) as resp:
            await expect_error(resp, 408, "within 2 s")
        await client.close()
    finally:
        await server.stop()


async def test_pcm_query_is_checked_before_the_body(engine, http, clean_log):
    server = await start_server(engine)
    try:
        client = await connected(server, http, clean_log)
        request = await RawRequest.send(server.url, session_path(client, "/audio") + "?rate=abc",
                                        {"Content-Length": str(1 << 20), **client.auth}, b"")
        status, body, seconds = await request.status(10.0)
        assert status == 400 and "rate" in body["error"] and seconds < 2.0, (body, seconds)
        request.close()
        await client.close()
    finally:
        await server.stop()


async def test_one_decode_per_session_and_a_share_per_address():
    pool = WorkPool(3, per_address=2)
    a1, a2, a3, b1 = Holder("s1", "a"), Holder("s2", "a"), Holder("s3", "a"), Holder("s4", "b")
    with pool.slot(a1):
        with pytest.raises(ApiError) as again:
            pool.check_free(Holder("s1", "b"))
        assert again.value.status == 429 and "already" in again.value.message
        with pool.slot(a2):
            with pytest.raises(ApiError) as share:
                pool.check_free(a3)
            assert share.value.status == 429 and "address" in share.value.message
            with pool.slot(b1), pytest.raises(PoolBusy):
                pool.check_free(Holder("s5", "c"))
    assert pool.busy == 0 and not pool.sessions
    assert await pool.run(sum, [1, 2], holder=a3) == 3
    pool.close()


async def test_a_second_address_gets_a_slot_while_the_first_holds_its_share(engine, http, clean_log,
                                                                            tmp_path, monkeypatch):
    """The default share is one of the two slots: a second session from the same address waits (429)."""
    import server.routes.push_api as push_api

    server = await start_server(engine, max_concurrent_decodes=2, max_sessions_per_ip=4)
    release = asyncio.Event()
    started: list[int] = []
    real = push_api.decode_upload

    def slow_decode(data: bytes, room: float):
        started.append(1)
        while not release.is_set():
            time.sleep(0.01)
        return real(data, room)

    monkeypatch.setattr(push_api, "decode_upload", slow_decode)
    try:
        a = await connected(server, http, clean_log)
        b = await connected(server, http, clean_log)
        upload = wav_bytes(0.5, 16000)
        first = asyncio.create_task(http.post(a.url("/audio"), data=upload,
                                              headers={"Content-Type": "audio/wav", **a.auth}))
        deadline = time.monotonic() + 10
        while not started:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        async with http.post(b.url("/audio"), data=upload, headers={"Content-Type": "audio/wav", **b.auth}) as resp:
            await expect_error(resp, 429, "address")
            assert resp.headers["Retry-After"] == "1"
        release.set()
        resp = await first
        assert resp.status == 200
        resp.release()
        await a.close()
        await b.close()
    finally:
        await server.stop()


# -- multipart -------------------------------------------------------------------------------------


def form(*parts: tuple[str, str | None, bytes], boundary: str = "xyz") -> bytes:
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def test_every_multipart_byte_counts_against_the_cap(engine, http, clean_log):
    """A chunked form with a large non-file part before the audio part was accepted past the cap."""
    server = await start_server(engine, max_upload_mb=0.5)
    try:
        client = await connected(server, http, clean_log)
        audio = wav_bytes(0.5, 16000)  # 16 KB
        padded = form(("padding", None, b"p" * (2 << 20)), ("audio", "a.wav", audio))
        small = form(("note", None, b"hello"), ("audio", "a.wav", audio))

        def chunked(body: bytes):
            async def gen():
                for i in range(0, len(body), 64 * 1024):
                    yield body[i:i + 64 * 1024]
            return gen()

        headers = {"Content-Type": "multipart/form-data; boundary=xyz", **client.auth}
        async with http.post(client.url("/audio"), data=chunked(padded), headers=headers) as resp:
            await expect_error(resp, 413, "larger than 0.5 MB")
        async with http.post(client.url("/audio"), data=chunked(small), headers=headers) as resp:
            assert resp.status == 200, await resp.text()  # a chunked form within the cap works
            assert (await resp.json())["queued_s"] == pytest.approx(0.5, abs=0.01)
        await client.close()
    finally:
        await server.stop()


def test_form_parts_are_bounded_and_strict():
    body = form(("name", None, b"x"), ("file", "f.mp4", b"\r\n--xy not a boundary"))
    parts = form_parts(body, "multipart/form-data; boundary=xyz")
    assert [(p.name, p.filename) for p in parts] == [("name", None), ("file", "f.mp4")]
    assert body[parts[1].start:parts[1].end] == b"\r\n--xy not a boundary"
    for bad, words in [(b"no boundary here", "opening"), (form(("a", None, b"1"))[:-9], "closing"),
                       (form(*[("a", None, b"1")] * 17), "more than 16"),
                       (b"--xyz\r\n" + b"H: " + b"v" * 9000, "headers")]:
        with pytest.raises(ApiError) as err:
            form_parts(bad, "multipart/form-data; boundary=xyz")
        assert err.value.status == 400 and words in err.value.message, err.value.message
    with pytest.raises(ApiError):
        form_parts(body, "multipart/form-data")


# -- avatars (item 7) ------------------------------------------------------------------------------


def clip(path: Path, frames: int, fps: int = 25, size: int = 64) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), (i * 3) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def declare_shorter(path: Path, factor: int) -> None:
    """Divide the durations an mp4's mvhd, tkhd and mdhd boxes declare by `factor` (version-0 boxes):
    the file then says it is shorter than the frames it holds."""
    data = bytearray(path.read_bytes())
    for box, offset in ((b"mvhd", 16), (b"tkhd", 20), (b"mdhd", 16)):
        at = data.find(box)
        while at >= 0:
            field = at + 4 + offset
            value = int.from_bytes(data[field:field + 4], "big")
            data[field:field + 4] = (value // factor).to_bytes(4, "big")
            at = data.find(box, at + 4)
    path.write_bytes(bytes(data))


def test_a_video_is_decoded_within_its_declared_length(tmp_path):
    """A file that declares 1 s and holds 4 s of frames: decoding stops at the budget of 1 s."""
    path = clip(tmp_path / "liar.mp4", 100)
    declare_shorter(path, 4)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert float(stream.duration * stream.time_base) == pytest.approx(1.0, abs=0.1)
    fps, _expected, frames = iter_video(path, AvatarConfig(max_seconds=20.0))
    count = sum(1 for _ in frames)
    assert fps == 25.0 and count <= 25 + 13, count  # 1 s at 25 fps plus half a second of slack
    honest = clip(tmp_path / "honest.mp4", 100)
    assert sum(1 for _ in iter_video(honest, AvatarConfig(max_seconds=20.0))[2]) == 100


def test_each_frame_is_checked_before_it_is_converted(tmp_path, monkeypatch):
    import realtime.avatars.avatar_decode as avatar_decode

    monkeypatch.setattr(avatar_decode, "MAX_SOURCE_SIDE", 48)
    _fps, _n, frames = iter_video(clip(tmp_path / "big.mp4", 5, size=64), AvatarConfig())
    with pytest.raises(AvatarError, match="64x64 px"):
        next(frames)


def test_only_known_video_containers_are_opened(tmp_path):
    """A concat script named .mp4 made ffmpeg read another local file through it; no demuxer is probed."""
    clip(tmp_path / "secret.mp4", 10)
    script = tmp_path / "upload.mp4"
    script.write_text("ffconcat version 1.0\nfile 'secret.mp4'\n")
    with pytest.raises(AvatarError, match="not a video or image file"):
        iter_video(script, AvatarConfig())
    (tmp_path / "list.m3u8").write_text("#EXTM3U\n#EXTINF:1,\nsecret.mp4\n#EXT-X-ENDLIST\n")
    with pytest.raises(AvatarError):
        iter_video(tmp_path / "list.m3u8", AvatarConfig())
    assert sniff_video((tmp_path / "secret.mp4").read_bytes()[:512]) == "mov"
    assert sniff_video(b"#EXTM3U\n" + bytes(600)) is None


async def test_avatar_name_is_capped_and_every_form_byte_counts(engine, http, clean_log):
    server = await start_server(engine, api_token=OPERATOR, max_upload_mb=1.0)
    auth = {"Authorization": f"Bearer {OPERATOR}"}
    try:
        async with http.post(server.endpoint("/avatars?name=" + "n" * 400), data=b"x" * 100,
                             headers=auth) as resp:
            await expect_error(resp, 400, "name")
        body = form(("name", None, "é".encode() * 200), ("file", "a.png", b"\x89PNG" + bytes(100)))
        async with http.post(server.endpoint("/avatars"), data=body,
                             headers={"Content-Type": "multipart/form-data; boundary=xyz", **auth}) as resp:
            await expect_error(resp, 400, "name")
        body = form(("pad", None, b"p" * (2 << 20)), ("file", "a.png", b"\x89PNG" + bytes(100)))

        async def chunked():  # no Content-Length to refuse up front
            for i in range(0, len(body), 64 * 1024):
                yield body[i:i + 64 * 1024]

        async with http.post(server.endpoint("/avatars"), data=chunked(),
                             headers={"Content-Type": "multipart/form-data; boundary=xyz", **auth}) as resp:
            await expect_error(resp, 413, "larger than 1 MB")
        async with http.get(server.endpoint("/avatars")) as resp:
            assert len((await resp.json())["avatars"]) == 1  # nothing was added
    finally:
        await server.stop()


def test_failed_avatars_are_forgotten(tmp_path):
    from realtime.avatars import avatar_library
    from realtime.avatars.avatar_library import MAX_FAILED, AvatarLibrary, AvatarState
    from realtime.avatars.default_avatar import load_default_avatar

    library = AvatarLibrary(load_default_avatar(), cache_dir=tmp_path / "cache")
    try:
        ids = []
        for k in range(MAX_FAILED + 3):
            junk = tmp_path / f"junk{k}.mp4"
            junk.write_bytes(b"not a video" * 10)
            ids.append(library.add_file(junk, f"junk {k}").id)
            deadline = time.monotonic() + 30
            while library.get(ids[-1]).state is AvatarState.PREPARING:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        failed = [e.id for e in library.entries() if e.state is AvatarState.FAILED]
        assert failed == ids[-MAX_FAILED:]  # the oldest went first
        library._forget_failed(now=time.monotonic() + avatar_library.FAILED_KEEP_S + 1)
        assert [e.id for e in library.entries()] == [library.default_id]
    finally:
        library.close()


def test_kept_frames_stay_within_the_byte_budget(tmp_path, monkeypatch):
    """Many small identical frames compress to a tiny file; the raw frames kept stop at MAX_RAW_BYTES."""
    import realtime.avatars.avatar_decode as avatar_decode

    monkeypatch.setattr(avatar_decode, "MAX_RAW_BYTES", 10 * 64 * 64 * 3)
    _fps, _n, frames = iter_video(clip(tmp_path / "many.mp4", 60), AvatarConfig())
    assert sum(1 for _ in frames) == 10
