"""Avatars as a resource, below HTTP: JPEG frames in memory, the library's bookkeeping, and render batches
that mix the frames of sessions on different avatars (simulated time, inline worker)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_engine import SR, STEP, FakeAvatar

from realtime.avatars.avatar import Avatar
from realtime.avatars.avatar_library import AvatarInUse, AvatarLibrary, AvatarNotReady, AvatarState, UnknownAvatar
from realtime.avatars.avatar_prepare import load_prepared, save_avatar
from realtime.avatars.default_avatar import load_default_avatar
from realtime.avatars.encoded_frames import EncodedFrames
from realtime.renderers.base import MouthPatch, MouthRenderer, RendererTraits
from realtime.renderers.default import DefaultRenderer
from realtime.scheduling.scheduler import InlineRenderWorker
from realtime.timeline.clock import ManualClock
from realtime.timeline.session import LipSyncSession


@pytest.fixture(scope="module")
def default_avatar() -> Avatar:
    return load_default_avatar()


def test_encoded_frames_decode_close_to_the_raw_ones_and_stay_read_only(default_avatar):
    raw = np.asarray(default_avatar.frames[:12])
    frames = EncodedFrames.encode(raw)
    assert len(frames) == 12 and frames.shape == raw.shape and frames.dtype == np.uint8
    assert frames.nbytes < raw.nbytes / 8
    for i in (0, 5, 11, -1):
        image = frames[i]
        assert image.shape == raw.shape[1:] and not image.flags.writeable
        assert cv2.PSNR(image, raw[i]) > 38.0
    assert frames[3] is frames[3]  # the shared cache: decoded once
    assert sum(1 for _ in frames) == 12
    with pytest.raises(IndexError):
        frames[12]
    with pytest.raises(TypeError):
        frames[1:3]  # type: ignore[index]
    with pytest.raises(ValueError):
        EncodedFrames(frames.data, frames.offsets[:-1], frames.frame_shape)


def test_an_encoded_avatar_keeps_the_raw_crops_and_round_trips_on_disk(default_avatar, tmp_path):
    small = Avatar(frames=np.asarray(default_avatar.frames[:10]), boxes=default_avatar.boxes[:10],
                   mouth=default_avatar.mouth[:10], fps=25.0, loop="pingpong", source="x",
                   masks=default_avatar.masks[:10])
    encoded = small.with_encoded_frames()
    assert isinstance(encoded.frames, EncodedFrames) and encoded.with_encoded_frames() is encoded
    np.testing.assert_array_equal(encoded.face_crops(), small.face_crops())  # computed before encoding
    assert encoded.nbytes < small.nbytes / 4
    save_avatar(encoded, tmp_path / "enc")
    loaded = load_prepared(tmp_path / "enc")
    assert isinstance(loaded.frames, EncodedFrames) and len(loaded) == 10 and loaded.size == (512, 512)
    np.testing.assert_array_equal(loaded.frames[4], encoded.frames[4])
    np.testing.assert_array_equal(loaded.face_crops(), small.face_crops())
    np.testing.assert_array_equal(loaded.mouth, small.mouth)


def test_library_counts_users_and_refuses_removal_in_use(default_avatar):
    prepared, removed = [], []
    library = AvatarLibrary(default_avatar, prepare=prepared.append, on_removed=removed.append)
    other = Avatar(frames=np.zeros((3, 32, 32, 3), np.uint8), boxes=np.zeros((3, 4), np.int32), mouth=None,
                   fps=30.0, loop="forward", source="other.mp4")
    entry = library.add_builtin(other, "default", "Other")
    assert entry.id == "default-2" and entry.state is AvatarState.READY and entry.poster
    assert entry.describe()["fps"] == 30.0 and entry.describe()["frames"] == 3
    assert library.acquire(None) == ("default", default_avatar)
    with pytest.raises(UnknownAvatar, match="unknown avatar 'nobody'"):
        library.acquire("nobody")
    with pytest.raises(AvatarInUse, match="built in"):
        library.remove("default-2")
    # An added (non-builtin) entry: in use -> 409-style refusal; released -> removed, renderers told.
    entry.builtin = False
    library.acquire("default-2")
    with pytest.raises(AvatarInUse, match="used by 1 session"):
        library.remove("default-2")
    library.release("default-2")
    library.remove("default-2")
    assert removed == [other] and [e.id for e in library.entries()] == ["default"]
    with pytest.raises(UnknownAvatar):
        library.remove("default-2")


def test_a_failed_or_preparing_avatar_cannot_start_a_session(default_avatar, tmp_path):
    library = AvatarLibrary(default_avatar, cache_dir=tmp_path)
    bad = tmp_path / "empty.mp4"
    bad.write_bytes(b"")
    (entry,) = library.add_folder(tmp_path)
    assert entry.state is AvatarState.FAILED and "empty" in entry.error
    with pytest.raises(AvatarNotReady, match="failed"):
        library.acquire(entry.id)


class MixingRenderer(MouthRenderer):
    """Records every call; a patch's grey level names the avatar it was rendered for."""

    name = "mixing"
    traits = RendererTraits(mixes_avatars=True)

    def __init__(self) -> None:
        self.calls: list[list[int]] = []  # per call: the avatar ids (python id) of its frames

    def prepare(self, avatar) -> None:
        pass

    def _patch(self, avatar, i: int) -> MouthPatch:
        y1, y2, x1, x2 = (int(v) for v in avatar.boxes[i])
        return MouthPatch(np.full((y2 - y1, x2 - x1, 3), avatar.level, np.uint8), (y1, y2, x1, x2),
                          alpha=np.ones((y2 - y1, x2 - x1), np.float32))

    def render(self, avatar, frame_indices, mels):
        self.calls.append([id(avatar)] * len(frame_indices))
        return [self._patch(avatar, int(i)) for i in frame_indices]

    def render_mixed(self, avatars, frame_indices, mels):
        self.calls.append([id(a) for a in avatars])
        return [self._patch(a, int(i)) for a, i in zip(avatars, frame_indices, strict=True)]


