"""`--workers N`: N front-end processes behind one HTTP port, each session living in one of them.

One process is one event loop and one GIL: about one and a half cores, whatever the machine has. So the
server runs N worker processes (the whole server: engine, sessions, peer connections, encoders) under a
supervisor that owns the port and hands each accepted TCP connection to the right worker:

- **Hand-over, not proxying.** The supervisor accepts a connection, *peeks* at its request line
  (`MSG_PEEK`: nothing is consumed) and sends the socket itself to a worker over a Unix SOCK_SEQPACKET
  channel (`socket.send_fds`, SCM_RIGHTS); the worker serves it with aiohttp as if it had accepted it
  (`loop.connect_accepted_socket`). Bytes never pass through the supervisor, WebSocket and SSE included.
  Workers answer with `Connection: close`, so every request arrives on a new connection and is routed
  on its own (the API is a few requests per session; a kept-alive connection could carry a request for
  another worker's session).
- **Routing.** A session's id starts with its worker's tag, `w<index>g<generation>-...` (after
  `--instance-id` when one is given: `<id>.w1g0-...`), so `/sessions/{id}/...` goes to the process that
  owns it. A visitor's first `POST /offer` goes to the worker with the most free slots on the shared board
  (server/ops/worker_board.py: each worker publishes its measured free slots every 100 ms), which becomes its
  home: its later offers and `/ice-servers` go there too, so per-address limits hold across workers
  (server/access/visitor_homes.py). Anything else round-robin (every worker serves the page, /config, /healthz,
  the avatars), passing over a worker that is stuck (silent on the board for SILENT_AFTER_S); the worker
  that takes `GET /sessions`, `/metrics` or a change to `/avatars` asks the others over their peer sockets
  for the whole server's answer (server/ops/worker_peers.py).
- **Restarts.** A worker that exits is started again (a new generation; back-off when it dies young).
  Its sessions died with it: their routes get `410 Gone` with the reason from the supervisor (their ids
  carry the old generation), the browser's peer connection fails, the other workers' sessions are
  untouched.
- **Ports.** `--udp-ports FIRST-LAST` is split into N contiguous ranges, one per worker.

Rendering: each worker renders its own sessions on its own render worker (the default renderer, or
Wav2Lip on the CPU), which is what holds the frame deadlines on a CPU machine: no hop, no copy (see
docs/scaling.md). A GPU must not be split into N private models: with --workers > 1, GPU rendering goes
through the shared Ray tier (`--render-backend ray`), one replica per GPU reached by every worker.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from multidict import CIMultiDict

from server.access.auth import ForwardedClients
from server.access.visitor_homes import VisitorHomes
from server.config import ServerConfig, device_list
from server.ops.worker_board import Board, worker_tag

log = logging.getLogger("server.ops.workers")

MAX_REQUEST_LINE = 8192        # bytes peeked for the request's head; longer: routed on what was read
REQUEST_LINE_TIMEOUT_S = 10.0  # a client that sends no request line in this long is dropped
MAX_PEEKING = 256              # connections waiting for their request line; more are handed over unread
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after deaths within YOUNG_S of a start
YOUNG_S = 10.0
_SESSION_PATH = re.compile(r"^/sessions/([A-Za-z0-9_.]+)-")
_TAG = re.compile(r"(?:^|\.)w(\d+)g(\d+)$")


def resolve_workers(config: ServerConfig) -> int:
    """The number of worker processes `config` asks for (auto: one per core where workers are possible);
    ValueError when an explicit N > 1 cannot work."""
    cores = len(os.sched_getaffinity(0))
    gpu_local = config.render_backend == "local" and config.checkpoint is not None and any(
        d != "cpu" for d in device_list(config.device))
    if config.workers == 0:
        if config.cert_file is not None or gpu_local:
            return 1
        n = cores
        if config.udp_ports is not None:
            n = min(n, config.udp_ports[1] - config.udp_ports[0] + 1)
        return max(1, n)
    n = config.workers
    if n > 1 and config.cert_file is not None:
        raise ValueError("--workers > 1 needs TLS terminated in front of the server (the supervisor routes "
                         "by the request line); drop --cert-file or use --workers 1")
    if n > 1 and gpu_local:
        raise ValueError("--workers > 1 with Wav2Lip on a GPU would load one model per worker on the same GPU: "
                         "use --render-backend ray (one replica per GPU shared by the workers), or --device cpu")
    if config.udp_ports is not None and config.udp_ports[1] - config.udp_ports[0] + 1 < n:
        raise ValueError(f"--udp-ports {config.udp_ports[0]}-{config.udp_ports[1]}: fewer ports than --workers {n}")
    if len(config.instance_id) > 24:
        raise ValueError("--instance-id: at most 24 characters with --workers (the worker tag follows it)")
    return n


def split_ports(ports: tuple[int, int] | None, n: int) -> list[tuple[int, int] | None]:
    """`ports` in `n` contiguous ranges, as even as can be (None: any port for each)."""
    if ports is None:
        return [None] * n
    first, last = ports
    count = last - first + 1
    bounds = [first + count * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]


def worker_config(config: ServerConfig, index: int, generation: int, ports: tuple[int, int] | None,
                  workers: int) -> ServerConfig:
    tag = worker_tag(index, generation)
    return dataclasses.replace(config, instance_id=f"{config.instance_id}.{tag}" if config.instance_id else tag,
                               udp_ports=ports, workers=workers)


def owner_of(path: str) -> tuple[int, int] | None:
    """(worker, generation) named by a session route's id, None for any other path."""
    match = _SESSION_PATH.match(path)
    if match is None:
        return None
    tag = _TAG.search(match.group(1))
    return None if tag is None else (int(tag.group(1)), int(tag.group(2)))


