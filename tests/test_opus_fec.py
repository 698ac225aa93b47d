"""server/media/opus_fec.py and RealtimeOpusEncoder.set_expected_loss: Opus in-band FEC offered, decoded on the
microphone side (a lost frame rebuilt, no gap), and encoded when the receiver reports loss."""
from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame

from server.media import opus_fec
from server.media.opus_encoder import RealtimeOpusEncoder
from server.media.opus_fec import FecOpusDecoder

RATE = 48000
FRAME = 960


def browser_packets(speech_16k: np.ndarray, fec: bool) -> list[tuple[bytes, int]]:
    """The speech as a browser's Opus stream (32 kb/s voip, 20 ms): (payload, 48 kHz timestamp)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = 32000
    codec.format = "s16"
    codec.layout = "stereo"
    codec.sample_rate = RATE
    codec.time_base = fractions.Fraction(1, RATE)
    codec.options = {"application": "voip", **({"fec": "1", "packet_loss": "10"} if fec else {})}
    x = np.interp(np.arange(len(speech_16k) * 3) / 3, np.arange(len(speech_16k)), speech_16k)
    pcm = np.clip(x * 32767, -32768, 32767).astype(np.int16)
    packets, first = [], None
    for i in range(0, len(pcm) - FRAME, FRAME):
        frame = av.AudioFrame.from_ndarray(np.repeat(pcm[i:i + FRAME], 2).reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = RATE, i, fractions.Fraction(1, RATE)
        for p in codec.encode(frame):
            first = p.pts if first is None else first
            packets.append((bytes(p), int(p.pts - first)))
    return packets


class ArrivalClock:
    """Packets arrive in real time: the decoder's clock reads the packet's own timestamp."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fec_decoder() -> FecOpusDecoder:
    return FecOpusDecoder(clock=ArrivalClock())


def decode(decoder, packets: list[tuple[bytes, int]], lost: set[int] = frozenset()) -> np.ndarray:  # type: ignore[assignment]
    out = []
    for i, (data, ts) in enumerate(packets):
        if i in lost:
            continue
        if isinstance(getattr(decoder, "_clock", None), ArrivalClock):
            decoder._clock.now = ts / RATE
        for frame in decoder.decode(JitterFrame(data=data, timestamp=ts)):
            out.append(frame.to_ndarray().reshape(-1, 2)[:, 0].astype(np.float64))
    return np.concatenate(out)


def loud_packet(packets: list[tuple[bytes, int]], reference: np.ndarray) -> int:
    energy = [float(np.mean(reference[i * FRAME:(i + 1) * FRAME] ** 2)) for i in range(len(packets))]
    return int(np.argmax(energy[5:-5])) + 5


def test_fec_rebuilds_a_lost_microphone_frame(speech_16k):
    packets = browser_packets(speech_16k, fec=True)
    clean = decode(fec_decoder(), packets)
    k = loud_packet(packets, clean)
    repairing = fec_decoder()
    repaired = decode(repairing, packets, lost={k})
    assert len(repaired) == len(clean)            # no gap: every later sample stays in place
    assert repairing.fec_frames == 1 and repairing.concealed_frames == 0
    span = slice(k * FRAME, (k + 1) * FRAME)
    signal = np.sum(clean[span] ** 2)
    fec_error = np.sum((repaired[span] - clean[span]) ** 2)
    # The same loss without FEC data in the stream: libopus' concealment only.
    plain = browser_packets(speech_16k, fec=False)
    plain_clean = decode(fec_decoder(), plain)
    plc_decoder = fec_decoder()
    concealed = decode(plc_decoder, plain, lost={k})
    assert len(concealed) == len(plain_clean)
    assert plc_decoder.fec_frames == 0 and plc_decoder.concealed_frames == 1  # no FEC data: concealed
    plc_error = np.sum((concealed[span] - plain_clean[span]) ** 2)
    assert fec_error < 0.5 * plc_error
    assert 10 * np.log10(signal / fec_error) > 3.0   # the frame's speech is there, not silence
    # aiortc's own decoder leaves a 20 ms hole: everything after it arrives 20 ms early.
    assert len(decode(OpusDecoder(), packets, lost={k})) == len(clean) - FRAME


