"""server/media/opus_encoder.py: outgoing audio leaves in the call that gets its frame, encoded by libopus from
the server's 16 kHz mono samples, at the level, timing and RTP clock of aiortc's own Opus encoder."""
from __future__ import annotations

import fractions

import numpy as np
import pytest
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av import AudioFrame

from server.media import encoders
from server.media.opus_encoder import RealtimeOpusEncoder

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
    # Decoded onset: libopus' own look-ahead, nothing more (no resampler's filter delay either).
    assert first[1] <= OPUS_LOOKAHEAD + 16


def encode_decode(encoder, pcm: np.ndarray, first_index: int = 0) -> tuple[np.ndarray, list[int], list[bytes]]:
    """Left channel of the 48 kHz decoded stream, the RTP timestamps and the payloads for 16 kHz `pcm`."""
    decoder = OpusDecoder()
    out, stamps, payloads = [], [], []
    for j in range(len(pcm) // FRAME):
        frame_payloads, timestamp = encoder.encode(frame16(pcm[j * FRAME:(j + 1) * FRAME], first_index + j))
        for payload in frame_payloads:
            stamps.append(timestamp)
            payloads.append(payload)
            for decoded in decoder.decode(JitterFrame(payload, timestamp)):
                out.append(decoded.to_ndarray().reshape(-1, 2)[:, 0].astype(np.float64))
    return np.concatenate(out), stamps, payloads


def test_libopus_gets_the_16khz_mono_frames_and_rtp_runs_at_48khz():
    """The saving: libopus encodes the 320 samples as they are (no 960-sample stereo copy); the RTP clock
    is still Opus' 48 kHz (RFC 7587), 960 per 20 ms frame, and the packets say mono (TOC s bit 0) and at
    most wideband (configurations 8-11 SILK WB, 20-23 CELT WB, RFC 6716 3.1)."""
    encoder = RealtimeOpusEncoder()
    rng = np.random.default_rng(3)
    _, stamps, payloads = encode_decode(encoder, rng.standard_normal(50 * FRAME) * 3000)
    assert encoder._codec16.sample_rate == 16000 and encoder._codec16.layout.name == "mono"
    assert len(payloads) == 50 and stamps[0] == 0 and set(np.diff(stamps).tolist()) == {960}
    assert all(p[0] & 0x04 == 0 for p in payloads)
    assert all((p[0] >> 3) in (1, 5, 9, 21) or (p[0] >> 3) in range(8, 12) or (p[0] >> 3) in range(20, 24)
               for p in payloads)


@pytest.mark.parametrize("freq", [200.0, 1000.0, 3000.0, 5500.0])
def test_speech_band_tones_decode_at_unit_gain_and_on_time(freq: float) -> None:
    """Decoded at 48 kHz, a tone across the speech band keeps its level (within 1 dB)."""
    t = np.arange(50 * FRAME)
    decoded, _, _ = encode_decode(RealtimeOpusEncoder(), 8000 * np.sin(2 * np.pi * freq * t / 16000))
    steady = decoded[9600:]   # past the codec's start
    gain_db = 20 * np.log10(np.sqrt(2 * np.mean(steady ** 2)) / 8000)
    assert abs(gain_db) < 1.0, gain_db


def test_speech_survives_the_codec(speech_16k: np.ndarray) -> None:
    """Real speech, encoded from 16 kHz and decoded at 48 kHz, matches the input delayed by libopus'
    look-ahead and nothing else (the same timing as before, less the old resampler's 1 ms): correlation
    > 0.95 against the input's 3x-interpolated copy at exactly that delay."""
    from scipy.signal import resample_poly

    pcm = np.clip(speech_16k[:FRAME * 150] * 32767, -32768, 32767)
    decoded, _, _ = encode_decode(RealtimeOpusEncoder(), pcm)
    reference = resample_poly(pcm, 3, 1)
    aligned = decoded[OPUS_LOOKAHEAD:OPUS_LOOKAHEAD + len(reference) - 4800]
    reference = reference[:len(aligned)]
    corr = float(np.dot(aligned, reference) / np.sqrt(np.dot(aligned, aligned) * np.dot(reference, reference)))
    assert corr > 0.95, corr
    assert 0.8 < np.std(aligned) / np.std(reference) < 1.25


def test_a_skip_keeps_its_gap_and_fec_reopening_keeps_the_clock():
    encoder = RealtimeOpusEncoder()
    rng = np.random.default_rng(4)
    pcm = rng.standard_normal(10 * FRAME) * 3000
    _, first, _ = encode_decode(encoder, pcm)
    encoder.set_expected_loss(0.15)
    _, second, payloads = encode_decode(encoder, pcm, first_index=13)   # 3 frames skipped
    assert encoder.loss_pct == 20
    assert second[0] - first[-1] == 4 * 960 and set(np.diff(second).tolist()) == {960}
    assert all(p[0] & 0x04 == 0 for p in payloads)


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
