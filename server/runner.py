"""Run the server: load the engine once, serve until SIGINT/SIGTERM, then shut down gracefully.

SIGINT stops at once; SIGTERM (systemd, a rolling restart) first drains (`drain_sessions`), and a
second SIGTERM stops at once."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import ssl
import time
from typing import Callable

from aiohttp import web

from server.access.auth import OperatorAuth, RedactingAccessLogger
from server.access.capacity import measure_session_cost
from server.app import create_app
from server.config import ServerConfig
from server.engine import Engine
from server.media.media_executor import start_default_executor
from server.network.ice import is_loopback, use_host_addresses
from server.ops import heap
from server.ops.event_loop import loop_factory
from server.ops.logs import setup_logging
from server.ops.peer_api import create_peer_app
from server.ops.worker_board import Board, WorkerSeat, publish_forever, receive_connections
from server.ops.worker_peers import WorkerPeers
from server.ops.workers import Supervisor, listen, resolve_workers
from server.realtime_engine import load_engine
from server.state import STATE, ServerState

log = logging.getLogger("server")


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(config.cert_file), str(config.key_file))
    return context


async def serve_async(config: ServerConfig, engine: Engine | None = None,
                      started: asyncio.Future[int] | None = None,
                      stop: asyncio.Event | None = None,
                      handoff: socket.socket | None = None, seat: WorkerSeat | None = None) -> None:
    """Serve until `stop` is set (or a signal arrives). `started` gets the bound port.

    As one of `--workers N` (server/ops/workers.py): `handoff` brings the connections the supervisor accepted
    on the shared port (nothing is bound here), `seat` is this worker's row on the shared board."""
    restore_ice = use_host_addresses(config.ice_host_addresses, add_loopback=is_loopback(config.host))
    own_engine = engine is None
    try:
        if engine is None:
            log.info("loading engine", extra={"device": config.device,
                                              "checkpoint": config.checkpoint or "none",
                                              "avatar": config.avatar or "embedded default"})
            engine = await asyncio.to_thread(load_engine, config)
        log.info("engine ready", extra=engine.info)
        app = create_app(config, engine)
        app[STATE].seat = seat
        if seat is not None:  # the other workers' sessions share the cores (server/access/capacity.py)
            app[STATE].sessions.capacity.others = seat.others_sessions
        if handoff is not None:  # one request per connection: the supervisor routes each on its own
            app.on_response_prepare.append(_close_connection)
        if own_engine:  # what one session of this engine costs here: the admission model's unit
            capacity = app[STATE].sessions.capacity
            capacity.calibrate(await measure_session_cost(engine, app[STATE].frame_pool))
            log.info("admitting up to %d session(s)", capacity.capacity(), extra=capacity.describe())
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0,
                               access_log=logging.getLogger("aiohttp.access"),
                               access_log_class=RedactingAccessLogger,
                               keepalive_timeout=config.keepalive_timeout_s)
        await runner.setup()
        stop = stop or asyncio.Event()
        peer_runner = await _start_peer_socket(app[STATE], seat)  # before this worker says it is ready
        worker_tasks = await _start_listening(runner, config, handoff, seat, stop)
        port = runner.addresses[0][1] if runner.addresses else config.port
        config.port = port
        log.info("serving %s", config.url, extra={
            "max_sessions": config.max_sessions or "auto", "ice_servers": len(config.ice_servers),
            "udp_ports": "any" if config.udp_ports is None else "%d-%d" % config.udp_ports})
        if seat is None:
            announce_operator_token(app[STATE].operator, config)
        if started is not None and not started.done():
            started.set_result(port)
        drain = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:  # the first drains, a second stops at once
            (stop if drain.is_set() else drain).set()

        for sig, handler in ((signal.SIGINT, stop.set), (signal.SIGTERM, on_sigterm)):
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        try:
            await _first(stop, drain)
            if drain.is_set() and not stop.is_set():
                await drain_sessions(app[STATE], config.drain_s, stop)
        finally:
            log.info("shutting down")
            for stop_worker_task in worker_tasks:
                stop_worker_task()
            if peer_runner is not None:
                await peer_runner.cleanup()
            await runner.cleanup()
    except BaseException as exc:
        if started is not None and not started.done():
            started.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
        raise
    finally:
        restore_ice()
        if own_engine and engine is not None:
            await asyncio.to_thread(engine.close)
        log.info("stopped")


async def _close_connection(request: web.Request, response: web.StreamResponse) -> None:
    """A worker's responses end their connection (aiohttp wrote its Connection header before this hook)."""
    response.force_close()
    if response.status != 101:  # a WebSocket's upgrade keeps its own
        response.headers["Connection"] = "close"


async def _start_peer_socket(state: ServerState, seat: WorkerSeat | None) -> web.AppRunner | None:
    """A worker of --workers N answers the other workers on its peer socket (server/ops/peer_api.py), and asks
    them through `state.peers` for the server-wide answers (server/ops/worker_peers.py)."""
    if seat is None or seat.board.peers_dir is None:
        return None
    peer_runner = web.AppRunner(create_peer_app(state), handle_signals=False, shutdown_timeout=1.0, access_log=None)
    await peer_runner.setup()
    await web.UnixSite(peer_runner, seat.board.peer_socket(seat.index)).start()
    state.peers = WorkerPeers(seat)
    # Uploads another worker kept while this one loaded (after its restore_uploads, before it was asked).
    state.engine.avatars.adopt_kept_uploads()
    return peer_runner


