"""`lipsync serve`: the real-time server (same flags as run_server.py)."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from server.config import ServerConfig

    parser = subparsers.add_parser(
        "serve", help="serve the web page and WebRTC lip-sync sessions",
        description="Serve the lip-sync page and API. Every flag also reads LIPSYNC_<FLAG> from the "
                    "environment (e.g. LIPSYNC_PORT=9000); flags win.")
    ServerConfig.add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from server.config import ServerConfig
    from server.runner import serve

    try:
        config = ServerConfig.from_args(args)
    except ValueError as exc:
        print(f"lipsync serve: {exc}")
        return 2
    if getattr(args, "verbose", False):
        config.log_level = "debug"
    return serve(config)
