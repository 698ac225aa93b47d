"""`lipsync render`: face video/photo + speech -> synced mp4 (the official tool's job, done in-process)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("render", help="lip-sync a face video or photo to a speech file (mp4 out)",
                              description="Render a lip-synced mp4 with a Wav2Lip checkpoint.")
    p.add_argument("--face", required=True, type=Path, help="face video (mp4, mov, ...) or photo (jpg, png)")
    p.add_argument("--audio", required=True, type=Path, help="speech file (wav, mp3, ogg, or a video's audio)")
    p.add_argument("--checkpoint", required=True, type=Path, help="official wav2lip.pth or wav2lip_gan.pth")
    p.add_argument("-o", "--output", type=Path, default=Path("results/result_voice.mp4"), help="output mp4")
    p.add_argument("--box", type=int, nargs=4, metavar=("Y1", "Y2", "X1", "X2"),
                   help="fixed face box instead of detection (-1 for the frame edge)")
    p.add_argument("--pads", type=int, nargs=4, default=[0, 10, 0, 0], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="padding around detected faces (default: 0 10 0 0, as the official tool)")
    p.add_argument("--nosmooth", action="store_true", help="do not smooth face boxes over time")
    p.add_argument("--fps", type=float, default=25.0, help="output fps for a still photo (default 25)")
    p.add_argument("--batch-size", type=int, default=None, help="frames per generator batch (default 32 CPU, 128 GPU)")
    p.add_argument("--max-height", type=int, default=None, help="downscale taller inputs to this height")
    p.add_argument("--paste", choices=["official", "feather"], default="official",
                   help="official hard paste (parity) or a feathered, seamless blend")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (fp16)")
    p.add_argument("--mel-alignment", choices=["official", "training"], default="official",
                   help="where each frame's mel window starts: official (at the frame, as the official "
                        "inference script; default) or training (one frame earlier, as Wav2Lip's training code)")


def run(args: argparse.Namespace) -> int:
    from cli.progress import Progress
    from models.checkpoints import CheckpointError
    from models.wav2lip import load_wav2lip
    from realtime.media_io import MediaError
    from realtime.mel import MelAlignment
    from realtime.offline import RenderOptions, render_video

    for label, path in (("--face", args.face), ("--audio", args.audio), ("--checkpoint", args.checkpoint)):
        if not path.is_file():
            print(f"lipsync render: {label} {path}: no such file", file=sys.stderr)
            return 2
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
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.done)
            summary = render_video(args.face, args.audio, model, args.output, options, progress)
    except (CheckpointError, MediaError) as exc:
        print(f"lipsync render: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # detector errors etc. carry their own clear messages
        if type(exc).__name__ == "AvatarError":
            print(f"lipsync render: {exc}", file=sys.stderr)
            return 1
        raise
    print(f"wrote {args.output} ({summary['frames']} frames, {summary['fps']:.3f} fps, "
          f"{summary['width']}x{summary['height']}, {summary['seconds']:.2f} s) on {device}")
    return 0
