"""Audio -> mouth parameters: per video frame, from the frame's own mel window, no learned weights.

Output per frame (float32, all in [0, 1]), `PARAMS` order:
    open   - jaw opening (0 = the avatar's own rest mouth, 1 = a wide /a/); the lip gap is open x (1 - close)
    spread - lip widening of front vowels and sibilants (/i/, /e/, /s/)
    round  - lip rounding / narrowing of rounded vowels (/o/, /u/)
    close  - lips pressed together: the closure of /m/, /b/, /p/ (the lip gap is held shut)
    bite   - lower lip raised to the upper teeth: /f/, /v/
    teeth  - how much of the lip gap the teeth fill: /s/, /z/, /t/ and the bite

How (a viseme pipeline on the 80 Slaney mel bins the engine already computes):
1. Per mel column: a loudness level (dB of the summed bin powers), a spectral envelope (the log-mel
   spectrum cepstrally liftered across bins, which removes the pitch-harmonic ripple) and band levels.
2. From the envelope the first two formants: F1 (the first strong peak, ~ jaw height) and F2 (the
   strongest peak above it, ~ tongue front/back and lip rounding). F2 below an F1-dependent limit
   rounds the lips (/u/ with F1 ~300 Hz is rounded up to F2 ~1.7 kHz, as synthetic and fronted
   English /u/ are; an open vowel only when F2 is near 1 kHz), high F2 spreads them.
3. Consonants from band levels *relative to the loud columns around them* (the window holds audio on
   both sides of the frame, see 5.): a voiced dip of 10-20 dB with little energy above 1 kHz is a nasal
   murmur or a voice bar (/m/, /b/: lips closed); a silent gap between speech followed by a burst with
   little energy above 3.5 kHz is a labial stop closure (/p/; an alveolar /t/ bursts high and keeps
   the lips apart); frication (energy above 3.5 kHz over the low band) that is loud and peaked high is
   a sibilant (/s/: teeth together), weak and flat it is labiodental (/f/: the bite).
   Formant positions and relative levels, not whole-spectrum templates, are used on purpose: spectral
   tilt and absolute band levels differ a lot between voices and TTS engines, these much less.
4. open = loudness gate x the vowel's openness (the warp shuts the lips by `close`); spread / round =
   the vowel's lip shape; close / bite / teeth = the consonant evidence near the frame's time. The jaw's
   gate has its own, higher full-scale level than the lip shape's, so that it keeps following the
   envelope's syllable peaks in loud running speech instead of staying wide open through them.
5. Temporal smoothing is **stateless over the window** (the design choice of this module). The window
   of video frame i starts one video frame (40 ms at 25 fps) *before* the frame (`offset_frames` = -1)
   and `window_columns` (8) columns are read, so it spans ~45 ms of past and ~45 ms of future audio
   around the frame's time, and the frame still waits for only 72.5 ms of future audio (the look-ahead,
   hence the delay of a live stream; 75 ms with the older now-onwards window of 5 columns). The past
   columns are what tell a stop closure (speech, silence, speech) from a start out of silence.
   The jaw takes an asymmetric kernel's weighted *max* over the columns, peaked `lead_ms` ahead of the
   frame (attack: the mouth opens before a syllable, as real lips do; release: a dip shorter than the
   kernel does not snap it shut, so it does not flicker). Consonant shapes take a narrower kernel around
   the frame (anticipation: a closure shows from ~25 ms before its sound). Being a pure function of one
   window, the mapping is deterministic, independent of batch order and safe to share between
   sessions: there is no per-stream state to key, reset or leak.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from realtime.audio.mel import COLUMNS_PER_SECOND, MAX_ABS_VALUE, MEL_STEP, N_MELS, mel_basis
from realtime.renderers.base import AudioNeeds

PARAMS = ("open", "spread", "round", "close", "bite", "teeth")
OPEN, SPREAD, ROUND, CLOSE, BITE, TEETH = range(len(PARAMS))
_DB_PER_UNIT = 100.0 / (2 * MAX_ABS_VALUE)  # the official normalisation maps 100 dB onto [-4, 4]

# Corners of the vowel / fricative space as (open factor, spread, round); each column blends between them.
VISEMES: dict[str, tuple[float, float, float]] = {
    "A": (1.00, 0.10, 0.00),  # open vowel: high F1
    "I": (0.26, 1.00, 0.00),  # close front vowel: low F1, high F2 -> spread lips (a slit, lips apart)
    "U": (0.38, 0.00, 1.00),  # close back rounded vowel: low F1, low F2 -> rounded, narrow lips
    "S": (0.18, 0.70, 0.00),  # sibilant: energy above 3.5 kHz, teeth nearly together
    "F": (0.12, 0.20, 0.00),  # labiodental: lower lip at the upper teeth
}


@dataclass(frozen=True)
class MouthParamsConfig:
    # Loudness in dB of summed mel-bin powers: digital silence = 19 dB, a full-scale sine ~ 98 dB
    # (level ~ dBFS + 98). Below `gate_db` the mouth rests; at `full_db` a vowel reaches full opening.
    gate_db: float = 44.0
    full_db: float = 74.0
    # The jaw reaches full opening only at `jaw_full_db`, well above where the lip shape is complete: a
    # jaw that saturated at `full_db` stayed wide open through every loud stretch of running speech and
    # lost the syllable-to-syllable rise and fall of the envelope (the lip shape, by contrast, should
    # be complete at moderate loudness). With `level_gamma` > 1 the opening follows the amplitude more
    # than the dB level, as the speech envelope does.
    jaw_full_db: float = 76.0
    level_gamma: float = 1.6
    shape_gamma: float = 0.6       # < 1: the lips take a vowel's shape early in its rise
    # Formant search ranges (Hz); F1 = the first envelope peak within `f1_within_db` of the band max.
    f1_range: tuple[float, float] = (200.0, 1000.0)
    f2_range: tuple[float, float] = (750.0, 2900.0)
    f1_within_db: float = 8.0
    lifter_keep: int = 28          # cepstral coefficients kept for the envelope (of 80)
    # Where the vowel coordinates saturate (Hz): smoothstep(lo, hi).
    f1_open: tuple[float, float] = (320.0, 720.0)        # F1 -> openness (A vs I/U)
    f2_front: tuple[float, float] = (1800.0, 2300.0)     # F2 -> spread (I)
    # F2 -> rounding (U): round below a limit that falls from 1750 Hz (F1 <= 350) to 1150 Hz (F1 >= 550),
    # fully round `round_width_hz` below it.
    round_limit: tuple[float, float, float, float] = (350.0, 550.0, 1750.0, 1150.0)
    round_width_hz: float = 220.0
    # Consonants (dB differences of band levels; smoothstep(lo, hi)).
    dip_murmur_db: tuple[float, float] = (10.0, 18.0)    # voiced column this far below the loudest
    murmur_bright_db: tuple[float, float] = (12.0, 6.0)  # E(1-4 kHz) - E(150-500 Hz): decreasing
    fric_db: tuple[float, float] = (0.0, 10.0)           # E(3.5-7.6 kHz) - E(150-1000 Hz) -> frication
    sibilant_db: tuple[float, float] = (9.0, 14.0)       # E(3.5-7.6 kHz) - E(1.2-3 kHz): /s/ vs /f/
    bite_dip_db: tuple[float, float] = (8.0, 15.0)       # /f/ is weak: this far below the loudest
    bite_max_db: tuple[float, float] = (14.0, 18.0)      # ... and flat: E(3.5-7.6k) - E(150-1000) below this
    burst_high_db: tuple[float, float] = (6.0, 14.0)     # burst E(3.5-7.6k) - E(150-1000): not labial
    speech_db: float = 10.0        # a window holds speech when its loudest column is this far over the gate
    # Kernels over the columns, times relative to the frame's time (ms).
    lead_ms: float = 35.0          # the jaw shows the audio this far ahead of the frame (lips lead sound)
    attack_ms: float = 35.0        # decay of the look-ahead side: how early an opening is anticipated
    release_ms: float = 40.0       # decay of the past side: how long a stopped sound holds the mouth open
    shape_attack_ms: float = 25.0  # vowel lip shape: a weighted mean over a slightly narrower kernel
    consonant_span_ms: tuple[float, float] = (-12.0, 26.0)  # consonant evidence counts fully here ...
    consonant_decay_ms: float = 12.0                         # ... and decays this fast outside
    # The window read: it starts `offset_frames` video frames before the frame and `window_columns`
    # columns are read; `now_column` is where the frame's own time falls in it on average
    # (3.2 columns per frame at 25 fps, start truncated to a column: 3.2..4.2).
    window_columns: int = 8
    offset_frames: int = -1
    now_column: float = 3.7

    @property
    def audio_needs(self) -> AudioNeeds:
        """The part of each frame's window these parameters read (the renderer's look-ahead)."""
        return AudioNeeds(columns=self.window_columns, offset_frames=self.offset_frames)


@dataclass(frozen=True)
class _Analysis:
    freqs: np.ndarray               # (80,) centre frequency of each mel bin
    bands: dict[str, np.ndarray]    # name -> (80,) bool bin selections
    open_kernel: np.ndarray         # (columns,) weights for the weighted max of the opening
    shape_kernel: np.ndarray        # (columns,) weights for the weighted mean of the vowel shape
    consonant_kernel: np.ndarray    # (columns,) weights for the weighted max of consonant evidence


def _bin_centres() -> np.ndarray:
    """Centroid frequency of each Slaney mel filter (within a few Hz of its centre)."""
    basis = mel_basis().astype(np.float64)
    freqs = np.linspace(0.0, 8000.0, basis.shape[1])
    result: np.ndarray = (basis @ freqs) / basis.sum(axis=1)
    return result


def column_times_ms(config: MouthParamsConfig) -> np.ndarray:
    """Centre of each read column relative to the frame's time, in ms."""
    return (np.arange(config.window_columns) - config.now_column) * 1000.0 / COLUMNS_PER_SECOND


