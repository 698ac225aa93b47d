"""Microphone -> returned audio through the page, in headless Chromium, with the built-in renderer.

    python bench/browser_latency.py [--seconds 50] [--text "..."] [--via direct|nginx|relay-udp|relay-tls]

`run_server.py` (embedded avatar, no-weights renderer, loopback ICE candidates only) and Debian's
Chromium (/usr/bin/chromium, driven by Playwright's Python package; never `playwright install`) with a fake
microphone: a wav of speech followed by 2 s of silence, which Chromium loops. The page (client_web/) is
used as a visitor uses it: open it, press Start (microphone). An init script keeps a reference to the
page's microphone stream and peer connection; one Web Audio graph then takes the microphone stream and
the received audio track side by side (a ChannelMerger into one ScriptProcessor), so both are timed on
the same audio clock, and records the level of every 256-sample block. Each speech onset in the
microphone (after >= 0.5 s of silence) is paired with the first onset in the returned audio after it; the
delay is one trial. What is not included: the output device's latency (there is none headless).

The last line printed is one JSON object: {"mic_to_returned_audio_ms": {"p50", "p95", "trials"}, ...}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import espeak_clip_16k, loadavg, pcm16, start_server, summary  # noqa: E402

RATE = 16000

log = logging.getLogger("bench.browser_latency")

CHROMIUM = Path("/usr/bin/chromium")
BLOCK = 256

# Keeps the page's microphone stream and peer connection where the measurement can reach them.
INIT_SCRIPT = """
(() => {
  const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (c) => { const s = await gum(c); window.__mic = s; return s; };
  const PC = window.RTCPeerConnection;
  window.RTCPeerConnection = function (...args) { const pc = new PC(...args); window.__pc = pc; return pc; };
  window.RTCPeerConnection.prototype = PC.prototype;
})();
"""

# Both streams into one ScriptProcessor: per 256-sample block, [rms(mic), rms(returned)].
RECORD_SCRIPT = """
async (block) => {
  const ctx = new AudioContext();
  await ctx.resume();
  const receiver = window.__pc.getReceivers().find(r => r.track && r.track.kind === 'audio');
  const remote = new MediaStream([receiver.track]);
  const mic = ctx.createMediaStreamSource(window.__mic);
  const back = ctx.createMediaStreamSource(remote);
  const merge = ctx.createChannelMerger(2);
  mic.connect(merge, 0, 0);
  back.connect(merge, 0, 1);
  const proc = ctx.createScriptProcessor(4096, 2, 1);
  window.__levels = [];
  window.__rate = ctx.sampleRate;
  proc.onaudioprocess = (e) => {
    const a = e.inputBuffer.getChannelData(0), b = e.inputBuffer.getChannelData(1);
    for (let i = 0; i + block <= a.length; i += block) {
      let sa = 0, sb = 0;
      for (let j = i; j < i + block; j++) { sa += a[j] * a[j]; sb += b[j] * b[j]; }
      window.__levels.push([Math.sqrt(sa / block), Math.sqrt(sb / block)]);
    }
  };
  merge.connect(proc);
  proc.connect(ctx.destination);
  window.__keep = [ctx, mic, back, merge, proc, remote];
  return ctx.sampleRate;
}
"""


def fake_microphone(path: Path, text: str) -> Path:
    clip = espeak_clip_16k(text)
    x = np.concatenate([clip, np.zeros(2 * RATE, np.float32)])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm16(x).tobytes())
    return path


def onsets(level: np.ndarray, threshold: float, quiet_blocks: int) -> list[int]:
    """Blocks where the level rises above `threshold` after at least `quiet_blocks` quiet blocks."""
    out, quiet = [], quiet_blocks
    for i, v in enumerate(level):
        if v > threshold:
            if quiet >= quiet_blocks:
                out.append(i)
            quiet = 0
        else:
            quiet += 1
    return out


def delays_ms(levels: np.ndarray, rate: float, threshold: float = 0.01) -> list[float | None]:
    block_s = BLOCK / rate
    quiet = int(0.5 / block_s)
    mic, back = onsets(levels[:, 0], threshold, quiet), onsets(levels[:, 1], threshold, quiet)
    out: list[float | None] = []
    for m in mic[:-1]:  # the last one may not have come back yet
        later = [b for b in back if b >= m]
        out.append(1000.0 * (later[0] - m) * block_s if later and (later[0] - m) * block_s < 1.5 else None)
    return out


SELECTED_PAIR = """async () => {
  const report = await window.__pc.getStats();
  let id = null;
  report.forEach(s => { if (s.type === 'transport' && s.selectedCandidatePairId) id = s.selectedCandidatePairId; });
  const pair = id && report.get(id), local = pair && report.get(pair.localCandidateId);
  return local ? {local: local.candidateType, relay_protocol: local.relayProtocol || null} : null;
}"""

# relay-tls: the page keeps only the turns: server, as if its network dropped UDP.
ONLY_TURNS = """(() => {
  const realFetch = window.fetch;
  window.fetch = async (input, init) => {
    const resp = await realFetch(input, init);
    if (!String(input).endsWith('/ice-servers')) return resp;
    const body = await resp.json();
    body.ice_servers = body.ice_servers.filter(s => s.urls[0].startsWith('turns:'));
    return new Response(JSON.stringify(body), {status: resp.status, headers: resp.headers});
  };
})();"""


def wait_until(page, expression: str, within_s: float) -> None:
    """Poll with page.evaluate: Playwright's wait_for_function uses eval, which the page's CSP forbids."""
    deadline = time.monotonic() + within_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/browser_latency.py: timed out waiting for {expression}")
        page.wait_for_timeout(100)


def served(via: str, tmp: Path, stack: contextlib.ExitStack) -> tuple[str, dict, list[str]]:
    """(page URL, headers for GET /sessions, extra Chromium flags): run_server.py alone, or the deploy/
    files on loopback with the tests' harness (tests/deployment.py: nginx and coturn, self-signed TLS)."""
    if via == "direct":
        server = start_server(["--max-sessions", "1"], tmp / "server.log")
        stack.callback(server.stop)
        return server.url, {}, []
    sys.path.insert(0, str(REPO / "tests"))
    import deployment as d

    cert, key = d.make_certificate(tmp)
    port = d.free_port()
    turn = stack.enter_context(d.coturn(tmp / "coturn", cert, key))
    proxy = stack.enter_context(d.nginx(tmp / "nginx", port, cert, key))
    server = stack.enter_context(d.lipsync_server(tmp / "server", [
        "--public-url", f"https://{d.NAME}:{proxy.port}", "--trusted-proxy", "127.0.0.1", "--ice-allow-loopback",
        "--max-sessions", "1",
        "--turn-secret", d.SECRET, "--turn-url", f"turn:127.0.0.1:{turn.port}?transport=udp",
        "--turn-url", f"turns:{d.NAME}:{turn.tls_port}?transport=tcp"], port=port))
    query = "" if via == "nginx" else "?ice=relay"
    return (f"https://{d.NAME}:{proxy.port}/{query}", {"Authorization": f"Bearer {server.token}"},
            [f"--host-resolver-rules=MAP {d.NAME} 127.0.0.1", "--ignore-certificate-errors"])