def test_a_burst_is_concealed_and_an_outage_is_not_filled(speech_16k):
    packets = browser_packets(speech_16k, fec=True)
    clean = decode(fec_decoder(), packets)
    decoder = fec_decoder()
    out = decode(decoder, packets, lost={20, 21, 22})
    assert len(out) == len(clean)
    assert decoder.fec_frames == 1 and decoder.concealed_frames == 2
    decoder = fec_decoder()
    out = decode(decoder, packets, lost=set(range(40, 60)))  # 400 ms > MAX_CONCEALED_S
    assert len(out) == len(clean) - 20 * FRAME
    assert decoder.fec_frames == 0 and decoder.concealed_frames == 0


def test_timestamps_jumping_without_time_passing_invent_nothing(speech_16k):
    """A peer cannot make the server invent audio faster than real time: concealment is bounded by the
    wall time since the last packet (here none passes)."""
    packets = browser_packets(speech_16k, fec=True)[:40]
    decoder = FecOpusDecoder(clock=lambda: 100.0)
    out = []
    for i, (data, _) in enumerate(packets):
        out += decoder.decode(JitterFrame(data=data, timestamp=i * 10 * FRAME))  # +200 ms each, no time
    assert sum(f.samples for f in out) <= 40 * FRAME * 3
    assert decoder.concealed_frames + decoder.fec_frames <= 2 * 39


def test_late_packet_is_not_played_twice(speech_16k):
    packets = browser_packets(speech_16k, fec=True)[:30]
    decoder = fec_decoder()
    order = list(range(30))
    order.remove(10)
    order.insert(15, 10)   # packet 10 arrives after 14: its frame was already rebuilt
    out = []
    for i in order:
        data, ts = packets[i]
        out += decoder.decode(JitterFrame(data=data, timestamp=ts))
    assert decoder.late_packets == 1
    assert sum(f.samples for f in out) == 30 * FRAME


