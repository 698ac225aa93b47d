"""Shared test fixtures: small media made on the fly (espeak-ng speech), never downloaded."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"
WAV2LIP_FACTS = DATA / "wav2lip"  # facts about the official code; see tests/data/README.md
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


FRAMEWORK_TESTS = ("tests.test_examples_", "tests.test_integration_", "test_examples_", "test_integration_")


def pytest_asyncio_loop_factories(config, item):
    """Every async test runs on the event loop the server serves on (ServerConfig's default
    --event-loop, made by server/ops/event_loop.py): the servers the tests start are on production's loop.

    Except the framework adapters' and examples' tests (`FRAMEWORK_TESTS`): there our code runs inside a
    Pipecat or LiveKit Agents app, on the loop that app makes, asyncio's own by default. They run on it,
    so what they show is what those users get (and the example bot's `asyncio.create_subprocess_exec`
    for espeak-ng, which hangs under uvloop in a process with threads, is the user's choice of loop)."""
    from server.ops.event_loop import DEFAULT_LOOP, loop_factory

    kind = "asyncio" if item.module.__name__.startswith(FRAMEWORK_TESTS) else DEFAULT_LOOP
    return {kind: loop_factory(kind)}


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a PCM16 wav as float32 mono in [-1, 1]."""
    with wave.open(str(path), "rb") as w:
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    pcm = pcm.reshape(-1, channels).mean(axis=1)
    return (pcm / 32768.0).astype(np.float32), rate


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32767), -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def synthesize(text: str, path: Path, rate: int = 16000) -> Path:
    """Speak `text` with espeak-ng into a mono PCM16 wav at `rate`."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run([exe, "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    samples, src_rate = read_wav(raw)
    raw.unlink()
    if src_rate != rate:
        # Linear resampling is fine for test media; the product uses PyAV's resampler.
        t_src = np.arange(len(samples)) / src_rate
        t_dst = np.arange(int(len(samples) * rate / src_rate)) / rate
        samples = np.interp(t_dst, t_src, samples).astype(np.float32)
    return write_wav(path, samples, rate)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def speech_wav(media_dir) -> Path:
    """About 3 s of English speech, 16 kHz mono PCM16."""
    return synthesize("Hello there. The quick brown fox jumps over the lazy dog.", media_dir / "speech.wav")


@pytest.fixture(scope="session")
def speech_16k(speech_wav) -> np.ndarray:
    return read_wav(speech_wav)[0]


@pytest.fixture(scope="session")
def speech_with_gap_16k(speech_16k) -> np.ndarray:
    """Speech, 1.5 s of digital silence, speech again."""
    gap = np.zeros(24000, dtype=np.float32)
    return np.concatenate([speech_16k, gap, speech_16k])


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def loopback_only():
    """aioice offers only 127.0.0.1 as a host candidate: nothing touches another interface."""
    from server.network.ice import use_host_addresses

    restore = use_host_addresses(["127.0.0.1"])
    yield
    restore()


@pytest.fixture
async def http():
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def server_engine():
    """The engine behind `server`: the tiny test engine (tests/server_helpers.py). A test file that needs
    another one overrides this fixture (and owns that engine's closing)."""
    from server_helpers import tiny_engine

    engine = tiny_engine()
    yield engine
    engine.close()


@pytest.fixture
def server_settings() -> dict:
    """ServerConfig fields for `server`; a test file that needs other limits overrides this fixture."""
    return {"max_sessions": 3, "connect_timeout_s": 10.0}


@pytest.fixture
async def server(server_engine, server_settings):
    """The one live server of the tests, on loopback: `server_engine` with `server_settings`."""
    from server_helpers import start_server

    running = await start_server(server_engine, **server_settings)
    yield running
    await running.stop()


@pytest.fixture
def clean_log(caplog):
    """After the test: no ERROR record, no traceback, and none of the listed secrets (the fixture's value:
    append a token to it) in any log line, at DEBUG, from set-up and the test itself."""
    caplog.set_level(logging.DEBUG)
    secrets: list[str] = []
    yield secrets
    for record in caplog.get_records("setup") + caplog.get_records("call"):
        assert record.levelno < logging.ERROR, record.getMessage()
        assert record.exc_info is None, record.getMessage()
        text = record.getMessage() + json.dumps({k: str(v) for k, v in vars(record).items()})
        for secret in secrets:
            assert secret not in text, record.getMessage()
