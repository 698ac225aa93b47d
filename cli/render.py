"""`lipsync render`: face video/photo + speech -> synced mp4 (the official tool's job, done in-process).

Two renderers, as on the server: the built-in one (no weights, the default) and Wav2Lip (`--checkpoint`,
which implies `--renderer wav2lip`). Every expected failure (missing file, unreadable audio, no face,
bad checkpoint) prints one line naming the problem and returns a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILTIN_MAX_HEIGHT = 720  # the server's avatar size limit; the built-in path keeps every frame in memory


class Renderer(str, Enum):
    BUILTIN = "builtin"
    WAV2LIP = "wav2lip"


class UsageError(Exception):
    """A flag combination that cannot work; exit code 2, as argparse uses."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "render", help="lip-sync a face video or photo to a speech file (mp4 out)",
        description="Render a lip-synced mp4 (H.264 + AAC). Without a checkpoint the built-in renderer "
                    "(no weights, the server's default) deforms the face's own mouth; with --checkpoint "
                    "a Wav2Lip generator paints it.")
    p.add_argument("--face", required=True, type=Path, help="face video (mp4, mov, ...) or photo (jpg, png)")
    p.add_argument("--audio", required=True, type=Path, help="speech file (wav, mp3, ogg, or a video's audio)")
    p.add_argument("-o", "--output", type=Path, default=Path("results/result_voice.mp4"), help="output mp4")
    p.add_argument("--renderer", choices=[r.value for r in Renderer], default=None,
                   help="builtin (no weights; default) or wav2lip (needs --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="official wav2lip.pth or wav2lip_gan.pth (implies wav2lip)")
    p.add_argument("--pads", type=int, nargs=4, default=[0, 10, 0, 0], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="padding around detected faces (default: 0 10 0 0, as the official tool)")
    p.add_argument("--nosmooth", action="store_true", help="do not smooth face boxes over time")
    p.add_argument("--fps", type=float, default=25.0, help="output fps for a still photo (default 25)")
    p.add_argument("--max-height", type=int, default=None,
                   help=f"downscale taller inputs to this height (default: {BUILTIN_MAX_HEIGHT} for builtin, "
                        "none for wav2lip)")
    builtin = p.add_argument_group("builtin renderer")
    builtin.add_argument("--still-seconds", type=float, default=4.0,
                         help="seconds of idle head motion made from a photo, looped (0: frozen photo)")
    wav2lip = p.add_argument_group("wav2lip renderer")
    wav2lip.add_argument("--box", type=int, nargs=4, metavar=("Y1", "Y2", "X1", "X2"),
                         help="fixed face box instead of detection (-1 for the frame edge)")
    wav2lip.add_argument("--batch-size", type=int, default=None,
                         help="frames per generator batch (default 32 CPU, 128 GPU)")
    wav2lip.add_argument("--paste", choices=["official", "feather"], default="official",
                         help="official hard paste (parity) or a feathered, seamless blend")
    wav2lip.add_argument("--device", default="auto", help="auto, cpu or cuda (fp16)")
    wav2lip.add_argument("--mel-alignment", choices=["official", "training"], default="official",
                         help="where each frame's mel window starts: official (at the frame, as the official "
                              "inference script; default) or training (one frame earlier, as Wav2Lip's training "
                              "code)")


def chosen_renderer(args: argparse.Namespace) -> Renderer:
    """--renderer, else wav2lip when a checkpoint is given, else builtin; contradictions are errors."""
    if args.renderer is None:
        renderer = Renderer.WAV2LIP if args.checkpoint is not None else Renderer.BUILTIN
    else:
        renderer = Renderer(args.renderer)
    if renderer is Renderer.WAV2LIP and args.checkpoint is None:
        raise UsageError("--renderer wav2lip needs --checkpoint wav2lip_gan.pth (or leave out --renderer "
                         "to use the built-in renderer, which needs no weights)")
    if renderer is Renderer.BUILTIN and args.checkpoint is not None:
        raise UsageError("--checkpoint is for --renderer wav2lip; the built-in renderer uses no weights")
    if renderer is Renderer.BUILTIN and args.box is not None:
        raise UsageError("--box is for --renderer wav2lip; the built-in renderer needs the detected lips")
    return renderer


def run(args: argparse.Namespace) -> int:
    try:
        renderer = chosen_renderer(args)
    except UsageError as exc:
        return _fail(str(exc), 2)
    inputs = [("--face", args.face), ("--audio", args.audio)]
    if renderer is Renderer.WAV2LIP:
        inputs.append(("--checkpoint", args.checkpoint))
    for label, path in inputs:
        if not path.is_file():
            return _fail(f"{label} {path}: no such file", 2)
    if renderer is Renderer.BUILTIN:
        return _run_builtin(args)
    return _run_wav2lip(args)


def _fail(message: str, code: int) -> int:
    print(f"lipsync render: {message}", file=sys.stderr)
    return code


def _bar_callback(bar: Any) -> Any:
    def progress(done: int, total: int) -> None:
        bar.total = max(total, done, 1)
        bar.update(done - bar.done)
    return progress


def _run_builtin(args: argparse.Namespace) -> int:
    from cli.progress import PhaseBars
    from realtime.avatars.avatar import AvatarError
    from realtime.media_io import MediaError
    from realtime.offline_builtin import BuiltinRenderOptions, render_builtin
    from realtime.renderers.default import MissingLandmarksError

    options = BuiltinRenderOptions(pads=(args.pads[0], args.pads[1], args.pads[2], args.pads[3]),
                                   smooth=not args.nosmooth, fps=args.fps,
                                   max_height=args.max_height or BUILTIN_MAX_HEIGHT,
                                   still_seconds=args.still_seconds)
    bars = PhaseBars()
    try:
        with bars:
            summary = render_builtin(args.face, args.audio, args.output, options, progress=bars.update)
    except (MediaError, AvatarError, MissingLandmarksError) as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc}", 1)
    speed = summary.audio_seconds / max(summary.prepare_seconds + summary.render_seconds, 1e-9)
    print(f"wrote {args.output} ({summary.frames} frames, {summary.fps:.3f} fps, {summary.width}x{summary.height}, "
          f"{summary.seconds:.2f} s) with the built-in renderer, {speed:.1f}x real time")
    return 0


def _run_wav2lip(args: argparse.Namespace) -> int:
    from cli.progress import Progress
    from models.checkpoints import CheckpointError
    from models.wav2lip import load_wav2lip
    from realtime.audio.mel import MelAlignment
    from realtime.avatars.avatar import AvatarError
    from realtime.media_io import MediaError
    from realtime.offline import RenderOptions, render_video

    try:
        model = load_wav2lip(args.checkpoint, device=args.device)
        device = next(model.parameters()).device
        batch = args.batch_size or (128 if device.type == "cuda" else 32)
        options = RenderOptions(box=tuple(args.box) if args.box else None, pads=tuple(args.pads),
                                smooth=not args.nosmooth, fps=args.fps, batch_size=batch,
                                max_height=args.max_height, paste=args.paste,
                                mel_alignment=MelAlignment(args.mel_alignment))
        bar = Progress("rendering", 1)
        with bar:
            summary = render_video(args.face, args.audio, model, args.output, options, _bar_callback(bar))
    except (CheckpointError, MediaError, AvatarError) as exc:
        return _fail(str(exc), 1)
    print(f"wrote {args.output} ({summary['frames']} frames, {summary['fps']:.3f} fps, "
          f"{summary['width']}x{summary['height']}, {summary['seconds']:.2f} s) on {device}")
    return 0
