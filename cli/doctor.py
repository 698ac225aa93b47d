"""`lipsync doctor URL`: what an operator runs from outside after deploying (docs/deploying.md).

    lipsync doctor https://avatar.example.org [--seconds 3] [--ca-file PEM] [--resolve NAME:ADDR]

Checks, in the order a visitor's browser depends on them, one line each (PASS / FAIL, and on FAIL the
fix to try): the TLS certificate, `/healthz`, the page's security headers, `/config`, a TURN allocation
with credentials from `/ice-servers` on every TURN URL (UDP, TCP, TLS), a real WebRTC session with host
candidates only (the ICE connectivity check reaches the server's UDP media ports), its offer/answer and
a few seconds of frames and audio, the session's WebSocket and event stream through the proxy, and, when
the direct path fails, the same session relayed through TURN. Exit status 0 when every check passed.

`--resolve NAME:ADDR` connects to ADDR for NAME (like curl's; before DNS is set up, or in tests);
`--ca-file` trusts a private CA; `--ice-host-address` picks the local address the WebRTC check uses.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

SECURITY_HEADERS = {  # header -> what it protects; all must be on the page
    "Strict-Transport-Security": "browsers keep to https for this name",
    "X-Content-Type-Options": "no MIME sniffing of uploads or responses",
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text}\n      fix: {self.fix}"


class MappedResolver(AbstractResolver):
    """`--resolve NAME:ADDR` entries first, the system's resolver for the rest."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping
        self._system = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        if host in self.mapping:
            address = self.mapping[host]
            return [{"hostname": host, "host": address, "port": port,
                     "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                     "proto": 0, "flags": socket.AI_NUMERICHOST}]
        return await self._system.resolve(host, port, family)

    async def close(self) -> None:
        await self._system.close()


@dataclass
class Options:
    url: str
    seconds: float = 3.0
    ca_file: str | None = None
    resolve: dict[str, str] | None = None
    ice_host_address: str | None = None
    timeout_s: float = 15.0

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def address_of(self, host: str) -> str:
        return (self.resolve or {}).get(host, host)


class Doctor:
    def __init__(self, options: Options, http: aiohttp.ClientSession) -> None:
        self.options = options
        self.http = http
        self.base = options.url.rstrip("/")
        self.checks: list[Check] = []
        self.config: dict[str, Any] = {}

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(check.line(), flush=True)
        return check

    # -- HTTP -----------------------------------------------------------------------------------------

    async def tls_and_page(self) -> bool:
        parts = urlsplit(self.base)
        if parts.scheme != "https":
            self.add(Check("TLS", False, f"{self.base} is not https",
                           "browsers grant the microphone only on https: put deploy/nginx.conf in front"))
        try:
            async with self.http.get(self.base + "/") as resp:
                await resp.read()
                headers = resp.headers
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:
            self.add(Check("TLS", False, f"certificate refused: {exc.certificate_error}",
                           f"a certificate valid for {parts.hostname} (certbot certonly -d {parts.hostname}), "
                           "with its full chain (fullchain.pem) in ssl_certificate"))
            return False
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            self.add(Check("reach", False, f"cannot reach {self.base}: {exc or type(exc).__name__}",
                           "is nginx running and port 443 open (ss -ltnp; the firewall)?"))
            return False
        if parts.scheme == "https":
            until = await self._certificate_expiry(parts.hostname or "", parts.port or 443)
            self.add(Check("TLS", True, f"certificate valid for {parts.hostname} until {until}"))
        if status != 200:
            self.add(Check("page", False, f"GET / answered {status}",
                           "a 403 'bound to loopback' means the server lacks --public-url " + self.base))
            return False
        missing = [h for h in SECURITY_HEADERS if h not in headers]
        nosniff = headers.get("X-Content-Type-Options", "").lower() == "nosniff"
        ok = not missing and nosniff
        extra = "" if "Content-Security-Policy" in headers else " (no Content-Security-Policy)"
        detail = ("HSTS and nosniff present" + extra) if ok else f"missing or wrong: {', '.join(missing) or 'nosniff'}"
        self.add(Check("security headers", ok, detail, "use deploy/nginx.conf's add_header lines"))
        return True

    async def _certificate_expiry(self, host: str, port: int) -> str:
        """The verified certificate's notAfter, from a handshake of our own (aiohttp does not expose it)."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(
                self.options.address_of(host), port, ssl=self.options.ssl_context(), server_hostname=host),
                self.options.timeout_s)
        except (OSError, asyncio.TimeoutError):
            return "?"
        peer = writer.get_extra_info("peercert")
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return str(peer.get("notAfter", "?")) if isinstance(peer, dict) else "?"

    async def healthz(self) -> None:
        try:
            async with self.http.get(self.base + "/healthz") as resp:
                body = await resp.json(content_type=None)
                ok = resp.status == 200 and body.get("status") == "ok"
                self.add(Check("/healthz", ok, f"{resp.status} {body.get('status')}, "
                                               f"{body.get('free_slots', '?')} free session slot(s)",
                               "see the server's log (journalctl -u lipsync)"))
        except (aiohttp.ClientError, ValueError, asyncio.TimeoutError) as exc:
            self.add(Check("/healthz", False, f"no JSON answer: {exc}", "is the server running behind the proxy?"))

    async def client_config(self) -> bool:
        try:
            async with self.http.get(self.base + "/config") as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError, asyncio.TimeoutError) as exc:
            self.add(Check("/config", False, f"no JSON answer: {exc}", "is the server running behind the proxy?"))
            return False
        ok = (resp.status == 200 and isinstance(body.get("ice_servers"), list)
              and isinstance(body.get("fps"), (int, float)) and isinstance(body.get("turn"), bool))
        self.config = body if ok else {}
        self.add(Check("/config", ok, f"{resp.status}: fps {body.get('fps')}, TURN "
                                      f"{'on' if body.get('turn') else 'off'}" if ok else f"{resp.status} {body}",
                       "the server and this client are different versions?"))
        return ok

    # -- TURN -----------------------------------------------------------------------------------------

    async def ice_servers(self) -> list[dict[str, Any]]:
        async with self.http.get(self.base + "/ice-servers") as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"/ice-servers answered {resp.status}: {body.get('error')}")
            return list(body["ice_servers"])

    async def turn(self) -> list[dict[str, Any]]:
        if not self.config.get("turn"):
            self.add(Check("TURN", False, "not configured: visitors whose network blocks UDP cannot connect",
                           "run coturn with deploy/turnserver.conf and the server with --turn-secret/--turn-url"))
            return []
        try:
            servers = await self.ice_servers()
        except (aiohttp.ClientError, RuntimeError, KeyError, ValueError) as exc:
            self.add(Check("TURN credentials", False, str(exc), "see the server's log"))
            return []
        for server in servers:
            for url in server["urls"]:
                if url.startswith(("turn:", "turns:")):
                    await self.turn_allocation(url, server.get("username"), server.get("credential"))
        return servers

    async def turn_allocation(self, url: str, username: str | None, credential: str | None) -> None:
        import aioice.stun
        import aioice.turn
        from aiortc.rtcicetransport import parse_stun_turn_uri

        parsed = parse_stun_turn_uri(url)
        host, port, transport = parsed["host"], parsed["port"], parsed["transport"]
        address = self.options.address_of(host)
        name = f"TURN {url.split('?')[0]} ({'TLS' if parsed['scheme'] == 'turns' else transport.upper()})"
        relay: Any = None
        try:
            if parsed["scheme"] == "turns":
                relay = await asyncio.wait_for(self._turn_tls(host, address, port, username, credential),
                                               self.options.timeout_s)
            else:
                relay, _ = await asyncio.wait_for(aioice.turn.create_turn_endpoint(
                    asyncio.DatagramProtocol, server_addr=(address, port), username=username,
                    password=credential, transport=transport), self.options.timeout_s)
            relayed = relay.get_extra_info("sockname")
            self.add(Check(name, True, f"allocation {relayed[0]}:{relayed[1]} with the handed-out credentials"))
        except aioice.stun.TransactionFailed as exc:
            code = exc.response.attributes.get("ERROR-CODE", (0, ""))
            fix = ("the server's --turn-secret and coturn's static-auth-secret differ, or the clocks do "
                   "(credentials carry their expiry)") if code[0] == 401 else "see coturn's log"
            self.add(Check(name, False, f"refused: {code[0]} {code[1]}", fix))
        except (OSError, asyncio.TimeoutError, ssl.SSLError, ConnectionError) as exc:
            self.add(Check(name, False, f"no answer from {address}:{port}: {exc or type(exc).__name__}",
                           f"is coturn running, and {port}/{'tcp' if transport == 'tcp' else 'udp'} open?"))
        finally:
            if relay is not None:
                relay.close()

    async def _turn_tls(self, host: str, address: str, port: int, username: str | None,
                        credential: str | None) -> Any:
        """TLS over TCP, the certificate checked for the TURN URL's name (aioice checks the address)."""
        import aioice.turn

        loop = asyncio.get_running_loop()
        transport, inner = await loop.create_connection(
            lambda: aioice.turn.TurnClientTcpProtocol((address, port), username=username, password=credential,
                                                      lifetime=600, channel_refresh_time=500),
            host=address, port=port, ssl=self.options.ssl_context(), server_hostname=host)
        inner.transport = transport
        outer = aioice.turn.TurnTransport(inner)
        await outer._connect(asyncio.DatagramProtocol())
        return outer

    # -- WebRTC ---------------------------------------------------------------------------------------

    async def webrtc(self, turn_servers: list[dict[str, Any]]) -> None:
        direct = await self.session("WebRTC direct", [], relay=False)
        if not direct and turn_servers:
            await self.session("WebRTC relayed", turn_servers, relay=True)

    async def session(self, name: str, ice_servers: list[dict[str, Any]], relay: bool) -> bool:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
        from aiortc.mediastreams import MediaStreamError
        from aiortc.rtcconfiguration import RTCIceTransportPolicy

        servers = [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
                   for s in ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(
            iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy.RELAY if relay else RTCIceTransportPolicy.ALL))
        frames: list[float] = []
        audio: list[float] = []
        readers: list[asyncio.Task[None]] = []

        async def read(track: Any) -> None:  # aiortc's MediaStreamTrack
            while True:
                try:
                    await track.recv()
                except MediaStreamError:
                    return
                (frames if track.kind == "video" else audio).append(time.monotonic())

        pc.on("track", lambda track: readers.append(asyncio.ensure_future(read(track))))
        settled = asyncio.Event()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("connected", "failed", "closed"):
                settled.set()
        session: dict[str, Any] = {}
        try:
            pc.addTransceiver("audio", direction="recvonly")
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with self.http.post(self.base + "/offer", json={"sdp": pc.localDescription.sdp,
                                                                  "type": "offer"}) as resp:
                session = await resp.json(content_type=None)
                if resp.status != 200:
                    self.add(Check(f"{name}: offer", False, f"{resp.status} {session.get('error')}",
                                   "see the server's log"))
                    session = {}
                    return False
            await pc.setRemoteDescription(RTCSessionDescription(session["sdp"], "answer"))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(settled.wait(), self.options.timeout_s)
            if pc.connectionState != "connected":
                ports = [line.split()[5] for line in session["sdp"].splitlines() if " typ host" in line]
                fix = ("open the server's --udp-ports range (UDP) in the firewall, and check "
                       "--ice-host-addresses names an address visitors reach" if not relay else
                       "coturn cannot reach the server's media ports: allowed-peer-ip for its address")
                self.add(Check(f"{name}: ICE", False, f"no connection within {self.options.timeout_s:g} s "
                                                      f"(server UDP ports {', '.join(ports[:4]) or 'none'})", fix))
                return False
            pair = _pair_type(pc)
            self.add(Check(f"{name}: ICE", True, f"connected ({pair} candidate pair), offer/answer "
                                                 f"session {session['session_id']}"))
            await asyncio.sleep(0.5)
            first, start = len(frames), time.monotonic()
            await asyncio.sleep(self.options.seconds)
            fps = (len(frames) - first) / (time.monotonic() - start)
            want = float(session.get("fps") or 25.0)
            ok = fps >= 0.8 * want and bool(audio)
            self.add(Check(f"{name}: media", ok, f"{fps:.1f} fps of {want:g} over {self.options.seconds:g} s, "
                                                 f"{'with' if audio else 'no'} audio",
                           "the server is overloaded (GET /metrics) or the path loses packets"))
            await self.session_streams(session)
            return True
        except (aiohttp.ClientError, OSError, ValueError, KeyError, asyncio.TimeoutError) as exc:
            self.add(Check(name, False, f"{type(exc).__name__}: {exc}", "see the server's log"))
            return False
        finally:
            if session.get("session_id"):
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with self.http.delete(f"{self.base}/sessions/{session['session_id']}",
                                                headers={"Authorization": f"Bearer {session['session_token']}"}):
                        pass
            await pc.close()
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def session_streams(self, session: dict[str, Any]) -> None:
        """The session's WebSocket and Server-Sent Events through the proxy (long-lived, upgraded)."""
        base = f"{self.base}/sessions/{session['session_id']}"
        token = session["session_token"]
        try:
            ws = await self.http.ws_connect(f"{base}/stream?token={token}", timeout=aiohttp.ClientWSTimeout(
                ws_receive=self.options.timeout_s))
            await ws.send_str(json.dumps({"type": "status"}))
            message = await ws.receive(timeout=self.options.timeout_s)
            await ws.close()
            ok = message.type == aiohttp.WSMsgType.TEXT
            self.add(Check("WebSocket", ok, "upgraded through the proxy, the server answered" if ok else
                           f"no answer ({message.type.name})", "proxy_read_timeout / upgrade headers"))
        except (aiohttp.WSServerHandshakeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.add(Check("WebSocket", False, f"no upgrade: {exc}",
                           "the proxy must pass Upgrade and Connection (deploy/nginx.conf's /stream location)"))
        try:
            async with self.http.get(f"{base}/events?token={token}") as resp:
                ok = resp.status == 200 and resp.content_type == "text/event-stream"
                self.add(Check("event stream", ok, f"{resp.status} {resp.content_type}",
                               "the proxy must not buffer /events (proxy_buffering off)"))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.add(Check("event stream", False, str(exc), "deploy/nginx.conf's /events location"))

    async def run(self) -> bool:
        if await self.tls_and_page():
            await self.healthz()
            if await self.client_config():
                turn_servers = await self.turn()
                await self.webrtc(turn_servers)
        return all(check.ok for check in self.checks)


def _pair_type(pc: Any) -> str:
    """The local candidate type of the ICE pair in use (aiortc keeps it on its aioice connection)."""
    with contextlib.suppress(Exception):
        transport = next(t.receiver.transport.transport for t in pc.getTransceivers())
        pair = next(iter(transport._connection._nominated.values()))
        return f"{pair.local_candidate.type}/{pair.remote_candidate.type}"
    return "unknown"


@contextlib.contextmanager
def host_addresses(address: str | None) -> Iterator[None]:
    from server.network.ice import use_host_addresses

    restore = use_host_addresses([address] if address else [], add_loopback=False)
    try:
        yield
    finally:
        restore()


async def diagnose(options: Options) -> bool:
    connector = aiohttp.TCPConnector(ssl=options.ssl_context(), resolver=MappedResolver(options.resolve or {}))
    timeout = aiohttp.ClientTimeout(total=options.timeout_s + options.seconds + 10)
    with host_addresses(options.ice_host_address):
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            return await Doctor(options, http).run()


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("doctor", help="check a deployment from outside: TLS, proxy, TURN, WebRTC",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("url", help="the public URL, e.g. https://avatar.example.org")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of frames to count (default 3)")
    parser.add_argument("--ca-file", help="trust this CA (PEM) besides the system's")
    parser.add_argument("--resolve", action="append", default=[], metavar="NAME:ADDR",
                        help="connect to ADDR for NAME (repeatable), like curl --resolve")
    parser.add_argument("--ice-host-address", help="the local address the WebRTC check offers")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds per step (default 15)")
    return parser


def run(args: argparse.Namespace) -> int:
    resolve = {}
    for item in args.resolve:
        name, sep, address = item.rpartition(":") if item.count(":") == 1 else item.partition(":")
        if not sep or not name or not address:
            print(f"lipsync doctor: --resolve {item!r}: expected NAME:ADDR", file=sys.stderr)
            return 2
        resolve[name] = address
    if not args.url.startswith(("http://", "https://")):
        print(f"lipsync doctor: {args.url!r}: expected https://name[:port]", file=sys.stderr)
        return 2
    options = Options(args.url, seconds=args.seconds, ca_file=args.ca_file, resolve=resolve,
                      ice_host_address=args.ice_host_address, timeout_s=args.timeout)
    for noisy in ("aioice", "aiortc"):  # their INFO lines would drown the checks'
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ok = asyncio.run(diagnose(options))
    print("all checks passed" if ok else "some checks failed: try the fixes above", flush=True)
    return 0 if ok else 1
