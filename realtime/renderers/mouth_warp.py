"""Mouth parameters -> image: deform the avatar's own mouth and jaw from its 7 lip landmarks.

Everything happens in a *mouth frame* per avatar frame: origin at the midpoint of the lip corners,
`s` along the corner-to-corner axis in units of the half mouth width (corners at s = -1, +1), `t`
perpendicular to it in pixels, positive towards the chin. A tilted head therefore needs no special case.

The deformation is a backward map (output pixel -> where to sample the avatar frame), built from
smooth fields that are exactly zero outside the patch's feathered border, so pasting it leaves no seam:
- width: s is scaled by k = 1 + spread_gain*spread - round_gain*round inside the lips, fading out
  over the cheeks (monotonic, so it never folds). Narrowing (an "oo", k down to 0.52) draws the lip
  corners in by the whole k and stretches the cheeks between the corners and the field's end evenly
  (`_narrowing_shift`), which is what lets it be that strong without folding;
- jaw: below the mouth, t is shifted down by d = open * max_open * mouth width. The lower lip moves
  with the gap profile A(s) (1 at the centre, 0 at the corners, rounder when `round` is high); the chin
  moves rigidly with the jaw profile J(s); the skin in between blends from A to J and the neck below the
  chin absorbs the shift over `fall` pixels (compression: a backward map of slope > 1 cannot fold);
- upper lip: lifted by upper_lift*d with the same profile, fading out towards the nose.
The gap that opens between the inner lip lines is painted as a mouth interior: a dark cavity with
inner-lip shading, a hint of upper teeth and, when wide open, a tongue, anti-aliased against the lips.
All maths runs on the patch only (typically 130x150 px at 512 px); per frame it is a few dozen numpy
ops on float32 arrays plus one cv2.remap.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from realtime.renderers.base import MouthPatch

# Indices into the (7, 2) mouth landmarks (realtime.avatars.avatar.MOUTH_POINTS order).
LEFT, RIGHT, UPPER_TOP, UPPER_BOTTOM, LOWER_TOP, LOWER_BOTTOM, CHIN = range(7)


@dataclass(frozen=True)
class MouthWarpConfig:
    max_open: float = 0.30          # lip gap at open = 1, as a fraction of the mouth width
    upper_lift: float = 0.15        # the upper lip rises by this fraction of the jaw drop
    spread_gain: float = 0.46       # width +46% at spread = 1 (the face mesh reads about a quarter of it)
    # Width -48% at round = 1: the face mesh reads about 40% of it, and through a video codec, which
    # softens the lip corners it reads, less again (bench/visemes.py --webrtc).
    round_gain: float = 0.48
    gap_exponent: float = 1.3       # gap profile (1 - (s/c)^2)^p: > 1 tapers to the corners, 0.5 elliptical
    round_exponent: float = 0.6     # ... at round = 1 (an "o")
    spread_exponent: float = 0.55   # ... at spread = 1 (an "ee": a long slit, open to near the corners)
    gap_extent: float = 0.92        # c: the lips stay closed over the outer 8% towards each corner
    # ... and over this much more of the width at round = 1 (a small "o"), which leaves the opening as
    # wide in pixels as a 36% narrowing with 0.40 did: shrinking it further with the lips made the face
    # mesh read less of the rounded vowels' opening in running speech.
    round_extent: float = 0.25
    jaw_profile: tuple[float, float] = (0.8, 2.0)   # J(s) = 1 for |s| < a, 0 for |s| > b
    # Narrowing: full for |s| < a (output half-widths: the whole lips, corners included, scale by k), none
    # beyond b, the cheeks in between stretched evenly over the rest (`_narrowing_shift`: never folds).
    width_fade: tuple[float, float] = (0.65, 1.9)
    narrow_ramp: float = 0.25       # ... the stretch starts and ends over this many half-widths (smooth)
    # Widening (never folds): full up to 1.5 half-widths, so the lip corners (at s = k <= 1.46) move out by
    # the whole spread and the lips stretch along their length; fading to nothing 60% of the mouth width
    # beyond each corner (2.2 half-widths), where the mouth-and-jaw region ends: the cheeks beyond are untouched.
    spread_fade: tuple[float, float] = (1.5, 2.2)
    width_fade_t: float = 0.6       # ... and fades over this many half-widths above/below the lips
    upper_fade: float = 0.7         # upper-lip lift fades out over this many half-widths above the lip
    # The neck just below the chin absorbs the jaw drop over fall x max drop: the chin slides over it,
    # as it does in front of a real neck (the backward map compresses there; it can never fold).
    fall: float = 0.6
    margin_px: int = 4              # feathered border of the patch, where every field is zero
    min_drop_px: float = 0.15       # below this the frame is returned untouched (exact rest)
    cavity_ramp_px: float = 2.0     # the interior fades in over the first pixels of opening
    edge_softness: float = 0.03     # anti-aliasing width of the inner lip edges, fraction of mouth width
    teeth_fraction: float = 0.30    # upper teeth show over this fraction of the gap ...
    teeth_max: float = 0.11         # ... at most this fraction of the mouth width
    teeth_span: float = 0.72        # teeth visible for |s| < span (in half-widths)
    tongue_from_open: float = 0.45  # the tongue shows above this opening
    bite_lift: float = 0.045        # /f/: the upper lip rises by this fraction of the mouth width ...
    press_squeeze: float = 0.03     # closure: the lower lip pushes this far (fraction of width) past the seam
    max_press: float = 0.35         # ... and never moves up by more than this many half-widths


@dataclass(frozen=True)
class FrameGeometry:
    """One avatar frame's mouth frame: origin, axes, half width, and landmark offsets along t (px)."""
    cx: float
    cy: float
    ux: float                       # unit vector from the left to the right corner
    uy: float
    half_width: float               # px
    upper_top: float                # t of the outer upper lip (negative: above the corner line)
    upper_bottom: float             # t of the inner upper lip
    lower_top: float                # t of the inner lower lip
    lower_bottom: float             # t of the outer lower lip
    chin: float                     # t of the chin
    box: tuple[int, int, int, int]  # patch box (y1, y2, x1, x2), clipped to the frame

    @property
    def n(self) -> tuple[float, float]:
        """Unit normal pointing towards the chin (image y grows downwards)."""
        return -self.uy, self.ux


