"""Local text-to-speech for POST /sessions/{id}/say: espeak-ng in a subprocess, never on the loop."""
from __future__ import annotations

import asyncio
import io
import logging
import shutil
import wave

import numpy as np

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4000


class TtsError(Exception):
    pass


class LocalTts:
    """Speak text with an espeak-compatible program (`--stdin --stdout` gives a wav on stdout)."""

    def __init__(self, command: str, timeout_s: float = 30.0) -> None:
        self.executable = shutil.which(command) if command else None
        self.timeout_s = timeout_s

    @property
    def available(self) -> bool:
        return self.executable is not None

    async def synthesize(self, text: str, voice: str | None = None,
                         words_per_minute: int | None = None) -> tuple[np.ndarray, int]:
        """Returns (int16 mono samples, sample rate)."""
        if self.executable is None:
            raise TtsError("no local TTS installed")
        args = [self.executable, "--stdin", "--stdout"]
        if voice:
            args += ["-v", voice]
        if words_per_minute:
            args += ["-s", str(int(words_per_minute))]
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(text.encode("utf-8")), self.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise TtsError(f"TTS failed: {err.decode(errors='replace').strip() or proc.returncode}")
        return parse_wav(out)


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """PCM16 wav bytes (length fields may be bogus, as when written to a pipe) -> (int16 mono, rate)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getsampwidth() != 2:
                raise TtsError("TTS produced a wav that is not 16-bit PCM")
            rate, channels = w.getframerate(), w.getnchannels()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    except (wave.Error, EOFError) as exc:
        raise TtsError(f"TTS produced no readable wav ({exc})") from None
    pcm = pcm[: pcm.shape[0] // channels * channels]
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return pcm, rate
