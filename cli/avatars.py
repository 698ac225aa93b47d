"""`lipsync avatars list|add|remove --server URL`: a running server's avatars, for operators.

    lipsync avatars list   --server http://host:8080
    lipsync avatars add    FILE [--name NAME] [--no-wait] --server URL --token TOKEN
    lipsync avatars remove ID --server URL --token TOKEN

`add` uploads a video or photo (POST /avatars), then follows its preparation (GET /avatars/{id}) until it
is ready or failed, unless --no-wait. The token is the server's --api-token (also $LIPSYNC_API_TOKEN).
Plain HTTP from the standard library: nothing heavy is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

TOKEN_ENV = "LIPSYNC_API_TOKEN"


class ApiFailure(Exception):
    """The server answered with an error (its JSON message), or could not be reached."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("avatars", help="list, add or remove a running server's avatars",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the server's avatars")
    add = actions.add_parser("add", help="upload a video or photo as a new avatar")
    add.add_argument("file", type=Path, help="a face video (mp4, mov, webm) or photo (jpg, png)")
    add.add_argument("--name", help="display name (default: the file name)")
    add.add_argument("--no-wait", action="store_true", help="print the id and return without waiting")
    remove = actions.add_parser("remove", help="remove an avatar no session is using")
    remove.add_argument("id")
    for sub in (listing, add, remove):
        sub.add_argument("--server", default="http://127.0.0.1:8080", help="server URL (default %(default)s)")
        sub.add_argument("--token", help=f"operator token (the server's --api-token; default ${TOKEN_ENV})")
        sub.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for preparation")
    return parser


def call(server: str, method: str, path: str, token: str | None = None, body: Any = None,
         headers: dict[str, str] | None = None) -> Any:
    """One request; the decoded JSON answer, or ApiFailure with the server's message."""
    request = urllib.request.Request(server.rstrip("/") + path, data=body, method=method,
                                     headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise ApiFailure(f"{method} {path}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ApiFailure(f"cannot reach {server}: {getattr(exc, 'reason', exc)}") from None


def format_row(avatar: dict[str, Any]) -> str:
    size = f"{avatar['width']}x{avatar['height']}" if "width" in avatar else "-"
    frames = f"{avatar['frames']} @ {avatar['fps']:g} fps" if "frames" in avatar else "-"
    state = avatar["state"]
    if state == "preparing":
        state += f" {round(100 * avatar.get('progress', 0))}%"
    detail = avatar.get("error", "")
    return f"{avatar['id']:<28} {avatar['name'][:24]:<24} {state:<16} {size:<10} {frames:<16} {detail}".rstrip()


def run(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV)
    try:
        if args.action == "list":
            return list_avatars(args.server)
        if args.action == "add":
            return add_avatar(args.server, token, args.file, args.name, wait=not args.no_wait,
                              timeout_s=args.timeout)
        call(args.server, "DELETE", f"/avatars/{urllib.parse.quote(args.id, safe='')}", token)
        print(f"removed {args.id}")
        return 0
    except ApiFailure as exc:
        print(f"lipsync avatars {args.action}: {exc}", file=sys.stderr)
        return 1


def list_avatars(server: str) -> int:
    answer = call(server, "GET", "/avatars")
    print(f"{'ID':<28} {'NAME':<24} {'STATE':<16} {'SIZE':<10} {'FRAMES':<16}")
    for avatar in answer["avatars"]:
        mark = " (default)" if avatar["id"] == answer.get("default") else ""
        print(format_row(avatar) + mark)
    return 0


def add_avatar(server: str, token: str | None, file: Path, name: str | None, *, wait: bool,
               timeout_s: float) -> int:
    if not file.is_file():
        raise ApiFailure(f"{file}: no such file")
    query = urllib.parse.urlencode({"name": name or file.stem})
    with open(file, "rb") as body:
        answer = call(server, "POST", f"/avatars?{query}", token, body=body,
                      headers={"Content-Type": "application/octet-stream",
                               "Content-Length": str(file.stat().st_size)})
    avatar_id = answer["id"]
    print(f"uploaded {file.name}: id {avatar_id}, preparing")
    if not wait:
        return 0
    deadline = time.monotonic() + timeout_s
    last = -1
    while True:
        status = call(server, "GET", f"/avatars/{urllib.parse.quote(avatar_id, safe='')}")
        if status["state"] == "ready":
            print(f"{avatar_id}: ready ({status['width']}x{status['height']}, {status['frames']} frames "
                  f"at {status['fps']:g} fps)")
            return 0
        if status["state"] == "failed":
            print(f"{avatar_id}: failed: {status.get('error', '')}", file=sys.stderr)
            return 1
        percent = round(100 * status.get("progress", 0))
        if percent // 10 != last // 10:
            print(f"{avatar_id}: {percent}%")
            last = percent
        if time.monotonic() > deadline:
            raise ApiFailure(f"{avatar_id} still preparing after {timeout_s:g} s")
        time.sleep(0.5)
