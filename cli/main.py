"""`lipsync`: the command-line front door (render, prepare-avatar, serve, avatars, doctor).

Each subcommand lives in its own module with `add_parser(subparsers)` and `run(args) -> int`;
they are imported lazily so `lipsync --help` stays instant (torch and PyAV load only when needed).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

SUBCOMMANDS = {
    "render": "cli.render",
    "prepare-avatar": "cli.prepare_avatar",
    "serve": "cli.serve",
    "avatars": "cli.avatars",
    "doctor": "cli.doctor",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync", description="Real-time and offline Wav2Lip lip-sync.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # Each module's add_parser adds its own subparser (named as in SUBCOMMANDS) to `subparsers`.
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, module_name in SUBCOMMANDS.items():
        if wanted is None or name == wanted:
            importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    run: Callable[[argparse.Namespace], int] = importlib.import_module(SUBCOMMANDS[args.command]).run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
