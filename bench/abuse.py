"""Attacks from issues #12 and #25 against a real server process: status, time to answer, the server's peak RSS,
and a live session's frame rate while they run.

    python bench/abuse.py [--repo PATH] [--concurrent 6] [--rss-cap-mb 6000] [--skip six_uploads_1k,...]
                          [--only slot_hold,pcm_slowloris,multipart_bypass]

`--repo` is the checkout whose `run_server.py` is started (default: this one), so the same script
measures the server before a change (e.g. `git archive main | tar -x -C /tmp/main`) and after it. The
server runs the embedded avatar and the no-weights renderer, bound to 127.0.0.1, media on loopback
only; settings the old server does not know are passed as LIPSYNC_* environment variables, which it
ignores. The bench is also the one live WebRTC client (aiortc, frames decoded here), so the fps numbers
include its own CPU use; on a shared machine they are noisy.

A server whose RSS passes `--rss-cap-mb` is killed (to protect a shared machine) and that attack is
reported with "killed_at_rss_mb"; the server is restarted for the next one.

Attacks (one key each in the JSON):
- upload_1k: a 30 MB WAV at 1 kHz (15 000 s of audio) POSTed to the session's /audio.
- upload_8k: a 30 MB WAV at 8 kHz (~1970 s): a plausible rate, far longer than the 300 s queue.
- six_uploads_1k / six_uploads_8k: `--concurrent` of those at once, with the live session's fps.
- offer_infinity / offer_1e7: `options.compute_budget_frames` = Infinity / 1e7.
- csrf_say: POST /sessions/{id}/say, Content-Type text/plain, Origin https://evil.example.
- list_sessions: GET /sessions without a credential (does it show the live session's id?).
- offer_32mb: a 32 MB JSON body to /offer.
- say_flood: 10 concurrent /say of 4000 characters: statuses and the most TTS processes at once.
- offer_flood: 40 offers in a row from one address: statuses.
- ws_flood (issue #25): 1 200 utterances of one sample each over the session's /stream WebSocket (a 2-byte
  chunk, then {"type": "end"}, as fast as the socket takes them): the longest wait of another client's
  /healthz polled meanwhile, the refusals ({"type": "error", "status": 429}), the live session's fps, and
  what /metrics then says about the loop (p99 and worst lag, stalls over 250 ms).
- stream_count (issue #25): one session token opens 400 event streams and 100 /stream WebSockets: how many
  the server accepted, and how many are still open a second later.
Issue #25, the public surface (server/network/ice_filter.py, server/access/surface.py, server/access/auth.py):
- ice_probe_950 / ice_probe_public: an offer naming 950 (over the cap) / 20 loopback UDP ports as remote
  candidates, sent to a server configured as a public bind (`--host 0.0.0.0 --no-auth`, but its socket
  forced onto 127.0.0.1 by the bench, so nothing leaves loopback): STUN packets received on those ports
  in the 5 s after the offer, and how many distinct ports got any.
- ice_ufrag: `a=ice-ufrag:ab|:cd` to the loopback server: status, and whether '|' reached a USERNAME.
- data_channel: an offer with an `m=application` (SCTP) line: status.
- token_in_query: GET /metrics and /sessions with `?token=OPERATOR`, GET /sessions/{id} with `?token=`
  the session's: statuses (200 = the URL credential was accepted).
- headers: the page's anti-framing / no-sniff headers and `Server:`; the failed --avatars file's error
  in GET /avatars (does it show the absolute path?).
- rebinding: GET /sessions with `Host: evil.example` on the public-bind --no-auth server: status.
Issue #25 (uploads):
- slot_hold: two uploads to the live session that declare 1 MB, send a 24-byte WAV header and stall;
  meanwhile a second session's /say and /audio statuses, and when (and how) the stalled ones end.
- pcm_slowloris: POST /audio?rate=16000 that declares 1 MB and stalls after 4 bytes: seconds until
  the server answers and until it closes the connection (watched for at most 50 s).
- multipart_bypass: a chunked multipart form (no Content-Length) with a 40 MB text part before a
  small audio part, against a 32 MB cap: status and the bytes the server accepted.

Last line: one JSON object with every attack's numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/abuse.py`: the harness is this checkout's

from bench.client import PeerClient, bearer, local_offer  # noqa: E402

TOKEN = "bench-operator-token-0123456789abcdef"
EVIL = "https://evil.example"


# -- the server process ----------------------------------------------------------------------------


@dataclass
class RssWatch:
    """Samples the server's VmRSS every 10 ms; kills the server past the cap."""

    pid: int
    cap_mb: float
    peak_mb: float = 0.0
    killed_at_mb: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
        except OSError:
            return 0.0
        return int(match.group(1)) / 1024 if match else 0.0

    def run(self) -> None:
        while not self._stop.wait(0.01):
            rss = self.rss_mb()
            self.peak_mb = max(self.peak_mb, rss)
            if rss > self.cap_mb and self.killed_at_mb is None:
                self.killed_at_mb = rss
                os.kill(self.pid, signal.SIGKILL)

    def start(self) -> "RssWatch":
        threading.Thread(target=self.run, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


# A "public bind" without leaving loopback: the server is told --host 0.0.0.0 (its policies are a public
# server's) while every listening socket it opens is forced onto 127.0.0.1.
PUBLIC_BIND = """
import runpy, sys
from aiohttp import web
class LoopbackSite(web.TCPSite):
    def __init__(self, runner, host=None, port=None, **kwargs):
        super().__init__(runner, "127.0.0.1", port, **kwargs)
web.TCPSite = LoopbackSite
sys.argv = ["run_server.py", *sys.argv[1:]]
runpy.run_path("run_server.py", run_name="__main__")
"""
BROKEN_AVATARS = Path("/tmp/abuse-avatars-dir")  # one unreadable "video": its error is listed by GET /avatars


class Server:
    def __init__(self, repo: Path, log_path: Path, public: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1",
               "LIPSYNC_API_TOKEN": TOKEN, "LIPSYNC_MAX_SESSIONS_PER_IP": "3"}
        args = ["--port", "0", "--ice-host-addresses", "127.0.0.1", "--max-sessions", "4", "--max-upload-mb", "32"]
        if public:
            del env["LIPSYNC_API_TOKEN"]
            command = [sys.executable, "-c", PUBLIC_BIND, "--host", "0.0.0.0", "--no-auth", *args]
        else:
            BROKEN_AVATARS.mkdir(exist_ok=True)
            (BROKEN_AVATARS / "broken.mp4").write_bytes(b"not a video" * 100)
            command = [sys.executable, str(repo / "run_server.py"), "--avatars", str(BROKEN_AVATARS), *args]
        self.log = open(log_path, "a")
        self.offset = self.log.tell()  # this run's lines start here
        self.proc = subprocess.Popen(command, cwd=repo, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log_path
        self.url = ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while not self.url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()[-2000:]}")
            with open(self.log_path, "rb") as f:
                f.seek(self.offset)
                text = f.read().decode(errors="replace")
            match = re.search(r"serving http://(?:127\.0\.0\.1|0\.0\.0\.0):(\d+)/", text)
            self.url = f"http://127.0.0.1:{match.group(1)}/" if match else ""
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- the live client -------------------------------------------------------------------------------


class LiveClient(PeerClient):
    """One peer (bench/client.py) receiving the avatar; counts video frames as they arrive."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        super().__init__(url, http)
        self.url = url  # the server's root, ending in "/"
        self.frame_times: list[float] = []

    def on_frame(self, kind: str, frame: object, arrival: float) -> None:
        if kind == "video":
            self.frame_times.append(arrival)

    async def connect(self, microphone: MediaStreamTrack | None = None, **kwargs: Any) -> dict[str, Any]:
        answer = await super().connect(microphone, **kwargs)
        deadline = time.monotonic() + 30
        while len(self.frame_times) < 25:
            assert time.monotonic() < deadline, "no video"
            await asyncio.sleep(0.1)
        return answer

    def fps(self, start: float, end: float) -> float:
        frames = [t for t in self.frame_times if start <= t < end]
        return round(len(frames) / (end - start), 2) if end > start else 0.0



# -- attacks ---------------------------------------------------------------------------------------


def wav_bytes(total_bytes: int, rate: int) -> bytes:
    """A mono PCM16 wav of about `total_bytes`: a quiet 100 Hz square wave, not silence (so nothing
    can shortcut digital zeros)."""
    samples = (total_bytes - 44) // 2
    pcm = np.where((np.arange(samples) * 200 // rate) % 2 == 0, 3000, -3000).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


async def timed(coro) -> tuple[int | str, float]:
    t0 = time.monotonic()
    try:
        status = await coro
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        status = f"{type(exc).__name__}"
    return status, round(time.monotonic() - t0, 3)


async def post_status(http: aiohttp.ClientSession, url: str, **kwargs) -> int:
    async with http.post(url, timeout=aiohttp.ClientTimeout(total=300), **kwargs) as resp:
        await resp.read()
        return resp.status


async def upload(http, client: LiveClient, data: bytes) -> int:
    return await post_status(http, f"{client.url}sessions/{client.session_id}/audio", data=data,
                             headers={"Content-Type": "audio/wav", **client.auth})


async def interrupt(http, client: LiveClient) -> None:
    async with http.post(f"{client.url}sessions/{client.session_id}/interrupt", headers=client.auth):
        pass


async def attack_uploads(http, client: LiveClient, data: bytes, n: int, watch: RssWatch) -> dict:
    base_rss = watch.rss_mb()
    watch.peak_mb = base_rss
    t0 = time.monotonic()
    before_fps = client.fps(t0 - 3.0, t0)
    results = await asyncio.gather(*(timed(upload(http, client, data)) for _ in range(n)))
    t1 = time.monotonic()
    window_end = max(t1, t0 + 5.0)
    if window_end > time.monotonic():
        await asyncio.sleep(window_end - time.monotonic())
    out = {"statuses": [s for s, _ in results], "seconds": [t for _, t in results],
           "wall_s": round(t1 - t0, 3), "rss_before_mb": round(base_rss), "rss_peak_mb": round(watch.peak_mb),
           "live_fps_before": before_fps, "live_fps_during": client.fps(t0, window_end)}
    if watch.killed_at_mb is not None:
        out["killed_at_rss_mb"] = round(watch.killed_at_mb)
    return out


async def attack_offer_option(http, url: str, value: str) -> dict:
    body = '{"sdp": %s, "type": "offer", "options": {"compute_budget_frames": %s}}' % (
        json.dumps(await local_offer()), value)
    async with http.post(url + "offer", data=body, headers={"Content-Type": "application/json"}) as resp:
        text = await resp.text()
        out = {"status": resp.status}
        if resp.status == 200:
            session = json.loads(text)
            out["session_id_created"] = True
            async with http.get(f"{url}sessions/{session['session_id']}",
                                headers=bearer(session.get("session_token") or TOKEN)) as r:
                engine = (await r.json()).get("engine", {})
                out["latency_budget_ms"] = engine.get("latency_budget_ms")
            async with http.delete(f"{url}sessions/{session['session_id']}",
                                   headers=bearer(session.get("session_token") or TOKEN)):
                pass
        else:
            out["error"] = text[:160]
    return out


async def attack_csrf(http, client: LiveClient) -> dict:
    async with http.post(f"{client.url}sessions/{client.session_id}/say", data='{"text": "pwned"}',
                         headers={"Content-Type": "text/plain", "Origin": EVIL}) as resp:
        return {"status": resp.status}


async def attack_list(http, client: LiveClient) -> dict:
    async with http.get(client.url + "sessions") as resp:
        text = await resp.text()
        return {"status": resp.status, "shows_session_id": client.session_id in text}


async def attack_big_json(http, url: str, watch: RssWatch) -> dict:
    watch.peak_mb = base = watch.rss_mb()
    body = b'{"sdp": "v=0' + b"x" * (32 * 1024 * 1024 - 64) + b'", "type": "offer"}'
    status, seconds = await timed(post_status(http, url + "offer", data=body,
                                              headers={"Content-Type": "application/json"}))
    return {"status": status, "seconds": seconds, "rss_before_mb": round(base), "rss_peak_mb": round(watch.peak_mb)}


def tts_processes(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "comm=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return sum(1 for line in out.split() if "espeak" in line)


async def attack_say_flood(http, client: LiveClient, pid: int) -> dict:
    text = ("The quick brown fox jumps over the lazy dog. " * 100)[:4000]
    peak = 0
    done = asyncio.Event()

    async def count() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tts_processes(pid))
            await asyncio.sleep(0.05)

    counter = asyncio.ensure_future(count())
    url = f"{client.url}sessions/{client.session_id}/say"
    results = await asyncio.gather(*(timed(post_status(http, url, json={"text": text}, headers=client.auth))
                                     for _ in range(10)))
    done.set()
    await counter
    await interrupt(http, client)
    return {"statuses": sorted(str(s) for s, _ in results), "max_tts_processes": peak,
            "wall_s": max(t for _, t in results)}


async def attack_offer_flood(http, url: str) -> dict:
    sdp = await local_offer()
    statuses: dict[str, int] = {}
    for _ in range(40):
        async with http.post(url + "offer", json={"sdp": sdp, "type": "offer"}) as resp:
            await resp.read()
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
    return {"statuses": statuses}


async def attack_ws_flood(http, client: LiveClient, n: int = 1200) -> dict:
    ws_url = f"{client.url.replace('http', 'ws', 1)}sessions/{client.session_id}/stream?rate=16000"
    waits: list[float] = []
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            async with http.get(client.url + "healthz") as resp:
                await resp.read()
            waits.append(time.monotonic() - t0)
            await asyncio.sleep(0.02)

    poller = asyncio.ensure_future(poll())
    await asyncio.sleep(1.5)   # the same polls without a flood: the machine's own noise
    baseline = list(waits)
    t0 = time.monotonic()
    before_fps = client.fps(t0 - 1.5, t0)
    refused: dict[str, int] = {}
    async with http.ws_connect(ws_url, headers=client.auth) as ws:
        for _ in range(n):
            await ws.send_bytes(b"\x00\x00")
            await ws.send_str('{"type": "end"}')
        sent_s = time.monotonic() - t0
        await ws.send_str('{"type": "status"}')
        while True:
            msg = await ws.receive(timeout=120)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            reply = json.loads(msg.data)
            if reply["type"] == "error":
                refused[str(reply.get("status"))] = refused.get(str(reply.get("status")), 0) + 1
            if reply["type"] == "status":
                break
    t1 = time.monotonic()
    await asyncio.sleep(0.3)
    done.set()
    await poller
    during = waits[len(baseline):]
    return {"utterances": n, "longest_healthz_wait_s": round(max(during), 3), "healthz_polls": len(during),
            "longest_healthz_wait_before_s": round(max(baseline), 3), "live_fps_before": before_fps,
            "errors": refused, "sent_s": round(sent_s, 3), "handled_s": round(t1 - t0, 3),
            "live_fps_during": client.fps(t0, t1), "metrics_after": await loop_metrics(http, client.url)}


async def loop_metrics(http, url: str) -> dict:
    """What /metrics says about the event loop (None: the series does not exist on that server)."""
    names = ("lipsync_event_loop_lag_p99_seconds", "lipsync_event_loop_lag_max_seconds",
             "lipsync_event_loop_stalls_total")
    async with http.get(url + "metrics", headers=bearer(TOKEN)) as resp:
        lines = (await resp.text()).splitlines()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line and not line.startswith("#")}
    return {name.removeprefix("lipsync_event_loop_"): values.get(name) for name in names}


async def attack_stream_count(client: LiveClient, n_sse: int = 400, n_ws: int = 100) -> dict:
    """Streams of one session token, on their own connections (no client-side connection limit)."""
    base = f"{client.url}sessions/{client.session_id}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as own:
        sse: list[aiohttp.ClientResponse] = []
        statuses: dict[str, int] = {}
        for _ in range(n_sse):
            try:
                resp = await own.get(f"{base}/events", headers=client.auth, timeout=aiohttp.ClientTimeout(total=None))
            except aiohttp.ClientError as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                continue
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
            if resp.status == 200:
                sse.append(resp)
            else:
                resp.close()
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        ws_statuses: dict[str, int] = {}
        for _ in range(n_ws):
            try:
                sockets.append(await own.ws_connect(f"{base.replace('http', 'ws', 1)}/stream", headers=client.auth))
                ws_statuses["101"] = ws_statuses.get("101", 0) + 1
            except aiohttp.WSServerHandshakeError as exc:
                ws_statuses[str(exc.status)] = ws_statuses.get(str(exc.status), 0) + 1
        await asyncio.sleep(1.0)

        async def ended(resp: aiohttp.ClientResponse) -> bool:
            try:
                async with asyncio.timeout(0.2):
                    while await resp.content.readany():
                        pass
                return True
            except TimeoutError:
                return False

        async def closed(ws: aiohttp.ClientWebSocketResponse) -> bool:
            try:
                msg = await ws.receive(timeout=0.2)
            except TimeoutError:
                return False
            return msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)

        sse_ended = sum(await asyncio.gather(*(ended(r) for r in sse)))
        ws_closed = sum(await asyncio.gather(*(closed(w) for w in sockets)))
        for resp in sse:
            resp.close()
        await asyncio.gather(*(w.close() for w in sockets), return_exceptions=True)
    return {"sse_statuses": statuses, "sse_accepted": len(sse), "sse_open_after_1s": len(sse) - sse_ended,
            "ws_statuses": ws_statuses, "ws_accepted": len(sockets), "ws_open_after_1s": len(sockets) - ws_closed}
# -- issue #25: the public surface -----------------------------------------------------------------


class StunPorts:
    """`n` UDP sockets on 127.0.0.2.. (100 ports an address) counting the STUN packets they receive."""

    def __init__(self, n: int) -> None:
        import socket

        self.sockets = []
        for k in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.0.0.{2 + k // 100}", 0))
            sock.setblocking(False)
            self.sockets.append(sock)
        self.packets: dict[tuple[str, int], int] = {}
        self.usernames: set[bytes] = set()

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [s.getsockname() for s in self.sockets]

    def drain(self) -> None:
        for sock in self.sockets:
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                if len(data) >= 20 and data[4:8] == b"\x21\x12\xa4\x42":  # the STUN magic cookie
                    self.packets[sock.getsockname()] = self.packets.get(sock.getsockname(), 0) + 1
                    pos = 20
                    while pos + 4 <= len(data):  # the USERNAME attribute (0x0006)
                        kind, length = struct.unpack("!HH", data[pos:pos + 4])
                        if kind == 0x0006:
                            self.usernames.add(data[pos + 4:pos + 4 + length])
                        pos += 4 + length + (-length % 4)

    async def count(self, seconds: float) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.drain()
            await asyncio.sleep(0.05)
        self.drain()
        return {"stun_packets": sum(self.packets.values()), "distinct_targets": len(self.packets)}

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


async def offer_naming(targets: list[tuple[str, int]], ufrag: str | None = None, extra: str = "") -> str:
    """A real aiortc offer (recvonly video) whose m-line also names `targets` as host candidates."""
    sdp = await local_offer()
    lines = "".join(f"a=candidate:{100 + k} 1 udp 2130706431 {host} {port} typ host\r\n"
                    for k, (host, port) in enumerate(targets))
    sdp = sdp.replace("a=end-of-candidates\r\n", lines + "a=end-of-candidates\r\n", 1)
    if ufrag is not None:
        sdp = re.sub(r"a=ice-ufrag:[^\r\n]*", "a=ice-ufrag:" + ufrag, sdp, count=1)
    return sdp + extra


async def attack_ice_probe(http, url: str, n: int) -> dict:
    ports = StunPorts(n)
    try:
        sdp = await offer_naming(ports.targets)
        async with http.post(url + "offer", json={"sdp": sdp, "type": "offer"}) as resp:
            body = await resp.json()
        out = {"candidates": n, "offer_kb": round(len(sdp) / 1024, 1), "status": resp.status,
               **await ports.count(5.0)}
        if resp.status != 200:
            out["error"] = body.get("error", "")[:120]
        else:
            async with http.delete(f"{url}sessions/{body['session_id']}",
                                   headers=bearer(body["session_token"])):
                pass
        return out
    finally:
        ports.close()


async def attack_ice_ufrag(http, url: str) -> dict:
    ports = StunPorts(4)
    try:
        sdp = await offer_naming(ports.targets, ufrag="ab|:cd")
        async with http.post(url + "offer", json={"sdp": sdp, "type": "offer"}) as resp:
            body = await resp.json()
        counted = await ports.count(3.0)
        if resp.status == 200:
            async with http.delete(f"{url}sessions/{body['session_id']}",
                                   headers=bearer(body["session_token"])):
                pass
        return {"status": resp.status, **counted,
                "attacker_bytes_in_username": any(b"|" in u for u in ports.usernames)}
    finally:
        ports.close()


async def attack_data_channel(http, url: str) -> dict:
    extra = ("m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:9\r\n"
             "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\na=setup:actpass\r\n"
             "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=sctp-port:5000\r\n")
    sdp = await offer_naming([], extra=extra)
    async with http.post(url + "offer", json={"sdp": sdp, "type": "offer"}) as resp:
        body = await resp.json()
    if resp.status == 200:
        async with http.delete(f"{url}sessions/{body['session_id']}",
                               headers=bearer(body["session_token"])):
            pass
    return {"status": resp.status}


async def attack_token_in_query(http, client: LiveClient) -> dict:
    out = {}
    for name, path in (("metrics", f"metrics?token={TOKEN}"), ("sessions", f"sessions?token={TOKEN}"),
                       ("session_by_query", f"sessions/{client.session_id}?token={client.token}")):
        async with http.get(client.url + path) as resp:
            await resp.read()
            out[name] = resp.status
    return out


async def attack_headers(http, url: str) -> dict:
    async with http.get(url) as resp:
        await resp.read()
        headers = resp.headers
    async with http.get(url + "avatars") as resp:
        listing = await resp.text()
    return {"csp_frame_ancestors": "frame-ancestors" in headers.get("Content-Security-Policy", ""),
            "x_frame_options": headers.get("X-Frame-Options"),
            "x_content_type_options": headers.get("X-Content-Type-Options"),
            "referrer_policy": headers.get("Referrer-Policy"), "server": headers.get("Server"),
            "avatars_show_absolute_path": str(BROKEN_AVATARS) in listing}


async def attack_rebinding(http, url: str) -> dict:
    async with http.get(url + "sessions", headers={"Host": "evil.example"}) as resp:
        await resp.read()
        return {"status": resp.status}


async def run_public_bind(args: argparse.Namespace, http) -> dict:
    """The attacks that need a server configured as a public bind (its own process)."""
    results: dict = {}
    plan = [("ice_probe_950", lambda url: attack_ice_probe(http, url, 950)),
            ("ice_probe_public", lambda url: attack_ice_probe(http, url, 20)),
            ("rebinding", lambda url: attack_rebinding(http, url))]
    plan = [(name, attack) for name, attack in plan
            if name not in args.skip and (not args.only or name in args.only)]
    if not plan:
        return results
    server = Server(args.repo, Path(args.log), public=True)
    try:
        server.wait_ready()
        for name, attack in plan:
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = await asyncio.wait_for(attack(server.url), timeout=120)
            except (aiohttp.ClientError, asyncio.TimeoutError, AssertionError) as exc:
                results[name] = {"failed": f"{type(exc).__name__}: {exc}"[:200]}
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return results


class Stalled:
    """A request written up to `head` on its own connection, then silent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.opened = reader, writer, time.monotonic()
        self.answered_s: float | None = None
        self.status: int | None = None
        self.closed_s: float | None = None

    @classmethod
    async def open(cls, url: str, path: str, headers: dict[str, str], head: bytes) -> "Stalled":
        host, port = url.split("//")[1].rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + head)
        await writer.drain()
        return cls(reader, writer)

    async def watch(self, limit_s: float) -> None:
        """Wait for the answer and the close, up to `limit_s` from the start."""
        try:
            async with asyncio.timeout(limit_s - (time.monotonic() - self.opened)):
                while data := await self.reader.read(4096):
                    if self.answered_s is None:
                        self.answered_s = round(time.monotonic() - self.opened, 2)
                        self.status = int(data.split(b" ", 2)[1])
                self.closed_s = round(time.monotonic() - self.opened, 2)
        except (TimeoutError, ConnectionError):
            pass
        self.writer.close()

    def result(self) -> dict:
        return {"status": self.status, "answered_s": self.answered_s, "closed_s": self.closed_s}


