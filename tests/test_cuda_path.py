"""The CUDA path, checked on a GPU (issue #20): every test here is skipped without CUDA.

scripts/gpu_check.sh runs this file on a fresh GPU machine before bench/gpu_check.py. One test per fix:
1. graphs captured on each GPU's own stream replay what the eager forward computes (every GPU, not
   only the first), and the per-bucket check passes;
3. `--precision fp32` on CUDA is real fp32 (TF32 off) and matches the official CPU fp32 model;
4. a worker prepares and warms up on its own thread, with cuDNN autotuning on only meanwhile;
5. fp16 is adopted only through the precision gate (reported by describe()), and weights that overflow
   in fp16 fall back to fp32;
6. a second avatar with another cache layout (a new capture) prepares while the first is served, and
   the served avatar's frames keep their deadlines.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from test_static_batches import random_faces, random_model
from test_wav2lip_renderer import FakeAvatar, mel_windows

from models.static_batches import StaticBatchRunner
from models.wav2lip import CachedWav2Lip, Wav2Lip, faces_to_input, mels_to_input, to_uint8
from realtime.renderers.wav2lip import PASTED_ROWS_FROM, Wav2LipRenderer
from realtime.scheduling.scheduler import RenderJob, RenderResult, ThreadedRenderWorker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def model() -> Wav2Lip:
    return random_model()


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return random_faces(6)


def devices() -> list[str]:
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@pytest.mark.parametrize("device", devices() or ["cuda:0"])
def test_graphs_on_every_gpu_replay_what_eager_computes(model, faces, device):
    """Fix 1: captured after another GPU's graphs exist (cuda:0 first), each device's runner records real
    graphs on its own stream; every bucket passes the replay check and batches match eager."""
    if device != "cuda:0":  # the situation of the bug: cuda:0 captured first in this process
        first = CachedWav2Lip(model, cache_heads=True).to(device="cuda:0", dtype=torch.float16)
        cache0 = first.precompute(faces.to("cuda:0", torch.float16), rows_from=PASTED_ROWS_FROM)
        assert StaticBatchRunner(first, cache0, PASTED_ROWS_FROM, 4).capture(cache0)
    net = CachedWav2Lip(model, cache_heads=True).to(device=device, dtype=torch.float16)
    cache = net.precompute(faces.to(device, torch.float16), rows_from=PASTED_ROWS_FROM)
    graphs = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, 8)
    eager = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, 8, cuda_graphs=False)
    assert graphs._stream is not None and graphs._stream.device == torch.device(device)
    assert graphs.capture(cache), graphs.fallback_reason
    assert graphs.captured == (1, 2, 4, 8) and set(graphs.verified) == {1, 2, 4, 8}
    assert max(graphs.verified.values()) <= 1
    rng = np.random.default_rng(0)
    outputs = []
    for b in range(1, 9):
        indices, mels = rng.integers(0, len(faces), b), mel_windows(b, seed=b)
        got, want = graphs.run(cache, indices, mels), eager.run(cache, indices, mels)
        assert np.abs(got.astype(int) - want).max() <= 1
        outputs.append(got)
    assert len({o[0].tobytes() for o in outputs}) > 1  # not one frozen mouth


def test_a_replay_that_writes_nothing_is_caught_on_the_gpu(model, faces):
    """Fix 1's check against real empty replays: the graphs are dropped, batches run eagerly."""
    net = CachedWav2Lip(model, cache_heads=True).to(device="cuda", dtype=torch.float16)
    cache = net.precompute(faces.to("cuda", torch.float16), rows_from=PASTED_ROWS_FROM)
    runner = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, 2)
    original = runner._capture_all_steps

    class Empty:
        def replay(self) -> None:
            pass

    def emptied(graphs: dict):
        yield from original(graphs)
        for n, (_, out) in list(graphs.items()):
            graphs[n] = (Empty(), out)

    runner._capture_all_steps = emptied
    assert runner.capture(cache) is False and "output untouched" in runner.fallback_reason
    indices, mels = np.array([0, 3]), mel_windows(2)
    want = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, 2, cuda_graphs=False).run(cache, indices, mels)
    assert np.abs(runner.run(cache, indices, mels).astype(int) - want).max() <= 1


