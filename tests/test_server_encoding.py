"""The server's video path after the engine: yuv420p frames from the track, real-time encoder settings."""
from __future__ import annotations

import asyncio
import inspect
import re
from types import SimpleNamespace
from typing import Callable, ClassVar

import aiortc.rtcrtpsender
import aiortc.rtp
import av
import cv2
import numpy as np
import pytest
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from realtime.renderers.precision_gate import psnr_db as psnr
from server.media import encoders
from server.media.opus_encoder import RealtimeOpusEncoder
from server.media.tracks import VIDEO_TIME_BASE, AvatarVideoTrack, MediaClock, video_frame

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)
H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=99)
AIORTC_AUDIO_LEVEL = encoders.aiortc_audio_level_dbov
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def face_like(h: int = 128, w: int = 160, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus soft blobs: natural-image statistics, not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([60 + 120 * x / w, 40 + 150 * y / h, 200 - 100 * (x + y) / (w + h)], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30)
        img += rng.uniform(-60, 60, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def swscale_yuv(image: np.ndarray) -> np.ndarray:
    """What the encoders did before: a bgr24 frame converted by swscale, as (H * 3 / 2, W) planes."""
    return av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p").to_ndarray()


# -- yuv420p frames ----------------------------------------------------------------------------------

def test_video_frame_is_yuv420p_equal_to_swscale_within_a_level():
    image = face_like()
    frame = video_frame(image)
    assert frame.format.name == "yuv420p" and (frame.width, frame.height) == (160, 128)
    got, ref = frame.to_ndarray().astype(int), swscale_yuv(image).astype(int)
    h = image.shape[0]
    assert np.abs(got[:h] - ref[:h]).max() <= 1          # luma: same BT.601 limited-range matrix
    # chroma: a 2x2 average vs swscale's filter and siting (half a chroma pixel apart on gradients)
    assert np.abs(got[h:] - ref[h:]).max() <= 3
    assert np.abs(got[h:] - ref[h:]).mean() < 1.0


def test_video_frame_looks_at_least_as_good_as_swscale():
    """Decoded back to BGR, the direct conversion is no further from the image than swscale's."""
    image = face_like(seed=3)
    direct = video_frame(image).to_ndarray(format="bgr24")
    old = av.VideoFrame.from_ndarray(swscale_yuv(image), format="yuv420p").to_ndarray(format="bgr24")
    assert psnr(direct, image) >= psnr(old, image) - 0.1
    assert psnr(direct, old) > 40.0


@pytest.mark.parametrize("size", [(128, 160), (98, 130), (562, 1000), (2, 2)])
def test_video_frame_holds_opencvs_i420_exactly_whatever_the_planes_row_padding(size):
    """The frame's planes are OpenCV's I420 conversion, pixel for pixel, also where PyAV pads the planes' rows
    (130 px: Y rows of 144 bytes, U and V of 80 for 65 pixels), and the padding is not part of the picture."""
    h, w = size
    image = face_like(h, w, seed=7)
    frame = video_frame(image)
    i420 = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
    assert (frame.format.name, frame.width, frame.height) == ("yuv420p", w, h)
    np.testing.assert_array_equal(frame.to_ndarray(), i420)
    np.testing.assert_array_equal(frame.to_ndarray(), av.VideoFrame.from_ndarray(i420, format="yuv420p").to_ndarray())


def test_video_frame_accepts_read_only_views_and_keeps_odd_sizes_bgr24():
    image = face_like()
    image.flags.writeable = False
    assert video_frame(image).format.name == "yuv420p"
    odd = face_like(127, 161)
    frame = video_frame(odd[:, :])
    assert frame.format.name == "bgr24"
    np.testing.assert_array_equal(frame.to_ndarray(), odd)


def test_avatar_track_hands_over_yuv420p_frames_on_the_clock():
    image = face_like()

    class Source:
        def next_video_frame(self):
            return SimpleNamespace(image=image)

    async def pull() -> list[av.VideoFrame]:
        track = AvatarVideoTrack(Source(), 100.0, MediaClock())
        frames = [await track.recv() for _ in range(3)]
        track.stop()
        return frames

    frames = asyncio.run(pull())
    assert [f.format.name for f in frames] == ["yuv420p"] * 3
    assert [f.pts for f in frames] == [0, 900, 1800] and frames[0].time_base == VIDEO_TIME_BASE
    np.testing.assert_array_equal(frames[0].to_ndarray(), cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420))


# -- encoder settings --------------------------------------------------------------------------------

def test_tuned_context_merges_overrides_into_what_the_encoder_sets():
    context = SimpleNamespace(thread_count=0)
    tuned = encoders.TunedContext(context, {"preset": "veryfast"}, thread_count=1)
    assert context.thread_count == 1
    tuned.options = {"tune": "zerolatency", "preset": "medium"}
    tuned.thread_count = 4
    tuned.width = 512
    assert context.options == {"tune": "zerolatency", "preset": "veryfast"}
    assert context.thread_count == 1 and context.width == 512 and tuned.width == 512


def test_install_makes_senders_create_the_realtime_encoders(monkeypatch):
    monkeypatch.setattr(aiortc.rtcrtpsender, "get_encoder", aiortc.rtcrtpsender.get_encoder)
    encoders.install()
    encoders.install()  # idempotent
    make = aiortc.rtcrtpsender.get_encoder
    assert make is encoders.get_encoder
    assert isinstance(make(VP8), encoders.RealtimeVp8Encoder) and isinstance(make(VP8), Vp8Encoder)
    assert isinstance(make(H264), encoders.RealtimeH264Encoder) and isinstance(make(H264), H264Encoder)
    assert type(make(OPUS)) is RealtimeOpusEncoder and isinstance(make(OPUS), OpusEncoder)


def frames_at(fps: float, n: int, make=video_frame) -> list[av.VideoFrame]:
    out = []
    for k in range(n):
        frame = make(face_like(seed=k % 3))
        frame.pts = round(k * 90000 / fps)  # as AvatarVideoTrack stamps them
        frame.time_base = VIDEO_TIME_BASE
        out.append(frame)
    return out


def bgr24(image: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(image, format="bgr24")


def x264_options(payloads: list[bytes]) -> str:
    """The option string x264 writes into its first keyframe (an SEI)."""
    found = re.search(rb"options: ([ -~]+)", b"".join(payloads))
    assert found, "no x264 SEI in the keyframe"
    return found.group(1).decode()


def test_h264_runs_superfast_on_one_thread_and_keeps_aiortcs_other_settings():
    payloads, _ = encoders.RealtimeH264Encoder().encode(frames_at(25, 1)[0])
    tuned = x264_options(payloads)
    payloads, _ = H264Encoder().encode(frames_at(25, 1)[0])
    stock = x264_options(payloads)
    assert "threads=1 " in tuned and "subme=1 " in tuned and "me=dia " in tuned and "ref=1 " in tuned  # superfast
    assert "subme=7 " in stock  # aiortc's own: medium
    for kept in ("cabac=0", "bframes=0", "bitrate=1000", "rc=abr"):  # Baseline, zerolatency, 1 Mbps
        assert kept in tuned and kept in stock


@pytest.mark.parametrize("cls", [encoders.RealtimeVp8Encoder, encoders.RealtimeH264Encoder])
@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_rtp_timestamps_match_aiortcs_encoders_fed_bgr24(cls, fps):
    """yuv420p frames are handed to the codec as they are (PyAV rebases their pts in place): the RTP
    timestamps must still be the ones aiortc produced from the old bgr24 frames."""
    stock = Vp8Encoder() if cls is encoders.RealtimeVp8Encoder else H264Encoder()
    old = [stock.encode(f)[1] for f in frames_at(fps, 6, bgr24)]
    encoder = cls()
    new = [encoder.encode(f)[1] for f in frames_at(fps, 6)]
    assert new == old


def test_vp8_decodes_and_retunes_after_a_bitrate_change():
    encoder = encoders.RealtimeVp8Encoder()
    decoder = av.CodecContext.create("libvpx", "r")
    images = []
    for frame in frames_at(25, 4):
        payloads, _ = encoder.encode(frame)
        data = b"".join(p[_vp8_descriptor_size(p):] for p in payloads)
        images += [f.to_ndarray(format="bgr24") for f in decoder.decode(av.Packet(data))]
    assert len(images) == 4 and psnr(images[0], face_like(seed=0)) > 30.0
    first = encoder.codec
    assert isinstance(first, encoders.TunedContext)
    encoder.target_bitrate = 1_500_000  # a REMB update: aiortc re-creates the codec
    encoder.encode(frames_at(25, 5)[4])
    assert encoder.codec is not first and isinstance(encoder.codec, encoders.TunedContext)
    assert encoder.codec.bit_rate == 1_500_000


def _vp8_descriptor_size(payload: bytes) -> int:
    """Bytes of the VP8 payload descriptor aiortc writes (RFC 7741: X bit, then a 15-bit PictureID)."""
    if not payload[0] & 0x80:
        return 1
    return 2 + (2 if payload[1] & 0x80 and payload[2] & 0x80 else 1 if payload[1] & 0x80 else 0)


@pytest.mark.parametrize("scale", [0.0, 1.0, 30.0, 1000.0, 10000.0, 40000.0])
def test_audio_level_is_aiortcs_number(scale: float) -> None:
    """The numpy level equals aiortc's Python loop on silence, quiet, speech-level and clipped frames."""
    assert AIORTC_AUDIO_LEVEL.__module__ == "aiortc.rtp"
    rng = np.random.default_rng(int(scale))
    for _ in range(20):
        pcm = np.clip(rng.standard_normal((1, 320)) * scale, -32768, 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 16000
        assert encoders.audio_level_dbov(frame) == AIORTC_AUDIO_LEVEL(frame)


def test_install_gives_senders_the_numpy_audio_level(monkeypatch):
    monkeypatch.setattr(aiortc.rtp, "compute_audio_level_dbov", AIORTC_AUDIO_LEVEL)
    monkeypatch.setattr(aiortc.rtcrtpsender, "get_encoder", aiortc.rtcrtpsender.get_encoder)
    encoders.install()
    # aiortc's sender looks the function up on the module for every frame (RTCRtpSender._next_encoded_frame)
    assert aiortc.rtcrtpsender.rtp.compute_audio_level_dbov is encoders.audio_level_dbov
    assert "rtp.compute_audio_level_dbov(" in inspect.getsource(aiortc.rtcrtpsender.RTCRtpSender)


def test_create_app_installs_the_realtime_encoders(monkeypatch):
    from server.app import create_app
    from server.config import ServerConfig

    monkeypatch.setattr(aiortc.rtcrtpsender, "get_encoder", encoders.aiortc_get_encoder)
    create_app(ServerConfig(), SimpleNamespace(fps=25.0, info={}))
    assert aiortc.rtcrtpsender.get_encoder is encoders.get_encoder


class _Vp8BeforeStaticThreshold(encoders.RealtimeVp8Encoder):
    """The server's VP8 as it was before the static threshold (aiortc's 1)."""

    OPTIONS: ClassVar[dict[str, str]] = {"noise-sensitivity": "0"}


def _psnr(encoder, images: list[np.ndarray], decoder_name: str,
          depayload: Callable[[bytes], bytes]) -> tuple[float, float]:
    """Mean Y PSNR of the decoded frames (after the first five), whole frame and lower centre (the mouth):
    each frame encoded, its RTP payloads depayloaded into one packet and decoded by `decoder_name`."""
    decoder = av.CodecContext.create(decoder_name, "r")
    whole, mouth = [], []
    for k, image in enumerate(images):
        frame = video_frame(image)
        frame.pts, frame.time_base = k * 3600, VIDEO_TIME_BASE
        reference = frame.to_ndarray()[: image.shape[0]].astype(np.float64)
        payloads, _ = encoder.encode(frame)
        for decoded in decoder.decode(av.Packet(b"".join(depayload(p) for p in payloads))):
            y = decoded.to_ndarray()[: image.shape[0]].astype(np.float64)
            h, w = y.shape
            lower = (slice(h // 2, h * 7 // 8), slice(w // 4, w * 3 // 4))
            for out, a, b in ((whole, y, reference), (mouth, y[lower], reference[lower])):
                out.append(10 * np.log10(255.0 ** 2 / max(float(np.mean((a - b) ** 2)), 1e-9)))
    assert len(whole) == len(images)
    return float(np.mean(whole[5:])), float(np.mean(mouth[5:]))


def _vp8_psnr(encoder, images: list[np.ndarray]) -> tuple[float, float]:
    return _psnr(encoder, images, "libvpx", lambda p: p[_vp8_descriptor_size(p):])


def _talking_avatar(n: int) -> list[np.ndarray]:
    """The default avatar's own frames (a still background, a head that moves a little) with a mouth that
    opens and closes."""
    from realtime.avatars.default_avatar import load_default_avatar

    frames = load_default_avatar().frames
    out = []
    for k in range(n):
        image = np.array(frames[k % len(frames)])
        h, w = image.shape[:2]
        cv2.ellipse(image, (w // 2, int(h * 0.68)), (w // 12, int(4 + 14 * abs(np.sin(k / 3)))), 0, 0, 360,
                    (40, 30, 90), -1)
        out.append(image)
    return out


def _slowly_drifting_texture(n: int, size: int = 256) -> list[np.ndarray]:
    """Detailed texture moving by a fraction of a pixel a frame and brightening: the content a static
    threshold could leave stale."""
    rng = np.random.default_rng(5)
    base = np.zeros((size + 32, size + 32, 3), np.float32)
    for scale, amplitude in ((32, 40.0), (8, 40.0), (2, 30.0)):
        noise = rng.uniform(-1, 1, ((size + 32) // scale + 1, (size + 32) // scale + 1, 3)).astype(np.float32)
        base += cv2.resize(noise, (size + 32, size + 32), interpolation=cv2.INTER_CUBIC) * amplitude
    out = []
    for k in range(n):
        shift = np.float32([[1, 0, -4 - 0.15 * k], [0, 1, -4 - 0.1 * k]])
        image = cv2.warpAffine(base + 128, shift, (size, size), flags=cv2.INTER_LINEAR) * (1 + 0.002 * k)
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scene", ["talking avatar", "slowly drifting texture"])
def test_vp8_static_threshold_keeps_the_picture(scene):
    """The server's VP8 skips still macroblocks (static-thresh, a CPU saving) without losing quality against
    the same encoder without it: whole frame and mouth region within 0.15 dB or better."""
    images = _talking_avatar(40) if scene == "talking avatar" else _slowly_drifting_texture(40)
    before = _vp8_psnr(_Vp8BeforeStaticThreshold(), images)
    after = _vp8_psnr(encoders.RealtimeVp8Encoder(), images)
    assert encoders.VP8_OPTIONS["static-thresh"] != "1"
    assert after[0] >= before[0] - 0.15, (before, after)
    assert after[1] >= before[1] - 0.15, (before, after)


class _H264Veryfast(encoders.RealtimeH264Encoder):
    """The server's H.264 encoder with the preset it had before (x264 "veryfast")."""

    OPTIONS: ClassVar[dict[str, str]] = {"preset": "veryfast"}


def _h264_psnr(encoder, images: list[np.ndarray]) -> tuple[float, float]:
    from aiortc.codecs.h264 import h264_depayload

    return _psnr(encoder, images, "h264", h264_depayload)


def _rendered_avatar(n: int) -> list[np.ndarray]:
    """The default avatar's frames with the default renderer's mouths for varied parameters, pasted as the
    session pastes them."""
    from realtime.avatars.default_avatar import load_default_avatar
    from realtime.renderers.compositor import paste
    from realtime.renderers.default import DefaultRenderer

    avatar = load_default_avatar()
    params = np.random.default_rng(8).uniform(0.0, 1.0, (n, 6)).astype(np.float32)
    params[:, 3:] *= 0.3
    indices = np.arange(n) % len(avatar.frames)
    patches = DefaultRenderer().render_params(avatar, indices, params)
    return [paste(avatar.frames[i], p) for i, p in zip(indices, patches, strict=True)]


H264_PRESET_MAX_LOSS_DB = 0.3
"""What the server's x264 preset may lose against "veryfast" (Y PSNR, whole frame and mouth region). Measured
(bench/RESULTS.md "The per-frame media path"): -0.22 dB on the rendered default avatar, +0.04..+0.25 dB on
the synthetic face and the drifting textures, for about two thirds of the CPU; "ultrafast" loses 0.6 dB
on the avatar and ~7 dB on texture."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scene", ["rendered avatar", "talking avatar", "slowly drifting texture"])
def test_h264_preset_keeps_the_picture(scene):
    """The server's x264 preset (a CPU saving) decodes to the picture "veryfast" gave, whole frame and mouth
    region, within `H264_PRESET_MAX_LOSS_DB`."""
    make = {"rendered avatar": _rendered_avatar, "talking avatar": _talking_avatar,
            "slowly drifting texture": _slowly_drifting_texture}[scene]
    images = make(40)
    before = _h264_psnr(_H264Veryfast(), images)
    after = _h264_psnr(encoders.RealtimeH264Encoder(), images)
    assert encoders.H264_OPTIONS["preset"] != "veryfast"
    assert after[0] >= before[0] - H264_PRESET_MAX_LOSS_DB, (before, after)
    assert after[1] >= before[1] - H264_PRESET_MAX_LOSS_DB, (before, after)
