"""Visemes of the no-weights renderer on espeak-ng speech of known material.

Each rule is checked by a function that is also run on parameters from a deliberately broken
configuration (rounding off, consonants off): the check must then fail, so these tests can fail.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import read_wav, synthesize
from test_default_renderer import SyntheticAvatar, synthetic_avatar

from realtime.audio.mel import SAMPLE_RATE, MelAlignment, mel_windows, melspectrogram
from realtime.renderers.base import AudioNeeds
from realtime.renderers.compositor import paste
from realtime.renderers.default import DefaultRenderer, DefaultRendererConfig
from realtime.renderers.mouth_params import (
    BITE,
    CLOSE,
    OPEN,
    ROUND,
    SPREAD,
    TEETH,
    MouthParamsConfig,
    mouth_params,
)
from realtime.renderers.mouth_warp import MouthWarpConfig

log = logging.getLogger(__name__)
FPS = 25.0
CONFIG = MouthParamsConfig()
ROUNDING_OFF = replace(CONFIG, round_limit=(350.0, 550.0, 0.0, 0.0))
CONSONANTS_OFF = replace(CONFIG, speech_db=500.0)  # no window ever holds "speech": no closure, no bite
MATERIAL = ("ah", "ee", "oo", "ama", "aba", "apa", "afa", "asa", "ata", "ma", "pa", "ba", "fa")


@pytest.fixture(scope="module")
def spoken(media_dir: Path) -> dict[str, np.ndarray]:
    return {text: read_wav(synthesize(text, media_dir / f"viseme_{text}.wav"))[0] for text in MATERIAL}


def windows(wav: np.ndarray, needs: AudioNeeds = CONFIG.audio_needs) -> np.ndarray:
    alignment = {a.offset_frames: a for a in MelAlignment}[needs.offset_frames]
    return mel_windows(melspectrogram(wav), FPS, alignment)


def params_of(wav: np.ndarray, config: MouthParamsConfig = CONFIG) -> np.ndarray:
    return mouth_params(windows(wav), config)


def sounding(p: np.ndarray) -> np.ndarray:
    return p[p[:, OPEN] > 0.15]


def check_vowels(ah: np.ndarray, ee: np.ndarray, oo: np.ndarray) -> None:
    a, i, u = (np.median(sounding(p), axis=0) for p in (ah, ee, oo))
    log.info("median params: ah %s ee %s oo %s", *(np.round(v, 2).tolist() for v in (a, i, u)))
    assert i[SPREAD] > 0.6 and i[ROUND] < 0.1, "ee spreads the lips"
    assert u[ROUND] > 0.5 and u[SPREAD] < 0.1, "oo rounds the lips"
    assert a[OPEN] > 0.8 and a[OPEN] >= 2 * i[OPEN] and a[OPEN] >= 2 * u[OPEN], "ah opens twice as high"
    assert a[ROUND] < 0.2 and a[SPREAD] < i[SPREAD] - 0.4


def check_closure(p: np.ndarray) -> None:
    """Between two open vowels some frame has the lips pressed and the gap shut."""
    open_frames = np.flatnonzero(p[:, OPEN] > 0.5)
    assert len(open_frames) >= 2
    middle = p[open_frames[0]:open_frames[-1] + 1]
    k = int(np.argmax(middle[:, CLOSE]))
    lip_gap = middle[k, OPEN] * (1.0 - middle[k, CLOSE])  # what the warp opens (mouth_warp.mouth_shape)
    assert middle[k, CLOSE] > 0.8 and lip_gap < 0.1, f"no closure: {np.round(middle, 2).tolist()}"
    assert p[:open_frames[0] + k, OPEN].max() > 0.5 and p[open_frames[0] + k:, OPEN].max() > 0.5


def test_vowels_from_speech(spoken):
    check_vowels(*(params_of(spoken[v]) for v in ("ah", "ee", "oo")))


def test_rounding_switched_off_is_caught(spoken):
    with pytest.raises(AssertionError, match="oo rounds"):
        check_vowels(*(params_of(spoken[v], ROUNDING_OFF) for v in ("ah", "ee", "oo")))


@pytest.mark.parametrize("text", ["ama", "aba", "apa"])
def test_bilabials_close_the_lips(spoken, text):
    check_closure(params_of(spoken[text]))


@pytest.mark.parametrize("text", ["ama", "aba", "apa"])
def test_closure_switched_off_is_caught(spoken, text):
    with pytest.raises(AssertionError, match="no closure"):
        check_closure(params_of(spoken[text], CONSONANTS_OFF))


@pytest.mark.parametrize("text", ["ata", "asa", "afa"])
def test_other_consonants_keep_the_lips_apart(spoken, text):
    p = params_of(spoken[text])
    assert p[:, CLOSE].max() < 0.3


def test_labiodental_bites_and_sibilant_shows_teeth(spoken):
    f, s, t = (params_of(spoken[k]) for k in ("afa", "asa", "ata"))
    k = int(np.argmax(f[:, BITE]))
    assert f[k, BITE] > 0.7 and f[k, TEETH] > 0.7 and f[k, OPEN] < 0.6
    assert s[:, BITE].max() < 0.3 and s[:, TEETH].max() > 0.7
    assert t[:, BITE].max() < 0.3
    assert params_of(spoken["afa"], CONSONANTS_OFF)[:, BITE].max() == 0.0


@pytest.mark.parametrize("text", ["ma", "ba", "fa"])
def test_syllables_from_silence(spoken, text):
    """The consonant shows at the syllable's start, then the vowel opens the jaw."""
    p = params_of(spoken[text])
    first_open = int(np.flatnonzero(p[:, OPEN] > 0.5)[0])
    lead = p[:first_open + 1]
    channel = BITE if text == "fa" else CLOSE
    assert lead[:, channel].max() > 0.5, np.round(lead, 2).tolist()
    assert p[first_open:, OPEN].max() > 0.8


