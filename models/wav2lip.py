"""The Wav2Lip generator, module-for-module compatible with the released wav2lip.pth / wav2lip_gan.pth.

Written from the facts in shared/wav2lip/README.md and the key list wav2lip_state_dict.tsv (no official
code copied). The state_dict keys, their order and shapes equal the official ones, so the released
checkpoints load strictly.

Shapes (B = batch):
- audio `(B, 1, 80, 16)` mel window, face `(B, 6, 96, 96)` in [0, 1] ([masked BGR, reference BGR]),
  output `(B, 3, 96, 96)` BGR in (0, 1).
- training layout: audio `(B, T, 1, 80, 16)`, face `(B, 6, T, 96, 96)` -> `(B, 3, T, 96, 96)`.

For real time the network is split: `encode_face` depends only on the avatar frame (cache it once per
avatar), `decode` runs per video frame. `forward(a, f) == decode(a, encode_face(f))` exactly.
`CachedWav2Lip` goes further for inference (BatchNorm folded, avatar-constant decoder terms cached).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from models.checkpoints import load_into, place
from models.layers import ConvBlock, ConvTransposeBlock, fold_batchnorm, to_infer_blocks

log = logging.getLogger(__name__)

FACE_SIZE = 96
MEL_BINS, MEL_STEPS = 80, 16
EMBED_DIM = 512


def _face_encoder() -> nn.ModuleList:
    """96x96 -> 16@96, 32@48, 64@24, 128@12, 256@6, 512@3, 512@1 (one feature map per stage)."""
    return nn.ModuleList([
        nn.Sequential(ConvBlock(6, 16, 7, 1, 3)),
        nn.Sequential(ConvBlock(16, 32, 3, 2, 1),
                      ConvBlock(32, 32, 3, 1, 1, residual=True),
                      ConvBlock(32, 32, 3, 1, 1, residual=True)),
        nn.Sequential(ConvBlock(32, 64, 3, 2, 1),
                      ConvBlock(64, 64, 3, 1, 1, residual=True),
                      ConvBlock(64, 64, 3, 1, 1, residual=True),
                      ConvBlock(64, 64, 3, 1, 1, residual=True)),
        nn.Sequential(ConvBlock(64, 128, 3, 2, 1),
                      ConvBlock(128, 128, 3, 1, 1, residual=True),
                      ConvBlock(128, 128, 3, 1, 1, residual=True)),
        nn.Sequential(ConvBlock(128, 256, 3, 2, 1),
                      ConvBlock(256, 256, 3, 1, 1, residual=True),
                      ConvBlock(256, 256, 3, 1, 1, residual=True)),
        nn.Sequential(ConvBlock(256, 512, 3, 2, 1),
                      ConvBlock(512, 512, 3, 1, 1, residual=True)),
        nn.Sequential(ConvBlock(512, 512, 3, 1, 0),   # 3x3 -> 1x1
                      ConvBlock(512, 512, 1, 1, 0)),
    ])


def _audio_encoder() -> nn.Sequential:
    """80x16 mel -> 27x16 (stride (3,1)) -> 9x6 (stride 3) -> 3x3 (stride (3,2)) -> 1x1, 512 channels."""
    return nn.Sequential(
        ConvBlock(1, 32, 3, 1, 1),
        ConvBlock(32, 32, 3, 1, 1, residual=True),
        ConvBlock(32, 32, 3, 1, 1, residual=True),
        ConvBlock(32, 64, 3, (3, 1), 1),
        ConvBlock(64, 64, 3, 1, 1, residual=True),
        ConvBlock(64, 64, 3, 1, 1, residual=True),
        ConvBlock(64, 128, 3, 3, 1),
        ConvBlock(128, 128, 3, 1, 1, residual=True),
        ConvBlock(128, 128, 3, 1, 1, residual=True),
        ConvBlock(128, 256, 3, (3, 2), 1),
        ConvBlock(256, 256, 3, 1, 1, residual=True),
        ConvBlock(256, 512, 3, 1, 0),
        ConvBlock(512, 512, 1, 1, 0),
    )


def _up(cin: int, cout: int, n_residual: int) -> nn.Sequential:
    """x2 transposed-conv upsampling followed by residual convs."""
    blocks: list[nn.Module] = [ConvTransposeBlock(cin, cout, 3, 2, 1, output_padding=1)]
    blocks += [ConvBlock(cout, cout, 3, 1, 1, residual=True) for _ in range(n_residual)]
    return nn.Sequential(*blocks)


def _face_decoder() -> nn.ModuleList:
    """Audio embedding 512@1 -> 512@1, 512@3, 512@6, 384@12, 256@24, 128@48, 64@96.

    Each stage's output is concatenated with the matching encoder feature, hence the input channel
    counts 1024, 1024, 768, 512, 320, 160 (and 80 into the output block).
    """
    return nn.ModuleList([
        nn.Sequential(ConvBlock(512, 512, 1, 1, 0)),
        nn.Sequential(ConvTransposeBlock(1024, 512, 3, 1, 0),  # 1x1 -> 3x3
                      ConvBlock(512, 512, 3, 1, 1, residual=True)),
        _up(1024, 512, 2),
        _up(768, 384, 2),
        _up(512, 256, 2),
        _up(320, 128, 2),
        _up(160, 64, 2),
    ])


def encoder_features(blocks: nn.ModuleList, face: Tensor) -> list[Tensor]:
    """Run the face encoder stage by stage, keeping every stage's output (the decoder's skips)."""
    feats = []
    x = face
    for block in blocks:
        x = block(x)
        feats.append(x)
    return feats


def _fold_time(x: Tensor, time_dim: int) -> Tensor:
    """(B, ..T.., ...) -> (T*B, ...), time-major, as the training path folds sequences into the batch."""
    return torch.cat([x.select(time_dim, t) for t in range(x.shape[time_dim])], dim=0)


class Wav2Lip(nn.Module):
    """The official generator. Attribute names and order define the checkpoint keys: do not rename."""

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = _face_encoder()
        self.audio_encoder = _audio_encoder()
        self.face_decoder_blocks = _face_decoder()
        self.output_block = nn.Sequential(ConvBlock(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())

    def encode_face(self, face: Tensor) -> list[Tensor]:
        """(B, 6, 96, 96) -> the 7 encoder feature maps, shallowest first. Constant per avatar frame."""
        return encoder_features(self.face_encoder_blocks, face)

    def encode_audio(self, mel: Tensor) -> Tensor:
        """(B, 1, 80, 16) mel window -> (B, 512, 1, 1) audio embedding."""
        return self.audio_encoder(mel)

    def decode(self, audio: Tensor, face_features: list[Tensor]) -> Tensor:
        """Mel window (B, 1, 80, 16) or audio embedding (B, 512, 1, 1) + encoder features -> (B, 3, 96, 96)."""
        x = self.encode_audio(audio) if audio.shape[-2:] == (MEL_BINS, MEL_STEPS) else audio
        for block, skip in zip(self.face_decoder_blocks, reversed(face_features), strict=True):
            x = torch.cat((block(x), skip), dim=1)  # [decoder output, encoder feature]
        return self.output_block(x)

    def forward(self, audio_sequences: Tensor, face_sequences: Tensor) -> Tensor:
        if face_sequences.dim() == 5:  # training layout: fold T into the batch, unfold the output again
            batch = audio_sequences.shape[0]
            out = self.decode(_fold_time(audio_sequences, 1), self.encode_face(_fold_time(face_sequences, 2)))
            return torch.stack(torch.split(out, batch, dim=0), dim=2)
        return self.decode(audio_sequences, self.encode_face(face_sequences))


def faces_to_input(faces_bgr: np.ndarray) -> Tensor:
    """(B, 96, 96, 3) uint8 BGR crops -> (B, 6, 96, 96) float32: [lower half zeroed, unmasked] / 255."""
    faces = np.asarray(faces_bgr)
    if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3):
        raise ValueError(f"expected (B, 96, 96, 3) face crops, got {faces.shape}")
    masked = faces.copy()
    masked[:, FACE_SIZE // 2:] = 0  # the generator must not see the mouth it is asked to draw
    stacked = np.concatenate([masked, faces], axis=3).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))


def mels_to_input(mels: np.ndarray) -> Tensor:
    """(B, 80, 16) float mel windows -> (B, 1, 80, 16) float32 tensor."""
    mels = np.asarray(mels, dtype=np.float32)
    if mels.ndim != 3 or mels.shape[1:] != (MEL_BINS, MEL_STEPS):
        raise ValueError(f"expected (B, 80, 16) mel windows, got {mels.shape}")
    return torch.from_numpy(np.ascontiguousarray(mels))[:, None]


def to_model(tensor: Tensor, model: nn.Module) -> Tensor:
    """Move an input to the model's device and dtype (fp16 on CUDA after load_wav2lip(device='cuda'))."""
    param = next(model.parameters())
    return tensor.to(device=param.device, dtype=param.dtype, non_blocking=True)


