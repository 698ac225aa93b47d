"""ServerConfig: the one settings object of the server, filled from flags, then env vars, then defaults.

Each setting is declared once, as a dataclass field whose metadata (`flag(...)`) drives everything else:
the command-line flag (`add_arguments`), its environment variable, the conversion of a string from either,
and the reference table in docs/flags.md (`flags_markdown`; tests/test_docs.py fails when the file and the
fields disagree). Every flag `--some-option` has an environment variable `LIPSYNC_SOME_OPTION`; a flag given
on the command line wins over the variable. Repeatable flags (`--ice-server`) take a comma- or
whitespace-separated list from the variable.

A new setting is one field: `my_limit: int = flag(4, "what it bounds and why (default {default})")`; the
type of the field says how a string converts (int, float: finite, str, Path, bool: a switch); `convert=`
for anything else.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Union, get_args, get_origin, get_type_hints

from server.network.udp_ports import parse_port_range
from server.ops.event_loop import DEFAULT_LOOP, LOOPS
from server.ops.event_loop import available as event_loop_available

ENV_PREFIX = "LIPSYNC_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class IceServer:
    """One STUN/TURN server for both peers, e.g. `turn:turn.example.org:3478?transport=udp`."""

    url: str
    username: str | None = None
    credential: str | None = None

    @classmethod
    def parse(cls, text: str) -> "IceServer":
        """Parse `stun:host[:port]` or `turn[s]:[user:credential@]host[:port][?transport=udp|tcp]`."""
        scheme, sep, rest = text.strip().partition(":")
        if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
            raise ValueError(f"ICE server {text!r}: expected stun:, stuns:, turn: or turns:")
        rest = rest.removeprefix("//")
        username = credential = None
        if "@" in rest:
            userinfo, _, rest = rest.rpartition("@")
            username, _, credential = userinfo.partition(":")
            if scheme.startswith("stun"):
                raise ValueError(f"ICE server {text!r}: STUN servers take no credentials")
        hostport = rest.split("?", 1)[0]
        if not hostport or hostport.startswith(":"):
            raise ValueError(f"ICE server {text!r}: no host")
        if scheme.startswith("turn") and not (username and credential):
            raise ValueError(f"ICE server {text!r}: TURN needs user:credential@host")
        return cls(url=f"{scheme}:{rest}", username=username or None, credential=credential or None)

    def to_json(self) -> dict[str, Any]:
        """The browser's RTCIceServer dictionary."""
        out: dict[str, Any] = {"urls": [self.url]}
        if self.username is not None:
            out["username"] = self.username
            out["credential"] = self.credential
        return out



@dataclass(frozen=True)
class Flag:
    """How a ServerConfig field is set from outside: its flag, its help, how a string converts."""

    help: str                              # "{default}" is replaced by the field's default
    name: str = ""                         # the flag without "--"; "": the field name with "-" for "_"
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    convert: Callable[[Any], Any] | None = None  # None: from the field's type
    repeatable: bool = False               # --flag A --flag B; the variable: "A,B"
    cli: bool = True                       # False: an environment variable only
    empty_ok: bool = False                 # an empty variable sets "" (else it is ignored)


def flag(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
         repr: bool = True, **options: Any) -> Any:
    """A ServerConfig field with its flag (see `Flag`); `factory` for a mutable default."""
    meta = {"flag": Flag(help, **options)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


def _split(value: str | list[str]) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [part for item in items for part in item.replace(",", " ").split()]


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value} is not a finite number")
    return number