def _kernel(t_ms: np.ndarray, lead_ms: float, attack_ms: float, release_ms: float) -> np.ndarray:
    """Asymmetric weights: 1 at the lead time, exponential tails either side; the oldest column is
    tapered so that a sound leaving the window fades out instead of dropping."""
    ahead = t_ms - lead_ms
    w = np.where(ahead >= 0, np.exp(-ahead / attack_ms), np.exp(ahead / release_ms))
    w[0] *= 0.5
    result: np.ndarray = (w / w.max()).astype(np.float32)  # a steady sound gives its full value
    return result


def _plateau(t_ms: np.ndarray, span: tuple[float, float], decay_ms: float) -> np.ndarray:
    lo, hi = span
    w = np.exp(-np.maximum(0.0, np.maximum(lo - t_ms, t_ms - hi)) / decay_ms)
    return w.astype(np.float32)


@lru_cache(maxsize=8)
def _analysis(config: MouthParamsConfig) -> _Analysis:
    f = _bin_centres()

    def band(lo: float, hi: float) -> np.ndarray:
        return (f >= lo) & (f <= hi)

    bands = {
        "f1": band(*config.f1_range), "f2": band(*config.f2_range),
        "low": band(150.0, 1000.0), "bass": band(150.0, 500.0),
        "mid": band(1000.0, 4000.0), "upper": band(1200.0, 3000.0), "hiss": band(3500.0, 7600.0),
    }
    t = column_times_ms(config)
    return _Analysis(
        freqs=f, bands=bands,
        open_kernel=_kernel(t, config.lead_ms, config.attack_ms, config.release_ms),
        shape_kernel=_kernel(t, config.lead_ms, config.shape_attack_ms, config.release_ms),
        consonant_kernel=_plateau(t, config.consonant_span_ms, config.consonant_decay_ms),
    )


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@lru_cache(maxsize=4)
def _lifter_matrix(n_bins: int, keep: int) -> np.ndarray:
    """(n, n) matrix smoothing a log spectrum across bins by cepstral liftering: DCT-II, keep the first
    `keep` coefficients with a raised-cosine taper (no ringing), inverse DCT. It removes the pitch-
    harmonic ripple (periods of 3-7 bins below 1 kHz) while keeping formant peaks (>= ~12 bins apart)."""
    k = np.arange(n_bins)[:, None]
    j = np.arange(n_bins)[None, :]
    dct = np.cos(np.pi * k * (j + 0.5) / n_bins) * np.sqrt(2.0 / n_bins)
    dct[0] /= np.sqrt(2.0)  # orthonormal DCT-II, so the inverse is the transpose
    taper = np.where(np.arange(n_bins) < keep, 0.5 + 0.5 * np.cos(np.pi * np.arange(n_bins) / keep), 0.0)
    result: np.ndarray = (dct.T * taper) @ dct
    return result


