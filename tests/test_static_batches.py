"""StaticBatchRunner (models/static_batches.py): fixed batch sizes, padding and static buffers.

On the CPU the runner runs its buckets eagerly through the same buffers a CUDA graph would read, so
these tests check the padding, the gather into static buffers and the slicing against the plain forward
for every batch size. The CUDA-graph capture itself is checked by the last test, on a GPU only.
"""
from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
import torch
from test_wav2lip_renderer import FakeAvatar, mel_windows

from models.random_init import calibrated_random_
from models.static_batches import StaticBatchRunner, batch_buckets
from models.wav2lip import CachedWav2Lip, FaceCache, Wav2Lip
from realtime.renderers.wav2lip import PASTED_ROWS_FROM, Wav2LipRenderer

MAX_BATCH = 6  # not a power of two: the last bucket is the cap itself
# The PyTorch path (a CPU renderer may otherwise pick another runtime, which has no static batches).
TORCH = {"runtime": "torch"} if "runtime" in inspect.signature(Wav2LipRenderer).parameters else {}


def random_model(seed: int = 5) -> Wav2Lip:
    """Seeded weights with trained-like activation scale (tests/test_cuda_path.py uses it too)."""
    gen = torch.Generator().manual_seed(seed)
    return calibrated_random_(Wav2Lip(), lambda: (torch.rand(4, 1, 80, 16, generator=gen) * 8 - 4,
                                                  torch.rand(4, 6, 96, 96, generator=gen)), gen)


def random_faces(n: int = 5, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 6, 96, 96, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> Wav2Lip:
    return random_model()


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return random_faces()


def plain_uint8(net: CachedWav2Lip, cache: FaceCache, indices: np.ndarray, mels: np.ndarray,
                rows_from: int) -> np.ndarray:
    """The unpadded forward at exactly this batch size, converted like the renderer does."""
    with torch.inference_mode():
        pred = net(torch.from_numpy(mels)[:, None], cache.select(torch.from_numpy(indices)), rows_from)
        return (pred.float() * 255.0).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(128) == (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)
    assert batch_buckets(300) == (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 300)
    with pytest.raises(ValueError):
        batch_buckets(0)


@pytest.mark.parametrize("cache_heads", [True, False])
@pytest.mark.parametrize("rows_from", [PASTED_ROWS_FROM, 0])
def test_every_batch_size_equals_the_plain_forward(model, faces, cache_heads, rows_from):
    net = CachedWav2Lip(model, cache_heads=cache_heads, channels_last=True)
    cache = net.precompute(faces, rows_from=rows_from)
    runner = StaticBatchRunner(net, cache, rows_from, MAX_BATCH)
    assert runner.buckets == (1, 2, 4, 6) and not runner.capture()  # CPU: eager, no graphs
    rng = np.random.default_rng(cache_heads + rows_from)
    for b in range(1, MAX_BATCH + 1):
        indices = rng.integers(0, len(faces), b)
        mels = mel_windows(b, seed=b)
        got = runner.run(cache, indices, mels)
        assert got.shape == (b, 96 - rows_from, 96, 3) and got.dtype == np.uint8
        expected = plain_uint8(net, cache, indices, mels, rows_from)
        # Padding changes the batch size oneDNN sees; allow float rounding at a truncation edge.
        assert np.abs(got.astype(int) - expected).max() <= 1
        assert (got == expected).mean() > 0.999
    with pytest.raises(ValueError, match="bucket"):
        runner.run(cache, np.zeros(MAX_BATCH + 1, np.int64), mel_windows(MAX_BATCH + 1))


def test_pad_rows_do_not_leak_and_results_are_copies(model, faces):
    """A batch of 3 runs in bucket 4: the pad row repeats sample 3 and is dropped; a smaller batch after
    a larger one does not see stale rows; the returned array does not alias the pinned buffer."""
    net = CachedWav2Lip(model, cache_heads=True)
    cache = net.precompute(faces, rows_from=PASTED_ROWS_FROM)
    runner = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, 4)
    big = runner.run(cache, np.array([0, 1, 2, 3]), mel_windows(4, seed=3))
    small = runner.run(cache, np.array([4, 0, 1]), mel_windows(3, seed=4))
    assert small.shape[0] == 3
    single = [runner.run(cache, np.array([i]), mel_windows(3, seed=4)[k:k + 1])[0]
              for k, i in enumerate([4, 0, 1])]
    for k in range(3):
        assert np.abs(small[k].astype(int) - single[k]).max() <= 1
    again = runner.run(cache, np.array([0, 1, 2, 3]), mel_windows(4, seed=3))
    np.testing.assert_array_equal(again, big)          # deterministic, and `big` was not overwritten
    assert not np.shares_memory(again, runner._host_out.numpy())