def _path(client: LiveClient, route: str) -> str:
    return f"/sessions/{client.session_id}{route}"


async def attack_slot_hold(http, client: LiveClient) -> dict:
    victim = LiveClient(client.url, http)
    await victim.connect()
    try:
        head = wav_bytes(1024, 16000)[:24]
        stalled = [await Stalled.open(client.url, _path(client, "/audio"),
                                      {"Content-Type": "audio/wav", "Content-Length": str(1 << 20), **client.auth},
                                      head) for _ in range(2)]
        watchers = [asyncio.ensure_future(s.watch(40.0)) for s in stalled]
        await asyncio.sleep(1.0)
        say = await post_status(http, f"{client.url}sessions/{victim.session_id}/say", json={"text": "hello there"},
                                headers=victim.auth)
        upload_status = await post_status(http, f"{client.url}sessions/{victim.session_id}/audio",
                                          data=wav_bytes(32044, 16000), headers={"Content-Type": "audio/wav",
                                                                                 **victim.auth})
        await asyncio.gather(*watchers)
        return {"victim_say_status": say, "victim_upload_status": upload_status,
                "stalled": [s.result() for s in stalled]}
    finally:
        await interrupt(http, victim)
        await victim.close()


async def attack_pcm_slowloris(http, client: LiveClient) -> dict:
    stalled = await Stalled.open(client.url, _path(client, "/audio") + "?rate=16000",
                                 {"Content-Length": str(1 << 20), **client.auth}, b"\0\0\0\0")
    await stalled.watch(50.0)
    out = stalled.result()
    out["still_open_at_s"] = None if stalled.closed_s is not None else 50.0
    return out


