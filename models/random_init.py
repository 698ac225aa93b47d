"""Random weights with trained-like activation scale, for benchmarks and tests.

The released checkpoints cannot ship with the project, and PyTorch's default init leaves the generator's
output near 0.5 everywhere, so any two implementations (or a wrong frame order) would agree trivially.
He-initialised convolutions plus BatchNorm statistics calibrated on one batch give activations of a
trained-like scale and outputs spanning (0, 1).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def calibrated_random_(model: nn.Module, calibration_inputs: Callable[[], tuple[torch.Tensor, ...]],
                       generator: torch.Generator | None = None,
                       bn_weight_range: tuple[float, float] | None = None) -> nn.Module:
    """Re-initialise `model` in place and return it in eval mode.

    calibration_inputs: called after the weights are drawn (so a shared generator keeps its order);
    one forward pass on its result sets every BatchNorm's running statistics.
    generator: None draws from torch's global generator.
    bn_weight_range: also draw BatchNorm scales uniformly from this range (default: keep them at 1).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
        elif isinstance(m, nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the one calibration batch sets the statistics
            if bn_weight_range is not None:
                nn.init.uniform_(m.weight, *bn_weight_range, generator=generator)
    model.train()
    model(*calibration_inputs())
    return model.eval()
