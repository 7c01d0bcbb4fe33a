"""What every training stage shares: the run settings, devices and DDP, EMA, the optimizer update.

Each stage (``vae``, ``teacher``, ``cd``, ``dmd``) plugs its iteration into the one loop (``loop.py``), which
uses these pieces and those of ``run.py`` (run directory, checkpoints, logs). A run directory holds:

    train.json        the run's settings (model config, train config, objective), rewritten on every start
    checkpoint.pt     the latest resumable state: weights, EMA, optimizer, iteration, RNG state (atomic)
    log.jsonl         one JSON object per logged iteration
    samples/          periodic PNGs and MP4s
    model/            the exported model directory (``models/checkpoint.py`` format)

Determinism: every random draw of an iteration (its data, noise levels, noise, dropout) comes from a
generator seeded by ``(seed, iteration, rank)`` (``step_generator``), so a resumed run continues with exactly
the numbers the uninterrupted run would have used; the global torch RNG state is saved as well for anything
else. The learning rate is warm-up then constant: it never depends on the total number of iterations, so a
run can be extended or continued across GPU sessions without changing its past.
"""

from __future__ import annotations

import copy
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from worldloop.models.device import resolve_device


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every stage; parsed once by the CLI and saved in every checkpoint."""

    iterations: int = 1000  # total optimizer updates of the run (a resumed run continues up to this)
    cpu_minutes: float = 0.0  # also stop after this much process CPU time (since the run (re)started); 0: off
    minutes: float = 0.0  # also stop after this much wall-clock time (since the run (re)started); 0: off
    batch_size: int = 8  # global: split evenly over the DDP processes
    lr: float = 3e-4
    warmup: int = 100  # linear learning-rate warm-up iterations (again after --init-from)
    cooldown: int = 0  # the last this many of ``iterations`` decay the learning rate linearly towards 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    clip_frames: int = 8  # frames per training clip (teacher, IDM)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = False  # bf16 autocast
    compile: bool = False  # torch.compile the model
    out: str = "runs/run"
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    episodes: str | None = None  # a folder of recorded episodes instead of the built-in world
    pool_clips: int = -1  # reuse rendered clips from a pool of this many: -1 auto (256 CPU, 4096 CUDA)
    pool_refresh: int = 25  # iterations between re-rendering one chunk of the pool
    optimizer: str = "adamw"  # adamw | muon (Muon on the hidden matrices, AdamW on the rest)
    snapshot_minutes: float = 0.0  # export the model every this many process CPU minutes (0: off)

    def __post_init__(self) -> None:
        checks = {
            "iterations": self.iterations >= 1, "cpu_minutes": self.cpu_minutes >= 0,
            "minutes": self.minutes >= 0,
            "batch_size": self.batch_size >= 1, "lr": 0 < self.lr < 1,
            "warmup": self.warmup >= 0, "cooldown": 0 <= self.cooldown <= self.iterations,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip >= 0,
            "ema_decay": 0 <= self.ema_decay < 1, "clip_frames": 2 <= self.clip_frames <= 1024,
            "log_every": self.log_every >= 1, "sample_every": self.sample_every >= 0,
            "checkpoint_every": self.checkpoint_every >= 1, "pool_clips": self.pool_clips >= -1,
            "pool_refresh": self.pool_refresh >= 0, "optimizer": self.optimizer in OPTIMIZERS,
            "snapshot_minutes": self.snapshot_minutes >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range")


# ----------------------------------------------------------------------------------------------------------
# Devices and distributed training


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str, init_method: str | None = None) -> Distributed:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU).

    Rank and size come from torchrun's environment; ``init_method`` (e.g. ``file://...``) replaces its
    TCP rendezvous (MASTER_ADDR/MASTER_PORT), as tests that spawn processes themselves do.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:  # share the cores between the processes of this machine
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
            torch.set_num_threads(min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) // local)))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                                    rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank, device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, ddp: Distributed) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks stop at the same iteration)."""
    if not ddp.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ddp.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def local_batch_size(batch_size: int, ddp: Distributed) -> int:
    if batch_size % ddp.world_size:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {ddp.world_size} processes")
    return batch_size // ddp.world_size


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively here: any CUDA device, or a CPU with AVX512-BF16 or AMX. On this
    project's 2-core AVX512-BF16 CPU it trains the teacher about 1.6× faster per CPU second than fp32
    (docs/training-recipe.md); without those instructions bf16 is emulated and slower."""
    if device.type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cpu" and any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA or CPU when enabled; otherwise a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def step_generator(seed: int, iteration: int, rank: int, device: torch.device, stream: int = 0
                   ) -> torch.Generator:
    """A generator owned by one (seed, iteration, rank, stream): resumable without saving generator state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + iteration * 8_191 + rank * 131 + stream) % (2**63 - 1))
    return g


