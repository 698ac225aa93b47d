"""Live sessions at 25 fps with everything the server does per frame, video and audio encode included.

    python bench/encoded_sessions.py [--codec VP8|H264|VP8,H264] [--trial-s 4] [--max-sessions 16] [--input mic]
                                     [--sessions N] [--repeat R] [--baseline no|yes|interleave]

From another bench: `sessions_with_encode(renderer, avatar, wav, rate, max_n, codec="VP8")
-> (n, trials)`, e.g. `default_sessions_25fps` of bench/sessions.py with encode included.

bench/sessions.py drives LipSyncSession objects alone; this drives each session the way the server
does, on one asyncio loop:

- the session comes from `server.realtime_engine.RealtimeEngine.open_session` (one shared avatar,
  renderer and ThreadedRenderWorker, the server's EngineConfig for that renderer);
- its outgoing media are the server's own `AvatarVideoTrack` and `SyncedAudioTrack` (server/media/tracks.py)
  on one `MediaClock`, so the engine frame -> av.VideoFrame step is the server's code;
- each track is pulled by a loop that mirrors aiortc's `RTCRtpSender._next_encoded_frame` (aiortc
  1.16): `await track.recv()`, then `loop.run_in_executor(None, encoder.encode, frame, False)` with the
  encoder the sender would create (`aiortc.rtcrtpsender.get_encoder` once `server.media.encoders.install()`
  has run, as `create_app` does: aiortc's Vp8Encoder / H264Encoder with real-time settings, aiortc's
  OpusEncoder), one encode in flight per track; the loop's default executor is the server's
  `MediaExecutor` (server/media/media_executor.py: one encoder thread per core the loop leaves, audio first;
  the baseline: Python's default pool), and OpenCV's thread count is the server's
  (`limit_native_threads`); audio frames also get the sender's audio-level computation;
- speech is pushed in 20 ms chunks in real time (a TTS stream), or with `--input mic` arrives as a
  browser's Opus microphone packets (made before the trial), each decoded in real time by the decoder the
  server installs for its microphone (server/media/opus_fec.py: 16 kHz mono; the baseline 48 kHz stereo) and
  pushed as pump_microphone does (stage `mic_decode`; the server decodes in aiortc's decoder thread).

- each encoded frame leaves as aiortc's sender sends it: RTP packets with its header extensions,
  SRTP-protected, one UDP datagram each, to the trial's client: bench/rtp_counter.py, a process of its
  own that counts whole video frames per session from the RTP headers (marker bit, sequence numbers) and
  decodes nothing (its CPU: `client_cores`).

Sessions start staggered by 1/(N fps) (independent peers connect at arbitrary phases). Not included:
RTCP, ICE/DTLS/SCTP housekeeping, the microphone's RTP/SRTP receive. `--baseline yes` measures the server as it was
before its encode path was tuned (bgr24 frames, aiortc's default encoder settings); `interleave` alternates both, so an
A/B sees the same machine load. Other processes' CPU use during each trial is reported
(`other_processes_cores`, from /proc/stat): the machine may be shared.

A trial passes when, for every session: at most 2% of its video ticks were missed (never encoded, or
skipped by the track) or encoded late (encode finished more than one frame period after the tick),
at most 2% of its ticks did not reach the client as whole frames (`received`, `received_fps_min` from
their arrival), the engine dropped at most 2% of speech frames, and latency p95 <= the session's latency budget plus
half a frame (the rule of bench/sessions.py). N steps 1, 2, 4, 6, 8, 10, 12, 16, .. up to --max-sessions;
the count reported is the largest N that passed before the first failure.

CPU split (per trial, ms of CPU per encoded video frame, and cores used), from per-thread CPU clocks:
engine_input (push_audio: resampling, mel, VAD, render jobs), engine_output (next_video_frame /
next_audio, compositing excluded), render (the render worker thread), composite (compositor.paste),
frame_build (the track's engine image -> av.VideoFrame, which is now the yuv420p conversion),
colour_conversion (bgr24 -> yuv420p on the executor: the swscale call aiortc's Vp8Encoder makes, or PyAV
makes inside the H.264 encode, done just before the encoder on the same thread so it can be timed
apart; zero for yuv420p frames), video_encode (the encoder call), audio (AudioFrame, audio level, Opus),
rtp_send (RTP packets, SRTP, UDP sends),
native_threads (threads Python did not start: codec threads and OpenCV's pool, which takes part of the
renderer's, compositor's and track's cv2 work), loop/executor overhead (the rest of those threads).
`summary_ms_per_video_frame` folds these into engine_and_render, composite, colour_conversion, encode,
native_threads, rtp_send and other. Thread CPU time: work, not waiting for the GIL.

Last line: one JSON object {"default_sessions_25fps_encoded": {codec: N (median over --repeat)},
"frame_size": "WxH", "runs": {label: {"counts": [N per repeat], "sessions": N, "trials": [...]}}, ..}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.encode_path import label_of, sessions_with_encode

log = logging.getLogger("bench.encoded_sessions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", default="VP8", help="VP8, H264 or a comma list")
    parser.add_argument("--renderer", default="default", help="only the no-weights default renderer here")
    parser.add_argument("--trial-s", type=float, default=4.0, help="seconds of speech per trial")
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=None, help="run only this N (with --repeat)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--input", choices=["push", "mic"], default="push",
                        help="push: PCM at the clip's rate (a TTS); mic: a browser's Opus packets, decoded as the "
                             "server decodes its microphone")
    parser.add_argument("--baseline", choices=["no", "yes", "interleave"], default="no",
                        help="yes: bgr24 frames and aiortc's default encoders (the server before tuning); "
                             "interleave: alternate baseline and current trials (A/B on a noisy machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.renderer != "default":
        parser.error("only --renderer default is supported (Wav2Lip needs bench/sessions.py's weights)")

    from bench.common import TEXT, make_speech
    from realtime.avatars.default_avatar import load_default_avatar
    from realtime.renderers.default import DefaultRenderer

    avatar = load_default_avatar()
    wav, rate = make_speech(TEXT, 2)
    wav = wav[: int(args.trial_s * rate)]
    h, w = avatar.frames.shape[1:3]
    log.info("avatar %dx%d at %g fps, %.1f s of speech per session, %d cores, load %s",
             w, h, avatar.fps, len(wav) / rate, os.cpu_count() or 0, os.getloadavg())
    variants = {"no": [False], "yes": [True], "interleave": [True, False]}[args.baseline]
    out: dict[str, dict] = {}
    for codec in [c.strip().upper() for c in args.codec.split(",") if c.strip()]:
        for baseline in variants:
            out.setdefault(label_of(codec, baseline), {"counts": [], "trials": []})
        for _ in range(args.repeat):
            for baseline in variants:  # interleaved, so both see the same machine load
                entry = out[label_of(codec, baseline)]
                if args.sessions is not None:
                    trials = sessions_with_encode(DefaultRenderer(), avatar, wav, rate, args.sessions, codec,
                                                  steps=(args.sessions,), baseline=baseline,
                                                  microphone=args.input == "mic")[1]
                    n = args.sessions if trials and trials[-1]["ok"] else 0
                else:
                    n, trials = sessions_with_encode(DefaultRenderer(), avatar, wav, rate, args.max_sessions,
                                                     codec, baseline=baseline, microphone=args.input == "mic")
                entry["counts"].append(n)
                entry["trials"] += trials
    for label, entry in out.items():
        entry["sessions"] = int(np.median(entry["counts"])) if entry["counts"] else 0
        if args.sessions is not None:
            passed = sum(1 for n in entry["counts"] if n)
            print(f"{label}: {args.sessions} sessions passed {passed} of {len(entry['counts'])} trial(s)")
        else:
            print(f"{label}: {entry['counts']} sessions at 25 fps at {w} px, encode included")
    current = {label.split()[0]: v["sessions"] for label, v in out.items() if "baseline" not in label}
    print(json.dumps({"default_sessions_25fps_encoded": current, "frame_size": f"{w}x{h}", "runs": out,
                      "cores": os.cpu_count(), "loadavg": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
