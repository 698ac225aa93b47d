"""A real browser end to end: `python run_server.py` (embedded avatar, no-weights renderer) and headless
Chromium with a fake microphone playing a speech wav. The page must connect, play the avatar video and
show a connected session in its status line. A screenshot goes to test-artifacts/.

Debian's chromium is driven by Playwright's Python package (never `playwright install`); the test is
skipped when /usr/bin/chromium is missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def chromium_args(fake_audio: Path) -> list[str]:
    """Chromium flags; Playwright adds --headless and a fresh temporary --user-data-dir itself."""
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_audio}",
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
        # Offer plain host candidates (no mDNS names) so the loopback-only server can reach us.
        "--disable-features=WebRtcHideLocalIpsWithMdns",
    ]


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, start_s: float = 120.0) -> Iterator[str]:
    """`python run_server.py ARGS` until the block ends; yields its URL (read from its log)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "run_server.py"), *args],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + start_s
        url = None
        while url is None:
            if proc.poll() is not None:
                pytest.fail(f"run_server.py exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"run_server.py did not start in time:\n{log_path.read_text()}")
            match = re.search(r"serving (http://127\.0\.0\.1:\d+/)", log_path.read_text())
            url = match.group(1) if match else None
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log_path.read_text()
    assert "stopped" in log_path.read_text()


@pytest.fixture
def server_url(tmp_path, artifacts_dir):
    """`python run_server.py` on a free port, offering only 127.0.0.1 as ICE candidate (media on UDP
    45000-45999), one session at a time."""
    with running_server(["--port", "0", "--ice-host-addresses", "127.0.0.1", "--max-sessions", "1",
                         "--udp-ports", "45000-45999"], artifacts_dir / "browser-server.log") as url:
        yield url


def test_browser_gets_a_talking_avatar(server_url, speech_wav, tmp_path, artifacts_dir):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=chromium_args(speech_wav))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            console: list[str] = []
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.goto(server_url)
            page.click("#start")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'connected'",
                                   timeout=30000)
            page.wait_for_function("() => document.getElementById('avatar').videoWidth > 0", timeout=20000)
            t0 = page.evaluate("document.getElementById('avatar').currentTime")
            frames0 = page.evaluate("document.getElementById('avatar').getVideoPlaybackQuality()"
                                    ".totalVideoFrames")
            page.wait_for_timeout(3000)
            video = page.evaluate("""() => {
                const v = document.getElementById('avatar');
                const stream = v.srcObject;
                return {
                    width: v.videoWidth, height: v.videoHeight, time: v.currentTime, paused: v.paused,
                    frames: v.getVideoPlaybackQuality().totalVideoFrames,
                    audioTracks: stream ? stream.getAudioTracks().length : 0,
                    videoTracks: stream ? stream.getVideoTracks().length : 0,
                };
            }""")
            page.wait_for_function(
                "() => /\\d+(\\.\\d)? fps/.test(document.getElementById('status-fps').textContent)", timeout=10000)
            status = page.inner_text("#status")
            page.screenshot(path=str(artifacts_dir / "browser.png"))
            page.set_viewport_size({"width": 390, "height": 844})  # a phone
            page.screenshot(path=str(artifacts_dir / "browser-phone.png"), full_page=True)
            assert video["width"] > 0 and video["height"] > 0, video
            assert video["time"] > t0 + 2.0, (t0, video)
            assert video["frames"] - frames0 >= 40, (frames0, video)  # ~25 fps for 3 s
            assert not video["paused"]
            assert video["audioTracks"] == 1 and video["videoTracks"] == 1, video
            assert "connected" in status, status
            fps = float(re.search(r"([\d.]+) fps", status).group(1))
            assert fps > 15, status
            # A second visitor while the only slot is taken: a clear "server is full" message.
            second = browser.new_page()
            second.goto(server_url)
            second.click("#start")
            second.wait_for_function("() => !document.getElementById('message').hidden", timeout=15000)
            assert "full" in second.inner_text("#message"), second.inner_text("#message")
            assert second.inner_text("#status-state") == "error"
            page.click("#stop")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'idle'")
            second.close()
        finally:
            browser.close()
        (artifacts_dir / "browser-console.log").write_text("\n".join(console))
    # The page works under its Content-Security-Policy (server/access/surface.py): nothing it does was blocked.
    assert not [line for line in console if "Content Security Policy" in line], console


