"""Two-process DDP training on CPU (gloo): the teacher's steps run and the replicas stay identical."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.train_fakes import FakeClips, FakePromptEncoder, random_model_dir
from worldloop.distill.stages.runtime import TrainConfig, setup_distributed, teardown_distributed
from worldloop.distill.stages.teacher import TeacherObjective, train_teacher
from worldloop.models.config import preset


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, world_size: int, root: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    config = preset("tiny")
    ddp = setup_distributed("cpu", init_method=f"file://{root}/rendezvous")  # no TCP port to collide on
    cfg = TrainConfig(iterations=3, batch_size=4, lr=1e-3, warmup=0, clip_frames=3, out=f"{root}/run",
                      log_every=1, sample_every=0, checkpoint_every=100, device="cpu")
    try:
        # Each rank gets its own clips, as make_clip_source would give it.
        result = train_teacher(config, cfg, TeacherObjective(), ddp, vae_from=Path(root) / "vae",
                               prompt_encoder=FakePromptEncoder(config.dit.max_prompt_tokens),
                               clips=FakeClips(32, 32, 3, rank=ddp.rank))
        Path(root, f"rank{rank}.txt").write_text(_digest(result.model))
    finally:
        teardown_distributed()


def test_two_process_ddp_step_keeps_replicas_in_sync(tmp_path: Path) -> None:
    random_model_dir(preset("tiny"), tmp_path / "vae")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[0]["frames_per_s"] > 0
    rank0, rank1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert rank0 == rank1
    torch.manual_seed(0)
    from worldloop.models.dit import DiT

    assert rank0 != _digest(DiT(preset("tiny")))  # the replicas did train
