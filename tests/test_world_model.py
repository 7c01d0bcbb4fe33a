"""WorldModel, the one rollout loop, on the ``tiny`` preset with random (perturbed) weights, float32.

Batch equality tolerance: decoded frames within 1 grey level, latents within 1e-4 (batched matmuls sum in
another order). Same-session reproductions (seed, snapshot/restore) are exact.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from worldloop.models.config import ModelConfig, SamplingConfig
from worldloop.models.text import PromptEncoder
from worldloop.models.world_model import WorldModel

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-4


def make_model(config: ModelConfig, encoder: PromptEncoder, **kwargs: object) -> WorldModel:
    wm = WorldModel.from_config(config, seed=0, prompt_encoder=encoder, precision="fp32", **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make the zero-initialised layers non-zero so frames depend on everything
        for p in wm.dit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        wm._null_prompt = wm.dit.null_prompt_kv(1)
    return wm


@pytest.fixture(scope="module", params=["v", "delta", "warp"])
def wm(request: pytest.FixtureRequest, prompt_encoder: PromptEncoder, tiny_config: ModelConfig) -> WorldModel:
    """Every test runs on a velocity DiT, a delta DiT (x0 = the previous frame + its output) and a warp DiT
    (x0 = the previous frame moved along its flow + its residual), whose previous frame comes from the fused
    call or from the cache."""
    config = tiny_config.replace(dit=replace(tiny_config.dit, prediction=request.param))
    return make_model(config, prompt_encoder, max_sessions=8)


@pytest.fixture
def fresh(wm: WorldModel):
    """Sessions opened by a test are closed after it."""
    opened = []

    def new(prompt: str = "a stone dungeon", seed: int = 0, **kw: object):
        s = wm.new_session(prompt, seed, **kw)
        opened.append(s)
        return s

    yield new
    for s in opened:
        if not s.closed:
            wm.close_session(s)


KEYS = [1, 1, 16, 0, 5, 1, 32, 1, 1, 2]  # longer than sink + window: eviction happens


def latents_of(wm: WorldModel, sessions: list, keys: list[int]) -> torch.Tensor:
    return torch.stack([wm.generate(sessions, [k] * len(sessions)) for k in keys], 1)


def test_step_shapes_and_timings(wm: WorldModel, fresh) -> None:
    s = fresh()
    frames = wm.next_frame([s], [1])
    assert frames.shape == (1, *wm.frame_shape, 3) and frames.dtype == np.uint8
    assert s.frame_index == 1 and wm.last_timings.forwards == wm.config.sampling.first_frame_steps
    wm.next_frame([s], [1])
    assert wm.last_timings.forwards == wm.steps == 1  # fused: one forward per 1-step frame
    assert wm.last_timings.dit_ms > 0 and wm.last_timings.decode_ms > 0 and wm.last_timings.batch == 1
    assert wm.cache.stored_frames(s.slot) == [0]  # frame 1 is pending: written by the next forward


def test_same_seed_same_frames_and_other_seed_differs(wm: WorldModel, fresh) -> None:
    a, b, c = fresh(seed=7), fresh(seed=7), fresh(seed=8)
    la, lb, lc = (latents_of(wm, [s], KEYS[:4]) for s in (a, b, c))
    assert torch.equal(la, lb)
    assert (la - lc).abs().max() > 1e-2


def test_a_batch_of_three_equals_three_single_sessions(wm: WorldModel, fresh) -> None:
    singles = []
    for prompt, seed in [("dungeon", 1), ("ice cave", 2), ("desert ruins", 3)]:
        alone = fresh(prompt, seed)
        singles.append(latents_of(wm, [alone], KEYS))
        wm.close_session(alone)
    batch = [fresh(p, seed) for p, seed in [("dungeon", 1), ("ice cave", 2), ("desert ruins", 3)]]
    for k in KEYS[:2]:
        wm.generate([batch[2]], [k])
    # The first batched call mixes frame 0 (first_frame_steps) with frame 2 (steps) in one batch.
    mixed = torch.stack(
        [wm.generate(batch, [KEYS[i], KEYS[i], KEYS[i + 2]]) for i in range(len(KEYS) - 2)], 1
    )
    assert (mixed[:2] - torch.cat(singles[:2])[:, :-2]).abs().max() < TOL
    assert (mixed[2] - singles[2][0, 2:]).abs().max() < TOL
    s = fresh("dungeon", 1)
    frames_single = [wm.next_frame([s], [k])[0] for k in KEYS[:3]]
    t = [fresh("dungeon", 1), fresh("ice cave", 2)]
    frames_batch = [wm.next_frame(t, [k, k])[0] for k in KEYS[:3]]
    for x, y in zip(frames_single, frames_batch, strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_snapshot_restore_reproduces_frames_and_branches(wm: WorldModel, fresh) -> None:
    s = fresh(seed=3)
    latents_of(wm, [s], KEYS[:6])
    snap = wm.snapshot(s)
    first = latents_of(wm, [s], KEYS[6:])
    wm.restore(s, snap)
    assert torch.equal(latents_of(wm, [s], KEYS[6:]), first)
    other = fresh(seed=99)
    wm.restore(other, snap)  # branch into another slot
    assert torch.equal(latents_of(wm, [other], KEYS[6:]), first)


def test_speculative_commit_and_discard(wm: WorldModel, fresh) -> None:
    s, ref = fresh(seed=5), fresh(seed=5)
    latents_of(wm, [s], KEYS[:6])
    latents_of(wm, [ref], KEYS[:6])
    expected = latents_of(wm, [ref], [1, 1, 2])
    slack = wm.config.dit.slack
    spec = [wm.generate([s], [4], speculative=True) for _ in range(slack)]
    with pytest.raises(ValueError, match="speculative"):
        wm.generate([s], [4], speculative=True)
    with pytest.raises(ValueError, match="commit or discard"):
        wm.generate([s], [4])
    wm.discard(s)
    assert s.frame_index == 6 and wm.cache.stored_frames(s.slot, speculative=True) == []
    spec_again = [wm.generate([s], [1], speculative=True) for _ in range(2)]
    wm.commit(s)
    # The discarded frames left no trace (within rounding: the first forward after a discard is unfused).
    assert (torch.stack(spec_again, 1) - expected[:, :2]).abs().max() < TOL
    assert (wm.generate([s], [2]) - expected[:, 2]).abs().max() < TOL
    assert not torch.equal(spec[0], expected[:, 0])  # other keys, other frame


def test_prompt_recache_equals_recomputing_the_window(wm: WorldModel, fresh) -> None:
    s = fresh("a stone dungeon", seed=4)
    latents_of(wm, [s], KEYS)
    before = wm.snapshot(s)
    wm.set_prompt(s, "a neon city at night")
    assert s.prompt == "a neon city at night"
    switched = wm.cache.snapshot(s.slot).tensors
    # From scratch: keep only the sink, then write the window frames one by one under the new prompt.
    wm.restore(s, before)
    context = wm.cache.context(s.slot)
    wm.cache.evict(s.slot)
    wm.cache.set_prompt([s.slot], wm._encode_prompt("a neon city at night"))
    for i in range(len(context.frames)):
        wm._write_context(
            s,
            context.latents[i : i + 1],
            context.keys[i : i + 1],
            context.frames[i : i + 1],
            context.sigma[i : i + 1],
        )
    scratch = wm.cache.snapshot(s.slot).tensors
    assert torch.equal(switched["frames"], scratch["frames"])
    assert (switched["k"] - scratch["k"]).abs().max() < TOL and (
        switched["v"] - scratch["v"]
    ).abs().max() < TOL
    assert (switched["k"] - before.cache.tensors["k"]).abs().max() > 1e-3  # the window K/V did change


def test_first_frames_reset_and_close(wm: WorldModel, fresh) -> None:
    h, w = wm.frame_shape
    video = np.random.default_rng(0).integers(0, 256, size=(3, h, w, 3), dtype=np.uint8)
    s = fresh(seed=1, first_frames=video)
    assert s.frame_index == 3 and wm.cache.stored_frames(s.slot) == [0, 1, 2]
    wm.next_frame([s], [1])
    assert wm.last_timings.forwards == wm.steps  # context given: no first-frame steps
    first = latents_of(wm, [s], [1, 2])
    wm.reset(s, seed=1)
    assert s.frame_index == 0 and wm.cache.stored_frames(s.slot) == []
    wm.close_session(s)
    with pytest.raises(ValueError, match="closed"):
        wm.next_frame([s], [1])
    with pytest.raises(ValueError, match="first_frames"):
        fresh(first_frames=video[:, :-1])
    assert torch.isfinite(first).all()


def test_input_validation_and_pool_limit(wm: WorldModel, fresh) -> None:
    s = fresh()
    with pytest.raises(ValueError, match="bitmasks"):
        wm.next_frame([s], [64])
    with pytest.raises(ValueError, match="keys for 2"):
        wm.next_frame([s, fresh()], [1])
    with pytest.raises(ValueError, match="control character"):
        fresh("bad\x00prompt")
    while len(wm._sessions) < wm.max_sessions:
        fresh()
    with pytest.raises(RuntimeError, match="in use"):
        fresh()


def test_rollout_latents_gradients_reach_the_weights_not_the_cache(wm: WorldModel, fresh) -> None:
    s = fresh(seed=2)
    keys = torch.tensor([[1, 1, 16, 0, 1]])
    out = wm.rollout_latents([s], keys, grad_frames=2, steps=1)
    assert out.shape == (1, 5, *wm.latent_shape) and out.requires_grad
    out[:, -2:].square().mean().backward()
    grads = [p.grad for p in wm.dit.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert not wm.cache.k.requires_grad
    wm.dit.zero_grad(set_to_none=True)


def test_rollout_latents_with_a_grad_prompt_trains_cross_attention(wm: WorldModel, fresh,
                                                                   prompt_encoder: PromptEncoder) -> None:
    keys = torch.tensor([[1, 16, 0]])
    plain = wm.rollout_latents([fresh("toxic lab", seed=4)], keys, grad_frames=1, steps=1)
    wm.dit.zero_grad(set_to_none=True)
    emb = prompt_encoder.encode(["toxic lab"])
    kv = wm.dit.prompt_kv(emb.tokens, emb.mask)
    out = wm.rollout_latents([fresh("toxic lab", seed=4)], keys, grad_frames=1, steps=1, prompt=kv)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-4)  # the same prompt, now with gradients
    out[:, -1].square().mean().backward()
    assert wm.dit.blocks[0].cross_kv.weight.grad is not None and wm.dit.text_proj.weight.grad is not None
    assert wm.dit.blocks[0].cross_kv.weight.grad.abs().sum() > 0
    wm.dit.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="prompt K/V for 1 sessions, stepping 2"):
        wm.rollout_latents([fresh(seed=1), fresh(seed=2)], keys.expand(2, -1), grad_frames=1, steps=1,
                           prompt=kv)


def test_guidance_runs_with_the_null_prompt(prompt_encoder: PromptEncoder, tiny_config: ModelConfig) -> None:
    config = tiny_config.replace(sampling=SamplingConfig(steps=2, first_frame_steps=2, guidance=3.0))
    wm = make_model(config, prompt_encoder, max_sessions=1)
    s = wm.new_session("toxic lab", 0)
    frames = [wm.next_frame([s], [1]) for _ in range(3)]
    assert wm.last_timings.forwards == 4  # 2 steps × (conditional + null)
    assert all(f.shape == (1, *wm.frame_shape, 3) for f in frames)


def test_first_keys_condition_the_context_frames(wm: WorldModel, fresh) -> None:
    h, w = wm.frame_shape
    context = np.random.default_rng(0).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    plain = wm.generate([fresh(seed=5, first_frames=context)], [1])
    no_keys = wm.generate([fresh(seed=5, first_frames=context, first_keys=[0, 0, 0])], [1])
    held = wm.generate([fresh(seed=5, first_frames=context, first_keys=[0, 1, 17])], [1])
    assert torch.equal(plain, no_keys)  # no first_keys means no keys held
    assert (held - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one key state per first frame"):
        fresh(first_frames=context, first_keys=[1, 1])
    with pytest.raises(ValueError, match="bitmasks"):
        fresh(first_frames=context, first_keys=[0, 1, 64])


def test_given_frames_enter_the_cache_clean_generated_ones_at_context_sigma(
        prompt_encoder: PromptEncoder, tiny_config: ModelConfig, tmp_path) -> None:
    from worldloop.models.checkpoint import save_model

    config = tiny_config.replace(sampling=SamplingConfig(steps=1, first_frame_steps=1, context_sigma=0.2))
    wm = make_model(config, prompt_encoder, max_sessions=1)
    h, w = wm.frame_shape
    video = np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    s = wm.new_session("a stone dungeon", 0, first_frames=video)
    for _ in range(3):
        wm.next_frame([s], [1])
    sigma = wm.cache.context(s.slot, include_sink=True).sigma.tolist()
    assert sigma == pytest.approx([0.0, 0.0, 0.2, 0.2])  # 2 given frames; 2 generated (the 3rd is pending)
    save_model(tmp_path / "m", config, wm.dit, wm.vae)
    own = WorldModel.from_pretrained(tmp_path / "m", prompt_encoder=prompt_encoder)
    override = WorldModel.from_pretrained(tmp_path / "m", prompt_encoder=prompt_encoder, context_sigma=0.05)
    assert own.config.sampling.context_sigma == 0.2 and override.config.sampling.context_sigma == 0.05
    with pytest.raises(ValueError, match="context_sigma"):
        WorldModel.from_pretrained(tmp_path / "m", prompt_encoder=prompt_encoder, context_sigma=1.0)