def test_browser_file_text_and_refused_microphone(server_url, speech_wav, artifacts_dir):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=chromium_args(speech_wav))
        try:
            # The microphone refused: a message that says so and what to do instead.
            refused = browser.new_page()
            refused.add_init_script("""navigator.mediaDevices.getUserMedia = () =>
                Promise.reject(new DOMException("Permission denied", "NotAllowedError"));""")
            refused.goto(server_url)
            refused.click("#start")
            refused.wait_for_function("() => !document.getElementById('message').hidden", timeout=10000)
            assert "refused" in refused.inner_text("#message").lower()
            assert refused.inner_text("#status-state") == "error"
            refused.close()

            # An audio file, then text, through the push API of a session without a microphone.
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.goto(server_url)
            page.check("input[name=source][value=file]")
            page.click("#start")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'connected'",
                                   timeout=30000)
            page.set_input_files("#file", str(speech_wav))
            page.click("#send-file")
            page.wait_for_function("() => !document.getElementById('send-file').disabled")
            assert page.is_hidden("#message"), page.inner_text("#message")
            audio_in = page.evaluate("""async () => {
                const list = await (await fetch('/sessions')).json();
                return list.sessions[0].engine.audio_in_samples;
            }""")
            assert audio_in > 16000, audio_in
            page.screenshot(path=str(artifacts_dir / "browser-file.png"), full_page=True)
            page.click("#stop")
            if page.is_visible("#source-text-label"):  # /say needs espeak-ng on the server
                page.check("input[name=source][value=text]")
                page.click("#start")
                page.wait_for_function(
                    "() => document.getElementById('status-state').textContent === 'connected'", timeout=30000)
                page.fill("#text", "Hello from the text box.")
                page.click("#say")
                page.wait_for_function("() => !document.getElementById('say').disabled")
                assert page.is_hidden("#message"), page.inner_text("#message")
                page.click("#stop")
        finally:
            browser.close()


