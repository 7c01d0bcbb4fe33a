"""The engine without a network: batching, pacing, speculation, commands, writers; fake and tiny model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.fakes import FakeWorldModel
from worldloop.models.config import preset
from worldloop.models.text import PromptEncoder
from worldloop.streaming.engine import Engine
from worldloop.streaming.session import EngineFull, Frame, SessionClosed, SessionOptions, UnknownSnapshot

pytestmark = pytest.mark.timeout(60)
RAW = dict(image_format="raw")


class Collector:
    """An ``on_frame`` callback that keeps every frame and lets a test wait for some."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._cond = threading.Condition()

    def __call__(self, frame: Frame) -> None:
        with self._cond:
            self.frames.append(frame)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 20.0) -> list[Frame]:
        with self._cond:
            arrived = self._cond.wait_for(lambda: len(self.frames) >= count, timeout)
            assert arrived, f"only {len(self.frames)} frames"
            return list(self.frames)

    def after(self, seq: int, count: int) -> list[Frame]:
        """``count`` frames with seq ≥ ``seq``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(f.seq >= seq for f in self.frames) >= count, 20.0)
            assert ok, "frames did not come"
            return [f for f in self.frames if f.seq >= seq][:count]


class ListWriter:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.closed = False

    def write(self, rgb: np.ndarray) -> None:
        assert not self.closed
        self.frames.append(rgb.copy())

    def close(self) -> int:
        self.closed = True
        return len(self.frames)


@pytest.fixture
def engine_factory() -> Iterator[Any]:
    engines: list[Engine] = []

    def make(model: Any = None, **kwargs: Any) -> Engine:
        engine = Engine(model or FakeWorldModel(), **kwargs).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def test_sessions_are_batched_and_paced(engine_factory: Any) -> None:
    model = FakeWorldModel()
    engine = engine_factory(model, speculative=False)
    a, b = Collector(), Collector()
    ha = engine.open_session(SessionOptions("a", 1, fps=20), a)
    hb = engine.open_session(SessionOptions("b", 2, fps=20), b)
    ha.started.result(5), hb.started.result(5)
    start = time.monotonic()
    a.wait(10), b.wait(10)
    elapsed = time.monotonic() - start
    assert 0.3 < elapsed < 3.0, elapsed  # 10 frames at 20 FPS: about 0.5 s
    assert max(size for size, _ in model.calls) == 2
    assert [f.seq for f in a.frames[:10]] == list(range(10))
    assert a.frames[0].payload[:2] == b"\xff\xd8"  # JPEG
    assert not np.array_equal(a.frames[3].rgb, b.frames[3].rgb)  # seed and prompt matter


def test_a_late_session_skips_deadlines_instead_of_bursting(engine_factory: Any) -> None:
    engine = engine_factory(FakeWorldModel(step_delay=0.1), speculative=False)
    frames = Collector()
    handle = engine.open_session(SessionOptions("a", fps=30, **RAW), frames)
    handle.started.result(5)
    frames.wait(3)
    time.sleep(0.6)
    count, stats = len(frames.frames), handle.stats()
    assert count <= 3 + 0.6 / 0.1 + 2  # at the model's speed, not catching up to 30 FPS
    assert stats.deadlines_missed >= 5


def test_speculative_frames_are_kept_while_keys_hold_and_discarded_on_change(engine_factory: Any) -> None:
    model = FakeWorldModel()
    engine = engine_factory(model)
    reference_engine = engine_factory(FakeWorldModel(), speculative=False)
    frames, reference = Collector(), Collector()
    handle = engine.open_session(SessionOptions("a", 3, fps=30, **RAW), frames)
    reference_engine.open_session(SessionOptions("a", 3, fps=30, **RAW), reference)
    frames.wait(12)
    reference.wait(12)
    assert handle.stats().speculative_kept >= 5
    assert any(f.speculative for f in frames.frames)
    for ours, theirs in zip(frames.frames[:12], reference.frames[:12], strict=True):
        assert np.array_equal(ours.rgb, theirs.rgb)  # a committed speculative frame is the same frame

    masks = {0: 0}

    def press(frame: Frame) -> None:  # a new key state after every frame
        seq = frame.seq + 1000
        masks[seq] = frame.seq % 2 + 1
        handle.set_keys(masks[seq], seq)
        frames(frame)

    handle.on_frame = press
    frames.after(frames.frames[-1].seq + 1, 15)
    assert handle.stats().speculative_discarded >= 3
    assert all(masks[f.key_seq] == f.keys for f in frames.frames)  # headers tell the keys actually used


def test_snapshots_are_bounded_and_restore_reproduces(engine_factory: Any) -> None:
    engine = engine_factory(max_snapshots=2)
    frames = Collector()
    handle = engine.open_session(SessionOptions("a", fps=60, **RAW), frames)
    first_id, seq = handle.snapshot().result(5)
    before = frames.after(seq, 5)
    restored_at = handle.restore(first_id).result(5)
    after = frames.after(restored_at, 5)
    assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(before, after, strict=True))
    handle.snapshot().result(5), handle.snapshot().result(5)
    with pytest.raises(UnknownSnapshot):
        handle.restore(first_id).result(5)
    prompt_at = handle.set_prompt("b").result(5)
    assert not np.array_equal(frames.after(prompt_at, 1)[0].rgb, frames.after(restored_at, 1)[0].rgb)


def test_admission_pause_writer_and_close(engine_factory: Any) -> None:
    model = FakeWorldModel()
    engine = engine_factory(model, max_sessions=1)
    frames = Collector()
    handle = engine.open_session(SessionOptions("a", fps=60, **RAW), frames, paused=True)
    with pytest.raises(EngineFull):
        engine.open_session(SessionOptions("b"))
    handle.started.result(5)
    time.sleep(0.2)
    assert not frames.frames and model.sessions_created == 1
    writer = ListWriter()
    handle.attach_writer(writer).result(5)
    handle.paused = False
    frames.wait(5)
    assert handle.stop_writer().result(5) == len(writer.frames) >= 4
    written = {f.seq: f.rgb for f in frames.frames[:len(writer.frames)]}
    assert all(np.array_equal(rgb, written[i]) for i, rgb in enumerate(writer.frames))
    late = ListWriter()
    handle.attach_writer(late).result(5)
    handle.close().result(5)
    assert late.closed and engine.session_count == 0
    with pytest.raises(SessionClosed):
        handle.snapshot().result(5)
    engine.open_session(SessionOptions("b")).started.result(5)  # the slot is free again


def test_a_failing_step_ends_its_sessions_not_the_engine(engine_factory: Any) -> None:
    class Exploding(FakeWorldModel):
        def next_frame(self, sessions: Any, keys: Any, speculative: bool = False) -> np.ndarray:
            if any(s.prompt == "explode" for s in sessions):
                raise RuntimeError("boom")
            return super().next_frame(sessions, keys, speculative)

    engine = engine_factory(Exploding())
    bad = engine.open_session(SessionOptions("explode"))
    with pytest.raises(RuntimeError, match="boom"):
        bad.closed.result(5)
    good = Collector()
    engine.open_session(SessionOptions("fine"), good)
    good.wait(3)
    assert engine.session_count == 1


@pytest.fixture(scope="module")
def tiny_world_model(prompt_encoder: PromptEncoder) -> Any:
    from worldloop.models.world_model import WorldModel

    return WorldModel.from_config(preset("tiny"), seed=0, prompt_encoder=prompt_encoder, max_sessions=4)


def test_the_real_tiny_world_model(tiny_world_model: Any) -> None:
    # 5 FPS leaves time to speculate even on a loaded CPU; the frames must equal those made without it.
    options = SessionOptions("a stone dungeon", 1, fps=5, **RAW)
    with Engine(tiny_world_model, max_sessions=2) as engine:
        frames = Collector()
        handle = engine.open_session(options, frames, paused=True)
        handle.set_keys(1, 1)
        handle.paused = False
        snapshot_id, seq = handle.snapshot().result(10)
        first = frames.after(seq, 4)
        assert first[0].rgb.shape == (32, 32, 3) and first[0].rgb.dtype == np.uint8
        again = frames.after(handle.restore(snapshot_id).result(10), 4)
        assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(first, again, strict=True))
        assert handle.stats().speculative_kept >= 1
    with Engine(tiny_world_model, max_sessions=2, speculative=False) as engine:
        plain = Collector()
        handle = engine.open_session(options, plain, paused=True)
        handle.set_keys(1, 1)
        handle.paused = False
        plain_frames = plain.after(seq, 4)
        assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(first, plain_frames, strict=True))


def test_commands_are_paid_for_by_the_session_that_sends_them() -> None:
    """A session re-caching its prompt back to back loses its own frames, not the other session's."""
    model = FakeWorldModel(prompt_delay=0.05)
    with Engine(model, max_sessions=2, speculative=False) as engine:
        canary, spammer = Collector(), Collector()
        a = engine.open_session(SessionOptions("cave", fps=10, **RAW), on_frame=canary)
        b = engine.open_session(SessionOptions("cave", fps=10, **RAW), on_frame=spammer)
        a.started.result(10)
        b.started.result(10)
        end, i = time.monotonic() + 3.0, 0
        while time.monotonic() < end:
            b.set_prompt(f"cave {i}").result(10)
            i += 1
        counted = len(canary.frames), len(spammer.frames)
        assert counted[1] < 0.8 * counted[0], counted
        a.close().result(10)
        b.close().result(10)
