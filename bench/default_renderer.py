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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import espeak_or_vowels
from realtime.audio.mel import SAMPLE_RATE
from realtime.media_io import load_audio
from realtime.offline_builtin import frame_windows, render_avatar_speech
from realtime.renderers.compositor import paste
from realtime.renderers.default import DefaultRenderer

ROOT = Path(__file__).resolve().parents[1]

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


def _min_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
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
    paste_s = _min_time(lambda: [paste(avatar.frames[i], p) for i, p in zip(indices, patches, strict=True)], repeats)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--text", default=TEXT, help="sentence for espeak-ng")
    parser.add_argument("--audio", type=Path, help="speech file for --mp4 (any format PyAV reads)")
    parser.add_argument("--mp4", type=Path, help="render this mp4 instead of timing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
