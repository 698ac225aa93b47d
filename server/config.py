"""ServerConfig: the one settings object of the server, filled from flags, then env vars, then defaults.

Every flag `--some-option` has an environment variable `LIPSYNC_SOME_OPTION`; a flag given on the
command line wins over the variable. Repeatable flags (`--ice-server`) take a comma- or
whitespace-separated list from the variable.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from server.udp_ports import parse_port_range

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

    def to_json(self) -> dict:
        """The browser's RTCIceServer dictionary."""
        out: dict = {"urls": [self.url]}
        if self.username is not None:
            out["username"] = self.username
            out["credential"] = self.credential
        return out


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Model and avatar: no checkpoint selects the no-weights default renderer.
    checkpoint: Path | None = None
    avatar: Path | None = None  # a prepared avatar dir, a video or an image; None = embedded default
    # More avatars: a folder of prepared avatars, videos and photos, prepared (and cached) at start;
    # sessions choose one by id (POST /offer options.avatar). The embedded default is always there.
    avatars_dir: Path | None = None
    avatar_cache_dir: Path | None = None  # prepared avatars' cache (default $LIPSYNC_CACHE_DIR or ~/.cache)
    # POST /avatars uploads (size: max_upload_mb): checked from the container before any frame is decoded.
    max_avatar_seconds: float = 30.0
    max_avatar_side: int = 4096  # px, width and height
    # auto | cpu | cuda | cuda:N | mps, or a comma-separated list (one render worker each, sessions go to
    # the least-loaded one); cuda:all = one worker per visible GPU. See `device_list`.
    device: str = "auto"
    # Wav2Lip numerics. auto: fp16 on CUDA; on CPU bf16 when the start-up gate measures it at least
    # min_psnr_db from fp32 on this checkpoint and avatar and faster on this CPU, else fp32.
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    min_psnr_db: float = 35.0
    # Wav2Lip runtime: auto = OpenVINO on CPU (bench/runtimes.py), PyTorch on CUDA.
    runtime: str = "auto"  # auto | openvino | torch
    # How mouth patches are pasted: feather (seamless) or official (hard paste, parity with the
    # original tool; Wav2Lip then generates whole 96x96 patches instead of only the pasted rows).
    paste_mode: str = "feather"
    # Where Wav2Lip's mel window of each frame starts: training (one frame before the frame, as the
    # network was trained; 172.5 ms look-ahead at 25 fps) or official (at the frame, as the official
    # inference script; 212.5 ms). training answers a live stream 40 ms sooner (bench/latency.py).
    mel_alignment: str = "training"  # training | official
    # Admission (docs/scaling.md): 0 = auto, as many sessions as this machine serves at full frame rate
    # with capacity_headroom, measured at start and live (server/capacity.py); N > 0 caps that at N.
    max_sessions: int = 0
    capacity_headroom: float = 0.75  # the share of the cores (and of the event loop) sessions may fill
    # Front-end processes behind the one port (server/workers.py, docs/scaling.md): 0 = auto, one per core
    # (one where a worker cannot be split off: TLS here, or a GPU rendered in-process).
    workers: int = 0
    # TLS (browsers only grant the microphone on https or localhost).
    cert_file: Path | None = None
    key_file: Path | None = None
    # WebRTC.
    ice_servers: list[IceServer] = field(default_factory=list)
    # Host addresses offered as ICE candidates: empty = every interface (plus loopback when the
    # HTTP host is loopback); otherwise exactly these, e.g. ["127.0.0.1"].
    ice_host_addresses: list[str] = field(default_factory=list)
    udp_ports: tuple[int, int] | None = None  # (first, last) UDP ports for media; None = any
    # Remote ICE candidates in private ranges (server/ice_filter.py): dropped on a public or wildcard bind
    # unless this is set (a server on 0.0.0.0 that also serves its LAN).
    ice_allow_private: bool = False
    # Remote candidates on loopback, even when the server is public (a --public-url or --trusted-proxy makes a
    # loopback bind public): only for a whole deployment on one machine, as the deployment tests run it.
    ice_allow_loopback: bool = False
    # Limits and timeouts.
    max_upload_mb: float = 32.0
    connect_timeout_s: float = 10.0  # a peer that never connects is reaped after this
    disconnect_grace_s: float = 5.0  # "disconnected" this long -> reaped
    # No packet (RTP/RTCP) from a connected peer this long -> reaped (it vanished). A live peer sends RTCP
    # receiver reports for the avatar video every ~1-1.5 s; 4 s + a 0.5 s check reaps within 5 s.
    peer_timeout_s: float = 4.0
    # Memory: cap glibc's malloc arenas (0 = glibc's default of 8 per core); see server/heap.py for the
    # RSS growth the default showed under session churn.
    malloc_arenas: int = 2
    # Security (SECURITY.md). The operator token guards GET /sessions, /metrics and every session's
    # routes; each session also gets its own token in the /offer answer. Bound to loopback without a
    # token, operator routes stay open; bound elsewhere, a token is generated unless no_auth.
    api_token: str | None = field(default=None, repr=False)
    no_auth: bool = False
    allowed_origins: list[str] = field(default_factory=list)  # e.g. ["https://app.example.org"]
    max_sessions_per_ip: int = 2  # live + negotiating sessions per client address; 0 = no limit
    max_offers_per_minute: int = 30  # per client address; 0 = no limit
    max_session_s: float = 3600.0  # a session is ended after this long
    max_concurrent_decodes: int = 2  # upload decodes + TTS at once; more get 503
    max_decodes_per_ip: int = 1  # of those, per client address (429 beyond); 0 = no per-address share
    # Every upload body (server/upload_body.py) arrives whole within upload_timeout_s, and after a 5 s
    # grace at min_upload_rate_kb KB/s on average (128 kbit/s: below any mobile uplink, far above a
    # sender that stalls), else 408; it is read before a decode slot is taken.
    upload_timeout_s: float = 120.0
    min_upload_rate_kb: float = 16.0
    say_timeout_s: float = 30.0  # a /say synthesis that takes longer gets 504
    keepalive_timeout_s: float = 15.0  # idle HTTP keep-alive connections are closed after this
    # TURN REST (coturn use-auth-secret): /config hands out credentials valid for turn_ttl_s.
    turn_secret: str | None = field(default=None, repr=False)
    turn_urls: list[str] = field(default_factory=list)
    # Ten minutes: long enough to connect (coturn checks the credential at allocation and at each refresh,
    # so a live relay lasts past it only until its next refresh), short enough that a leaked one is stale.
    turn_ttl_s: float = 600.0
    # Behind a reverse proxy (docs/deploying.md). public_urls: where browsers reach this server
    # (https://avatar.example.org); the Host and same-origin checks accept them, and with any of them the
    # operator routes need a token. trusted_proxies: addresses / CIDRs whose X-Forwarded-For, Forwarded
    # and X-Forwarded-Proto are believed (server/auth.py `ForwardedClients`); from anyone else ignored.
    public_urls: list[str] = field(default_factory=list)
    trusted_proxies: list[str] = field(default_factory=list)
    # Scaling out (README "Scaling out"): local = render workers in this process; ray = a Ray Serve render
    # tier shared by many front-ends (server/ray_render_tier.py). The ray_* fields map onto Serve's settings.
    render_backend: str = "local"  # local | ray
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local cluster started in this process
    ray_replicas: int = 1
    ray_min_replicas: int | None = None  # autoscaling bounds (by ongoing requests) instead of a fixed count
    ray_max_replicas: int | None = None
    ray_cpus_per_replica: float = 1.0
    ray_gpus_per_replica: float = 0.0
    ray_app_name: str = "lipsync-render"
    # This front-end's name: the prefix of its session ids ("<instance>-<random>"), so a load balancer can
    # route /sessions/{id}/... to the front-end that owns the session. Empty: no prefix.
    instance_id: str = ""
    # Operations. SIGTERM drains: no new sessions, live ones run up to drain_s, then the process exits.
    drain_s: float = 30.0
    log_level: str = "info"
    log_format: str = "text"  # text | json
    tts_command: str = "espeak-ng"  # local TTS for /say; empty disables /say

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
        if self.log_format not in ("text", "json"):
            raise ValueError("--log-format must be text or json")
        if self.max_upload_mb <= 0:
            raise ValueError("--max-upload-mb must be positive")
        if self.avatars_dir is not None and not Path(self.avatars_dir).is_dir():
            raise ValueError(f"--avatars {self.avatars_dir}: not a folder")
        if self.max_avatar_seconds <= 0 or self.max_avatar_side < 64:
            raise ValueError("--max-avatar-seconds must be positive and --max-avatar-side at least 64")
        if self.drain_s < 0:
            raise ValueError("--drain-s must be 0 or more")
        if min(self.connect_timeout_s, self.peer_timeout_s, self.disconnect_grace_s) <= 0:
            raise ValueError("timeouts must be positive")
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
        """Flags for every field. Defaults are None so that unset flags fall back to env, then defaults."""
        d = ServerConfig()
        add = parser.add_argument
        add("--host", help=f"address to listen on (default {d.host}; 0.0.0.0 for every interface)")
        add("--port", type=int, help=f"TCP port (default {d.port}; 0 picks a free one)")
        add("--checkpoint", type=Path, help="Wav2Lip checkpoint (wav2lip.pth / wav2lip_gan.pth); "
                                            "without it the no-weights renderer is used")
        add("--avatar", type=Path, help="avatar: a prepared avatar directory, a video or an image "
                                        "(default: the embedded avatar)")
        add("--avatars", dest="avatars_dir", type=Path, metavar="DIR",
            help="more avatars: a folder of prepared avatars, videos and photos, prepared and cached at "
                 "start; sessions pick one by id (GET /avatars). The embedded avatar is always there")
        add("--avatar-cache-dir", type=Path,
            help="cache of prepared avatars (default $LIPSYNC_CACHE_DIR or ~/.cache/lipsync/avatars)")
        add("--max-avatar-seconds", type=float,
            help=f"longest avatar video accepted by POST /avatars (default {d.max_avatar_seconds:g})")
        add("--max-avatar-side", type=int,
            help=f"largest avatar width or height accepted by POST /avatars (default {d.max_avatar_side} px)")
        add("--device", help="torch device: auto, cpu, cuda, cuda:N, mps (default auto); a comma-separated "
                             "list (cuda:0,cuda:1) or cuda:all runs one render worker per GPU, and each "
                             "new session goes to the worker with the fewest sessions")
        add("--precision", choices=["auto", "fp32", "fp16", "bf16"],
            help="Wav2Lip numerics: auto (CUDA: fp16; CPU: bf16 if measured at start-up to stay within "
                 "--min-psnr-db of fp32 and to be faster, else fp32), fp32 (faithful), bf16, fp16 (CUDA)")
        add("--min-psnr-db", type=float,
            help=f"accuracy bound for --precision auto on CPU (default {d.min_psnr_db:g} dB PSNR vs fp32)")
        add("--runtime", choices=["auto", "openvino", "torch"],
            help="Wav2Lip runtime: auto (OpenVINO on CPU, PyTorch on CUDA), openvino (CPU), torch")
        add("--paste-mode", choices=["feather", "official"],
            help="feather (seamless, default) or official (the original tool's hard paste)")
        add("--mel-alignment", choices=["training", "official"],
            help="Wav2Lip: each frame's mel window starts one frame before it, as in training (default; "
                 "40 ms less look-ahead), or at the frame, as the official inference script")
        add("--max-sessions", metavar="auto|N",
            help="concurrent sessions, more get 503 + Retry-After: auto (default) admits as many as this "
                 "machine serves at full frame rate with headroom, measured at start and live; a number "
                 "caps that (docs/scaling.md)")
        add("--workers", metavar="auto|N",
            help="front-end processes serving sessions behind the one port: auto (default) = one per core; "
                 "each session lives in one (docs/scaling.md)")
        add("--capacity-headroom", type=float,
            help=f"with --max-sessions auto: the share of the cores and of the event loop that sessions may "
                 f"fill (default {d.capacity_headroom:g})")
        add("--cert-file", type=Path, help="TLS certificate (PEM) to serve https")
        add("--key-file", type=Path, help="TLS private key (PEM)")
        add("--ice-server", dest="ice_servers", action="append", metavar="URL",
            help="STUN/TURN server for both peers, repeatable: stun:host:3478 or "
                 "turn:user:credential@host:3478?transport=udp")
        add("--ice-host-addresses", metavar="ADDR[,ADDR]",
            help="only offer these local addresses as ICE host candidates (e.g. 127.0.0.1)")
        add("--udp-ports", metavar="FIRST-LAST",
            help="UDP port range for WebRTC media, e.g. 40000-40099 (default: any free port)")
        add("--ice-allow-private", action="store_true", default=None,
            help="on a public or wildcard bind (0.0.0.0), still send connectivity checks to remote ICE "
                 "candidates in private ranges (10/8, 192.168/16, fc00::/7, ...): for a server that also "
                 "serves its LAN. Loopback and private binds allow them anyway")
        add("--ice-allow-loopback", action="store_true", default=None,
            help="send connectivity checks to remote ICE candidates on loopback even when the server is "
                 "public (--public-url / --trusted-proxy): only for a deployment tested on one machine")
        add("--max-upload-mb", type=float, help=f"largest audio upload (default {d.max_upload_mb:g} MB)")
        add("--connect-timeout", dest="connect_timeout_s", type=float,
            help=f"seconds a peer may take to connect before its session is reaped "
                 f"(default {d.connect_timeout_s:g})")
        add("--peer-timeout", dest="peer_timeout_s", type=float,
            help=f"seconds without a packet from a connected peer before its session is reaped "
                 f"(default {d.peer_timeout_s:g})")
        add("--malloc-arenas", type=int,
            help=f"cap on glibc malloc arenas, so memory freed by ended sessions goes back to the system "
                 f"(default {d.malloc_arenas}; 0 keeps glibc's default)")
        add("--api-token", help="operator token (>= 16 characters): `Authorization: Bearer TOKEN` opens "
                                "GET /sessions, /metrics and every session's routes; bound beyond "
                                "loopback without one, a token is generated and printed once")
        add("--no-auth", action="store_true", default=None,
            help="bound beyond loopback, leave the operator routes open to anyone (unsafe; session "
                 "routes still need their session_token)")
        add("--allowed-origin", dest="allowed_origins", action="append", metavar="ORIGIN",
            help="another web origin (https://app.example.org) whose pages may call this server, repeatable")
        add("--max-sessions-per-ip", type=int,
            help=f"sessions per client address (default {d.max_sessions_per_ip}; 0 = no limit)")
        add("--max-offers-per-minute", type=int,
            help=f"offers per client address per minute, more get 429 (default {d.max_offers_per_minute}; "
                 f"0 = no limit)")
        add("--max-session-s", type=float,
            help=f"a session is ended after this many seconds (default {d.max_session_s:g})")
        add("--max-concurrent-decodes", type=int,
            help=f"upload decodes and TTS syntheses at once, more get 503 (default {d.max_concurrent_decodes})")
        add("--max-decodes-per-ip", type=int,
            help=f"of those, how many one client address may hold, more get 429 (default "
                 f"{d.max_decodes_per_ip}; 0 = no per-address share)")
        add("--upload-timeout", dest="upload_timeout_s", type=float,
            help=f"seconds an upload's whole body may take to arrive, else 408 (default {d.upload_timeout_s:g})")
        add("--min-upload-rate", dest="min_upload_rate_kb", type=float, metavar="KB_PER_S",
            help=f"slowest average upload rate after 5 s, else 408 (default {d.min_upload_rate_kb:g} KB/s)")
        add("--say-timeout", dest="say_timeout_s", type=float,
            help=f"seconds a /say synthesis may take before it gets 504 (default {d.say_timeout_s:g})")
        add("--keepalive-timeout", dest="keepalive_timeout_s", type=float,
            help=f"seconds an idle HTTP keep-alive connection is kept (default {d.keepalive_timeout_s:g})")
        add("--turn-secret", help="coturn use-auth-secret shared secret: /config hands out short-lived "
                                  "TURN REST credentials instead of a password")
        add("--turn-url", dest="turn_urls", action="append", metavar="URL",
            help="TURN server for --turn-secret, repeatable: turn:turn.example.org:3478?transport=udp")
        add("--turn-ttl", dest="turn_ttl_s", type=float,
            help=f"lifetime of TURN REST credentials in seconds (default {d.turn_ttl_s:g})")
        add("--public-url", dest="public_urls", action="append", metavar="URL",
            help="where browsers reach this server through a proxy (https://avatar.example.org), repeatable: "
                 "the Host and same-origin checks accept it, and operator routes then need a token")
        add("--trusted-proxy", dest="trusted_proxies", action="append", metavar="ADDR|CIDR",
            help="reverse proxy whose X-Forwarded-For / Forwarded / X-Forwarded-Proto are believed, "
                 "repeatable (e.g. 127.0.0.1): the client address they name is the one limits, logs and "
                 "metrics use; from anyone else these headers are ignored")
        add("--render-backend", choices=["local", "ray"],
            help="local: render in this process (default); ray: a Ray Serve render tier shared by front-ends")
        add("--ray-address", help="Ray cluster to join (host:port of `ray start --head`; default RAY_ADDRESS, "
                                  "else a local cluster in this process)")
        add("--ray-replicas", type=int, help=f"render replicas (default {d.ray_replicas})")
        add("--ray-min-replicas", type=int, help="autoscaling: fewest render replicas")
        add("--ray-max-replicas", type=int, help="autoscaling: most render replicas")
        add("--ray-cpus-per-replica", type=float, help=f"CPUs per render replica (default {d.ray_cpus_per_replica:g})")
        add("--ray-gpus-per-replica", type=float,
            help="GPUs per render replica (default 0; 1 puts each replica on its own GPU, 0.5 two per GPU)")
        add("--ray-app-name", help=f"Serve application of the render tier (default {d.ray_app_name})")
        add("--instance-id", help="this front-end's name, the prefix of its session ids (for routing)")
        add("--drain-s", type=float,
            help=f"on SIGTERM, refuse new sessions and let live ones run this many seconds before ending "
                 f"them (default {d.drain_s:g}; 0: end them at once); a second SIGTERM exits at once")
        add("--log-level", help="debug, info, warning, error (default info)")
        add("--log-format", choices=["text", "json"], help="log line format (default text)")
        add("--tts-command", help="local TTS program for /say (default espeak-ng; empty disables)")

    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None,
                  env: Mapping[str, str] | None = None) -> "ServerConfig":
        env = os.environ if env is None else env
        values = vars(args) if args is not None else {}
        config = cls()
        for f in fields(cls):
            given = values.get(f.name)
            if given is None:
                given = env.get(ENV_PREFIX + _env_name(f.name))
                if given is None or (given == "" and f.name != "tts_command"):
                    continue
            try:
                setattr(config, f.name, _convert(f.name, given))
            except ValueError as exc:
                raise ValueError(f"--{_flag_name(f.name)} / {ENV_PREFIX}{_env_name(f.name)}: {exc}") from None
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