def test_fp32_on_cuda_is_real_fp32(model):
    """Fix 3: --precision fp32 turns TF32 off, and its patches match the official fp32 model on the CPU."""
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    avatar = FakeAvatar(n=4, seed=3)
    renderer = Wav2LipRenderer(model, device="cuda", precision="fp32", runtime="torch", cuda_graphs=False)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert renderer.describe()["tf32"] == "off"
    renderer.prepare(avatar)
    indices, mels = np.array([0, 1, 2, 3]), mel_windows(4, seed=9)
    got = np.stack([p.image for p in renderer.render(avatar, indices, mels)]).astype(int)
    with torch.no_grad():
        want = to_uint8(model(mels_to_input(mels), faces_to_input(avatar.face_crops(96)[indices])))
    rows = PASTED_ROWS_FROM
    assert np.abs(got[:, rows:] - want[:, rows:]).max() <= 1


def test_worker_prepares_and_warms_up_on_its_thread_with_autotuning_only_then(model):
    """Fix 4."""
    renderer = Wav2LipRenderer(model, device="cuda", runtime="torch", max_batch=8)
    threads: set[str] = set()
    benchmark_during: list[bool] = []
    steps, render = renderer.prepare_steps, renderer.render

    def recording_steps(avatar):
        for _ in steps(avatar):
            threads.add(threading.current_thread().name)
            yield

    def recording_render(avatar, i, m):
        threads.add(threading.current_thread().name)
        benchmark_during.append(torch.backends.cudnn.benchmark)
        return render(avatar, i, m)

    renderer.prepare_steps, renderer.render = recording_steps, recording_render
    torch.backends.cudnn.benchmark = False
    worker = ThreadedRenderWorker(renderer, max_batch=8, name="render-cuda-test")
    try:
        worker.prepare(FakeAvatar(n=4), warmup=True)
    finally:
        worker.close()
    assert threads == {"render-cuda-test"}
    assert benchmark_during and all(benchmark_during)  # the warm-up renders were autotuned
    assert torch.backends.cudnn.benchmark is False       # and live frames will not be
    assert renderer._runners and next(iter(renderer._runners.values())).captured


def test_fp16_is_adopted_only_through_the_gate(model):
    """Fix 5: "auto" on CUDA runs the gate at prepare and reports it; fp16 passes for these weights."""
    renderer = Wav2LipRenderer(model, device="cuda", runtime="torch", cuda_graphs=False)
    assert renderer.precision == "auto"
    renderer.prepare(FakeAvatar(n=4))
    assert renderer.gate is not None and renderer.precision == "fp16"
    assert renderer.gate.psnr_db["fp16"] >= 35.0
    assert "fp16" in renderer.describe()["precision_gate"]


def test_fp16_weights_that_overflow_fall_back_to_fp32(model):
    """Fix 5: folded weights beyond fp16's range (inf in fp16): served in fp32, and said so."""
    import copy

    big = copy.deepcopy(model)
    with torch.no_grad():
        conv = next(m for m in big.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.mul_(1e6)
    renderer = Wav2LipRenderer(big, device="cuda", runtime="torch", cuda_graphs=False)
    renderer.prepare(FakeAvatar(n=4))
    assert renderer.precision == "fp32" and renderer.gate is None
    assert "not finite" in renderer.describe()["precision_gate"]
    assert renderer.describe()["tf32"] == "off"


def test_a_second_avatar_with_a_new_capture_does_not_stall_the_served_one(model):
    """Fix 6: avatar B's cache layout differs (encoder features only, over max_cache_mb), so preparing it
    captures a new set of graphs while avatar A is served; A's frames keep a 300 ms deadline."""
    renderer = Wav2LipRenderer(model, device="cuda", runtime="torch", max_batch=32, max_cache_mb=20)
    worker = ThreadedRenderWorker(renderer, max_batch=8, name="render-cuda-test")
    served, other = FakeAvatar(n=4, seed=1), FakeAvatar(n=12, seed=2)  # 12 frames x 2 MB > 20 MB
    results: list[RenderResult] = []
    try:
        worker.prepare(served, warmup=True)
        done = threading.Event()
        preparer = threading.Thread(target=lambda: (worker.prepare(other), done.set()))
        preparer.start()
        k, t0 = 0, time.monotonic()
        while not done.is_set() and time.monotonic() - t0 < 60:
            now = time.monotonic()
            worker.submit(RenderJob(owner=served, key=k, avatar=served, avatar_index=k % 4,
                                    mel=mel_windows(1, seed=k)[0], deadline=now + 0.3, ready_at=now,
                                    deliver=results.append))
            k += 1
            time.sleep(0.04)
        preparer.join()
        time.sleep(0.4)
    finally:
        worker.close()
    assert len(renderer._runners) == 2  # a second capture happened during serving
    assert k >= 5 and worker.frames_skipped == 0
    assert len(results) == k and all(r.patch is not None for r in results)
