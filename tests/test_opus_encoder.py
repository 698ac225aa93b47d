"""server/opus_encoder.py and server/audio_upsample.py: outgoing audio leaves in the call that gets its
frame, at the same quality and RTP timing as aiortc's own Opus encoder."""
from __future__ import annotations

import fractions

import numpy as np
import pytest
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av import AudioFrame

from server import encoders
from server.audio_upsample import OUT_RATE, Upsampler3x
from server.opus_encoder import RealtimeOpusEncoder

FRAME = 320           # 20 ms at 16 kHz
OPUS_LOOKAHEAD = 312  # libopus' algorithmic delay at 48 kHz (6.5 ms), in every Opus stream


def frame16(pcm: np.ndarray, index: int) -> AudioFrame:
    frame = AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 16000
    frame.pts = index * FRAME
    frame.time_base = fractions.Fraction(1, 16000)
    return frame


def onset_frames(encoder, onset_frame: int = 5, frames: int = 8) -> list[tuple[int, int | None]]:
    """(input frame index, first loud decoded sample at 48 kHz or None) for each packet the encoder
    returns while fed silence and then a tone from `onset_frame` on."""
    decoder = OpusDecoder()
    out = []
    t = np.arange(FRAME)
    for j in range(frames):
        pcm = 8000 * np.sin(2 * np.pi * 500 * (t + j * FRAME) / 16000) if j >= onset_frame else np.zeros(FRAME)
        payloads, timestamp = encoder.encode(frame16(pcm, j))
        for payload in payloads:
            for decoded in decoder.decode(JitterFrame(payload, timestamp)):
                left = decoded.to_ndarray().reshape(-1, 2)[:, 0]
                loud = np.flatnonzero(np.abs(left) > 200)
                out.append((j, int(loud[0]) if loud.size else None))
    return out


def test_aiortcs_opus_encoder_holds_each_16khz_frame_back_until_the_next():
    """Why RealtimeOpusEncoder exists: if aiortc stops holding frames back, it is no longer needed."""
    first_loud = next(j for j, loud in onset_frames(OpusEncoder()) if loud is not None)
    assert first_loud == 6  # the onset fed in frame 5 comes out of frame 6's encode call


def test_the_realtime_encoder_sends_a_frame_in_the_call_that_gets_it():
    packets = onset_frames(RealtimeOpusEncoder())
    assert [j for j, _ in packets] == list(range(8))  # one packet per frame, from the first frame on
    first = next((j, loud) for j, loud in packets if loud is not None)
    assert first[0] == 5
    assert first[1] is not None
    # Decoded onset: libopus' own look-ahead plus the interpolator's 1 ms group delay, nothing more.
    assert first[1] <= OPUS_LOOKAHEAD + Upsampler3x().delay_samples + 16


@pytest.mark.parametrize("freq", [200.0, 1000.0, 3000.0, 5500.0])
def test_upsampler_passes_speech_band_at_unit_gain(freq: float) -> None:
    up = Upsampler3x()
    x = np.sin(2 * np.pi * freq * np.arange(16000) / 16000)
    y = np.concatenate([up.process(x[i:i + FRAME]) for i in range(0, len(x), FRAME)])[4800:]
    gain_db = 20 * np.log10(np.sqrt(2 * np.mean(y ** 2)))
    assert abs(gain_db) < 0.5, gain_db


@pytest.mark.parametrize("freq", [500.0, 1000.0, 3000.0, 6000.0])
def test_upsampler_images_are_60_db_down(freq: float) -> None:
    """Zero-stuffing makes copies of the 16 kHz spectrum at 16 kHz +- f; the filter must remove them."""
    up = Upsampler3x()
    x = np.sin(2 * np.pi * freq * np.arange(16000) / 16000)
    y = np.concatenate([up.process(x[i:i + FRAME]) for i in range(0, len(x), FRAME)])[4800:4800 + 38400]
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    hz = np.fft.rfftfreq(len(y), 1 / OUT_RATE)

    def level(f: float) -> float:
        return float(spectrum[np.argmin(np.abs(hz - f))])

    for image in (16000 - freq, 16000 + freq):
        assert 20 * np.log10(level(image) / level(freq)) < -60, (freq, image)


def test_upsampler_is_seamless_across_frames_and_delayed_by_its_group_delay():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(FRAME * 10)
    whole = Upsampler3x().process(x)
    up = Upsampler3x()
    chunked = np.concatenate([up.process(x[i:i + FRAME]) for i in range(0, len(x), FRAME)])
    np.testing.assert_allclose(chunked, whole, atol=1e-12)
    impulse = np.zeros(FRAME)
    impulse[100] = 1.0
    y = Upsampler3x().process(impulse)
    assert int(np.argmax(y)) in (300 + int(Upsampler3x().delay_samples), 300 + int(Upsampler3x().delay_samples) + 1)


def test_opus_senders_get_the_realtime_encoder_and_g711_stays_aiortcs():
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    pcmu = RTCRtpCodecParameters(mimeType="audio/PCMU", clockRate=8000, channels=1, payloadType=0)
    assert type(encoders.get_encoder(opus)) is RealtimeOpusEncoder
    assert type(encoders.get_encoder(pcmu)).__module__.startswith("aiortc.")


def test_other_frames_take_aiortcs_path():
    """48 kHz frames (not the server's) are resampled by aiortc as before and still encode."""
    encoder = RealtimeOpusEncoder()
    frame = AudioFrame.from_ndarray(np.zeros((1, 960), np.int16), format="s16", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = 48000, 0, fractions.Fraction(1, 48000)
    payloads, timestamp = encoder.encode(frame)
    assert payloads and timestamp == 0