@dataclass
class _Worker:
    index: int
    ports: tuple[int, int] | None
    generation: int = 0
    process: BaseProcess | None = None
    channel: socket.socket | None = None
    started: float = 0.0
    restart_at: float = 0.0  # when a dead worker is started again
    young_deaths: int = 0
    served: bool = False  # became ready at least once (a worker that never did failed to start)


WorkerTarget = Callable[[ServerConfig, int, int, socket.socket, Board], None]


@dataclass
class Supervisor:
    """Owns the listening socket and the workers; `run` serves until `stop` is set. `target` is what a
    worker process runs (`server.runner.worker_main`: the whole server on the handed-over connections)."""

    config: ServerConfig
    workers: int
    target: WorkerTarget | None = None
    board: Board = field(init=False)
    ended: dict[tuple[int, int], str] = field(default_factory=dict)  # (worker, generation) -> why it ended
    restarts: int = 0
    restart_delay_s: float = 0.0  # before the first restart of a worker that died old (tests set it)
    failed: str | None = None  # why the server stopped: a worker could not start (a bad setting, an
    #                            unreachable render tier): restarting it would only fail again
    _slots: list[_Worker] = field(default_factory=list)
    _next: int = 0
    _peeking: int = 0
    _serving: asyncio.Event = field(default_factory=asyncio.Event)  # set once a worker is ready

    def __post_init__(self) -> None:
        self.clients = ForwardedClients(self.config.trusted_proxies)
        self.homes = VisitorHomes(keep_s=self.config.max_session_s + self.config.connect_timeout_s + 60.0)
        self._per_address_limits = bool(self.config.max_sessions_per_ip or self.config.max_offers_per_minute)
        self._context = multiprocessing.get_context("spawn")
        self.board = Board(self.workers, self._context)
        ports = split_ports(self.config.udp_ports, self.workers)
        self._slots = [_Worker(i, ports[i]) for i in range(self.workers)]

    # -- processes --------------------------------------------------------------------------------------

    def pid(self, index: int) -> int | None:
        process = self._slots[index].process
        return None if process is None else process.pid

    def _start(self, worker: _Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = worker_config(self.config, worker.index, worker.generation, worker.ports, self.workers)
        self.board.starting(worker.index, worker.generation)
        assert self.target is not None, "a Supervisor that starts workers needs their target"
        process = self._context.Process(target=self.target, name=f"lipsync-worker-{worker.index}",
                                        args=(config, worker.index, worker.generation, child, self.board))
        process.start()
        child.close()
        parent.setblocking(False)
        worker.process, worker.channel, worker.started = process, parent, time.monotonic()
        log.info("worker %d started (pid %s, generation %d, udp ports %s)", worker.index, process.pid,
                 worker.generation, "any" if worker.ports is None else "%d-%d" % worker.ports)

    def _reap(self, worker: _Worker, now: float) -> None:
        """A worker that exited: its sessions end (their routes now get 410), a new one is scheduled."""
        process = worker.process
        assert process is not None
        code = process.exitcode
        row = self.board.row(worker.index)
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.ended[(worker.index, worker.generation)] = (
            f"the session's worker process exited ({how}); the server restarted it: start a new session")
        log.error("worker %d (pid %s) exited (%s): its %d session(s) ended; restarting it", worker.index,
                  process.pid, how, row.sessions)
        if worker.channel is not None:
            worker.channel.close()
        worker.process, worker.channel = None, None
        worker.young_deaths = worker.young_deaths + 1 if now - worker.started < YOUNG_S else 0
        delay = (RESTART_BACKOFF_S[min(worker.young_deaths, len(RESTART_BACKOFF_S) - 1)] if worker.young_deaths
                 else self.restart_delay_s)
        worker.restart_at = now + delay
        worker.generation += 1
        self.board.starting(worker.index, worker.generation)
        self.restarts += 1

    async def _watch(self, stop: asyncio.Event, drain: asyncio.Event) -> None:
        draining = False
        while not stop.is_set():
            now = time.monotonic()
            if drain.is_set() and not draining:  # SIGTERM: every worker drains (runner.drain_sessions)
                draining = True
                log.info("draining: every worker refuses new sessions and ends its live ones within --drain-s")
                for worker in self._slots:
                    if worker.process is not None and worker.process.exitcode is None:
                        worker.process.terminate()
            for worker in self._slots:
                if worker.process is not None and worker.process.exitcode is not None:
                    if draining:
                        self._retire(worker)
                    elif not worker.served:
                        self.failed = (f"worker {worker.index} exited before it served (exit code "
                                       f"{worker.process.exitcode}): see its log lines above")
                        log.error("%s; stopping the server", self.failed)
                        stop.set()
                        return
                    else:
                        self._reap(worker, now)
                if worker.process is None and now >= worker.restart_at and not draining:
                    self._start(worker)
            if draining and all(worker.process is None for worker in self._slots):
                stop.set()  # every worker drained and exited
                return
            ready = self._ready()
            for index in ready:
                self._slots[index].served = True
            if ready:
                self._serving.set()
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    def _retire(self, worker: _Worker) -> None:
        """A worker that exited while draining: not restarted."""
        log.info("worker %d drained and exited", worker.index)
        if worker.channel is not None:
            worker.channel.close()
        worker.process, worker.channel = None, None

    def _stop_workers(self, timeout_s: float) -> None:
        for worker in self._slots:
            if worker.process is not None and worker.process.exitcode is None:
                worker.process.terminate()  # SIGTERM: the worker shuts down like a single server
        deadline = time.monotonic() + timeout_s
        for worker in self._slots:
            if worker.process is not None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
                if worker.process.exitcode is None:
                    log.warning("worker %d did not stop in %g s: killing it", worker.index, timeout_s)
                    worker.process.kill()
                    worker.process.join(5)
            if worker.channel is not None:
                worker.channel.close()

    # -- routing ----------------------------------------------------------------------------------------

    def _ready(self) -> list[int]:
        return [r.index for r in self.board.rows()
                if r.ready and self._slots[r.index].channel is not None]

    def _answering(self, ready: list[int]) -> list[int]:
        """The ready workers that are not stuck (server/ops/worker_board.py: silent for SILENT_AFTER_S), for
        requests any worker may take; all of them when every one looks stuck (nothing better to do)."""
        rows = self.board.rows()
        live = [i for i in ready if not rows[i].stuck]
        return live or ready

    def route(self, method: str, path: str, client: str = "") -> int | tuple[int, str]:
        """The worker for a request, or (status, message) when the supervisor answers it itself. `client`:
        the visitor's address (behind a --trusted-proxy, the one the proxy names): its offers go to its
        home worker (server/access/visitor_homes.py), so per-address limits hold across workers."""
        ready = self._ready()
        owner = owner_of(path)
        if owner is not None:
            index, generation = owner
            if 0 <= index < self.workers:
                ended = self.ended.get((index, generation))
                if ended is not None or generation < self._slots[index].generation:
                    return 410, ended or "this session's worker process was restarted: start a new session"
                if index in ready:
                    return index
                return 503, "this session's worker process is not serving right now"
        if not ready:
            return 503, "no worker process is serving yet; retry shortly"
        ready = self._answering(ready)  # a stuck worker keeps its own sessions' routes, nothing else
        route = (method, path.split("?", 1)[0])
        if route in (("POST", "/offer"), ("GET", "/ice-servers")):  # both count against per-address limits
            rows = {r.index: r for r in self.board.rows()}

            def freest() -> int:
                return max(ready, key=lambda i: (rows[i].free_slots, -rows[i].sessions, -i))

            def generation_of(index: int) -> int | None:
                return self._slots[index].generation if index in ready else None

            if self._per_address_limits:
                target = self.homes.worker_for(client, time.monotonic(), generation_of, freest)
            else:
                target = freest()
            if route[1] == "/offer":
                self.board.took_offer(target)
            return target
        self._next = (self._next + 1) % len(ready)
        return ready[self._next]

    async def _request_head(self, conn: socket.socket) -> bytes | None:
        """The request's head (request line and headers), peeked: left unread for the worker; None if the
        client sent none in time. The headers name the visitor behind a proxy (X-Forwarded-For)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REQUEST_LINE_TIMEOUT_S
        while True:
            try:
                data = conn.recv(MAX_REQUEST_LINE, socket.MSG_PEEK)
            except BlockingIOError:
                if not await _readable(conn, deadline - loop.time()):
                    return None
                continue
            if not data:
                return None  # closed before a request
            end = data.find(b"\r\n\r\n")  # the head: request line and headers (X-Forwarded-For)
            if end >= 0:
                return data[:end]
            if len(data) >= MAX_REQUEST_LINE:
                return data  # too long: a worker answers it
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.01)  # part of a line: the rest is on its way (readable stays set)

    async def _handle(self, conn: socket.socket) -> None:
        self._peeking += 1
        try:
            line = await self._request_head(conn) if self._peeking <= MAX_PEEKING else b""
        finally:
            self._peeking -= 1
        if line is None:
            conn.close()
            return
        request_line, _, header_block = line.partition(b"\r\n")
        parts = request_line.decode("latin-1").split(" ")
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
        target = self.route(method, path, self._client_of(conn, header_block))
        if isinstance(target, tuple):
            await self._answer(conn, *target)
            return
        channel = self._slots[target].channel
        try:
            assert channel is not None
            socket.send_fds(channel, [b"c"], [conn.fileno()])
        except (OSError, AssertionError) as exc:
            if not isinstance(exc, AssertionError) and exc.errno not in (
                    errno.EAGAIN, errno.EPIPE, errno.ECONNREFUSED, errno.ECONNRESET):  # a worker just died
                log.exception("handing a connection to worker %d failed", target)
            await self._answer(conn, 503, "the worker process is busy or restarting; retry shortly")
            return
        conn.close()  # the worker holds its own descriptor now

    def _client_of(self, conn: socket.socket, header_block: bytes) -> str:
        """The visitor's address: the peer, or behind a --trusted-proxy the client its X-Forwarded-For
        names (the same rule as the workers' `auth.ForwardedClients`)."""
        try:
            peer = str(conn.getpeername()[0])
        except (OSError, IndexError):
            return ""
        if not self.clients.trusted:
            return peer
        headers: CIMultiDict[str] = CIMultiDict()
        for raw in header_block.split(b"\r\n"):
            name, sep, value = raw.decode("latin-1").partition(":")
            if sep:
                headers.add(name.strip(), value.strip())
        return self.clients.client_of(peer, headers)

    async def _answer(self, conn: socket.socket, status: int, message: str) -> None:
        """A JSON error written by the supervisor itself (410: the session ended; 503: no worker)."""
        reason = {410: "Gone", 503: "Service Unavailable"}[status]
        body = json.dumps({"error": message, "status": status}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                + ("Retry-After: 2\r\n" if status == 503 else "") + "\r\n").encode()
        try:
            await asyncio.get_running_loop().sock_sendall(conn, head + body)
        except OSError:
            pass
        finally:
            conn.close()

    async def _accept(self, listener: socket.socket, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[Any]] = set()
        while not stop.is_set():
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            task = loop.create_task(self._handle(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    # -- the whole ---------------------------------------------------------------------------------------

    async def run(self, listener: socket.socket, stop: asyncio.Event, started: asyncio.Future[int] | None = None,
                  drain: asyncio.Event | None = None, shutdown_timeout_s: float = 10.0) -> None:
        """Serve until `stop`; `drain` (SIGTERM) first lets every worker drain while routing goes on."""
        listener.setblocking(False)
        drain = drain or asyncio.Event()
        # The workers' peer sockets (server/ops/worker_peers.py): private to this user (mkdtemp: mode 0700).
        self.board.peers_dir = tempfile.mkdtemp(prefix="lipsync-workers-")
        watch = asyncio.get_running_loop().create_task(self._watch(stop, drain), name="workers-watch")
        accept: asyncio.Task[Any] | None = None
        try:
            # Until a worker serves, connections wait in the listen backlog.
            waits = [asyncio.ensure_future(self._serving.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            accept = asyncio.get_running_loop().create_task(self._accept(listener, stop), name="workers-accept")
            if started is not None and not started.done():
                started.set_result(listener.getsockname()[1])
            await stop.wait()
        finally:
            for task in (accept, watch):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*[t for t in (accept, watch) if t is not None], return_exceptions=True)
            sessions = sum(r.sessions for r in self.board.rows() if r.ready)
            await asyncio.to_thread(self._stop_workers, shutdown_timeout_s)
            listener.close()
            shutil.rmtree(self.board.peers_dir, ignore_errors=True)
            if sessions:
                log.info("the workers closed %d session(s) on shutdown", sessions)


async def _readable(conn: socket.socket, timeout_s: float) -> bool:
    """Wait until `conn` has bytes (or EOF) to read; False after `timeout_s`."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(conn.fileno(), ready.set)
    try:
        await asyncio.wait_for(ready.wait(), max(0.0, timeout_s))
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(conn.fileno())


def listen(config: ServerConfig) -> socket.socket:
    """The shared port, bound by the supervisor (the workers never bind it)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    sock.listen(1024)
    return sock