def _switch(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _ice_servers(value: str | list[str]) -> list[IceServer]:
    return [IceServer.parse(item) for item in _split(value)]


def _origins(value: str | list[str]) -> list[str]:
    return [origin.rstrip("/").lower() for origin in _split(value)]


def _urls(value: str | list[str]) -> list[str]:
    return [url.rstrip("/").lower() for url in _split(value)]


def _auto_or_positive(value: str | int) -> int:
    """`auto` -> 0 (measured / one per core), else a number >= 1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    number = int(value)
    if number < 1:
        raise ValueError(f"{value!r}: expected auto or a number >= 1")
    return number


@dataclass
class ServerConfig:
    host: str = flag("127.0.0.1", "address to listen on (default {default}; 0.0.0.0 for every interface)")
    port: int = flag(8080, "TCP port (default {default}; 0 picks a free one)")
    # Model and avatar: no checkpoint selects the no-weights default renderer.
    checkpoint: Path | None = flag(None, "Wav2Lip checkpoint (wav2lip.pth / wav2lip_gan.pth); without it the "
                                         "no-weights renderer is used")
    # a prepared avatar dir, a video or an image; None = embedded default
    avatar: Path | None = flag(None, "avatar: a prepared avatar directory, a video or an image (default: the "
                                     "embedded avatar)")
    # More avatars: a folder of prepared avatars, videos and photos, prepared (and cached) at start;
    # sessions choose one by id (POST /offer options.avatar). The embedded default is always there.
    avatars_dir: Path | None = flag(None, "more avatars: a folder of prepared avatars, videos and photos, "
                                          "prepared and cached at start; sessions pick one by id (GET /avatars). "
                                          "The embedded avatar is always there", name="avatars", metavar="DIR")
    avatar_cache_dir: Path | None = flag(None, "cache of prepared avatars (default $LIPSYNC_CACHE_DIR or "
                                               "~/.cache/lipsync/avatars)")
    # POST /avatars uploads (size: max_upload_mb): checked from the container before any frame is decoded.
    max_avatar_seconds: float = flag(30.0, "longest avatar video accepted by POST /avatars (default {default})")
    max_avatar_side: int = flag(4096, "largest avatar width or height accepted by POST /avatars "
                                      "(default {default} px)")
    # auto | cpu | cuda | cuda:N | mps, or a comma-separated list (one render worker each, sessions go to
    # the least-loaded one); cuda:all = one worker per visible GPU. See `device_list`.
    device: str = flag("auto", "torch device: auto, cpu, cuda, cuda:N, mps (default {default}); a comma-separated "
                               "list (cuda:0,cuda:1) or cuda:all runs one render worker per GPU, and each new "
                               "session goes to the worker with the fewest sessions")
    # Wav2Lip numerics. auto: fp16 on CUDA; on CPU bf16 when the start-up gate measures it at least
    # min_psnr_db from fp32 on this checkpoint and avatar and faster on this CPU, else fp32.
    precision: str = flag("auto", "Wav2Lip numerics: auto (CUDA: fp16; CPU: bf16 if measured at start-up to stay "
                                  "within --min-psnr-db of fp32 and to be faster, else fp32), fp32 (faithful), "
                                  "bf16, fp16 (CUDA)", choices=("auto", "fp32", "fp16", "bf16"))
    min_psnr_db: float = flag(35.0, "accuracy bound for --precision auto on CPU (default {default} dB PSNR vs fp32)")
    # Wav2Lip runtime: auto = OpenVINO on CPU (bench/runtimes.py), PyTorch on CUDA.
    runtime: str = flag("auto", "Wav2Lip runtime: auto (OpenVINO on CPU, PyTorch on CUDA), openvino (CPU), torch",
                        choices=("auto", "openvino", "torch"))
    # How mouth patches are pasted: feather (seamless) or official (hard paste, parity with the
    # original tool; Wav2Lip then generates whole 96x96 patches instead of only the pasted rows).
    paste_mode: str = flag("feather", "feather (seamless, default) or official (the original tool's hard paste)",
                           choices=("feather", "official"))
    # Where Wav2Lip's mel window of each frame starts: training (one frame before the frame, as the
    # network was trained; 172.5 ms look-ahead at 25 fps) or official (at the frame, as the official
    # inference script; 212.5 ms). training answers a live stream 40 ms sooner (bench/latency.py).
    mel_alignment: str = flag("training", "Wav2Lip: each frame's mel window starts one frame before it, as in "
                                          "training (default; 40 ms less look-ahead), or at the frame, as the "
                                          "official inference script", choices=("training", "official"))
    # Admission (docs/scaling.md): 0 = auto, as many sessions as this machine serves at full frame rate
    # with capacity_headroom, measured at start and live (server/access/capacity.py); N > 0 caps that at N.
    max_sessions: int = flag(0, "concurrent sessions, more get 503 + Retry-After: auto (default) admits as many "
                                "as this machine serves at full frame rate with headroom, measured at start and "
                                "live; a number caps that (docs/scaling.md)", metavar="auto|N",
                             convert=_auto_or_positive)
    capacity_headroom: float = flag(0.75, "with --max-sessions auto: the share of the cores and of the event "
                                          "loop that sessions may fill (default {default})")
    # Front-end processes behind the one port (server/ops/workers.py, docs/scaling.md): 0 = auto, one per core
    # (one where a worker cannot be split off: TLS here, or a GPU rendered in-process). The operator's
    # views (GET /sessions, /metrics) and API avatar changes span every worker (server/ops/worker_peers.py).
    workers: int = flag(0, "front-end processes serving sessions behind the one port: auto (default) = one per "
                           "core; each session lives in one (docs/scaling.md)", metavar="auto|N",
                        convert=_auto_or_positive)
    # TLS (browsers only grant the microphone on https or localhost).
    cert_file: Path | None = flag(None, "TLS certificate (PEM) to serve https")
    key_file: Path | None = flag(None, "TLS private key (PEM)")
    # WebRTC.
    ice_servers: list[IceServer] = flag(
        help="STUN/TURN server for both peers, repeatable: stun:host:3478 or "
             "turn:user:credential@host:3478?transport=udp",
        factory=list, name="ice-server", metavar="URL", repeatable=True, convert=_ice_servers)
    # Host addresses offered as ICE candidates: empty = every interface (plus loopback when the
    # HTTP host is loopback); otherwise exactly these, e.g. ["127.0.0.1"].
    ice_host_addresses: list[str] = flag(help="only offer these local addresses as ICE host candidates "
                                              "(e.g. 127.0.0.1)", factory=list, metavar="ADDR[,ADDR]",
                                         convert=_split)
    # (first, last) UDP ports for media; None = any
    udp_ports: tuple[int, int] | None = flag(None, "UDP port range for WebRTC media, e.g. 40000-40099 "
                                                   "(default: any free port)", metavar="FIRST-LAST",
                                             convert=parse_port_range)
    # The event loop every session's packets, timers and executor hops run on (server/ops/event_loop.py).
    event_loop: str = flag(DEFAULT_LOOP, "event loop: uvloop (libuv: less CPU per packet and timer) or asyncio "
                                     "(the standard library's, e.g. where uvloop is not built) (default {default})",
                           choices=LOOPS)
    # Remote ICE candidates in private ranges (server/network/ice_filter.py): dropped on a public or wildcard bind
    # unless this is set (a server on 0.0.0.0 that also serves its LAN).
    ice_allow_private: bool = flag(False, "on a public or wildcard bind (0.0.0.0), still send connectivity checks "
                                          "to remote ICE candidates in private ranges (10/8, 192.168/16, "
                                          "fc00::/7, ...): for a server that also serves its LAN. Loopback and "
                                          "private binds allow them anyway")
    # Remote candidates on loopback, even when the server is public (a --public-url or --trusted-proxy makes a
    # loopback bind public): only for a whole deployment on one machine, as the deployment tests run it.
    ice_allow_loopback: bool = flag(False, "send connectivity checks to remote ICE candidates on loopback even "
                                           "when the server is public (--public-url / --trusted-proxy): only for "
                                           "a deployment tested on one machine")
    # Limits and timeouts.
    max_upload_mb: float = flag(32.0, "largest audio upload (default {default} MB)")
    connect_timeout_s: float = flag(10.0, "seconds a peer may take to connect before its session is reaped "
                                          "(default {default})", name="connect-timeout")
    disconnect_grace_s: float = flag(5.0, "seconds a peer may stay \"disconnected\" before its session is "
                                          "reaped (default {default})", name="disconnect-grace", cli=False)
    # No packet (RTP/RTCP) from a connected peer this long -> reaped (it vanished). A live peer sends RTCP
    # receiver reports for the avatar video every ~1-1.5 s; 4 s + a 0.5 s check reaps within 5 s.
    peer_timeout_s: float = flag(4.0, "seconds without a packet from a connected peer before its session is "
                                      "reaped (default {default})", name="peer-timeout")
    # Memory: cap glibc's malloc arenas (0 = glibc's default of 8 per core); see server/ops/heap.py for the
    # RSS growth the default showed under session churn.
    malloc_arenas: int = flag(2, "cap on glibc malloc arenas, so memory freed by ended sessions goes back to the "
                                 "system (default {default}; 0 keeps glibc's default)")
    # Security (SECURITY.md). The operator token guards GET /sessions, /metrics and every session's
    # routes; each session also gets its own token in the /offer answer. Bound to loopback without a
    # token, operator routes stay open; bound elsewhere, a token is generated unless no_auth.
    api_token: str | None = flag(None, "operator token (>= 16 characters): `Authorization: Bearer TOKEN` opens "
                                       "GET /sessions, /metrics and every session's routes; bound beyond loopback "
                                       "without one, a token is generated and printed once", repr=False)
    no_auth: bool = flag(False, "bound beyond loopback, leave the operator routes open to anyone (unsafe; session "
                                "routes still need their session_token)")
    allowed_origins: list[str] = flag(help="another web origin (https://app.example.org) whose pages may call "
                                           "this server, repeatable", factory=list, name="allowed-origin",
                                      metavar="ORIGIN", repeatable=True, convert=_origins)
    max_sessions_per_ip: int = flag(2, "sessions per client address (default {default}; 0 = no limit)")
    max_offers_per_minute: int = flag(30, "offers per client address per minute, more get 429 (default {default}; "
                                          "0 = no limit)")
    max_session_s: float = flag(3600.0, "a session is ended after this many seconds (default {default})")
    max_concurrent_decodes: int = flag(2, "upload decodes and TTS syntheses at once, more get 503 "
                                          "(default {default})")
    # of those, per client address (429 beyond); 0 = no per-address share
    max_decodes_per_ip: int = flag(1, "of those, how many one client address may hold, more get 429 (default "
                                      "{default}; 0 = no per-address share)")
    # Every upload body (server/routes/upload_body.py) arrives whole within upload_timeout_s, and after a 5 s
    # grace at min_upload_rate_kb KB/s on average (128 kbit/s: below any mobile uplink, far above a
    # sender that stalls), else 408; it is read before a decode slot is taken.
    upload_timeout_s: float = flag(120.0, "seconds an upload's whole body may take to arrive, else 408 "
                                          "(default {default})", name="upload-timeout")
    min_upload_rate_kb: float = flag(16.0, "slowest average upload rate after 5 s, else 408 (default {default} "
                                           "KB/s)", name="min-upload-rate", metavar="KB_PER_S")
    say_timeout_s: float = flag(30.0, "seconds a /say synthesis may take before it gets 504 (default {default})",
                                name="say-timeout")
    keepalive_timeout_s: float = flag(15.0, "seconds an idle HTTP keep-alive connection is kept "
                                            "(default {default})", name="keepalive-timeout")
    # TURN REST (coturn use-auth-secret): /config hands out credentials valid for turn_ttl_s.
    turn_secret: str | None = flag(None, "coturn use-auth-secret shared secret: /config hands out short-lived "
                                         "TURN REST credentials instead of a password", repr=False)
    turn_urls: list[str] = flag(help="TURN server for --turn-secret, repeatable: "
                                     "turn:turn.example.org:3478?transport=udp", factory=list, name="turn-url",
                                metavar="URL", repeatable=True, convert=_split)
    # Ten minutes: long enough to connect (coturn checks the credential at allocation and at each refresh,
    # so a live relay lasts past it only until its next refresh), short enough that a leaked one is stale.
    turn_ttl_s: float = flag(600.0, "lifetime of TURN REST credentials in seconds (default {default})",
                             name="turn-ttl")
    # Behind a reverse proxy (docs/deploying.md). public_urls: where browsers reach this server
    # (https://avatar.example.org); the Host and same-origin checks accept them, and with any of them the
    # operator routes need a token. trusted_proxies: addresses / CIDRs whose X-Forwarded-For, Forwarded
    # and X-Forwarded-Proto are believed (server/access/auth.py `ForwardedClients`); from anyone else ignored.
    public_urls: list[str] = flag(help="where browsers reach this server through a proxy "
                                       "(https://avatar.example.org), repeatable: the Host and same-origin checks "
                                       "accept it, and operator routes then need a token", factory=list,
                                  name="public-url", metavar="URL", repeatable=True, convert=_urls)
    trusted_proxies: list[str] = flag(help="reverse proxy whose X-Forwarded-For / Forwarded / X-Forwarded-Proto "
                                           "are believed, repeatable (e.g. 127.0.0.1): the client address they "
                                           "name is the one limits, logs and metrics use; from anyone else these "
                                           "headers are ignored", factory=list, name="trusted-proxy",
                                      metavar="ADDR|CIDR", repeatable=True, convert=_split)
    # Scaling out (docs/scaling.md): local = render workers in this process; ray = a Ray Serve render
    # tier shared by many front-ends (server/ray_render_tier.py). The ray_* fields map onto Serve's settings.
    render_backend: str = flag("local", "local: render in this process (default); ray: a Ray Serve render tier "
                                        "shared by front-ends", choices=("local", "ray"))
    ray_address: str | None = flag(None, "Ray cluster to join (host:port of `ray start --head`; default "
                                         "RAY_ADDRESS, else a local cluster in this process)")
    ray_replicas: int = flag(1, "render replicas (default {default})")
    # autoscaling bounds (by ongoing requests) instead of a fixed count
    ray_min_replicas: int | None = flag(None, "autoscaling: fewest render replicas")
    ray_max_replicas: int | None = flag(None, "autoscaling: most render replicas")
    ray_cpus_per_replica: float = flag(1.0, "CPUs per render replica (default {default})")
    ray_gpus_per_replica: float = flag(0.0, "GPUs per render replica (default 0; 1 puts each replica on its own "
                                            "GPU, 0.5 two per GPU)")
    ray_app_name: str = flag("lipsync-render", "Serve application of the render tier (default {default})")
    # This front-end's name: the prefix of its session ids ("<instance>-<random>"), so a load balancer can
    # route /sessions/{id}/... to the front-end that owns the session. Empty: no prefix.
    instance_id: str = flag("", "this front-end's name, the prefix of its session ids (for routing)")
    # Operations. SIGTERM drains: no new sessions, live ones run up to drain_s, then the process exits.
    drain_s: float = flag(30.0, "on SIGTERM, refuse new sessions and let live ones run this many seconds before "
                                "ending them (default {default}; 0: end them at once); a second SIGTERM exits at "
                                "once")
    log_level: str = flag("info", "debug, info, warning, error (default {default})")
    log_format: str = flag("text", "log line format (default {default})", choices=("text", "json"))
    tts_command: str = flag("espeak-ng", "local TTS program for /say (default {default}; empty disables)",
                            empty_ok=True)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MiB)

    @property
    def url(self) -> str:
        scheme = "https" if self.cert_file else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    def validate(self) -> None:
        if self.max_sessions < 0:
            raise ValueError("--max-sessions must be auto or at least 1")
        if self.workers < 0:
            raise ValueError("--workers must be auto or at least 1")
        if not 0 < self.capacity_headroom <= 1:
            raise ValueError("--capacity-headroom must be in (0, 1]")
        if self.malloc_arenas < 0:
            raise ValueError("--malloc-arenas must be 0 (glibc's default) or more")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: not a TCP port")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("--cert-file and --key-file go together")
        for path, flag in ((self.cert_file, "--cert-file"), (self.key_file, "--key-file"),
                           (self.checkpoint, "--checkpoint"), (self.avatar, "--avatar"),
                           (self.avatars_dir, "--avatars")):
            if path is not None and not Path(path).exists():
                raise ValueError(f"{flag} {path}: no such file or directory")
        device_list(self.device)
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError("--precision must be auto, fp32, fp16 or bf16")
        if self.runtime not in ("auto", "openvino", "torch"):
            raise ValueError("--runtime must be auto, openvino or torch")
        if not 0 < self.min_psnr_db < 100:
            raise ValueError("--min-psnr-db must be between 0 and 100")
        if self.paste_mode not in ("feather", "official"):
            raise ValueError("--paste-mode must be feather or official")
        if self.mel_alignment not in ("training", "official"):
            raise ValueError("--mel-alignment must be training or official")
        if self.event_loop not in LOOPS:
            raise ValueError(f"--event-loop must be one of {', '.join(LOOPS)}")
        if not event_loop_available(self.event_loop):
            raise ValueError(f"--event-loop {self.event_loop}: not installed here (pip install {self.event_loop}, "
                             "or --event-loop asyncio)")
        if self.log_format not in ("text", "json"):
            raise ValueError("--log-format must be text or json")
        if self.max_upload_mb <= 0:
            raise ValueError("--max-upload-mb must be positive")
        if self.avatars_dir is not None and not Path(self.avatars_dir).is_dir():
            raise ValueError(f"--avatars {self.avatars_dir}: not a folder")
        if self.max_avatar_seconds <= 0 or self.max_avatar_side < 64:
            raise ValueError("--max-avatar-seconds must be positive and --max-avatar-side at least 64")
        if min(self.connect_timeout_s, self.peer_timeout_s, self.disconnect_grace_s) <= 0:
            raise ValueError("timeouts must be positive")
        if self.drain_s < 0:
            raise ValueError("--drain-s must be 0 or more")
        self._validate_security()
        self._validate_scaling()

    def _validate_security(self) -> None:
        if self.api_token is not None and len(self.api_token) < 16:
            raise ValueError("--api-token must be at least 16 characters")
        if self.api_token is not None and self.no_auth:
            raise ValueError("--api-token and --no-auth contradict each other")
        for origin in self.allowed_origins:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"--allowed-origin {origin!r}: expected scheme://host[:port]")
        if min(self.max_sessions_per_ip, self.max_offers_per_minute) < 0:
            raise ValueError("--max-sessions-per-ip and --max-offers-per-minute must be >= 0 (0: no limit)")
        if self.max_concurrent_decodes < 1:
            raise ValueError("--max-concurrent-decodes must be at least 1")
        if self.max_decodes_per_ip < 0:
            raise ValueError("--max-decodes-per-ip must be >= 0 (0: no per-address share)")
        if min(self.max_session_s, self.say_timeout_s, self.keepalive_timeout_s, self.turn_ttl_s,
               self.upload_timeout_s, self.min_upload_rate_kb) <= 0:
            raise ValueError("--max-session-s, --say-timeout, --keepalive-timeout, --turn-ttl, "
                             "--upload-timeout and --min-upload-rate must be positive")
        if bool(self.turn_secret) != bool(self.turn_urls):
            raise ValueError("--turn-secret and --turn-url go together")

        for url in self.public_urls:
            if not re.fullmatch(r"https?://[^/\s?#@]+/?", url):
                raise ValueError(f"--public-url {url!r}: expected https://host[:port] (no path)")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"--trusted-proxy {proxy!r}: expected an IP address or CIDR") from None
        for url in self.turn_urls:
            if not re.fullmatch(r"turns?:[^@\s]+", url):
                raise ValueError(f"--turn-url {url!r}: expected turn:host[:port][?transport=udp|tcp] "
                                 "(no user:password; --turn-secret makes the credentials)")

    def _validate_scaling(self) -> None:
        if self.render_backend not in ("local", "ray"):
            raise ValueError("--render-backend must be local or ray")
        if self.ray_replicas < 1:
            raise ValueError("--ray-replicas must be at least 1")
        low, high = self.ray_min_replicas, self.ray_max_replicas
        if (low is not None and low < 0) or (high is not None and high < 1) or (
                low is not None and high is not None and low > high):
            raise ValueError("--ray-min-replicas / --ray-max-replicas: need 0 <= min <= max, max >= 1")
        if self.ray_cpus_per_replica < 0 or self.ray_gpus_per_replica < 0:
            raise ValueError("--ray-cpus-per-replica / --ray-gpus-per-replica must not be negative")
        if not re.fullmatch(r"[A-Za-z0-9_.]{0,32}", self.instance_id):
            raise ValueError("--instance-id: up to 32 letters, digits, '_' or '.'")

    # -- command line and environment --------------------------------------------------------------

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """A flag for every field that has one. Defaults are None so that unset flags fall back to env,
        then to the field's default."""
        for f, spec in _flags():
            if not spec.cli:
                continue
            options: dict[str, Any] = {"dest": f.name, "help": _help(f, spec)}
            if spec.metavar:
                options["metavar"] = spec.metavar
            if spec.choices:
                options["choices"] = list(spec.choices)
            if spec.repeatable:
                options["action"] = "append"
            elif _base_type(f) is bool:
                options.update(action="store_true", default=None)
            elif _base_type(f) in (int, float, Path) and spec.convert is None:
                options["type"] = _base_type(f)  # argparse names a bad value before anything starts
            parser.add_argument(f"--{_flag_name(f, spec)}", **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None,
                  env: Mapping[str, str] | None = None) -> "ServerConfig":
        env = os.environ if env is None else env
        values = vars(args) if args is not None else {}
        config = cls()
        for f, spec in _flags():
            given = values.get(f.name)
            variable = ENV_PREFIX + _env_name(f, spec)
            if given is None:
                given = env.get(variable)
                if given is None or (given == "" and not spec.empty_ok):
                    continue
            try:
                setattr(config, f.name, _converter(f, spec)(given))
            except ValueError as exc:
                raise ValueError(f"--{_flag_name(f, spec)} / {variable}: {exc}") from None
        return config


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+|:all)?")


