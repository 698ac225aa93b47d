"""Audio -> mouth parameters: per video frame, from the frame's own official mel window, no learned weights.

Output per frame (float32, all in [0, 1]):
    open   - jaw / lip-gap opening (0 = the avatar's own rest mouth, 1 = a wide /a/)
    spread - lip widening of front vowels and sibilants (/i/, /e/, /s/)
    round  - lip rounding / narrowing of back rounded vowels (/o/, /u/)

How (a viseme pipeline on the 80 Slaney mel bins that Wav2Lip already computes):
1. Per mel column: a loudness level (dB of the summed bin powers) and a spectral envelope (the
   log-mel spectrum cepstrally liftered across bins, which removes the pitch-harmonic ripple).
2. From the envelope: the first two formants (F1 = the first strong peak, ~ jaw height; F2 = the
   strongest peak above it, ~ tongue front/back and lip rounding) plus two band ratios (high-band hiss
   -> sibilant, nothing above 1 kHz -> nasal murmur). They place the column in a continuous viseme
   space whose corners are A (open), I (spread), U (rounded), S (sibilant) and M (closed nasal); see
   `VISEMES`. Formant positions, not whole-spectrum templates, are used on purpose: spectral tilt and
   the high band differ a lot between voices and TTS engines, formant positions much less.
3. open = loudness gate x the viseme's openness; spread / round = the viseme's lip shape.
4. Temporal smoothing is **stateless over the window** (the design choice of this module): the window
   for video frame i starts at the frame's own time, and only its first `window_columns` (5) columns,
   now..+62.5 ms, are read, so a frame waits for 75 ms of future audio (the engine's look-ahead for this
   renderer), not the whole window's 212.5 ms. An asymmetric
   kernel peaked slightly ahead of "now" (`lead_ms`) takes a weighted *max* over the columns: columns
   later than the peak fade quickly (attack: the jaw is fully open `lead_ms` before a syllable and
   starts ~2 x `attack_ms` earlier, as real lips do), columns between now and the peak fade more slowly
   (release: a dip shorter than the kernel does not snap the mouth shut, so it does not flicker). The
   window holds no audio older than "now", so the mouth is at rest within ~1 frame of a silence
   (plus the 25 ms half-width of the STFT window); the lead keeps that from looking abrupt.
   Being a pure function of one window, the mapping is deterministic, independent of batch order and
   safe to share between sessions: there is no per-stream state to key, reset or leak.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from realtime.mel import COLUMNS_PER_SECOND, MAX_ABS_VALUE, MEL_STEP, N_MELS, mel_basis

PARAMS = ("open", "spread", "round")
_DB_PER_UNIT = 100.0 / (2 * MAX_ABS_VALUE)  # the official normalisation maps 100 dB onto [-4, 4]

# Corners of the viseme space as (open factor, spread, round); each column blends between them.
VISEMES: dict[str, tuple[float, float, float]] = {
    "A": (1.00, 0.10, 0.00),  # open vowel: high F1
    "I": (0.40, 1.00, 0.00),  # close front vowel: low F1, high F2 -> spread lips
    "U": (0.45, 0.00, 1.00),  # close back rounded vowel: low F1, low F2 -> rounded, narrow lips
    "S": (0.22, 0.70, 0.00),  # sibilant / fricative: energy above 3.5 kHz, teeth nearly together
    "M": (0.06, 0.00, 0.10),  # nasal murmur: voiced, little above ~1 kHz -> lips (nearly) closed
}


@dataclass(frozen=True)
class MouthParamsConfig:
    # Loudness in dB of summed mel-bin powers: digital silence = 19 dB, a full-scale sine ~ 98 dB
    # (level ~ dBFS + 98). Below `gate_db` the mouth rests; at `full_db` a vowel reaches full opening.
    gate_db: float = 44.0
    full_db: float = 74.0
    level_gamma: float = 0.8       # < 1 opens the mouth a bit earlier in a syllable's rise
    # Formant search ranges (Hz); F1 = the first envelope peak within `f1_within_db` of the band max.
    f1_range: tuple[float, float] = (200.0, 1000.0)
    f2_range: tuple[float, float] = (750.0, 2900.0)
    f1_within_db: float = 8.0
    lifter_keep: int = 28          # cepstral coefficients kept for the envelope (of 80)
    # Where the viseme coordinates saturate (Hz or dB): smoothstep(lo, hi).
    f1_open: tuple[float, float] = (320.0, 720.0)        # F1 -> openness (A vs I/U)
    f2_front: tuple[float, float] = (1500.0, 2200.0)     # F2 -> spread (I)
    f2_back: tuple[float, float] = (1000.0, 870.0)       # F2 -> rounding (U); decreasing on purpose
    hiss_db: tuple[float, float] = (0.0, 15.0)           # E(3.5-7.6 kHz) - E(150-1000 Hz) -> S
    # (/s/ sits at +30 dB; vowels at -20..-50 dB, bright TTS voices such as espeak-ng's near 0 dB)
    murmur_db: tuple[float, float] = (-24.0, -36.0)      # E(1-4 kHz) - E(150-500 Hz) -> M
    # Temporal kernel over the 16 columns (12.5 ms each) of a window that starts at the frame's time.
    lead_ms: float = 50.0          # the mouth shows the audio this far ahead of the frame (lips lead sound)
    attack_ms: float = 35.0        # decay of the look-ahead side: how early an opening is anticipated
    release_ms: float = 90.0       # decay of the past side: how long a stopped sound holds the mouth open
    shape_attack_ms: float = 30.0  # lip shape: a weighted mean over a slightly narrower kernel
    # Columns of the window read: 5 = now..+62.5 ms, final 75 ms after the frame's time (the
    # renderer's look-ahead, hence the delay of a live stream). The attack side of the kernel past
    # them weighs < 0.5 of the peak; the mouth still opens ~1 frame before a syllable.
    window_columns: int = 5


@dataclass(frozen=True)
class _Analysis:
    freqs: np.ndarray               # (80,) centre frequency of each mel bin
    bands: dict[str, np.ndarray]    # name -> (80,) bool bin selections
    open_kernel: np.ndarray         # (16,) weights for the weighted max of the opening
    shape_kernel: np.ndarray        # (16,) weights for the weighted mean of the shape


def _bin_centres() -> np.ndarray:
    """Centroid frequency of each Slaney mel filter (within a few Hz of its centre)."""
    basis = mel_basis().astype(np.float64)
    freqs = np.linspace(0.0, 8000.0, basis.shape[1])
    return (basis @ freqs) / basis.sum(axis=1)


def _kernel(lead_ms: float, attack_ms: float, release_ms: float, columns: int = MEL_STEP) -> np.ndarray:
    """Asymmetric weights over the 16 columns: 1 at the lead column, exponential tails either side,
    zero past the first `columns` (audio the renderer does not wait for)."""
    t_ms = (np.arange(MEL_STEP) + 0.5) * 1000.0 / COLUMNS_PER_SECOND  # column centre after the frame time
    ahead = t_ms - lead_ms
    w = np.where(ahead >= 0, np.exp(-ahead / attack_ms), np.exp(ahead / release_ms))
    # The past side ends at column 0 (older audio is not in the window): taper it towards zero there,
    # so the last frame before a silence does not jump from "half open" straight to rest.
    taper = np.clip(t_ms / max(lead_ms, 1e-3), 0.0, 1.0) ** 0.7
    w = np.where(ahead >= 0, w, w * taper)
    w[columns:] = 0.0
    return (w / w.max()).astype(np.float32)  # a steady sound gives its full value


@lru_cache(maxsize=8)
def _analysis(config: MouthParamsConfig) -> _Analysis:
    f = _bin_centres()

    def band(lo: float, hi: float) -> np.ndarray:
        return (f >= lo) & (f <= hi)

    bands = {
        "f1": band(*config.f1_range), "f2": band(*config.f2_range),
        "low": band(150.0, 1000.0), "bass": band(150.0, 500.0),
        "mid": band(1000.0, 4000.0), "hiss": band(3500.0, 7600.0),
    }
    return _Analysis(
        freqs=f, bands=bands,
        open_kernel=_kernel(config.lead_ms, config.attack_ms, config.release_ms, config.window_columns),
        shape_kernel=_kernel(config.lead_ms, config.shape_attack_ms, config.release_ms, config.window_columns),
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
    return (dct.T * taper) @ dct


def _envelope(db: np.ndarray, keep: int) -> np.ndarray:
    """(B, 80, T) dB -> smooth spectral envelope (B, 80, T) by cepstral liftering across the bins."""
    return np.einsum("ij,bjt->bit", _lifter_matrix(db.shape[1], keep), db)


def _band_db(power: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.sum(power[:, mask], axis=1) + 1e-3)


def _first_peak_hz(env: np.ndarray, mask: np.ndarray, freqs: np.ndarray, within_db: float) -> np.ndarray:
    """Lowest-frequency local maximum of the envelope inside `mask` that is within `within_db` of the
    band's maximum: F1 is the *first* strong resonance, which for back vowels (F1 and F2 both below
    1 kHz) is not always the strongest one."""
    e = env[:, mask]  # (B, k, T)
    pad = np.pad(e, ((0, 0), (1, 1), (0, 0)), mode="constant", constant_values=-np.inf)
    is_peak = (e >= pad[:, :-2]) & (e >= pad[:, 2:]) & (e >= e.max(axis=1, keepdims=True) - within_db)
    return freqs[mask][np.argmax(is_peak, axis=1)]  # argmax of a bool finds the first True


def _strongest_peak_hz(env: np.ndarray, mask: np.ndarray, freqs: np.ndarray, above_hz: np.ndarray) -> np.ndarray:
    """Frequency of the strongest local maximum of the envelope inside `mask` and above `above_hz`
    (B, T); where there is none (a formant merged into a shoulder), the strongest bin there."""
    f = freqs[mask]
    e = np.where(f[None, :, None] > above_hz[:, None, :], env[:, mask], -np.inf)
    pad = np.pad(e, ((0, 0), (1, 1), (0, 0)), mode="constant", constant_values=-np.inf)
    is_peak = (e > pad[:, :-2]) & (e >= pad[:, 2:]) & np.isfinite(e)
    peaks = np.where(is_peak, e, -np.inf)
    best = np.where(is_peak.any(axis=1), np.argmax(peaks, axis=1), np.argmax(e, axis=1))
    return f[best]


def _vowel_shape(f1: np.ndarray, f2: np.ndarray, config: MouthParamsConfig) -> np.ndarray:
    """(open factor, spread, round) of a vowel from its first two formants, (B, 3, T).

    F1 rises with jaw opening (/i/, /u/ ~300 Hz; /a/ ~750 Hz). F2 separates front spread vowels
    (/i/, /e/: F2 > 1.8 kHz) from back rounded ones (/o/, /u/: F2 < 0.95 kHz); /a/ sits between.
    """
    openness = _smoothstep(f1, *config.f1_open)
    front = _smoothstep(f2, *config.f2_front)
    back = _smoothstep(-f2, -config.f2_back[0], -config.f2_back[1])
    a, i = (np.asarray(VISEMES[k], dtype=np.float32) for k in "AI")
    open_factor = i[0] + (a[0] - i[0]) * openness
    spread = front * (1.0 - 0.4 * openness) + a[1] * openness
    rounding = back * (1.0 - 0.4 * openness)
    return np.stack([open_factor, spread, rounding], axis=1)


def column_features(mels: np.ndarray, config: MouthParamsConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per column: loudness gate in [0, 1] (B, T) and mouth shape (open factor, spread, round) (B, 3, T)."""
    a = _analysis(config)
    db = (np.asarray(mels, dtype=np.float32) + MAX_ABS_VALUE) * _DB_PER_UNIT  # 0 dB = digital silence
    power = 10.0 ** (db / 10.0)
    level = 10.0 * np.log10(np.sum(power, axis=1))
    gate = np.clip((level - config.gate_db) / (config.full_db - config.gate_db), 0.0, 1.0) ** config.level_gamma

    env = _envelope(db, config.lifter_keep)
    f1 = _first_peak_hz(env, a.bands["f1"], a.freqs, config.f1_within_db)
    f2 = _strongest_peak_hz(env, a.bands["f2"], a.freqs, f1 * 1.25)
    shape = _vowel_shape(f1, f2, config)

    hiss = _smoothstep(_band_db(power, a.bands["hiss"]) - _band_db(power, a.bands["low"]), *config.hiss_db)
    murmur = _smoothstep(-(_band_db(power, a.bands["mid"]) - _band_db(power, a.bands["bass"])),
                         -config.murmur_db[0], -config.murmur_db[1])
    hiss = hiss * (1.0 - murmur)
    s = np.asarray(VISEMES["S"], dtype=np.float32)[None, :, None]
    m = np.asarray(VISEMES["M"], dtype=np.float32)[None, :, None]
    shape = shape * (1.0 - hiss - murmur)[:, None] + s * hiss[:, None] + m * murmur[:, None]
    return gate.astype(np.float32), shape.astype(np.float32)