def to_uint8(pred: Tensor) -> np.ndarray:
    """(B, 3, 96, 96) generator output -> (B, 96, 96, 3) uint8 BGR, truncating like the official code."""
    return (pred.float().cpu().numpy().transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)


def load_wav2lip(path: str | os.PathLike, device: str | torch.device = "cpu") -> Wav2Lip:
    """Load an official (or bare state_dict) generator checkpoint, in eval mode.

    device: "cpu" (fp32), "cuda" (fp16 via .half(); cast inputs with `to_model`), or "auto".
    Raises CheckpointError with a clear message for any unusable file.
    """
    model = load_into(Wav2Lip(), path, "wav2lip")
    return place(model.eval(), device)


# ----------------------------------------------------------------------------------------------------
# Real-time inference: everything that depends only on the avatar frame is computed once.
# ----------------------------------------------------------------------------------------------------

# Values cached per avatar frame: the encoder features (what decode needs), or the precomputed head
# terms (decoder stage widths 512, 512, 384, 256, 128, 64 and the output block's 32, at the stage sizes).
FEATURE_VALUES = 512 + 512 * 3**2 + 256 * 6**2 + 128 * 12**2 + 64 * 24**2 + 32 * 48**2 + 16 * 96**2
HEAD_VALUES = 512 * 3**2 + 512 * 6**2 + 384 * 12**2 + 256 * 24**2 + 128 * 48**2 + 64 * 96**2 + 32 * 96**2
# (channels, size) of each cached tensor, decoder stage 1..6 then the output block.
_HEAD_SHAPES = ((512, 3), (512, 6), (384, 12), (256, 24), (128, 48), (64, 96), (32, 96))
_FEATURE_SHAPES = ((512, 1), (512, 3), (256, 6), (128, 12), (64, 24), (32, 48), (16, 96))