def read_recording(path: Path) -> dict:
    """What a player sees in a downloaded recording: its streams, and the decoded video and audio."""
    import av

    with av.open(str(path)) as container:
        info: dict = {"format": container.format.name,
                      "container_s": container.duration / 1e6 if container.duration else None,
                      "video_streams": len(container.streams.video), "audio_streams": len(container.streams.audio)}
        video = container.streams.video[0]
        info["codecs"] = [s.codec_context.name for s in container.streams]
        times = [float(f.pts * f.time_base) for f in container.decode(video) if f.pts is not None]
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        samples, rate, peak = 0, audio.rate, 0.0
        for frame in container.decode(audio):
            pcm = frame.to_ndarray()
            samples += frame.samples
            peak = max(peak, float(abs(pcm).max()) if pcm.size else 0.0)
    info.update(video_frames=len(times), video_s=(max(times) - min(times)) if times else 0.0,
                audio_s=samples / rate, audio_peak=peak)
    return info


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_browser_records_the_avatar_to_a_download(server_url, speech_wav, tmp_path, artifacts_dir, container):
    """Record 5 s of the returned stream in the page, download it, and play it back with PyAV. Chromium
    records mp4; "webm" hides that ability (as in Firefox, which records webm only) to test the fallback."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=chromium_args(speech_wav))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            if container == "webm":
                page.add_init_script("""{
                    const native = MediaRecorder.isTypeSupported.bind(MediaRecorder);
                    MediaRecorder.isTypeSupported = (type) => !type.startsWith("video/mp4") && native(type);
                }""")
            page.goto(server_url)
            assert page.is_disabled("#record")  # nothing to record before a stream plays
            page.click("#start")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'connected'",
                                   timeout=30000)
            page.wait_for_function("() => document.getElementById('avatar').videoWidth > 0", timeout=20000)
            page.wait_for_function("() => !document.getElementById('record').disabled", timeout=10000)
            sent: list[tuple[str, str]] = []
            page.on("request", lambda request: sent.append((request.method, request.url)))
            page.click("#record")
            started = time.monotonic()
            assert page.inner_text("#record") == "Stop recording"
            page.wait_for_timeout(2500)
            page.screenshot(path=str(artifacts_dir / f"browser-recording-{container}.png"))
            page.wait_for_timeout(max(0, 5000 - round(1000 * (time.monotonic() - started))))
            page.click("#record")
            # ~5 s, or longer when a loaded machine made the screenshot or the clicks slow
            recorded_s = time.monotonic() - started
            page.wait_for_function("() => !document.getElementById('recording').hidden", timeout=10000)
            shown = page.inner_text("#recording-details")
            shown_ms = int(page.get_attribute("#recording", "data-duration-ms") or 0)
            page.screenshot(path=str(artifacts_dir / f"browser-recorded-{container}.png"))
            with page.expect_download() as download_info:
                page.click("#recording-link")
            download = download_info.value
            saved = tmp_path / download.suggested_filename
            download.save_as(str(saved))
            during_recording = list(sent)
            page.set_viewport_size({"width": 390, "height": 844})
            page.screenshot(path=str(artifacts_dir / f"browser-recorded-{container}-phone.png"), full_page=True)
            page.click("#stop")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'idle'")
            assert page.is_disabled("#record") and page.is_visible("#recording-link")
        finally:
            browser.close()
    info = read_recording(saved)
    (artifacts_dir / f"browser-recording-{container}.txt").write_text(f"{saved.name}: {info}, shown {shown!r}\n")
    assert saved.suffix == f".{container}", saved.name
    assert shown.startswith(f"0:{round(shown_ms / 1000):02d}"), (shown, shown_ms)
    assert abs(shown_ms / 1000 - recorded_s) <= 0.75, (shown_ms, recorded_s)  # the page shows what it recorded
    assert 4500 <= shown_ms <= 8000, shown_ms
    assert info["video_streams"] == 1 and info["audio_streams"] == 1, info
    assert recorded_s - 1.0 <= info["video_s"] <= recorded_s + 1.5, (info, recorded_s)  # plays for what was recorded
    assert recorded_s - 1.0 <= info["audio_s"] <= recorded_s + 1.5, (info, recorded_s)  # so does the avatar's audio
    assert info["video_frames"] >= 50, info          # at least 10 fps on a loaded machine
    assert info["audio_peak"] > 0.01, info           # the avatar speaks in it: not a silent track
    # Nothing was uploaded: while recording and downloading the page only polled its status (GET).
    assert all(method == "GET" for method, _url in during_recording), during_recording


def test_browser_shows_link_quality_and_reconnects_after_a_lost_session(server_url, speech_wav):
    """The status line shows loss and rtt while connected; a session that ends under the page (here
    ended by the operator, as the server's peer timeout would) says the connection was lost and offers
    one-click Reconnect: a new session on the same avatar."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=chromium_args(speech_wav))
        try:
            page = browser.new_page()
            offers: list[dict] = []
            page.on("request", lambda r: offers.append(json.loads(r.post_data or "{}"))
                    if r.url.endswith("/offer") else None)
            page.goto(server_url)
            page.check("input[name=source][value=file]")
            page.click("#start")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'connected'",
                                   timeout=30000)
            page.wait_for_function(
                "() => /loss [\\d.]+ % · rtt (\\d+|\\u2013) ms/"
                ".test(document.getElementById('status-link').textContent)",
                timeout=10000)
            # The page's own session (its token is in the page's `session`), ended behind its back.
            first = page.evaluate("""async () => {
                const resp = await fetch('/sessions/' + session.id,
                    {method: 'DELETE', headers: {Authorization: 'Bearer ' + session.token}});
                return {id: session.id, status: resp.status};
            }""")
            assert first["status"] == 200, first
            page.wait_for_function("() => !document.getElementById('lost').hidden", timeout=10000)
            assert "lost" in page.inner_text("#lost").lower()
            assert page.inner_text("#status-state") == "closed"
            page.click("#reconnect")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'connected'",
                                   timeout=30000)
            assert page.is_hidden("#lost")
            second = page.evaluate("() => session.id")
            assert second != first["id"]
            assert len(offers) == 2
            assert offers[1]["options"]["avatar"] == "default"   # the avatar the first session had
            page.click("#stop")
        finally:
            browser.close()
