"""Memory and load time per avatar in a server's avatar library (realtime/avatars/avatar_library.py).

    python bench/avatars.py [--avatars 3] [--seconds 10] [--wav2lip]

1. Makes `--avatars` different 720p face videos of `--seconds` (the embedded avatar's moving head on a
   1280x720 canvas, each with its own background, so each is a different file and a different avatar).
2. Prepares them once in a child process (face tracking, JPEG frames, cache written), timing each.
3. In a fresh child process: a RealtimeEngine with the built-in renderer (embedded default avatar), then
   adds the avatars one by one from the cache as a server start with --avatars does, and reads the RSS
   (VmRSS) after each: the RSS per added avatar includes the frames (JPEG), crops, masks, landmarks and
   the built-in renderer's per-avatar lip geometry; then again with every avatar's small cache of decoded
   frames full, as while sessions play it. Also: the time to load one prepared avatar, and the decode
   time of one 720p frame (what every shown frame costs).
4. With --wav2lip: the Wav2Lip renderer (random weights, CPU, PyTorch fp32) prepares one of those
   avatars, and its cached encoder features are measured (RSS and the cache's own bytes).

Last line: one JSON object: rss_mb_per_avatar (list), rss_mb_per_avatar_mean, rss_mb_per_avatar_playing,
load_s (list), raw_frames_mb
(what raw frames would take), held_mb (the avatar's own arrays), decode_ms_per_frame, prepare_s (list), and
with --wav2lip wav2lip_cache_mb / wav2lip_rss_mb. Run on a shared machine the times are noisy; the
memory figures are not.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH, HEIGHT, FPS = 1280, 720, 25.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def make_clips(folder: Path, count: int, seconds: float) -> list[Path]:
    """`count` 720p face videos, each in its own folder (one --avatars source each)."""
    import cv2

    from realtime.avatars.avatar import loop_index
    from realtime.avatars.default_avatar import load_default_avatar
    from realtime.media_io import Mp4Writer

    source = load_default_avatar().frames
    n = round(seconds * FPS)
    clips = []
    for k in range(count):
        tint = np.array([(40 * k) % 200 + 30, 120, 200 - (50 * k) % 180], np.uint8)
        path = folder / f"avatar{k}" / f"presenter{k}.mp4"
        path.parent.mkdir(parents=True)
        with Mp4Writer(path, WIDTH, HEIGHT, FPS) as out:
            canvas = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            for t in range(n):
                face = cv2.resize(np.ascontiguousarray(source[loop_index(t, len(source))]), (HEIGHT, HEIGHT),
                                  interpolation=cv2.INTER_LINEAR)
                canvas[:] = tint
                x = (WIDTH - HEIGHT) // 2 + round(40 * np.sin(2 * np.pi * t / n))  # the framing drifts
                canvas[:, x:x + HEIGHT] = face
                out.write(canvas)
        clips.append(path)
    return clips


def prepare_phase(clips: list[Path], cache: Path) -> dict:
    """Fill the cache (what a first start does); seconds per avatar."""
    from realtime.avatars.avatar import AvatarConfig
    from realtime.avatars.avatar_prepare import prepare_avatar

    seconds = []
    for clip in clips:
        t0 = time.perf_counter()
        prepare_avatar(clip, config=AvatarConfig(encode_frames=True), cache_dir=cache)
        seconds.append(round(time.perf_counter() - t0, 2))
    return {"prepare_s": seconds}


def measure_phase(clips: list[Path], cache: Path, wav2lip: bool) -> dict:
    from realtime.avatars.default_avatar import load_default_avatar
    from realtime.renderers.default import DefaultRenderer
    from server.realtime_engine import RealtimeEngine

    engine = RealtimeEngine(load_default_avatar(), DefaultRenderer(), info={"avatar": "default"},
                            avatar_cache_dir=cache)
    gc.collect()
    before = rss_mb()
    base = before
    per_avatar, load_s = [], []
    for clip in clips:
        t0 = time.perf_counter()
        (entry,) = engine.avatars.add_folder(clip.parent)
        load_s.append(round(time.perf_counter() - t0, 3))
        assert entry.avatar is not None, entry.error
        gc.collect()
        now = rss_mb()
        per_avatar.append(round(now - before, 1))
        before = now
    # Playing: each avatar's shared cache of decoded frames full (what sessions on it add).
    for added in engine.avatars.entries()[1:]:
        for i in range(len(added.avatar.frames)):
            added.avatar.frames[i]
    gc.collect()
    playing_mb = (rss_mb() - base) / len(clips)
    avatar = entry.avatar
    frames = avatar.frames
    t0 = time.perf_counter()
    for i in range(len(frames)):
        frames._decode(i)  # type: ignore[union-attr]  # uncached: what a miss costs
    decode_ms = 1000 * (time.perf_counter() - t0) / len(frames)
    w, h = avatar.size
    out = {
        "avatars": len(clips), "frames": len(frames), "size": f"{w}x{h}",
        "rss_mb_engine": round(base, 1),
        "rss_mb_per_avatar": per_avatar,
        "rss_mb_per_avatar_mean": round(float(np.mean(per_avatar)), 1),
        "rss_mb_per_avatar_playing": round(playing_mb, 1),
        "load_s": load_s,
        "held_mb": round(avatar.nbytes / 2**20, 1),
        "jpeg_mb": round(frames.nbytes / 2**20, 1),
        "raw_frames_mb": round(len(frames) * w * h * 3 / 2**20, 1),
        "decode_ms_per_frame": round(decode_ms, 2),
    }
    if wav2lip:
        out.update(measure_wav2lip(avatar))
    engine.close()
    return out


def measure_wav2lip(avatar) -> dict:
    """Wav2Lip's per-avatar cache for this avatar (random weights; the sizes do not depend on them)."""
    import torch

    from bench.common import realistic_random_wav2lip
    from realtime.renderers.wav2lip import Wav2LipRenderer

    torch.set_num_threads(2)
    renderer = Wav2LipRenderer(realistic_random_wav2lip(), device="cpu", runtime="torch", precision="fp32")
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    renderer.prepare(avatar)
    prepare_s = time.perf_counter() - t0
    gc.collect()
    cache = renderer._caches[avatar]
    return {"wav2lip_cache_mb": round(cache.nbytes / 2**20, 1),
            "wav2lip_cache_heads": bool(cache.heads),
            "wav2lip_rss_mb": round(rss_mb() - before, 1),
            "wav2lip_prepare_s": round(prepare_s, 1)}