def cache_values(cache_heads: bool, rows_from: int = 0) -> int:
    """Values cached per avatar frame by `CachedWav2Lip.precompute(..., rows_from)`."""
    shapes = _HEAD_SHAPES if cache_heads else _FEATURE_SHAPES
    plan = _static_band_plan(rows_from)
    return sum(c * (size - (out if cache_heads else inp)) * size
               for (c, size), (inp, out) in zip(shapes, plan, strict=True))


def _static_band_plan(rows_from: int) -> list[tuple[int, int]]:
    """`CachedWav2Lip.band_plan` from the fixed Wav2Lip geometry (tests check they agree)."""
    halos = (1, 2, 2, 2, 2, 2, 0)  # rows each stage's tail convs consume
    plan, need = [], rows_from
    for k in range(6, -1, -1):
        need_head = max(need - halos[k], 0)
        if k == 0:
            first = (0, 0)
        elif k == 6:  # 3x3 stride-1 head of the output block
            first = (max(need_head - 1, 0),) * 2
        else:  # x2 transposed conv
            first = (need_head // 2, 2 * (need_head // 2))
        plan.append(first)
        need = first[0]
    return plan[::-1]


def _split_input_channels(conv: nn.Conv2d | nn.ConvTranspose2d, n_first: int) -> tuple[nn.Module, nn.Module]:
    """Split a conv over concat(a, b) into conv_a (no bias) and conv_b (with the bias): conv = conv_a + conv_b.

    Exact by linearity; only the floating-point summation order changes.
    """
    in_dim = 1 if isinstance(conv, nn.Conv2d) else 0  # Conv2d (out, in, ..) / ConvTranspose2d (in, out, ..)
    weight = conv.weight.detach()
    first = _conv_like(conv, weight.narrow(in_dim, 0, n_first).clone(), None)
    second = _conv_like(conv, weight.narrow(in_dim, n_first, weight.shape[in_dim] - n_first).clone(), conv.bias)
    return first, second


def _conv_like(conv: nn.Conv2d | nn.ConvTranspose2d, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A conv with `conv`'s geometry and the given weight (its in/out channels follow from the weight)."""
    kernel, stride, padding = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding)
    if isinstance(conv, nn.ConvTranspose2d):
        new: nn.Module = nn.ConvTranspose2d(weight.shape[0], weight.shape[1], kernel, stride, padding,
                                            _pair(conv.output_padding), bias=bias is not None, device="meta")
    else:
        new = nn.Conv2d(weight.shape[1], weight.shape[0], kernel, stride, padding,
                        bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new


def _pair(value: str | tuple[int, ...]) -> tuple[int, int]:
    """A 2-d conv's (h, w) geometry attribute; torch types them as tuples of any length (or a padding mode)."""
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(f"expected a 2-d conv geometry, got {value!r}")
    return value[0], value[1]


@dataclass
class FaceCache:
    """Avatar-constant tensors for N avatar frames (`CachedWav2Lip.precompute`), one per decoder input.

    `tensors[k]` (N, C, H, W) feeds decoder stage k+1 (the last one the output block). With `heads`, it is
    that stage's first-conv contribution from the encoder feature (bias included); otherwise the raw
    encoder feature, concatenated at decode time as the official model does.
    """
    tensors: list[Tensor]
    heads: bool
    rows_from: int = 0  # the cache holds only what a decode of output rows [rows_from, 96) reads

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def select(self, index: Tensor, rows: list[int] | None = None) -> list[Tensor]:
        """Per-sample tensors for a batch of avatar frame indices (a LongTensor on the cache's device).

        rows: optional first row to keep of each tensor (`CachedWav2Lip.cache_rows`), so that a band
        decode (`rows_from`) gathers only the rows it reads.
        """
        if rows is None:
            return [t.index_select(0, index) for t in self.tensors]
        return [t[:, :, r:].index_select(0, index) for t, r in zip(self.tensors, rows, strict=True)]


class CachedWav2Lip(nn.Module):
    """Inference-only Wav2Lip for a fixed avatar: avatar-constant work done once, per-frame work lean.

    - The face encoder depends only on the avatar frame: `precompute` runs it once per frame.
    - With `cache_heads`, the first conv of every decoder stage (and of the output block) is split by
      linearity, conv(cat(x, f)) = conv_x(x) + conv_f(f) + bias, and conv_f(f) + bias is cached too.
      It saves ~6% of the per-frame FLOPs but caches 5.6 MB per avatar frame instead of 1.2 MB.
    - BatchNorm is folded into the convs; the skip add and ReLU run in place.
    - `channels_last` keeps activations NHWC, oneDNN's preferred layout (measured on a 2-core AVX-512
      CPU: as fast at batch 1-8, ~15% faster at batch 32).

    - `rows_from` (forward) computes only output rows [rows_from, 96): every decoder stage runs on the
      row band its receptive field needs (plus the halo rows each 3x3 conv consumes, discarded). The
      bottom border is the real image border, the top of each band is interior, so the band starts
      far enough above the needed rows that zero padding never reaches them: the computed rows are
      the same convolutions on the same inputs as the full decode (equal up to float summation order).
      The real-time compositor's feathered lower-face mask reads only rows >= 39 of a 96 patch
      (realtime.renderers.wav2lip.PASTED_ROWS_FROM), which removes ~40% of the decoder's work.

    Outputs equal `Wav2Lip` up to float rounding; the tests bound the difference.
    """

    def __init__(self, model: Wav2Lip, cache_heads: bool = True, channels_last: bool = True) -> None:
        super().__init__()
        folded = to_infer_blocks(fold_batchnorm(model))
        self.cache_heads = cache_heads
        self.channels_last = channels_last
        self.face_encoder_blocks = folded.face_encoder_blocks
        self.audio_encoder = folded.audio_encoder
        self.stage0 = folded.face_decoder_blocks[0]
        stages = [*folded.face_decoder_blocks[1:], folded.output_block]
        skip_channels = [_out_channels(block) for block in reversed(folded.face_encoder_blocks)]
        self.full_heads, self.dec_heads, self.face_heads, self.tails = (nn.ModuleList() for _ in range(4))
        for stage, n_skip in zip(stages, skip_channels, strict=True):
            conv = stage[0].conv  # its ReLU runs in forward, after the cached term is added
            self.full_heads.append(conv)
            head_x, head_f = _split_input_channels(conv, conv.in_channels - n_skip)
            self.dec_heads.append(head_x)
            self.face_heads.append(head_f)
            self.tails.append(nn.Sequential(*stage[1:]))
        # Keep only the weights the chosen path uses (the stage heads hold ~50 MB).
        if cache_heads:
            self.full_heads = nn.ModuleList()
        else:
            self.dec_heads, self.face_heads = nn.ModuleList(), nn.ModuleList()
        if channels_last:
            # Module.to accepts memory_format (documented); torch's overloads for it omit the keyword.
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.eval()

    def encode_face(self, face: Tensor) -> list[Tensor]:
        return encoder_features(self.face_encoder_blocks, face)

    @torch.inference_mode()
    def precompute(self, face: Tensor, batch_size: int = 16, rows_from: int = 0) -> FaceCache:
        """(N, 6, 96, 96) avatar face inputs -> FaceCache, in chunks to bound peak memory.

        rows_from > 0 keeps only the rows a decode of output rows [rows_from, 96) reads (~30% less memory
        with the head terms at rows_from=36); such a cache serves `forward(..., rows_from' >= rows_from)`.
        """
        rows = self.cache_rows(rows_from) or [0] * len(self.tails)
        chunks: list[list[Tensor]] = []
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for start in range(0, face.shape[0], batch_size):
            feats = self.encode_face(face[start:start + batch_size].contiguous(memory_format=fmt))
            # Stage k (1..6) takes encoder feature 7-k, deepest first; the output block takes feature 0.
            skips = list(reversed(feats))
            terms = [head(f) for head, f in zip(self.face_heads, skips, strict=True)] if self.cache_heads else skips
            chunks.append([t[:, :, r:] for t, r in zip(terms, rows, strict=True)])
        tensors = [torch.cat(parts, dim=0).contiguous(memory_format=fmt) for parts in zip(*chunks, strict=True)]
        return FaceCache(tensors, heads=self.cache_heads, rows_from=rows_from)

    def _heads(self) -> nn.ModuleList:
        return self.dec_heads if self.cache_heads else self.full_heads

    def band_plan(self, rows_from: int) -> list[tuple[int, int]]:
        """Per decoder stage k (stages 1..6, then the output block): (first input row, first output row)
        of the head conv, so that the final output is exact from row `rows_from` of 96 on.

        Walks the receptive field backwards. A tail conv with padding p consumes p rows of the band's
        top (their zero padding is wrong inside the image), a stride-1 head conv likewise; the x2
        transposed conv (kernel 3, padding 1, output padding 1) computes output rows [2 i0, 2 H) exactly
        from input rows [i0, H), so it needs no halo of its own beyond its input's validity.
        """
        if not 0 <= rows_from < FACE_SIZE:
            raise ValueError(f"rows_from must be in [0, {FACE_SIZE}), got {rows_from}")
        plan: list[tuple[int, int]] = []
        need = rows_from  # first row that must be exact at the current stage's output
        for head, tail in zip(reversed(self._heads()), reversed(self.tails), strict=True):
            halo = sum(_pair(m.padding)[0] for m in tail.modules() if isinstance(m, nn.Conv2d))
            need_head = max(need - halo, 0)
            if isinstance(head, nn.ConvTranspose2d):
                if head.stride[0] == 1:  # 1x1 -> 3x3 (stage 1): tiny, always whole
                    first_in, first_out = 0, 0
                else:
                    if (head.kernel_size[0], head.stride[0], head.padding[0]) != (3, 2, 1):
                        raise ValueError("band decoding assumes kernel 3, stride 2, padding 1 upsampling")
                    first_in = need_head // 2
                    first_out = 2 * first_in
            elif isinstance(head, nn.Conv2d):
                if head.stride[0] != 1:
                    raise ValueError("band decoding assumes stride-1 convs")
                first_in = max(need_head - _pair(head.padding)[0], 0)
                first_out = first_in
            else:
                raise TypeError(f"band decoding expects conv heads, got {type(head).__name__}")
            plan.append((first_in, first_out))
            need = first_in
        return plan[::-1]

    def cache_rows(self, rows_from: int) -> list[int] | None:
        """First row of each cached tensor that `forward(..., rows_from)` reads (for `FaceCache.select`)."""
        if rows_from == 0:
            return None
        plan = self.band_plan(rows_from)
        return [out if self.cache_heads else inp for inp, out in plan]

    def forward(self, audio: Tensor, cached: list[Tensor], rows_from: int = 0) -> Tensor:
        """Mel (B, 1, 80, 16) + per-sample cached tensors (`FaceCache.select`) -> (B, 3, 96, 96) in (0, 1).

        With `rows_from` > 0 only output rows [rows_from, 96) are computed and returned:
        (B, 3, 96 - rows_from, 96). `cached` may be the full tensors or their bottom bands
        (`FaceCache.select(index, self.cache_rows(rows_from))`).
        """
        x = self.stage0(self.audio_encoder(audio))
        if rows_from == 0:
            for k, (tail, term) in enumerate(zip(self.tails, cached, strict=True)):
                if self.cache_heads:
                    x = self.dec_heads[k](x)
                    x += term
                else:
                    x = self.full_heads[k](torch.cat((x, term), dim=1))
                x = tail(x.relu_())
            return x
        start = 0  # global row of x's first row
        bands = zip(self.band_plan(rows_from), self.tails, cached, strict=True)
        for k, ((first_in, first_out), tail, term) in enumerate(bands):
            if first_in > start:
                x = x[:, :, first_in - start:]
            rows = x.shape[2] * (2 if isinstance(self._heads()[k], nn.ConvTranspose2d) and k else 1)
            if term.shape[2] < (rows if self.cache_heads else x.shape[2]):
                raise ValueError("the cached tensors do not cover the rows this decode needs "
                                 "(precompute with a rows_from <= the forward's)")
            if self.cache_heads:
                x = self.dec_heads[k](x)
                x += term[:, :, term.shape[2] - x.shape[2]:]  # both bands end at the bottom border
            else:
                x = self.full_heads[k](torch.cat((x, term[:, :, term.shape[2] - x.shape[2]:]), dim=1))
            start = first_out
            x = tail(x.relu_())
        return x[:, :, rows_from - start:]


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a face-encoder stage (an nn.Sequential of InferConv blocks): its last conv's."""
    conv = stage[-1].conv if isinstance(stage, nn.Sequential) else None
    if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
        raise TypeError(f"expected a stage of folded conv blocks, got {type(stage).__name__}")
    return conv.out_channels
