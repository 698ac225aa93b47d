"""`lipsync prepare-avatar in.mp4 -o avatars/name`: detect, smooth and cache an avatar once.

The output folder is what `prepare_avatar("avatars/name")` (and `--avatar avatars/name` on the server)
loads directly, in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the avatar code is imported when the command runs
    from realtime.avatars.avatar import AvatarConfig

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prepare-avatar", help="prepare a face video or photo as an avatar (detect once, save)",
        description="Detect and smooth the face in a video or photo once and save the prepared avatar "
                    "(frames, face boxes, lip landmarks, masks, 96x96 Wav2Lip crops) to a folder.")
    p.add_argument("input", type=Path, help="face video (mp4, mov, webm, ...) or photo (jpg, png)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write the prepared avatar to")
    p.add_argument("--detector", choices=["auto", "mesh", "haar", "s3fd"], default="auto",
                   help="face detector (default auto: BlazeFace + face mesh when installed, else Haar)")
    p.add_argument("--s3fd-weights", type=Path, help="official s3fd.pth for --detector s3fd")
    p.add_argument("--device", default="cpu", help="torch device for --detector s3fd (cpu, cuda)")
    p.add_argument("--pads", type=int, nargs=4, default=[0, 10, 0, 0], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="padding around the face box (default: 0 10 0 0, as the official tool)")
    p.add_argument("--nosmooth", action="store_true", help="do not smooth face boxes over time")
    p.add_argument("--loop", choices=["pingpong", "forward"], default="pingpong",
                   help="how the loop plays: forward then backward (default, never jumps) or forward")
    p.add_argument("--max-height", type=int, default=720,
                   help="downscale larger inputs to fit this height (16:9 width; default 720)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="use at most this much of a video")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate for a photo (default 25)")
    p.add_argument("--still-seconds", type=float, default=4.0,
                   help="seconds of idle motion made from a photo (0: one still frame)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the avatar cache")
    p.add_argument("--cache-dir", type=Path, help="cache folder (default $LIPSYNC_CACHE_DIR or "
                                                  "~/.cache/lipsync/avatars)")


def _config(args: argparse.Namespace) -> AvatarConfig:
    from realtime.avatars.avatar import AvatarConfig

    return AvatarConfig(detector=args.detector, s3fd_weights=args.s3fd_weights, device=args.device,
                        pads=tuple(args.pads), smooth=not args.nosmooth, loop=args.loop,
                        max_height=args.max_height, max_width=round(args.max_height * 16 / 9),
                        max_seconds=args.max_seconds, fps=args.fps, still_seconds=args.still_seconds)


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def is_prepared_avatar(folder: Path) -> bool:
    """A folder written by save_avatar: its header names the avatar format, and it holds nothing else
    than what save_avatar writes."""
    from realtime.avatars import avatar_cache

    header = folder / avatar_cache.HEADER
    try:
        meta = json.loads(header.read_text())
    except (OSError, ValueError):
        return False
    expected = {avatar_cache.HEADER} | {f"{name}.npy" for name in avatar_cache.ARRAYS}
    return (isinstance(meta, dict) and meta.get("format") == avatar_cache.FORMAT
            and all(entry.name in expected for entry in folder.iterdir()))


def run(args: argparse.Namespace) -> int:
    from cli.progress import Progress
    from realtime.avatars.avatar import AvatarError
    from realtime.avatars.avatar_prepare import prepare_avatar, save_avatar

    if args.output.exists() and not args.output.is_dir():
        print(f"lipsync prepare-avatar: -o {args.output}: exists and is not a folder", file=sys.stderr)
        return 2
    if args.output.is_dir() and any(args.output.iterdir()) and not is_prepared_avatar(args.output):
        # save_avatar replaces the folder: never let a typo in -o delete someone's files.
        print(f"lipsync prepare-avatar: -o {args.output}: a folder that is not empty and is not a prepared "
              "avatar; choose a new or empty folder (a prepared avatar's folder is replaced)", file=sys.stderr)
        return 2
    if args.output.resolve() == args.input.resolve():
        print("lipsync prepare-avatar: the output folder must differ from the input", file=sys.stderr)
        return 2
    if not args.input.exists():
        print(f"lipsync prepare-avatar: {args.input}: no such file", file=sys.stderr)
        return 1
    start = time.perf_counter()
    bar = Progress(f"preparing {args.input.name}", 1)
    try:
        with bar:
            def progress(done: int, total: int) -> None:
                bar.total = max(total, done, 1)
                bar.update(done - bar.done)

            avatar = prepare_avatar(args.input, config=_config(args), cache_dir=args.cache_dir,
                                    progress=progress, use_cache=not args.no_cache, write_cache=False)
        save_avatar(avatar, args.output, {"input": str(args.input)})
    except AvatarError as exc:
        print(f"lipsync prepare-avatar: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lipsync prepare-avatar: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    w, h = avatar.size
    print(f"wrote {args.output} ({len(avatar)} frames {w}x{h} at {avatar.fps:.2f} fps, "
          f"{'with' if avatar.mouth is not None else 'without'} lip landmarks, loop {avatar.loop}, "
          f"{_folder_size(args.output) / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")
    return 0
