"""Generator / SyncNet architecture parity with the official key lists, and the inference fast paths."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WAV2LIP_FACTS
from torch import nn

from models.layers import fold_batchnorm
from models.random_init import calibrated_random_
from models.syncnet import SyncNet_color
from models.wav2lip import (
    FEATURE_VALUES,
    HEAD_VALUES,
    CachedWav2Lip,
    Wav2Lip,
    _static_band_plan,
    cache_values,
    faces_to_input,
    mels_to_input,
    to_uint8,
)


def read_tsv(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) rows of a shared state_dict key list; '#' lines are comments."""
    rows = []
    for line in (WAV2LIP_FACTS / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        _, key, shape, dtype, _ = line.split("\t")
        rows.append((key, () if shape == "()" else tuple(int(s) for s in shape.split("x")), dtype))
    return rows


def realistic(model: nn.Module, calibrate: tuple[torch.Tensor, ...]) -> nn.Module:
    """Trained-like activation scale (see models.random_init), BatchNorm scales drawn in [0.5, 1.5]."""
    return calibrated_random_(model, lambda: calibrate, torch.Generator().manual_seed(7), (0.5, 1.5))


@pytest.fixture(scope="module")
def model() -> Wav2Lip:
    gen = torch.Generator().manual_seed(6)
    return realistic(Wav2Lip(), (torch.rand(4, 1, 80, 16, generator=gen) * 8 - 4,
                                 torch.rand(4, 6, 96, 96, generator=gen)))


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.rand(2, 1, 80, 16, generator=gen) * 8 - 4, torch.rand(2, 6, 96, 96, generator=gen)


@pytest.fixture(scope="module")
def reference(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("cls, tsv", [(Wav2Lip, "wav2lip_state_dict.tsv"), (SyncNet_color, "syncnet_state_dict.tsv")])
def test_state_dict_matches_official_key_list(cls, tsv):
    expected = read_tsv(tsv)
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in cls().state_dict().items()]
    assert len(ours) == len(expected)
    assert ours == expected  # keys, order, shapes and dtypes


def test_parameter_counts_match_readme():
    assert sum(p.numel() for p in Wav2Lip().parameters()) == 36_298_035
    assert sum(p.numel() for p in SyncNet_color().parameters()) == 16_435_072


def test_faces_to_input_masks_orders_and_scales():
    faces = np.random.default_rng(0).integers(1, 256, size=(2, 96, 96, 3), dtype=np.uint8)
    x = faces_to_input(faces)
    assert x.shape == (2, 6, 96, 96) and x.dtype == torch.float32
    chw = torch.from_numpy(faces.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    assert torch.equal(x[:, 3:], chw)                    # unmasked reference second, BGR kept, /255
    assert torch.equal(x[:, :3, :48], chw[:, :, :48])    # masked copy first: upper half intact
    assert torch.count_nonzero(x[:, :3, 48:]) == 0       # rows 48..95 zeroed in all 3 channels
    with pytest.raises(ValueError):
        faces_to_input(faces[:, :64])


def test_forward_shape_range_and_feature_sizes(model, inputs, reference):
    assert reference.shape == (2, 3, 96, 96)
    assert 0 <= reference.min() and reference.max() <= 1
    assert reference.std() > 0.1  # the realistic init spreads the output (see `realistic`)
    with torch.no_grad():
        feats = model.encode_face(inputs[1])
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 96, 96), (32, 48, 48), (64, 24, 24), (128, 12, 12),
                                                    (256, 6, 6), (512, 3, 3), (512, 1, 1)]


def test_batch_items_are_independent(model, inputs, reference):
    with torch.no_grad():
        single = model(inputs[0][1:], inputs[1][1:])
    # different batch sizes may pick different oneDNN kernels: equal up to float rounding
    torch.testing.assert_close(single, reference[1:], atol=1e-4, rtol=0)


def test_encode_decode_split_equals_forward(model, inputs, reference):
    audio, face = inputs
    with torch.no_grad():
        feats = model.encode_face(face)
        assert torch.equal(model.decode(audio, feats), reference)
        assert torch.equal(model.decode(model.encode_audio(audio), feats), reference)  # embedding accepted too
    assert len(feats) == 7  # decode must not consume the caller's list


def test_training_5d_path(model, inputs):
    """(B, T, 1, 80, 16) + (B, 6, T, 96, 96) -> (B, 3, T, 96, 96), each (b, t) its own sample."""
    gen = torch.Generator().manual_seed(3)
    audio = torch.rand(2, 2, 1, 80, 16, generator=gen) * 8 - 4
    face = torch.rand(2, 6, 2, 96, 96, generator=gen)
    with torch.no_grad():
        out = model(audio, face)
        step1 = model(audio[:, 1], face[:, :, 1])
    assert out.shape == (2, 3, 2, 96, 96)
    torch.testing.assert_close(out[:, :, 1], step1, atol=1e-4, rtol=0)


def test_fold_batchnorm_matches(model, inputs, reference):
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    with torch.no_grad():
        out = folded(*inputs)
    assert (out - reference).abs().max() < 1e-4


