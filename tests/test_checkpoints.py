"""Checkpoint loading: the official layout, both key forms, and a clear CheckpointError for every bad file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoints import CheckpointError, resolve_device
from models.syncnet import SyncNet_color, load_syncnet
from models.wav2lip import Wav2Lip, load_wav2lip


@pytest.fixture(scope="module")
def generator() -> Wav2Lip:
    torch.manual_seed(0)
    return Wav2Lip().eval()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


def official(state: dict) -> dict:
    return {"state_dict": state, "optimizer": None, "global_step": 0, "global_epoch": 0}


@pytest.fixture(scope="module")
def generator_file(generator, ckpt_dir) -> Path:
    path = ckpt_dir / "wav2lip.pth"
    torch.save(official(generator.state_dict()), path)
    return path


@pytest.fixture(scope="module")
def syncnet_file(ckpt_dir) -> Path:
    torch.manual_seed(1)
    path = ckpt_dir / "lipsync_expert.pth"
    torch.save(official({"module." + k: v for k, v in SyncNet_color().state_dict().items()}), path)
    return path


def same_output(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    gen = torch.Generator().manual_seed(5)
    audio, face = torch.rand(1, 1, 80, 16, generator=gen), torch.rand(1, 6, 96, 96, generator=gen)
    with torch.no_grad():
        return torch.equal(a(audio, face), b(audio, face))


def test_loads_official_layout(generator, generator_file):
    loaded = load_wav2lip(generator_file)
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert same_output(loaded, generator)


def test_loads_module_prefixed_keys_and_extra_top_level_keys(generator, ckpt_dir):
    path = ckpt_dir / "wav2lip_gan.pth"
    ckpt = official({"module." + k: v for k, v in generator.state_dict().items()})
    ckpt["optimizer"] = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    torch.save(ckpt, path)
    assert same_output(load_wav2lip(path), generator)


def test_loads_bare_state_dict(generator, ckpt_dir):
    path = ckpt_dir / "bare.pth"
    torch.save(generator.state_dict(), path)
    assert same_output(load_wav2lip(str(path), device="cpu"), generator)


def test_numpy_metadata_is_accepted(generator, ckpt_dir):
    """Some training scripts store the step counter as a numpy scalar: harmless, so it must load."""
    import numpy as np

    path = ckpt_dir / "numpy_meta.pth"
    ckpt = official(generator.state_dict())
    ckpt.update(global_step=np.int64(42000), global_epoch=np.float32(3.0))
    torch.save(ckpt, path)
    assert same_output(load_wav2lip(path), generator)


def test_loads_syncnet(syncnet_file):
    net = load_syncnet(syncnet_file)
    assert not net.training and isinstance(net, SyncNet_color)


def test_cuda_request_without_cuda_is_clear():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


# ---- bad files --------------------------------------------------------------------------------------

def expect_error(path: Path, *fragments: str, loader=load_wav2lip) -> str:
    with pytest.raises(CheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.pth", "not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    expect_error(path, "empty")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(bytes(range(256)) * 8)
    expect_error(path, "not a PyTorch checkpoint")


def test_text_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    expect_error(path, "text file")


def test_html_download(tmp_path):
    path = tmp_path / "wav2lip_gan.pth"
    path.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    expect_error(path, "HTML page")


def test_lfs_pointer(tmp_path):
    path = tmp_path / "wav2lip.pth"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 435801865\n")
    expect_error(path, "Git LFS pointer")


def test_truncated_file(generator_file, tmp_path):
    path = tmp_path / "cut.pth"
    data = generator_file.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    expect_error(path, "truncated")


@pytest.mark.parametrize("keep", [30, 100, -2000])  # inside the header, the pickle, the tensor data
def test_legacy_format_truncated(tmp_path, keep):
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:keep])
    expect_error(path, "truncated or corrupted")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Path("x")}, path)
    expect_error(path, "weights_only")


def test_syncnet_passed_as_generator(syncnet_file):
    expect_error(syncnet_file, "looks like a SyncNet_color (lipsync_expert.pth) checkpoint, not the Wav2Lip generator")


def test_generator_passed_as_syncnet(generator_file):
    expect_error(generator_file, "looks like a Wav2Lip generator", "not the SyncNet_color", loader=load_syncnet)


def test_wrong_shapes_are_listed(generator, tmp_path):
    state = dict(generator.state_dict())
    state["output_block.1.weight"] = torch.zeros(3, 16, 1, 1)
    state["audio_encoder.0.conv_block.0.weight"] = torch.zeros(32, 1, 5, 5)
    path = tmp_path / "shapes.pth"
    torch.save(official(state), path)
    message = expect_error(path, "2 shape mismatches", "output_block.1.weight", "(3, 16, 1, 1)", "(3, 32, 1, 1)")
    assert "audio_encoder.0.conv_block.0.weight" in message


def test_missing_and_unexpected_keys_are_listed(generator, tmp_path):
    state = {k: v for k, v in generator.state_dict().items() if not k.startswith("output_block")}
    state.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    path = tmp_path / "keys.pth"
    torch.save(official(state), path)
    message = expect_error(path, "9 missing keys", "output_block.0.conv_block.0.weight",
                           "7 unexpected keys", "extra.0", "(+2 more)")
    assert "KeyError" not in message


def test_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    expect_error(path, "expected a dict")


def test_no_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"global_step": 3, "optimizer": None}, path)
    expect_error(path, "no tensors found")
