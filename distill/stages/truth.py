"""Stage: self-forcing against the engine's truth (``worldloop distill truth``).

The built-in world renders the exact frame for every key, so a student can be trained on its own rollouts
against the frames the engine shows under the same keys — no teacher score is needed for that part of the
signal. One iteration:

1. B engine clips of ``max_context + rollout_frames`` frames (keys, prompts; the explorer drives, with
   ``--random-keys`` of the keys replaced by held random ones); their latents through the frozen encoder.
2. The iteration draws a context length c ∈ 1..max_context. Each stream restarts from the clip's c engine
   frames before the rollout (clean in the cache, as ``play --start world`` starts) with its prompt and a
   fresh seed, and the student rolls out ``rollout_frames`` frames with the clip's keys through
   ``WorldModel.rollout_latents``, the one rollout loop, with the inference cache policy (window, sink,
   generated frames re-noised to ``sampling.context_sigma``). Every frame stops at an exit step
   k ∈ 1..S of the student's S steps (one k per iteration).
3. DiT loss: MSE between the generated latents and the engine's latents, plus ``latent_spectrum_weight`` ×
   their log-spectrum distance (``latent_spectrum_loss``: against the blur of pure regression). The newest
   ``grad_frames`` frames (default: all) carry gradients through their last denoising step; earlier steps
   and every cache write do not (gradients stop at the cache, as in ``distill dmd``).
   Every ``switch_every``-th iteration the clips switch prompt inside the rollout
   (``WorldClips(switch_at=…)``: the same maze at the same poses in another theme from that frame on); the
   streams get the new prompt there (``WorldModel.set_prompt``, as a player typing it), so the student
   learns to follow a switch against the engine's frames of the new theme. A switch batch renders two
   worlds without the clip pool, so it is reused for ``switch_reuse`` switch iterations (each with its own
   context length and seeds).
   ``--texture-weight`` adds the local texture statistics of decoded frames against the engine's
   (``models.vae.texture_distance``: Gram matrices of the frozen encoder's features per tile), the same
   frames the critic would judge; ``--pixel-weight`` their L1 against the engine's frames in pixels (a
   latent's error is not its picture's: the decoder amplifies some latent directions far more than others);
   ``--adversarial-weight`` adds the patch critic's term on them.
4. Decoder loss (``--train decoder|both``): the frozen-encoder autoencoder's decoder, given
   ``decoder_frames`` of the generated latents (detached), is trained to draw the engine's frames
   (``models.vae.reconstruction_loss``: L1, image-gradient and log-spectrum terms, + ``--texture-weight`` ×
   the texture term). It learns to clean up what the DiT actually produces rather than what the encoder
   produces.

``--train dit`` (the default) trains the DiT only, ``decoder`` the decoder only (the rollouts then run
without gradients), ``both`` the two at once (the decoder at ``decoder_lr_scale`` × the learning rate).
The exported model plays with the student's S steps and the EMA weights of what was trained.

    worldloop distill truth --teacher runs/teacher/model --student-steps 1 --out runs/truth
    worldloop distill truth --teacher runs/teacher/model --student runs/truth/model --train decoder \\
        --out runs/truth-decoder
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldloop.distill.data.clips import ClipBatch, ClipSource, WorldClips
from worldloop.distill.stages import shared
from worldloop.distill.stages.critic import Critic
from worldloop.distill.stages.loop import Stage, Step, prepare_run, train
from worldloop.distill.stages.run import RunDir, RunError, settings_dict
from worldloop.distill.stages.runtime import (
    EMA,
    Distributed,
    Optimizers,
    TrainConfig,
    TrainResult,
    autocast,
    make_optimizer,
    optimizer_step,
)
from worldloop.models.config import ModelConfig
from worldloop.models.keys import keys_to_tensor
from worldloop.models.text import PromptEncoder
from worldloop.models.vae import (
    LatentAutoencoder,
    reconstruction_loss,
    spectrum_distance,
    texture_distance,
    to_unit,
)
from worldloop.models.world_model import Session, WorldModel

STAGE = "truth"
DEPTH_OPTIMIZER = "depth_optimizer.pt"  # the depth network's optimizer state, beside checkpoint.pt
TRAINS = ("dit", "decoder", "both")


@dataclass(frozen=True)
class TruthObjective:
    max_context: int = 3  # engine frames a stream starts from: 1..max_context, drawn per iteration
    rollout_frames: int = 8  # frames the student generates per stream and iteration
    grad_frames: int = 0  # newest rollout frames that carry the DiT's gradient (0: all)
    train: str = "dit"  # dit | decoder | both
    decoder_frames: int = 8  # generated frames per iteration the decoder trains on
    decoder_lr_scale: float = 0.2  # the decoder's learning rate relative to --lr
    edge_weight: float = 0.5  # decoder loss: image-gradient L1 weight
    spectrum_weight: float = 8.0  # decoder loss: log-spectrum weight (keeps texture energy)
    latent_spectrum_weight: float = 0.0  # DiT loss: log-spectrum distance of generated vs engine latents
    random_keys: float = 0.1  # chance per frame that held random keys take over from the explorer
    key_hold: int = 4  # frames a random key state is held
    still_keys: float = 0.0  # share of the random key states that hold no key (the camera stands still)
    switch_every: int = 4  # every n-th iteration the prompt switches inside the rollout (0: never)
    switch_reuse: int = 4  # switch iterations that share one rendered switch batch
    adversarial_weight: float = 0.0  # > 0: a patch critic judges decoded frames (adaptive weight × this)
    adversarial_frames: int = 8  # generated frames (with gradients) per iteration the critic judges
    critic_channels: int = 32
    critic_lr_scale: float = 5.0  # the critic's learning rate relative to --lr (it starts from nothing)
    critic_updates: int = 4  # critic updates per iteration on its frames (cheap beside the rollout)
    adversarial_start: int = 0  # the iteration from which the DiT gets the critic's term (it trains from 0)
    depth_lr_scale: float = 0.0  # > 0: a reprojecting student's depth network learns on its own rollouts
    texture_weight: float = 0.0  # > 0: decoded frames' local texture statistics against the engine's
    texture_grid: int = 4  # the texture term compares Gram matrices over a grid × grid partition
    pixel_weight: float = 0.0  # > 0: decoded frames' L1 against the engine's frames, in pixels

    def __post_init__(self) -> None:
        if self.train not in TRAINS:
            raise ValueError(f"--train must be one of {', '.join(TRAINS)}, got {self.train!r}")
        if self.max_context < 1 or self.rollout_frames < 1:
            raise ValueError("--max-context and --rollout-frames must be >= 1")
        if not 0 <= self.grad_frames <= self.rollout_frames:
            raise ValueError(f"--grad-frames must be in 0..--rollout-frames ({self.rollout_frames})")
        if self.decoder_frames < 1 or self.decoder_lr_scale <= 0:
            raise ValueError("--decoder-frames must be >= 1 and --decoder-lr-scale > 0")
        if min(self.edge_weight, self.spectrum_weight, self.latent_spectrum_weight,
               self.adversarial_weight, self.depth_lr_scale, self.texture_weight, self.pixel_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if not 0 <= self.random_keys <= 1 or not 0 <= self.still_keys <= 1:
            raise ValueError("--random-keys and --still-keys must be in [0, 1]")
        if self.key_hold < 1:
            raise ValueError("--key-hold must be >= 1")
        if self.switch_every < 0 or self.switch_reuse < 1:
            raise ValueError("--switch-every must be >= 0 and --switch-reuse >= 1")
        critic = (self.adversarial_frames, self.critic_channels, self.critic_updates)
        if min(critic) < 1 or self.critic_lr_scale <= 0 or self.adversarial_start < 0:
            raise ValueError("--adversarial-frames, --critic-channels and --critic-updates must be >= 1, "
                             "--critic-lr-scale > 0 and --adversarial-start >= 0")
        if self.adversarial_weight > 0 and self.train != "dit":
            raise ValueError("--adversarial-weight trains the DiT against a critic: it needs --train dit")
        if self.texture_grid < 1:
            raise ValueError("--texture-grid must be >= 1")
        if self.switch_every and self.rollout_frames < 2:
            raise ValueError("prompt switches need --rollout-frames >= 2 (a frame before and after it)")

    @property
    def clip_frames(self) -> int:
        return self.max_context + self.rollout_frames

    @property
    def trains_dit(self) -> bool:
        return self.train in ("dit", "both")

    @property
    def trains_decoder(self) -> bool:
        return self.train in ("decoder", "both")


@dataclass
class TruthDraws:
    """An iteration's random numbers: context length, exit step, each stream's seed, decoder frame picks."""

    context: int
    exit_steps: int
    seeds: list[int]
    decoder_frames: torch.Tensor  # (decoder_frames,) flat indices into the (B × rollout_frames) frames
    critic_frames: torch.Tensor  # (adversarial_frames,) flat indices into the (B × grad frames) frames


def draw(objective: TruthObjective, student_steps: int, batch: int, generator: torch.Generator
         ) -> TruthDraws:
    o, dev = objective, generator.device  # a CUDA generator draws on its own device
    context = int(torch.randint(1, o.max_context + 1, (1,), generator=generator, device=dev))
    exit_steps = int(torch.randint(1, student_steps + 1, (1,), generator=generator, device=dev))
    seeds = torch.randint(0, 2**31 - 1, (batch,), generator=generator, device=dev).tolist()
    total = batch * o.rollout_frames
    picks = torch.randperm(total, generator=generator, device=dev)[: min(o.decoder_frames, total)]
    graded = batch * (o.grad_frames or o.rollout_frames)
    critic = torch.randperm(graded, generator=generator, device=dev)[: min(o.adversarial_frames, graded)]
    return TruthDraws(context, exit_steps, seeds, picks, critic)


def start_streams(wm: WorldModel, sessions: list[Session], clips: ClipBatch, context: int,
                  first: int, seeds: list[int]) -> None:
    """Restart every stream from the clip's ``context`` engine frames ending just before frame ``first``,
    with the camera poses of those frames where the clips carry them (a model with a surface memory,
    ``camera.surface_memory``, then rolls out with it as it plays)."""
    frames = clips.frames[:, first - context: first].cpu().numpy()
    keys = clips.keys[:, first - context: first].cpu().numpy()
    poses = None if clips.poses is None else clips.poses[:, first - context: first].cpu().numpy()
    for i, (session, prompt, seed) in enumerate(zip(sessions, clips.prompts, seeds, strict=True)):
        wm.reset(session, prompt=prompt, seed=seed, first_frames=frames[i], first_keys=keys[i],
                 first_poses=None if poses is None else poses[i])


def roll(wm: WorldModel, sessions: list[Session], clips: ClipBatch, encoder: PromptEncoder, first: int,
         grad_frames: int, device: torch.device) -> torch.Tensor:
    """The streams rolled out over the clip's frames from ``first`` on → latents (B, F, C, h, w); with a
    prompt switch in the clip, the streams take the new prompts at its frame. ``grad_frames`` of the newest
    frames carry gradients (0: none); their prompt K/V is computed with gradients."""
    keys = keys_to_tensor(clips.keys[:, first:], device=device)
    total = keys.shape[1]
    cut = clips.switch_at - first if clips.switch_at else total
    parts = []
    for lo, hi, prompts in ((0, cut, clips.prompts), (cut, total, clips.switch_prompts)):
        if hi <= lo:
            continue
        if lo:
            for session, prompt in zip(sessions, prompts or [], strict=True):
                wm.set_prompt(session, prompt)
        grad = max(0, min(hi - lo, grad_frames - (total - hi)))
        prompt_kv = None
        if grad:
            embedding = encoder.encode(list(prompts or [])).to(device)
            prompt_kv = wm.dit.prompt_kv(embedding.tokens, embedding.mask)
        parts.append(wm.rollout_latents(sessions, keys[:, lo:hi], grad_frames=grad, prompt=prompt_kv))
    return torch.cat(parts, dim=1)


def rollout_loss(generated: torch.Tensor, truth: torch.Tensor, grad_frames: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE of the frames with gradients (the newest ``grad_frames``; 0: all) and the per-frame MSE (F,)."""
    per_frame = (generated.float() - truth).square().mean(dim=(0, 2, 3, 4))
    g = grad_frames or generated.shape[1]
    return F.mse_loss(generated[:, -g:].float(), truth[:, -g:]), per_frame.detach()


