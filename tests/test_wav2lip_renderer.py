"""The Wav2Lip MouthRenderer against the plain eager generator, on a tiny fake avatar (random weights)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models.random_init import calibrated_random_
from models.wav2lip import Wav2Lip, faces_to_input, mels_to_input, to_uint8
from realtime.renderers import compositor, precision_gate
from realtime.renderers.base import MouthPatch, MouthRenderer
from realtime.renderers.wav2lip import PASTED_ROWS_FROM, Wav2LipRenderer


class FakeAvatar:
    """Duck-typed realtime.avatars.avatar.Avatar: frames, boxes and the official 96x96 crops."""

    def __init__(self, n: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.frames = rng.integers(0, 256, size=(n, 120, 100, 3), dtype=np.uint8)
        self.boxes = np.array([[10 + i, 110, 5, 95 - i] for i in range(n)], dtype=np.int32)
        self.crop_calls = 0

    def face_crops(self, size: int = 96) -> np.ndarray:
        self.crop_calls += 1
        return np.stack([cv2.resize(f[y1:y2, x1:x2], (size, size)) for f, (y1, y2, x1, x2) in
                         zip(self.frames, self.boxes, strict=True)])


@pytest.fixture(scope="module")
def model() -> Wav2Lip:
    """Random weights with trained-like activation scale (He init, BatchNorm calibrated on random input),
    so the output spans (0, 1) and a wrong frame / window / channel order would show."""
    gen = torch.Generator().manual_seed(11)
    return calibrated_random_(Wav2Lip(), lambda: (torch.rand(4, 1, 80, 16, generator=gen) * 8 - 4,
                                                  torch.rand(4, 6, 96, 96, generator=gen)), gen)


@pytest.fixture(scope="module")
def avatar() -> FakeAvatar:
    return FakeAvatar()


def mel_windows(n: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 80, 16), dtype=np.float32) * 8 - 4)


def eager_patches(model: Wav2Lip, avatar: FakeAvatar, indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
    """What the official inference produces for these (frame, window) pairs."""
    faces = faces_to_input(avatar.face_crops(96)[indices])
    with torch.no_grad():
        return to_uint8(model(mels_to_input(mels), faces))


def assert_close_uint8(patches: list[MouthPatch], expected: np.ndarray, rows_from: int = PASTED_ROWS_FROM) -> None:
    """Equal to the eager patches within one level over the generated rows [rows_from, 96)."""
    got = np.stack([p.image for p in patches]).astype(int)[:, rows_from:]
    expected = expected[:, rows_from:]
    assert np.abs(got - expected.astype(int)).max() <= 1
    assert (got == expected).mean() > 0.99  # off-by-one only where float rounding meets a truncation edge


def test_is_a_mouth_renderer(model):
    renderer = Wav2LipRenderer(model)
    assert isinstance(renderer, MouthRenderer) and renderer.name == "wav2lip"


RUNTIMES = ["torch", "openvino"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_render_matches_eager_generator(model, avatar, runtime):
    renderer = Wav2LipRenderer(model, runtime=runtime, precision="fp32")
    assert renderer.runtime == runtime and renderer.precision == "fp32"
    renderer.prepare(avatar)
    indices = np.array([2, 0, 2, 3])  # repeats and out of order, as a ping-pong loop produces
    mels = mel_windows(len(indices))
    patches = renderer.render(avatar, indices, mels)
    assert len(patches) == 4
    for patch, idx in zip(patches, indices, strict=True):
        assert patch.image.shape == (96, 96, 3) and patch.image.dtype == np.uint8
        assert patch.box == tuple(int(v) for v in avatar.boxes[idx])
        assert all(type(v) is int for v in patch.box)
        assert patch.alpha is None
    assert_close_uint8(patches, eager_patches(model, avatar, indices, mels))


def test_prepare_is_once_per_avatar(model):
    avatar = FakeAvatar(n=2)
    renderer = Wav2LipRenderer(model)
    renderer.prepare(avatar)
    renderer.prepare(avatar)
    assert avatar.crop_calls == 1


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_small_cache_budget_keeps_features_only(model, avatar, runtime):
    # 4 frames x 3.8 MB > 1 MB; batches split
    renderer = Wav2LipRenderer(model, max_cache_mb=1.0, max_batch=2, runtime=runtime, precision="fp32")
    renderer.prepare(avatar)
    indices = np.array([1, 3, 0])
    mels = mel_windows(3, seed=2)
    patches = renderer.render(avatar, indices, mels)
    assert_close_uint8(patches, eager_patches(model, avatar, indices, mels))


def test_unprepared_avatar_is_prepared_on_demand(model):
    avatar = FakeAvatar(n=2, seed=3)
    patches = Wav2LipRenderer(model).render(avatar, np.array([1]), mel_windows(1))
    assert len(patches) == 1


def test_bad_inputs_are_rejected(model, avatar):
    renderer = Wav2LipRenderer(model)
    renderer.prepare(avatar)
    with pytest.raises(ValueError, match="mels"):
        renderer.render(avatar, np.array([0, 1]), mel_windows(1))
    with pytest.raises(IndexError, match="out of range"):
        renderer.render(avatar, np.array([4]), mel_windows(1))
    assert renderer.render(avatar, np.zeros(0, dtype=np.int64), np.zeros((0, 80, 16), np.float32)) == []
    with pytest.raises(ValueError, match="fp16"):
        Wav2LipRenderer(model, precision="fp16")  # CPU
    with pytest.raises(ValueError, match="runtime"):
        Wav2LipRenderer(model, runtime="tensorrt")
    with pytest.raises(ValueError, match="CPU"):
        Wav2LipRenderer(model, device="meta", runtime="openvino")


def test_auto_runtime_and_precision_on_cpu(model, avatar):
    """CPU default: OpenVINO, and bf16 only if the start-up gate measured it >= 35 dB and faster."""
    renderer = Wav2LipRenderer(model)
    assert renderer.runtime == "openvino" and renderer.precision == "auto"
    renderer.prepare(avatar)
    gate = renderer._ov.gate
    assert gate is not None and renderer.precision == gate.chosen
    info = renderer.describe()
    assert info["precision"] == gate.chosen and "precision_gate" in info
    if gate.chosen == "bf16":
        assert gate.psnr_db["bf16"] >= 35.0
        assert gate.ms_per_frame["bf16"] * 1.15 <= gate.ms_per_frame["fp32"]
    # Whatever it chose, the patches stay within the bound of the official fp32 output.
    mels = precision_gate.load_calibration_mels()[:16]
    indices = np.arange(16) % 4
    got = np.stack([p.image for p in renderer.render(avatar, indices, mels)])[:, PASTED_ROWS_FROM:]
    expected = eager_patches(model, avatar, indices, mels)[:, PASTED_ROWS_FROM:]
    assert precision_gate.psnr_db(got, expected) >= 35.0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bf16_opt_in_runs(model, avatar, runtime):
    renderer = Wav2LipRenderer(model, precision="bf16", runtime=runtime)
    assert renderer.precision == "bf16"
    renderer.prepare(avatar)
    patches = renderer.render(avatar, np.array([0]), mel_windows(1))
    expected = eager_patches(model, avatar, np.array([0]), mel_windows(1))
    diff = patches[0].image.astype(int)[PASTED_ROWS_FROM:] - expected[0].astype(int)[PASTED_ROWS_FROM:]
    assert np.abs(diff).mean() < 8  # close, not equal


def test_auto_runtime_falls_back_to_torch_when_openvino_fails(model, avatar, monkeypatch, caplog):
    """A graph OpenVINO cannot take must not stop the server when the runtime was left on auto."""
    from models import openvino_runtime

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino_runtime, "export_frame_model", broken)
    renderer = Wav2LipRenderer(model)
    renderer.prepare(avatar)
    assert (renderer.runtime, renderer.precision) == ("torch", "fp32")
    assert "using PyTorch instead" in caplog.text
    indices, mels = np.array([0, 3]), mel_windows(2, seed=9)
    assert_close_uint8(renderer.render(avatar, indices, mels), eager_patches(model, avatar, indices, mels))
    with pytest.raises(RuntimeError, match="unsupported"):  # asked for by name: the error is the user's
        Wav2LipRenderer(model, runtime="openvino").prepare(avatar)


def test_half_precision_model_is_folded_in_fp32(model, avatar):
    """load_wav2lip(device="cuda") hands over an fp16 model; the renderer must not modify it."""
    half = Wav2Lip().half().eval()
    half.load_state_dict(model.state_dict())
    renderer = Wav2LipRenderer(half, device="cpu", precision="fp32")
    assert next(half.parameters()).dtype == torch.float16  # caller's model untouched
    renderer.prepare(avatar)
    indices, mels = np.array([1, 2]), mel_windows(2, seed=5)
    assert_close_uint8(renderer.render(avatar, indices, mels), eager_patches(half.float(), avatar, indices, mels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16(model, avatar):
    renderer = Wav2LipRenderer(model, device="cuda")  # CPU fp32 model in, CUDA fp16 nets out
    renderer.prepare(avatar)
    indices = np.array([0, 1, 2, 3])
    mels = mel_windows(4)
    patches = renderer.render(avatar, indices, mels)
    expected = eager_patches(model, avatar, indices, mels)
    got = np.stack([p.image for p in patches]).astype(int)
    assert np.abs(got - expected.astype(int)).mean() < 2  # fp16: close, not bit-equal


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_full_patches_with_rows_from_zero(model, avatar, runtime):
    renderer = Wav2LipRenderer(model, rows_from=0, runtime=runtime, precision="fp32")
    renderer.prepare(avatar)
    indices, mels = np.array([3, 1, 1]), mel_windows(3, seed=7)
    assert_close_uint8(renderer.render(avatar, indices, mels), eager_patches(model, avatar, indices, mels), 0)
    with pytest.raises(ValueError, match="rows_from"):
        Wav2LipRenderer(model, rows_from=96)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("rows_from", [PASTED_ROWS_FROM, 20, 48])
def test_band_patch_top_is_the_reference_crop(model, avatar, rows_from, runtime):
    renderer = Wav2LipRenderer(model, rows_from=rows_from, max_batch=3, runtime=runtime, precision="fp32")
    renderer.prepare(avatar)
    indices, mels = np.array([0, 2, 3, 1]), mel_windows(4, seed=8)
    patches = renderer.render(avatar, indices, mels)
    crops = avatar.face_crops(96)
    for patch, idx in zip(patches, indices, strict=True):
        assert patch.image.shape == (96, 96, 3) and patch.image.dtype == np.uint8 and patch.alpha is None
        np.testing.assert_array_equal(patch.image[:rows_from], crops[idx][:rows_from])
    assert_close_uint8(patches, eager_patches(model, avatar, indices, mels), rows_from)


def test_feathered_paste_never_reads_rows_above_the_band():
    """The default mask is 0 wherever the bilinear resize reads patch rows < PASTED_ROWS_FROM (+3 margin):
    two patches that differ only there paste identically, for every box height and strength."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    b = a.copy()
    b[:PASTED_ROWS_FROM + 3] = 255 - b[:PASTED_ROWS_FROM + 3]
    frame = rng.integers(0, 256, (700, 200, 3), dtype=np.uint8)
    for h in list(range(8, 200)) + list(range(200, 601, 7)):
        for y1 in (-5, 40):
            for strength in (1.0, 0.37):
                box = (y1, y1 + h, 10, 150)
                got_a = compositor.paste(frame, MouthPatch(a, box), "feather", strength)
                got_b = compositor.paste(frame, MouthPatch(b, box), "feather", strength)
                np.testing.assert_array_equal(got_a, got_b)