def device_list(spec: str) -> list[str]:
    """`--device` as a list of entries, syntax-checked (torch resolves them when the engine loads).

    One entry per render worker. `auto` and `cuda:all` stand alone. A GPU may be listed once (two
    workers on one GPU would only take turns on it); `cpu` may repeat: the no-weights renderer then gets
    that many CPU worker threads.
    """
    items = str(spec).replace(",", " ").split()
    if not items:
        raise ValueError("--device: empty")
    for item in items:
        if not _DEVICE.fullmatch(item):
            raise ValueError(f"--device {item!r}: expected auto, cpu, cuda, cuda:N, cuda:all or mps")
    if len(items) > 1 and any(item in ("auto", "cuda:all") for item in items):
        raise ValueError("--device: auto and cuda:all cannot be combined with other devices")
    gpus = [item for item in items if item != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--device {spec!r}: a GPU is listed twice (one render worker per GPU)")
    return items


def _flags() -> list[tuple[Field[Any], Flag]]:
    """Every ServerConfig field with its Flag, in declaration order (a field without one is an error)."""
    out = []
    for f in fields(ServerConfig):
        spec = f.metadata.get("flag")
        if not isinstance(spec, Flag):
            raise TypeError(f"ServerConfig.{f.name} is declared without flag(...)")
        out.append((f, spec))
    return out


def _flag_name(f: Field[Any], spec: Flag) -> str:
    return spec.name or f.name.replace("_", "-")


def _env_name(f: Field[Any], spec: Flag) -> str:
    return _flag_name(f, spec).replace("-", "_").upper()


def _default(f: Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _help(f: Field[Any], spec: Flag) -> str:
    default = _default(f)
    return spec.help.replace("{default}", f"{default:g}" if isinstance(default, float) else str(default))


def _base_type(f: Field[Any]) -> Any:
    """The field's type without `| None` (int, float, str, bool, Path, list[...], ...)."""
    kind = get_type_hints(ServerConfig)[f.name]
    if get_origin(kind) in (Union, type(int | None)):
        kinds = [k for k in get_args(kind) if k is not type(None)]
        kind = kinds[0] if len(kinds) == 1 else kind
    return kind


def _converter(f: Field[Any], spec: Flag) -> Callable[[Any], Any]:
    """How a string (argv or the variable; a list for a repeated flag) becomes the field's value."""
    if spec.convert is not None:
        return spec.convert
    kind = _base_type(f)
    simple: dict[Any, Callable[[Any], Any]] = {int: int, float: _finite, str: str, bool: _switch, Path: Path}
    if kind not in simple:
        raise TypeError(f"ServerConfig.{f.name}: a {kind} field needs flag(convert=...)")
    return simple[kind]


def flags_markdown() -> str:
    """docs/flags.md: the reference table, generated from the fields (`python -m server.config`)."""
    lines = ["# Server flags", "",
             "Generated from `server/config.py` by `python -m server.config > docs/flags.md` (tests/test_docs.py",
             "fails when they differ). Every flag has an environment variable; a flag on the command line wins.",
             "A repeatable flag's variable takes a comma- or space-separated list; a switch's, 1/true/yes/on.", "",
             "| flag | environment | default | |", "|---|---|---|---|"]
    for f, spec in _flags():
        pipe = "\\|"
        name = "(no flag)"
        if spec.cli:
            name = f"`--{_flag_name(f, spec)}" + (f" {spec.metavar}".replace("|", pipe) if spec.metavar else "") + "`"
        choices = f" ({pipe.join(spec.choices)})" if spec.choices else ""
        default = _default(f)
        shown = "" if default in (None, [], "") else f"`{default:g}`" if isinstance(default, float) else f"`{default}`"
        text = _help(f, spec).replace("|", pipe)
        lines.append(f"| {name}{choices} | `{ENV_PREFIX}{_env_name(f, spec)}` | {shown} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