def test_any_cache_of_the_same_layout_is_served(model, faces):
    net = CachedWav2Lip(model, cache_heads=True)
    first = net.precompute(faces, rows_from=PASTED_ROWS_FROM)
    other = net.precompute(faces.flip(0)[:3], rows_from=PASTED_ROWS_FROM)  # another avatar, 3 frames
    runner = StaticBatchRunner(net, first, PASTED_ROWS_FROM, 4)
    assert runner.accepts(other)
    indices, mels = np.array([2, 0]), mel_windows(2, seed=9)
    got = runner.run(other, indices, mels)
    assert np.abs(got.astype(int) - plain_uint8(net, other, indices, mels, PASTED_ROWS_FROM)).max() <= 1
    assert not runner.accepts(net.precompute(faces, rows_from=0))              # other rows
    features = CachedWav2Lip(model, cache_heads=False)
    assert not runner.accepts(features.precompute(faces, rows_from=PASTED_ROWS_FROM))  # other kind
    with pytest.raises(ValueError, match="layout"):
        runner.run(net.precompute(faces, rows_from=0), indices, mels)
    with pytest.raises(IndexError, match="out of range"):
        runner.run(other, np.array([3]), mel_windows(1))


def test_failed_capture_falls_back_to_eager_once(model, faces, monkeypatch, caplog):
    """Forced 'CUDA' graphs on a CPU runner: the capture fails, is logged once, and batches still run."""
    net = CachedWav2Lip(model, cache_heads=True)
    cache = net.precompute(faces, rows_from=PASTED_ROWS_FROM)
    runner = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, 2)
    runner.graphs_enabled = True

    def broken(graphs: dict) -> dict:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_capture_all_steps", broken)
    with caplog.at_level(logging.WARNING, logger="models.static_batches"):
        assert runner.capture() is False
        assert runner.capture() is False
    assert len([r for r in caplog.records if "CUDA graphs on" in r.message and "failed" in r.message]) == 1
    assert not runner.graphs_enabled and "not permitted" in runner.fallback_reason
    indices, mels = np.array([1, 3]), mel_windows(2)
    got = runner.run(cache, indices, mels)
    assert np.abs(got.astype(int) - plain_uint8(net, cache, indices, mels, PASTED_ROWS_FROM)).max() <= 1


class FakeGraph:
    """Stands in for a torch.cuda.CUDAGraph on the CPU: `replay` runs the given function."""

    def __init__(self, replay) -> None:
        self.replays = 0
        self._replay = replay

    def replay(self) -> None:
        self.replays += 1
        self._replay()


def fake_capture(runner: StaticBatchRunner, kind_of: dict[int, str]):
    """A `_capture_all_steps` whose 'graphs' replay like a real graph ("good"), write nothing ("empty": the
    empty graph of a capture on the wrong device), return the patch computed at capture time from the
    zeroed static inputs ("stale"), or are off by 3 levels ("off")."""

    def steps(graphs: dict):
        for n in runner.buckets:
            out = torch.zeros((n, 96 - runner.rows_from, 96, 3), dtype=torch.uint8)
            stale = runner._compute(n).clone()  # the static inputs are still zero here
            kind = kind_of.get(n, "good")
            if kind == "good":
                graph = FakeGraph(lambda out=out, n=n: out.copy_(runner._compute(n)))
            elif kind == "empty":
                graph = FakeGraph(lambda: None)
            elif kind == "stale":
                graph = FakeGraph(lambda out=out, stale=stale: out.copy_(stale))
            else:
                graph = FakeGraph(lambda out=out, n=n: out.copy_((runner._compute(n).int() + 3).clamp(0, 255)))
            graphs[n] = (graph, out)
            yield
    return steps


@pytest.mark.parametrize("bad", [{4: "stale"}, {1: "empty", 2: "empty", 4: "empty", 6: "empty"},
                                 {6: "off"}, {1: "stale", 2: "stale", 4: "stale", 6: "stale"}])