@dataclass(frozen=True)
class Palette:
    """Per-avatar colours (BGR float32) for the mouth interior, matched to the avatar's lighting."""
    cavity: np.ndarray
    lip_shadow: np.ndarray
    teeth: np.ndarray
    tongue: np.ndarray


def frame_geometry(points: np.ndarray, frame_shape: tuple[int, ...], config: MouthWarpConfig) -> FrameGeometry:
    """Mouth frame and patch box of one frame from its (7, 2) landmarks (validated by the caller)."""
    p = np.asarray(points, dtype=np.float64)
    centre = 0.5 * (p[LEFT] + p[RIGHT])
    axis = p[RIGHT] - p[LEFT]
    half = 0.5 * float(np.hypot(*axis))
    ux, uy = axis / (2.0 * half)
    nx, ny = -uy, ux
    t = (p - centre) @ np.array([nx, ny])
    # Landmark sanity: inner lines between the outer ones, chin below the lower lip. Detectors can
    # swap or merge points on a closed mouth; clamping keeps every field monotonic.
    upper_top = min(t[UPPER_TOP], -0.05 * half)
    upper_bottom = float(np.clip(t[UPPER_BOTTOM], upper_top, 0.5 * half))
    lower_top = max(t[LOWER_TOP], upper_bottom)
    lower_bottom = max(t[LOWER_BOTTOM], lower_top + 0.05 * half)
    chin = max(t[CHIN], lower_bottom + 0.4 * half)
    # Patch extent in the mouth frame, then its axis-aligned bounding box in the image.
    # Every field is zero beyond these extents, so the feathered border only ever blends equal pixels.
    drop = config.max_open * 2.0 * half
    s_max = max(config.width_fade[1], config.spread_fade[1], config.jaw_profile[1]) * half + config.margin_px + 2
    t_min = upper_top - config.upper_lift * drop - config.upper_fade * half - config.margin_px - 2
    t_max = chin + drop + fall_length(half, config) + config.margin_px + 2
    corners = [centre + a * np.array([ux, uy]) + b * np.array([nx, ny])
               for a in (-s_max, s_max) for b in (t_min, t_max)]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    h, w = frame_shape[:2]
    box = (max(0, int(np.floor(min(ys)))), min(h, int(np.ceil(max(ys))) + 1),
           max(0, int(np.floor(min(xs)))), min(w, int(np.ceil(max(xs))) + 1))
    return FrameGeometry(float(centre[0]), float(centre[1]), float(ux), float(uy), half,
                         float(upper_top), float(upper_bottom), float(lower_top), float(lower_bottom),
                         float(chin), box)


