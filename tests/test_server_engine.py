"""The server with what `python run_server.py` loads: the embedded default avatar and the no-weights
default renderer, driven by an in-process aiortc client over loopback."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from server_helpers import Client, PcmTrack, echo_delays

from realtime.timeline.session_options import SessionOptions
from server.config import ServerConfig
from server.realtime_engine import RealtimeEngine

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow, pytest.mark.usefixtures("loopback_only")]

PRE_S, POST_S = 1.0, 1.0  # silence around the speech


@pytest.fixture(scope="module")
def engine():
    engine = RealtimeEngine.load(ServerConfig())
    yield engine
    engine.close()


@pytest.fixture
def server_engine(engine):
    return engine  # the module's engine (it closes it)


@pytest.fixture
def server_settings() -> dict:
    return {}


def mouth_box(engine) -> tuple[slice, slice]:
    """A box around the avatar's mouth over all its frames, with a margin for the open jaw."""
    pts = engine.avatar.mouth
    x1, x2 = int(pts[..., 0].min()) - 6, int(pts[..., 0].max()) + 6
    y1, y2 = int(pts[..., 1].min()) - 4, int(pts[..., 1].max()) + 6
    return slice(y1, y2), slice(x1, x2)


def openness(image: np.ndarray, box: tuple[slice, slice]) -> float:
    """Fraction of dark pixels around the mouth: the rendered open mouth shows a dark interior."""
    return float((image[box].astype(np.int32).sum(axis=2) < 200).mean())


async def test_default_avatar_talks_in_sync(server, http, engine, speech_16k):
    signal = np.concatenate([np.zeros(int(PRE_S * 16000), np.float32), speech_16k,
                             np.zeros(int(POST_S * 16000), np.float32)])
    client = Client(server, http)
    mic = PcmTrack(signal)
    await client.connect(microphone=mic)
    await client.wait_for_video(5)
    await asyncio.sleep(signal.size / 16000 + 1.0)
    t0 = mic.started_at

    # Frame rate: the avatar's, measured over the steady part.
    video = [(t - t0, img) for t, _, img in client.received.video]
    steady = [t for t, _ in video if 0.5 <= t <= signal.size / 16000]
    fps = (len(steady) - 1) / (steady[-1] - steady[0])
    assert abs(fps - engine.fps) < 2.0, fps
    assert video[-1][1].shape == (512, 512, 3)

    # The mouth opens while the speech plays and rests in the silence before it.
    box = mouth_box(engine)
    open_t = np.array([openness(img, box) for _, img in video])
    times = np.array([t for t, _ in video])
    idle = open_t[(times > 0.2) & (times < PRE_S)]
    talking = open_t[(times > PRE_S + 0.5) & (times < PRE_S + speech_16k.size / 16000)]
    assert idle.max() < 0.02 and talking.max() > 0.05, (idle.max(), talking.max())

    async with http.get(client.url(), headers=client.auth) as resp:
        metrics = (await resp.json())["engine"]
    # The returned audio is the sent speech, delayed by the engine's fixed latency (at least L minus the
    # 20 ms jitter allowance: ~116 ms for the built-in renderer) plus the transport.
    floor_s = (metrics["latency_budget_ms"] - 20.0) / 1000.0
    matches = echo_delays(signal, client.audio_signal()[::3], t0 - client.received.audio[0][0])
    good = [delay for corr, delay in matches if corr > 0.8]
    assert len(good) >= 0.8 * len(matches) and all(floor_s < d < 1.0 for d in good), (floor_s, matches)

    # A/V: mouth movement and sound arrive together. aiortc's receiver holds audio back by its
    # 4-packet prefetch (80 ms), so video arriving up to ~150 ms earlier is still in sync.
    audio_times = np.array([t - t0 for t, _ in client.received.audio])
    audio_rms = np.array([np.sqrt(np.mean(a ** 2)) for _, a in client.received.audio])
    audio_onset = audio_times[np.argmax(audio_rms > 0.02)]
    video_onset = times[np.argmax(open_t > 0.04)]
    assert -0.2 < video_onset - audio_onset < 0.1, (video_onset, audio_onset)

    assert metrics["av_offset_max_abs_ms"] <= 1000 / engine.fps
    assert metrics["frames_rendered"] > 40
    assert metrics["frames_dropped"] <= 0.1 * metrics["frames_rendered"]
    await client.close()


def test_the_builtin_renderer_gets_a_renderer_sized_exact_delay(engine):
    """The server sizes each session's compute budget from the measured render cost: the built-in
    renderer (well under a millisecond a frame) gets 1.5 cost + one frame period, less than the fixed
    1.5 frames, and L exact to the sample (75 + 20 + ~41 ms), not rounded up to 160 ms. An offer that
    sets `compute_budget_frames` gets that fixed budget, and L in whole frames, instead."""
    period_ms = 1000.0 / engine.fps
    session = engine.open_session(SessionOptions())
    try:
        cost_ms = 1000.0 * engine.worker.warmup_cost.estimate(1)
        full_batch_ms = 1000.0 * engine.worker.warmup_cost.estimate(engine.worker.max_batch)
        budget_ms = 1000.0 * session.timeline.budget_samples / 16000
        assert cost_ms < 0.2 * period_ms
        # per frame, or the room to wait 10 ms for other sessions and render a full batch by the 5 ms margin
        expected_ms = max(1.5 * cost_ms + period_ms, min(10.0 + 5.0 + full_batch_ms, 1.5 * period_ms))
        assert budget_ms == pytest.approx(expected_ms, abs=0.1)
        assert budget_ms < 1.5 * period_ms
        assert session.latency_ms == pytest.approx(session.lookahead_ms + 20.0 + budget_ms, abs=0.1)
        assert session.latency_ms < 150.0
    finally:
        session.close()
    fixed = engine.open_session(SessionOptions(compute_budget_frames=1.5))
    try:
        assert fixed.latency_ms == 4 * period_ms   # 75 + 20 + 60 = 155, rounded up to whole frames
    finally:
        fixed.close()


