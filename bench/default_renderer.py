"""Per-frame cost of the no-weights default renderer on one core, and an mp4 of it speaking.

    python bench/default_renderer.py [--repeats 7] [--text "..."]          # timing, JSON on the last line
    python bench/default_renderer.py --mp4 out.mp4 [--audio speech.wav | --text "..."]

Timing: the default avatar (512 px), mel windows of an espeak-ng sentence (a formant-synthesised
vowel sequence when espeak-ng is missing), OpenCV and torch limited to one thread, `render` called in
batches of 8 as the engine does. Every number is the minimum over `--repeats` runs (the machine is
shared, so the minimum is the honest cost), in milliseconds per frame:
    cpu_ms_per_frame         render() per output frame of the clip (pauses included)
    cpu_ms_per_speech_frame  render() per frame whose mouth is open (the work the engine actually asks for)
    params_ms_per_frame      the audio -> mouth parameters part alone (mouth_params.PARAMS)
    paste_ms_per_frame       the compositor's feathered paste of the patch (engine cost, not renderer)

    python bench/default_renderer.py --stages [--root PATH] [--repeats 7]

`--stages`: each per-frame step of a session's media work alone, on one thread, thread CPU per video
frame (minimum over `--repeats` passes over the clip): `params_b1` and `render_b1` (mouth parameters,
and the whole render, one frame per call: the live render worker's batches are of 1-2 frames),
`warp` (mouth_warp alone), `paste` (compositor.paste, its result dropped as the server drops it),
`frame_build` (the track's pasted image -> yuv420p av.VideoFrame), `vp8` (the server's VP8 encoder, a
fresh one per pass, aiortc's 500 kb/s) and `opus` (two 20 ms frames); `media_total` is render_b1 +
paste + frame_build + vp8 + opus. `--root` measures another checkout's realtime/ and server/ (e.g. a
copy of main: `git archive main | tar -x -C /tmp/main-ref`) with this bench, so runs of both can be
interleaved.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _code_root(argv: list[str]) -> Path:
    """The checkout whose realtime/ and server/ are measured (`--root`, before anything is imported)."""
    for i, arg in enumerate(argv):
        if arg == "--root" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if arg.startswith("--root="):
            return Path(arg.split("=", 1)[1]).resolve()
    return ROOT


CODE_ROOT = _code_root(sys.argv[1:]) if __name__ == "__main__" else ROOT
sys.path.insert(0, str(CODE_ROOT))

from bench.common import espeak_or_vowels  # noqa: E402  (after the measured checkout is on the path)
from realtime.audio.mel import SAMPLE_RATE  # noqa: E402
from realtime.media_io import load_audio  # noqa: E402
from realtime.offline_builtin import frame_windows, render_avatar_speech  # noqa: E402
from realtime.renderers.compositor import paste  # noqa: E402
from realtime.renderers.default import DefaultRenderer  # noqa: E402

log = logging.getLogger("bench.default_renderer")

TEXT = "Hello, and welcome. This is a short test of the lip sync engine, with a pause. And then some more speech."
BATCH = 8


def load_avatar():
    from realtime.avatars.avatar import AvatarError
    from realtime.avatars.default_avatar import load_default_avatar

    try:
        return load_default_avatar()
    except AvatarError as exc:  # fall back to the tests' synthetic 512 px face
        log.warning("default avatar unavailable (%s): using the synthetic test face", exc)
        sys.path.insert(0, str(ROOT / "tests"))
        from test_default_renderer import synthetic_avatar

        return synthetic_avatar(n_frames=12, size=512)


def _min_time(fn, repeats: int, clock=time.perf_counter) -> float:
    """The shortest of `repeats` runs of `fn` by `clock` (wall time; `time.thread_time` for thread CPU)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def measure(avatar=None, wav: np.ndarray | None = None, repeats: int = 7) -> dict:
    """Single-thread cost figures (see the module docstring); also usable from bench/engine.py."""
    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)  # nothing here uses torch; keep a stray import from using 16 threads
    except ImportError:
        pass
    avatar = avatar if avatar is not None else load_avatar()
    wav = wav if wav is not None else espeak_or_vowels(TEXT)
    renderer = DefaultRenderer()
    windows = frame_windows(wav, float(avatar.fps), renderer.traits.audio_needs)  # cut as the engine cuts them
    indices = np.array([avatar.frame_index(k) for k in range(len(windows))])
    renderer.prepare(avatar)
    params = renderer.params(windows)
    speaking = params[:, 0] >= 0.05
    n, n_speech = len(windows), int(speaking.sum())

    def render_all(idx: np.ndarray, mels: np.ndarray) -> list:
        out = []
        for s in range(0, len(idx), BATCH):
            out.extend(renderer.render(avatar, idx[s:s + BATCH], mels[s:s + BATCH]))
        return out

    render_all(indices[:BATCH], windows[:BATCH])  # warm caches
    all_s = _min_time(lambda: render_all(indices, windows), repeats)
    speech_s = _min_time(lambda: render_all(indices[speaking], windows[speaking]), repeats)
    params_s = _min_time(lambda: [renderer.params(windows[s:s + BATCH]) for s in range(0, n, BATCH)], repeats)
    patches = render_all(indices, windows)
    def paste_all() -> None:  # each result dropped, as the server drops it (a list of all would page-fault)
        for i, p in zip(indices, patches, strict=True):
            paste(avatar.frames[i], p)

    paste_s = _min_time(paste_all, repeats)
    h, w = avatar.frames.shape[1:3]
    y1, y2, x1, x2 = renderer.patch_box(avatar, 0)
    return {
        "renderer": "default",
        "frame_size": f"{w}x{h}",
        "patch_size": f"{x2 - x1}x{y2 - y1}",
        "frames": n,
        "speech_frames": n_speech,
        "threads": 1,
        "repeats": repeats,
        "cpu_ms_per_frame": round(1000 * all_s / n, 3),
        "cpu_ms_per_speech_frame": round(1000 * speech_s / max(n_speech, 1), 3),
        "params_ms_per_frame": round(1000 * params_s / n, 3),
        "paste_ms_per_frame": round(1000 * paste_s / n, 3),
        "cpus": os.cpu_count(),
    }


