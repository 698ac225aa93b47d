"""int8 static quantisation of the Wav2Lip decode path: an experiment kept with its benchmark (bench/quantized.py).

`quantize_decoder(fast, calibration, rows_from)` takes a `CachedWav2Lip` built with `cache_heads=True`
(BatchNorm folded, the decoder's avatar-constant head terms cached) and returns an `Int8BandDecoder`:
the audio encoder and the row-band decoder of `CachedWav2Lip.forward(audio, cached, rows_from)` with
int8 convolutions (PyTorch eager-mode static quantisation, x86 backend: fbgemm / oneDNN kernels), per
output channel weight scales for the Conv2d layers, per tensor for the transposed convs, and observers
calibrated on `calibration` (an iterable of (mel (B, 1, 80, 16), cached tensors) pairs: real speech
and the avatar's own cache). Only the last 1x1 conv (32 -> 3) and the sigmoid stay fp32, after a
dequantise, so the output is float (B, 3, 96 - rows_from, 96) in (0, 1), shaped as CachedWav2Lip's.

The module's forward has CachedWav2Lip's signature, `forward(audio, cached, rows_from)`, but the row band
is fixed at construction (`rows_from` must equal it); `cache_rows` is forwarded, so a FaceCache made by
`fast.precompute(faces, rows_from=...)` serves it unchanged. The cached head terms stay fp32 in the cache
and are quantised per call (each at its own calibrated scale) before the residual add.

`float_parts`: parts of the path (`part_names()`) kept fp32, for mixed precision (a quantise / dequantise
at each int8 / fp32 boundary). The default quantises only the residual 3x3 convs of decoder stages 3..6.

Measured (bench/quantized.py, 2-core AVX-512 VNNI/BF16 CPU, calibrated random weights: the released
checkpoints were not available): int8 of those convs gives 1.5x (batch 1) / 1.7x (batch 8) over the fp32
fast path at 35.7 dB PSNR on seed 0, but only 23-30 dB on seeds 1-3, and the existing bf16 mode is as
fast or faster with 4-10 dB more PSNR. NOT faithful, NOT wired into the renderer: an experiment.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import (
    DeQuantStub,
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QuantStub,
    convert,
    fuse_modules,
    prepare,
)

from models.layers import InferConv
from models.wav2lip import CachedWav2Lip

log = logging.getLogger(__name__)


class _QBlock(nn.Module):
    """InferConv twin made of quantisable parts: conv -> (+ input) -> ReLU (add_relu for the residual)."""

    def __init__(self, block: InferConv) -> None:
        super().__init__()
        self.conv = copy.deepcopy(block.conv)
        self.residual = block.residual
        self.relu = nn.ReLU()
        self.skip = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        if self.residual:
            return self.skip.add_relu(self.conv(x), x)
        return self.relu(self.conv(x))


def _qblocks(seq: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[_QBlock(b) for b in seq])


class _Boundary(nn.Module):
    """Quantise or dequantise between an int8 and an fp32 part (identity when both sides agree)."""

    def __init__(self, src_q: bool, dst_q: bool) -> None:
        super().__init__()
        self.op: nn.Module = nn.Identity()
        if src_q and not dst_q:
            self.op = DeQuantStub()
        elif dst_q and not src_q:
            self.op = QuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def part_names() -> list[str]:
    """Parts of the decode path, in execution order: "audio" (audio encoder + decoder stage 0), then for
    band stage k = 1..7 (CachedWav2Lip.tails order) "head{k}" (its first conv + the cached term add) and,
    for k <= 6, "tail{k}" (its residual convs). Stage 6 runs at 96x96, stage 7 is the output block."""
    names = ["audio"]
    for k in range(1, 8):
        names.append(f"head{k}")
        if k < 7:
            names.append(f"tail{k}")
    return names


PARTS = part_names()
# Default: int8 only for the residual 3x3 convs of stages 3..6 (12x12 .. 96x96, ~70% of the band decode's
# MACs); everything else fp32. The best speed / accuracy trade measured by bench/quantized.py.
DEFAULT_INT8_PARTS = ("tail3", "tail4", "tail5", "tail6")
DEFAULT_FLOAT_PARTS = tuple(p for p in PARTS if p not in DEFAULT_INT8_PARTS)


class Int8BandDecoder(nn.Module):
    """Audio encoder + row-band decoder of a CachedWav2Lip (cache_heads=True), quantisable to int8.

    Built float (observers after `prepare`); `quantize_decoder` calibrates and converts it. Parts named in
    `float_parts` (see `part_names`) stay fp32, with a quantise / dequantise at each int8 / fp32 boundary.
    """

    def __init__(self, fast: CachedWav2Lip, rows_from: int, float_parts: Sequence[str] = ()) -> None:
        super().__init__()
        if not fast.cache_heads:
            raise ValueError("Int8BandDecoder needs a CachedWav2Lip built with cache_heads=True")
        unknown = set(float_parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; expected some of {PARTS}")
        self.rows_from = int(rows_from)
        self.plan = fast.band_plan(self.rows_from) if self.rows_from else [(0, 0)] * len(fast.tails)
        self._cache_rows = fast.cache_rows(self.rows_from)
        self.float_parts = frozenset(float_parts)
        q = {name: name not in self.float_parts for name in PARTS}
        self.quant_in = QuantStub() if q["audio"] else nn.Identity()
        self.audio_encoder = _qblocks(fast.audio_encoder)
        self.stage0 = _qblocks(fast.stage0)
        self.heads = nn.ModuleList(copy.deepcopy(h) for h in fast.dec_heads)
        self.term_quant = nn.ModuleList(QuantStub() if q[f"head{k + 1}"] else nn.Identity() for k in range(7))
        self.head_add = nn.ModuleList(FloatFunctional() for _ in range(7))
        # boundaries[name]: converts the previous part's output for part `name`.
        self.boundaries = nn.ModuleDict({cur: _Boundary(q[prev], q[cur]) for prev, cur in pairwise(PARTS)})
        tails = list(fast.tails)
        self.tails = nn.ModuleList(_qblocks(t) for t in tails[:6])
        last = tails[6]  # output block tail: Conv2d(32, 3, 1) + Sigmoid, kept fp32
        if len(last) != 2 or not isinstance(last[0], nn.Conv2d) or not isinstance(last[1], nn.Sigmoid):
            raise ValueError("unexpected output block")
        self.dequant_out = DeQuantStub() if q["head7"] else nn.Identity()
        self.out_conv = copy.deepcopy(last[0])
        self.out_act = nn.Sigmoid()
        self.eval()

    def part_modules(self) -> dict[str, list[nn.Module]]:
        parts: dict[str, list[nn.Module]] = {"audio": [self.audio_encoder, self.stage0]}
        for k in range(7):
            parts[f"head{k + 1}"] = [self.heads[k], self.term_quant[k], self.head_add[k]]
            if k < 6:
                parts[f"tail{k + 1}"] = [self.tails[k]]
        return parts

    def cache_rows(self, rows_from: int) -> list[int] | None:
        self._check(rows_from)
        return self._cache_rows

    def _check(self, rows_from: int | None) -> None:
        if rows_from is not None and int(rows_from) != self.rows_from:
            raise ValueError(f"this int8 decoder was built for rows_from={self.rows_from}, not {rows_from}")

    def forward(self, audio: Tensor, cached: list[Tensor], rows_from: int | None = None) -> Tensor:
        """Mel (B, 1, 80, 16) float + cached head terms -> (B, 3, 96 - rows_from, 96) float in (0, 1)."""
        self._check(rows_from)
        x = self.stage0(self.audio_encoder(self.quant_in(audio.contiguous(memory_format=torch.channels_last))))
        start = 0
        for k, (first_in, first_out) in enumerate(self.plan):
            x = self.boundaries[f"head{k + 1}"](x)
            if first_in > start:
                x = x[:, :, first_in - start:]
            x = self.heads[k](x)
            term = cached[k]
            term = self.term_quant[k](term[:, :, term.shape[2] - x.shape[2]:])
            x = self.head_add[k].add_relu(x, term)
            start = first_out
            if k < 6:
                x = self.tails[k](self.boundaries[f"tail{k + 1}"](x))
        x = self.out_act(self.out_conv(self.dequant_out(x)))
        return x[:, :, self.rows_from - start:]


def int8_qconfig(reduce_range: bool = False, histogram: bool = True, transposed: bool = False) -> QConfig:
    """Activations: quint8 affine per tensor (histogram/L2 ranges or min/max); weights: qint8 symmetric,
    per output channel (Conv2d) or per tensor (ConvTranspose2d)."""
    act_cls = HistogramObserver if histogram else MinMaxObserver
    act = act_cls.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range)
    if transposed:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    else:
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return QConfig(activation=act, weight=weight)


@torch.no_grad()
def quantize_decoder(fast: CachedWav2Lip, calibration: Iterable[tuple[Tensor, list[Tensor]]], rows_from: int = 36,
                     *, float_parts: Sequence[str] = DEFAULT_FLOAT_PARTS, reduce_range: bool = False,
                     histogram: bool = True, engine: str = "x86") -> Int8BandDecoder:
    """CachedWav2Lip (cache_heads=True, fp32) -> calibrated int8 Int8BandDecoder for that row band.

    calibration: (mel (B, 1, 80, 16) float, `FaceCache.select(...)` tensors) pairs, a few hundred frames.
    reduce_range: 7-bit activations (needed only on CPUs without VNNI, where fbgemm's u8*s8 pairs can
    saturate); the default keeps 8 bits. engine: torch.backends.quantized.engine to use.
    """
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantized engine {engine!r} unavailable: {torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = engine
    model = Int8BandDecoder(fast, rows_from, float_parts).float().eval()
    # Conv + ReLU fusion for the non-residual Conv2d blocks (transposed convs keep a separate ReLU).
    for mod in model.modules():
        if isinstance(mod, _QBlock) and not mod.residual and type(mod.conv) is nn.Conv2d:
            fuse_modules(mod, [["conv", "relu"]], inplace=True)
    base, tconv = int8_qconfig(reduce_range, histogram), int8_qconfig(reduce_range, histogram, transposed=True)
    model.qconfig = base
    for name, mods in model.part_modules().items():
        for m in mods:
            for sub in m.modules():
                if name in model.float_parts:
                    sub.qconfig = None
                elif isinstance(sub, nn.ConvTranspose2d):
                    sub.qconfig = tconv
    model.out_conv.qconfig = None
    model.out_act.qconfig = None
    prepare(model, inplace=True)
    frames = 0
    for audio, cached in calibration:
        model(audio.float(), [t.float() for t in cached], rows_from)
        frames += audio.shape[0]
    if frames == 0:
        raise ValueError("quantize_decoder needs at least one calibration batch")
    convert(model, inplace=True)
    log.info("int8 decoder calibrated on %d frames (engine %s, rows_from %d, fp32 parts %s)",
             frames, engine, rows_from, sorted(model.float_parts))
    return model.eval()