async def test_push_and_interrupt_with_default_avatar(server, http, engine, speech_wav):
    client = Client(server, http)
    await client.connect()
    await client.wait_for_video(10)
    box = mouth_box(engine)
    url = client.url("/audio")
    async with http.post(url, data=speech_wav.read_bytes(),
                         headers={"Content-Type": "audio/wav", **client.auth}) as resp:
        assert resp.status == 200
    n0 = len(client.received.video)
    await asyncio.sleep(1.5)
    talking = [openness(img, box) for _, _, img in client.received.video[n0:]]
    assert max(talking) > 0.05, talking
    async with http.post(client.url("/interrupt"), headers=client.auth) as resp:
        assert resp.status == 200
    await asyncio.sleep(0.4)
    n1 = len(client.received.video)
    await asyncio.sleep(1.0)
    after = [openness(img, box) for _, _, img in client.received.video[n1:]]
    assert max(after) < 0.02, after
    await client.close()


def test_checkpoint_switches_to_wav2lip(tmp_path):
    """`--checkpoint` loads the Wav2Lip renderer (here an untrained generator saved like the official
    checkpoints: {"state_dict": ...}); the avatar and the session API stay the same."""
    pytest.importorskip("realtime.renderers.wav2lip")
    import torch

    from models.wav2lip import Wav2Lip

    checkpoint = tmp_path / "wav2lip_random.pth"
    torch.save({"state_dict": Wav2Lip().state_dict()}, checkpoint)
    engine = RealtimeEngine.load(ServerConfig(checkpoint=checkpoint, device="cpu"))
    try:
        assert engine.info["checkpoint"] == str(checkpoint) and engine.info["device"] == "cpu"
        assert "wav2lip" in engine.info["renderer"].lower()
        # CPU default: OpenVINO, with the precision the start-up gate measured and chose
        assert engine.info["runtime"] == "openvino"
        assert engine.info["precision"] in ("fp32", "bf16") and "precision_gate" in engine.info
        session = engine.open_session(SessionOptions())
        session.push_audio(np.zeros(3200, np.float32), 16000)
        assert session.next_video_frame().image.shape == (512, 512, 3)
        session.close()
        # feathered pastes (the default) let the generator skip rows no paste shows; a session
        # asking for the official hard paste would show them, so it is refused with the fix
        assert engine.worker.renderer.rows_from > 0
        with pytest.raises(ValueError, match="--paste-mode official"):
            engine.open_session(SessionOptions(paste_mode="official"))
    finally:
        engine.close()


def test_precision_and_paste_mode_flags():
    import argparse

    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    config = ServerConfig.from_args(parser.parse_args(["--precision", "bf16", "--paste-mode", "official"]), env={})
    assert (config.precision, config.paste_mode) == ("bf16", "official")
    config = ServerConfig.from_args(parser.parse_args([]), env={"LIPSYNC_PRECISION": "fp32"})
    assert config.precision == "fp32" and config.paste_mode == "feather"
    config.precision = "int3"
    with pytest.raises(ValueError, match="--precision"):
        config.validate()


def test_runtime_and_accuracy_bound_flags():
    import argparse

    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    config = ServerConfig.from_args(parser.parse_args([]), env={})
    assert (config.runtime, config.min_psnr_db) == ("auto", 35.0)
    config = ServerConfig.from_args(parser.parse_args(["--runtime", "torch", "--min-psnr-db", "40"]), env={})
    assert (config.runtime, config.min_psnr_db) == ("torch", 40.0)
    config = ServerConfig.from_args(parser.parse_args([]), env={"LIPSYNC_RUNTIME": "openvino"})
    assert config.runtime == "openvino"
    with pytest.raises(SystemExit):
        parser.parse_args(["--runtime", "tensorrt"])
    config.min_psnr_db = 0
    with pytest.raises(ValueError, match="--min-psnr-db"):
        config.validate()


def test_torch_runtime_flag_reaches_the_renderer(tmp_path):
    import torch

    from models.wav2lip import Wav2Lip

    checkpoint = tmp_path / "wav2lip_random.pth"
    torch.save({"state_dict": Wav2Lip().state_dict()}, checkpoint)
    engine = RealtimeEngine.load(ServerConfig(checkpoint=checkpoint, device="cpu", runtime="torch",
                                              precision="fp32"))
    try:
        assert (engine.info["runtime"], engine.info["precision"]) == ("torch", "fp32")
        assert "precision_gate" not in engine.info
    finally:
        engine.close()
