"""The deployment of deploy/ on loopback, for the tests: the real nginx, coturn and run_server.py.

Each program reads its file from deploy/ with only the name, the ports, the paths and the certificate
replaced (`render` fails when a string it replaces is gone, so the tests cannot drift from the files);
coturn gets one explicit override, `allowed-peer-ip=127.0.0.1`, because here the lip-sync server is on
loopback, which the shipped file denies (127.0.0.2 and the rest of the ranges stay denied).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
NAME = "avatar.test"  # the public name; Chromium maps it to 127.0.0.1 (--host-resolver-rules)
SECRET = "test-turn-secret-0123456789abcdef"


def need_program(name: str) -> str:
    """The program's path. Missing: a failure in CI (scripts/setup.sh --test installs it), a skip elsewhere."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)
    if path is None:
        message = f"{name} is not installed (scripts/setup.sh --test installs it: apt-get install nginx coturn)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def render(text: str, replacements: dict[str, str]) -> str:
    """`text` with each key replaced; a key that is not in it fails (the shipped file changed)."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the deploy file: update tests/deployment.py"
        text = text.replace(old, new)
    return text


def free_port(kind: int = socket.SOCK_STREAM, both: bool = False) -> int:
    """A port free on 127.0.0.1 (for TCP, or for TCP and UDP when `both`)."""
    for _ in range(200):
        port = random.randrange(20000, 39000)
        try:
            for k in ((socket.SOCK_STREAM, socket.SOCK_DGRAM) if both else (kind,)):
                with socket.socket(socket.AF_INET, k) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{proc.args[0]} is not listening on {port}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, within_s: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for NAME and 127.0.0.1, made with openssl."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={NAME}",
                    "-addext", f"subjectAltName=DNS:{NAME},IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@dataclass
class Nginx:
    port: int
    folder: Path
    proc: subprocess.Popen

    @property
    def access_log(self) -> str:
        return (self.folder / "lipsync.access.log").read_text(errors="replace")


@contextlib.contextmanager
def nginx(folder: Path, upstream_port: int, cert: Path, key: Path, site: str | None = None) -> Iterator[Nginx]:
    """deploy/nginx.conf (or `site`, a variant of it) on 127.0.0.1, proxying to `upstream_port`."""
    exe = need_program("nginx")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = render(site if site is not None else (DEPLOY / "nginx.conf").read_text(), {
        "listen 443 ssl http2;": f"listen 127.0.0.1:{port} ssl http2;",
        "server 127.0.0.1:8080;": f"server 127.0.0.1:{upstream_port};",
        "/etc/letsencrypt/live/avatar.example.org/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/avatar.example.org/privkey.pem": str(key),
        "/var/log/nginx/": f"{folder}/",
        "server_name avatar.example.org;": f"server_name {NAME};",
    })
    (folder / "lipsync.conf").write_text(text)
    # The main file Debian's /etc/nginx/nginx.conf would be: the site is included in the http context.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (folder / "nginx.conf").write_text(f"""{user}worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    access_log off;
    include {folder}/lipsync.conf;
}}
""")
    log = folder / "stderr.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, "-p", str(folder), "-c", str(folder / "nginx.conf")],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, log)
        yield Nginx(port, folder, proc)
    finally:
        stop(proc, signal.SIGQUIT)


@dataclass
class Coturn:
    port: int  # UDP and TCP
    tls_port: int
    folder: Path
    proc: subprocess.Popen

    @property
    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.folder.glob("turn*.log")))


@contextlib.contextmanager
def coturn(folder: Path, cert: Path, key: Path, secret: str = SECRET, allow_loopback: bool = True,
           extra: str = "") -> Iterator[Coturn]:
    """deploy/turnserver.conf listening and relaying on 127.0.0.1 only."""
    exe = need_program("turnserver")
    folder.mkdir(parents=True, exist_ok=True)
    port, tls_port = free_port(both=True), free_port()
    relay = random.randrange(50000, 64000)
    text = render((DEPLOY / "turnserver.conf").read_text(), {
        "listening-port=3478": f"listening-port={port}",
        "tls-listening-port=5349": f"tls-listening-port={tls_port}",
        "#listening-ip=203.0.113.10": "listening-ip=127.0.0.1\nrelay-ip=127.0.0.1",
        "min-port=49152": f"min-port={relay}",
        "max-port=49999": f"max-port={relay + 400}",
        "static-auth-secret=CHANGE-ME-openssl-rand-hex-32": f"static-auth-secret={secret}",
        "/etc/letsencrypt/live/turn.example.org/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/turn.example.org/privkey.pem": str(key),
        "/var/log/turnserver/turnserver.log": f"{folder}/turn.log",
        "/run/turnserver/turnserver.pid": f"{folder}/turnserver.pid",
        "turn.example.org": NAME,
    })
    if allow_loopback:
        # The one override: the lip-sync server is on loopback here. Only 127.0.0.1; the rest stays denied.
        text += "\n# tests: the server is on loopback\nallow-loopback-peers\nallowed-peer-ip=127.0.0.1\n"
    text += extra
    (folder / "turnserver.conf").write_text(text)
    log = folder / "stderr.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, "-c", str(folder / "turnserver.conf"), "--no-stdout-log"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, log)
        wait_for_port(tls_port, proc, log)
        yield Coturn(port, tls_port, folder, proc)
    finally:
        stop(proc)


@dataclass
class LipsyncServer:
    port: int
    proc: subprocess.Popen
    log: Path
    token: str | None = None
    args: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def lipsync_server(folder: Path, args: list[str], port: int | None = None,
                   env: dict[str, str] | None = None) -> Iterator[LipsyncServer]:
    """`python run_server.py ARGS` on 127.0.0.1 (embedded avatar, no-weights renderer), until the block
    ends; the generated operator token, if it printed one, is read from its output."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    udp = random.randrange(40000, 49000)
    log = folder / "server.log"
    full = ["--host", "127.0.0.1", "--port", str(port), "--ice-host-addresses", "127.0.0.1",
            "--udp-ports", f"{udp}-{udp + 199}", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "run_server.py"), *full], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = LipsyncServer(port, proc, log, args=full)
    try:
        deadline = time.monotonic() + 120
        while "serving http://" not in server.text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"run_server.py did not start ({proc.poll()}):\n{server.text()}")
            time.sleep(0.2)
        match = re.search(r"Operator token \(this run only\): (\S+)", server.text())
        server.token = match.group(1) if match else None
        yield server
    finally:
        stop(proc)
