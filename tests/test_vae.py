"""The latent autoencoder: shapes per preset, uint8 conversions, the objective, a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worldloop.models.config import PRESETS, ModelConfig, VAEConfig, preset
from worldloop.models.vae import (
    LatentAutoencoder,
    Upsample,
    autoencoder_loss,
    reconstruction_loss,
    to_uint8,
    to_unit,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def synthetic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Coloured stripes and checkers (B, 3, size, size) in [-1, 1]: random colours, period and orientation."""
    coords = torch.arange(size, dtype=torch.float32)
    images = []
    for _ in range(n):
        period = int(torch.randint(4, 12, (1,), generator=generator))
        a, b = torch.rand(2, 3, 1, 1, generator=generator) * 2 - 1
        rows = ((coords[:, None] // period) % 2).expand(size, size)
        cols = ((coords[None, :] // period) % 2).expand(size, size)
        kind = int(torch.randint(0, 3, (1,), generator=generator))
        pattern = (rows, cols, (rows + cols) % 2)[kind]
        images.append(a * pattern + b * (1 - pattern))
    return torch.stack(images)


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_encode_decode_shapes(name: str) -> None:
    config = preset(name)
    model = LatentAutoencoder(config)
    x = torch.rand(2, 3, config.height, config.width) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, config.latent_channels, *config.latent_size)
    y = model.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1.0 and y.max() <= 1.0
    frames = model.decode_frames(z)
    assert frames.shape == (2, config.height, config.width, 3) and frames.dtype == torch.uint8
    assert model.encode_frames(frames.numpy()).shape == z.shape


@pytest.mark.parametrize("name", ["large", "wan"])
def test_large_presets_construct(name: str) -> None:
    config = preset(name)
    model = LatentAutoencoder(config)
    assert config.latent_size == (config.height // 8, config.width // 8)
    # Fully convolutional: a small latent checks the wiring without a full-size forward.
    assert model.decode(torch.zeros(1, config.latent_channels, 2, 3)).shape == (1, 3, 16, 24)


def test_decode_frames_matches_decode_in_float32_and_bfloat16() -> None:
    config = preset("tiny")
    torch.manual_seed(0)
    model = LatentAutoencoder(config).eval()
    model.latent_scale.fill_(2.5)
    z = torch.randn(3, config.latent_channels, *config.latent_size)
    with torch.no_grad():
        expected = to_uint8(model.decode(z))
    model.optimize_for_inference(dtype=None)
    assert torch.equal(model.decode_frames(z), expected)
    model.optimize_for_inference(dtype=torch.bfloat16)
    assert model.latent_scale.dtype == torch.float32
    diff = (model.decode_frames(z).int() - expected.int()).abs()
    assert diff.max() <= 3


def test_unit_uint8_round_trip_is_exact() -> None:
    levels = np.arange(256, dtype=np.uint8)
    frames = np.stack([levels.reshape(16, 16)] * 3, axis=-1)[None].repeat(2, axis=0)  # (2, 16, 16, 3)
    unit = to_unit(frames)
    assert unit.shape == (2, 3, 16, 16) and unit.dtype == torch.float32
    assert unit.min() == -1.0 and unit.max() == 1.0
    assert torch.equal(to_uint8(unit), torch.from_numpy(frames))
    assert torch.equal(to_uint8(to_unit(torch.from_numpy(frames))), torch.from_numpy(frames))
    # Out-of-range values clamp; half a level rounds up.
    edge = torch.tensor([-3.0, 3.0, 2 * 0.5 / 127.5 - 1.0]).view(1, 3, 1, 1)
    assert to_uint8(edge).flatten().tolist() == [0, 255, 1]


def test_conversions_reject_wrong_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_unit(np.zeros((1, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="B, H, W, 3"):
        to_unit(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_uint8(torch.zeros(1, 4, 4, 3))


def test_config_validates_stage_widths() -> None:
    with pytest.raises(ValueError, match="needs 3 positive widths"):
        VAEConfig(downsample=8, encoder_channels=(32, 64))
    with pytest.raises(ValueError, match="power of two"):
        VAEConfig(downsample=6)
    config = ModelConfig.from_dict(PRESETS["tiny"].to_dict())
    assert config.vae == PRESETS["tiny"].vae


def test_subpixel_upsampling_starts_as_nearest_neighbour() -> None:
    torch.manual_seed(0)
    up = Upsample(5, 4)
    y = up(torch.randn(2, 5, 6, 7))  # (2, 4, 12, 14)
    blocks = F.pixel_unshuffle(y, 2).view(2, 4, 4, 6, 7)  # the 4 sub-pixels of each output channel
    assert torch.allclose(blocks, blocks[:, :, :1].expand_as(blocks))


def test_reconstruction_loss_hand_computed() -> None:
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    recon = torch.zeros_like(target)
    loss, parts = reconstruction_loss(recon, target, edge_weight=0.5)
    # l1 = 1/4; width gradients of the target (-1, 0) and height gradients (-1, 0): edge = (1/2 + 1/2) / 2.
    assert parts["l1"].item() == pytest.approx(0.25)
    assert parts["edge"].item() == pytest.approx(0.5)
    assert parts["mse"].item() == pytest.approx(0.25)
    assert loss.item() == pytest.approx(0.25 + 0.5 * 0.5)


def test_autoencoder_loss_composition_and_noise() -> None:
    torch.manual_seed(0)
    model = LatentAutoencoder(preset("tiny"))
    x = synthetic_images(4, 32, torch.Generator().manual_seed(1))
    loss, parts = autoencoder_loss(model, x, noise_std=0.0, kl_weight=0.1, edge_weight=0.5)
    mu = model.encode_raw(x)
    expected, _ = reconstruction_loss(model.decode_raw(mu), x, edge_weight=0.5)
    assert parts["kl"].item() == pytest.approx(0.5 * mu.square().mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item() + 0.1 * parts["kl"].item(), rel=1e-5)
    noisy = [autoencoder_loss(model, x, noise_std=0.5, generator=torch.Generator().manual_seed(s))[0].item()
             for s in (3, 3, 4)]
    assert noisy[0] == noisy[1] != noisy[2]
    model.latent_scale.fill_(7.0)  # the objective works on raw latents and ignores the scale
    assert autoencoder_loss(model, x, noise_std=0.0, kl_weight=0.1)[0].item() == pytest.approx(loss.item())


def test_the_roundtrip_term_scores_a_second_encode_decode_and_trains_the_decoder_through_both() -> None:
    torch.manual_seed(0)
    model = LatentAutoencoder(preset("tiny"))
    x = synthetic_images(4, 32, torch.Generator().manual_seed(1))
    plain, parts = autoencoder_loss(model, x, noise_std=0.0, kl_weight=0.1)
    assert "roundtrip" not in parts
    loss, parts = autoencoder_loss(model, x, noise_std=0.0, kl_weight=0.1, roundtrip_weight=2.0)
    once = model.decode_raw(model.encode_raw(x))
    again, _ = reconstruction_loss(model.decode_raw(model.encode_raw(once)), x)
    assert parts["roundtrip"].item() == pytest.approx(again.item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 2.0 * again.item(), rel=1e-5)
    # The decoder's gradient differs from the plain loss's: the term reaches it through the second pass.
    grads = []
    for weight in (0.0, 2.0):
        model.zero_grad()
        autoencoder_loss(model, x, noise_std=0.0, roundtrip_weight=weight)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.decoder.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


def test_calibrated_scale_gives_unit_latents_and_keeps_reconstructions() -> None:
    torch.manual_seed(0)
    model = LatentAutoencoder(preset("tiny")).eval()
    x = synthetic_images(16, 32, torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.decode(model.encode(x))
        scale = model.calibrate_latent_scale(x, batch_size=5)
        z = model.encode(x)
        after = model.decode(z)
    assert model.latent_scale.item() == pytest.approx(scale)
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(before, after, atol=1e-5)


def test_tiny_autoencoder_learns_stripes_and_checkers() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = LatentAutoencoder(preset("tiny"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = synthetic_images(256, 32, generator)
    held_out = synthetic_images(32, 32, torch.Generator().manual_seed(99))

    def held_out_l1() -> float:
        with torch.no_grad():
            return (model.decode(model.encode(held_out)) - held_out).abs().mean().item()

    start = held_out_l1()
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (16,), generator=generator)]
        loss, _ = autoencoder_loss(model, batch, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_l1() < 0.5 * start