async def _start_listening(runner: web.AppRunner, config: ServerConfig, handoff: socket.socket | None,
                          seat: WorkerSeat | None, stop: asyncio.Event) -> list[Callable[[], object]]:
    """Bind the port, or (a worker) take the connections handed over; returns what stops the latter."""
    if handoff is None:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context(config))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise RuntimeError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
        return []
    assert runner.server is not None  # set by runner.setup()
    stops: list[Callable[[], object]] = [receive_connections(handoff, runner.server, ssl_context(config),
                                                             on_closed=stop.set)]
    if seat is not None:
        sessions = runner.app[STATE].sessions

        def publish() -> None:
            seat.board.publish(seat.index, sessions.free_slots(), sessions.held, sessions.max_sessions)

        sessions.on_change = publish  # at once on every change; the task below for the measured capacity
        task = asyncio.get_running_loop().create_task(publish_forever(publish), name="worker-board")
        stops.append(task.cancel)
    return stops


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def drain_sessions(state: ServerState, drain_s: float, stop: asyncio.Event) -> None:
    """A rolling restart loses no live session: refuse new ones (/healthz 503 "draining", /offer 503),
    tell the live ones (a `server_restarting` event on their WebSocket and event stream; GET /sessions/{id}
    carries `server_notice`, which the page shows), let them run
    until they end or `drain_s` passes (or `stop`: a second SIGTERM), then end them with that reason."""
    state.drain_until = time.monotonic() + drain_s
    log.info("draining: no new sessions; %d live session(s) may run up to %g s (SIGTERM again to stop now)",
             len(state.sessions), drain_s)
    notice = {"type": "server_restarting", "message": "the server is restarting", "ends_in_s": drain_s,
              "t": time.time()}
    for session in state.sessions:  # their /stream WebSocket and /events subscribers hear it now
        session.notify(notice)
    while len(state.sessions) and time.monotonic() < state.drain_until and not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), min(0.25, max(state.drain_until - time.monotonic(), 0.01)))
    if len(state.sessions):
        log.info("drained: ending %d session(s)", len(state.sessions))
        await state.sessions.close_all("server restarting")


def announce_operator_token(operator: OperatorAuth, config: ServerConfig) -> None:
    """A generated operator token is printed once, to stdout and never to the log (like Jupyter)."""
    if operator.generated and operator.token:
        reach = "a public name or trusted proxy" if is_loopback(config.host) else config.host
        log.warning("reachable through %s without --api-token: generated an operator token for GET "
                    "/sessions, /metrics and any session's routes (printed once on stdout; set --api-token "
                    "or LIPSYNC_API_TOKEN to choose it)", reach)
        print(f"\n    Operator token (this run only): {operator.token}\n"
              f"    Use: Authorization: Bearer {operator.token}\n", flush=True)


# -- --workers N (server/ops/workers.py) ----------------------------------------------------------------------


def worker_main(config: ServerConfig, index: int, generation: int, channel: socket.socket, board: Board) -> None:
    """A worker process (spawned by the Supervisor): the whole server, on the connections handed over on
    `channel`, its row `index` of `board`."""
    setup_logging(config.log_level, config.log_format)
    heap.limit_arenas(config.malloc_arenas)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM stops a worker
    seat = WorkerSeat(board, index, generation)
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.event_loop, config.udp_ports)) as runner:
            start_default_executor(runner.get_loop())
            runner.run(serve_async(config, handoff=channel, seat=seat))
    except Exception as exc:
        log.debug("worker %d failed", index, exc_info=True)
        log.error("worker %d cannot serve: %s", index, exc)
        raise SystemExit(1) from None


async def serve_workers_async(config: ServerConfig, workers: int, started: asyncio.Future[int] | None = None,
                              stop: asyncio.Event | None = None,
                              supervisor: asyncio.Future[Supervisor] | None = None) -> None:
    """Serve with `workers` processes behind the one port until `stop` (or SIGINT/SIGTERM).
    `started` gets the port, `supervisor` the Supervisor (tests kill its workers)."""
    operator = OperatorAuth.from_config(config)
    if operator.generated:  # one token for every worker, printed once
        config = dataclasses.replace(config, api_token=operator.token)
        announce_operator_token(operator, config)
    listener = listen(config)
    config.port = listener.getsockname()[1]
    boss = Supervisor(config, workers, worker_main)
    if supervisor is not None:
        supervisor.set_result(boss)
    stop = stop or asyncio.Event()
    drain = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:  # the first drains every worker, a second stops them at once
        (stop if drain.is_set() else drain).set()

    for sig, handler in ((signal.SIGINT, stop.set), (signal.SIGTERM, on_sigterm)):
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    log.info("serving %s with %d worker processes", config.url, workers)
    await boss.run(listener, stop, started, drain)
    if boss.failed is not None:
        raise RuntimeError(boss.failed)
    log.info("stopped")


def serve(config: ServerConfig) -> int:
    setup_logging(config.log_level, config.log_format)
    try:
        config.validate()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        workers = resolve_workers(config)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if workers > 1:
        try:
            with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
                runner.run(serve_workers_async(config, workers))
        except KeyboardInterrupt:
            pass
        except Exception as exc:
            log.error("cannot start: %s", exc)
            return 1
        return 0
    heap.limit_arenas(config.malloc_arenas)  # before the media threads exist (server/ops/heap.py)
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.event_loop, config.udp_ports)) as runner:
            start_default_executor(runner.get_loop())   # aiortc's encoders run there (server/media/media_executor.py)
            runner.run(serve_async(config))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a bad avatar, checkpoint or device: say what, without a traceback
        log.debug("startup failed", exc_info=True)
        log.error("cannot start: %s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python run_server.py` / `python -m server`."""
    parser = argparse.ArgumentParser(
        prog="run_server.py",
        description="Real-time lip-sync server. Every flag also reads LIPSYNC_<FLAG> from the "
                    "environment (e.g. LIPSYNC_PORT=9000); flags win.")
    ServerConfig.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = ServerConfig.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return serve(config)
