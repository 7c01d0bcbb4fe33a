"""The latent autoencoder: RGB frames ↔ the latents the DiT generates.

Architecture (`LatentAutoencoder`), chosen for a decoder of a few milliseconds per frame on a 2-core CPU:

- Plain convolutions, ReLU, residual blocks, no normalisation layers (norms cost time on the CPU and buy
  little at this size). With n = log2(downsample) stages, ``encoder_channels`` and ``decoder_channels`` give
  one width per stage.
- Encoder: pixel-unshuffle by 2, then a stride-2 convolution per further stage, each followed by residual
  blocks; a 3×3 convolution to ``latent_channels``.
- Decoder: a 3×3 convolution from the latent, residual blocks, and per stage a sub-pixel upsampling
  (3×3 convolution to 4× the channels + pixel shuffle, ICNR-initialised so it starts as nearest-neighbour
  upsampling, free of checkerboards). The last stage maps straight to 3×2×2 values per pixel, so no
  convolution runs at full resolution.
- Measured by ``benchmarks/decoder_speed.py`` (2-core AMD EPYC with AVX-512 BF16, 2 threads, batch 1,
  16×16×8 latent → 128×128): the default decoder (widths 128-64-32, 0.77M parameters) takes 5.0–5.4 ms in
  float32 channels_last and 2.7–3.1 ms in bfloat16; the nearest-upsample + conv decoder of DESIGN §9
  (128-64-32-16) 7.2 / 3.7 ms; diffusers' AutoencoderTiny slimmed to 32 channels 10.4 / 5.9 ms, at TAESD
  size 47 / 25 ms. In a short training on textured maze-like frames, widths 96-64-32 and 128-64-32
  reconstructed equally well (23.4 / 23.3 dB after 700 steps); the default keeps the wider latent-resolution
  stage, where most of the decoding happens, since it still fits the budget.

Latent regulariser (for a latent space smooth enough for diffusion): a fixed-variance VAE. The encoder
predicts the posterior mean μ; training decodes μ + σ·ε with a fixed σ (``noise_std``) and adds
``0.5·mean(μ²)``, which is the KL divergence to N(0, I) of a posterior with fixed variance σ² up to a
constant. The decoder thus has to be insensitive to latent changes below σ and the encoder cannot escape the
noise by inflating its scale, while there is no learnt variance to collapse. With the defaults (σ = 0.1,
weight 1e-3) the raw latent std settles near 1, i.e. σ ≈ 0.1 in unit-variance latents, and decoding μ + σ·ε
instead of μ costs ~0.1 dB.

Scaling: ``encode`` returns ``raw · latent_scale`` and ``decode`` divides by it, so the DiT sees roughly unit
variance. ``latent_scale`` is a buffer (saved with the weights) set after training by
``calibrate_latent_scale`` from data; the training objective works on raw latents and ignores it.

Inference: ``decode_frames`` fuses clamp, scaling to [0, 255], rounding and the NHWC permute (free for a
channels_last output) under ``torch.inference_mode``; ``optimize_for_inference`` switches to channels_last
and, by default, bfloat16 (≈1.7× faster on CPUs with AVX-512 BF16).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worldloop.models.config import ModelConfig


def to_unit(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) → float32 (B, 3, H, W) in [-1, 1]."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (B, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] (clamped) → uint8 (B, H, W, 3), rounded to the nearest level."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    # (y + 1)·127.5 rounded = floor(y·127.5 + 128) after clamping to [0, 255]; done in float32 because
    # bfloat16 cannot hold every integer in [0, 255] plus a half.
    levels = images.float().mul(127.5).add_(128.0).clamp_(0.0, 255.0).to(torch.uint8)
    return levels.permute(0, 2, 3, 1)  # a view; contiguous when images were channels_last


class ResBlock(nn.Module):
    """x + conv(relu(conv(x))), both 3×3, no normalisation; starts as the identity (zero-initialised
    second convolution), which keeps a norm-free residual stack trainable at high learning rates."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class Upsample(nn.Module):
    """Sub-pixel ×2 upsampling: 3×3 conv to 4·out channels, then pixel shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1)
        self._icnr_init()

    def _icnr_init(self) -> None:
        # ICNR (Aitken et al. 2017): the 4 sub-pixels of an output channel share weights at init, i.e. the
        # layer starts as conv + nearest-neighbour upsampling. Pixel shuffle reads channel c·4 + k.
        weight = self.conv.weight.data
        base = torch.empty(weight.shape[0] // 4, *weight.shape[1:])
        nn.init.kaiming_uniform_(base, a=math.sqrt(5))
        weight.copy_(base.repeat_interleave(4, dim=0))
        bias = self.conv.bias.data
        bias.copy_(bias[::4].repeat_interleave(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)  # (B, 4C, h, w) → (B, C, 2h, 2w)


class Encoder(nn.Module):
    def __init__(self, channels: tuple[int, ...], latent_channels: int, blocks: int) -> None:
        super().__init__()
        # (B, 3, H, W) → (B, 12, H/2, W/2): the first stage costs no full-resolution convolution.
        layers: list[nn.Module] = [nn.PixelUnshuffle(2), nn.Conv2d(12, channels[0], 3, padding=1), nn.ReLU()]
        layers += [ResBlock(channels[0]) for _ in range(blocks)]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
            layers += [ResBlock(c_out) for _ in range(blocks)]
        layers.append(nn.Conv2d(channels[-1], latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, channels: tuple[int, ...], latent_channels: int, blocks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, channels[0], 3, padding=1), nn.ReLU()]
        layers += [ResBlock(channels[0]) for _ in range(blocks)]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=False):
            layers += [Upsample(c_in, c_out), nn.ReLU()]
            layers += [ResBlock(c_out) for _ in range(blocks)]
        layers.append(Upsample(channels[-1], 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class LatentAutoencoder(nn.Module):
    """RGB frames in [-1, 1] (B, 3, H, W) ↔ scaled latents (B, C, H/d, W/d); see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        vae = config.vae
        self.config = config
        self.encoder = Encoder(vae.encoder_channels, vae.latent_channels, vae.blocks_per_stage)
        self.decoder = Decoder(vae.decoder_channels, vae.latent_channels, vae.blocks_per_stage)
        self.register_buffer("latent_scale", torch.tensor(1.0))

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.layers[0].weight.dtype

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean μ, unscaled: (B, 3, H, W) → (B, C, h, w)."""
        return self.encoder(x)

    def decode_raw(self, z_raw: torch.Tensor) -> torch.Tensor:
        """Unscaled latent → unclamped image (B, 3, H, W)."""
        return self.decoder(z_raw)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images float (B, 3, H, W) in [-1, 1] → latents (B, C, h, w) of roughly unit variance."""
        return self.encode_raw(x) * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) clamped to [-1, 1]."""
        return self.decode_raw(z / self.latent_scale).clamp(-1.0, 1.0)

    @torch.inference_mode()
    def decode_frames(self, z: torch.Tensor,
                      finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) → uint8 frames (B, H, W, 3), for display and encoding; ``finish`` changes the
        decoded frames (float32 in [-1, 1]) before they are quantised.

        Runs in the module's dtype and channels_last; call ``optimize_for_inference`` once beforehand.
        """
        z = (z / self.latent_scale).to(self.dtype).contiguous(memory_format=torch.channels_last)
        images = self.decoder(z)
        return to_uint8(images if finish is None else finish(images.float())).contiguous()

    @torch.inference_mode()
    def encode_frames(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames (B, H, W, 3) → float32 latents (B, C, h, w)."""
        device = self.latent_scale.device
        x = to_unit(frames).to(device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.encode(x).float().contiguous()

    def optimize_for_inference(self, dtype: torch.dtype | None = torch.bfloat16) -> LatentAutoencoder:
        """Eval mode, channels_last weights and (unless ``dtype`` is None) the given dtype. Returns self.

        ``latent_scale`` stays float32 so the scaling is exact whatever the weights' dtype.
        """
        self.eval()
        self.to(memory_format=torch.channels_last)
        if dtype is not None:
            self.encoder.to(dtype)
            self.decoder.to(dtype)
        return self

    @torch.no_grad()
    def calibrate_latent_scale(self, images: torch.Tensor, batch_size: int = 64) -> float:
        """Set ``latent_scale`` to 1 / std of the raw latents of ``images`` (B, 3, H, W) in [-1, 1].

        Call after training, with a few hundred representative frames. Returns the new scale.
        """
        was_training = self.training
        self.eval()
        param = self.decoder.layers[0].weight
        latents = [self.encode_raw(chunk.to(param.device, param.dtype)).float()
                   for chunk in images.split(batch_size)]
        self.train(was_training)
        std = torch.cat(latents).std().item()
        if not math.isfinite(std) or std <= 0.0:
            raise ValueError(f"cannot calibrate latent_scale: latent std is {std}")
        self.latent_scale.fill_(1.0 / std)
        return 1.0 / std


# ----------------------------------------------------------------------------------------------------------
# Training objective (the loop lives in the `worldloop train vae` command)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along width and height: (B, C, H, W-1), (B, C, H-1, W)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def spectrum_distance(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |log(1 + |F(recon)|) − log(1 + |F(target)|)| over the 2-D spectra of each channel.

    Pixel losses under-weight high frequencies (a blur costs little L1 when textures are fine); comparing
    log amplitudes weights every frequency band alike, so missing texture energy is penalised directly.
    Phase is left to the pixel loss. Computed in float32 (no FFT in bfloat16).
    """
    fr = torch.fft.rfft2(recon.float(), norm="ortho").abs()
    ft = torch.fft.rfft2(target.float(), norm="ortho").abs()
    return (torch.log1p(fr) - torch.log1p(ft)).abs().mean()


def encoder_features(encoder: Encoder, x: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's activations at the end of each resolution stage (after its residual blocks), for images
    (B, 3, H, W) in [-1, 1]: features the autoencoder learnt on the world's own frames."""
    features, layers = [], list(encoder.layers)
    h = x
    for i, layer in enumerate(layers):
        h = layer(h)
        after = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, ResBlock) and not isinstance(after, ResBlock):
            features.append(h)
    return features


def local_gram(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Gram matrices of ``features`` (B, C, H, W) centred per tile, over each tile of a ``grid`` × ``grid``
    partition → (B, grid², C, C): each tile's feature covariance, the mean over its positions of the outer
    product (f − f̄)(f − f̄)ᵀ. Centring leaves the tile's mean colour to the pixel loss; what is left is how
    its features vary together. Rows and columns beyond a multiple of ``grid`` are left out."""
    b, c, h, w = features.shape
    th, tw = h // grid, w // grid
    if th < 1 or tw < 1:
        raise ValueError(f"a {grid}×{grid} grid does not fit features of {h}×{w}")
    f = features[:, :, : th * grid, : tw * grid].float().reshape(b, c, grid, th, grid, tw)
    f = f.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, th * tw)
    f = f - f.mean(-1, keepdim=True)
    return f @ f.transpose(-1, -2) / (th * tw)


def texture_distance(encoder: Encoder, recon: torch.Tensor, target: torch.Tensor, grid: int = 4
                     ) -> torch.Tensor:
    """How far ``recon``'s texture is from ``target``'s, tile by tile, whatever its exact placement.

    Both (B, 3, H, W) in [-1, 1] go through the (frozen) encoder; at each stage, the Gram matrices of its
    features over the tiles of a ``grid`` × ``grid`` partition (``local_gram``) are compared, L1, relative to
    the target's mean |Gram|. A Gram matrix keeps which features occur together in a tile and drops where,
    so this asks for the target's kind of texture in each part of the frame without its exact phase — which
    a regression target cannot ask for without blurring what it cannot place (the texture loss of
    Sajjadi et al. 2017, "EnhanceNet", on the world's own features instead of an image classifier's)."""
    with torch.no_grad():  # the target is a constant: no graph through its features
        targets = encoder_features(encoder, target)
    terms = []
    for f_recon, f_target in zip(encoder_features(encoder, recon), targets, strict=True):
        g_recon, g_target = local_gram(f_recon, grid), local_gram(f_target, grid)
        terms.append((g_recon - g_target).abs().mean() / g_target.abs().mean().clamp_min(1e-6))
    return torch.stack(terms).mean()


def reconstruction_loss(
    recon: torch.Tensor, target: torch.Tensor, edge_weight: float = 0.5, spectrum_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 on pixels + ``edge_weight`` × L1 on image gradients + ``spectrum_weight`` × ``spectrum_distance``.

    Returns (loss, parts) with parts ``l1``, ``edge``, ``spectrum`` and ``mse`` (for PSNR; not in the
    loss), all detached.
    """
    l1 = (recon - target).abs().mean()
    (rx, ry), (tx, ty) = image_gradients(recon), image_gradients(target)
    edge = 0.5 * ((rx - tx).abs().mean() + (ry - ty).abs().mean())
    loss = l1 + edge_weight * edge
    spectrum = torch.zeros((), device=recon.device)
    if spectrum_weight > 0.0:
        spectrum = spectrum_distance(recon, target)
        loss = loss + spectrum_weight * spectrum
    mse = (recon.detach() - target).square().mean()
    return loss, {"l1": l1.detach(), "edge": edge.detach(), "spectrum": spectrum.detach(), "mse": mse}


def autoencoder_loss(
    model: LatentAutoencoder,
    images: torch.Tensor,
    *,
    noise_std: float = 0.1,
    kl_weight: float = 1e-3,
    edge_weight: float = 0.5,
    spectrum_weight: float = 0.0,
    generator: torch.Generator | None = None,
    roundtrip_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The autoencoder's training loss on images (B, 3, H, W) in [-1, 1]; a fixed-variance VAE.

    1. μ = encode_raw(x); z = μ + noise_std·ε.
    2. loss = reconstruction_loss(decode_raw(z), x) + kl_weight · 0.5·mean(μ²).
    3. With ``roundtrip_weight`` > 0, + that × reconstruction_loss(decode_raw(encode_raw(recon)), x): the
       reconstruction encoded and decoded again must still be the image. A decoder that adds detail the
       encoder then reads as content feeds back on itself over repeated round trips (what a reprojecting
       model does every frame: decode, move, encode); this term holds it to a fixed point.
    Returns (loss, parts) with parts ``l1``, ``edge``, ``spectrum``, ``mse``, ``kl`` and ``latent_std``
    (detached; ``roundtrip`` with the third term), and ``recon`` (the reconstruction, with gradients, for an
    adversarial term).
    """
    mu = model.encode_raw(images)
    z = mu
    if noise_std > 0.0:
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + noise_std * noise
    recon = model.decode_raw(z)
    recon_loss, parts = reconstruction_loss(recon, images, edge_weight, spectrum_weight)
    kl = 0.5 * mu.square().mean()
    parts["kl"] = kl.detach()
    parts["latent_std"] = mu.detach().std()
    parts["recon"] = recon
    loss = recon_loss + kl_weight * kl
    if roundtrip_weight > 0.0:
        again, _ = reconstruction_loss(model.decode_raw(model.encode_raw(recon)), images, edge_weight,
                                       spectrum_weight)
        parts["roundtrip"] = again.detach()
        loss = loss + roundtrip_weight * again
    return loss, parts


class PatchDiscriminator(nn.Module):
    """A small convolutional critic that scores overlapping patches of an image as engine-like or not.

    Images (B, 3, H, W) in [-1, 1] → logits (B, 1, H/8, W/8): three stride-2 4×4 convolutions with
    LeakyReLU(0.2), then a 3×3 convolution to one logit per ~30-pixel receptive field. Spectral norm on every
    layer keeps it Lipschitz so short CPU runs do not diverge. Used only in training (never shipped): the
    adversarial term makes the decoder draw texture energy that L1 averages away (Isola et al. 2017;
    Esser et al. 2021 for autoencoders).
    """

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        c = channels
        self.layers = nn.Sequential(
            sn(nn.Conv2d(3, c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(c, 2 * c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * c, 4 * c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(4 * c, 1, 3, padding=1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: mean(relu(1 − D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss under a hinge critic: −mean(D(fake))."""
    return -fake_logits.mean()