def acoustic_closure_start(wav: np.ndarray) -> float:
    """Seconds: the first 10 ms block after the first vowel's peak (espeak-ng's first "a" lies in the
    first 100 ms) that is 12 dB below that peak."""
    block = SAMPLE_RATE // 100
    rms = np.sqrt(np.mean(wav[: len(wav) // block * block].reshape(-1, block) ** 2, axis=1) + 1e-12)
    db = 20 * np.log10(rms)
    peak = int(np.argmax(db[:10]))
    return float(peak + np.flatnonzero(db[peak:] < db[peak] - 12)[0]) / 100


def test_closure_anticipates_within_the_lookahead(spoken):
    """Co-articulation: the lips close before the acoustic closure, never earlier than the renderer's
    declared look-ahead allows, and not later than one frame after it."""
    wav = spoken["aba"]
    start = acoustic_closure_start(wav)
    p = params_of(wav)
    t = np.arange(len(p)) / FPS
    first = t[np.argmax(p[:, CLOSE] > 0.5)]
    lookahead_s = CONFIG.audio_needs.lookahead_samples(FPS) / SAMPLE_RATE
    log.info("acoustic closure at %.3f s, lips closed from %.3f s (look-ahead %.1f ms)",
             start, first, 1000 * lookahead_s)
    assert start - lookahead_s - 1e-6 <= first <= start + 1 / FPS


def test_no_motion_in_silence_or_low_noise():
    rng = np.random.default_rng(7)
    word = params_of(np.zeros(1, np.float32))  # shape check of the trivial case
    assert np.all(word == 0.0)
    for dbfs in (-70.0, -55.0):
        noise = (rng.standard_normal(SAMPLE_RATE * 2) * 10 ** (dbfs / 20)).astype(np.float32)
        p = params_of(noise)
        assert np.all(p == 0.0), f"{dbfs} dBFS noise moved the mouth: max {p.max(axis=0)}"


def test_rendered_lips_meet_at_the_closure(spoken):
    """Through the warp: at the /b/ closure the inner lips meet (the lower inner lip at or above the
    upper inner lip), while on the vowels they are apart."""
    avatar = synthetic_avatar(n_frames=1)
    renderer = DefaultRenderer()
    p = params_of(spoken["aba"])
    gaps = np.array([np.subtract(*renderer.rendered_landmarks(avatar, 0, row)[[4, 3], 1]) for row in p])
    rest = float(avatar.mouth[0, 4, 1] - avatar.mouth[0, 3, 1])
    k = int(np.argmax(p[:, CLOSE]))
    log.info("inner lip gap px: rest %.1f, closure %.1f, max %.1f", rest, gaps[k], gaps.max())
    assert gaps[k] <= 0.0 < rest and gaps.max() > rest + 10
    patch = renderer.render_params(avatar, np.array([0]), p[k:k + 1])[0]
    assert patch.image.shape[:2] == (patch.box[1] - patch.box[0], patch.box[3] - patch.box[2])


def test_rendered_consonant_shapes():
    """Pixels: a bite shows bright upper teeth between the lips and no dark cavity; a closure shuts the
    gap even with the jaw asked open (the lips meet; nothing darker than the rest seam); an 'ah' shows a
    dark cavity, with lower teeth at the bottom of it."""
    avatar = synthetic_avatar(n_frames=1)
    renderer = DefaultRenderer()
    frame, points = avatar.frames[0], avatar.mouth[0]
    x = int(points[2, 0])

    def render(params: list[float]) -> tuple[np.ndarray, np.ndarray]:
        p = np.array(params, np.float32)
        image = paste(frame, renderer.render_params(avatar, np.array([0]), p[None])[0])
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), renderer.rendered_landmarks(avatar, 0, p)

    grey, lm = render([0.1, 0.1, 0.0, 0.0, 1.0, 1.0])  # /f/
    between = grey[int(np.floor(lm[3, 1])) - 1:int(np.ceil(lm[4, 1])) + 2, x]
    assert between.max() > 150 and between.min() > 60, between
    rest_gap = points[4, 1] - points[3, 1]
    grey, lm = render([0.4, 0.0, 0.0, 1.0, 0.0, 0.0])  # /m/ while the jaw would be open
    assert lm[4, 1] - lm[3, 1] <= 0.0 < rest_gap
    span = slice(int(points[2, 1]), int(points[5, 1]) + 1)
    rest_seam = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[span, x].min()
    assert grey[span, x].min() >= rest_seam - 5  # no cavity: at most the rest seam between the lips
    grey, lm = render([1.0, 0.1, 0.0, 0.0, 0.0, 0.0])  # /a/
    column = grey[int(lm[3, 1]):int(lm[4, 1]), x]
    assert (column < 60).sum() > 0.3 * len(column)
    assert column[-max(3, len(column) // 5):].max() > 100, column  # lower teeth above the lower lip


def lip_mask(image: np.ndarray) -> np.ndarray:
    """The synthetic face's lip pixels (BGR (90, 85, 165)): red, with little green (skin, spots and the
    nose line all have green above 110)."""
    b, g, r = (image[..., c].astype(int) for c in range(3))
    return (g < 105) & (r > 130) & (r - b > 40)


def measure_lips(renderer: DefaultRenderer, params: list[float], k: float
                 ) -> tuple[tuple[float, float], tuple[float, float], list[tuple[float, int, int]]]:
    """The synthetic face's frame rendered with `params`, against its rest mouth: the lips' extent left and
    right of the mouth centre at rest and shaped, and their thickness across the mouth at s = 0, -0.5, 0.5
    half-widths at rest and where a warp scaling the mouth axis by `k` moves that column (s * k)."""
    avatar = synthetic_avatar(n_frames=1)
    frame, points = avatar.frames[0], avatar.mouth[0]
    shape = np.array(params, np.float32)
    image = paste(frame, renderer.render_params(avatar, np.array([0]), shape[None])[0])
    rest, shaped = lip_mask(frame), lip_mask(image)
    cx, half = float(points[:2, 0].mean()), float(points[1, 0] - points[0, 0]) / 2
    rows = slice(int(points[2, 1]) - 3, int(points[5, 1]) + 4)

    def extent(mask: np.ndarray) -> tuple[float, float]:
        cols = np.flatnonzero(mask[rows].any(axis=0))
        return cx - cols[0], cols[-1] - cx

    thickness = [(t, int(rest[rows, round(cx + t * half)].sum()), int(shaped[rows, round(cx + t * k * half)].sum()))
                 for t in (0.0, -0.5, 0.5)]
    return extent(rest), extent(shaped), thickness


def check_spread(renderer: DefaultRenderer) -> None:
    """An 'ee' (spread = 1) moves both lip corners outward by the whole widening k = 1 + spread_gain,
    and the lips stretch without thinning: their thickness across the middle and half-way to each
    corner stays within a pixel of the rest mouth's (the warp scales along the mouth axis only)."""
    k = 1.0 + renderer.config.warp.spread_gain
    (rest_l, rest_r), (wide_l, wide_r), thickness = measure_lips(renderer, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0], k)
    log.info("lip extent left/right px: rest %.0f/%.0f, spread %.0f/%.0f (expected x%.2f)",
             rest_l, rest_r, wide_l, wide_r, k)
    for r0, r1 in ((rest_l, wide_l), (rest_r, wide_r)):
        assert r1 - r0 >= 0.9 * (k - 1.0) * r0, "the lip corners move out by the whole spread"
    for t, before, after in thickness:
        assert abs(after - before) <= 1, f"lip thickness at s={t}: {before} px at rest, {after} px spread"


def test_ee_moves_the_lip_corners_out():
    check_spread(DefaultRenderer())


def test_corners_held_by_the_fade_are_caught():
    """The earlier widening field (full only up to 1.2 half-widths) left the corners short of k."""
    config = DefaultRendererConfig(warp=replace(MouthWarpConfig(), spread_fade=(1.2, 2.0)))
    with pytest.raises(AssertionError, match="corners move out"):
        check_spread(DefaultRenderer(config))


def check_round(renderer: DefaultRenderer) -> None:
    """An 'oo' (round = 1) draws both lip corners in by the whole narrowing k = 1 - round_gain to a small
    "o" at most 60 % of the rest width (the face mesh reads well under half of the warp's narrowing, and
    the video codec softens the corners it reads: bench/visemes.py --webrtc), with the lips' thickness
    kept across the middle and half-way to each corner."""
    k = 1.0 - renderer.config.warp.round_gain
    (rest_l, rest_r), (narrow_l, narrow_r), thickness = measure_lips(renderer, [0.0, 0.0, 1.0, 0.0, 0.0, 0.0], k)
    log.info("lip extent left/right px: rest %.0f/%.0f, round %.0f/%.0f (expected x%.2f)",
             rest_l, rest_r, narrow_l, narrow_r, k)
    for r0, r1 in ((rest_l, narrow_l), (rest_r, narrow_r)):
        assert r0 - r1 >= 0.9 * (1.0 - k) * r0, "the lip corners move in by the whole rounding"
        assert r1 <= 0.6 * r0, "a small o: at most 60 % of the rest width"
    for t, before, after in thickness:
        assert abs(after - before) <= 1, f"lip thickness at s={t}: {before} px at rest, {after} px rounded"


def test_oo_draws_the_lip_corners_in():
    check_round(DefaultRenderer())


def test_weaker_rounding_is_caught():
    """The earlier gain (width -36 % at round = 1) left the mouth too wide for the mesh to read -10 %
    through the codec (-8.8 to -11.4 % over WebRTC)."""
    config = DefaultRendererConfig(warp=replace(MouthWarpConfig(), round_gain=0.36))
    with pytest.raises(AssertionError, match="small o"):
        check_round(DefaultRenderer(config))


def check_no_fold(renderer: DefaultRenderer) -> None:
    """The narrowing never folds: on a frame that is a left-to-right brightness ramp, every row of the
    rendered patch at round = 1 still rises from left to right (a backward map that turned back along
    the mouth axis would show the cheeks twice, mirrored)."""
    face = synthetic_avatar(n_frames=1)
    _, _, x1, x2 = renderer.patch_box(face, 0)
    size = face.frames.shape[1]
    ramp = np.clip((np.arange(size, dtype=np.float32) - x1) * (255.0 / (x2 - x1)), 0.0, 255.0)
    frame = np.repeat(np.repeat(ramp[None, :, None], size, axis=0), 3, axis=2).astype(np.uint8)
    avatar = SyntheticAvatar(frames=frame[None], boxes=face.boxes, mouth=face.mouth)
    rounded = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0], np.float32)
    patch = renderer.render_params(avatar, np.array([0]), rounded[None])[0]
    rows = np.diff(patch.image[..., 1].astype(np.int16), axis=1)
    assert rows.min() >= 0, f"the narrowing folds: a row falls by {-rows.min()} levels"
    assert rows.max() > 2  # the patch is not flat: the ramp is there to fold


def test_rounding_never_folds():
    check_no_fold(DefaultRenderer())


def test_a_folding_narrowing_is_caught():
    """A field that ends too close to the corners (the cheeks' stretch squeezed into 0.35 half-widths)
    must fold, and the check must see it."""
    config = DefaultRendererConfig(warp=replace(MouthWarpConfig(), width_fade=(0.65, 1.0)))
    with pytest.raises(AssertionError, match="folds"):
        check_no_fold(DefaultRenderer(config))