@pytest.mark.parametrize("options", [{}, {"cache_heads": False}, {"channels_last": False}])
def test_cached_decoder_matches_eager(model, inputs, reference, options):
    fast = CachedWav2Lip(model, **options)
    audio, face = inputs
    cache = fast.precompute(face[[1, 0]], batch_size=1)  # avatar order differs from the batch order
    assert len(cache) == 2 and cache.heads == fast.cache_heads
    per_frame = HEAD_VALUES if fast.cache_heads else FEATURE_VALUES
    assert cache.nbytes == 2 * per_frame * 4
    with torch.inference_mode():
        out = fast(audio, cache.select(torch.tensor([1, 0])))
    assert out.shape == reference.shape
    assert (out - reference).abs().max() < 1e-4
    assert np.abs(to_uint8(out).astype(int) - to_uint8(reference).astype(int)).max() <= 1


def test_cached_decoder_repeats_frames(model, inputs, reference):
    """A batch may use the same avatar frame several times (still avatar, slow loops)."""
    fast = CachedWav2Lip(model)
    audio, face = inputs
    cache = fast.precompute(face[:1])
    with torch.inference_mode():
        out = fast(audio, cache.select(torch.tensor([0, 0])))
        ref = model(audio, face[:1].expand(2, -1, -1, -1))
    assert (out - ref).abs().max() < 1e-4


def test_to_uint8_truncates():
    pred = torch.full((1, 3, 96, 96), 0.999)
    assert to_uint8(pred).shape == (1, 96, 96, 3)
    assert (to_uint8(pred) == 254).all()  # 254.745 -> 254, not rounded to 255


def test_mels_to_input_shape():
    assert mels_to_input(np.zeros((3, 80, 16))).shape == (3, 1, 80, 16)
    with pytest.raises(ValueError):
        mels_to_input(np.zeros((3, 16, 80)))


def test_syncnet_embeddings():
    gen = torch.Generator().manual_seed(4)
    calibrate = (torch.rand(2, 1, 80, 16, generator=gen), torch.rand(2, 15, 48, 96, generator=gen))
    net = realistic(SyncNet_color(), calibrate)
    with torch.no_grad():
        audio, face = net(torch.rand(2, 1, 80, 16, generator=gen), torch.rand(2, 15, 48, 96, generator=gen))
    assert audio.shape == face.shape == (2, 512)
    torch.testing.assert_close(audio.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(face.norm(dim=1), torch.ones(2))


def test_facts_folder_present():
    assert Path(WAV2LIP_FACTS, "wav2lip_state_dict.tsv").is_file()


@pytest.mark.parametrize("cache_heads", [True, False])
@pytest.mark.parametrize("frames", [[0], [1, 0, 1]])
def test_cached_decoder_row_band_equals_full(model, inputs, cache_heads, frames):
    """rows_from computes only output rows [rows_from, 96): the same numbers as the full decode."""
    audio, face = inputs
    index = torch.tensor(frames)
    audio, batch = audio[index], len(frames)
    fast = CachedWav2Lip(model, cache_heads=cache_heads)
    cache = fast.precompute(face)
    with torch.inference_mode():
        full = fast(audio, cache.select(index))
        for rows_from in (1, 2, 5, 17, 36, 39, 48, 63, 95):
            band = fast(audio, cache.select(index, fast.cache_rows(rows_from)), rows_from)
            assert band.shape == (batch, 3, 96 - rows_from, 96)
            # Same arithmetic on a row band; only float32 rounding may differ, because oneDNN picks its
            # conv kernels by tensor shape (1.02e-5 seen once in CI on the features-only path). A wrong
            # halo or row offset shows up as errors of 1e-2 and more.
            assert float((band - full[:, :, rows_from:]).abs().max()) <= 5e-5
            # full-height cached tensors are accepted too (sliced inside)
            band2 = fast(audio, cache.select(index), rows_from)
            assert float((band2 - band).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match="rows_from"):
        fast.band_plan(96)


@pytest.mark.parametrize("cache_heads", [True, False])
def test_band_cache_holds_only_the_band(model, inputs, cache_heads):
    audio, face = inputs
    fast = CachedWav2Lip(model, cache_heads=cache_heads)
    full_cache = fast.precompute(face)
    index = torch.tensor([1, 0])
    with torch.inference_mode():
        for rows_from in (0, 9, 36, 70):
            assert fast.band_plan(rows_from) == _static_band_plan(rows_from)
            cache = fast.precompute(face, rows_from=rows_from)
            assert cache.rows_from == rows_from
            assert cache.nbytes == len(face) * 4 * cache_values(cache_heads, rows_from)
            expected = fast(audio[index], full_cache.select(index))[:, :, rows_from:]
            got = fast(audio[index], cache.select(index), rows_from)
            assert float((got - expected).abs().max()) <= 5e-5  # float32 rounding only, as above
        assert cache_values(cache_heads) == (HEAD_VALUES if cache_heads else FEATURE_VALUES)
        with pytest.raises(ValueError, match="do not cover"):
            fast(audio, fast.precompute(face, rows_from=36).select(torch.arange(2)), 20)
