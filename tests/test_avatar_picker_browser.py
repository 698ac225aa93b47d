"""The page's avatar picker in a real browser: `python run_server.py --avatars DIR` (two more avatars
prepared at start), headless Chromium picks one and the session plays that avatar. Screenshots of the
picker go to test-artifacts/ (avatar-picker.png, avatar-picker-session.png)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from test_avatar import write_clip
from test_browser import CHROMIUM, chromium_args, running_server

from models.face_detection import mesh_models_available
from realtime.avatars.default_avatar import load_default_avatar

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
    pytest.mark.skipif(not mesh_models_available(), reason="needs the face mesh model files"),
]


@pytest.fixture
def avatars_dir(tmp_path) -> Path:
    """Two short face clips of different sizes and looks: 'anna' (384 px) and 'ben' (320 px, mirrored,
    warmer)."""
    d = tmp_path / "avatars"
    d.mkdir()
    source = load_default_avatar().frames[:20]
    anna = [cv2.resize(np.ascontiguousarray(f), (384, 384), interpolation=cv2.INTER_AREA) for f in source]
    ben = []
    for f in source:
        image = cv2.resize(np.ascontiguousarray(f[:, ::-1]), (320, 320), interpolation=cv2.INTER_AREA)
        image = np.clip(image.astype(np.int16) + np.array([-25, 0, 30], np.int16), 0, 255).astype(np.uint8)
        ben.append(image)
    write_clip(d / "anna.mp4", anna)
    write_clip(d / "ben.mp4", ben)
    return d


@pytest.fixture
def server_url(avatars_dir, tmp_path, artifacts_dir):
    log_path = artifacts_dir / "avatar-picker-server.log"
    with running_server(["--port", "0", "--ice-host-addresses", "127.0.0.1", "--max-sessions", "2",
                         "--udp-ports", "46000-46999", "--avatars", str(avatars_dir),
                         "--avatar-cache-dir", str(tmp_path / "cache")], log_path, start_s=180) as url:
        yield url
    text = log_path.read_text()
    assert "[1/2] preparing anna.mp4" in text and "[2/2] preparing ben.mp4" in text, text
    assert "avatars: ben ready" in text, text


def test_picker_shows_posters_and_the_session_plays_the_chosen_avatar(server_url, speech_wav, artifacts_dir):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=chromium_args(speech_wav))
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.goto(server_url)
            page.wait_for_function("() => document.querySelectorAll('.avatar-card img').length === 3", timeout=15000)
            page.wait_for_function("() => [...document.querySelectorAll('.avatar-card img')]"
                                   ".every((img) => img.complete && img.naturalWidth === 256)", timeout=15000)
            assert page.is_visible("#avatars")
            names = page.eval_on_selector_all(".avatar-name", "els => els.map((e) => e.textContent)")
            assert names == ["Default", "anna", "ben"], names
            checked = page.get_attribute(".avatar-card[aria-checked=true]", "data-id")
            assert checked == "default"
            page.screenshot(path=str(artifacts_dir / "avatar-picker.png"), full_page=True)

            page.click(".avatar-card[data-id=ben]")
            assert page.get_attribute(".avatar-card[aria-checked=true]", "data-id") == "ben"
            page.check("input[name=source][value=file]")
            page.click("#start")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'connected'",
                                   timeout=30000)
            page.wait_for_function("() => document.getElementById('avatar').videoWidth > 0", timeout=20000)
            size = page.evaluate("[document.getElementById('avatar').videoWidth, "
                                 "document.getElementById('avatar').videoHeight]")
            assert size == [320, 320], size  # ben's size: the session plays the chosen avatar
            assert page.eval_on_selector_all(".avatar-card", "els => els.every((e) => e.disabled)")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(artifacts_dir / "avatar-picker-session.png"), full_page=True)
            page.click("#stop")
            page.wait_for_function("() => document.getElementById('status-state').textContent === 'idle'")
            assert not page.eval_on_selector_all(".avatar-card", "els => els.some((e) => e.disabled)")
        finally:
            browser.close()
