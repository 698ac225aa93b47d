"""Do the no-weights renderer's mouths say the sounds? espeak-ng speaks known material, the renderer
renders it, and the project's face mesh reads the rendered frames back.

    python bench/visemes.py [--label new] [--root PATH]        # JSON on the last line, strips of frames
    python bench/visemes.py --grid before new                   # before/after PNG grids of two runs
    python bench/visemes.py --grid before new --docs docs/img/visemes.png   # the README's grid
    python bench/visemes.py --webrtc [--webrtc-photo] [--root PATH]   # also over a real WebRTC session
    python bench/visemes.py --warp-cost PATH    # the warp's CPU ms per frame, PATH's mouth_warp.py vs this one

`--root` imports `realtime` (the renderer) from another checkout, e.g. a worktree of main, so today's
renderer and a new one are measured by the same code on the same material:
    git worktree add /tmp/main-ref-vis main
    python bench/visemes.py --root /tmp/main-ref-vis --label before
    python bench/visemes.py --label new && python bench/visemes.py --grid before new

Material (espeak-ng through its library, which reports each phoneme's start, so the bilabial
closures are timed from the synthesis): the vowels "ah", "ee", "oo" (at 80 words/min: sustained);
the syllables "ma", "pa", "ba", "fa"; and sentences. Each clip is rendered on the default avatar
(512 px) and on a photo (the default avatar's first frame scaled into a 1280x720 picture, prepared
like any photo), through the renderer's own `render` with the mel windows cut where its
`audio_needs` say (what the engine does), pasted by the compositor. The face mesh reads every
rendered frame and the avatar's own frame under it
(the neutral face, so idle head motion cancels). Per frame: mouth width (corners 61-291), inner lip gap
(13-14), chin to nose tip (152-2). Reported per avatar:
    vowels.{ah,ee,oo}: median over the vowel's middle of width change (%), lip-gap change (px), chin drop (px)
    closures: m/b/p phonemes whose lip gap comes within `--closed-px` of neutral during the consonant
    r, lag_ms: correlation of the lip gap with the speech envelope (RMS over 40 ms) at the best lag over
        -100..+150 ms (positive: the lips lead the sound), and r at lag 0, over the sentences
    targets: each of the issue's targets (ee >= +10 % wide, oo <= -10 %, ah gap >= 2 x ee gap, >= 80 %
        closures, chin drop on ah >= 3 px, r >= 0.7 with lag 0..70 ms), true or false
Frame strips (neutral + one tile per phoneme of interest) go to test-artifacts/visemes/<label>/.

`--webrtc` adds `webrtc_default_512`: the same clips pushed one after another (POST
/sessions/{id}/audio) into a real session of `run_server.py` (of `--root` or this checkout, default
renderer and avatar, started with bench/common.start_server on 127.0.0.1), an aiortc client on loopback
receiving and decoding the returned audio and video (its buffers hand on each audio packet as it
arrives and a video frame at its marker bit, as a browser does on a clean loopback). Both tracks are
placed on the arrival clock by their RTP timestamps (plus each track's fastest transport delay, so the
client's own scheduling jitter does not move frames); each clip is found in the returned audio by
cross-correlation (its peak per clip is in the JSON), which times the returned video frames against
the clip as heard. The neutral face under a returned frame is the face mesh on the received idle
frames (the first 9 s, codec included) that look most like it above the nose (`IdleFaces`). The same
figures and targets follow, plus the frames received per clip, their intervals and the load.
`--webrtc-photo` adds `webrtc_photo_720p`: the 720p photo given to the server with --avatars (it
prepares it as any photo) and chosen in the offer.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the harness is this checkout's; --root puts the measured realtime/ before it

from bench.client import OfferRefused, PeerClient  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts" / "visemes"
log = logging.getLogger("bench.visemes")

VOWELS = {"ah": "ah", "ee": "ee", "oo": "oo"}
SYLLABLES = {"ma": "ma", "pa": "pa", "ba": "ba", "fa": "fa"}
SENTENCES = {
    "bob": "Bob bought a map.",
    "mother": "My mother baked apple pie before we came home.",
    "peter": "Peter Piper picked a peck of pickled peppers.",
    "fox": "The quick brown fox jumps over the lazy dog.",
    "five": "Five bright violins, and a vase full of fresh flowers.",
}
BILABIAL = {"m", "b", "p"}
SHOWN = {"m", "b", "p", "f", "v", "s", "A:", "a", "aI", "i:", "i", "u:", "U", "O:", "0", "oU", "E", "e", "aU"}
# espeak-ng event types and options (speak_lib.h)
_EVENT_PHONEME, _AUDIO_SYNCHRONOUS, _INIT_PHONEME_EVENTS, _RATE, _POS_CHARACTER = 7, 2, 1, 1, 1
MOUTH_L, MOUTH_R, LIP_IN_TOP, LIP_IN_BOTTOM, CHIN, NOSE = 61, 291, 13, 14, 152, 2
TILE = 128


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


@dataclass
class Clip:
    name: str
    text: str
    wav: np.ndarray                       # 16 kHz float32
    phonemes: list[tuple[float, float, str]]  # (start s, end s, espeak-ng mnemonic)


class Espeak:
    """espeak-ng through libespeak-ng: samples plus the start of every phoneme."""

    def __init__(self, rate_wpm: int = 150) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        self.lib = ctypes.CDLL(name)
        self.rate = int(self.lib.espeak_Initialize(_AUDIO_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS))
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                              ctypes.POINTER(_Event))
        self.lib.espeak_SetParameter(_RATE, rate_wpm, 0)

    def speak(self, name: str, text: str, rate_wpm: int = 150) -> Clip:
        self.lib.espeak_SetParameter(_RATE, rate_wpm, 0)
        chunks: list[np.ndarray] = []
        events: list[tuple[int, str]] = []

        def on_audio(wav, n, ev) -> int:  # type: ignore[no-untyped-def]
            if n > 0:
                chunks.append(np.ctypeslib.as_array(wav, (n,)).astype(np.float32) / 32768.0)
            i = 0
            while ev[i].type != 0:
                if ev[i].type == _EVENT_PHONEME:
                    events.append((int(ev[i].sample), bytes(ev[i].id).split(b"\0")[0].decode("ascii", "replace")))
                i += 1
            return 0

        callback = self.callback_type(on_audio)
        self.lib.espeak_SetSynthCallback(callback)
        data = text.encode() + b"\0"
        self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        raw = np.concatenate(chunks) if chunks else np.zeros(1, np.float32)
        t_src = np.arange(len(raw)) / self.rate
        wav = np.interp(np.arange(int(len(raw) * 16000 / self.rate)) / 16000, t_src, raw).astype(np.float32)
        wav = np.concatenate([np.zeros(4000, np.float32), wav, np.zeros(4000, np.float32)])  # 0.25 s either side
        starts = [(0.25 + s / self.rate, p) for s, p in events if p and not p.startswith("_")]
        ends = [s for s, _ in starts[1:]] + [0.25 + len(raw) / self.rate]
        return Clip(name, text, wav, [(s, e, p) for (s, p), e in zip(starts, ends, strict=True)])


def photo_picture(default_avatar, path: Path) -> Path:
    """The default avatar's first frame scaled into a 1280x720 picture (a photo of the face), at `path`."""
    frame = default_avatar.frames[0]
    scale = 680 / frame.shape[0]
    face = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    canvas = cv2.resize(cv2.GaussianBlur(frame, (0, 0), 25), (1280, 720))
    y, x = (720 - face.shape[0]) // 2, (1280 - face.shape[1]) // 2
    canvas[y:y + face.shape[0], x:x + face.shape[1]] = face
    cv2.imwrite(str(path), canvas)
    return path