def mouth_params(mels: np.ndarray, config: MouthParamsConfig | None = None) -> np.ndarray:
    """(B, 80, 16) official mel windows -> (B, 3) float32 [open, spread, round], each in [0, 1]."""
    config = config or MouthParamsConfig()
    mels = np.asarray(mels, dtype=np.float32)
    if mels.ndim != 3 or mels.shape[1:] != (N_MELS, MEL_STEP):
        raise ValueError(f"expected mel windows of shape (B, {N_MELS}, {MEL_STEP}), got {mels.shape}")
    if len(mels) == 0:
        return np.zeros((0, len(PARAMS)), dtype=np.float32)
    a = _analysis(config)
    cols = config.window_columns  # the columns read (the rest of the window may be padding)
    gate, col_shape = column_features(mels[:, :, :cols], config)  # (B, cols), (B, 3, cols)
    open_kernel, shape_kernel = a.open_kernel[:cols], a.shape_kernel[:cols]

    # Jaw: weighted max of (gate x viseme openness) -> envelope-follower behaviour (module doc, 4.).
    opening = np.max(gate * col_shape[:, 0, :] * open_kernel, axis=1)

    # Lip shape: loudness- and kernel-weighted mean of the column shapes, then scaled by how much
    # sound is near "now", so the lips relax together with the jaw.
    vote = shape_kernel * gate
    total = vote.sum(axis=1)
    shape = np.einsum("bt,bpt->bp", vote, col_shape[:, 1:, :]) / np.maximum(total, 1e-6)[:, None]
    shape *= np.max(gate * shape_kernel, axis=1)[:, None]
    return np.concatenate([opening[:, None], shape], axis=1).astype(np.float32)