def _envelope(db: np.ndarray, keep: int) -> np.ndarray:
    """(B, 80, T) dB -> smooth spectral envelope (B, 80, T) by cepstral liftering across the bins."""
    result: np.ndarray = np.matmul(_lifter_matrix(db.shape[1], keep), db)
    return result


def _band_db(power: np.ndarray, mask: np.ndarray) -> np.ndarray:
    result: np.ndarray = 10.0 * np.log10(np.sum(power[:, mask], axis=1) + 1e-3)
    return result


def _pad_bins(e: np.ndarray) -> np.ndarray:
    """(B, k, T) -> (B, k + 2, T) with a -inf bin either side: `np.pad`'s values without its Python,
    which costs many times the copy (two calls per `mouth_params` call whatever the batch, and the
    live render worker's batches are of one or two frames)."""
    pad = np.full((e.shape[0], e.shape[1] + 2, e.shape[2]), -np.inf, dtype=e.dtype)
    pad[:, 1:-1] = e
    return pad


def _first_peak_hz(env: np.ndarray, mask: np.ndarray, freqs: np.ndarray, within_db: float) -> np.ndarray:
    """Lowest-frequency local maximum of the envelope inside `mask` that is within `within_db` of the
    band's maximum: F1 is the *first* strong resonance, which for back vowels (F1 and F2 both below
    1 kHz) is not always the strongest one."""
    e = env[:, mask]  # (B, k, T)
    pad = _pad_bins(e)
    is_peak = (e >= pad[:, :-2]) & (e >= pad[:, 2:]) & (e >= e.max(axis=1, keepdims=True) - within_db)
    result: np.ndarray = freqs[mask][np.argmax(is_peak, axis=1)]  # argmax of a bool finds the first True
    return result