def test_a_replay_that_differs_from_eager_turns_graphs_off(model, faces, bad, caplog):
    """The per-bucket check after capture (issue #20 fix 1): one bucket whose replay writes nothing,
    returns the stale capture-time patch or is off by > 1 level drops every graph; batches still run
    eagerly and correctly."""
    net = CachedWav2Lip(model, cache_heads=True)
    cache = net.precompute(faces, rows_from=PASTED_ROWS_FROM)
    runner = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, MAX_BATCH)
    runner.graphs_enabled = True  # as on CUDA
    runner._capture_all_steps = fake_capture(runner, bad)
    with caplog.at_level(logging.WARNING, logger="models.static_batches"):
        assert runner.capture(cache) is False
    assert runner.captured == () and not runner.graphs_enabled
    assert set(runner.verified) == set(runner.buckets)
    for n in runner.buckets:
        assert (runner.verified[n] > 1) == (n in bad), (n, runner.verified)
    if "empty" in bad.values():
        assert "output untouched" in runner.fallback_reason
    assert "differs from eager" in runner.fallback_reason
    assert any("running batches eagerly" in r.message for r in caplog.records)
    for b in range(1, MAX_BATCH + 1):
        indices, mels = np.arange(b) % len(faces), mel_windows(b, seed=40 + b)
        got = runner.run(cache, indices, mels)
        assert np.abs(got.astype(int) - plain_uint8(net, cache, indices, mels, PASTED_ROWS_FROM)).max() <= 1


def test_replays_that_match_eager_are_kept_and_used(model, faces):
    net = CachedWav2Lip(model, cache_heads=True)
    cache = net.precompute(faces, rows_from=PASTED_ROWS_FROM)
    runner = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, MAX_BATCH)
    runner.graphs_enabled = True
    runner._capture_all_steps = fake_capture(runner, {})
    steps = list(runner.capture_steps(cache))
    assert len(steps) == 2 * len(runner.buckets)  # one step per capture and per check: slices for a worker
    assert runner.captured == runner.buckets and runner.fallback_reason is None
    assert all(d == 0 for d in runner.verified.values())
    graph = runner._graphs[4][0]
    before = graph.replays
    indices, mels = np.array([1, 2, 3]), mel_windows(3, seed=5)
    got = runner.run(cache, indices, mels)  # bucket 4
    assert graph.replays == before + 1
    assert np.abs(got.astype(int) - plain_uint8(net, cache, indices, mels, PASTED_ROWS_FROM)).max() <= 1
    assert runner.capture(cache) is True  # once: a second call captures nothing new


def test_renderer_uses_the_runner_when_asked(model):
    """Wav2LipRenderer with static batches (forced on the CPU) gives the patches of its plain path,
    for batches below, at and above its max_batch (split, then padded)."""
    avatar = FakeAvatar(n=4, seed=7)
    plain = Wav2LipRenderer(model, max_batch=4, **TORCH)
    static = Wav2LipRenderer(model, max_batch=4, **TORCH)
    assert not static.static_batches and static.cuda_graphs  # CPU default: unchanged
    static.static_batches = True
    for r in (plain, static):
        r.prepare(avatar)
    assert list(static._runners) == [True] and static._runners[True].buckets == (1, 2, 4)
    assert plain._runners == {}
    for b in (1, 3, 4, 7):
        indices = np.arange(b) % 4
        mels = mel_windows(b, seed=20 + b)
        got = np.stack([p.image for p in static.render(avatar, indices, mels)]).astype(int)
        want = np.stack([p.image for p in plain.render(avatar, indices, mels)]).astype(int)
        assert got.shape == (b, 96, 96, 3)
        assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.999
        np.testing.assert_array_equal(got[:, :PASTED_ROWS_FROM], want[:, :PASTED_ROWS_FROM])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_equals_eager_fp16(model, faces):
    net = CachedWav2Lip(model, cache_heads=True).to(device="cuda", dtype=torch.float16)
    cache = net.precompute(faces.to("cuda", torch.float16), rows_from=PASTED_ROWS_FROM)
    graphs = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, 8)
    eager = StaticBatchRunner(net, cache, PASTED_ROWS_FROM, 8, cuda_graphs=False)
    assert graphs.capture() and graphs.captured == (1, 2, 4, 8)
    assert not eager.capture()
    rng = np.random.default_rng(0)
    for b in range(1, 9):
        indices, mels = rng.integers(0, len(faces), b), mel_windows(b, seed=b)
        got, want = graphs.run(cache, indices, mels), eager.run(cache, indices, mels)
        assert np.abs(got.astype(int) - want).max() <= 1