def chromium_args(fake_audio: Path) -> list[str]:
    return ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_audio}", "--allow-loopback-in-peer-connection",
            "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=50.0, help="how long to record (>= 10 trials)")
    parser.add_argument("--text", default="Hello there, how are you today?")
    parser.add_argument("--via", choices=["direct", "nginx", "relay-udp", "relay-tls"], default="direct",
                        help="direct: the page from run_server.py; nginx: through deploy/nginx.conf (https); "
                             "relay-udp / relay-tls: that, with the media relayed by deploy/turnserver.conf "
                             "(coturn) over UDP or TLS (the page's ?ice=relay)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not CHROMIUM.exists():
        raise SystemExit("bench/browser_latency.py: needs Debian's chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    before = loadavg()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        wav = fake_microphone(Path(tmp) / "mic.wav", args.text)
        url, headers, extra_args = served(args.via, Path(tmp), stack)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                        args=[*chromium_args(wav), *extra_args])
            try:
                page = browser.new_context(ignore_https_errors=True).new_page()
                page.add_init_script(INIT_SCRIPT)
                if args.via == "relay-tls":
                    page.add_init_script(ONLY_TURNS)
                page.goto(url)
                page.click("#start")
                wait_until(page, "document.getElementById('status-state').textContent === 'connected'", 60)
                wait_until(page, "document.getElementById('avatar').videoWidth > 0", 30)
                rate = float(page.evaluate(RECORD_SCRIPT, BLOCK))
                t_end = time.monotonic() + args.seconds
                while time.monotonic() < t_end:
                    page.wait_for_timeout(1000)
                levels = np.asarray(page.evaluate("window.__levels"), dtype=np.float64).reshape(-1, 2)
                metrics = page.evaluate("async (h) => (await (await fetch('/sessions', {headers: h})).json())",
                                        headers)
                pair = page.evaluate(SELECTED_PAIR)
            finally:
                browser.close()
    trials = delays_ms(levels, rate)
    engine = (metrics.get("sessions") or [{}])[0].get("engine", {})
    result = {"mic_to_returned_audio_ms": summary(trials), "renderer": "default", "via": args.via,
              "candidate_pair": pair,
              "latency_budget_ms": engine.get("latency_budget_ms"), "lookahead_ms": engine.get("lookahead_ms"),
              "recorded_s": round(len(levels) * BLOCK / rate, 1), "loadavg_before": before,
              "loadavg_after": loadavg(), "cpus": os.cpu_count()}
    log.info("Chromium mic -> returned audio: p50 %s ms, p95 %s ms over %d trials (L %s ms) | load %s",
             result["mic_to_returned_audio_ms"]["p50"], result["mic_to_returned_audio_ms"]["p95"], len(trials),
             result["latency_budget_ms"], result["loadavg_after"])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
