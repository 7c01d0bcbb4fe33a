"""The causal DiT: the cached rollout equals the masked teacher-forcing forward; masks, modes, conditioning.

Equality tolerance: max abs difference < 1e-4 in float32 (observed ~1e-6; the paths differ only in summation
order).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from worldloop.models import consistency
from worldloop.models.config import PRESETS, DiTConfig, ModelConfig, VAEConfig, preset
from worldloop.models.dit import (
    FLOW_CHANNELS,
    NULL_KEY,
    DiT,
    attention,
    drop_keys,
    frame_mask,
    warp,
    widen_to_warp,
)

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-4


def perturbed(config: ModelConfig, seed: int = 0) -> DiT:
    """A DiT whose zero-initialised layers are made non-zero, so every path carries signal."""
    torch.manual_seed(seed)
    model = DiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def clip(config: ModelConfig, batch: int, frames: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, frames, config.latent_channels, *config.latent_size)
    return {
        "clean": torch.randn(shape, generator=g),
        "noisy": torch.randn(shape, generator=g),
        "sigma": torch.rand(batch, frames, generator=g),
        "keys": (torch.rand(batch, frames, config.dit.num_keys, generator=g) > 0.5).float(),
        "tokens": torch.randn(batch, 5, config.dit.text_dim, generator=g),
    }


def cached_rollout(model: DiT, config: ModelConfig, data: dict, fused: bool,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frame by frame against a KV cache (slots 1 and 3 of 4), writing each clean frame's K/V."""
    prompt = model.prompt_kv(data["tokens"], torch.ones(data["noisy"].shape[0], 5, dtype=torch.bool))
    return consistency.cached_rollout(model, config, data["noisy"], data["sigma"], data["keys"],
                                      data["clean"], prompt, fused=fused, slots=[1, 3], dtype=dtype)


@pytest.mark.parametrize(("fused", "prediction"), [(True, "v"), (False, "v"), (True, "x0"), (True, "delta"),
                                                    (False, "delta"), (True, "warp"), (False, "warp")])