def child(phase: str, clips: list[Path], cache: Path, wav2lip: bool) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--cache", str(cache), *(["--wav2lip"] if wav2lip else []),
           "--clips", *map(str, clips)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--avatars", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--wav2lip", action="store_true", help="also measure Wav2Lip's per-avatar cache")
    parser.add_argument("--phase", choices=["prepare", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--clips", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase == "prepare":
        print(json.dumps(prepare_phase(args.clips, args.cache)))
        return 0
    if args.phase == "measure":
        print(json.dumps(measure_phase(args.clips, args.cache, args.wav2lip)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-avatars-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        clips = make_clips(folder, args.avatars, args.seconds)
        print(f"made {len(clips)} clips of {args.seconds:g} s {WIDTH}x{HEIGHT} in {time.perf_counter() - t0:.1f} s",
              flush=True)
        prepared = child("prepare", clips, folder / "cache", False)
        print(f"prepared (cache filled): {prepared['prepare_s']} s", flush=True)
        measured = child("measure", clips, folder / "cache", args.wav2lip)
    result = {**measured, **prepared}
    print(f"RSS per added avatar: {result['rss_mb_per_avatar']} MB (raw frames would be "
          f"{result['raw_frames_mb']} MB); load {result['load_s']} s; decode {result['decode_ms_per_frame']} ms/frame")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