def _strongest_peak_hz(env: np.ndarray, mask: np.ndarray, freqs: np.ndarray, above_hz: np.ndarray) -> np.ndarray:
    """Frequency of the strongest local maximum of the envelope inside `mask` and above `above_hz`
    (B, T); where there is none (a formant merged into a shoulder), the strongest bin there."""
    f = freqs[mask]
    e = np.where(f[None, :, None] > above_hz[:, None, :], env[:, mask], -np.inf)
    pad = _pad_bins(e)
    is_peak = (e > pad[:, :-2]) & (e >= pad[:, 2:]) & np.isfinite(e)
    peaks = np.where(is_peak, e, -np.inf)
    best = np.where(is_peak.any(axis=1), np.argmax(peaks, axis=1), np.argmax(e, axis=1))
    result: np.ndarray = f[best]
    return result


def _vowel_shape(f1: np.ndarray, f2: np.ndarray, config: MouthParamsConfig) -> np.ndarray:
    """(open factor, spread, round) of a vowel from its first two formants, (B, 3, T).

    F1 rises with jaw opening (/i/, /u/ ~300 Hz; /a/ ~750 Hz). High F2 marks front spread vowels
    (/i/, /e/: F2 > 1.8 kHz); rounding lowers F2, so F2 under an F1-dependent limit marks rounded ones.
    """
    openness = _smoothstep(f1, *config.f1_open)
    front = _smoothstep(f2, *config.f2_front)
    lo_f1, hi_f1, lo_lim, hi_lim = config.round_limit
    limit = np.interp(f1, [lo_f1, hi_f1], [lo_lim, hi_lim])
    back = np.clip((limit - f2) / config.round_width_hz, 0.0, 1.0)
    back = back * back * (3.0 - 2.0 * back)
    a, i = (np.asarray(VISEMES[k], dtype=np.float32) for k in "AI")
    open_factor = i[0] + (a[0] - i[0]) * openness
    spread = front * (1.0 - 0.8 * openness) + a[1] * openness  # F2 of an open vowel is unreliable
    rounding = back * (1.0 - 0.4 * openness)
    return np.stack([open_factor, spread, rounding], axis=1)


