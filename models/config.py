"""Model configuration: small frozen dataclasses and the named presets.

Configs are parsed once at the edge (the CLI), saved inside every checkpoint, and every dimension in the
model code derives from them. Presets:

- ``tiny``    — tests: well under 1M parameters, 32×32 frames.
- ``default`` — the shipped model: 128×128 frames, 64 tokens per frame, a 9M-parameter DiT (dim 256, 6 layers)
  sized to play at ≥30 FPS on a 2-core laptop CPU (see ``benchmarks/model_speed.py``).
- ``large``   — GPU: 256×256 frames.
- ``wan``     — Wan-1.3B-shaped DiT at 480×832 (1,560 tokens per latent frame); only for measuring engine
  speed on a GPU with random weights.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VAEConfig:
    """The latent autoencoder: RGB frame (H, W) ↔ latent (latent_channels, H/downsample, W/downsample).

    ``downsample`` = 2**n; the encoder and decoder have n stages, one channel width each: encoder widths from
    H/2 down to the latent resolution, decoder widths from the latent resolution up to H/2 (the last
    upsampling goes straight to RGB). See models/vae.py for the measured speed of the default.
    """

    latent_channels: int = 8
    downsample: int = 8  # a power of two ≥ 2
    encoder_channels: tuple[int, ...] = (32, 64, 128)
    decoder_channels: tuple[int, ...] = (128, 64, 32)
    blocks_per_stage: int = 1  # residual blocks after each stage

    def __post_init__(self) -> None:
        stages = self.downsample.bit_length() - 1
        if self.downsample < 2 or self.downsample != 1 << stages:
            raise ValueError(f"vae.downsample must be a power of two ≥ 2, got {self.downsample}")
        for name in ("encoder_channels", "decoder_channels"):
            channels = getattr(self, name)
            if len(channels) != stages or min(channels) < 1:
                raise ValueError(f"vae.{name} needs {stages} positive widths for downsample "
                                 f"{self.downsample}, got {channels}")
        if self.latent_channels < 1 or self.blocks_per_stage < 0:
            raise ValueError("vae.latent_channels must be ≥ 1 and vae.blocks_per_stage ≥ 0")


PREDICTIONS = ("v", "x0", "delta", "warp")
# What runs a model's DiT and decoder (``models.world_model.WorldModel``): PyTorch, or ONNX Runtime on the CPU
# with float32 or int8 graphs (``models/onnx_runtime.py``, ``models/onnx_quantize.py``).
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
ONNX_BACKENDS = BACKENDS[1:]


@dataclass(frozen=True)
class DiTConfig:
    """The causal frame-wise diffusion transformer (see ``models/dit.py`` for the architecture)."""

    patch_size: int = 2
    dim: int = 256
    depth: int = 6  # transformer layers (6 × 256: ~33 FPS end to end even on one CPU core)
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 384  # MiniLM-L6 token embedding width
    max_prompt_tokens: int = 32
    num_keys: int = 6  # multi-hot held keys, see models.keys.KEYS
    window: int = 8  # frames in the rolling window (excluding the sink)
    sink: int = 1  # first frames of a stream kept forever
    slack: int = 2  # extra cache slots for speculative frames
    bidirectional: bool = False  # full attention inside a clip (distillation teacher only)
    rope_theta: float = 10_000.0
    # What the final layer outputs: "v" (velocity ε − x0), "x0" (the clean frame), "delta" (the clean frame
    # minus the previous frame's latent: the model starts out copying the last frame and learns the change),
    # or "warp" (a flow field and a residual: the clean frame is the previous latent resampled along the flow
    # plus the residual, so moving texture is carried over instead of redrawn; zero flow is "delta").
    prediction: str = "v"
    aux_heads: bool = False  # training-only heads on the last hidden states: per-column depth, camera motion

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 8:
            raise ValueError(f"dit.dim / dit.heads must be a multiple of 8, got {self.dim}/{self.heads}")
        if self.window < 1 or self.sink < 0 or self.slack < 0:
            raise ValueError("dit.window must be >= 1 and dit.sink, dit.slack >= 0")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"dit.prediction must be one of {', '.join(PREDICTIONS)}, "
                             f"got {self.prediction!r}")
        if self.reads_previous and self.bidirectional:
            raise ValueError(f"dit.prediction {self.prediction!r} needs a causal DiT "
                             "(a previous frame to build on)")

    @property
    def reads_previous(self) -> bool:
        """The output is relative to the previous frame's latent ("delta", "warp")."""
        return self.prediction in ("delta", "warp")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def cache_frames(self) -> int:
        """Frame slots per session in the KV cache: sink + window + slack."""
        return self.sink + self.window + self.slack