def fall_length(half_width: float, config: MouthWarpConfig) -> float:
    """Pixels below the dropped chin over which the neck takes the shift back."""
    return max(config.fall * config.max_open * 2.0 * half_width, 0.25 * half_width)


def estimate_palette(frame: np.ndarray, geom: FrameGeometry) -> Palette:
    """Interior colours scaled to the avatar: the lip colour (darkened) for the inner-lip shadow, and
    the skin brightness for teeth and tongue, so a dim portrait does not get glowing white teeth."""
    y1, y2, x1, x2 = geom.box
    region = frame[y1:y2, x1:x2].reshape(-1, 3).astype(np.float32)
    brightness = float(np.clip(np.percentile(region.mean(axis=1), 75) / 170.0, 0.45, 1.25))
    nx, ny = geom.n
    lip_y = geom.cy + 0.5 * (geom.lower_top + geom.lower_bottom) * ny
    lip_x = geom.cx + 0.5 * (geom.lower_top + geom.lower_bottom) * nx
    r = max(1, int(0.15 * geom.half_width))
    iy, ix = round(lip_y), round(lip_x)
    lip = frame[max(0, iy - r):iy + r + 1, max(0, ix - r):ix + r + 1].reshape(-1, 3).astype(np.float32)
    lip = lip.mean(axis=0) if len(lip) else np.array([90.0, 90.0, 150.0], np.float32)
    return Palette(
        cavity=np.array([20.0, 24.0, 56.0], np.float32) * brightness,  # warm dark red-brown
        lip_shadow=lip * 0.45,
        teeth=np.array([205.0, 222.0, 235.0], np.float32) * min(1.0, brightness),
        tongue=np.array([72.0, 78.0, 150.0], np.float32) * brightness * 0.75,
    )


def feather_alpha(geom: FrameGeometry, frame_shape: tuple[int, ...], margin: int) -> np.ndarray:
    """(h, w) float32: 1 inside the patch, smooth ramp to 0 over `margin` px at each non-clipped edge."""
    y1, y2, x1, x2 = geom.box
    H, W = frame_shape[:2]

    def ramp(n: int, clipped_lo: bool, clipped_hi: bool) -> np.ndarray:
        i = np.arange(n, dtype=np.float32)
        lo = np.ones(n, np.float32) if clipped_lo else _smoothstep((i + 0.5) / margin)
        hi = np.ones(n, np.float32) if clipped_hi else _smoothstep((n - i - 0.5) / margin)
        return lo * hi

    ay = ramp(y2 - y1, y1 == 0, y2 == H)
    ax = ramp(x2 - x1, x1 == 0, x2 == W)
    result: np.ndarray = (ay[:, None] * ax[None, :]).astype(np.float32)
    return result


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    result: np.ndarray = x * x * (3.0 - 2.0 * x)
    return result


def _lerp_step(x: np.ndarray, full: float, zero: float) -> np.ndarray:
    """1 for |x| <= full, smooth fall to 0 at |x| >= zero."""
    return _smoothstep((zero - np.abs(x)) / (zero - full))


def _ramp_integral(x: np.ndarray, start: float, width: float) -> np.ndarray:
    """Integral from -inf to x of smoothstep((y - start) / width) dy."""
    u = np.clip((x - start) / width, 0.0, None)
    inner = np.minimum(u, 1.0)
    result: np.ndarray = width * (inner ** 3 - 0.5 * inner ** 4 + np.maximum(u - 1.0, 0.0))
    return result


_NARROWING_SAMPLES = 4096  # 0.001 half-widths apart: the nearest is within 0.01 px on a 44 px mouth


@lru_cache(maxsize=8)
def _narrowing_table(full: float, zero: float, ramp: float) -> np.ndarray:
    """m(s) of the narrowing's backward map s_src = s + (1/k - 1) m(s), sampled over [-zero, zero]:
    m = s for |s| <= full (the lips scale by k), 0 for |s| >= zero, and in between m falls with a
    constant slope -r, eased in and out over `ramp`. Its slope never drops below -r, so the map's slope
    stays >= 1 - (1/k - 1) r: unlike s times a smooth step (whose slope dips to about -1.3 with these
    extents), a narrow "o" of k ~ 0.5 does not fold the cheeks. r makes m(zero) = 0 exactly.
    Sampled once per configuration and looked up per pixel (`_narrowing_shift`): a look-up costs about
    what a smooth step does; the formula itself is some thirty array operations per frame of speech."""
    r = (full + 0.5 * ramp) / (zero - full - ramp)
    s = np.linspace(-zero, zero, _NARROWING_SAMPLES)
    a = np.abs(s)
    m = a - (1.0 + r) * _ramp_integral(a, full, ramp) + r * _ramp_integral(a, zero - ramp, ramp)
    table: np.ndarray = (np.sign(s) * np.where(a < zero, m, 0.0)).astype(np.float32)
    return table


def _narrowing_shift(s: np.ndarray, config: MouthWarpConfig) -> np.ndarray:
    """`_narrowing_table`'s m at every pixel's s (the nearest sample; beyond +-zero the end value, 0)."""
    full, zero = config.width_fade
    table = _narrowing_table(full, zero, config.narrow_ramp)
    scale = (_NARROWING_SAMPLES - 1) / (2.0 * zero)
    index = (s * np.float32(scale) + np.float32(zero * scale + 0.5)).astype(np.int32)
    result: np.ndarray = np.take(table, index, mode="clip")
    return result


@dataclass(frozen=True)
class Shape:
    """One frame's deformation amounts (px or factors) from its parameters."""
    k: float          # width scale
    drop: float       # jaw drop at the centre (px)
    lift: float       # upper-lip lift at the centre (px)
    exponent: float   # gap-profile exponent
    press: float      # lower lip raised at the centre (px): closes the rest gap (close, bite)
    teeth: float      # 0..1: how much of the gap the teeth fill
    bite: float       # 0..1: the lower lip is at the upper teeth (they fill the gap; no lower teeth)
    rounding: float   # 0..1: the opening narrows to a small "o"

    @property
    def moves(self) -> bool:
        return self.drop > 0 or self.lift > 0 or self.press > 0 or self.k != 1.0


def mouth_shape(params: np.ndarray, geom: FrameGeometry, config: MouthWarpConfig) -> Shape:
    """The deformation for one frame's `realtime.renderers.mouth_params.PARAMS` values (a frame of
    only [open, spread, round] has no closure, bite or teeth)."""
    p = np.zeros(6, np.float64)
    values = np.asarray(params, np.float64).reshape(-1)[:6]
    p[:len(values)] = values
    open_, spread, rounding, close, bite, teeth = (float(v) for v in p)
    k = 1.0 + config.spread_gain * spread - config.round_gain * rounding
    width = 2.0 * geom.half_width
    drop = open_ * (1.0 - close) * config.max_open * width  # a closure holds the lips shut whatever the jaw
    exponent = config.gap_exponent + (config.round_exponent - config.gap_exponent) * rounding
    exponent += (config.spread_exponent - config.gap_exponent) * spread * (1.0 - rounding)
    lift = config.upper_lift * drop + bite * config.bite_lift * width
    # Pressing shuts the avatar's own rest gap and pushes a little further (lips squeeze each other);
    # the bite raises the lower lip to the (lifted) upper lip's rest line, under the upper teeth.
    rest_gap = max(0.0, geom.lower_top - geom.upper_bottom)
    press = min(1.0, close + bite) * (rest_gap + config.press_squeeze * width)
    press = min(press, config.max_press * geom.half_width)
    return Shape(k, drop, lift, exponent, press, teeth, bite, rounding)


def rendered_landmarks(points: np.ndarray, params: np.ndarray, geom: FrameGeometry,
                       config: MouthWarpConfig) -> np.ndarray:
    """Where the 7 mouth points end up in the rendered frame (for measurements and tests)."""
    shape = mouth_shape(params, geom, config)
    k, drop, lift = shape.k, shape.drop, shape.lift
    out = np.asarray(points, dtype=np.float32).copy()
    u = np.array([geom.ux, geom.uy], np.float32)
    n = np.array(geom.n, np.float32)
    centre = np.array([geom.cx, geom.cy], np.float32)
    for i in (LEFT, RIGHT):
        out[i] = centre + (out[i] - centre) @ u * k * u + (out[i] - centre) @ n * n
    out[UPPER_TOP] -= lift * n
    out[UPPER_BOTTOM] -= lift * n
    for i in (LOWER_TOP, LOWER_BOTTOM):
        out[i] += (drop - shape.press) * n
    out[CHIN] += drop * n
    return out