async def attack_multipart_bypass(http, client: LiveClient) -> dict:
    audio = wav_bytes(32044, 16000)  # 1 s
    body = (b'--xyz\r\nContent-Disposition: form-data; name="padding"\r\n\r\n' + b"p" * (40 << 20) + b"\r\n"
            b'--xyz\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n' + audio +
            b"\r\n--xyz--\r\n")
    sent = 0

    async def chunks():
        nonlocal sent
        for i in range(0, len(body), 256 * 1024):
            sent += len(body[i:i + 256 * 1024])
            yield body[i:i + 256 * 1024]

    t0 = time.monotonic()
    try:
        status: int | str = await post_status(http, f"{client.url}sessions/{client.session_id}/audio", data=chunks(),
                                              headers={"Content-Type": "multipart/form-data; boundary=xyz",
                                                       **client.auth})
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        status = type(exc).__name__
    return {"status": status, "body_bytes": len(body), "cap_bytes": 32 << 20,
            "accepted_bytes": len(body) if status == 200 else 0, "bytes_sent_before_answer": sent,
            "seconds": round(time.monotonic() - t0, 2)}


# -- driver ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict:
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    log_path = Path(args.log)
    one_k = wav_bytes(30 * 1024 * 1024, 1000)
    eight_k = wav_bytes(30 * 1024 * 1024, 8000)
    results: dict = {"repo": str(args.repo), "commit": _commit(args.repo), "concurrent": args.concurrent,
                     "rss_cap_mb": args.rss_cap_mb}
    plan = [("upload_1k", lambda h, c, w: attack_uploads(h, c, one_k, 1, w)),
            ("upload_8k", lambda h, c, w: attack_uploads(h, c, eight_k, 1, w)),
            ("six_uploads_1k", lambda h, c, w: attack_uploads(h, c, one_k, args.concurrent, w)),
            ("six_uploads_8k", lambda h, c, w: attack_uploads(h, c, eight_k, args.concurrent, w)),
            ("offer_infinity", lambda h, c, w: attack_offer_option(h, c.url, "Infinity")),
            ("offer_1e7", lambda h, c, w: attack_offer_option(h, c.url, "1e7")),
            ("csrf_say", lambda h, c, w: attack_csrf(h, c)),
            ("list_sessions", lambda h, c, w: attack_list(h, c)),
            ("offer_32mb", lambda h, c, w: attack_big_json(h, c.url, w)),
            ("say_flood", lambda h, c, w: attack_say_flood(h, c, w.pid)),
            ("offer_flood", lambda h, c, w: attack_offer_flood(h, c.url)),
            ("stream_count", lambda h, c, w: attack_stream_count(c)),
            # After stream_count: on a server without the fix the freeze can get the live session reaped.
            ("ws_flood", lambda h, c, w: attack_ws_flood(h, c)),
            ("ice_probe_loopback", lambda h, c, w: attack_ice_probe(h, c.url, 20)),
            ("ice_ufrag", lambda h, c, w: attack_ice_ufrag(h, c.url)),
            ("data_channel", lambda h, c, w: attack_data_channel(h, c.url)),
            ("token_in_query", lambda h, c, w: attack_token_in_query(h, c)),
            ("headers", lambda h, c, w: attack_headers(h, c.url)),
            ("slot_hold", lambda h, c, w: attack_slot_hold(h, c)),
            ("pcm_slowloris", lambda h, c, w: attack_pcm_slowloris(h, c)),
            ("multipart_bypass", lambda h, c, w: attack_multipart_bypass(h, c))]
    server: Server | None = None
    client: LiveClient | None = None
    watch: RssWatch | None = None
    async with aiohttp.ClientSession() as http:
        try:
            for name, attack in plan:
                if name in args.skip or (args.only and name not in args.only):
                    continue
                if server is None or not server.alive():
                    if client is not None:
                        await client.close()
                    server = Server(args.repo, log_path)
                    server.wait_ready()
                    watch = RssWatch(server.proc.pid, args.rss_cap_mb).start()
                    client = LiveClient(server.url, http)
                    await client.connect()
                    await asyncio.sleep(3.0)  # a steady frame rate before the first attack
                assert watch is not None and client is not None
                print(f"{name} ...", file=sys.stderr, flush=True)
                try:
                    results[name] = await asyncio.wait_for(attack(http, client, watch), timeout=240)
                except (aiohttp.ClientError, asyncio.TimeoutError, AssertionError) as exc:
                    results[name] = {"failed": f"{type(exc).__name__}: {exc}"[:200]}
                if watch.killed_at_mb is not None:
                    results[name]["killed_at_rss_mb"] = round(watch.killed_at_mb)
                    watch.stop()
                    server.proc.wait()
                    server.stop()
                print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
                if server.alive():
                    await interrupt(http, client)
                    await asyncio.sleep(1.0)
        finally:
            if client is not None:
                await client.close()
            if watch is not None:
                watch.stop()
            if server is not None:
                server.stop()
        results.update(await run_public_bind(args, http))
    return results


def _commit(repo: Path) -> str:
    """The repo's commit: git's, or a COMMIT file next to an exported tree (git archive)."""
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if out.returncode == 0:
        return out.stdout.strip()
    marker = repo / "COMMIT"
    return marker.read_text().strip() if marker.exists() else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose run_server.py to attack")
    parser.add_argument("--concurrent", type=int, default=6, help="uploads at once (default 6)")
    parser.add_argument("--rss-cap-mb", type=float, default=6000.0,
                        help="kill the server past this RSS (default 6000 MB; protects a shared machine)")
    parser.add_argument("--skip", default="", help="comma-separated attacks to leave out")
    parser.add_argument("--only", default="", help="comma-separated attacks to run (default: all)")
    parser.add_argument("--log", default="/tmp/abuse-server.log", help="the server's output")
    args = parser.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    args.only = set(filter(None, args.only.split(",")))
    Path(args.log).write_text("")
    results = asyncio.run(run(args))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