@dataclass(frozen=True)
class SamplingConfig:
    """Rectified-flow sampling: x_t = (1-σ)·x0 + σ·ε, the network predicts v = ε - x0.

    With ``shift`` 5 the few-step grids are σ = [1] (1 step) and σ = [1, 0.833] (2 steps).
    """

    steps: int = 1  # denoising steps per frame
    first_frame_steps: int = 4  # the first frame of a stream may take more
    shift: float = 5.0  # timestep shift s: σ' = sσ / (1 + (s-1)σ)
    context_sigma: float = 0.0  # noise level at which finished frames are written to the cache
    guidance: float = 1.0  # classifier-free guidance scale on the prompt (1 = off)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.first_frame_steps < 1:
            raise ValueError("sampling.steps and sampling.first_frame_steps must be >= 1")
        if self.shift <= 0 or not 0.0 <= self.context_sigma < 1.0:
            raise ValueError("sampling.shift must be > 0 and sampling.context_sigma in [0, 1)")


RESAMPLING = ("bilinear", "bicubic", "nearest")
REVEAL_FILLS = ("edge", "plane")


@dataclass(frozen=True)
class CameraConfig:
    """The camera of the world a model plays, for ``models.camera``'s reprojection of the previous frame.

    ``reproject`` off (the default): the DiT sees the previous latent as it is. On: it sees the previous frame
    moved by the held keys' camera motion at the depth ``DepthNet`` reads from it. The rest describes the
    built-in world (``distill.world.engine.WorldConfig``): horizontal field of view, the step and turn of one
    frame's held key, walls ``wall_height`` high seen from half that height."""

    reproject: bool = False
    fov_degrees: float = 70.0
    move_step: float = 0.1  # tiles per frame
    turn_degrees: float = 4.0  # per frame
    wall_height: float = 1.0  # tiles; the eye is at half of it
    depth_width: int = 48  # channels of the depth network
    # How the previous frame is sampled: bicubic kept 0.47 / 0.37 of the engine's sharpness at horizons
    # 4 / 16 where bilinear kept 0.24 / 0.08 (the reprojection alone, through the autoencoder each frame),
    # for 0.1–0.4 dB of PSNR.
    resample: str = "bicubic"
    # Weight of the wall depth carried from the frame before (moved by the camera) against the depth network's
    # reading of the new frame, in log depth; 0 reads every frame afresh. Columns the motion uncovered always
    # take the network's reading. 0 here so models saved before it play as they did; `distill truth
    # --reproject` gives a new reprojecting student 1 (on the stage-5 model: +0.7 / +0.3 / +1.3 dB at
    # horizons 4 / 16 / 64).
    depth_memory: float = 0.0
    # 0: the previous frame is moved from the frame before it, every frame, so every frame is resampled once
    # more (a texture moved 16 frames has been resampled 16 times). N > 0: it is sampled from an *anchor*, a
    # frame up to N frames old, at the camera motion accumulated since (``models.camera.pose_flow``), and
    # only where the anchor does not see (what a turn brings in) from the frame before; the newest frame
    # becomes the anchor every N frames. On the engine's frames with the engine's depth, through the
    # autoencoder, an anchor of 16 frames keeps 24.9 / 20.1 dB at frames 16 / 64 where moving every frame
    # keeps 23.7 / 18.2.
    anchor_frames: int = 0
    # With anchors: > 0 takes only the anchor's detail (the frame minus its Gaussian blur of this many pixels)
    # and the blurred colours from the frame before, so what the DiT changed since the anchor (a new theme,
    # its corrections) carries on every frame; 0 takes the anchor whole.
    anchor_lowpass: float = 0.0
    # What the previous frame shows where the motion uncovered it (the strip a turn brings in): "edge"
    # repeats the frame's edge column across it, so every slanted wall edge continues as a horizontal streak
    # (which the DiT bends into a bow and, turned on, into bands); "plane" continues the wall at the edge as a
    # plane (the line through the wall points of the edge column and one ``reveal_span`` columns in) and reads
    # the edge column at each row scaled by the depth ratio, so wall tops, bottoms and the floor continue in
    # perspective. "edge" here so models saved before it play as they did.
    reveal_fill: str = "edge"
    reveal_span: int = 8  # pixel columns between the two wall points the "plane" fill extends
    # ``models.surface_memory``: > 0 keeps the texture each stream saw in the world's texture coordinates,
    # this many texels per tile edge, and draws it on the moved previous frame wherever that surface reappears
    # (a stream needs its camera pose in the world's grid, given with its first frames; without one it plays
    # as with 0). 0 here so models saved before it play as they did.
    surface_memory: int = 0
    memory_sigma: float = 1.5  # pixels of the blur that splits a frame into light and colour and detail
    # Weight of a generated frame's detail against a given (real) frame's: small, so what the stream was
    # shown stays and generated frames only fill texels nothing real has covered.
    memory_trust: float = 0.02
    # > 0: the memory also keeps each texel's colour with the stream's fog taken out (fitted on its first
    # frames), and each frame pulls the moved frame's light and colour this far towards it (0: detail only,
    # as models saved before it).
    memory_colour: float = 0.0
    # > 0: where the camera's motion uncovers pixel columns (a turn's new side) the surface memory draws its
    # texture there (its colour at the usual pull) at the depth its wall map suggests: through the floor it
    # knows to a wall it knows, or, where the ray meets a tile it does not know, a wall this many tiles past
    # that tile's near edge; that depth is then carried like any other. 0: the moved frame's own fill
    # (``reveal_fill``), as models saved before it.
    memory_reveal: float = 0.0
    # Frames after a prompt switch in which the memory neither learns the look (texture and colour) of the
    # generated frames nor pulls their colour: the DiT repaints the picture in the new prompt's look first
    # (the frames right after a switch still carry the old look, and kept as the new one they held the
    # picture there).
    repaint_frames: int = 16

    def __post_init__(self) -> None:
        if self.reveal_fill not in REVEAL_FILLS:
            raise ValueError(f"camera.reveal_fill must be one of {REVEAL_FILLS}, got {self.reveal_fill!r}")
        if self.reveal_span < 1:
            raise ValueError(f"camera.reveal_span must be ≥ 1, got {self.reveal_span}")
        if not 0 < self.fov_degrees < 180:
            raise ValueError(f"camera.fov_degrees must be in (0, 180), got {self.fov_degrees}")
        if self.move_step < 0 or self.wall_height <= 0 or self.depth_width < 1:
            raise ValueError("camera.move_step must be ≥ 0, camera.wall_height > 0 and "
                             "camera.depth_width ≥ 1")
        if self.anchor_lowpass < 0:
            raise ValueError(f"camera.anchor_lowpass must be ≥ 0, got {self.anchor_lowpass}")
        if self.anchor_frames < 0:
            raise ValueError(f"camera.anchor_frames must be ≥ 0, got {self.anchor_frames}")
        if not 0 <= self.depth_memory <= 1:
            raise ValueError(f"camera.depth_memory must be in [0, 1], got {self.depth_memory}")
        if self.resample not in RESAMPLING:
            raise ValueError(f"camera.resample must be one of {RESAMPLING}, got {self.resample!r}")
        if self.surface_memory < 0 or self.memory_sigma <= 0 or not 0 <= self.memory_trust <= 1:
            raise ValueError("camera.surface_memory must be ≥ 0, camera.memory_sigma > 0 and "
                             "camera.memory_trust in [0, 1]")
        if not 0 <= self.memory_colour <= 1:
            raise ValueError(f"camera.memory_colour must be in [0, 1], got {self.memory_colour}")
        if self.memory_reveal < 0:
            raise ValueError(f"camera.memory_reveal must be ≥ 0, got {self.memory_reveal}")
        if self.repaint_frames < 0:
            raise ValueError(f"camera.repaint_frames must be ≥ 0, got {self.repaint_frames}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "default"
    height: int = 128
    width: int = 128
    fps: int = 30
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)

    def __post_init__(self) -> None:
        if self.camera.reproject and self.dit.prediction != "delta":
            raise ValueError("camera.reproject moves the previous frame of a \"delta\" DiT; this DiT "
                             f"predicts {self.dit.prediction!r}")
        d = self.vae.downsample
        if d < 1 or d & (d - 1):
            raise ValueError(f"vae.downsample must be a power of two, got {d}")
        if self.height % d or self.width % d:
            raise ValueError(f"frame size {self.height}x{self.width} is not divisible by vae.downsample={d}")
        lh, lw = self.latent_size
        p = self.dit.patch_size
        if lh % p or lw % p:
            raise ValueError(f"latent size {lh}x{lw} is not divisible by dit.patch_size={p}")
        if self.dit.dim % self.dit.heads:
            raise ValueError(f"dit.dim={self.dit.dim} is not divisible by dit.heads={self.dit.heads}")

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.vae.downsample, self.width // self.vae.downsample

    @property
    def tokens_per_frame(self) -> int:
        lh, lw = self.latent_size
        return (lh // self.dit.patch_size) * (lw // self.dit.patch_size)

    def replace(self, **sections: Any) -> ModelConfig:
        """Return a copy with top-level fields or whole sections replaced."""
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from ``to_dict`` output (e.g. a model directory's config.json), checking the type of
        every value: unknown keys and mistyped values (``"depth": "6"``) are errors naming the field; missing
        keys take defaults."""
        sections = {"vae": VAEConfig, "dit": DiTConfig, "sampling": SamplingConfig, "camera": CameraConfig}
        if not isinstance(data, dict):
            raise ValueError(f"the model config must be an object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value, key)
            elif key in _hints(cls):
                kwargs[key] = _checked(key, value, _hints(cls)[key])
            else:
                raise ValueError(f"unknown model config field {key!r}")
        return cls(**kwargs)


def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def _build(kind: type, value: Any, section: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"{section} must be an object of fields, got {type(value).__name__} {value!r}")
    hints = _hints(kind)
    unknown = set(value) - set(hints)
    if unknown:
        raise ValueError(f"unknown {section} fields: {sorted(unknown)}")
    return kind(**{k: _checked(f"{section}.{k}", v, hints[k]) for k, v in value.items()})


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type (a JSON list as a tuple, an integer as a float), or a ValueError naming
    the field."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)) and all(_is(v, item) for v in value):
            return tuple(value)
        raise ValueError(f"{name} must be a list, each item {_TYPE_NAMES[item]}, got {value!r}")
    if not _is(value, hint):
        raise ValueError(f"{name} must be {_TYPE_NAMES[hint]}, got {type(value).__name__} {value!r}")
    return float(value) if hint is float else value


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        height=32,
        width=32,
        vae=VAEConfig(latent_channels=4, downsample=4, encoder_channels=(16, 32), decoder_channels=(32, 16)),
        dit=DiTConfig(dim=64, depth=2, heads=2, max_prompt_tokens=16, window=4, sink=1, slack=2),
        sampling=SamplingConfig(steps=1, first_frame_steps=2),
    ),
    # f4 × 8 channels (32×32×8 latents, 4×4 patches → 64 tokens per frame): in equal CPU time it
    # reconstructed held-out frames 1.5–2.5 dB better than f8 × 8/16 (docs/autoencoder.md).
    # The DiT outputs the change from the previous frame ("delta") and plays with generated frames re-noised
    # to σ 0.3 in the cache (it trains on context noise up to 0.7): docs/training-recipe.md.
    "default": ModelConfig(
        name="default",
        vae=VAEConfig(latent_channels=8, downsample=4, encoder_channels=(48, 96), decoder_channels=(96, 48)),
        dit=DiTConfig(patch_size=4, prediction="delta"),
        sampling=SamplingConfig(context_sigma=0.3),
    ),
    "large": ModelConfig(
        name="large",
        height=256,
        width=256,
        vae=VAEConfig(latent_channels=16, downsample=8, encoder_channels=(64, 128, 256),
                      decoder_channels=(256, 128, 64)),
        dit=DiTConfig(dim=512, depth=12, heads=8, window=12, sink=1),
    ),
    "wan": ModelConfig(
        name="wan",
        height=480,
        width=832,
        fps=16,
        vae=VAEConfig(latent_channels=16, downsample=8, encoder_channels=(64, 128, 256),
                      decoder_channels=(256, 128, 64)),
        dit=DiTConfig(dim=1536, depth=30, heads=12, mlp_ratio=8960 / 1536, window=6, sink=1),
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