def test_mixed_batch_uses_each_avatars_own_features(model):
    """Sessions on two avatars in one worker batch: every frame comes from its own avatar's cache."""
    first, second = FakeAvatar(n=4, seed=0), FakeAvatar(n=4, seed=5)
    renderer = Wav2LipRenderer(model, runtime="torch", precision="fp32")
    assert renderer.traits.mixes_avatars
    renderer.prepare(first)
    renderer.prepare(second)
    avatars = [first, second, second, first, second]
    indices = np.array([1, 0, 3, 2, 1])
    mels = mel_windows(len(indices), seed=4)
    patches = renderer.render_mixed(avatars, indices, mels)
    assert len(patches) == 5
    for k, avatar in enumerate(avatars):
        assert patches[k].box == tuple(int(v) for v in avatar.boxes[indices[k]])
        assert_close_uint8([patches[k]], eager_patches(model, avatar, indices[k:k + 1], mels[k:k + 1]))


def test_prepare_in_slices_serves_the_avatar_only_when_done(model):
    """prepare_steps (what the render worker runs between batches): the face encoder in chunks of
    PREPARE_CHUNK frames, one slice each; the avatar is served only after the last slice, and then
    renders exactly as the official model does."""
    from realtime.renderers.wav2lip import PREPARE_CHUNK

    n = PREPARE_CHUNK + 4
    avatar = FakeAvatar(n=n, seed=4)
    renderer = Wav2LipRenderer(model, runtime="torch", precision="fp32")
    steps = renderer.prepare_steps(avatar)
    slices = 0
    for _ in steps:
        slices += 1
        assert not renderer._is_prepared(avatar)
    assert slices >= 3 and renderer._is_prepared(avatar)  # crops, then two encoder chunks
    assert len(renderer._caches[avatar]) == n
    indices = np.array([0, PREPARE_CHUNK - 1, PREPARE_CHUNK, n - 1])
    mels = mel_windows(4, seed=12)
    assert_close_uint8(renderer.render(avatar, indices, mels), eager_patches(model, avatar, indices, mels))
    assert list(renderer.prepare_steps(avatar)) == []  # prepared once