def photo_avatar(default_avatar, tmp: Path):
    """`photo_picture`, prepared like any photo."""
    from realtime.avatars.avatar import AvatarConfig
    from realtime.avatars.avatar_prepare import prepare_avatar

    path = photo_picture(default_avatar, tmp / "photo.png")
    return prepare_avatar(path, config=AvatarConfig(detector="mesh", still_seconds=4.0), use_cache=False)


class Reader:
    """The face mesh on rendered and neutral frames: (width, inner gap, chin-nose) px per frame."""

    def __init__(self) -> None:
        from models.face_detection.detectors import MeshDetector

        self.detector = MeshDetector()
        self.previous = None
        self.landmarks: np.ndarray | None = None  # of the last face found
        self.neutral: dict[tuple[int, int], np.ndarray] = {}

    def measure(self, frame: np.ndarray) -> np.ndarray:
        found = self.detector.detect(frame, self.previous)
        self.previous = found
        if found is None or found.landmarks is None:
            return np.full(3, np.nan)
        p = found.landmarks
        self.landmarks = p
        return np.array([np.linalg.norm(p[MOUTH_R] - p[MOUTH_L]), np.linalg.norm(p[LIP_IN_BOTTOM] - p[LIP_IN_TOP]),
                         np.linalg.norm(p[CHIN] - p[NOSE])])

    def measure_neutral(self, avatar_id: int, index: int, frame: np.ndarray) -> np.ndarray:
        key = (avatar_id, index)
        if key not in self.neutral:
            saved = self.previous
            self.previous = None
            self.neutral[key] = self.measure(frame)
            self.previous = saved
        return self.neutral[key]


def render_clip(renderer, avatar, clip: Clip) -> tuple[list[np.ndarray], np.ndarray]:
    """Rendered frames and avatar frame indices, through `render` with the renderer's own windows."""
    from realtime.audio.mel import MelAlignment, mel_windows, melspectrogram
    from realtime.renderers.compositor import paste

    fps = float(avatar.fps)
    offset = renderer.traits.audio_needs.offset_frames
    alignment = {a.offset_frames: a for a in MelAlignment}[offset]
    windows = mel_windows(melspectrogram(clip.wav), fps, alignment)
    indices = np.array([avatar.frame_index(k) for k in range(len(windows))])
    frames = []
    for s in range(0, len(windows), 8):
        patches = renderer.render(avatar, indices[s:s + 8], windows[s:s + 8])
        frames.extend(paste(avatar.frames[i], p, mode="feather")
                      for i, p in zip(indices[s:s + 8], patches, strict=True))
    return frames, indices


def envelope(wav: np.ndarray, times: np.ndarray) -> np.ndarray:
    half = 320  # 40 ms window
    out = np.zeros(len(times))
    for k, t in enumerate(times):
        c = round(t * 16000)
        seg = wav[max(0, c - half):max(0, c + half)]
        out[k] = np.sqrt(np.mean(seg.astype(np.float64) ** 2)) if len(seg) else 0.0
    return out


def mouth_crop(frame: np.ndarray, points: np.ndarray) -> np.ndarray:
    centre = points[[0, 1, 6]].mean(axis=0)
    side = 1.9 * float(np.linalg.norm(points[1] - points[0]))
    x1, y1 = int(centre[0] - side / 2), int(centre[1] - side * 0.5)
    h, w = frame.shape[:2]
    x1, y1 = max(0, min(w - int(side), x1)), max(0, min(h - int(side), y1))
    crop = frame[y1:y1 + int(side), x1:x1 + int(side)]
    return cv2.resize(crop, (TILE, TILE), interpolation=cv2.INTER_AREA)