@dataclass
class TrainResult:
    """What a training stage returns: the exported model directory, the last iteration, the trained module,
    and why it stopped before ``cfg.iterations`` (``STOPPED_BY``), None when it reached them."""

    model_dir: Path
    iteration: int
    model: nn.Module
    stopped: str | None = None


STOPPED_BY = ("signal", "cpu_minutes", "minutes")  # SIGTERM/Ctrl-C, the CPU-time or the wall-clock budget


# ----------------------------------------------------------------------------------------------------------
# Optimisation


class EMA:
    """An exponential moving average of a module's parameters (buffers are copied), kept as a module.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so early averages are
    not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then constant (EMA does the averaging a decay would), so a run can be
    extended without changing its past; with ``cfg.cooldown`` the last iterations decay it linearly (from
    ``lr`` to ``lr / cooldown``): the end of a long run, resumed with its final ``--iterations``."""
    lr = cfg.lr
    if cfg.warmup and iteration < cfg.warmup:
        lr *= (iteration + 1) / cfg.warmup
    left = cfg.iterations - iteration
    if cfg.cooldown and left <= cfg.cooldown:
        lr *= max(left, 1) / cfg.cooldown
    return lr


OPTIMIZERS = ("adamw", "muon")


class Optimizers:
    """Several optimizers stepped as one (Muon on the hidden matrices, AdamW on the rest), with the part of
    ``torch.optim.Optimizer``'s interface the loop uses: ``param_groups`` (the loop sets every group's
    ``lr``), ``zero_grad``, ``step`` and one state dict for checkpoints."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts
        self.param_groups = [g for opt in parts for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [opt.state_dict() for opt in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("parts")
        if not isinstance(parts, list) or len(parts) != len(self.parts):
            raise ValueError("the checkpoint's optimizer state is not this run's optimizer "
                             "(--optimizer differs?)")
        for opt, part in zip(self.parts, parts, strict=True):
            opt.load_state_dict(part)


# Newton-Schulz coefficients of the quintic iteration that Muon uses (Jordan et al., 2024): they push every
# singular value of the normalised update towards 1 in five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to a 2-D ``update`` (approximately ``U Vᵀ`` of its SVD), by
    ``steps`` Newton-Schulz iterations computed in ``dtype``; returned in ``update``'s dtype."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    x = x / x.norm().clamp_min(1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.T).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden matrices: Nesterov momentum, the update orthogonalised by Newton-Schulz, its
    size matched to AdamW's (0.2·√max(rows, cols) × lr) and decoupled weight decay, as ``torch.optim.Muon``
    with ``adjust_lr_fn="match_rms_adamw"`` (its state is the same ``momentum_buffer``). The difference is
    ``dtype``: torch's always iterates in bf16, which a CPU without native bf16 emulates, 30× slower than
    float32 on this project's AVX2 CPU (1.1 s against 0.04 s for one 1024 × 256 matrix), so a Muon
    iteration of the default DiT took 28 s instead of 7."""

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, steps: int = 5, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "nesterov": nesterov, "steps": steps})
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("Muon takes no closure")
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.ndim != 2:
                    raise ValueError(f"Muon updates 2-D matrices only, not a {tuple(p.grad.shape)} tensor")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["steps"], self.dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * max(p.shape) ** 0.5)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights of the transformer blocks' linear maps (``blocks.*``): what Muon orthogonalises.
    Embeddings, the input/output projections, norms, biases and the zero-initialised adaLN modulations stay
    with AdamW (Muon's update of a zero matrix is fine, but the modulations are conditioning, not hidden
    features)."""
    return [p for n, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and ".blocks." in f".{n}" and "modulation" not in n]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay only on matrices and kernels (not on biases, norms or embeddings' scales);
    with ``cfg.optimizer == "muon"`` the blocks' hidden matrices go to Muon instead (its learning rate matched
    to AdamW's update size, so one ``--lr`` serves both)."""
    muon = hidden_matrices(model) if cfg.optimizer == "muon" else []
    taken = {id(p) for p in muon}
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and id(p) not in taken]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    if not muon:
        return adamw
    muon_opt = Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    dtype=torch.bfloat16 if fast_bf16(device) else torch.float32)
    return Optimizers([muon_opt, adamw])  # type: ignore[return-value]  # duck-typed: what the loop uses


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                   grad_clip: float) -> float:
    """Backward, clip, optimizer update; returns the gradient norm before clipping. A parameter group with
    an ``lr_scale`` entry steps at that multiple of ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return float(norm)


def wrap_model(model: nn.Module, cfg: TrainConfig, ddp: Distributed) -> nn.Module:
    """Optionally compile, then wrap in DDP when several processes train together."""
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if ddp.enabled:
        ids = [ddp.device.index] if ddp.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model