class SeparateRenderer(MixingRenderer):
    traits = RendererTraits(mixes_avatars=False)


def two_avatar_sessions(renderer, speech: np.ndarray):
    a_avatar, b_avatar = FakeAvatar(), FakeAvatar()
    a_avatar.level, b_avatar.level = 40, 220
    b_avatar.boxes = b_avatar.boxes + np.array([4, 4, 0, 0])  # its own face box
    clock = ManualClock()
    # As the server's worker: a bounded wait (10 ms) for other sessions' jobs while deadlines allow.
    worker = InlineRenderWorker(renderer, clock=ManualClock(), max_wait_s=0.010)
    a = LipSyncSession(a_avatar, worker, clock=clock, name="a")
    b = LipSyncSession(b_avatar, worker, clock=clock, name="b")
    shown = {"a": [], "b": []}
    for step in range(int((len(speech) / SR + 1.0) / 0.02)):
        clock.set(step * 0.02)
        chunk = speech[(step - 1) * STEP:step * STEP] if step >= 1 else speech[:0]
        for name, s in (("a", a), ("b", b)):
            if len(chunk):
                s.push_audio(chunk, SR)
            s.next_audio(STEP)
            if step % 2 == 0:
                out = s.next_video_frame()
                if out.state == "rendered" and out.mouth_alpha >= 0.999:  # past the onset ramp
                    y1, y2, x1, x2 = (int(v) for v in s.avatar.boxes[out.avatar_index])
                    shown[name].append(float(out.image[(y1 + y2) // 2, (x1 + x2) // 2].mean()))
    return a, b, shown


def test_sessions_on_two_avatars_share_batches_when_the_renderer_mixes(speech_16k):
    renderer = MixingRenderer()
    a, b, shown = two_avatar_sessions(renderer, speech_16k)
    mixed = [c for c in renderer.calls if len(set(c)) == 2]
    assert len(mixed) >= 20, renderer.calls  # most ticks: both sessions' frames in one call
    assert a.metrics().frames_rendered > 20 and b.metrics().frames_rendered > 20
    assert a.metrics().frames_dropped == b.metrics().frames_dropped == 0
    # Each session shows its own avatar's mouth.
    assert shown["a"] and all(abs(v - 40) < 1 for v in shown["a"])
    assert shown["b"] and all(abs(v - 220) < 1 for v in shown["b"])


def test_a_renderer_that_does_not_mix_gets_one_avatar_per_batch(speech_16k):
    renderer = SeparateRenderer()
    a, b, _shown = two_avatar_sessions(renderer, speech_16k)
    assert renderer.calls and all(len(set(c)) == 1 for c in renderer.calls)
    assert a.metrics().frames_rendered > 20 and b.metrics().frames_rendered > 20


def test_default_renderer_mixed_batch_equals_separate_calls(default_avatar):
    renderer = DefaultRenderer()
    other = default_avatar.with_encoded_frames()
    renderer.prepare(default_avatar)
    renderer.prepare(other)
    rng = np.random.default_rng(1)
    mels = rng.uniform(-4, 2, (4, 80, 16)).astype(np.float32)
    indices = np.array([0, 7, 3, 9])
    avatars = [default_avatar, other, other, default_avatar]
    mixed = renderer.render_mixed(avatars, indices, mels)
    for k, avatar in enumerate(avatars):
        (alone,) = renderer.render(avatar, indices[k:k + 1], mels[k:k + 1])
        np.testing.assert_array_equal(mixed[k].image, alone.image)
        assert mixed[k].box == alone.box
    renderer.release(other)
    assert renderer._lookup(other) is None


def test_a_raw_prepared_folder_is_encoded_once_then_loaded_from_the_cache(default_avatar, tmp_path,
                                                                          monkeypatch):
    from realtime.avatars.avatar import AvatarConfig
    from realtime.avatars.avatar_prepare import prepare_avatar

    raw = Avatar(frames=np.asarray(default_avatar.frames[:40]), boxes=default_avatar.boxes[:40],
                 mouth=default_avatar.mouth[:40], fps=25.0, loop="pingpong", source="x",
                 masks=default_avatar.masks[:40])
    save_avatar(raw, tmp_path / "raw")
    config = AvatarConfig(encode_frames=True)
    first = prepare_avatar(tmp_path / "raw", config=config, cache_dir=tmp_path / "cache")
    def no_encoding(self, quality=0):
        raise AssertionError("encoded again instead of loading the cached copy")

    monkeypatch.setattr(Avatar, "with_encoded_frames", no_encoding)
    second = prepare_avatar(tmp_path / "raw", config=config, cache_dir=tmp_path / "cache")
    assert isinstance(first.frames, EncodedFrames) and isinstance(second.frames, EncodedFrames)
    np.testing.assert_array_equal(first.frames.data, second.frames.data)
    np.testing.assert_array_equal(second.face_crops(), raw.face_crops())
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_uploads_queue_on_one_thread_and_are_bounded(default_avatar, tmp_path, monkeypatch):
    import threading
    import time

    from realtime.avatars.avatar_library import LibraryBusy

    release = threading.Event()
    library = AvatarLibrary(default_avatar, cache_dir=tmp_path, max_pending=2)
    monkeypatch.setattr(library, "_run", lambda entry, path, keep_file, log_progress: release.wait(10))
    first = library.add_file(tmp_path / "a.mp4", "a")
    library.add_file(tmp_path / "b.mp4", "b")
    with pytest.raises(LibraryBusy):
        library.add_file(tmp_path / "c.mp4", "c")
    assert first.state is AvatarState.PREPARING
    with pytest.raises(AvatarInUse, match="still being prepared"):
        library.remove(first.id)
    with pytest.raises(AvatarNotReady, match="preparing"):
        library.acquire(first.id)
    release.set()
    deadline = time.monotonic() + 10
    while library._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    library.add_file(tmp_path / "d.mp4", "d")  # the queue drained: room again
    library.close()


def test_encoded_frames_pickle_and_name_their_content(default_avatar):
    import pickle

    frames = EncodedFrames.encode(np.asarray(default_avatar.frames[:3]))
    copy = pickle.loads(pickle.dumps(frames))
    np.testing.assert_array_equal(copy[1], frames[1])
    assert repr(copy) == repr(frames)
    assert repr(EncodedFrames.encode(np.asarray(default_avatar.frames[1:4]))) != repr(frames)


def test_a_removal_reserved_refuses_new_sessions_until_done_cancelled_or_lapsed(default_avatar):
    """The two steps of a removal every worker process must agree to (server/routes/avatars_api.py)."""
    import time

    removed: list = []
    library = AvatarLibrary(default_avatar, on_removed=removed.append)
    other = Avatar(frames=np.zeros((3, 32, 32, 3), np.uint8), boxes=np.zeros((3, 4), np.int32), mouth=None,
                   fps=25.0, loop="forward", source="other.mp4")
    entry = library.add_builtin(other, "other", "Other")
    entry.builtin = False  # as an added one
    library.acquire("other")
    with pytest.raises(AvatarInUse, match="used by 1 session"):
        library.reserve_removal("other")
    library.release("other")
    library.reserve_removal("other")
    with pytest.raises(AvatarNotReady, match="being removed"):
        library.acquire("other")
    library.cancel_removal("other")
    assert library.acquire("other")[0] == "other"
    library.release("other")
    library.reserve_removal("other", hold_s=0.05)
    time.sleep(0.1)  # the remover vanished between the steps: the reservation lapses
    assert library.acquire("other")[0] == "other"
    library.release("other")
    library.reserve_removal("other")
    library.remove("other")
    assert removed == [other]
    with pytest.raises(UnknownAvatar):
        library.reserve_removal("other")


def test_two_libraries_share_an_upload_and_prepare_it_one_at_a_time(default_avatar, tmp_path, monkeypatch):
    """Worker processes each hold a library over one uploads folder: the one that takes an upload keeps
    it, the other adopts it by id; the preparations of one kept file never overlap (a file lock), so the
    second one finds the first one's cache. A removal in one deletes the kept file for every later start."""
    import threading
    import time

    import realtime.avatars.avatar_prepare as avatar_prepare

    small = Avatar(frames=np.asarray(default_avatar.frames[:3]), boxes=default_avatar.boxes[:3],
                   mouth=default_avatar.mouth[:3], fps=25.0, loop="pingpong", source="x")
    windows: list[tuple[float, float]] = []
    lock = threading.Lock()

    def slow_prepare(path, config=None, cache_dir=None, progress=None):
        start = time.monotonic()
        assert path.is_file()
        time.sleep(0.3)
        with lock:
            windows.append((start, time.monotonic()))
        return small

    monkeypatch.setattr(avatar_prepare, "prepare_avatar", slow_prepare)
    uploads = tmp_path / "uploads"
    first = AvatarLibrary(default_avatar, cache_dir=tmp_path, uploads_dir=uploads)
    second = AvatarLibrary(default_avatar, cache_dir=tmp_path, uploads_dir=uploads)
    upload = tmp_path / "face.png"
    upload.write_bytes(b"not decoded here")
    entry = first.add_file(upload, "Face")
    adopted = second.adopt_upload(entry.id)
    assert adopted.id == entry.id and adopted.name == "Face" and second.adopt_upload(entry.id) is adopted
    with pytest.raises(UnknownAvatar, match="no kept upload"):
        second.adopt_upload("nobody")
    deadline = time.monotonic() + 10
    while not (entry.state is adopted.state is AvatarState.READY):
        assert time.monotonic() < deadline, (entry.state, adopted.state)
        time.sleep(0.02)
    (_, first_end), (second_start, _) = sorted(windows)
    assert second_start >= first_end, windows  # one after the other
    assert len(second.acquire(entry.id)[1]) == len(small)
    second.release(entry.id)
    late = AvatarLibrary(default_avatar, cache_dir=tmp_path, uploads_dir=uploads)  # a worker that was starting
    (caught_up,) = late.adopt_kept_uploads()
    assert caught_up.id == entry.id and late.adopt_kept_uploads() == []
    late.close()
    for library in (first, second):
        library.reserve_removal(entry.id)
    for library in (first, second):
        library.remove(entry.id)
    assert list(uploads.iterdir()) == []  # manifest and file gone: no restart brings it back
    third = AvatarLibrary(default_avatar, cache_dir=tmp_path, uploads_dir=uploads)
    assert third.restore_uploads() == []
    for library in (first, second, third):
        library.close()
