"""Run the server: load the engine once, serve until SIGINT/SIGTERM, then shut down gracefully."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl

from aiohttp import web

from server import heap
from server.app import create_app
from server.auth import OperatorAuth, RedactingAccessLogger
from server.capacity import measure_session_cost
from server.config import ServerConfig
from server.engine import Engine
from server.ice import is_loopback, use_host_addresses
from server.logs import setup_logging
from server.media_executor import start_default_executor
from server.realtime_engine import load_engine
from server.state import STATE
from server.udp_ports import port_range_loop_factory

log = logging.getLogger("server")


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(config.cert_file), str(config.key_file))
    return context


async def serve_async(config: ServerConfig, engine: Engine | None = None,
                      started: asyncio.Future | None = None,
                      stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or a signal arrives). `started` gets the bound port."""
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
        if own_engine:  # what one session of this engine costs here: the admission model's unit
            capacity = app[STATE].sessions.capacity
            capacity.calibrate(await measure_session_cost(engine, app[STATE].frame_pool))
            log.info("admitting up to %d session(s)", capacity.capacity(), extra=capacity.describe())
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0,
                               access_log=logging.getLogger("aiohttp.access"),
                               access_log_class=RedactingAccessLogger,
                               keepalive_timeout=config.keepalive_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context(config))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise RuntimeError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
        port = runner.addresses[0][1] if runner.addresses else config.port
        config.port = port
        log.info("serving %s", config.url, extra={
            "max_sessions": config.max_sessions or "auto", "ice_servers": len(config.ice_servers),
            "udp_ports": "any" if config.udp_ports is None else "%d-%d" % config.udp_ports})
        announce_operator_token(app[STATE].operator, config)
        if started is not None and not started.done():
            started.set_result(port)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
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


def announce_operator_token(operator: OperatorAuth, config: ServerConfig) -> None:
    """A generated operator token is printed once, to stdout and never to the log (like Jupyter)."""
    if operator.generated and operator.token:
        log.warning("bound to %s without --api-token: generated an operator token for GET /sessions, "
                    "/metrics and any session's routes (printed once on stdout; set --api-token or "
                    "LIPSYNC_API_TOKEN to choose it)", config.host)
        print(f"\n    Operator token (this run only): {operator.token}\n"
              f"    Use: Authorization: Bearer {operator.token}\n", flush=True)


def serve(config: ServerConfig) -> int:
    setup_logging(config.log_level, config.log_format)
    try:
        config.validate()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    heap.limit_arenas(config.malloc_arenas)  # before the media threads exist (server/heap.py)
    try:
        with asyncio.Runner(loop_factory=port_range_loop_factory(config.udp_ports)) as runner:
            start_default_executor(runner.get_loop())   # aiortc's encoders run there (server/media_executor.py)
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
