"""The causal frame-wise diffusion transformer (DiT) of worldloop.

Architectural choices, in the order the code below follows them:

1. Tokens. Each frame's latent (C, h, w) is cut into p×p patches → N = (h/p)·(w/p) tokens of width D. All
   frames of a clip form one sequence of F·N tokens; inference feeds only the new frames and reads the rest
   from a cache.
2. Per-frame conditioning, adaLN-Zero (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023):
   c_f = MLP(sinusoid(1000·σ_f)) + E(keys_f). Each block maps SiLU(c_f) to shift/scale/gate for its attention
   and MLP, zero-initialised so every block starts as the identity. E is zero-initialised too. A frame whose
   keys are dropped (condition dropout; marked by keys = ``NULL_KEY`` = -1) gets a learned null vector
   instead.
3. Self-attention with QK-RMSNorm and rotary positions (RoPE, Su et al. 2021). The head's rotary pairs are
   split into temporal | y | x sections, all applied when q/k are projected, at the frame's absolute index:
   the cache stores k with its phase and nothing is rotated again when it is read. A rotation depends only on
   the difference of q's and k's positions, so absolute and window-relative positions give the same scores;
   the angles are reduced modulo 2π in float64 (``Rotary.tables``), exact to well under a microradian for
   any stream shorter than years, so positions stay valid in a stream of any length. The k of sink frames
   carry no temporal phase at all (their temporal pairs are zeroed): their distance to a query grows without
   bound in a stream, and this way attention to them is position-free, the same in training and inference.
4. Cross-attention to prompt tokens (MiniLM, ``text_dim`` wide) after self-attention. A learned null token is
   always present, so a dropped or empty prompt (all tokens masked) is well defined. A prompt's K/V for every
   layer are computed once (``prompt_kv``) and reused for every frame.
5. Attention masks, one rule for training and inference (``frame_mask``): a context (clean) frame attends to
   context frames at or before it; a noisy frame attends to context frames strictly before it and to
   itself; an attended frame more than ``window`` frames back is invisible unless it is a sink frame. Teacher
   forcing runs the sequence [clean frames | noisy frames] (same positions for both halves) under this rule,
   so it computes exactly what the cached rollout computes. ``bidirectional`` configs (a distillation teacher)
   use full attention inside a clip. Training masks are built once per shape: SDPA with a boolean mask on CPU,
   flex-attention block masks on CUDA.
6. Final layer: adaLN + a zero-initialised linear map back to patches. It outputs the velocity v = ε - x0, or
   with ``prediction = "x0"`` the clean frame, which ``velocity`` turns into v = (x_σ - x0)/σ: callers always
   get v. ``"delta"`` outputs x0 minus the previous frame's latent; ``"warp"`` also outputs a flow field (2
   channels, latent pixels) and x0 is the previous latent resampled along it (``warp``, clamped bicubic)
   plus the rest of the output: texture that moves with the camera is carried over instead of redrawn.
7. Inference (``forward_cached``) runs only new frames against a ``KVCache`` view, with a small additive mask
   from the same rule. One forward can carry the previous frame (clean; its K/V are returned for the cache)
   and the new noisy frame: the cache pass fused into the next frame's forward. The last layer computes
   outputs for the noisy frame only — the clean frame's K/V there are all the cache needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldloop.models.camera import Reprojector, flow_grid
from worldloop.models.config import ModelConfig
from worldloop.models.kv_cache import CacheView, PromptKV

NULL_KEY = -1.0  # fill value of a dropped key condition (condition dropout / guidance)


def drop_keys(keys: Tensor, drop: Tensor) -> Tensor:
    """Mark the keys of the frames where ``drop`` (bool, keys.shape[:-1]) is True as dropped."""
    return torch.where(drop.unsqueeze(-1), torch.full_like(keys, NULL_KEY), keys)


# ----------------------------------------------------------------------------------------------------------
# Helpers: patches, sinusoids, rotary tables, the attention mask rule


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, F, C, h, w) → (B, F·N, C·p·p)."""
    b, f, c, h, w = x.shape
    x = x.reshape(b, f, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)  # (B, F, h/p, w/p, C, p, p)
    return x.reshape(b, f * (h // p) * (w // p), c * p * p)


def unpatchify(x: Tensor, p: int, c: int, h: int, w: int) -> Tensor:
    """(B, F·N, C·p·p) → (B, F, C, h, w)."""
    b = x.shape[0]
    x = x.reshape(b, -1, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)  # (B, F, C, h/p, p, w/p, p)
    return x.reshape(b, -1, c, h, w)


AUX_MOTION = 3  # camera motion the auxiliary head predicts per frame: forward, strafe, turn
MIN_SIGMA = 1e-4  # x0 prediction → velocity divides by σ; training and sampling never go below this


FLOW_CHANNELS = 2  # a "warp" DiT's flow field per latent pixel: (dx, dy) in latent pixels


def warp(latent: Tensor, flow: Tensor) -> Tensor:
    """``latent`` (B, F, C, h, w) resampled at each pixel + ``flow`` (B, F, 2, h, w: dx, dy in latent pixels);
    positions outside repeat the border. Zero or whole-pixel flow moves pixels exactly (to float rounding).

    Bicubic, clamped to the range of the 3 × 3 neighbourhood around the sampled point: an f4 latent keeps
    much of a frame's detail near its Nyquist frequency, which bilinear sampling halves at every fractional
    shift (on engine latents moved by the fitted key flow for 16 frames, the decoded sharpness fell to 0.1 of
    the engine's); bicubic keeps more (0.4) and the clamp stops its overshoot from growing frame by frame.
    """
    b, f, c, h, w = latent.shape
    grid = flow_grid(flow.flatten(0, 1))  # (B·F, h, w, 2)
    z = latent.flatten(0, 1).to(flow.dtype)

    def sample(t: Tensor, mode: str) -> Tensor:
        return F.grid_sample(t, grid, mode=mode, padding_mode="border", align_corners=False)

    low = sample(-F.max_pool2d(-z, 3, 1, 1), "bilinear")
    high = sample(F.max_pool2d(z, 3, 1, 1), "bilinear")
    out = torch.maximum(torch.minimum(sample(z, "bicubic"), high), low)
    return out.view(b, f, c, h, w)


def key_flow_of(keys: Tensor, fields: Tensor) -> Tensor:
    """The flow prior of held keys (…, num_keys; dropped keys, ``NULL_KEY``, hold none): the sum of the held
    keys' fields (num_keys, 2, h, w) → (…, 2, h, w)."""
    return torch.einsum("...k,kchw->...chw", keys.clamp(min=0).float(), fields.float())


def velocity(out: Tensor, x: Tensor, sigma: Tensor, prediction: str, previous: Tensor | None = None
             ) -> Tensor:
    """The network's output (B, F, C', h, w) as a velocity: itself for ``"v"``; (x_σ − x0)/σ with x0 the
    output (``"x0"``), ``previous`` (B, F, C, h, w: each frame's previous frame) plus the output
    (``"delta"``), or ``previous`` warped along the output's last two channels plus its first C (``"warp"``).
    """
    if prediction == "v":
        return out
    if prediction in ("delta", "warp"):
        if previous is None:
            raise ValueError(f"a {prediction}-predicting DiT needs the previous frames")
        base = previous.float()
        if prediction == "warp":
            c = out.shape[2] - FLOW_CHANNELS
            out, base = out[:, :, :c], warp(base, out[:, :, c:])
        out = out + base
    s = sigma.float().clamp_min(MIN_SIGMA).reshape(*sigma.shape, 1, 1, 1)
    return (x.float() - out) / s


def widen_to_warp(tensors: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """A "delta" DiT's weights as a "warp" DiT's: the final layer gains zero-initialised flow channels and the
    key flow prior is zero, so the warp DiT computes what the delta DiT did until its flow is fitted or
    trained."""
    out = dict(tensors)
    latent_channels, patch = config.latent_channels, config.dit.patch_size
    extra = FLOW_CHANNELS * patch * patch
    for name in ("final.linear.weight", "final.linear.bias"):
        t = tensors[name]
        if t.shape[0] != latent_channels * patch * patch:
            raise ValueError(f"{name} has {t.shape[0]} outputs; a delta DiT's has "
                             f"{latent_channels * patch ** 2}")
        out[name] = torch.cat([t, t.new_zeros(extra, *t.shape[1:])])
    like = tensors["final.linear.weight"]
    out["key_flow"] = like.new_zeros(config.dit.num_keys, FLOW_CHANNELS, *config.latent_size)
    out["base_in.weight"] = like.new_zeros(config.dit.dim, latent_channels * patch * patch)
    out["base_in.bias"] = like.new_zeros(config.dit.dim)
    return out


def sinusoid(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(…) → (…, dim) cos/sin features of t at geometrically spaced frequencies (DDPM timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float().unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Rotary(nn.Module):
    """RoPE tables. Pair i of a head rotates dims (i, i + Dh/2); pairs are [temporal | y | x | unrotated].

    Tables are full head width (…, L, Dh), so one ``rotate`` applies every section; sink k get cos 0 / sin 0
    on the temporal pairs.
    """

    def __init__(self, head_dim: int, grid: tuple[int, int], theta: float) -> None:
        super().__init__()
        pairs = head_dim // 2
        self.n_t = pairs // 4
        n_s = (pairs - self.n_t) // 2
        self.n_pass = pairs - self.n_t - 2 * n_s
        gh, gw = grid
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        freqs = _freqs(n_s, theta)
        spatial = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], -1)
        self.register_buffer("spatial_angles", spatial, persistent=False)  # (N, 2·n_s)
        self.register_buffer("temporal_freqs", _freqs(self.n_t, theta), persistent=False)  # (n_t,)

    def tables(self, frames: Tensor, sink: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Frame positions (B, F) (and sink flags (B, F)) → cos, [-sin | sin] of shape (B, 1, F·N, Dh)."""
        b, f = frames.shape
        n = self.spatial_angles.shape[0]
        # float64 and reduced mod 2π: frame indices grow without bound in a stream (see the module doc).
        t = (frames.double().unsqueeze(-1) * self.temporal_freqs.double()).remainder(2 * math.pi).float()
        t = t.unsqueeze(2).expand(b, f, n, self.n_t)  # (B, F, N, n_t)
        s = self.spatial_angles.expand(b, f, n, self.spatial_angles.shape[-1])
        angles = torch.cat([t, s, t.new_zeros(b, f, n, self.n_pass)], -1).reshape(b, 1, f * n, -1)
        cos, sin = angles.cos(), angles.sin()
        if sink is not None:
            keep = (~sink).float().repeat_interleave(n, dim=1).reshape(b, 1, f * n, 1)
            gate = torch.cat([keep.expand(-1, -1, -1, self.n_t), torch.ones_like(cos[..., self.n_t:])], -1)
            cos, sin = cos * gate, sin * gate
        return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)

    def qk_tables(self, frames: Tensor, sink: int) -> tuple[Tensor, Tensor]:
        """Frame positions (B, G) → cos and [-sin | sin], each (2, B, 1, G·N, Dh): q's, then k's (frames
        before ``sink`` are sink frames: their k's temporal pairs are zeroed)."""
        tables = zip(self.tables(frames), self.tables(frames, frames < sink), strict=True)
        cos, sin = (torch.stack(t) for t in tables)
        return cos, sin


def _freqs(n: int, theta: float) -> Tensor:
    return theta ** (-torch.arange(n, dtype=torch.float32) / max(n, 1))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply a rotary table: x·cos + rotate_half(x)·sin = x·cos + roll(x, Dh/2)·[-sin | sin].

    ``sin`` comes from ``Rotary.tables`` with its first half negated already; tables broadcast against x.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def frame_mask(q_pos: Tensor, q_ctx: Tensor, k_pos: Tensor, k_ctx: Tensor, k_sink: Tensor, window: int
               ) -> Tensor:
    """The attention rule between frames, shared by training and inference.

    Positions and flags are (…, Fq) for the query frames and (…, Fk) for the attended (k/v) frames; returns
    (…, Fq, Fk) bool. A context
    frame attends to context frames at or before it; a noisy frame to context frames before it and to itself
    (the noisy frame at its own position); frames more than ``window`` back are visible only if they are sink
    frames.
    """
    d = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)
    qc, kc = q_ctx.unsqueeze(-1), k_ctx.unsqueeze(-2)
    earlier_context = kc & ((d > 0) | ((d == 0) & qc))
    itself = ~kc & ~qc & (d == 0)
    return (earlier_context | itself) & (k_sink.unsqueeze(-2) | (d <= window))


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q·kᵀ·scale + bias)·v, ``scale`` 1/√d by default; ``bias`` (B, 1, Lq, Lk) (or broadcastable)
    is 0 or -inf.

    On a CPU in bfloat16, explicit matmuls ran 1.7× faster than SDPA's CPU kernel at our sizes (128 queries,
    ~700 keys, 64-d heads, 2-core AVX512-BF16; benchmarks/model_speed.py); elsewhere SDPA picks a fused
    kernel.
    """
    if torch.onnx.is_in_onnx_export():
        # Explicit products: ONNX Runtime fuses q·kᵀ, transpose included, into one kernel; it does not fuse
        # the exporter's decomposition of SDPA (reshapes around the transpose). Scale 1: folded into q.
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(q if scale == 1.0 else q * scale, k.transpose(-1, -2)) + bias
        return torch.matmul(scores.softmax(dim=-1), v)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        b, h, lq, d = q.shape
        lk = k.shape[2]
        scores = torch.baddbmm(bias.expand(b, h, lq, lk).reshape(b * h, lq, lk), q.reshape(b * h, lq, d),
                               k.reshape(b * h, lk, d).transpose(1, 2),
                               alpha=d**-0.5 if scale is None else scale)  # (B·H, Lq, Lk)
        return torch.bmm(scores.softmax(dim=-1), v.reshape(b * h, lk, d)).view(b, h, lq, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask → 0 where allowed, -inf elsewhere (for attention scores)."""
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill_(~allowed, float("-inf"))


def expand_mask(mask: Tensor, n: int) -> Tensor:
    """Frame mask (B, Fq, Fk) → token mask (B, 1, Fq·N, Fk·N)."""
    b, fq, fk = mask.shape
    return mask[:, :, None, :, None].expand(b, fq, n, fk, n).reshape(b, 1, fq * n, fk * n)


# ----------------------------------------------------------------------------------------------------------
# Blocks

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, k, v) (B, H, L, Dh) → (B, H, Lq, Dh)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, n: int) -> Tensor:
    """x (B, F·N, D) with per-frame shift and (1 + scale), each (B, F, 1, D) → x·(1 + scale) + shift."""
    b, length, d = x.shape
    return torch.addcmul(shift, x.view(b, length // n, n, d), scale).view(b, length, d)


def add_gated(x: Tensor, y: Tensor, gate: Tensor, n: int) -> Tensor:
    """x + gate·y with a per-frame gate (B, F, 1, D); x, y (B, F·N, D)."""
    b, length, d = x.shape
    return torch.addcmul(x.view(b, length // n, n, d), y.view(b, length // n, n, d), gate).view(b, length, d)


class Block(nn.Module):
    """adaLN-Zero self-attention → cross-attention to the prompt → adaLN-Zero MLP.

    Written for few kernel launches: at our sizes a CPU forward is ~20% per-op overhead, so q and k are
    normalised and rotated as one stacked tensor and modulation/gating use fused multiply-adds.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk_norm = nn.Parameter(torch.ones(2, 1, 1, 1, self.head_dim))  # QK-RMSNorm gains for q and k
        self.proj = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.cross_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        # Exact (erf) GELU: on our CPUs 3.5× faster than the tanh approximation.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)  # per-frame shift/scale/gate ×2 (adaLN-Zero)
        # Attention's q·kᵀ scale; None: 1/√Dh. The ONNX export folds 1/√Dh into q's gains
        # (``DiT.fold_attention_scale``) and sets 1.0: two fewer multiplies per attention in the graph.
        self.attention_scale: float | None = None

    def heads_of(self, x: Tensor) -> Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)

    def self_qkv(self, x: Tensor, mod: Tensor, rope: tuple[Tensor, Tensor], n: int) -> tuple[Tensor, Tensor]:
        """Modulated, projected, QK-normalised and rotated qk (2, B, H, L, Dh) and v (B, H, L, Dh)."""
        b, length, _ = x.shape
        h = modulate(self.norm1(x), mod[0], mod[1], n)
        qkv = self.qkv(h).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk = F.rms_norm(qkv[:2], (self.head_dim,), eps=1e-6) * self.qk_norm
        return rotate(qk, *rope), qkv[2]

    def finish(self, x: Tensor, attn: Tensor, mod: Tensor, prompt: tuple[Tensor, Tensor, Tensor], n: int
               ) -> Tensor:
        """Residual self-attention output, cross-attention to the prompt (K/V, additive mask), the MLP."""
        b, _, length, _ = attn.shape
        x = add_gated(x, self.proj(attn.transpose(1, 2).reshape(b, length, -1)), mod[2], n)
        q = self.heads_of(self.cross_q(self.norm_cross(x)))
        c = attention(q, *prompt, scale=self.attention_scale)
        x = x + self.cross_proj(c.transpose(1, 2).reshape(b, length, -1))
        h = modulate(self.norm2(x), mod[3], mod[4], n)
        return add_gated(x, self.mlp(h), mod[5], n)

    def forward(self, x: Tensor, mod: Tensor, prompt: tuple[Tensor, Tensor, Tensor],
                rope: tuple[Tensor, Tensor], attend: AttentionFn, n: int) -> Tensor:
        """Full-sequence block; ``rope``: stacked q/k tables (2, B, 1, L, Dh), spatial and temporal phase."""
        qk, v = self.self_qkv(x, mod, rope, n)
        return self.finish(x, attend(qk[0], qk[1], v), mod, prompt, n)

    def forward_cached(self, x: Tensor, mod: Tensor, prompt: tuple[Tensor, Tensor, Tensor],
                       past: tuple[list[Tensor], list[Tensor]], rope: tuple[Tensor, Tensor], bias: Tensor,
                       n: int, first_query: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Inference block over new frames. ``rope``: the new frames' stacked q and k tables
        (``DiT.rope_tables``); the cached k carry theirs already. Only tokens from ``first_query`` on (whole
        frames) produce outputs: the last layer needs none for context frames.

        Returns the hidden states of those tokens and the new frames' k (with their rotary phase) and v.
        """
        qk, v = self.self_qkv(x, mod, rope, n)
        k = qk[1]
        k_all = torch.cat([*past[0], k], dim=2)
        v_all = torch.cat([*past[1], v], dim=2)
        q, rows = qk[0][:, :, first_query:], slice(first_query, None)
        if q.shape[2] == 0:
            return x[:, rows], k, v
        out = attention(q, k_all, v_all, bias[:, :, rows], self.attention_scale)
        return self.finish(x[:, rows], out, mod[:, :, first_query // n :], prompt, n), k, v


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out)

    def forward(self, x: Tensor, cond: Tensor, n: int) -> Tensor:
        shift, scale = self.modulation(F.silu(cond)).unsqueeze(2).chunk(2, dim=-1)  # (B, F, 1, D) each
        return self.linear(modulate(self.norm(x), shift, 1 + scale, n))


# ----------------------------------------------------------------------------------------------------------
# The model


@dataclass
class Aux:
    """Auxiliary predictions per noisy frame: log depth per token column (B, F, w/p), motion (B, F, 3)."""

    depth: Tensor
    motion: Tensor


@dataclass
class CachedOutput:
    """Result of ``DiT.forward_cached``: v for the noisy frames (B, Fn, C, h, w) and, for the context frames,
    the per-layer K/V to write into the cache, (depth, B, H, Fc·N, Dh) each (None when there are no context
    frames)."""

    v: Tensor | None
    k: Tensor | None
    v_cache: Tensor | None


class DiT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        cfg = self.cfg = config.dit
        self.latent_channels = config.latent_channels
        # Output channels per latent pixel: a "warp" DiT also outputs its flow field.
        self.out_channels = self.latent_channels + (FLOW_CHANNELS if cfg.prediction == "warp" else 0)
        self.latent_size = config.latent_size
        self.tokens = config.tokens_per_frame
        p = cfg.patch_size
        self.patch_in = nn.Linear(self.latent_channels * p * p, cfg.dim)
        self.sigma_mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.key_embed = nn.Linear(cfg.num_keys, cfg.dim, bias=False)
        self.null_key = nn.Parameter(torch.zeros(cfg.dim))
        # MiniLM token norms differ (sentence vector 1, hidden states ~10): normalise before projecting.
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.null_token = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, self.out_channels * p * p)
        # A warp DiT's flow prior per key (num_keys, 2, h, w): the held keys' fields are summed and added to
        # the flow the last layer outputs. A key moves the camera the same way everywhere in the world, so
        # these fields, fitted on engine frames by the training side, already carry most texture to where the
        # next frame shows it; the network corrects them per pixel (depth, occlusion).
        self.key_flow = nn.Parameter(torch.zeros(cfg.num_keys, FLOW_CHANNELS, *self.latent_size)) \
            if cfg.prediction == "warp" else None
        # ... and it sees the previous frame moved by that prior as a second input of each noisy frame's
        # tokens (zero-initialised): the network corrects and re-sharpens the moved texture where it is,
        # instead of recovering it through attention from the previous frame's tokens.
        # A reprojecting delta DiT sees its moved previous frame the same way (``models.camera``).
        moves = cfg.prediction == "warp" or config.camera.reproject
        self.base_in = nn.Linear(self.latent_channels * p * p, cfg.dim) if moves else None
        grid = (self.latent_size[0] // p, self.latent_size[1] // p)
        # Training-only auxiliary heads (``aux_heads``): per token, log depth and camera motion (3), read out
        # as per-column depth and per-frame motion; inference never runs them.
        self.aux = nn.Linear(cfg.dim, 1 + AUX_MOTION) if cfg.aux_heads else None
        # A reprojecting model's depth network (``models.camera``): the world model moves each noisy frame's
        # previous frame by the held keys' camera motion at its depth before the DiT sees it; the DiT's
        # own forward never runs it (it needs the autoencoder).
        self.reprojector = Reprojector(config.camera, self.latent_channels, self.latent_size,
                                       (config.height, config.width)) if config.camera.reproject else None
        self.rotary = Rotary(cfg.head_dim, grid, cfg.rope_theta)
        # Training attention kernel: None = flex-attention block masks on CUDA, SDPA + boolean mask elsewhere.
        self.attention_kernel: str | None = None
        self._masks: dict[tuple, object] = {}  # training masks per (frames, context, device, kind)
        self._flex: Callable | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.sigma_mlp[0].weight, std=0.02)
        nn.init.normal_(self.sigma_mlp[2].weight, std=0.02)
        zero = [self.key_embed, self.final.modulation, self.final.linear]
        zero += [self.base_in] if self.base_in is not None else []
        zero += [m for b in self.blocks for m in (b.modulation, b.cross_proj)]
        for m in zero:
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- conditioning --------------------------------------------------------------------------------------

    def condition(self, sigma: Tensor, keys: Tensor) -> Tensor:
        """Per-frame conditioning vector c (B, F, D) from σ (B, F) and multi-hot keys (B, F, num_keys)."""
        dtype = self.patch_in.weight.dtype
        c = self.sigma_mlp(sinusoid(sigma * 1000.0, self.cfg.dim).to(dtype))
        dropped = keys[..., :1] < 0  # frames marked with NULL_KEY
        c = c + self.key_embed(keys.clamp(min=0).to(dtype))
        return c + dropped.to(dtype) * self.null_key

    def key_prior(self, keys: Tensor) -> Tensor | None:
        """A warp DiT's flow prior (B, F, 2, h, w) for the noisy frames' keys (B, F, num_keys), else None.
        Computed once per forward: the noisy tokens' second input and the output's flow both use it."""
        return None if self.key_flow is None else key_flow_of(keys, self.key_flow)

    def with_moved_previous(self, h: Tensor, previous: Tensor | None, prior: Tensor | None) -> Tensor:
        """The tokens (B, G·N, D) whose last F frames are noisy, with each noisy frame's moved previous frame
        (B, F, C, h, w) added as input: a warp DiT moves it by its key flow ``prior`` here, a reprojecting
        one is given it moved (``models.camera``); other DiTs have no ``base_in`` and are unchanged."""
        if self.base_in is None or previous is None:
            return h
        if prior is not None:  # a warp DiT moves it here; a reprojecting one was given it moved
            previous = warp(previous.float(), prior)
        moved = self.base_in(patchify(previous.to(h.dtype), self.cfg.patch_size))
        start = h.shape[1] - moved.shape[1]
        return torch.cat([h[:, :start], h[:, start:] + moved], 1)

    def add_key_flow(self, out: Tensor, prior: Tensor | None) -> Tensor:
        """A warp DiT's output (B, F, C + 2, h, w) with its key flow ``prior`` added to the flow channels."""
        if prior is None:
            return out
        c = self.latent_channels
        return torch.cat([out[:, :, :c], out[:, :, c:] + prior], 2)

    def modulations(self, cond: Tensor) -> list[Tensor]:
        """Per block: (6, B, F, 1, D) shift, 1 + scale, gate for attention, then for the MLP."""
        h = F.silu(cond)
        one = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=cond.dtype, device=cond.device).view(6, 1)
        return [(blk.modulation(h).unflatten(-1, (6, -1)) + one).movedim(-2, 0).unsqueeze(3)
                for blk in self.blocks]


    def prompt_kv(self, tokens: Tensor, mask: Tensor) -> PromptKV:
        """Prompt token embeddings (B, T, text_dim) and mask (B, T) → cross-attention K/V for every layer."""
        b, t, _ = tokens.shape
        limit = self.cfg.max_prompt_tokens
        if t > limit:
            raise ValueError(f"prompt has {t} tokens, the model takes at most {limit}")
        dtype = self.text_proj.weight.dtype
        h = self.text_proj(self.text_norm(F.pad(tokens.to(dtype), (0, 0, 0, limit - t))))
        h = torch.cat([self.null_token.to(dtype).expand(b, 1, -1), h], dim=1)  # (B, T+1, D)
        full_mask = torch.zeros(b, limit + 1, dtype=torch.bool, device=tokens.device)
        full_mask[:, 0] = True
        full_mask[:, 1 : t + 1] = mask.bool()
        kv = [blk.heads_of(x) for blk in self.blocks for x in blk.cross_kv(h).chunk(2, dim=-1)]
        return PromptKV(torch.stack(kv[0::2]), torch.stack(kv[1::2]), full_mask)

    def null_prompt_kv(self, batch: int = 1) -> PromptKV:
        """The dropped-prompt condition: only the learned null token is visible."""
        tokens = self.text_proj.weight.new_zeros(batch, 1, self.cfg.text_dim)
        return self.prompt_kv(tokens, torch.zeros(batch, 1, dtype=torch.bool, device=tokens.device))

    # -- training / full-clip forward ----------------------------------------------------------------------

    def forward(self, x: Tensor, sigma: Tensor, keys: Tensor, prompt: PromptKV, context: Tensor | None = None,
                context_sigma: Tensor | None = None, return_aux: bool = False, previous: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Aux]:
        """Velocity prediction for a clip of noisy frames x (B, F, C, h, w) at per-frame σ (B, F).

        Teacher forcing: ``context`` holds the clean frames (B, F, C, h, w) (at ``context_sigma``, default 0);
        the sequence is [context | x] with the causal window+sink mask. Without context a causal model attends
        block-causally among the given frames (diffusion forcing); a bidirectional model attends fully.
        ``return_aux`` (a DiT with ``aux_heads``) also returns the auxiliary predictions of the noisy frames.
        ``previous`` (B, F, C, h, w): what each noisy frame builds on, instead of the context frame before it
        (a reprojecting model's moved previous frames, ``models.camera``).
        """
        if any(blk.attention_scale is not None for blk in self.blocks):
            raise ValueError("this DiT's attention scale is folded into q (fold_attention_scale): cached "
                             "inference only")
        b, f = x.shape[:2]
        n = self.tokens
        noisy_x, noisy_sigma, noisy_keys = x, sigma, keys
        if self.cfg.reads_previous:  # frame i builds on context frame i − 1 (nothing before frame 0)
            if context is None:
                raise ValueError(f"a {self.cfg.prediction}-predicting DiT needs context frames "
                                 "(teacher forcing)")
            if previous is None:
                previous = torch.cat([torch.zeros_like(context[:, :1]), context[:, :-1]], 1)
        else:
            previous = None
        if context is not None:
            if self.cfg.bidirectional:
                raise ValueError("a bidirectional DiT takes no clean context frames")
            if context_sigma is None:
                context_sigma = torch.zeros_like(sigma)
            x, keys = torch.cat([context, x], 1), torch.cat([keys, keys], 1)
            sigma = torch.cat([context_sigma, sigma], 1)
        g = x.shape[1]  # frames in the sequence
        h = self.patch_in(patchify(x.to(self.patch_in.weight.dtype), self.cfg.patch_size))  # (B, G·N, D)
        prior = self.key_prior(noisy_keys)
        h = self.with_moved_previous(h, previous, prior)
        cond = self.condition(sigma, keys)  # (B, G, D)
        pos = torch.arange(f, device=x.device).repeat(g // f).expand(b, g)
        rope = tuple(t.to(h.dtype) for t in self.rope_tables(pos))  # (2, B, 1, G·N, Dh): q, k
        attend = self._training_attention(f, context is not None, x.device)
        pbias = additive_mask(prompt.mask, h.dtype)[:, None, None]  # (B, 1, 1, T+1)
        for i, (blk, mod) in enumerate(zip(self.blocks, self.modulations(cond), strict=True)):
            h = blk(h, mod, (prompt.k[i], prompt.v[i], pbias), rope, attend, n)
        noisy = slice((g - f) * n, g * n)
        out = self.final(h[:, noisy], cond[:, g - f:], n)
        out = unpatchify(out, self.cfg.patch_size, self.out_channels, *self.latent_size).float()
        out = self.add_key_flow(out, prior)
        v = velocity(out, noisy_x, noisy_sigma, self.cfg.prediction, previous)
        if not return_aux:
            return v
        if self.aux is None:
            raise ValueError("this DiT has no auxiliary heads (dit.aux_heads is off)")
        p = self.cfg.patch_size
        a = self.aux(h[:, noisy]).float().view(b, f, self.latent_size[0] // p, self.latent_size[1] // p, -1)
        return v, Aux(depth=a[..., 0].mean(2), motion=a[..., 1:].mean((2, 3)))

    def _training_attention(self, frames: int, has_context: bool, device: torch.device) -> AttentionFn:
        """Attention for the full sequence; the mask is built once per (frames, context, device)."""
        if self.cfg.bidirectional:
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
        kind = self.attention_kernel or ("flex" if device.type == "cuda" else "sdpa")
        key = (frames, has_context, str(device), kind)
        if key not in self._masks:
            self._masks[key] = self._build_training_mask(frames, has_context, device, kind)
        mask = self._masks[key]
        if kind == "sdpa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            # Compiled, flex-attention runs as one fused kernel; eager (CPU tests) it is a slow reference.
            compiled = device.type == "cuda"
            self._flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        flex = self._flex
        return lambda q, k, v: flex(q, k, v, block_mask=mask)

    def _build_training_mask(self, frames: int, has_context: bool, device: torch.device, kind: str) -> object:
        groups = 2 if has_context else 1
        pos = torch.arange(frames, device=device).repeat(groups)
        ctx = torch.arange(groups * frames, device=device) < (frames if has_context else groups * frames)
        allowed = frame_mask(pos, ctx, pos, ctx, pos < self.cfg.sink, self.cfg.window)  # (G, G)
        n = self.tokens
        if kind == "sdpa":
            return expand_mask(allowed.unsqueeze(0), n)
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return allowed[q // n, kv // n]

        length = groups * frames * n
        return create_block_mask(mask_mod, None, None, length, length, device=device)

    # -- inference over new frames with a KV cache ---------------------------------------------------------

    def rope_tables(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """The rotary tables of frames at positions ``frames`` (B, G) (absolute indices in inference): cos
        and [-sin | sin], each (2, B, 1, G·N, Dh) float32 — q's (spatial and temporal phase), then k's (the
        same, sink frames' temporal pairs zeroed; a bidirectional DiT has no sink)."""
        return self.rotary.qk_tables(frames, 0 if self.cfg.bidirectional else self.cfg.sink)

    def fold_attention_scale(self) -> None:
        """Fold attention's 1/√Dh into q's gains (QK-norm and the cross-attention query) and set every block's
        scale to 1: the same scores with two fewer multiplies per attention (the ONNX export does this to its
        float32 copy). Only for cached inference: ``forward``'s training attention refuses afterwards."""
        for blk in self.blocks:
            if blk.attention_scale is not None:
                continue
            s = blk.head_dim ** -0.5
            with torch.no_grad():
                blk.qk_norm[0].mul_(s)
                blk.cross_q.weight.mul_(s)
                blk.cross_q.bias.mul_(s)
            blk.attention_scale = 1.0

    def forward_cached(self, x: Tensor, sigma: Tensor, keys: Tensor, frames: Tensor, context: int,
                       prompt: PromptKV, cache: CacheView, present: Tensor | None = None,
                       previous: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
                       ) -> CachedOutput:
        """Run new frames against a cache view; nothing is written (the caller appends the returned K/V).

        x (B, G, C, h, w), σ (B, G), keys (B, G, num_keys), ``frames`` (B, G) their absolute frame indices.
        The first ``context`` frames are clean context (their K/V are returned for the cache), the rest are
        noisy (their v is returned). ``present`` (B, G) bool marks placeholder frames (False) that no other
        frame may attend to — for a batch where only some sessions have a context frame to write.
        ``previous`` (B, C, h, w): what the noisy frame builds on, instead of the frame before it (a
        reprojecting model's moved previous frame, ``models.camera``). ``rope``: ``rope_tables(frames)``,
        computed here when not given (the ONNX graphs take them as inputs).
        """
        if self.cfg.bidirectional:
            raise ValueError("a bidirectional DiT has no causal cache")
        b, g = x.shape[:2]
        n, dev = self.tokens, x.device
        ctx = torch.arange(g, device=dev) < context
        present = torch.ones(b, g, dtype=torch.bool, device=dev) if present is None else present
        ref = frames.max(dim=1, keepdim=True).values  # the mask's positions, relative to the newest frame
        q_rel, k_rel = frames - ref, torch.cat([cache.frames, frames], 1) - ref
        k_sink = torch.cat([cache.sink, frames < self.cfg.sink], 1)
        k_ctx = torch.cat([torch.ones_like(cache.valid), ctx.expand(b, g)], 1)
        allowed = frame_mask(q_rel, ctx.expand(b, g), k_rel, k_ctx, k_sink, self.cfg.window)
        allowed = allowed & torch.cat([cache.valid, present], 1).unsqueeze(1)
        allowed[:, :, cache.frames.shape[1]:] |= torch.eye(g, dtype=torch.bool, device=dev)  # no empty row
        dtype = self.patch_in.weight.dtype
        bias = expand_mask(additive_mask(allowed, dtype), n)  # (B, 1, G·N, (Fc+G)·N), shared by all layers
        pbias = additive_mask(prompt.mask, dtype)[:, None, None]  # (B, 1, 1, T+1)
        cos, sin = self.rope_tables(frames) if rope is None else rope
        rope = (cos.to(dtype), sin.to(dtype))
        if not self.cfg.reads_previous or context == g:
            previous = None
        elif g - context != 1:
            raise ValueError(f"a {self.cfg.prediction}-predicting DiT makes one noisy frame per cached "
                             "forward")
        elif previous is not None:
            previous = previous.to(x.dtype)[:, None]
        else:  # the frame before the noisy one: in this call, or cached
            before = cache.previous.to(x.dtype)
            if context:
                given = present[:, context - 1].view(-1, 1, 1, 1)
                before = torch.where(given, x[:, context - 1], before)
            previous = before[:, None]
        h = self.patch_in(patchify(x.to(dtype), self.cfg.patch_size))  # (B, G·N, D)
        prior = self.key_prior(keys[:, context:])
        h = self.with_moved_previous(h, previous, prior)
        cond = self.condition(sigma, keys)
        new_k, new_v = [], []
        for i, (blk, mod) in enumerate(zip(self.blocks, self.modulations(cond), strict=True)):
            pkv = (prompt.k[i], prompt.v[i], pbias)
            first_query = context * n if i == len(self.blocks) - 1 else 0  # last layer: noisy frames only
            h, k, v = blk.forward_cached(h, mod, pkv, cache.layer(i), rope, bias, n, first_query)
            new_k.append(k[:, :, : context * n])
            new_v.append(v[:, :, : context * n])
        out_v = None
        if context < g:
            out = self.final(h, cond[:, context:], n)
            out_v = unpatchify(out, self.cfg.patch_size, self.out_channels, *self.latent_size).float()
            out_v = self.add_key_flow(out_v, prior)
            out_v = velocity(out_v, x[:, context:], sigma[:, context:], self.cfg.prediction, previous)
        if context == 0:
            return CachedOutput(out_v, None, None)
        return CachedOutput(out_v, torch.stack(new_k), torch.stack(new_v))