def _frame16(pcm: np.ndarray, index: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = 16000, index * 320, fractions.Fraction(1, 16000)
    return frame


def test_server_encoder_adds_fec_when_loss_is_reported(speech_16k):
    encoder = RealtimeOpusEncoder()
    pcm = np.clip(speech_16k * 32767, -32768, 32767)
    configs, stamps = [], []
    for j in range(100):
        if j == 50:
            encoder.set_expected_loss(0.07)
        payloads, ts = encoder.encode(_frame16(pcm[j * 320:(j + 1) * 320], j))
        configs.append(payloads[0][0] >> 3)   # the TOC byte's configuration (RFC 6716 3.1)
        stamps.append(ts)
    assert encoder.loss_pct == 10
    # Clean link: aiortc's settings (CELT-only at 96 kb/s, no FEC possible); after loss: SILK/hybrid
    # frames (configurations < 16), the layers that carry LBRR (FEC) data.
    assert all(c >= 16 for c in configs[:50])
    assert all(c < 16 for c in configs[51:])
    assert np.all(np.diff(stamps) == FRAME)        # RTP timestamps continue across the codec reopen
    encoder.set_expected_loss(0.0)
    encoder.encode(_frame16(pcm[:320], 100))
    assert encoder.loss_pct == 0


@pytest.mark.timeout(30)
async def test_offer_and_answer_carry_useinbandfec(loopback_only):
    opus_fec.offer_inband_fec()
    offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    answerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        offerer.addTransceiver("audio", direction="sendrecv")
        await offerer.setLocalDescription(await offerer.createOffer())
        assert "useinbandfec=1" in offerer.localDescription.sdp
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        assert "useinbandfec=1" in answerer.localDescription.sdp
    finally:
        await asyncio.gather(offerer.close(), answerer.close())


def _decode_mono16(decoder, packets: list[tuple[bytes, int]], lost: set[int] = frozenset()  # type: ignore[assignment]
                   ) -> tuple[np.ndarray, list[av.AudioFrame]]:
    """Decode as the server's receiver does: MicrophoneFrames from its receive buffer."""
    frames: list[av.AudioFrame] = []
    for i, (data, ts) in enumerate(packets):
        if i in lost:
            continue
        frames += decoder.decode(opus_fec.MicrophoneFrame(data=data, timestamp=ts))
    return np.concatenate([f.to_ndarray().reshape(-1).astype(np.float64) for f in frames]), frames


def _opus_codec():
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    return RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def test_the_server_decodes_the_microphone_at_16k_mono(speech_16k):
    """get_decoder's Opus decoder gives the server's microphone stream in the engine's input format (no
    48 kHz stereo made and resampled back per frame), keeps aiortc's timing (pts: the 48 kHz RTP
    timestamp), and rebuilds a lost frame by FEC."""
    packets = browser_packets(speech_16k, fec=True)
    clean, frames = _decode_mono16(opus_fec.get_decoder(_opus_codec()), packets)
    assert all(f.sample_rate == 16000 and f.layout.name == "mono" and f.format.name == "s16" and f.samples == 320
               for f in frames)
    assert [f.pts for f in frames] == [ts for _, ts in packets]
    assert all(f.time_base == fractions.Fraction(1, RATE) for f in frames)
    # The same speech as the 48 kHz stereo decode brought to 16 kHz mono by AudioIngest (the old path):
    # equal up to the resamplers' filters, as the engine sees it (its mel spectrogram).
    from realtime.audio.audio_ingest import AudioIngest
    from realtime.audio.mel import melspectrogram
    from server.media.tracks import frame_to_pcm

    ingest = AudioIngest()
    old = np.concatenate([ingest.convert(*frame_to_pcm(f))
                          for f in _frames(fec_decoder(), packets)]).astype(np.float64)
    n = min(len(old), len(clean)) - 64
    lag = min(range(-8, 9), key=lambda k: float(np.sum((old[8 + k:8 + k + n] - clean[8:8 + n] / 32768) ** 2)))
    mel_old = melspectrogram(old[8 + lag:8 + lag + n].astype(np.float32))
    mel_new = melspectrogram((clean[8:8 + n] / 32768).astype(np.float32))
    assert np.mean(np.abs(mel_old - mel_new)) < 0.02 * np.std(mel_old)
    # FEC still rebuilds a lost frame in place at 16 kHz
    k = loud_packet(packets, np.repeat(clean, 3))
    repairing = FecOpusDecoder(clock=ArrivalClock(), rate=16000, channels=1)
    repaired_parts: list[np.ndarray] = []
    for i, (data, ts) in enumerate(packets):   # a repairing decoder's clock follows the packets
        if i == k:
            continue
        repairing._clock.now = ts / RATE  # type: ignore[attr-defined]
        frames_r = repairing.decode(opus_fec.MicrophoneFrame(data=data, timestamp=ts))
        repaired_parts.extend(f.to_ndarray().reshape(-1).astype(np.float64) for f in frames_r)
    repaired = np.concatenate(repaired_parts)
    assert len(repaired) == len(clean) and repairing.fec_frames == 1
    span = slice(k * 320, (k + 1) * 320)
    assert 10 * np.log10(np.sum(clean[span] ** 2) / np.sum((repaired[span] - clean[span]) ** 2)) > 3.0


def _frames(decoder: FecOpusDecoder, packets: list[tuple[bytes, int]]) -> list[av.AudioFrame]:
    out: list[av.AudioFrame] = []
    for data, ts in packets:
        decoder._clock.now = ts / RATE  # type: ignore[attr-defined]
        out += decoder.decode(JitterFrame(data=data, timestamp=ts))
    return out


def test_other_receivers_in_the_process_keep_aiortcs_48k_stereo(speech_16k):
    """The decoder factory is process-wide: a stream that is not the server's microphone (a test's or a
    bench's aiortc client) is decoded as aiortc does."""
    packets = browser_packets(speech_16k, fec=True)[:10]
    decoder = opus_fec.get_decoder(_opus_codec())
    frames = [f for data, ts in packets for f in decoder.decode(JitterFrame(data=data, timestamp=ts))]
    reference = [f for data, ts in packets for f in OpusDecoder().decode(JitterFrame(data=data, timestamp=ts))][:1]
    assert all((f.sample_rate, f.layout.name, f.samples) == (48000, "stereo", FRAME) for f in frames)
    assert (reference[0].sample_rate, reference[0].layout.name) == (48000, "stereo")
    assert [f.pts for f in frames] == [ts for _, ts in packets]


def test_decoder_refuses_a_rate_libopus_cannot_decode_at():
    with pytest.raises(ValueError, match="44100"):
        FecOpusDecoder(rate=44100)
