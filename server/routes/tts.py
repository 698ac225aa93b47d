"""Local text-to-speech for POST /sessions/{id}/say: espeak-ng in a subprocess, never on the loop.

The request is validated (SayRequest) before anything runs; its length is checked against the
session's queue room from a lower bound of its spoken duration, so a text too long to queue is refused
before it is synthesised. A synthesis past the timeout is killed (TtsTimeout -> 504).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import wave
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from server.errors import ApiError

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4000
DEFAULT_WPM = 175  # espeak-ng's default speed
MIN_WPM, MAX_WPM = 80, 450
# Spoken English runs at about 5-6 characters (spaces included) per word; 8 per word makes the
# estimate a lower bound of the duration, so only texts that cannot fit are refused up front.
CHARS_PER_WORD_UPPER = 8.0


Blocking = Callable[..., Awaitable[Any]]  # run(fn, *args) off the loop, e.g. WorkPool.run_in_slot


class TtsError(Exception):
    pass


class TtsTimeout(TtsError):
    pass


@dataclass(frozen=True)
class SayRequest:
    """The body of POST /sessions/{id}/say: {"text": "...", "voice"?: "en-us", "wpm"?: 80..450}."""

    text: str
    voice: str | None = None
    wpm: int | None = None

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "SayRequest":
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "missing 'text'")
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError(413, f"text longer than {MAX_TEXT_CHARS} characters")
        voice = body.get("voice")
        if voice is not None and (not isinstance(voice, str) or len(voice) > 32 or not _VOICE.fullmatch(voice)):
            raise ApiError(400, "'voice' must be a voice name like 'en' or 'en-us'")
        wpm = body.get("wpm")
        if wpm is not None and (isinstance(wpm, bool) or not isinstance(wpm, int)
                                or not MIN_WPM <= wpm <= MAX_WPM):
            raise ApiError(400, f"'wpm' must be an integer between {MIN_WPM} and {MAX_WPM}")
        return cls(text, voice, wpm)

    @property
    def min_duration_s(self) -> float:
        """A lower bound of how long the text takes to say."""
        words = len(self.text) / CHARS_PER_WORD_UPPER
        return 60.0 * words / (self.wpm or DEFAULT_WPM)


_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")


class LocalTts:
    """Speak text with an espeak-compatible program (`--stdin --stdout` gives a wav on stdout)."""

    def __init__(self, command: str, timeout_s: float = 30.0) -> None:
        self.executable = shutil.which(command) if command else None
        self.timeout_s = timeout_s

    @property
    def available(self) -> bool:
        return self.executable is not None

    async def synthesize(self, text: str, voice: str | None = None, words_per_minute: int | None = None,
                         run: Blocking | None = None) -> tuple[np.ndarray, int]:
        """Returns (int16 mono samples, sample rate). `run(fn, *args)` runs the blocking wait for the
        program off the loop (the route passes its decode/TTS slot's thread; default: a thread of the
        loop's default executor).

        The program is started with `subprocess.Popen` on that thread, not the loop's `create_subprocess_exec`:
        uvloop's (server/ops/event_loop.py) runs Python's at-fork handlers in the forked child, which
        in a server with encoder, render and decoder threads hung the child before it could exec (the
        request, then the worker's shutdown, waited forever); CPython's fork-exec runs no Python there."""
        if self.executable is None:
            raise TtsError("no local TTS installed")
        args = [self.executable, "--stdin", "--stdout"]
        if voice:
            args += ["-v", voice]
        if words_per_minute:
            args += ["-s", str(int(words_per_minute))]
        speech = _Speech(args)
        talk = asyncio.ensure_future((run or asyncio.to_thread)(speech.run, text.encode("utf-8")))
        try:
            out, err, code = await asyncio.wait_for(asyncio.shield(talk), self.timeout_s)
        except asyncio.TimeoutError:
            speech.kill()
            await talk  # returns once the killed group's pipes close; communicate reaps the process
            raise TtsTimeout(f"TTS took longer than {self.timeout_s:g} s") from None
        except asyncio.CancelledError:
            speech.kill()  # the thread's communicate then returns and reaps it
            raise
        if code != 0:
            raise TtsError(f"TTS failed: {err.decode(errors='replace').strip() or code}")
        return parse_wav(out)


class _Speech:
    """One run of the TTS program, started and waited for on a thread; `kill` from the loop ends it
    (and anything it started: its own process group) whether it has started yet or not."""

    def __init__(self, args: list[str]) -> None:
        self._args = args
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._killed = False

    def run(self, data: bytes) -> tuple[bytes, bytes, int]:
        with self._lock:
            if self._killed:
                return b"", b"killed", -signal.SIGKILL
            self._proc = subprocess.Popen(self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True)
        out, err = self._proc.communicate(data)
        return out, err, self._proc.returncode

    def kill(self) -> None:
        """A child left holding the pipes would keep `communicate()` from returning: the whole group."""
        with self._lock:
            self._killed = True
            if self._proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)


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