def warp_mouth(frame: np.ndarray, geom: FrameGeometry, params: np.ndarray, palette: Palette,
               alpha: np.ndarray, config: MouthWarpConfig) -> MouthPatch:
    """Render one frame's mouth patch for `mouth_params.PARAMS` values (each in [0, 1])."""
    y1, y2, x1, x2 = geom.box
    shape = mouth_shape(params, geom, config)
    k, drop, lift, exponent, press = shape.k, shape.drop, shape.lift, shape.exponent, shape.press
    if (max(drop, lift, press) < config.min_drop_px
            and abs(k - 1.0) * geom.half_width < config.min_drop_px):
        # At rest the avatar's own mouth is the answer, bit-exact (seamless hand-over to silence).
        return MouthPatch(image=frame[y1:y2, x1:x2].copy(), box=geom.box, alpha=alpha)

    hw = geom.half_width
    nx, ny = geom.n
    X = np.arange(x1, x2, dtype=np.float32)[None, :] - np.float32(geom.cx)
    Y = np.arange(y1, y2, dtype=np.float32)[:, None] - np.float32(geom.cy)
    s = (X * np.float32(geom.ux / hw) + Y * np.float32(geom.uy / hw))
    t = (X * np.float32(nx) + Y * np.float32(ny))

    # Width: scale s by k inside the lips (the backward map divides), fading over cheeks and chin.
    t_lo = geom.upper_top - config.width_fade_t * hw
    t_hi = geom.lower_bottom + drop + config.width_fade_t * hw
    fade_t = _smoothstep((t - t_lo) / (config.width_fade_t * hw)) * _smoothstep((t_hi - t) / (config.width_fade_t * hw))
    if k < 1.0:
        shift = _narrowing_shift(s, config)
    else:
        shift = s * _lerp_step(s, *config.spread_fade)
    s_src = s + np.float32(1.0 / k - 1.0) * shift * fade_t

    # Lip lines of the output, as functions of the source position along the mouth axis.
    q = np.clip(1.0 - s_src * s_src, 0.0, 1.0)          # rest lip-line profile (0 at the corners)
    s_gap = s_src * np.float32(1.0 / (config.gap_extent * (1.0 - config.round_extent * shape.rounding)))
    gap = _power(np.clip(1.0 - s_gap * s_gap, 0.0, 1.0), exponent)  # opening profile A(s)
    upper_in = geom.upper_bottom * q - lift * gap
    upper_out = geom.upper_top * q - lift * gap
    lip_shift = drop * gap - press * q                  # the lower lip's move (negative: up)
    lower_in = geom.lower_top * q + lip_shift
    lower_out = geom.lower_bottom * q + lip_shift

    # Lower face: lower lip moves by drop*A(s), the chin by drop*J(s), blended in between; the neck
    # below the chin takes the shift back over `fall` (backward-map slope > 1: compression, no fold).
    jaw = _lerp_step(s_src, *config.jaw_profile)
    chin_out = geom.chin + drop
    blend_end = chin_out - 0.2 * hw
    beta = _smoothstep((t - lower_out) / np.maximum(blend_end - lower_out, 0.3 * hw))
    fall_len = fall_length(hw, config)
    fall = _smoothstep((chin_out + fall_len - t) / fall_len)
    t_lower = t - (lip_shift + (drop * jaw - lip_shift) * beta) * fall
    # Upper lip: lifted by lift*A(s), fading towards the nose.
    fade_up = _smoothstep((t - (upper_out - config.upper_fade * hw)) / (config.upper_fade * hw))
    t_upper = t + lift * gap * fade_up
    t_src = np.where(t > 0.5 * (upper_in + lower_in), t_lower, t_upper)

    sx = s_src * np.float32(hw)
    map_x = (np.float32(geom.cx) + sx * np.float32(geom.ux) + t_src * np.float32(nx)).astype(np.float32, copy=False)
    map_y = (np.float32(geom.cy) + sx * np.float32(geom.uy) + t_src * np.float32(ny)).astype(np.float32, copy=False)
    image = cv2.remap(frame, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if drop + lift >= config.min_drop_px:
        _paint_interior(image, t, s_src, upper_in, lower_in, drop + lift, shape, palette, geom, config)
    return MouthPatch(image=image, box=geom.box, alpha=alpha)


def _power(base: np.ndarray, exponent: float) -> np.ndarray:
    """`base ** exponent` for a base in [0, 1] and a positive exponent, the same values: libm's powf
    takes a slow path on zeros (about 4x a nonzero base), and half of the patch is outside the lips
    (base 0), where the result is 0 anyway."""
    out = np.zeros_like(base)
    np.power(base, np.float32(exponent), out=out, where=base > 0.0)
    return out


def _paint_interior(image: np.ndarray, t: np.ndarray, s_src: np.ndarray, upper_in: np.ndarray,
                    lower_in: np.ndarray, drop: float, shape: Shape, palette: Palette,
                    geom: FrameGeometry, config: MouthWarpConfig) -> None:
    """Paint the mouth interior between the output inner lip lines, in place, on the rows/cols it covers."""
    inside = np.minimum(t - upper_in, lower_in - t)  # > 0 inside the opening (px)
    opening = lower_in - upper_in                     # gap height along the output's lip lines
    touched = (inside > -2.0) & (opening > 0.05)
    rows = np.flatnonzero(touched.any(axis=1))
    cols = np.flatnonzero(touched.any(axis=0))
    if len(rows) == 0 or len(cols) == 0:
        return
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    tt, ss, up, lo = t[win], s_src[win], upper_in[win], lower_in[win]
    mouth_w = 2.0 * geom.half_width
    soft = max(1.0, config.edge_softness * mouth_w)
    # Soft inner-lip edges (photos are never pixel-sharp); a gap thinner than a pixel only darkens the
    # seam partly, which also keeps the corner line beyond the lips (gap 0) untouched.
    coverage = _smoothstep(inside[win] / soft + 0.5) * np.clip(opening[win], 0.0, 1.0)
    coverage *= np.float32(min(1.0, drop / config.cavity_ramp_px))
    height = np.maximum(lo - up, 1e-3)
    depth = np.clip((tt - up) / height, 0.0, 1.0)     # 0 at the upper lip, 1 at the lower lip

    # Cavity: darker towards the corners (cheeks shade them) and just behind the teeth.
    shade = (1.0 - 0.5 * np.minimum(ss * ss, 1.0)) * (0.8 + 0.35 * depth)
    colour = palette.cavity[None, None, :] * shade[..., None]
    # The lower lip's inner wall: shadowed lip colour fading into the cavity over a few pixels.
    wall = np.exp(-np.clip(lo - tt, 0.0, None) / max(1.0, 0.05 * mouth_w))
    colour += (palette.lip_shadow - colour) * (0.55 * wall)[..., None]

    # Upper teeth: a band hanging from the upper lip line, centred, fading towards the corners,
    # slightly shadowed right under the lip.
    # `teeth` (sibilants, the bite) lets them fill the gap down to a thin dark line at the lower teeth.
    fraction = min(1.0, config.teeth_fraction + (0.62 - config.teeth_fraction) * shape.teeth + 0.45 * shape.bite)
    teeth_h = np.minimum(fraction * height, config.teeth_max * (1.0 + shape.teeth) * mouth_w + 2.0 * soft * shape.bite)
    below_lip = tt - up
    in_teeth = (_smoothstep((teeth_h - below_lip) / soft + 0.5)
                * _lerp_step(ss, 0.4 * config.teeth_span, config.teeth_span))
    teeth_shade = (1.0 - 0.35 * np.abs(ss) / config.teeth_span) * (0.8 + 0.2 * np.clip(below_lip / soft, 0.0, 1.0))
    colour += (palette.teeth[None, None, :] * teeth_shade[..., None] - colour) * (0.92 * in_teeth)[..., None]

    # Tongue: a soft dark-red mound at the bottom of a wide opening.
    open_ = shape.drop / max(config.max_open * mouth_w, 1e-6)
    if open_ > config.tongue_from_open:
        amount = min(1.0, (open_ - config.tongue_from_open) / (1.0 - config.tongue_from_open))
        tongue = _smoothstep((depth - 0.6) / 0.3) * _lerp_step(ss, 0.25, 0.8) * (0.6 * amount)
        colour += (palette.tongue - colour) * tongue[..., None]

    # Lower teeth: a dimmer band rising from the lower lip, shown by the teeth parameter and by a
    # wide opening (the jaw drops far enough to bare them), shadowed by the lower lip,
    # in front of the tongue.
    lower_fraction = 0.34 * max(0.0, shape.teeth - shape.bite) + 0.2 * float(np.clip((open_ - 0.5) / 0.5, 0.0, 1.0))
    if lower_fraction > 0.0:
        above_lip = lo - tt
        lower_h = np.minimum(lower_fraction * height, config.teeth_max * mouth_w)
        in_lower = (_smoothstep((lower_h - above_lip) / soft + 0.5) * _smoothstep(above_lip / soft)
                    * _lerp_step(ss, 0.3 * config.teeth_span, 0.85 * config.teeth_span))
        lower_teeth = palette.teeth[None, None, :] * (0.72 - 0.25 * np.abs(ss))[..., None]
        colour += (lower_teeth - colour) * (0.85 * in_lower)[..., None]

    region = image[win].astype(np.float32)
    image[win] = np.clip(region + (colour - region) * coverage[..., None] + 0.5, 0, 255).astype(np.uint8)