@dataclass(frozen=True)
class ColumnFeatures:
    """Per column of a batch of windows, each (B, T) unless noted."""
    gate: np.ndarray      # loudness gate in [0, 1] (the jaw: nearly proportional to amplitude)
    presence: np.ndarray  # a faster-saturating gate (the lip shape holds at moderate loudness)
    shape: np.ndarray     # (B, 3, T) vowel / fricative (open factor, spread, round)
    closure: np.ndarray   # lips shut: nasal murmur / voice bar, or a labial stop's silent closure
    bite: np.ndarray      # labiodental frication
    sibilant: np.ndarray  # sibilant frication


def _next_loud(values: np.ndarray, loud: np.ndarray, default: float) -> np.ndarray:
    """For each column, `values` at the first later column that is loud (`default` when none)."""
    out = np.full(values.shape, default, dtype=np.float32)
    nxt = np.full(values.shape[0], default, dtype=np.float32)
    for t in range(values.shape[1] - 1, -1, -1):
        out[:, t] = nxt
        nxt = np.where(loud[:, t], values[:, t], nxt)
    return out


def column_features(mels: np.ndarray, config: MouthParamsConfig) -> ColumnFeatures:
    """The per-column evidence (see the module docstring, 1.-3.) of (B, 80, T) mel columns."""
    a = _analysis(config)
    db = (np.asarray(mels, dtype=np.float32) + MAX_ABS_VALUE) * _DB_PER_UNIT  # 0 dB = digital silence
    power = 10.0 ** (db / 10.0)
    level = 10.0 * np.log10(np.sum(power, axis=1))
    loudness = np.clip((level - config.gate_db) / (config.full_db - config.gate_db), 0.0, 1.0)
    jaw_loudness = np.clip((level - config.gate_db) / (config.jaw_full_db - config.gate_db), 0.0, 1.0)
    gate = jaw_loudness ** config.level_gamma

    env = _envelope(db, config.lifter_keep)
    f1 = _first_peak_hz(env, a.bands["f1"], a.freqs, config.f1_within_db)
    f2 = _strongest_peak_hz(env, a.bands["f2"], a.freqs, f1 * 1.25)
    shape = _vowel_shape(f1, f2, config)

    hiss_db = _band_db(power, a.bands["hiss"])
    fric = _smoothstep(hiss_db - _band_db(power, a.bands["low"]), *config.fric_db)
    sib = fric * _smoothstep(hiss_db - _band_db(power, a.bands["upper"]), *config.sibilant_db)
    bright = _band_db(power, a.bands["mid"]) - _band_db(power, a.bands["bass"])

    # Relative to the loudest column of the window: consonants are dips between louder vowels.
    loudest = level.max(axis=1, keepdims=True)
    dip = loudest - level
    speech = (loudest >= config.gate_db + config.speech_db).astype(np.float32)
    voiced = _smoothstep(level, config.gate_db - 4.0, config.gate_db + 4.0)
    murmur = (_smoothstep(dip, *config.dip_murmur_db) * voiced * (1.0 - fric)
              * _smoothstep(-bright, -config.murmur_bright_db[0], -config.murmur_bright_db[1]))
    # A silent gap with speech on both sides, released by a burst that is not high-pitched.
    audible = _smoothstep(level, config.gate_db, config.gate_db + 8.0)  # aspiration counts as speech
    loud = audible > 0.5  # the burst: the first audible column after the gap
    before = np.maximum.accumulate(audible, axis=1)
    after = np.maximum.accumulate(audible[:, ::-1], axis=1)[:, ::-1]
    burst_high = _next_loud(hiss_db - _band_db(power, a.bands["low"]), loud, default=np.nan)
    labial = np.where(np.isnan(burst_high), 0.5,
                      1.0 - _smoothstep(np.nan_to_num(burst_high), *config.burst_high_db))
    gap = (1.0 - voiced) * np.minimum(before, after) * labial
    closure = speech * np.maximum(murmur, gap)
    # /f/ is weak, flat frication; an alveolar burst (/t/) is weak too but much brighter.
    high_low = hiss_db - _band_db(power, a.bands["low"])
    bite = (speech * fric * (1.0 - _smoothstep(hiss_db - _band_db(power, a.bands["upper"]), *config.sibilant_db))
            * (1.0 - _smoothstep(high_low, *config.bite_max_db)) * _smoothstep(dip, *config.bite_dip_db) * voiced)

    s = np.asarray(VISEMES["S"], dtype=np.float32)[None, :, None]
    f = np.asarray(VISEMES["F"], dtype=np.float32)[None, :, None]
    shape = shape * (1.0 - sib - bite)[:, None] + s * sib[:, None] + f * bite[:, None]
    return ColumnFeatures(gate=gate.astype(np.float32), presence=(loudness ** config.shape_gamma).astype(np.float32),
                          shape=shape.astype(np.float32),
                          closure=closure.astype(np.float32), bite=bite.astype(np.float32),
                          sibilant=sib.astype(np.float32))