def labelled(tile: np.ndarray, text: str) -> np.ndarray:
    tile = tile.copy()
    cv2.putText(tile, text, (4, TILE - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (4, TILE - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def strip(avatar, frames: list[np.ndarray], indices: np.ndarray, clip: Clip, fps: float) -> np.ndarray:
    """Neutral + one tile per shown phoneme (its middle; a closure: 30 ms into it), max 10."""
    points = np.asarray(avatar.mouth[indices[0]])
    tiles = [labelled(mouth_crop(avatar.frames[indices[0]], points), "rest")]
    for start, end, ph in clip.phonemes:
        if ph not in SHOWN or len(tiles) >= 10:
            continue
        t = start + min(0.03, (end - start) / 2) if ph in BILABIAL | {"f", "v"} else (start + end) / 2
        k = min(len(frames) - 1, round(t * fps))
        tiles.append(labelled(mouth_crop(frames[k], points), ph))
    return np.concatenate(tiles, axis=1)


def material() -> dict[str, Clip]:
    """The spoken material; vowels slowly (80 words/min): sustained, ~0.5 s each."""
    speaker = Espeak()
    return {name: speaker.speak(name, text, 80 if name in VOWELS else 150)
            for name, text in {**VOWELS, **SYLLABLES, **SENTENCES}.items()}


def evaluate(label: str, closed_px: float, clips: dict[str, Clip], reader: Reader) -> dict:
    from realtime.avatars.default_avatar import load_default_avatar
    from realtime.renderers.default import DefaultRenderer

    out_dir = ARTIFACTS / label
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        default = load_default_avatar()
        avatars = {"default_512": default, "photo_720p": photo_avatar(default, Path(tmp))}
        for avatar_name, avatar in avatars.items():
            renderer = DefaultRenderer()
            renderer.prepare(avatar)
            fps = float(avatar.fps)
            per_clip: dict[str, dict] = {}
            render_s = 0.0
            n_frames = 0
            for name, clip in clips.items():
                t0 = time.perf_counter()
                frames, indices = render_clip(renderer, avatar, clip)
                render_s += time.perf_counter() - t0
                n_frames += len(frames)
                reader.previous = None
                m = np.array([reader.measure(f) for f in frames])
                neutral = np.array([reader.measure_neutral(id(avatar), int(i), avatar.frames[i]) for i in indices])
                cv2.imwrite(str(out_dir / f"{avatar_name}__{name}.png"), strip(avatar, frames, indices, clip, fps))
                per_clip[name] = {"m": m, "neutral": neutral, "times": np.arange(len(frames)) / fps, "clip": clip}
            results[avatar_name] = summarise(per_clip, closed_px)
            results[avatar_name]["render_ms_per_frame"] = round(1000 * render_s / n_frames, 2)
            results[avatar_name]["frame_size"] = f"{avatar.frames.shape[2]}x{avatar.frames.shape[1]}"
    return results


def summarise(per_clip: dict[str, dict], closed_px: float) -> dict:
    vowels = {}
    for name in VOWELS:
        d = per_clip[name]
        start, end = max(((s, e) for s, e, _ in d["clip"].phonemes), key=lambda se: se[1] - se[0])
        sel = (d["times"] >= start + 0.2 * (end - start)) & (d["times"] <= end - 0.2 * (end - start))
        m, n = d["m"][sel], d["neutral"][sel]
        vowels[name] = {
            "width_pct": round(float(np.nanmedian(100 * (m[:, 0] / n[:, 0] - 1))), 1),
            "gap_px": round(float(np.nanmedian(m[:, 1] - n[:, 1])), 1),
            "chin_px": round(float(np.nanmedian(m[:, 2] - n[:, 2])), 1),
            "frames": int(sel.sum()),
        }
    closures = []
    for d in per_clip.values():
        for start, end, ph in d["clip"].phonemes:
            if ph not in BILABIAL:
                continue
            sel = (d["times"] >= start - 0.02) & (d["times"] <= end)
            if len(sel) == 0:  # no frame of this clip came back (--webrtc on an overloaded machine)
                continue
            if not sel.any():
                sel = np.zeros(len(d["times"]), bool)
                sel[int(np.argmin(np.abs(d["times"] - (start + end) / 2)))] = True
            excess = d["m"][sel, 1] - d["neutral"][sel, 1]
            closures.append(float(np.nanmin(excess)) if np.isfinite(excess).any() else float("nan"))
    closed = [c <= closed_px for c in closures if np.isfinite(c)]
    gaps, env_by_lag = [], {lag: [] for lag in range(-100, 151, 10)}
    for name in SENTENCES:
        d = per_clip[name]
        if len(d["times"]) == 0:
            continue
        gaps.append(d["m"][:, 1] - d["neutral"][:, 1])
        for lag in env_by_lag:
            env_by_lag[lag].append(envelope(d["clip"].wav, d["times"] + lag / 1000))
    gap = np.concatenate(gaps)
    ok = np.isfinite(gap)
    rs = {lag: float(np.corrcoef(gap[ok], np.concatenate(e)[ok])[0, 1]) for lag, e in env_by_lag.items()}
    best = max(rs, key=lambda k: rs[k])
    ah, ee, oo = vowels["ah"], vowels["ee"], vowels["oo"]
    targets = {
        "ee_wider_10pct": ee["width_pct"] >= 10.0,
        "oo_narrower_10pct": oo["width_pct"] <= -10.0,
        "ah_opens_2x_ee": ah["gap_px"] >= 2.0 * max(ee["gap_px"], 0.5),
        "closures_80pct": bool(closed) and float(np.mean(closed)) >= 0.8,
        "chin_drops_on_ah": ah["chin_px"] >= 3.0,
        "r_0.7_lead_0_70ms": rs[best] >= 0.7 and 0 <= best <= 70,
    }
    return {
        "vowels": vowels,
        "closures": {"onsets": len(closures), "closed": int(sum(closed)),
                     "fraction": round(float(np.mean(closed)), 3) if closed else None,
                     "median_excess_gap_px": round(float(np.nanmedian(closures)), 2) if closures else None},
        "r": round(rs[best], 3), "lag_ms": best, "r_lag0": round(rs[0], 3),
        "targets": targets,
    }


# -- the same material over a real WebRTC session ----------------------------------------------------

WEBRTC_IDLE_S = 9.0       # idle video collected first: every frame of the default avatar's loop (8 s) once
WEBRTC_SETTLE_S = 0.8     # after a clip: the returned audio stays silent this long before the next one
SILENT_RMS = 0.003        # a returned 20 ms audio frame quieter than this is silence


@dataclass
class Track:
    """What arrived on one received track: (arrival time.monotonic, RTP timestamp, payload) per frame."""
    clock: int
    frames: list[tuple[float, int, np.ndarray]]

    def offset(self) -> float:
        """Seconds to add to timestamp/clock to get the arrival time of the fastest frames: the transport's
        constant delay. Frames the client's own event loop handed over late (a loaded machine) do not move
        it, so every frame gets its place on the sender's media clock, not its jittered arrival."""
        stamps = self.unwrapped()
        arrivals = np.array([a for a, _, _ in self.frames])
        return float(np.percentile(arrivals - stamps / self.clock, 5))

    def unwrapped(self) -> np.ndarray:
        raw = np.array([ts for _, ts, _ in self.frames], dtype=np.int64)
        steps = (np.diff(raw) + 2**31) % 2**32 - 2**31  # RTP timestamps are 32-bit and start at random
        return np.concatenate([[0], np.cumsum(steps)]).astype(np.float64)

    def times(self) -> np.ndarray:
        return self.unwrapped() / self.clock + self.offset()


class WebRTCClient(PeerClient):
    """The harness's aiortc client (bench/client.py) with buffers that behave like a browser's on a clean
    loopback (each audio packet played as it arrives, a video frame complete at its marker bit), recording
    every returned frame with its RTP timestamp."""

    def __init__(self, url: str, http) -> None:  # type: ignore[no-untyped-def]
        super().__init__(url, http)
        self.audio = Track(48000, [])
        self.video = Track(90000, [])

    def tune(self, transceiver) -> None:  # type: ignore[no-untyped-def]
        from bench.netimpair import MarkerJitterBuffer, PerPacketAudioBuffer

        transceiver.receiver._RTCRtpReceiver__jitter_buffer = (  # the client's own buffers (aiortc 1.x internals)
            PerPacketAudioBuffer() if transceiver.kind == "audio" else MarkerJitterBuffer(capacity=512, is_video=True))

    def on_frame(self, kind: str, frame, arrival: float) -> None:  # type: ignore[no-untyped-def]
        if kind == "video":
            self.video.frames.append((arrival, int(frame.pts), frame.to_ndarray(format="yuv420p")))
        else:
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
            self.audio.frames.append((arrival, int(frame.pts), pcm.astype(np.float32)))

    async def connect_to(self, avatar: str | None = None) -> None:
        """Offer (receive-only audio and video, `avatar` chosen when given) and wait for the first media."""
        try:
            await self.connect(options=None if avatar is None else {"avatar": avatar})
        except OfferRefused as refused:
            raise SystemExit(f"bench/visemes.py: offer refused: {refused.body}") from None
        deadline = time.monotonic() + 60
        while len(self.video.frames) < 25 or not self.audio.frames:
            if time.monotonic() > deadline:
                raise SystemExit("bench/visemes.py: no media from the server")
            await asyncio.sleep(0.05)

    async def push(self, wav: np.ndarray) -> None:
        """POST /sessions/{id}/audio (the push API), 16 kHz PCM16 wav."""
        from bench.common import pcm16, wav_bytes

        async with self.http.post(self.endpoint(f"/sessions/{self.session_id}/audio"),
                                  data=wav_bytes(pcm16(wav), 16000),
                                  headers={"Content-Type": "audio/wav", **self.auth}) as resp:
            if resp.status != 200:
                raise SystemExit(f"bench/visemes.py: push refused ({resp.status}): {await resp.text()}")

    async def until_spoken(self, since: int, timeout_s: float) -> None:
        """Wait until audio frames after index `since` carried speech and then stayed silent for a while."""
        deadline = time.monotonic() + timeout_s
        heard = False
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            frames = self.audio.frames[since:]
            loud = [k for k, (_, _, d) in enumerate(frames) if np.sqrt(np.mean(d.astype(np.float64) ** 2)) > SILENT_RMS]
            heard = heard or bool(loud)
            if heard and (len(frames) - 1 - loud[-1]) * 0.02 >= WEBRTC_SETTLE_S:
                return
        raise SystemExit("bench/visemes.py: the pushed speech did not come back (or never ended)")


async def ready_avatar(http, url: str, name: str, timeout_s: float = 300.0) -> str:  # type: ignore[no-untyped-def]
    """The id of the avatar the server prepared from the file `name` (--avatars), once it is ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with http.get(url.rstrip("/") + "/avatars") as resp:
            listing = await resp.json()
        for entry in listing["avatars"]:
            if entry["id"] != listing["default"]:
                if entry["state"] == "ready":
                    return str(entry["id"])
                if entry["state"] == "failed":
                    raise SystemExit(f"bench/visemes.py: the server could not prepare {name}: {entry}")
        await asyncio.sleep(0.5)
    raise SystemExit(f"bench/visemes.py: the server did not prepare {name} in {timeout_s:.0f} s")


async def drive_webrtc(url: str, clips: dict[str, Clip], photo: str | None = None) -> WebRTCClient:
    """Idle for one avatar loop, then every clip pushed in turn, each once the previous one has played."""
    import aiohttp

    from server.network.ice import use_host_addresses

    restore = use_host_addresses(["127.0.0.1"])  # the client offers loopback only, as the server does
    try:
        async with aiohttp.ClientSession() as http:
            client = WebRTCClient(url, http)
            await client.connect_to(None if photo is None else await ready_avatar(http, url, photo))
            await asyncio.sleep(WEBRTC_IDLE_S)
            for name, clip in clips.items():
                since = len(client.audio.frames)
                await client.push(clip.wav)
                await client.until_spoken(since, 30.0 + len(clip.wav) / 16000)
                log.info("webrtc: %s played back", name)
            await client.close()
    finally:
        restore()
    return client


def received_audio_16k(track: Track) -> tuple[np.ndarray, float]:
    """The returned audio as one 16 kHz signal on the media clock (gaps as silence), and its start time."""
    stamps = track.unwrapped().astype(np.int64)
    start = stamps[0]
    total = int(stamps[-1] - start) + len(track.frames[-1][2])
    signal = np.zeros(total, np.float32)
    for (_, _, data), ts in zip(track.frames, stamps, strict=True):
        signal[int(ts - start):int(ts - start) + len(data)] = data
    mono16 = signal[: len(signal) // 3 * 3].reshape(-1, 3).mean(axis=1)  # 48 -> 16 kHz (box filter)
    return mono16.astype(np.float32), track.times()[0]


def locate(clip: np.ndarray, signal: np.ndarray, lo: int, hi: int) -> tuple[int, float]:
    """Sample index in `signal[lo:hi]` where `clip` starts (FFT cross-correlation), and the normalised peak."""
    seg = signal[max(0, lo):min(len(signal), hi)]
    n = 1 << int(np.ceil(np.log2(len(seg) + len(clip))))
    corr = np.fft.irfft(np.fft.rfft(seg, n) * np.conj(np.fft.rfft(clip, n)), n)[: max(1, len(seg) - len(clip) + 1)]
    k = int(np.argmax(corr))
    norm = float(corr[k] / (np.linalg.norm(clip) * np.linalg.norm(seg[k:k + len(clip)]) + 1e-9))
    return max(0, lo) + k, norm


class IdleFaces:
    """The neutral face under a returned frame: the received idle frames (before any speech, codec
    included) are the reference; a returned frame's neutral is the median face-mesh reading of the three
    idle frames closest to it on the face above the nose (the renderer never changes it; idle head
    motion does), downscaled 4x. Needs no copy of the server's avatar, so it works for any avatar the
    server prepared (a photo gets its idle motion there)."""

    def __init__(self, frames: list[np.ndarray], reader: Reader) -> None:
        reader.previous = None
        self.readings = np.array([reader.measure(f) for f in frames])
        if reader.landmarks is None:
            raise SystemExit("bench/visemes.py: no face found in the returned idle video")
        self.top = int(reader.landmarks[NOSE][1]) - 4
        self.keys = np.stack([self.key(f) for f in frames])

    def key(self, bgr: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(bgr[:self.top], cv2.COLOR_BGR2GRAY)
        small = cv2.resize(grey, (grey.shape[1] // 4, grey.shape[0] // 4), interpolation=cv2.INTER_AREA)
        return small.astype(np.float32)

    def neutral(self, bgr: np.ndarray) -> np.ndarray:
        distance = np.abs(self.keys - self.key(bgr)[None]).mean(axis=(1, 2))
        return np.nanmedian(self.readings[np.argsort(distance)[:3]], axis=0)


def evaluate_webrtc(clips: dict[str, Clip], reader: Reader, closed_px: float, repo: Path,
                    photo: Path | None = None) -> dict:
    """The material pushed through a real session of `run_server.py` (default renderer; the default
    avatar, or `photo` given to the server with --avatars); the returned video decoded and read by the
    same face mesh, timed on the returned audio."""
    from bench.common import loadavg, start_server

    with tempfile.TemporaryDirectory() as tmp:
        args: list[str] = []
        if photo is not None:
            folder = Path(tmp) / "avatars"
            folder.mkdir()
            (folder / photo.name).write_bytes(photo.read_bytes())
            args = ["--avatars", str(folder), "--avatar-cache-dir", str(Path(tmp) / "cache")]
        server = start_server(args, Path(tmp) / "server.log", repo=repo)
        load_before = loadavg()
        try:
            client = asyncio.run(drive_webrtc(server.url, clips, None if photo is None else photo.name))
        finally:
            server.stop()
    video_t = client.video.times()
    yuv = [f for _, _, f in client.video.frames]
    del client.video.frames[:]

    def bgr(k: int) -> np.ndarray:
        return cv2.cvtColor(yuv[k], cv2.COLOR_YUV2BGR_I420)

    audio, audio_t0 = received_audio_16k(client.audio)
    idle_end = video_t[0] + WEBRTC_IDLE_S - 0.5
    idle = IdleFaces([bgr(k) for k in np.flatnonzero(video_t < idle_end)], reader)

    per_clip: dict[str, dict] = {}
    cursor = int((idle_end - audio_t0) * 16000)
    alignment: dict[str, float] = {}
    for name, clip in clips.items():
        start, peak = locate(clip.wav, audio, cursor, cursor + int((len(clip.wav) / 16000 + 30) * 16000))
        cursor = start + len(clip.wav)
        t0 = audio_t0 + start / 16000  # arrival-clock time of the clip's first sample as heard
        sel = np.flatnonzero((video_t >= t0) & (video_t < t0 + len(clip.wav) / 16000))
        reader.previous = None
        frames = [bgr(k) for k in sel]
        m = np.array([reader.measure(f) for f in frames])
        n = np.array([idle.neutral(f) for f in frames])
        per_clip[name] = {"m": m, "neutral": n, "times": video_t[sel] - t0, "clip": clip}
        alignment[name] = round(peak, 3)
    out = summarise(per_clip, closed_px)
    intervals = np.diff(video_t)
    height, width = yuv[0].shape[0] * 2 // 3, yuv[0].shape[1]
    out["webrtc"] = {
        "frames_received": len(yuv), "frame_size": f"{width}x{height}",
        "frame_interval_ms_p50_p95": [round(1000 * float(np.percentile(intervals, q)), 1) for q in (50, 95)],
        "idle_reference_frames": len(idle.readings), "clip_alignment": alignment,
        # frames that came back per clip, against the clip's length at the avatar's frame rate: a
        # clip short of frames (the server or this client could not keep up) weighs less or not at all
        "frames_per_clip": {name: [len(d["times"]), round(len(d["clip"].wav) / 16000 * 25)]
                            for name, d in per_clip.items()},
        "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    return out


def warp_cost(other: Path, repeats: int = 25) -> dict:
    """Thread CPU ms per frame of `warp_mouth` (the deformation and the painted interior, no parameters,
    no paste), `other`'s realtime/renderers/mouth_warp.py against this checkout's, each with its own
    default configuration, interleaved in this process (alternating which goes first) on the default
    avatar; the minimum over `repeats` passes of 64 frames. Parameters from espeak-ng sentences: every
    speech frame, and the rounded ones (round > 0.2) alone."""
    import importlib.util

    from realtime.audio.mel import MelAlignment, mel_windows, melspectrogram
    from realtime.avatars.default_avatar import load_default_avatar
    from realtime.renderers import mouth_warp
    from realtime.renderers.mouth_params import ROUND, MouthParamsConfig, mouth_params

    spec = importlib.util.spec_from_file_location("other_mouth_warp", other / "realtime/renderers/mouth_warp.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench/visemes.py: no mouth_warp.py under {other}")
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # its dataclasses look their module up
    spec.loader.exec_module(old)
    avatar = load_default_avatar()
    config = MouthParamsConfig()
    alignment = {a.offset_frames: a for a in MelAlignment}[config.audio_needs.offset_frames]
    speaker = Espeak()
    wav = np.concatenate([speaker.speak(k, SENTENCES[k]).wav for k in ("bob", "fox", "mother")])
    params = mouth_params(mel_windows(melspectrogram(wav), 25.0, alignment), config)
    sets = {"speech": params[params.max(axis=1) > 0.05][:64], "rounded": params[params[:, ROUND] > 0.2][:64]}

    def prepared(module):  # type: ignore[no-untyped-def]
        warp = module.MouthWarpConfig()
        items = []
        for i in range(64):
            frame = avatar.frames[i % len(avatar.frames)]
            geom = module.frame_geometry(avatar.mouth[i % len(avatar.frames)], frame.shape, warp)
            items.append((frame, geom, module.estimate_palette(frame, geom),
                          module.feather_alpha(geom, frame.shape, warp.margin_px)))
        return module, warp, items

    def one_pass(setup, rows: np.ndarray) -> float:  # type: ignore[no-untyped-def]
        module, warp, items = setup
        start = time.thread_time()
        for k, (frame, geom, palette, alpha) in enumerate(items):
            module.warp_mouth(frame, geom, rows[k % len(rows)], palette, alpha, warp)
        return (time.thread_time() - start) / len(items) * 1000.0

    setups = {"other": prepared(old), "this": prepared(mouth_warp)}
    out: dict[str, dict] = {}
    for name, rows in sets.items():
        best = {"other": float("inf"), "this": float("inf")}
        for rep in range(repeats):
            for which in (("other", "this") if rep % 2 == 0 else ("this", "other")):
                best[which] = min(best[which], one_pass(setups[which], rows))
        out[name] = {"frames": len(rows), **{k: round(v, 3) for k, v in best.items()},
                     "change_pct": round(100.0 * (best["this"] / best["other"] - 1.0), 1)}
    return {"warp_cpu_ms_per_frame": out, "other": str(other), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def grids(before: str, after: str, docs: Path | None) -> list[str]:
    """Before/after grids of every strip the two runs share; `docs`: one small grid of the material."""
    written = []
    for path in sorted((ARTIFACTS / after).glob("*.png")):
        other = ARTIFACTS / before / path.name
        if not other.exists():
            continue
        a, b = cv2.imread(str(other)), cv2.imread(str(path))
        width = max(a.shape[1], b.shape[1])
        rows = [np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0))) for x in (a, b)]
        grid = np.concatenate([labelled_row(rows[0], before), labelled_row(rows[1], after)], axis=0)
        target = ARTIFACTS / f"grid__{path.stem}.png"
        cv2.imwrite(str(target), grid)
        written.append(str(target))
    if docs is not None:
        parts = []
        for label in (before, after):
            tiles = []
            for name, picks in (("ah", 1), ("ee", 1), ("oo", 1), ("ma", 1), ("pa", 1), ("fa", 1)):
                img = cv2.imread(str(ARTIFACTS / label / f"default_512__{name}.png"))
                if not tiles:
                    tiles.append(img[:, :TILE])               # rest
                tiles.append(img[:, TILE:TILE * (1 + picks)])  # the first shown phoneme
            parts.append(labelled_row(np.concatenate(tiles, axis=1), label))
        docs.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(docs), np.concatenate(parts, axis=0), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        written.append(str(docs))
    return written


def labelled_row(row: np.ndarray, text: str) -> np.ndarray:
    head = np.full((row.shape[0], 70, 3), 255, np.uint8)
    cv2.putText(head, text, (4, row.shape[0] // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([head, row], axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="new", help="name of this run (strips under test-artifacts/visemes/LABEL)")
    parser.add_argument("--root", type=Path, help="import the renderer (realtime/) from this checkout")
    parser.add_argument("--closed-px", type=float, default=2.0, help="a closure: lip gap within this of neutral")
    parser.add_argument("--grid", nargs=2, metavar=("BEFORE", "AFTER"), help="compose grids of two runs")
    parser.add_argument("--docs", type=Path, help="with --grid: also write this small grid of the material")
    parser.add_argument("--webrtc", action="store_true",
                        help="also push the material through a real server session (run_server.py of --root or "
                             "this checkout, default avatar) and read the returned video: 'webrtc_default_512'")
    parser.add_argument("--webrtc-photo", action="store_true",
                        help="with --webrtc: also a session on the 720p photo ('webrtc_photo_720p'); 720p encoding "
                             "and decoding need a machine that keeps up (see frames_per_clip)")
    parser.add_argument("--warp-cost", type=Path, metavar="CHECKOUT",
                        help="only the warp's CPU ms per frame, CHECKOUT's mouth_warp.py (e.g. main's) against "
                             "this checkout's, interleaved in one process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cv2.setNumThreads(1)
    if args.warp_cost:
        print(json.dumps(warp_cost(args.warp_cost.resolve())), flush=True)
        return 0
    if args.grid:
        written = grids(args.grid[0], args.grid[1], args.docs)
        print(json.dumps({"grids": written}), flush=True)
        return 0
    sys.path.insert(0, str((args.root or ROOT).resolve()))
    started = time.perf_counter()
    clips, reader = material(), Reader()
    results = evaluate(args.label, args.closed_px, clips, reader)
    if args.webrtc:
        from realtime.avatars.default_avatar import load_default_avatar

        repo = (args.root or ROOT).resolve()
        results["webrtc_default_512"] = evaluate_webrtc(clips, reader, args.closed_px, repo)
        if args.webrtc_photo:
            with tempfile.TemporaryDirectory() as tmp:
                photo = photo_picture(load_default_avatar(), Path(tmp) / "photo.png")
                results["webrtc_photo_720p"] = evaluate_webrtc(clips, reader, args.closed_px, repo, photo)
    for name, res in results.items():
        log.info("%s %s: %s", args.label, name, json.dumps(res))
    print(json.dumps({"label": args.label, "root": str(args.root or ROOT), "avatars": results,
                      "closed_px": args.closed_px, "seconds": round(time.perf_counter() - started, 1),
                      "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
