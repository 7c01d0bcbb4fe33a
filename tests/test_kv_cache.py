"""The KV cache on tiny shapes: ring slots, eviction, speculative frames, snapshots, fixed memory; and a
5,000-frame stream through a micro DiT with constant memory and finite outputs."""

from __future__ import annotations

import pytest
import torch

from worldloop.models.config import DiTConfig, ModelConfig, SamplingConfig, VAEConfig
from worldloop.models.dit import DiT
from worldloop.models.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("single_thread")
DEPTH, HEADS, DH, N = 2, 1, 8, 2


def make_cache(sink: int = 1, window: int = 3, slack: int = 2, sessions: int = 3) -> KVCache:
    return KVCache(
        depth=DEPTH,
        heads=HEADS,
        head_dim=DH,
        tokens=N,
        sink=sink,
        window=window,
        slack=slack,
        max_sessions=sessions,
        latent_shape=(1, 2, 2),
        num_keys=6,
        prompt_tokens=3,
    )


def write(cache: KVCache, slot: int, frame: int, speculative: bool = False) -> None:
    """Append one frame whose K/V/latent all hold the value of the frame index."""
    k = torch.full((DEPTH, 1, HEADS, N, DH), float(frame))
    cache.append(
        [slot],
        torch.tensor([[frame]]),
        k,
        k.clone(),
        torch.full((1, 1, 1, 2, 2), float(frame)),
        torch.zeros(1, 1, 6),
        torch.zeros(1, 1),
        speculative=speculative,
    )


def test_eviction_keeps_the_sink_and_the_last_window_frames() -> None:
    cache = make_cache(sink=1, window=3)
    for f in range(10):
        write(cache, 1, f)
        expected = sorted({0} | set(range(max(1, f - 2), f + 1)))
        assert cache.stored_frames(1) == expected
    for slot, frame in enumerate(cache.frames[1].tolist()):
        if frame >= 0:  # the stored K/V are the frame's own
            assert cache.k[0, 1, 0, slot * N, 0].item() == frame
    view = cache.view([1])  # on the CPU the view leaves the 2 empty frame slots out
    assert view.frames[0].tolist() == [0, 7, 8, 9] and view.sink[0].tolist() == [True, False, False, False]
    assert torch.cat(view.layer(0)[0], dim=2)[0, 0, ::N, 0].tolist() == [0, 7, 8, 9]
    assert cache.stored_frames(0) == [] and cache.stored_frames(2) == []  # other slots untouched


def test_multi_frame_append_writes_only_what_survives() -> None:
    cache = make_cache(sink=1, window=3)
    g = 7
    k = torch.arange(g, dtype=torch.float32).repeat_interleave(N).reshape(1, 1, 1, g * N, 1)
    k = k.expand(DEPTH, 1, HEADS, g * N, DH)
    cache.append(
        [2], torch.arange(g)[None], k, k, torch.zeros(1, g, 1, 2, 2), torch.zeros(1, g, 6), torch.zeros(1, g)
    )
    assert cache.stored_frames(2) == [0, 4, 5, 6]
    ctx = cache.context(2)
    assert ctx.frames.tolist() == [4, 5, 6]


def test_speculative_commit_and_discard() -> None:
    cache = make_cache(sink=1, window=3, slack=2)
    for f in range(6):
        write(cache, 0, f)
    write(cache, 0, 6, speculative=True)
    write(cache, 0, 7, speculative=True)
    assert cache.stored_frames(0) == [0, 3, 4, 5, 6, 7]  # nothing committed was evicted
    assert cache.stored_frames(0, speculative=True) == [6, 7]
    snap = cache.snapshot(0)
    cache.discard(0)
    assert cache.stored_frames(0) == [0, 3, 4, 5]
    assert cache.k[0, 0, 0, 3 * N, 0].item() == 3  # committed K/V intact after the speculative writes
    cache.restore(0, snap)
    cache.commit(0)
    assert cache.stored_frames(0) == [0, 5, 6, 7]
    assert cache.stored_frames(0, speculative=True) == []


def test_snapshot_restore_and_reset() -> None:
    cache = make_cache()
    for f in range(4):
        write(cache, 1, f)
    snap = cache.snapshot(1)
    for f in range(4, 9):
        write(cache, 1, f)
    cache.restore(2, snap)  # branch into another slot
    cache.restore(1, snap)
    for slot in (1, 2):
        assert cache.stored_frames(slot) == [0, 1, 2, 3]
        assert cache.k[1, slot, 0, 2 * N, 0].item() == 2
    cache.reset(1)
    assert cache.stored_frames(1) == [] and cache.k[:, 1].abs().sum() == 0
    assert cache.prompt_mask[1].tolist() == [True, False, False]
    cache.evict(2, before=2)
    assert cache.stored_frames(2) == [0, 2, 3]
    cache.evict(2)
    assert cache.stored_frames(2) == [0]


def test_view_gathers_unordered_slots_like_a_slice() -> None:
    cache = make_cache(window=3, slack=0, sessions=3)
    for slot in range(3):
        for f in range(4 + slot):
            write(cache, slot, f + 10 * slot)
    full = cache.view([0, 1, 2])
    gathered = cache.view([2, 0])
    assert torch.equal(gathered.k, full.k[:, [2, 0]]) and torch.equal(gathered.frames, full.frames[[2, 0]])
    assert full.k.data_ptr() == cache.k.data_ptr()  # consecutive slots, no empty frame slot: a view, no copy


def micro_config() -> ModelConfig:
    return ModelConfig(
        name="micro",
        height=8,
        width=8,
        vae=VAEConfig(latent_channels=2, downsample=2, encoder_channels=(4,), decoder_channels=(4,)),
        dit=DiTConfig(dim=16, depth=1, heads=2, max_prompt_tokens=2, window=3, sink=1, slack=0),
        sampling=SamplingConfig(),
    )


def test_a_5000_frame_stream_runs_in_constant_memory() -> None:
    config = micro_config()
    torch.manual_seed(0)
    model = DiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cache = KVCache.for_model(config, max_sessions=1)
    buffers = {
        name: (t.data_ptr(), t.shape) for name, t in vars(cache).items() if isinstance(t, torch.Tensor)
    }
    prompt = model.null_prompt_kv(1)
    shape = (1, 1, config.latent_channels, *config.latent_size)
    prev = torch.randn(shape)
    keys = torch.zeros(1, 2, 6)
    sigma = torch.tensor([[0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in range(1, 5001):
            noise = torch.randn(shape, generator=g)
            frames = torch.tensor([[t - 1, t]])
            view = cache.view([0])
            out = model.forward_cached(torch.cat([prev, noise], 1), sigma, keys, frames, 1, prompt, view)
            cache.append([0], frames[:, :1], out.k, out.v_cache, prev, keys[:, :1], sigma[:, :1])
            assert torch.isfinite(out.v).all()
            prev = (noise - out.v).clamp(-3, 3)  # x0 = x - σ·v at σ = 1
            if t % 1000 == 0:  # the positions the model sees are relative to the newest frame: bounded
                rel = view.frames[view.valid & ~view.sink] - t
                assert (
                    -(config.dit.window + 1) <= rel.min() and rel.max() <= -2
                )  # frame t-1 is in the forward
    after = {name: (t.data_ptr(), t.shape) for name, t in vars(cache).items() if isinstance(t, torch.Tensor)}
    assert after == buffers
    assert cache.stored_frames(0) == [0, 4997, 4998, 4999]
