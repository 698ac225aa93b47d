"""The CUDA precision decisions, checked on the CPU with the gate's inputs (issue #20 fixes 3 and 5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_precision_gate import reference, with_noise

from bench.common import eager_uint8
from models.cuda_numerics import cudnn_autotune, strict_fp32, tf32_enabled
from realtime.renderers.wav2lip import settle_cuda_precision, weights_finite


def half_net(finite: bool = True) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)).half()
    if not finite:
        with torch.no_grad():
            net[1].weight[0, 0, 0, 0] = float("inf")  # what folding BatchNorm can do past 65504
    return net


def must_not_run(indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
    raise AssertionError("the gate must not run on weights that are not finite")


def test_weights_finite():
    assert weights_finite(half_net(True)) and not weights_finite(half_net(False))
    big = torch.nn.Linear(2, 2)
    with torch.no_grad():
        big.weight.fill_(1e6)
    assert weights_finite(big) and not weights_finite(big.half())  # 1e6 overflows fp16


@pytest.mark.parametrize("sigma, chosen", [(1.0, "fp16"), (12.0, "fp32")])
def test_fp16_is_kept_only_within_the_bound(sigma, chosen):
    got, report, note = settle_cuda_precision(half_net(), reference, with_noise(sigma), n_frames=7,
                                              min_psnr_db=35.0)
    assert got == chosen and report is not None and report.chosen == chosen
    assert report.frames == 96 and "fp16" in report.psnr_db
    assert ("within the bound" in note) == (chosen == "fp16")


def test_fp16_with_non_finite_weights_is_not_served():
    got, report, note = settle_cuda_precision(half_net(False), must_not_run, must_not_run, 7, 35.0)
    assert got == "fp32" and report is None and "not finite" in note


def test_strict_fp32_switches_tf32_off_and_restores_it():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        with strict_fp32():
            assert not tf32_enabled()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_bench_reference_runs_with_tf32_off():
    """Fix 3: bench.common.eager_uint8 (gpu_check's accuracy reference) computes with TF32 off."""
    seen: list[bool] = []

    class Probe(torch.nn.Module):
        def forward(self, audio: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
            seen.append(tf32_enabled())
            return torch.zeros(len(faces), 3, 96, 96)

    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        eager_uint8(Probe(), np.zeros((2, 96, 96, 3), np.uint8), np.zeros((2, 80, 16), np.float32))
        assert seen == [False] and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_cudnn_autotune_is_on_only_while_some_warm_up_runs():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with cudnn_autotune():
            with cudnn_autotune():  # two workers warming up at once
                assert torch.backends.cudnn.benchmark
            assert torch.backends.cudnn.benchmark  # the other is still warming up
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved
