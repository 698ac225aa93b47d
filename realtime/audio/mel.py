"""Wav2Lip's audio front end: the official mel spectrogram, its per-frame windows, and a streaming twin.

All numbers follow the official `audio.py` / `hparams.py` (see shared/wav2lip/README.md, sections 3-4):
16 kHz mono, pre-emphasis 0.97, STFT n_fft = win = 800 (periodic Hann), hop 200, centred with
*reflect* padding (librosa <= 0.9 behaviour, which the released checkpoints were trained with),
80 Slaney mel bins from 55 to 7600 Hz, dB with a -100 dB floor, symmetric normalisation to [-4, 4].

librosa is deliberately not used: its first call compiles for ~30 s and its padding default changed in
0.10. The mel basis is computed here from the Slaney formulas and equals librosa's to float32 precision.
"""
from __future__ import annotations

import math
from enum import Enum
from functools import lru_cache

import numpy as np

from realtime.config import SAMPLE_RATE

N_FFT = 800
HOP = 200
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS_VALUE = 4.0
MEL_STEP = 16  # mel columns per video-frame window (200 ms)
COLUMNS_PER_SECOND = SAMPLE_RATE / HOP  # 80
SILENCE = -MAX_ABS_VALUE  # the normalised value of digital silence

_PAD = N_FFT // 2


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    mel = hz / f_sp
    log_part = hz >= min_log_hz
    mel[log_part] = min_log_mel + np.log(hz[log_part] / min_log_hz) / logstep
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    hz = f_sp * mel
    log_part = mel >= min_log_mel
    hz[log_part] = min_log_hz * np.exp(logstep * (mel[log_part] - min_log_mel))
    return hz


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """The (80, 401) float32 Slaney-normalised triangular filterbank (htk=False)."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    edges = np.linspace(_hz_to_mel(np.array([FMIN]))[0], _hz_to_mel(np.array([FMAX]))[0], N_MELS + 2)
    mel_freqs = _mel_to_hz(edges)
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]  # equal area per band
    basis = weights.astype(np.float32)
    basis.setflags(write=False)
    return basis


@lru_cache(maxsize=1)
def _mel_basis64() -> np.ndarray:
    """`mel_basis()` as float64, the precision the columns are computed in: made once, not per call (a
    256 KB copy on every push of every live session)."""
    basis = mel_basis().astype(np.float64)
    basis.setflags(write=False)
    return basis


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    n = np.arange(N_FFT)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)  # periodic Hann, as scipy.signal.get_window


def _preemphasis(wav: np.ndarray, previous: float = 0.0) -> np.ndarray:
    out = np.empty_like(wav)
    out[0] = wav[0] - PREEMPHASIS * previous
    out[1:] = wav[1:] - PREEMPHASIS * wav[:-1]
    return out


def _frames(signal: np.ndarray, count: int) -> np.ndarray:
    """The first `count` N_FFT-sample frames of `signal`, HOP apart (fewer if fewer fit), as a read-only view:
    `sliding_window_view(signal, N_FFT)[::HOP][:count]`, without its argument checks, which cost more than
    the FFT of the one or two columns a live 20 ms push makes (bench/RESULTS.md "Each session cheaper")."""
    if signal.ndim != 1 or len(signal) < N_FFT:
        return np.lib.stride_tricks.sliding_window_view(signal, N_FFT)[::HOP][:count]  # its errors
    fits = (len(signal) - N_FFT) // HOP + 1
    step = signal.strides[0]
    return np.lib.stride_tricks.as_strided(signal, shape=(min(count, fits), N_FFT), strides=(HOP * step, step),
                                           writeable=False)


def _columns(padded: np.ndarray, first: int, count: int) -> np.ndarray:
    """Normalised mel columns first..first+count-1 of a signal already padded by N_FFT/2 on the left."""
    if count <= 0:
        return np.zeros((N_MELS, 0), dtype=np.float32)
    frames = _frames(padded[first * HOP:], count)
    magnitude = np.abs(np.fft.rfft(frames * _window(), axis=1))  # (count, 401)
    mel = _mel_basis64() @ magnitude.T
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    norm = 2 * MAX_ABS_VALUE * (db - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS_VALUE
    out: np.ndarray = np.clip(norm, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)
    return out


def _as_float_mono(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"expected mono samples of shape (N,), got {wav.shape}")
    if wav.dtype == np.int16:
        return wav.astype(np.float64) / 32768.0
    return wav.astype(np.float64, copy=False)


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Official Wav2Lip mel of 16 kHz mono samples in [-1, 1]: (80, 1 + len(wav) // 200) float32."""
    wav = _as_float_mono(wav)
    if len(wav) == 0:
        return np.zeros((N_MELS, 0), dtype=np.float32)
    padded = np.pad(_preemphasis(wav), _PAD, mode="reflect")
    return _columns(padded, 0, 1 + len(wav) // HOP)


def window_starts(num_columns: int, fps: float) -> np.ndarray:
    """Start column of each video frame's window, per inference.py: int(i * 80 / fps), last one clamped.

    Frames continue while a full window fits; the first frame whose window would run past the end
    takes the last 16 columns and is the last frame.
    """
    mult = 80.0 / fps
    last = max(num_columns - MEL_STEP, 0)
    starts: list[int] = []
    i = 0
    while True:
        start = int(i * mult)  # float product then truncation, exactly as the official loop
        if start + MEL_STEP > num_columns:
            starts.append(last)
            break
        starts.append(start)
        i += 1
    return np.asarray(starts, dtype=np.int64)


class MelAlignment(Enum):
    """Where a frame's mel window starts relative to the frame.

    OFFICIAL: at the frame, as the official inference.py does (`int(i * 80 / fps)`).
    TRAINING: one frame before it, as Wav2Lip's training code does (`get_segmented_mels` crops the window
    of 1-indexed face frame i at frame i - 2, i.e. 0-indexed frame f gets the window of frame f - 1), so
    the network sees what it learned from, and the window ends one frame (40 ms at 25 fps) earlier: one
    frame less look-ahead. The first frame's window starts before the audio: silence columns fill it.
    """

    OFFICIAL = "official"
    TRAINING = "training"

    @property
    def offset_frames(self) -> int:
        return -1 if self is MelAlignment.TRAINING else 0


def window_start_column(frame: int, fps: float, offset_frames: int = 0) -> int:
    """Start column of frame `frame`'s window: int(j * 80 / fps) for j = frame + offset_frames (the
    official float product then truncation); floor for j < 0 (a window that starts before the audio)."""
    j = frame + offset_frames
    x = j * (COLUMNS_PER_SECOND / fps)
    return int(x) if j >= 0 else math.floor(x)


def mel_windows(mel: np.ndarray, fps: float,
                alignment: MelAlignment = MelAlignment.OFFICIAL) -> np.ndarray:
    """(N, 80, 16) windows, one per output video frame, per the official rule (or, with
    `MelAlignment.TRAINING`, each frame's window starting one frame earlier; same N).

    Audio shorter than one window (< 200 ms), which the official code does not handle, is padded
    on the right with silence so that it still yields one window.
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2 or mel.shape[0] != N_MELS:
        raise ValueError(f"expected a mel of shape (80, T), got {mel.shape}")
    if mel.shape[1] < MEL_STEP:
        mel = np.pad(mel, ((0, 0), (0, MEL_STEP - mel.shape[1])), constant_values=SILENCE)
    starts = window_starts(mel.shape[1], fps)
    if alignment is not MelAlignment.OFFICIAL:
        last = mel.shape[1] - MEL_STEP
        starts = np.asarray([min(window_start_column(i, fps, alignment.offset_frames), last)
                             for i in range(len(starts))], dtype=np.int64)
        pad = max(0, -int(starts.min()))
        mel = np.pad(mel, ((0, 0), (pad, 0)), constant_values=SILENCE)
        starts = starts + pad
    index = starts[:, None] + np.arange(MEL_STEP)[None, :]
    return np.ascontiguousarray(mel[:, index].transpose(1, 0, 2))


class StreamingMel:
    """Incremental `melspectrogram`: push samples in chunks of any size, get the newly final columns.

    Column t covers samples [200t - 400, 200t + 400) and is final once sample 200t + 399 has arrived
    (column 0 also needs sample 400, its reflect padding). The concatenation of everything `push` and
    `flush` return equals `melspectrogram` of the whole stream. Memory stays bounded: only the samples
    the next column still needs are kept.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prev_sample = 0.0
        self._received = 0          # samples pushed so far
        self._padded = np.zeros(0)  # pre-emphasised samples, reflect prefix included once available
        self._padded_base = 0       # padded-stream index of self._padded[0]
        self._started = False       # reflect prefix built
        self._pending = np.zeros(0)  # pre-emphasised samples held back until the prefix can be built
        self.columns_emitted = 0
        self._flushed = False

    @property
    def samples_received(self) -> int:
        return self._received

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add samples (float in [-1, 1] or int16); return the new final columns, shape (80, k)."""
        if self._flushed:
            raise RuntimeError("StreamingMel was flushed; call reset() to start a new stream")
        wav = _as_float_mono(samples)
        if len(wav):
            emphasised = _preemphasis(wav, self._prev_sample)
            self._prev_sample = float(wav[-1])
            self._received += len(wav)
            self._append(emphasised)
        return self._emit(self._final_columns())

    def flush(self) -> np.ndarray:
        """End of stream: the remaining columns, with the offline reflect padding at the end."""
        if self._flushed or self._received == 0:
            self._flushed = True
            return np.zeros((N_MELS, 0), dtype=np.float32)
        self._flushed = True
        if not self._started:  # shorter than the prefix needs: do it offline
            cols = melspectrogram_preemphasised(self._pending)
            self.columns_emitted = cols.shape[1]
            return cols
        tail = self._padded[len(self._padded) - (_PAD + 1):-1][::-1]  # y[N-2], y[N-3], ... reflect
        if len(tail) < _PAD:  # only possible for very short streams; np.pad-style repeat
            tail = np.pad(tail, (0, _PAD - len(tail)), mode="reflect")
        self._padded = np.concatenate([self._padded, tail])
        total = 1 + self._received // HOP
        return self._emit(total - self.columns_emitted)

    def _append(self, emphasised: np.ndarray) -> None:
        if not self._started:
            self._pending = np.concatenate([self._pending, emphasised])
            if len(self._pending) <= _PAD:
                return
            prefix = self._pending[_PAD:0:-1]  # reflect: y[400], y[399], ..., y[1]
            emphasised = np.concatenate([prefix, self._pending])
            self._pending = np.zeros(0)
            self._started = True
        self._padded = np.concatenate([self._padded, emphasised])

    def _final_columns(self) -> int:
        if not self._started:
            return 0
        available = 1 + (self._received - _PAD) // HOP if self._received >= N_FFT - _PAD else 0
        return max(0, available - self.columns_emitted)

    def _emit(self, count: int) -> np.ndarray:
        first_local = self.columns_emitted * HOP - self._padded_base
        cols = _columns(self._padded[first_local:], 0, count)
        self.columns_emitted += count
        # Drop samples no later column needs (the next column starts at padded index 200 * t).
        drop = self.columns_emitted * HOP - self._padded_base
        if drop > 0 and not self._flushed:
            self._padded = self._padded[drop:]
            self._padded_base += drop
        return cols


def melspectrogram_preemphasised(emphasised: np.ndarray) -> np.ndarray:
    """Offline mel of samples that are already pre-emphasised (used for streams too short to stream)."""
    if len(emphasised) == 0:
        return np.zeros((N_MELS, 0), dtype=np.float32)
    padded = np.pad(emphasised, _PAD, mode="reflect")
    return _columns(padded, 0, 1 + len(emphasised) // HOP)
