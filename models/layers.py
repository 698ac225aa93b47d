"""Building blocks shared by the Wav2Lip generator and SyncNet_color, plus BatchNorm folding.

The attribute names (`conv_block`, `act`) are part of the checkpoint format: the released files store
keys such as `face_encoder_blocks.1.0.conv_block.0.weight` (the conv) and `...conv_block.1.running_mean`
(the BatchNorm), so `conv_block` must stay an `nn.Sequential(conv, BatchNorm2d)`.
"""
from __future__ import annotations

import copy
import itertools
import logging
from typing import TypeVar

import torch
from torch import Tensor, nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)  # the functions below return the module type they are given

log = logging.getLogger(__name__)

IntPair = int | tuple[int, int]


class ConvBlock(nn.Module):
    """conv -> BatchNorm -> (+ input if residual) -> ReLU, the official "Conv2d" block."""

    def __init__(self, cin: int, cout: int, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                 residual: bool = False) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x  # the skip joins after BatchNorm and before the ReLU
        return self.act(out)


class ConvTransposeBlock(nn.Module):
    """transposed conv -> BatchNorm -> ReLU, the official "Conv2dTranspose" block."""

    def __init__(self, cin: int, cout: int, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                 output_padding: IntPair = 0) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv_block(x))


def _fold_pair(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite `conv` in place so that conv'(x) == bn(conv(x)) with the BatchNorm's running statistics."""
    if conv.groups != 1:
        raise ValueError("fold_batchnorm only handles groups=1 convolutions")
    if bn.weight is None or bn.bias is None or bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm needs an affine BatchNorm2d with running statistics")
    # float64 for the arithmetic: the folded weights then differ from the exact product by one rounding.
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.detach().double()
    # Conv2d stores (out, in, kh, kw); ConvTranspose2d stores (in, out, kh, kw).
    shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - bn.running_mean.double()) * scale + bn.bias.detach().double()
    conv.weight = nn.Parameter((weight * scale.view(shape)).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def fold_batchnorm(model: ModuleT, inplace: bool = False) -> ModuleT:
    """Fold every eval-mode BatchNorm2d into the conv right before it in the same nn.Sequential.

    Inference only: the BatchNorm is replaced by nn.Identity, so the result's state_dict no longer
    matches the checkpoint layout (keep the original model for saving / training). Returns the folded
    model (a deep copy unless `inplace`), in eval mode.
    """
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    folded = 0
    for module in target.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (_, first), (name, second) in itertools.pairwise(children):
            if isinstance(first, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(second, nn.BatchNorm2d):
                _fold_pair(first, second)
                setattr(module, name, nn.Identity())
                folded += 1
    log.debug("folded %d BatchNorm layers", folded)
    return target


# ----------------------------------------------------------------------------------------------------
# Inference-only building blocks (after fold_batchnorm): no BatchNorm, in-place skip add and ReLU.
# ----------------------------------------------------------------------------------------------------

class InferConv(nn.Module):
    """A folded conv block for inference: conv -> (+= input if residual) -> ReLU, in place."""

    def __init__(self, conv: nn.Module, residual: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.residual = residual

    @classmethod
    def from_block(cls, block: ConvBlock | ConvTransposeBlock) -> InferConv:
        """From a block whose BatchNorm was folded (fold_batchnorm) into its conv."""
        if not isinstance(block.conv_block[1], nn.Identity):
            raise ValueError("fold_batchnorm the model first")
        return cls(block.conv_block[0], getattr(block, "residual", False))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if self.residual:
            out += x  # in place: `out` is a fresh conv output, nothing else holds it
        return out.relu_()


def to_infer_blocks(module: ModuleT) -> ModuleT:
    """Replace every (folded) ConvBlock / ConvTransposeBlock inside `module` by an InferConv, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, (ConvBlock, ConvTransposeBlock)):
            setattr(module, name, InferConv.from_block(child))
        else:
            to_infer_blocks(child)
    return module