def latent_spectrum_loss(generated: torch.Tensor, truth: torch.Tensor, grad_frames: int) -> torch.Tensor:
    """``models.vae.spectrum_distance`` of the frames with gradients, per latent channel and frame.

    Regression onto the engine is blurred wherever the student is unsure where an edge goes (the mean of
    the possible frames); comparing log amplitudes per spatial frequency charges for the texture energy a
    blur loses without asking for the exact phase, so the student keeps edges it cannot place exactly."""
    g = grad_frames or generated.shape[1]
    return spectrum_distance(generated[:, -g:].flatten(0, 1), truth[:, -g:].flatten(0, 1))


SwitchSource = Callable[[int, int, int, int], ClipBatch]  # (index, size, frames, switch_at) → switch clips


def world_switch_clips(config: ModelConfig, cfg: TrainConfig, device: torch.device) -> SwitchSource:
    """Switch batches from the built-in world (seeds apart from the run's other clips)."""

    def make(index: int, size: int, frames: int, switch_at: int) -> ClipBatch:
        source = WorldClips(config.height, config.width, frames, device, seed=cfg.seed + 7_919,
                            switch_at=switch_at)
        return source.batch(index, size)

    return make


class TruthStage(Stage):
    """The student rolled out through its ``WorldModel`` from engine frames, regressed onto the engine."""

    name, title = STAGE, "distill truth"
    export_at_checkpoints = True

    def __init__(self, config: ModelConfig, cfg: TrainConfig, objective: TruthObjective, ddp: Distributed,
                 settings: dict[str, Any], *, start_dir: Path, prompt_encoder: PromptEncoder | None,
                 clips: ClipSource | None, switch_clips: SwitchSource | None = None,
                 vae_dir: Path | None = None, resume: bool = False) -> None:
        super().__init__(cfg, ddp, settings)
        self.config, self.objective = config, objective
        self.device = device = ddp.device
        source_config, student = shared.load_dit(start_dir, device, config.dit.prediction, config.camera)
        shared.check_compatible(config, source_config, start_dir, same_dit=True)
        vae = shared.load_vae(config, vae_dir or start_dir).to(device)
        self.encoder = prompt_encoder or PromptEncoder(config.dit.max_prompt_tokens, device=device)
        self.wm = WorldModel(config, student, vae, self.encoder, device=device, max_sessions=cfg.batch_size,
                             steps=config.sampling.steps, precision="fp32")
        self.vae: LatentAutoencoder = self.wm.vae
        self.vae.requires_grad_(False)
        self.sessions = [self.wm.new_session("", seed=0) for _ in range(cfg.batch_size)]
        fit = None if resume else shared.start_key_flow(student, self.vae, cfg, config, device, clips)
        depth_fit = None if resume else shared.start_depth(student, self.vae, cfg, config, device)
        if objective.depth_lr_scale > 0 and (student.reprojector is None or not objective.trains_dit):
            raise RunError("--depth-lr-scale trains a reprojecting student's depth network (--reproject) "
                           "with the DiT (--train dit)")
        self.modules, self.emas = {}, {}
        student.requires_grad_(objective.trains_dit)
        if student.reprojector is not None:  # fitted above; the rollout loss does not reach it (no_grad)
            student.reprojector.requires_grad_(False)
        parts = []
        if objective.trains_dit:
            parts.append(self._add("student", student, 1.0))
        if objective.trains_decoder:
            self.vae.decoder.requires_grad_(True)
            parts.append(self._add("decoder", self.vae.decoder, objective.decoder_lr_scale))
        self.trained = student
        self.optimizer = parts[0] if len(parts) == 1 else Optimizers(parts)  # type: ignore[assignment]
        self.depth_optimizer = None
        if objective.depth_lr_scale > 0:  # its own optimizer and clip: the DiT's step does not see it
            assert student.reprojector is not None
            student.reprojector.depth_net.requires_grad_(True)
            self.depth_optimizer = torch.optim.AdamW(student.reprojector.depth_net.parameters(),
                                                     lr=cfg.lr * objective.depth_lr_scale, weight_decay=1e-4)
        self.critic = None
        if objective.adversarial_weight > 0:  # its network is checkpointed with the modules, not trained by
            self.critic = Critic(student.final.linear.weight, objective.adversarial_weight,  # the optimizer
                                 objective.critic_channels, cfg.lr, ddp, seed=cfg.seed + 11)
            self.modules["critic"] = self.critic.net
        self.clips = clips or shared.make_clip_source(
            cfg, config, device, 0, objective.clip_frames, random_keys=objective.random_keys,
            key_hold=objective.key_hold, depth_columns=config.width if objective.depth_lr_scale > 0 else 0,
            still=objective.still_keys)
        self.switch_clips = switch_clips
        self._switch_cache: tuple[int, ClipBatch] | None = None
        if self.clips.frames < objective.clip_frames:
            raise RunError(f"clips of {self.clips.frames} frames; the stage needs {objective.clip_frames}")
        self.meta = {"started_from": str(start_dir), "autoencoder_from": str(vae_dir or start_dir),
                     "train": objective.train,
                     "context_sigma": config.sampling.context_sigma,
                     **({"key_flow_fit": fit} if fit else {}),
                     **({"depth_fit": depth_fit} if depth_fit else {})}

    def _add(self, name: str, module: nn.Module, lr_scale: float) -> torch.optim.Optimizer:
        """``module`` trains (EMA, checkpointed under ``name``) at ``lr_scale`` × the learning rate."""
        self.modules[name], self.emas[name] = module, EMA(module, self.cfg.ema_decay)
        optimizer = make_optimizer(module, self.cfg, self.device)
        for group in optimizer.param_groups:
            group["lr_scale"] = lr_scale
        return optimizer

    def batch(self, iteration: int) -> ClipBatch:
        o, size = self.objective, self.cfg.batch_size
        if not (o.switch_every and iteration % o.switch_every == o.switch_every - 1):
            return self.clips.batch(iteration, size).to(self.device)
        index = iteration // (o.switch_every * o.switch_reuse)  # the switch batch this iteration uses
        if self._switch_cache is None or self._switch_cache[0] != index:
            g = self.generator(index)  # the switch frame: at least one rollout frame before and after it
            at = int(torch.randint(o.max_context + 1, o.clip_frames, (1,), generator=g, device=g.device))
            make = self.switch_clips or world_switch_clips(self.config, self.cfg, self.device)
            self._switch_cache = (index, make(index, size, o.clip_frames, at).to(self.device))
        return self._switch_cache[1]

    def step(self, iteration: int, batch: ClipBatch) -> Step:
        o, cfg = self.objective, self.cfg
        d = draw(o, self.config.sampling.steps, cfg.batch_size, self.generator(iteration))
        truth = shared.encode_clips(self.vae, batch.frames[:, o.max_context:])
        start_streams(self.wm, self.sessions, batch, d.context, o.max_context, d.seeds)
        self.wm.steps = d.exit_steps
        grad_frames = (o.grad_frames or o.rollout_frames) if o.trains_dit else 0
        with autocast(self.device, cfg.bf16):
            generated = roll(self.wm, self.sessions, batch, self.encoder, o.max_context, grad_frames,
                             self.device)
            dit_loss, per_frame = rollout_loss(generated, truth, o.grad_frames)
        spectrum = None
        if o.trains_dit and o.latent_spectrum_weight > 0:
            spectrum = latent_spectrum_loss(generated, truth, o.grad_frames)
        loss = dit_loss if o.trains_dit else torch.zeros((), device=self.device)
        if spectrum is not None:
            loss = loss + o.latent_spectrum_weight * spectrum
        depth = None
        if self.depth_optimizer is not None and batch.depths is not None:  # switch batches carry no depth
            depth = self._depth_step(generated, truth, batch, iteration)
        # Terms on decoded frames (the critic needs --train dit too): the same picks, decoded once.
        texture = pixel = None
        texture_on, pixel_on = o.trains_dit and o.texture_weight > 0, o.trains_dit and o.pixel_weight > 0
        judged = None
        if self.critic is not None or texture_on or pixel_on:
            judged = self._judged(generated, batch, d.critic_frames)
            real, fake = judged
            if texture_on:
                texture = texture_distance(self.vae.encoder, fake, real, o.texture_grid)
                loss = loss + o.texture_weight * texture
            if pixel_on:
                pixel = (fake - real).abs().mean()
                loss = loss + o.pixel_weight * pixel
        if self.critic is not None:
            assert judged is not None
            weight = 0.0
            if iteration >= o.adversarial_start:
                adversarial, weight = self.critic.generator_term(loss, judged[1])
                loss = loss + adversarial
        record: dict[str, Any] = {"latent_mse": dit_loss.detach(), "latent_mse_first": per_frame[0],
                                  "latent_mse_last": per_frame[-1], "context": d.context,
                                  "exit_steps": d.exit_steps}
        if spectrum is not None:
            record["latent_spectrum"] = spectrum.detach()
        if texture is not None:
            record["texture"] = texture.detach()
        if pixel is not None:
            record["pixel_l1"] = pixel.detach()
        if depth is not None:
            record["depth_loss"] = depth
        if batch.switch_at:
            record["switch_latent_mse"] = record["latent_mse"]
        if o.trains_decoder:
            latents = generated.detach().flatten(0, 1)[d.decoder_frames]
            target = to_unit(batch.frames[:, o.max_context:].flatten(0, 1)[d.decoder_frames])
            with autocast(self.device, cfg.bf16):
                z = (latents / self.vae.latent_scale).contiguous(memory_format=torch.channels_last)
                recon = self.vae.decoder(z)
            target = target.to(self.device)
            decoder_loss, parts = reconstruction_loss(recon.float(), target, o.edge_weight, o.spectrum_weight)
            if o.texture_weight > 0:
                decoder_texture = texture_distance(self.vae.encoder, recon.float(), target, o.texture_grid)
                decoder_loss = decoder_loss + o.texture_weight * decoder_texture
                record["decoder_texture"] = decoder_texture.detach()
            loss = loss + decoder_loss
            record |= {"decoder_loss": decoder_loss.detach(), "decoder_mse": parts["mse"]}
        trained = [m for name, m in self.modules.items() if name != "critic"]
        record["grad_norm"] = self.update(loss, nn.ModuleList(trained), iteration)
        record["lr"] = self.lr(iteration)
        if judged is not None and self.critic is not None:
            record["adversarial_weight"] = weight
            critic_lr = record["lr"] * self.objective.critic_lr_scale
            for _ in range(self.objective.critic_updates):
                record["critic_loss"] = self.critic.train_step(judged[0], judged[1], critic_lr)
        return Step(cfg.batch_size * o.rollout_frames, loss.item(), record)

    def _depth_step(self, generated: torch.Tensor, truth: torch.Tensor, batch: ClipBatch, iteration: int
                    ) -> float:
        """One update of the depth network on the rollout's own frames and on the engine's (both detached)
        against the engine's depth at the same poses: log-depth MSE + 0.1 × the sky flag's logistic loss, as
        it was fitted (``shared.fit_depth``). A rollout's frames drift from the engine's look, and the depth
        read from them with it; the camera moves as the engine's does, so the engine's depth stays the right
        answer. Returns the loss."""
        assert self.depth_optimizer is not None
        net = self.wm.dit.reprojector.depth_net  # type: ignore[union-attr]
        assert batch.depths is not None
        tail = dataclasses.replace(batch, depths=batch.depths[:, self.objective.max_context:])
        target, sky = shared.depth_targets(tail, generated.shape[-1])
        latents = torch.cat([generated.detach().flatten(0, 1), truth.flatten(0, 1)]).float()
        pred, logit = net(latents)
        target, sky = target.repeat(2, 1).to(pred.device), sky.repeat(2).to(pred.device).float()
        loss = F.mse_loss(pred.float(), target) + 0.1 * F.binary_cross_entropy_with_logits(logit.float(), sky)
        optimizer_step(loss, net, self.depth_optimizer, self.lr(iteration) * self.objective.depth_lr_scale,
                       self.cfg.grad_clip)
        self.depth_optimizer.zero_grad(set_to_none=True)  # the DiT's update clips its own gradients only
        return loss.item()

    def _judged(self, generated: torch.Tensor, batch: ClipBatch, picks: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The critic's engine frames and the matching generated frames (decoded with gradients through the
        frozen decoder), both (N, 3, H, W) in [-1, 1], for ``picks`` of the frames that carry gradients."""
        g = self.objective.grad_frames or self.objective.rollout_frames
        latents = generated[:, -g:].flatten(0, 1)[picks]
        real = to_unit(batch.frames[:, self.objective.max_context:][:, -g:].flatten(0, 1)[picks])
        with autocast(self.device, self.cfg.bf16):
            z = (latents / self.vae.latent_scale).contiguous(memory_format=torch.channels_last)
            fake = self.vae.decoder(z).float().clamp(-1.0, 1.0)  # as shown
        return real.to(self.device), fake

    def save_extra(self, run: RunDir) -> None:
        if self.critic is not None:
            self.critic.save(run)
        if self.depth_optimizer is not None:
            torch.save(self.depth_optimizer.state_dict(), run.root / DEPTH_OPTIMIZER)

    def load_extra(self, run: RunDir) -> None:
        if self.critic is not None:
            self.critic.load(run)
        if self.depth_optimizer is not None:
            self.depth_optimizer.load_state_dict(torch.load(run.root / DEPTH_OPTIMIZER, weights_only=True))

    def export(self, iteration: int, out: Path) -> None:
        vae = self.vae
        if "decoder" in self.emas:
            vae = copy.deepcopy(self.vae)
            vae.decoder.load_state_dict(self.emas["decoder"].module.state_dict())
        dit = self.wm.dit
        ema = self.emas["student"].module if "student" in self.emas else dit
        shared.export_student(out, self.config, dit, ema, vae, stage=STAGE, iteration=iteration,
                              meta=self.meta)


def train_truth(config: ModelConfig, cfg: TrainConfig, objective: TruthObjective, ddp: Distributed, *,
                teacher_dir: Path, student_dir: Path | None = None, resume: bool = False,
                prompt_encoder: PromptEncoder | None = None, clips: ClipSource | None = None,
                switch_clips: SwitchSource | None = None, vae_dir: Path | None = None) -> TrainResult:
    """Train a student with ``config`` (``shared.student_config``), started from ``student_dir`` (default:
    the teacher) and the autoencoder of ``vae_dir`` (default: the student's), on its own rollouts against the
    engine; export it to ``<out>/model``. One process."""
    if ddp.enabled:
        raise RunError("distill truth runs in one process (its self-forcing rollout is not data-parallel)")
    settings = settings_dict(stage=STAGE, model=config, train=cfg, objective=objective,
                             teacher=str(teacher_dir), student=str(student_dir or teacher_dir),
                             **({"vae": str(vae_dir)} if vae_dir else {}))
    run = prepare_run(cfg, settings, resume, ddp)
    stage = TruthStage(config, cfg, objective, ddp, settings, start_dir=student_dir or teacher_dir,
                       prompt_encoder=prompt_encoder, clips=clips, switch_clips=switch_clips,
                       vae_dir=vae_dir, resume=resume)
    return train(stage, cfg, ddp, run, resume=resume)
