"""WorldModel: the one rollout loop of worldloop. The server, the CLI, evaluation and distillation all call
it.

A ``WorldModel`` owns a DiT, an autoencoder, a prompt encoder and a ``KVCache`` pool of ``max_sessions``
slots. A ``Session`` is one slot plus its stream state: the next frame index, a per-session RNG (a CPU
generator seeded by the session seed, so the same seed and keys give the same frames however sessions are
batched) and the *pending* frame — the newest generated frame, whose K/V are not yet in the cache.

One frame for a batch of sessions (``generate``):
1. Per-session σ grids (``first_frame_steps`` on frame 0, else ``steps``) and noise from each session's RNG.
2. ``sampling.sample_frame`` with a model function whose first call runs [pending clean frame | noisy new
   frame] in one forward: it writes the pending frame's K/V to the cache (at ``context_sigma``; frames given
   to ``new_session`` are real and enter it at σ 0) while
   denoising the new frame — the cache pass fused into the next frame's forward, so a 1-step frame costs one
   forward.
3. The x0 prediction becomes the session's pending frame; ``next_frame`` decodes it to uint8 RGB.

Backends: ``backend="torch"`` runs the DiT and the decoder in PyTorch; ``backend="onnxruntime"`` hands every
denoising step and every decode to ONNX Runtime sessions (``models/onnx_runtime.py``; float32, CPU) while
this loop, the cache and the sampler stay the same; ``backend="onnxruntime-int8"`` does the same with int8
graphs (``models/onnx_quantize.py``), the decoder's calibrated on ``calibration_frames()`` (uint8 frames of
the world the model was trained on, which the caller renders) when given.

Speculative steps put their frames into the cache's slack slots; ``commit`` keeps them, ``discard`` rewinds
the session (frame index, RNG) to before the first speculative frame. ``set_prompt`` re-caches the window: the
stored latents of the window frames are run again in one forward under the new prompt (the sink is kept).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from worldloop.models.camera import Anchor, with_reprojector
from worldloop.models.checkpoint import DIT_FILE, EMA_FILE, VAE_FILE, CheckpointError, load_into, load_model
from worldloop.models.config import BACKENDS, ONNX_BACKENDS, ModelConfig
from worldloop.models.dit import CachedOutput, DiT
from worldloop.models.keys import ALL_KEYS_MASK, keys_to_tensor
from worldloop.models.kv_cache import CacheSnapshot, CacheView, KVCache, PromptKV
from worldloop.models.sampling import add_noise, randn_rows, sample_frame, sigma_grid
from worldloop.models.surface_memory import (
    LOOKS_FILE,
    Looks,
    Memory,
    Redrawer,
    fit_fog,
    fit_pose,
    forget_looks,
    load_looks,
    nearest_look,
    with_look,
)
from worldloop.models.surface_memory import empty as empty_memory
from worldloop.models.surface_memory import write as write_memory
from worldloop.models.text import PromptEncoder
from worldloop.models.vae import LatentAutoencoder, to_uint8

if TYPE_CHECKING:
    from worldloop.models.onnx_runtime import OnnxRuntimeExecutor


@dataclass
class FrameTimings:
    """Where the time of one ``next_frame``/``generate`` call went (host clock; on CUDA: launch-bound)."""

    batch: int
    forwards: int = 0
    dit_ms: float = 0.0  # all DiT forwards, the fused cache pass included
    reproject_ms: float = 0.0  # a reprojecting model's moved previous frames (models.camera)
    decode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(eq=False)
class Session:
    slot: int
    prompt: str
    seed: int
    generator: torch.Generator
    frame_index: int = 0  # frames generated so far = index of the next frame
    pending: Tensor | None = None  # (C, h, w) newest frame's model input at context σ, not yet in the cache
    pending_keys: Tensor | None = None  # (num_keys,) the keys it was generated with
    pending_speculative: bool = False
    speculative: int = 0  # speculative frames since the last commit/discard
    rollback: SessionSnapshot | None = field(default=None, repr=False)
    # The pending latent ``next_frame`` decoded and that frame (uint8 (H, W, 3)): a reprojecting model moves
    # the frame it showed instead of decoding the latent again, while that latent is still the pending one.
    shown: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    # A reprojecting model's wall depth per pixel column (W,) carried by the camera to the frame of the given
    # index (``camera.depth_memory``); used while that frame is the one moved next.
    carried: tuple[int, Tensor] | None = field(default=None, repr=False)
    # A model with ``camera.anchor_frames``: its anchor (``models.camera.Anchor``, this stream's row: frame
    # (3, H, W), turn (), offset (2,), age ()) as it stood after the frame of the given index.
    anchor: tuple[int, tuple[Tensor, ...]] | None = field(default=None, repr=False)
    # A model with ``camera.surface_memory`` and a stream whose pose in the world's grid is known
    # (``first_poses``): its surface memory (``models.surface_memory.Memory``, this stream's row) with the
    # pose of the frame of the given index.
    memory: tuple[int, Memory] | None = field(default=None, repr=False)
    # The frame index from which the surface memory learns the look of generated frames again after a prompt
    # switch (``camera.repaint_frames``).
    repaint_until: int = 0
    closed: bool = False


@dataclass
class SessionSnapshot:
    cache: CacheSnapshot | None
    frame_index: int
    pending: Tensor | None
    pending_keys: Tensor | None
    prompt: str
    seed: int
    rng_state: Tensor
    memory: tuple[int, Memory] | None = None
    repaint_until: int = 0
    # The camera's carried depth and anchor: kept by the rollback of speculative frames (the same stream), not
    # by ``snapshot`` (``restore`` may branch another stream from it).
    carried: tuple[int, Tensor] | None = None
    anchor: tuple[int, tuple[Tensor, ...]] | None = None


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """"fp32", "bf16" or "auto" (bf16 on CUDA and on CPUs with native bf16 matmul, else fp32)."""
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())
        return torch.bfloat16 if native else torch.float32
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in choices:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return choices[precision]


# A stream from the prompt alone has no pose in any world: its memory places it in a maze cell in the middle
# of the map. On the eval's 8 worlds started from their prompts alone, the bank's look drawn from there: theme
# named in 0.62 → 0.81 of the frames, sharpness at horizon 64 0.001 → 0.64 of the engine's.
PROMPT_START_POSE = (31.5, 31.5, 0.0)


class WorldModel:
    def __init__(self, config: ModelConfig, dit: DiT, vae: LatentAutoencoder, prompt_encoder: PromptEncoder,
                 *, device: torch.device | str = "cpu", max_sessions: int = 8, steps: int | None = None,
                 precision: str = "auto", backend: str = "torch", onnx_dir: str | Path | None = None,
                 model_dir: str | Path | None = None,
                 calibration_frames: Callable[[], np.ndarray] | None = None) -> None:
        self.config = config
        self.device = torch.device(device)
        self.backend = backend
        precision = _backend_precision(backend, precision, self.device)
        self.dtype = resolve_dtype(precision, self.device)
        self.dit = dit.to(self.device, self.dtype).eval()
        self.vae = vae.to(self.device).optimize_for_inference(self.dtype)
        self.prompt_encoder = prompt_encoder
        self.steps = steps or config.sampling.steps
        self.max_sessions = max_sessions
        self.cache = KVCache.for_model(config, max_sessions, self.device, self.dtype)
        self.frame_shape = (config.height, config.width)
        self.latent_shape = (config.latent_channels, *config.latent_size)
        self.last_timings = FrameTimings(batch=0)
        self.metadata: dict = {}  # from the model directory's config.json
        # A model with a surface memory may carry a bank of looks (``surface_memory.Looks``): a new prompt's
        # surfaces start from the nearest entry's texture and colour instead of from nothing.
        self.looks: Looks | None = None
        self.on_timings: Callable[[FrameTimings], None] | None = None
        self._sessions: dict[int, Session] = {}
        with torch.no_grad():
            self._null_prompt = self.dit.null_prompt_kv(1)
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.executor: OnnxRuntimeExecutor | None = None
        self.pending_backend: str | None = None  # a backend being prepared for this model (``use_backend``)
        if backend in ONNX_BACKENDS:
            self.backend = "torch"
            self.use_backend(backend, onnx_dir, calibration_frames)

    def use_backend(self, backend: str, onnx_dir: str | Path | None = None,
                    calibration_frames: Callable[[], np.ndarray] | None = None) -> None:
        """Run the DiT and the decoder on an ONNX Runtime backend from now on: finds the model's graphs, or
        exports (and quantises) them first — tens of seconds the first time for these weights.

        A float32 CPU model may switch while another thread plays: the executor holds no state (the cache
        stays in PyTorch), a frame reads ``executor`` once per call, and frames on either side of the switch
        agree within the backends' tolerance (``app.loading`` prepares the graphs this way for the
        interactive commands, so a first start plays at once)."""
        if backend not in ONNX_BACKENDS:
            raise ValueError(f"use_backend takes {', '.join(ONNX_BACKENDS)}, got {backend!r}")
        if self.config.camera.reproject:
            raise ValueError(f"the {backend} backend does not run reprojecting models "
                             "(camera.reproject) yet; use the torch backend")
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError(f"the {backend} backend runs float32 on the CPU; this model runs "
                             f"{str(self.dtype).removeprefix('torch.')} on {self.device}")
        from worldloop.models.onnx_runtime import OnnxRuntimeExecutor

        executor = OnnxRuntimeExecutor.for_model(self.dit, self.vae, self.model_dir, onnx_dir,
                                                 int8=backend == "onnxruntime-int8",
                                                 calibration=calibration_frames)
        self.executor, self.backend = executor, backend

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0, device: torch.device | str = "cpu",
                    prompt_encoder: PromptEncoder | None = None, max_sessions: int = 8, *,
                    steps: int | None = None, precision: str = "auto", backend: str = "torch",
                    onnx_dir: str | Path | None = None,
                    calibration_frames: Callable[[], np.ndarray] | None = None) -> WorldModel:
        """Random weights (seeded), for tests and speed measurements."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dit, vae = DiT(config), LatentAutoencoder(config)
        encoder = prompt_encoder or PromptEncoder(config.dit.max_prompt_tokens, device=device)
        return cls(config, dit, vae, encoder, device=device, max_sessions=max_sessions, steps=steps,
                   precision=precision, backend=backend, onnx_dir=onnx_dir,
                   calibration_frames=calibration_frames)

    @classmethod
    def from_pretrained(cls, path: str | Path, steps: int | None = None, device: torch.device | str = "cpu",
                        *, prompt_encoder: PromptEncoder | None = None, max_sessions: int = 8,
                        precision: str = "auto", ema: bool = True,
                        context_sigma: float | None = None, backend: str = "torch",
                        onnx_dir: str | Path | None = None,
                        calibration_frames: Callable[[], np.ndarray] | None = None) -> WorldModel:
        """Load a model directory (``models/checkpoint.py``), with its EMA weights if present and ``ema``.

        ``context_sigma`` overrides the model's ``sampling.context_sigma`` (the σ its generated frames are
        re-noised to before they enter the cache). ``backend="onnxruntime"`` uses ``onnx_dir``, else the
        graphs in ``path/onnx`` when they were exported from these weights, else the user cache;
        ``"onnxruntime-int8"`` likewise ``path/onnx-int8``, else int8 graphs quantised into the user cache."""
        files = load_model(path)
        config = files.config
        if context_sigma is not None:
            config = config.replace(sampling=replace(config.sampling, context_sigma=context_sigma))
        dit, vae = DiT(config), LatentAutoencoder(config)
        use_ema = ema and files.dit_ema is not None
        weights, source = (files.dit_ema, EMA_FILE) if use_ema else (files.dit, DIT_FILE)
        if (config.camera.reproject and "base_in.weight" not in weights
                and any(name.startswith("reprojector.") for name in weights)):
            weights = with_reprojector(weights, config)  # saved before the moved frame was a token input
        load_into(dit, weights, Path(path) / source)
        load_into(vae, files.vae, Path(path) / VAE_FILE)
        encoder = prompt_encoder or PromptEncoder(config.dit.max_prompt_tokens, device=device)
        wm = cls(config, dit, vae, encoder, device=device, max_sessions=max_sessions, steps=steps,
                 precision=precision, backend=backend, onnx_dir=onnx_dir, model_dir=path,
                 calibration_frames=calibration_frames)
        wm.metadata = files.metadata
        looks = Path(path) / LOOKS_FILE
        if looks.is_file() and config.camera.surface_memory > 0:
            try:
                wm.looks = load_looks(looks, config.camera.surface_memory)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
        return wm

    # -- sessions ------------------------------------------------------------------------------------------

    def new_session(self, prompt: str, seed: int, first_frames: np.ndarray | None = None,
                    first_keys: Sequence[int] | np.ndarray | None = None,
                    first_poses: Sequence[Sequence[float]] | np.ndarray | None = None) -> Session:
        """Open a session in a free cache slot; ``first_frames`` uint8 (T, H, W, 3) become its context.

        ``first_keys`` (T bitmasks) are the keys each context frame was made with, as in training; without
        them the context frames carry no keys. ``first_poses`` (T, 3): each context frame's camera in the
        world's grid (x, y in tiles, heading in radians; the built-in world's poses), which a model with
        ``camera.surface_memory`` needs to remember the frames' textures (others ignore it); all NaN: unknown
        (a picture), the last frame's pose is then fitted to its depth (``surface_memory.fit_pose``).
        """
        prompt_kv = self._encode_prompt(prompt)  # validates before any state changes
        context = self._first_context(first_frames, first_keys)
        poses = self._first_poses(first_poses, first_frames)
        free = [i for i in range(self.max_sessions) if i not in self._sessions]
        if not free:
            raise RuntimeError(f"all {self.max_sessions} sessions of the model are in use")
        session = Session(free[0], prompt, seed, torch.Generator().manual_seed(seed))
        self._sessions[session.slot] = session
        self._start(session, prompt_kv, context)
        session.memory = self._first_memory(context, first_frames, poses, prompt)
        return session

    def close_session(self, session: Session) -> None:
        self._check(session)
        self.cache.reset(session.slot)
        del self._sessions[session.slot]
        session.closed = True

    def reset(self, session: Session, prompt: str | None = None, seed: int | None = None,
              first_frames: np.ndarray | None = None, first_keys: Sequence[int] | np.ndarray | None = None,
              first_poses: Sequence[Sequence[float]] | np.ndarray | None = None) -> None:
        """Start the session's stream again (optionally with a new prompt and seed, and from context frames
        as in ``new_session``)."""
        self._check(session)
        new_prompt = session.prompt if prompt is None else prompt
        prompt_kv = self._encode_prompt(new_prompt)
        context = self._first_context(first_frames, first_keys)
        poses = self._first_poses(first_poses, first_frames)
        session.prompt, session.seed = new_prompt, session.seed if seed is None else seed
        session.generator.manual_seed(session.seed)
        session.frame_index, session.pending, session.pending_keys = 0, None, None
        session.speculative, session.pending_speculative, session.rollback = 0, False, None
        session.shown = session.carried = session.anchor = None
        self._start(session, prompt_kv, context)
        session.memory = self._first_memory(context, first_frames, poses, new_prompt)
        session.repaint_until = 0

    def _first_context(self, first_frames: np.ndarray | None, first_keys: Sequence[int] | np.ndarray | None
                       ) -> tuple[Tensor, Tensor] | None:
        """Checked context frames as (latents (T, C, h, w), keys (T, num_keys)), or None without frames."""
        if first_frames is None:
            if first_keys is not None:
                raise ValueError("first_keys without first_frames")
            return None
        latents = self._encode_frames(first_frames)
        return latents, self._context_keys(first_keys, len(latents))

    def _first_poses(self, first_poses: Sequence[Sequence[float]] | np.ndarray | None,
                     first_frames: np.ndarray | None) -> Tensor | None:
        """Checked context poses (T, 3) float32, or None."""
        if first_poses is None:
            return None
        if first_frames is None:
            raise ValueError("first_poses without first_frames")
        try:
            poses = torch.as_tensor(np.asarray(first_poses, dtype=np.float64), dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"first_poses must be numbers (T, 3): {exc}") from None
        if poses.shape != (len(first_frames), 3) or not (bool(torch.isfinite(poses).all())
                                                         or bool(torch.isnan(poses).all())):
            raise ValueError(f"first_poses must be finite (x, y, heading) per first frame (or all NaN: "
                             f"unknown), shape ({len(first_frames)}, 3), got {tuple(poses.shape)}")
        return poses.to(self.device)

    def _first_memory(self, context: tuple[Tensor, Tensor] | None, first_frames: np.ndarray | None,
                      poses: Tensor | None, prompt: str) -> tuple[int, Memory] | None:
        """A stream's surface memory after its context frames, seen from ``poses``; from the prompt alone
        (no frames, no poses) the look of the bank's entry nearest ``prompt`` at ``PROMPT_START_POSE``, with
        no walls mapped (the picture's geometry is the DiT's, its surfaces take the bank's texture and the map
        fills as the stream plays); from frames whose poses are unknown (all NaN: a picture) the last alone,
        at the pose within a tile that fits its depth reading (``surface_memory.fit_pose``) in the map's
        middle. None: the model keeps no memory, the frames come without poses, or a prompt alone finds no
        look."""
        rep = self.dit.reprojector
        if rep is None or rep.camera.surface_memory == 0:
            return None
        if context is None and poses is None:  # from the prompt alone: the bank's look, at a made-up pose
            entry = self._nearest_look(prompt)
            if entry is None:
                return None
            pose = torch.tensor(PROMPT_START_POSE, device=self.device)
            memory = empty_memory(pose[None], rep.camera.surface_memory)
            return 0, with_look(Memory(*(part[0] for part in memory)), self.looks, entry)
        if poses is None or context is None:
            return None
        cam = rep.camera
        with torch.no_grad():
            frames = torch.as_tensor(first_frames).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            last = len(frames) - 1  # the frame the memory is as of
            depth, sky = rep.column_depth(context[0], frames.shape[-1])
            if bool(torch.isnan(poses).any()):  # unknown (a picture): the last frame's pose fitted, it alone
                offset = torch.tensor([PROMPT_START_POSE[0] - 0.5, PROMPT_START_POSE[1] - 0.5, 0.0],
                                      device=self.device)
                poses = (fit_pose(depth[-1], cam) + offset)[None]
                frames, depth, sky = frames[-1:], depth[-1:], sky[-1:]
            memory = empty_memory(poses[-1:], cam.surface_memory)
            if cam.memory_colour > 0:
                memory = memory._replace(fog=fit_fog(frames, depth, sky, cam, cam.memory_sigma)[None])
            for t in range(len(frames)):  # one frame at a time: each is written from its own pose
                seen = memory._replace(pose=poses[t: t + 1])
                memory = write_memory(seen, frames[t: t + 1], depth[t: t + 1], sky[t: t + 1], cam,
                                      cam.surface_memory, cam.memory_sigma)
        return last, Memory(*(part[0] for part in memory))._replace(pose=poses[-1])

    def _start(self, session: Session, prompt_kv: PromptKV, context: tuple[Tensor, Tensor] | None) -> None:
        """An empty cache slot under the prompt, then the context frames (if any)."""
        self.cache.reset(session.slot)
        self.cache.set_prompt([session.slot], prompt_kv)
        if context is not None:
            # Given frames are real, so they enter the cache clean (σ 0, which the model is trained on);
            # only generated frames are re-noised to ``context_sigma`` to hide the model's own errors.
            latents, keys = context
            frames = torch.arange(len(latents), device=self.device)
            self._write_context(session, latents, keys, frames, torch.zeros(len(frames)))
            session.frame_index = len(latents)

    def set_prompt(self, session: Session, prompt: str) -> None:
        """Switch the prompt: new prompt K/V and a re-cache of the window under it (the sink is kept). A
        surface memory forgets its texture (a new prompt is a new look) and keeps its wall map."""
        self._check(session, plain=True)
        prompt_kv = self._encode_prompt(prompt)
        self.cache.set_prompt([session.slot], prompt_kv)
        context = self.cache.context(session.slot)
        self.cache.evict(session.slot)
        if len(context.frames):
            self._write_context(session, context.latents, context.keys, context.frames, context.sigma)
        if session.memory is not None:  # the old prompt's look is not the new one's; the walls stay put
            entry = self._nearest_look(prompt)  # the new look from the bank's nearest prompt, else none
            memory = session.memory[1]
            memory = forget_looks(memory) if entry is None else with_look(memory, self.looks, entry)
            session.memory = (session.memory[0], memory)
            session.repaint_until = session.frame_index + self.config.camera.repaint_frames
        session.prompt = prompt

    def snapshot(self, session: Session) -> SessionSnapshot:
        self._check(session, plain=True)
        return SessionSnapshot(self.cache.snapshot(session.slot), session.frame_index,
                               _clone(session.pending), _clone(session.pending_keys), session.prompt,
                               session.seed, session.generator.get_state(), session.memory,
                               session.repaint_until)

    def restore(self, session: Session, snapshot: SessionSnapshot) -> None:
        """Rewind (or branch) a session to a snapshot, taken from it or from another session."""
        self._check(session)
        if snapshot.cache is not None:
            self.cache.restore(session.slot, snapshot.cache)
        session.frame_index, session.prompt = snapshot.frame_index, snapshot.prompt
        session.seed = snapshot.seed
        session.pending, session.pending_keys = _clone(snapshot.pending), _clone(snapshot.pending_keys)
        session.generator.set_state(snapshot.rng_state)
        session.speculative, session.pending_speculative, session.rollback = 0, False, None
        session.carried = session.anchor = None  # the snapshot's stream may have seen other walls
        session.memory = snapshot.memory  # its tensors are never changed in place
        session.repaint_until = snapshot.repaint_until

    def commit(self, session: Session) -> None:
        """Keep the speculative frames: they become ordinary frames of the stream."""
        self._check(session)
        self.cache.commit(session.slot)
        session.speculative, session.pending_speculative, session.rollback = 0, False, None

    def discard(self, session: Session) -> None:
        """Drop the speculative frames: back to the state before the first speculative frame."""
        self._check(session)
        if session.rollback is None:
            return
        self.cache.discard(session.slot)
        back = session.rollback
        # The committed frame pending at the first speculative frame was written then: nothing stays pending.
        session.frame_index, session.pending, session.pending_keys = back.frame_index, None, None
        session.generator.set_state(back.rng_state)
        session.speculative, session.pending_speculative, session.rollback = 0, False, None
        session.memory, session.repaint_until = back.memory, back.repaint_until
        session.carried, session.anchor = back.carried, back.anchor

    # -- the rollout loop ----------------------------------------------------------------------------------

    def next_frame(self, sessions: Sequence[Session], keys: Sequence[int] | Tensor, speculative: bool = False
             ) -> np.ndarray:
        """One new frame per session, one batched forward per denoising step → uint8 (B, H, W, 3)."""
        start = time.perf_counter()
        with torch.no_grad():
            latents, timings, redraw = self._generate(sessions, keys, speculative)
            t0 = time.perf_counter()
            # A surface memory draws its detail on the decoded frames too, before they are quantised.
            decoded = self._decode_frames(latents, None if redraw is None else redraw.finish)
            if self.dit.reprojector is not None:
                for s, frame in zip(sessions, decoded, strict=True):
                    s.shown = (s.pending, frame) if s.pending is not None else None
            frames = decoded.cpu().numpy()
        timings.decode_ms = (time.perf_counter() - t0) * 1e3
        timings.total_ms = (time.perf_counter() - start) * 1e3
        self._report(timings)
        return frames

    def generate(self, sessions: Sequence[Session], keys: Sequence[int] | Tensor, speculative: bool = False
                 ) -> Tensor:
        """Like ``next_frame`` without decoding: the new frames' latents (B, C, h, w), float32."""
        with torch.no_grad():
            latents, timings, _ = self._generate(sessions, keys, speculative)
        self._report(timings)
        return latents

    def rollout_latents(self, sessions: Sequence[Session], keys: Tensor, *, grad_frames: int = 0,
                        steps: int | None = None, prompt: PromptKV | None = None) -> Tensor:
        """Roll the sessions forward T frames with the inference cache policy → latents (B, T, C, h, w).

        ``keys``: bitmasks (B, T) or multi-hot (B, T, num_keys). For self-forcing training, the last
        ``grad_frames`` frames carry gradients through their final denoising step (one DiT forward each);
        earlier steps, earlier frames and every cache write run without gradients — gradients stop at the
        cache. ``steps`` overrides the step count of every frame (the first included) so all rows end on the
        same call. ``prompt``: the sessions' prompt K/V computed by the caller with gradients (the same
        prompts the sessions hold), used by the frames that carry gradients so the cross-attention
        projections train too; the cache keeps its own detached copy.
        """
        out = []
        total = keys.shape[1]
        for t in range(total):
            grad = t >= total - grad_frames
            with torch.set_grad_enabled(grad):
                latents, timings, _ = self._generate(sessions, keys[:, t], False, grad=grad, steps=steps,
                                                  prompt=prompt if grad else None)
            self._report(timings)
            out.append(latents)
        return torch.stack(out, dim=1)

    def _generate(self, sessions: Sequence[Session], keys: Sequence[int] | Tensor, speculative: bool,
                  grad: bool = False, steps: int | None = None, prompt: PromptKV | None = None
                  ) -> tuple[Tensor, FrameTimings, Redrawer | None]:
        for s in sessions:
            self._check(s, plain=not speculative)
            if speculative and s.speculative >= self.config.dit.slack:
                raise ValueError(f"session in slot {s.slot} already has {s.speculative} speculative frames "
                                 f"(slack {self.config.dit.slack}); commit or discard first")
        if len({s.slot for s in sessions}) != len(sessions) or not sessions:
            raise ValueError("next_frame needs one or more distinct sessions")
        key_vec = self._key_vectors(keys, len(sessions))
        timings = FrameTimings(batch=len(sessions))
        if speculative:
            for s in sessions:
                if s.rollback is None:
                    s.rollback = SessionSnapshot(None, s.frame_index, None, None, s.prompt, s.seed,
                                                 s.generator.get_state(), s.memory, s.repaint_until,
                                                 s.carried, s.anchor)
        samp = self.config.sampling
        counts = [steps or (samp.first_frame_steps if s.frame_index == 0 else self.steps) for s in sessions]
        grids = [sigma_grid(c, samp.shift) for c in counts]
        sigmas = torch.zeros(len(grids), max(len(g) for g in grids))
        for i, g in enumerate(grids):
            sigmas[i, : len(g)] = g
        calls_per_step = 1 if samp.guidance == 1.0 else 2
        last_call = (sigmas.shape[1] - 2) * calls_per_step
        call = _FrameForward(self, sessions, key_vec, timings, grad_call=last_call if grad else None)
        if grad:
            with torch.no_grad():
                call.write_pending()  # the unfused cache pass: no gradient through the cache
        generators = [s.generator for s in sessions]
        noise = randn_rows(generators, self.latent_shape, self.device)
        if prompt is None:
            prompt = self.cache.view([s.slot for s in sessions]).prompt
        elif prompt.k.shape[1] != len(sessions):
            raise ValueError(f"prompt K/V for {prompt.k.shape[1]} sessions, stepping {len(sessions)}")
        null = _expand_prompt(self._null_prompt, len(sessions))
        x0 = sample_frame(call, noise, sigmas, prompt, self.cache, generators, guidance=samp.guidance,
                          null_cond=null)
        for i, s in enumerate(sessions):
            s.pending = self._at_context_sigma(s, x0[i : i + 1].detach())[0]
            s.pending_keys, s.pending_speculative = key_vec[i], speculative
            s.frame_index += 1
            s.speculative += int(speculative)
        return x0, timings, call.redraw

    # -- helpers -------------------------------------------------------------------------------------------

    def _check(self, session: Session, plain: bool = False) -> None:
        if session.closed or self._sessions.get(session.slot) is not session:
            raise ValueError("the session is closed or belongs to another model")
        if plain and session.speculative:
            raise ValueError("the session has speculative frames; commit or discard them first")

    def _key_vectors(self, keys: Sequence[int] | Tensor, batch: int) -> Tensor:
        if isinstance(keys, Tensor) and keys.dim() == 2:
            vec = keys.float()
        else:
            masks = [int(k) for k in (keys.tolist() if isinstance(keys, Tensor) else keys)]
            if any(not 0 <= k <= ALL_KEYS_MASK for k in masks):
                raise ValueError(f"key bitmasks must be in 0..{ALL_KEYS_MASK}, got {masks}")
            vec = keys_to_tensor(masks)
        if vec.shape != (batch, self.config.dit.num_keys):
            raise ValueError(f"expected keys for {batch} sessions, got shape {tuple(vec.shape)}")
        return vec.to(self.device)

    def _nearest_look(self, prompt: str) -> int | None:
        """The entry of the bank of looks whose prompt is nearest to ``prompt`` (None: no bank, or no entry
        near enough, ``surface_memory.LOOK_MATCH``)."""
        if self.looks is None or not prompt.strip():
            return None
        return nearest_look(self.looks, self.prompt_encoder.encode([prompt]).tokens[0, 0])

    def _encode_prompt(self, prompt: str) -> PromptKV:
        emb = self.prompt_encoder.encode([prompt])
        with torch.no_grad():
            return self.dit.prompt_kv(emb.tokens.to(self.device), emb.mask.to(self.device))

    def _encode_frames(self, frames: np.ndarray) -> Tensor:
        if frames.ndim != 4 or frames.shape[1:] != (*self.frame_shape, 3) or frames.dtype != np.uint8:
            h, w = self.frame_shape
            got = f"{frames.dtype} {frames.shape}"
            raise ValueError(f"first_frames must be uint8 (T, {h}, {w}, 3), got {got}")
        return self.vae.encode_frames(frames).to(self.device)

    def _context_keys(self, first_keys: Sequence[int] | np.ndarray | None, count: int) -> Tensor:
        """Multi-hot keys (count, num_keys) for the context frames; zeros (no keys) when not given."""
        if first_keys is None:
            return torch.zeros(count, self.config.dit.num_keys, device=self.device)
        masks = [int(m) for m in np.asarray(first_keys).reshape(-1)]
        if len(masks) != count:
            raise ValueError(f"first_keys must give one key state per first frame ({count}), "
                             f"got {len(masks)}")
        if any(not 0 <= m <= ALL_KEYS_MASK for m in masks):
            raise ValueError(f"first_keys must be key bitmasks in 0..{ALL_KEYS_MASK}")
        return keys_to_tensor(masks, device=self.device)

    def _at_context_sigma(self, session: Session, latents: Tensor) -> Tensor:
        """Latents as the cache sees them: re-noised to ``context_sigma`` with the session's RNG (if > 0)."""
        context_sigma = self.config.sampling.context_sigma
        if context_sigma == 0:
            return latents
        eps = torch.randn(latents.shape, generator=session.generator).to(latents.device)
        return add_noise(latents, eps, torch.full((len(latents),), context_sigma, device=latents.device))

    def _write_context(self, session: Session, latents: Tensor, keys: Tensor, frames: Tensor,
                       sigma: Tensor | None = None) -> None:
        """Run clean frames (G, C, h, w) through the DiT in one forward and append their K/V to the cache."""
        sigma = torch.full((len(frames),), self.config.sampling.context_sigma) if sigma is None else sigma
        x, s = latents[None].to(self.device), sigma[None].to(self.device)
        k, f = keys[None].to(self.device), frames[None].to(self.device)
        with torch.no_grad():
            view = self.cache.view([session.slot])
            out = self.dit.forward_cached(x, s, k, f, len(frames), view.prompt, view)
            self.cache.append([session.slot], f, out.k, out.v_cache, x, k, s)

    def _decode_frames(self, latents: Tensor, finish: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Latents → uint8 frames (B, H, W, 3); ``finish`` changes the decoded frames in [-1, 1] first."""
        if self.executor is not None:
            images = self.executor.decode(latents)
            return to_uint8(images if finish is None else finish(images.float())).contiguous()
        return self.vae.decode_frames(latents, finish)

    def _forward_cached(self, x: Tensor, sigma: Tensor, keys: Tensor, frames: Tensor, context: int,
                        prompt: PromptKV, view: CacheView, present: Tensor | None = None,
                        previous: Tensor | None = None) -> CachedOutput:
        """``DiT.forward_cached``, on the backend when it takes these shapes (inference only)."""
        if self.executor is not None and not torch.is_grad_enabled() and previous is None:
            out = self.executor.frame_step(x, sigma, keys, frames, context, prompt, view, present)
            if out is not None:
                return out
        return self.dit.forward_cached(x, sigma, keys, frames, context, prompt, view, present, previous)

    def _report(self, timings: FrameTimings) -> None:
        self.last_timings = timings
        if self.on_timings is not None:
            self.on_timings(timings)


class _FrameForward:
    """The model function of one frame's sampling: v = DiT(x, σ | cache, prompt).

    Its first call also carries each session's pending frame as a clean context frame and appends that frame's
    K/V to the cache (the fused cache pass). ``grad_call``: the call index that runs with gradients (None:
    none).
    """

    def __init__(self, wm: WorldModel, sessions: Sequence[Session], keys: Tensor, timings: FrameTimings,
                 grad_call: int | None) -> None:
        self.wm, self.sessions, self.keys, self.timings = wm, list(sessions), keys, timings
        self.slots = [s.slot for s in sessions]
        self.frames = torch.tensor([s.frame_index for s in sessions], device=wm.device)
        self.present = torch.tensor([s.pending is not None for s in sessions], device=wm.device)
        self.has_pending = bool(self.present.any())
        self.grad_call, self.calls = grad_call, 0
        self.redraw: Redrawer | None = None  # the surface memory's redraw of this frame (next_frame uses it)
        self.previous = self._moved_previous() if wm.dit.reprojector is not None else None

    def _moved_previous(self) -> Tensor:
        """A reprojecting model's base for each session's new frame: its newest frame (pending, else the
        cache's) moved by the new frame's keys; a session with no frame yet keeps the zero base."""
        start = time.perf_counter()
        wm = self.wm
        with torch.no_grad():
            view = wm.cache.view(self.slots)
            pending, _, _ = self._pending_batch()
            base = torch.where(self.present.view(-1, 1, 1, 1), pending.to(view.previous.dtype), view.previous)
            has = self.present | view.valid.any(dim=1)
            if not bool(has.any()):
                return base
            shown = [s.shown[1] if s.shown is not None and s.shown[0] is s.pending else None
                     for s in self.sessions]
            frames = None
            if all(f is not None for f in shown):  # the frames next_frame showed: no second decode
                frames = torch.stack(shown).to(wm.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            carried = None
            if wm.dit.reprojector.camera.depth_memory > 0:  # depth carried to each previous frame, if known
                unknown = torch.full((wm.frame_shape[1],), math.nan, device=wm.device)
                carried = torch.stack([s.carried[1] if s.carried is not None
                                       and s.carried[0] == s.frame_index - 1 else unknown
                                       for s in self.sessions])
            self.redraw = redraw = self._redrawer()
            moved, depth, anchor = wm.dit.reprojector.move(wm.vae, base, self.keys, frames, carried,
                                                           self._anchors(), redraw)
            for i, s in enumerate(self.sessions):
                s.anchor = None if anchor is None else (s.frame_index, tuple(part[i] for part in anchor))
                if redraw is not None and bool(redraw.active[i]):
                    s.memory = (s.frame_index, Memory(*(part[i] for part in redraw.memory)))
            for s, row in zip(self.sessions, depth, strict=True):
                s.carried = (s.frame_index, row)
            out = torch.where(has.view(-1, 1, 1, 1), moved.to(base.dtype), base)
        self.timings.reproject_ms += (time.perf_counter() - start) * 1e3
        return out

    def _redrawer(self) -> Redrawer | None:
        """The sessions' surface memories as of their previous frame, as ``Reprojector.move``'s redraw (None:
        the model keeps none, or no session has one); a session without one gets an empty placeholder that
        draws nothing."""
        cam = self.wm.dit.reprojector.camera
        held = [s.memory[1] if s.memory is not None and s.memory[0] == s.frame_index - 1 else None
                for s in self.sessions]
        if cam.surface_memory == 0 or all(row is None for row in held):
            return None
        blank = empty_memory(torch.zeros(1, 3, device=self.wm.device), cam.surface_memory)
        rows = [Memory(*(part[0] for part in blank)) if row is None else row for row in held]
        memory = Memory(*(torch.stack(part).to(self.wm.device) for part in zip(*rows, strict=True)))
        active = torch.tensor([row is not None for row in held], device=self.wm.device)
        learns = torch.tensor([s.frame_index >= s.repaint_until for s in self.sessions],
                              device=self.wm.device)
        return Redrawer(memory, self.keys, active, cam, learns)

    def _anchors(self) -> Anchor | None:
        """The sessions' anchors as of their previous frame (``camera.anchor_frames``; None: no session has
        one); a session without one gets a placeholder that is due (age ``anchor_frames``), so its newest
        frame becomes its anchor."""
        due = self.wm.dit.reprojector.camera.anchor_frames
        held = [s.anchor[1] if s.anchor is not None and s.anchor[0] == s.frame_index - 1 else None
                for s in self.sessions]
        if due == 0 or all(row is None for row in held):
            return None
        frame = torch.zeros(3, *self.wm.frame_shape, device=self.wm.device)
        placeholder = (frame, frame.new_zeros(()), frame.new_zeros(2), torch.tensor(due, device=frame.device))
        rows = [placeholder if row is None else row for row in held]
        return Anchor(*(torch.stack(part).to(self.wm.device) for part in zip(*rows, strict=True)))

    def _pending_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        wm = self.wm
        zeros = torch.zeros(wm.latent_shape, device=wm.device)
        latents = torch.stack([s.pending if s.pending is not None else zeros for s in self.sessions])
        no_keys = torch.zeros(wm.config.dit.num_keys, device=wm.device)
        keys = torch.stack([s.pending_keys if s.pending_keys is not None else no_keys for s in self.sessions])
        sigma = torch.full((len(self.sessions),), wm.config.sampling.context_sigma, device=wm.device)
        return latents, keys, sigma

    def _append(self, frames: Tensor, k: Tensor, v: Tensor, latents: Tensor, keys: Tensor, sigma: Tensor
                ) -> None:
        spec = torch.tensor([s.pending_speculative for s in self.sessions])
        self.wm.cache.append(self.slots, frames, k, v, latents, keys, sigma, self.present[:, None], spec)
        self.has_pending = False

    def write_pending(self) -> None:
        """The unfused cache pass: write the pending frames in a forward of their own."""
        if not self.has_pending:
            return
        latents, keys, sigma = self._pending_batch()
        frames = (self.frames - 1)[:, None]
        view = self.wm.cache.view(self.slots)
        out = self.wm.dit.forward_cached(latents[:, None], sigma[:, None], keys[:, None], frames, 1,
                                         view.prompt, view, self.present[:, None])
        self._append(frames, out.k, out.v_cache, latents[:, None], keys[:, None], sigma[:, None])

    def __call__(self, x: Tensor, sigma: Tensor, prompt: PromptKV, cache: KVCache) -> Tensor:
        start = time.perf_counter()
        grad = self.grad_call is not None and self.calls >= self.grad_call
        view = cache.view(self.slots, compact=self.wm.executor is None)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if self.has_pending:
                latents, keys, sig_c = self._pending_batch()
                frames = torch.stack([self.frames - 1, self.frames], 1)
                present = torch.stack([self.present, torch.ones_like(self.present)], 1)
                xs, sigmas = torch.stack([latents, x], 1), torch.stack([sig_c, sigma], 1)
                both_keys = torch.stack([keys, self.keys], 1)
                out = self.wm._forward_cached(xs, sigmas, both_keys, frames, 1, prompt, view, present,
                                              self.previous)
                self._append(frames[:, :1], out.k, out.v_cache, xs[:, :1], both_keys[:, :1], sigmas[:, :1])
            else:
                out = self.wm._forward_cached(x[:, None], sigma[:, None], self.keys[:, None],
                                              self.frames[:, None], 0, prompt, view, previous=self.previous)
        self.calls += 1
        self.timings.forwards += 1
        self.timings.dit_ms += (time.perf_counter() - start) * 1e3
        return out.v[:, 0]


def _backend_precision(backend: str, precision: str, device: torch.device) -> str:
    """The precision the PyTorch side of a backend runs at: the ONNX Runtime backends keep it float32 on the
    CPU (their graphs run float32, or int8 with float32 in between)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return precision
    if device.type != "cpu":
        raise ValueError(f"the {backend} backend runs on the CPU, not {device}; use the torch backend")
    if precision == "bf16":
        raise ValueError(f"the {backend} backend runs in float32; bf16 is the torch backend's")
    return "fp32"


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


def _expand_prompt(prompt: PromptKV, batch: int) -> PromptKV:
    return PromptKV(prompt.k.expand(-1, batch, -1, -1, -1), prompt.v.expand(-1, batch, -1, -1, -1),
                    prompt.mask.expand(batch, -1))