_FLAG_NAMES = {"avatars_dir": "avatars", "connect_timeout_s": "connect-timeout",
               "disconnect_grace_s": "disconnect-grace",
               "peer_timeout_s": "peer-timeout", "ice_servers": "ice-server",
               "allowed_origins": "allowed-origin", "say_timeout_s": "say-timeout",
               "keepalive_timeout_s": "keepalive-timeout", "turn_urls": "turn-url", "turn_ttl_s": "turn-ttl",
               "upload_timeout_s": "upload-timeout", "min_upload_rate_kb": "min-upload-rate",
               "public_urls": "public-url", "trusted_proxies": "trusted-proxy"}


def _flag_name(name: str) -> str:
    return _FLAG_NAMES.get(name, name.replace("_", "-"))


def _env_name(name: str) -> str:
    return _flag_name(name).replace("-", "_").upper()


def _split(value: str | list[str]) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [part for item in items for part in item.replace(",", " ").split()]


def _convert(name: str, value):
    if name == "ice_servers":
        return [IceServer.parse(item) for item in _split(value)]
    if name in ("ice_host_addresses", "turn_urls", "trusted_proxies"):
        return _split(value)
    if name == "public_urls":
        return [url.rstrip("/").lower() for url in _split(value)]
    if name == "allowed_origins":
        return [origin.rstrip("/").lower() for origin in _split(value)]
    if name in ("no_auth", "ice_allow_private", "ice_allow_loopback"):
        return value if isinstance(value, bool) else value.strip().lower() in ("1", "true", "yes", "on")
    if name == "udp_ports":
        return parse_port_range(value)
    if name in ("checkpoint", "avatar", "avatars_dir", "avatar_cache_dir", "cert_file", "key_file"):
        return Path(value)
    if name in ("max_sessions", "workers"):
        return _auto_or_positive(value)
    if name in ("port", "max_sessions_per_ip", "max_offers_per_minute",
                "max_concurrent_decodes", "max_decodes_per_ip",
                "malloc_arenas", "ray_replicas", "ray_min_replicas", "ray_max_replicas",
                "max_avatar_side"):
        return int(value)
    if name in ("max_upload_mb", "connect_timeout_s", "disconnect_grace_s", "peer_timeout_s",
                "max_session_s", "say_timeout_s", "keepalive_timeout_s", "turn_ttl_s",
                "ray_cpus_per_replica", "ray_gpus_per_replica", "max_avatar_seconds", "upload_timeout_s",
                "min_upload_rate_kb", "drain_s", "capacity_headroom"):
        return _finite(float(value))
    return value


def _auto_or_positive(value: str | int) -> int:
    """`auto` -> 0 (measured / one per core), else a number >= 1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    number = int(value)
    if number < 1:
        raise ValueError(f"{value!r}: expected auto or a number >= 1")
    return number


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    return value