def _thread_min(fn, repeats: int) -> float:
    return _min_time(fn, repeats, time.thread_time)


def stages(repeats: int = 7) -> dict:
    """Thread CPU per video frame of each media step alone (see the module docstring, `--stages`)."""
    import fractions

    import av

    from server.media.encoders import RealtimeVp8Encoder
    from server.media.opus_encoder import RealtimeOpusEncoder
    from server.media.tracks import VIDEO_TIME_BASE, video_frame

    cv2.setNumThreads(1)
    avatar = load_avatar()
    wav = espeak_or_vowels(TEXT)
    renderer = DefaultRenderer()
    windows = frame_windows(wav, float(avatar.fps), renderer.traits.audio_needs)
    indices = np.array([avatar.frame_index(k) for k in range(len(windows))])
    renderer.prepare(avatar)
    n = len(windows)
    params = renderer.params(windows)
    patches = renderer.render_params(avatar, indices, params)
    frames = [avatar.frames[i] for i in indices]
    images = [paste(f, p) for f, p in zip(frames, patches, strict=True)]
    pcm = np.clip(wav * 32767.0, -32768, 32767).astype(np.int16)
    audio_frames = []
    for j in range(2 * n):
        chunk = np.resize(pcm[320 * j:320 * (j + 1)], 320).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, 320 * j, fractions.Fraction(1, 16000)
        audio_frames.append(frame)

    def vp8() -> None:
        encoder = RealtimeVp8Encoder()
        for k, image in enumerate(images):
            frame = video_frame(image)
            frame.pts, frame.time_base = k * 3600, VIDEO_TIME_BASE
            encoder.encode(frame)

    def opus() -> None:
        encoder = RealtimeOpusEncoder()
        for frame in audio_frames:
            encoder.encode(frame)

    def each(fn) -> None:
        for k in range(n):
            fn(k)

    build_s = _thread_min(lambda: each(lambda k: video_frame(images[k])), repeats)
    steps = {
        "params_b1": _thread_min(lambda: each(lambda k: renderer.params(windows[k:k + 1])), repeats),
        "render_b1": _thread_min(lambda: each(lambda k: renderer.render(avatar, indices[k:k + 1],
                                                                        windows[k:k + 1])), repeats),
        "warp": _thread_min(lambda: renderer.render_params(avatar, indices, params), repeats),
        "paste": _thread_min(lambda: each(lambda k: paste(frames[k], patches[k])), repeats),
        "frame_build": build_s,
        "vp8": _thread_min(vp8, repeats) - build_s,  # its frames are built in the pass: not the encoder's
        "opus": _thread_min(opus, repeats),
    }
    ms = {k: round(1000.0 * v / n, 3) for k, v in steps.items()}
    ms["media_total"] = round(sum(ms[k] for k in ("render_b1", "paste", "frame_build", "vp8", "opus")), 3)
    return {"root": str(CODE_ROOT), "frames": n, "repeats": repeats, "threads": 1,
            "ms_per_frame": ms, "loadavg_1min": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--text", default=TEXT, help="sentence for espeak-ng")
    parser.add_argument("--audio", type=Path, help="speech file for --mp4 (any format PyAV reads)")
    parser.add_argument("--mp4", type=Path, help="render this mp4 instead of timing")
    parser.add_argument("--stages", action="store_true", help="each media step alone, per video frame")
    parser.add_argument("--root", type=Path, help="measure this checkout's realtime/ and server/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.stages:
        result = stages(repeats=args.repeats)
        log.info("%s: %s ms per frame (load %.1f)", result["root"], result["ms_per_frame"], result["loadavg_1min"])
        print(json.dumps(result), flush=True)
        return 0
    if args.mp4 is not None:
        wav = load_audio(args.audio, SAMPLE_RATE) if args.audio is not None else espeak_or_vowels(args.text)
        avatar = load_avatar()
        renderer = DefaultRenderer()
        frames = render_avatar_speech(avatar, wav, args.mp4, renderer)
        p = renderer.params(frame_windows(wav, avatar.fps, renderer.traits.audio_needs))
        log.info("%s: %d frames, %.2f s; open mean %.2f max %.2f, frames open > 0.05: %d", args.mp4,
                 frames, frames / avatar.fps, p[:, 0].mean(), p[:, 0].max(), int((p[:, 0] > 0.05).sum()))
        return 0
    result = measure(repeats=args.repeats)
    log.info("default renderer at %s (patch %s), one thread: %.2f ms/frame, %.2f ms/speech frame "
             "(params %.3f, compositor paste %.3f ms/frame)", result["frame_size"], result["patch_size"],
             result["cpu_ms_per_frame"], result["cpu_ms_per_speech_frame"], result["params_ms_per_frame"],
             result["paste_ms_per_frame"])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