def test_cached_rollout_equals_teacher_forcing_beyond_the_window(
    tiny_config: ModelConfig, fused: bool, prediction: str
) -> None:
    """Also for x0, delta and warp outputs: a delta DiT adds to the frame before (in the call or the cache), a
    warp DiT resamples it along its flow first."""
    tiny_config = tiny_config.replace(dit=replace(tiny_config.dit, prediction=prediction))
    model = perturbed(tiny_config)
    frames = tiny_config.dit.sink + tiny_config.dit.window + 4  # eviction is in effect for the last frames
    data = clip(tiny_config, batch=2, frames=frames)
    with torch.no_grad():
        prompt = model.prompt_kv(data["tokens"], torch.ones(2, 5, dtype=torch.bool))
        full = model(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
        cached = cached_rollout(model, tiny_config, data, fused)
    assert full.shape == data["noisy"].shape
    assert (cached - full).abs().max().item() < TOL


def test_positions_stay_valid_deep_into_a_stream(tiny_config: ModelConfig) -> None:
    """The cache stores k with its rotary phase at the absolute frame index: frames three billion frames into
    a stream (about three years at 30 FPS) give what the same frames give at the start. Without sinks, so
    the two clips differ only in their positions. float32 angles would be off by up to 256 rad there."""
    config = tiny_config.replace(dit=replace(tiny_config.dit, sink=0))
    model = perturbed(config)
    data = clip(config, batch=2, frames=config.dit.window + 3)
    with torch.no_grad():
        prompt = model.prompt_kv(data["tokens"], torch.ones(2, 5, dtype=torch.bool))
        first = consistency.cached_rollout(model, config, data["noisy"], data["sigma"], data["keys"],
                                           data["clean"], prompt, fused=True)
        late = consistency.cached_rollout(model, config, data["noisy"], data["sigma"], data["keys"],
                                          data["clean"], prompt, fused=True, start=3_000_000_000)
    assert (late - first).abs().max().item() < TOL


def test_folding_the_attention_scale_keeps_the_cached_outputs(tiny_config: ModelConfig) -> None:
    """``fold_attention_scale`` (what the ONNX export does to its copy) moves 1/√Dh into q's gains: the same
    cached rollout, twice folded is once folded, and the training forward refuses the folded model."""
    model = perturbed(tiny_config)
    data = clip(tiny_config, batch=2, frames=6)
    with torch.no_grad():
        before = cached_rollout(model, tiny_config, data, fused=True)
        model.fold_attention_scale()
        model.fold_attention_scale()
        after = cached_rollout(model, tiny_config, data, fused=True)
        prompt = model.prompt_kv(data["tokens"], torch.ones(2, 5, dtype=torch.bool))
        with pytest.raises(ValueError, match="folded"):
            model(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
    assert (after - before).abs().max().item() < TOL
    assert all(blk.attention_scale == 1.0 for blk in model.blocks)


def test_window_restriction_changes_the_output(tiny_config: ModelConfig) -> None:
    """The training mask applies the window: a wider window sees more context and gives other outputs."""
    wide = tiny_config.replace(dit=DiTConfig(**{**tiny_config.dit.__dict__, "window": 16}))
    model = perturbed(tiny_config)
    wide_model = DiT(wide).eval()
    wide_model.load_state_dict(model.state_dict())
    data = clip(tiny_config, 1, 10)
    with torch.no_grad():
        prompt = model.prompt_kv(data["tokens"], torch.ones(1, 5, dtype=torch.bool))
        a = model(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
        b = wide_model(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
    within = tiny_config.dit.window + 1  # frames 0..window see the same context either way
    assert (a[:, :within] - b[:, :within]).abs().max() < TOL
    assert (a[:, within:] - b[:, within:]).abs().max() > 1e-3


def test_frame_mask_rule() -> None:
    f = 4
    pos = torch.arange(f).repeat(2)
    ctx = torch.arange(2 * f) < f
    m = frame_mask(pos, ctx, pos, ctx, pos < 1, window=2)
    clean_to_clean, noisy_to_clean, noisy_to_noisy = m[:f, :f], m[f:, :f], m[f:, f:]
    assert not m[:f, f:].any()  # clean frames never see noisy ones
    assert torch.equal(noisy_to_noisy, torch.eye(f, dtype=torch.bool))
    assert clean_to_clean.tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]  # window 2 + sink
    assert noisy_to_clean.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    m3 = frame_mask(
        torch.arange(5),
        torch.ones(5).bool(),
        torch.arange(5),
        torch.ones(5).bool(),
        torch.arange(5) < 1,
        window=2,
    )
    assert m3[4].tolist() == [True, False, True, True, True]  # sink + the last 2 frames + itself


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_sdpa(tiny_config: ModelConfig) -> None:
    model = perturbed(tiny_config)
    data = clip(tiny_config, 1, 3)
    with torch.no_grad():
        prompt = model.prompt_kv(data["tokens"], torch.ones(1, 5, dtype=torch.bool))
        sdpa = model(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
        model.attention_kernel = "flex"
        flex = model(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
    assert (sdpa - flex).abs().max() < TOL


def test_training_mask_is_built_once_per_shape(tiny_config: ModelConfig) -> None:
    model = perturbed(tiny_config)
    data = clip(tiny_config, 1, 3)
    with torch.no_grad():
        prompt = model.prompt_kv(data["tokens"], torch.ones(1, 5, dtype=torch.bool))
        for _ in range(2):
            model(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
    assert len(model._masks) == 1


def test_bidirectional_mode_runs_and_differs_from_causal(tiny_config: ModelConfig) -> None:
    causal = perturbed(tiny_config)
    bi_config = tiny_config.replace(dit=DiTConfig(**{**tiny_config.dit.__dict__, "bidirectional": True}))
    bi = DiT(bi_config).eval()
    bi.load_state_dict(causal.state_dict())
    data = clip(tiny_config, 2, 4)
    with torch.no_grad():
        prompt = causal.prompt_kv(data["tokens"], torch.ones(2, 5, dtype=torch.bool))
        a = causal(data["noisy"], data["sigma"], data["keys"], prompt)
        b = bi(data["noisy"], data["sigma"], data["keys"], prompt)
    assert torch.isfinite(b).all() and b.shape == a.shape
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3  # the first frame only sees the future when bidirectional
    with pytest.raises(ValueError, match="bidirectional"):
        bi(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])


def test_null_conditions_are_defined_and_distinct(tiny_config: ModelConfig) -> None:
    model = perturbed(tiny_config)
    data = clip(tiny_config, 1, 2)
    none_held = torch.zeros_like(data["keys"])
    dropped = drop_keys(data["keys"], torch.ones(1, 2, dtype=torch.bool))
    assert (dropped == NULL_KEY).all()
    with torch.no_grad():
        null = model.null_prompt_kv(1)
        empty = model.prompt_kv(data["tokens"], torch.zeros(1, 5, dtype=torch.bool))
        outs = [
            model(data["noisy"], data["sigma"], k, p)
            for k, p in [(none_held, null), (dropped, null), (data["keys"], empty), (data["keys"], null)]
        ]
    assert all(torch.isfinite(o).all() for o in outs)
    assert (outs[0] - outs[1]).abs().max() > 1e-4  # dropped keys ≠ no key held
    assert (outs[2] - outs[3]).abs().max() < TOL  # an all-masked prompt is the null prompt


def test_zero_init_blocks_start_as_identity_on_keys(tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = DiT(tiny_config).eval()
    data = clip(tiny_config, 1, 2)
    with torch.no_grad():
        prompt = model.prompt_kv(data["tokens"], torch.ones(1, 5, dtype=torch.bool))
        out = model(data["noisy"], data["sigma"], data["keys"], prompt)
    assert out.abs().max() == 0  # adaLN-Zero + zero final layer: a fresh model predicts v = 0


def test_prompt_longer_than_the_limit_is_an_error(tiny_config: ModelConfig) -> None:
    model = DiT(tiny_config)
    limit = tiny_config.dit.max_prompt_tokens
    with pytest.raises(ValueError, match="at most"):
        model.prompt_kv(torch.zeros(1, limit + 1, 384), torch.ones(1, limit + 1, dtype=torch.bool))


def test_preset_sizes() -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        counts = {name: sum(p.numel() for p in DiT(cfg).parameters()) for name, cfg in PRESETS.items()}
    assert counts["tiny"] < 1_000_000
    assert 4_000_000 <= counts["default"] <= 12_000_000
    assert 1.3e9 < counts["wan"] < 2.0e9  # per-token cost of Wan-1.3B; adaLN adds 6·D² per layer
    assert preset("default").tokens_per_frame == 64
    assert preset("wan").tokens_per_frame == 1560
    with pytest.raises(ValueError):
        ModelConfig(dit=DiTConfig(dim=100, heads=4))
    assert ModelConfig(vae=VAEConfig()).latent_size == (16, 16)


def test_bf16_cached_attention_matches_sdpa() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 64, generator=g) for _ in range(3))
    allowed = torch.rand(2, 1, 16, 16, generator=g) > 0.3
    allowed[..., 0] = True
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias.bfloat16())
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.05


def test_bf16_cached_rollout_tracks_fp32(tiny_config: ModelConfig) -> None:
    model = perturbed(tiny_config)
    data = clip(tiny_config, batch=2, frames=6)
    with torch.no_grad():
        full = cached_rollout(model, tiny_config, data, fused=True)
        half = cached_rollout(model.to(torch.bfloat16), tiny_config, data, fused=True, dtype=torch.bfloat16)
    assert (half - full).abs().max() < 0.1 * full.abs().max()



def test_warp_moves_the_previous_frame_along_the_flow() -> None:
    """Zero flow is the identity; a whole-pixel flow is an exact shift (sampling at the neighbour's pixel
    centre), the border repeats where the flow points outside; half a pixel lands between the neighbours'
    3 × 3 range, and on a smooth ramp exactly halfway."""
    lat = torch.randn(2, 3, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    flow = torch.zeros(2, 3, 2, 6, 8)
    assert torch.allclose(warp(lat, flow), lat, atol=1e-6)
    flow[:, :, 0] = 1.0  # every pixel reads the pixel to its right
    moved = warp(lat, flow)
    assert torch.allclose(moved[..., :-1], lat[..., 1:], atol=1e-6)
    assert torch.allclose(moved[..., -1], lat[..., -1], atol=1e-6)  # border
    flow[:, :, 0], flow[:, :, 1] = 0.0, -0.5  # half a pixel up
    half = warp(lat, flow)
    pooled = torch.nn.functional.max_pool2d(lat.flatten(0, 1), 3, 1, 1).view_as(lat)
    assert (half[..., 1:, :] <= torch.maximum(pooled[..., 1:, :], pooled[..., :-1, :]) + 1e-6).all()
    ramp = torch.arange(6.0).view(1, 1, 1, 6, 1).expand(2, 3, 4, 6, 8)  # rows 0..5
    moved = warp(ramp, flow)
    assert torch.allclose(moved[..., 2:-1, :], ramp[..., 2:-1, :] - 0.5, atol=1e-5)


def test_a_widened_delta_dit_is_the_same_model_as_a_warp_dit(tiny_config: ModelConfig) -> None:
    """``widen_to_warp``: the delta DiT's weights with zero flow channels give the same velocities; once the
    flow channels carry weight the outputs differ; a DiT of another output width is refused."""
    delta_config = tiny_config.replace(dit=replace(tiny_config.dit, prediction="delta"))
    warp_config = tiny_config.replace(dit=replace(tiny_config.dit, prediction="warp"))
    delta = perturbed(delta_config)
    p = tiny_config.dit.patch_size
    warped = DiT(warp_config).eval()
    assert warped.final.linear.out_features == (tiny_config.latent_channels + FLOW_CHANNELS) * p * p
    warped.load_state_dict(widen_to_warp(delta.state_dict(), warp_config))
    data = clip(tiny_config, batch=2, frames=4)
    with torch.no_grad():
        prompt = delta.prompt_kv(data["tokens"], torch.ones(2, 5, dtype=torch.bool))
        a = delta(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
        b = warped(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
        assert (a - b).abs().max().item() < TOL
        warped.final.linear.bias[-1] = 0.7  # some flow
        c = warped(data["noisy"], data["sigma"], data["keys"], prompt, context=data["clean"])
    assert (a - c).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="delta DiT"):
        widen_to_warp(warped.state_dict(), warp_config)


def test_warp_needs_a_causal_dit() -> None:
    with pytest.raises(ValueError, match="causal"):
        DiTConfig(prediction="warp", bidirectional=True)
    with pytest.raises(ValueError, match="one of"):
        DiTConfig(prediction="flow")