def mouth_params(mels: np.ndarray, config: MouthParamsConfig | None = None) -> np.ndarray:
    """(B, 80, 16) mel windows (aligned per `config.audio_needs`) -> (B, 6) float32 `PARAMS`, each in [0, 1]."""
    config = config or MouthParamsConfig()
    mels = np.asarray(mels, dtype=np.float32)
    if mels.ndim != 3 or mels.shape[1:] != (N_MELS, MEL_STEP):
        raise ValueError(f"expected mel windows of shape (B, {N_MELS}, {MEL_STEP}), got {mels.shape}")
    if len(mels) == 0:
        return np.zeros((0, len(PARAMS)), dtype=np.float32)
    a = _analysis(config)
    cols = config.window_columns  # the columns read (the rest of the window may be padding)
    c = column_features(mels[:, :, :cols], config)

    # Consonants near the frame's time: weighted max (a closure shows fully over its whole span).
    ck = a.consonant_kernel
    close = np.max(c.closure * ck, axis=1)
    bite = np.max(c.bite * ck, axis=1)
    # Teeth show with an audible sibilant (the lip-shape gate: frication is quieter than vowels, the jaw's
    # gate would barely move for it).
    sibilant = np.max(c.sibilant * c.presence * ck, axis=1)

    # Jaw: weighted max of (gate x openness) -> envelope-follower behaviour; nearly shut by a bite (the
    # lower lip rises to the upper teeth). A closure shuts the lips in the warp (mouth_warp.mouth_shape).
    opening = np.max(c.gate * c.shape[:, 0, :] * a.open_kernel, axis=1) * (1.0 - 0.6 * bite)

    # Lip shape: loudness- and kernel-weighted mean of the column shapes, then scaled by how much
    # sound is near "now", so the lips relax together with the jaw.
    vote = a.shape_kernel * c.presence
    total = vote.sum(axis=1)
    shape = np.einsum("bt,bpt->bp", vote, c.shape[:, 1:, :]) / np.maximum(total, 1e-6)[:, None]
    shape *= np.max(vote, axis=1)[:, None] * (1.0 - close)[:, None]
    teeth = np.maximum(sibilant, bite)
    out = np.concatenate([opening[:, None], shape, close[:, None], bite[:, None], teeth[:, None]], axis=1)
    result: np.ndarray = np.clip(out, 0.0, 1.0).astype(np.float32)
    return result
