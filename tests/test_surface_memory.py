"""The surface memory (``models/surface_memory.py``): texture kept in the world's texture coordinates, walls
that stop the camera, and a session that carries both."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.test_camera import BIT, CAMERA, _delta, held
from tests.train_fakes import FakePromptEncoder
from worldloop.distill.data.clips import ClipBatch, open_headings, random_poses
from worldloop.distill.stages.truth import start_streams
from worldloop.distill.world.engine import World, WorldConfig, move
from worldloop.distill.world.explorer import Explorer
from worldloop.distill.world.raycast import cast
from worldloop.models import surface_memory as sm
from worldloop.models.camera import with_reprojector
from worldloop.models.config import preset
from worldloop.models.dit import DiT
from worldloop.models.keys import KEYS
from worldloop.models.vae import LatentAutoencoder
from worldloop.models.world_model import WorldModel

SIZE, TEXELS, SIGMA = 128, 64, 1.5


def _walk(worlds: int, frames: int, seed: int = 9_400_000):
    """Explorer-driven engine frames (T of (N, 3, H, W) in [-1, 1]), poses, column depths, key vectors."""
    world = World(list(range(seed, seed + worlds)), SIZE, SIZE)
    world.reset()
    explorer = Explorer(world.seeds)
    out = []
    for t in range(frames):
        codes = explorer.act(world) if t else torch.zeros(worlds, dtype=torch.long)
        shot = world.next_frame(codes) if t else world.render()
        keys = torch.stack([(codes >> i) & 1 for i in range(len(KEYS))], 1).float()
        out.append((shot.permute(0, 3, 1, 2).float() / 127.5 - 1, world.poses.clone(),
                    world.column_depths(SIZE), keys))
    return world, out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(4 / (a - b).square().flatten(1).mean(1))).mean().item()


def _grad(x: torch.Tensor) -> float:
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean())


def test_a_memory_of_the_first_frames_redraws_the_texture_of_later_ones() -> None:
    """Written from the first 6 engine frames at the engine's poses and depths, the memory gives frame 24's
    blur (σ 1.5 px, as a resampled frame is blurred) back its texture: closer to the engine's frame than the
    blur (measured: +2.9 dB) and about as sharp."""
    world, walk = _walk(4, 25)
    sky = torch.tensor([p.has_sky for p in world.params])
    memory = sm.empty(walk[0][1], TEXELS)
    for frames, pose, depth, _ in walk[:6]:
        memory = sm.write(memory._replace(pose=pose), frames, depth, sky, CAMERA, TEXELS, SIGMA)
    frames, pose, depth, _ = walk[24]
    detail, confidence = sm.read(memory._replace(pose=pose), depth, sky, SIZE, SIZE, CAMERA, TEXELS)
    assert confidence.mean() > 0.9
    blur = sm.relative_detail(frames, SIGMA)[0] * 2 - 1
    redrawn = sm.apply(blur, detail, confidence, SIGMA)
    assert _psnr(redrawn, frames) > _psnr(blur, frames) + 2
    assert _grad(redrawn) > 0.8 * _grad(frames) > 1.5 * _grad(blur)
    # Nothing seen, nothing drawn: an empty memory leaves the frame exactly as it was.
    empty_detail, none = sm.read(sm.empty(pose, TEXELS), depth, sky, SIZE, SIZE, CAMERA, TEXELS)
    assert float(none.max()) == 0.0
    assert torch.equal(sm.apply(blur, empty_detail, none, SIGMA), blur)


def test_wall_hits_snap_a_rough_depth_to_the_engines_wall() -> None:
    """A wall depth off by up to ±5 % is snapped back onto the grid line the engine's ray hit: the same
    depth, texture coordinate and wall tile for most columns (measured: 93 % within 3 tiles; at ±20 %, 77 %:
    the nearer line in ratio is sometimes the other face's)."""
    world = World(list(range(9_400_100, 9_400_106)), 64, SIZE)
    world.reset()
    rays = sm.column_rays(world.poses, SIZE, CAMERA)
    hits = cast(world.scene.grid, world.scene.size, world.pos, rays)
    torch.manual_seed(0)
    rough = hits.dist * (1 + 0.05 * (2 * torch.rand_like(hits.dist) - 1))
    depth, u, tile = sm.wall_hits(world.poses, rough, rays)
    near = hits.dist < 3
    exact = (depth - hits.dist).abs() < 1e-3
    assert exact[near].float().mean() > 0.9
    assert ((u - hits.u).abs() < 1e-3)[near & exact].all()
    size = world.scene.size
    ty, tx = tile.clamp_min(0) // sm.MAP_TILES, tile.clamp_min(0) % sm.MAP_TILES
    assert ((tile >= 0) & (tx < size) & (ty < size))[near & exact].all()
    walls = world.scene.grid.gather(1, (ty * size + tx).clamp(max=size * size - 1)) > 0
    assert walls[near & exact].float().mean() > 0.97  # (a ray through a wall's corner may name its neighbour)


def test_advance_is_the_worlds_motion_away_from_walls() -> None:
    pose = torch.tensor([[4.5, 3.5, 0.3], [2.2, 6.1, 5.9]])
    for names in [("forward",), ("turn_left", "right"), ("back", "left", "turn_right")]:
        keys = held(*names).expand(2, -1)
        code = torch.full((2,), sum(BIT[k] for k in names))
        grid = torch.zeros(2, 64 * 64, dtype=torch.long)
        pos, angle, _ = move(grid.view(2, 64, 64), pose[:, :2], pose[:, 2], code, WorldConfig())
        out = sm.advance(pose, sm.key_motion(keys, CAMERA))
        assert torch.allclose(out, torch.cat([pos, angle[:, None]], 1), atol=1e-5)


def test_a_known_wall_stops_the_camera_and_it_slides_along() -> None:
    """A wall tile the memory has seen ahead stops a step into it; walking at it diagonally keeps the part of
    the step along it, as the built-in world does; with no wall the step is the keys' own."""
    pose = torch.tensor([[5.5, 5.5, 0.0], [5.5, 5.5, math.pi / 4], [5.5, 5.5, 0.0]])
    memory = sm.empty(pose, 8)
    walls = memory.walls.clone()
    walls[:2, 5 * sm.MAP_TILES + 6] = sm.WALL_EVIDENCE  # the tile east of the camera (rows 0 and 1 only)
    memory = memory._replace(pose=torch.tensor([[5.7, 5.5, 0.0], [5.7, 5.5, math.pi / 4], [5.7, 5.5, 0.0]]),
                             walls=walls)
    step, strafe, turn = sm.blocked(memory, held("forward").expand(3, -1), CAMERA)
    moved = sm.advance(memory.pose, (step, strafe, turn))
    assert moved[0, 0] == pytest.approx(5.7) and moved[0, 1] == pytest.approx(5.5)  # blocked
    assert moved[1, 0] == pytest.approx(5.7) and moved[1, 1] > 5.5 + 0.05  # slides south
    assert moved[2, 0] == pytest.approx(5.8)  # nothing known there: it walks


def test_a_corner_of_the_maze_stops_the_camera_until_the_map_has_seen_it_empty() -> None:
    """The maze's corners (even column and row) are drawn as walls until seen empty (``corner_depth``), and
    they stop the camera as walls do: walking at the corner (6, 6) the camera slides along it; once the map
    has seen it empty (a room's), the camera walks in."""
    pose = torch.tensor([[5.7, 5.7, math.pi / 4], [5.7, 5.7, math.pi / 4]])
    memory = sm.empty(pose, 8)
    walls = memory.walls.clone()
    walls[1, 6 * sm.MAP_TILES + 6] = -2 * sm.KNOWN_EMPTY
    memory = memory._replace(walls=walls)
    at = torch.tensor([6.5, 6.5])
    assert sm.is_solid(memory.walls, at, at).tolist() == [True, False]
    assert not sm.is_solid(memory.walls, torch.tensor([6.5, 7.5]), torch.tensor([5.5, 5.5])).any()
    moved = sm.advance(memory.pose, sm.blocked(memory, held("forward").expand(2, -1), CAMERA))
    assert moved[0, 0] > 5.75 and moved[0, 1] == pytest.approx(5.7)  # slides east along the corner
    assert moved[1, 0] > 5.75 and moved[1, 1] > 5.75  # seen empty: it walks on


@pytest.fixture
def memory_model() -> WorldModel:
    config = _delta(preset("tiny"))
    torch.manual_seed(0)
    plain = DiT(config).eval()
    config = config.replace(camera=replace(CAMERA, depth_memory=1.0, surface_memory=16, memory_colour=0.3))
    torch.manual_seed(1)
    dit = DiT(config)
    dit.load_state_dict(with_reprojector(plain.state_dict(), config))
    return WorldModel(config, dit, LatentAutoencoder(config), FakePromptEncoder(16), precision="fp32")


def test_a_session_started_with_poses_keeps_a_memory_and_moves_its_pose(memory_model: WorldModel) -> None:
    """Context frames with poses fill the memory; each moving frame dead-reckons its pose (a still one keeps
    it); a rewind restores the memory of its frame; a session without poses keeps none and plays as before."""
    wm = memory_model
    h, w = wm.frame_shape
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    poses = np.array([[5.5, 5.5, 0.0], [5.6, 5.5, 0.0], [5.7, 5.5, 0.0]])
    s = wm.new_session("a desert ruin", seed=3, first_frames=frames, first_keys=[0, 1, 1], first_poses=poses)
    assert s.memory is not None and s.memory[0] == 2
    assert float(s.memory[1].weight.sum()) > 0
    wm.next_frame([s], [BIT["turn_right"]])
    assert float(s.memory[1].pose[2]) == pytest.approx(math.radians(CAMERA.turn_degrees))
    snap = wm.snapshot(s)
    wm.next_frame([s], [0])
    assert float(s.memory[1].pose[2]) == pytest.approx(math.radians(CAMERA.turn_degrees))  # still
    wm.next_frame([s], [BIT["forward"]])
    x = float(s.memory[1].pose[0])
    assert x != pytest.approx(4.7)
    wm.restore(s, snap)
    assert s.memory is snap.memory
    other = wm.new_session("a desert ruin", seed=3, first_frames=frames, first_keys=[0, 1, 1])
    assert other.memory is None
    out = wm.next_frame([s, other], [BIT["forward"], BIT["forward"]])
    assert out.shape == (2, h, w, 3) and other.memory is None and s.memory is not None


def test_bad_first_poses_are_refused(memory_model: WorldModel) -> None:
    wm = memory_model
    h, w = wm.frame_shape
    frames = np.zeros((2, h, w, 3), dtype=np.uint8)
    for poses, match in [([[1.0, 2.0, 0.0]], "shape"), ([[1.0, 2.0], [1.0, 2.0]], "shape"),
                         ([[1.0, math.nan, 0.0], [1, 2, 0]], "finite"),
                         ([["a", 1, 2], [1, 2, 0]], "numbers")]:
        with pytest.raises(ValueError, match=match):
            wm.new_session("a desert ruin", seed=3, first_frames=frames, first_poses=poses)
    with pytest.raises(ValueError, match="without first_frames"):
        wm.new_session("a desert ruin", seed=3, first_poses=[[1.0, 2.0, 0.0]])
    with pytest.raises(ValueError, match="surface_memory"):
        replace(CAMERA, surface_memory=-1)


def test_a_prompt_switch_forgets_the_texture_and_keeps_the_walls(memory_model: WorldModel) -> None:
    """A new prompt is a new look: the memory's texture goes, its wall map (the maze) stays."""
    wm = memory_model
    h, w = wm.frame_shape
    frames = np.random.default_rng(1).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    poses = np.array([[5.5, 5.5, 0.0], [5.6, 5.5, 0.0]])  # in a maze cell's row: no corner stops the walk
    s = wm.new_session("a desert ruin", seed=3, first_frames=frames, first_poses=poses)
    walls = s.memory[1].walls.clone()
    assert float(s.memory[1].weight.sum()) > 0 and float(walls.abs().sum()) > 0
    assert float(s.memory[1].colour_weight.sum()) > 0
    wm.set_prompt(s, "an ice cave")
    at, memory = s.memory
    assert at == 1 and float(memory.weight.abs().sum()) == 0 and float(memory.detail.abs().sum()) == 0
    assert float(memory.colour.abs().sum()) == 0 and float(memory.colour_weight.abs().sum()) == 0
    assert torch.equal(memory.walls, walls)
    assert torch.equal(memory.pose, torch.tensor(poses[-1], dtype=torch.float32))
    for _ in range(wm.config.camera.repaint_frames + 2):  # generated frames fill it again, once repainted
        wm.next_frame([s], [BIT["forward"]])
    assert float(s.memory[1].weight.sum()) > 0


def test_after_a_prompt_switch_the_memory_waits_for_the_repaint(memory_model: WorldModel) -> None:
    """For ``camera.repaint_frames`` frames after a switch the generated frames (still in the old prompt's
    look) neither fill the texture and colour memory nor are pulled by it; then it learns again. A rewind
    restores the repaint's frame count."""
    wm = memory_model
    repaint = wm.config.camera.repaint_frames
    assert repaint >= 2
    h, w = wm.frame_shape
    frames = np.random.default_rng(1).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    s = wm.new_session("a desert ruin", seed=3, first_frames=frames,
                       first_poses=[[5.5, 5.5, 0.0], [5.6, 5.5, 0.0]])
    wm.set_prompt(s, "an ice cave")
    assert s.repaint_until == s.frame_index + repaint
    snap = wm.snapshot(s)
    for _ in range(repaint):
        wm.next_frame([s], [BIT["forward"]])
        assert float(s.memory[1].colour_weight.sum()) == 0 and float(s.memory[1].weight.sum()) == 0
    wm.next_frame([s], [BIT["forward"]])
    wm.next_frame([s], [BIT["forward"]])
    assert float(s.memory[1].colour_weight.sum()) > 0 and float(s.memory[1].weight.sum()) > 0
    wm.restore(s, snap)
    assert s.repaint_until == snap.repaint_until and float(s.memory[1].colour_weight.sum()) == 0
    with pytest.raises(ValueError, match="repaint_frames"):
        replace(CAMERA, repaint_frames=-1)


def _bank(wm: WorldModel, prompts: list[str]) -> sm.Looks:
    """A bank of looks for ``wm``: one entry per prompt (its vector from the model's encoder), random
    texture, a colour and a fog of its own."""
    k, atlas = len(prompts), sm.atlas_size(wm.config.camera.surface_memory)
    g = torch.Generator().manual_seed(5)
    vectors = wm.prompt_encoder.encode(prompts).tokens[:, 0]
    colour = torch.linspace(0.2, 0.8, k).view(k, 1, 1).expand(k, 3, atlas).clone()
    fog = torch.stack([torch.tensor([0.1 * i, 0.2, 0.3, 0.05 * (i + 1)]) for i in range(k)])
    detail, confidence = 0.3 * torch.randn(k, 3, atlas, generator=g), torch.ones(k, 2, atlas)
    return sm.Looks(torch.nn.functional.normalize(vectors, dim=-1), detail, colour, confidence, fog)


def test_a_prompt_switch_starts_from_the_banks_nearest_look(memory_model: WorldModel) -> None:
    """With a bank of looks the switched memory holds the look of the entry nearest the new prompt (texture,
    colour, fog) and keeps it while it repaints, learning nothing from the frames; a prompt near no entry
    starts from nothing, as without a bank."""
    wm = memory_model
    h, w = wm.frame_shape
    frames = np.random.default_rng(2).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    wm.looks = looks = _bank(wm, ["an ice cave", "a desert ruin"])
    try:
        poses = [[5.5, 5.5, 0.0], [5.6, 5.5, 0.0]]
        s = wm.new_session("a dungeon", seed=3, first_frames=frames, first_poses=poses)
        wm.set_prompt(s, "a desert ruin")
        memory = s.memory[1]
        assert torch.allclose(memory.detail / memory.weight, looks.detail[1], atol=1e-5)
        assert torch.allclose(memory.colour / memory.colour_weight, looks.colour[1], atol=1e-5)
        assert torch.equal(memory.fog, looks.fog[1]) and float(memory.weight.min()) == 0.5
        for _ in range(3):
            wm.next_frame([s], [BIT["forward"]])
        assert torch.allclose(s.memory[1].weight, memory.weight)  # repainting: the look stays the bank's
        assert torch.allclose(s.memory[1].colour_weight, memory.colour_weight)
        wm.set_prompt(s, "zzz qqq")  # a fake vector near neither entry
        assert float(s.memory[1].weight.sum()) == 0 and float(s.memory[1].colour_weight.sum()) == 0
        wm.close_session(s)
    finally:
        wm.looks = None


def test_fit_pose_finds_where_in_its_tile_and_which_way_the_camera_stands() -> None:
    """From one frame's engine depth alone: the heading (up to the grid's quarter turns) within 3 degrees and
    the tile-centre position within 0.1 tile, for 8 worlds."""
    world = World(list(range(2**30 + 50, 2**30 + 58)), SIZE, SIZE)
    g = torch.Generator().manual_seed(0)
    world.set_poses(random_poses(world.grid.cpu(), g))
    world.set_poses(open_headings(world, g))
    depth = world.column_depths(SIZE)
    quarter = math.pi / 2
    for true, row in zip(world.poses, depth, strict=True):
        fit = sm.fit_pose(row, CAMERA)
        turn = (float(true[2]) - float(fit[2])) % quarter
        assert min(turn, quarter - turn) < math.radians(3)
        assert float((fit[:2] - torch.remainder(true[:2], 1)).abs().max()) <= 0.1 + 1e-6


def test_a_picture_starts_a_memory_at_the_pose_its_depth_fits(memory_model: WorldModel) -> None:
    """Frames whose poses are unknown (all NaN: a picture) start a memory from the last one at a fitted pose
    in the map's middle; poses partly NaN are refused before any state changes."""
    from worldloop.models.world_model import PROMPT_START_POSE

    wm = memory_model
    h, w = wm.frame_shape
    frames = np.random.default_rng(5).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    s = wm.new_session("a dungeon", seed=2, first_frames=frames, first_poses=np.full((2, 3), np.nan))
    assert s.memory is not None and s.memory[0] == 1 and float(s.memory[1].weight.sum()) > 0
    pose = s.memory[1].pose
    assert PROMPT_START_POSE[0] - 0.5 <= float(pose[0]) < PROMPT_START_POSE[0] + 0.5
    assert 0 <= float(pose[2]) < math.pi / 2
    wm.next_frame([s], [BIT["forward"]])
    wm.close_session(s)
    with pytest.raises(ValueError, match="all NaN"):
        wm.new_session("a dungeon", seed=2, first_frames=frames,
                       first_poses=[[4.5, 4.5, 0.0], [math.nan] * 3])
    assert not wm._sessions  # nothing was opened


def test_a_stream_from_the_prompt_alone_starts_from_the_banks_look(memory_model: WorldModel) -> None:
    """No frames, no poses: with a bank of looks the stream's memory holds the nearest entry's look at
    ``PROMPT_START_POSE`` with no walls mapped, and moves from there as it plays; without a bank, or for a
    prompt near no entry, it keeps none."""
    from worldloop.models.world_model import PROMPT_START_POSE

    wm = memory_model
    s = wm.new_session("a desert ruin", seed=1)
    assert s.memory is None  # no bank
    wm.close_session(s)
    wm.looks = looks = _bank(wm, ["an ice cave", "a desert ruin"])
    try:
        s = wm.new_session("a desert ruin", seed=1)
        assert s.memory is not None and s.memory[0] == 0
        memory = s.memory[1]
        assert memory.pose.tolist() == pytest.approx(list(PROMPT_START_POSE))
        assert torch.allclose(memory.detail / memory.weight, looks.detail[1], atol=1e-5)
        assert float(memory.walls.abs().sum()) == 0
        for _ in range(3):
            wm.next_frame([s], [BIT["forward"]])
        assert s.memory[0] == s.frame_index - 1 and float(s.memory[1].pose[0]) > PROMPT_START_POSE[0]
        wm.reset(s, prompt="zzz qqq")  # near neither entry
        assert s.memory is None
        wm.close_session(s)
    finally:
        wm.looks = None


def test_the_shown_frame_gets_the_memorys_detail_moving_or_still(memory_model: WorldModel) -> None:
    """The DiT's frame, decoded, has the memory's texture drawn on it again where the memory is sharper, the
    same whether the camera moved or stood still (else the picture would soften each time the player
    stops); a session without poses shows its decoded frame as it is."""
    wm = memory_model
    h, w = wm.frame_shape
    frames = np.random.default_rng(4).integers(0, 256, (2, h, w, 3), dtype=np.uint8)  # much texture
    poses = [[5.5, 5.5, 0.0], [5.6, 5.5, 0.0]]
    s = wm.new_session("a dungeon", seed=3, first_frames=frames, first_poses=poses)
    plain = wm.new_session("a dungeon", seed=3, first_frames=frames)
    for held_keys in ([BIT["forward"], BIT["forward"]], [0, 0], [BIT["turn_left"], 0]):
        shown = wm.next_frame([s, plain], held_keys)
        decoded = wm.vae.decode_frames(torch.stack([s.pending, plain.pending]).to(wm.device)).cpu().numpy()
        assert np.abs(shown[0].astype(int) - decoded[0]).mean() > 2, held_keys
        assert np.array_equal(shown[1], decoded[1])
        assert np.array_equal(s.shown[1].cpu().numpy(), shown[0])  # the next move starts from what was shown
    wm.close_session(s)
    wm.close_session(plain)


def test_a_discarded_speculative_frame_keeps_the_memory(memory_model: WorldModel) -> None:
    """The server makes frames speculatively and discards them on a key change: the stream must come back to
    the memory, carried depth and anchor it had, not lose them."""
    wm = memory_model
    h, w = wm.frame_shape
    frames = np.random.default_rng(2).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    s = wm.new_session("a desert ruin", seed=3, first_frames=frames,
                       first_poses=[[5.5, 5.5, 0.0], [5.6, 5.5, 0.0]])
    wm.next_frame([s], [BIT["forward"]])
    before, carried, anchor = s.memory, s.carried, s.anchor
    assert carried is not None
    wm.next_frame([s], [BIT["turn_left"]], speculative=True)
    assert s.memory is not before and s.carried is not carried
    wm.discard(s)
    assert s.memory is before and s.carried is carried and s.anchor is anchor
    wm.next_frame([s], [BIT["forward"]])
    assert s.memory is not None and s.memory[0] == s.frame_index - 1


def test_training_rollouts_start_with_the_clips_poses(memory_model: WorldModel) -> None:
    """``distill truth`` restarts its streams with the clip's poses, so a model with a surface memory trains
    with it on; clips without poses start streams without one."""
    wm = memory_model
    h, w = wm.frame_shape
    frames = torch.randint(0, 256, (2, 5, h, w, 3), dtype=torch.uint8)
    poses = torch.tensor([4.5, 4.5, 0.0]).expand(2, 5, 3).clone()
    poses[1, :, 0] += torch.arange(5) * 0.1
    keys, themes = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    clips = ClipBatch(frames, keys, ["a", "b"], themes, poses=poses)
    sessions = [wm.new_session("a", seed=0), wm.new_session("b", seed=1)]
    start_streams(wm, sessions, clips, context=3, first=4, seeds=[0, 1])
    for i, s in enumerate(sessions):
        assert s.memory is not None and s.memory[0] == 2
        assert torch.allclose(s.memory[1].pose, poses[i, 3])
    start_streams(wm, sessions, dataclasses.replace(clips, poses=None), context=3, first=4, seeds=[0, 1])
    assert all(s.memory is None for s in sessions)


def test_the_memory_draws_only_where_its_detail_is_stronger_than_the_frames() -> None:
    """A sharp frame keeps its own texture over a fainter memory; a flat one takes the memory's."""
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = (((yy // 2 + xx // 2) % 2).float() * 2 - 1).expand(1, 3, 32, 32)
    sharp = 0.4 * checker  # in [-1, 1]: grey ± 0.4
    flat = torch.zeros(1, 3, 32, 32)
    faint = 0.1 * checker.flip(-1)  # the memory's detail: weaker, and not where the frame's is
    confident = torch.ones(1, 1, 32, 32)
    kept = sm.apply(sharp, faint, confident, SIGMA)
    inner = (..., slice(8, 24), slice(8, 24))
    assert torch.allclose(kept[inner], sharp[inner], atol=0.05)
    drawn = sm.apply(flat, faint, confident, SIGMA)
    assert float((drawn[inner] - flat[inner]).abs().mean()) > 0.02
    assert float(sm.apply(flat, faint, torch.zeros_like(confident), SIGMA).abs().max()) == 0


def test_a_rough_depth_maps_few_false_walls_and_never_the_cameras_own_tile() -> None:
    """Read at the depth network's accuracy (log depth off by 12 %), the wall map marks few walls where the
    maze has none (at most 2 %; at a threshold of half a sighting it was 11 %): only near readings count in
    full, the floor each ray crossed is seen empty, and a wall takes ``WALL_EVIDENCE`` sightings. With the
    engine's depth it is exact."""
    world, walk = _walk(16, 9, seed=9_400_200)
    size = world.scene.size
    grid = world.scene.grid.view(-1, size, size) > 0
    sky = torch.tensor([p.has_sky for p in world.params])
    g = torch.Generator().manual_seed(0)
    for noise, most_false, least_true in ((0.0, 0.0, 75), (0.12, 0.02, 60)):
        memory = sm.empty(walk[0][1], TEXELS)
        for frames, pose, depth, _ in walk:
            rough = depth * torch.exp(noise * torch.randn(depth.shape, generator=g))
            memory = sm.write(memory._replace(pose=pose), frames, rough, sky, CAMERA, TEXELS, SIGMA)
        marked = memory.walls.view(-1, sm.MAP_TILES, sm.MAP_TILES)[:, :size, :size] >= sm.WALL_EVIDENCE
        false, true = int((marked & ~grid).sum()), int((marked & grid).sum())
        assert true > least_true and false <= most_false * (true + false), (noise, true, false)
        pose = walk[-1][1]
        assert not sm.is_wall(memory.walls, pose[:, 0], pose[:, 1]).any()


def test_the_wall_map_gives_the_depth_of_the_walls_it_knows() -> None:
    """Through tiles seen empty to a mapped wall, a column's depth is the engine's; where the ray first
    meets a tile the map does not know, the reading stays."""
    world, walk = _walk(6, 9, seed=9_400_300)
    sky = torch.tensor([p.has_sky for p in world.params])
    memory = sm.empty(walk[0][1], TEXELS)
    for frames, pose, depth, _ in walk:
        memory = sm.write(memory._replace(pose=pose), frames, depth, sky, CAMERA, TEXELS, SIGMA)
    _, pose, depth, _ = walk[-1]
    reading = torch.full_like(depth, 123.0)
    mapped = sm.map_depth(memory.walls, pose, reading, CAMERA)
    known = mapped != 123.0
    assert known.float().mean() > 0.6
    right = ((mapped - depth).abs() < 0.02 * depth)[known].float().mean()
    assert right > 0.97, float(right)  # (a ray past a wall's corner may meet the neighbouring face)
    blank = sm.map_depth(sm.empty(pose, TEXELS).walls, pose, reading, CAMERA)
    assert torch.equal(blank, reading)


def test_fit_fog_reads_the_fog_of_a_dark_theme_from_its_frames() -> None:
    """Where a stream's first frames show fog (a fitted density of 0.1 per tile or more, where its colour
    matters), its colour is the world's within 0.15 per channel (themes whose fog is darker than their
    lamps); a fog-free grey corridor fits no fog."""
    world = World(list(range(9_600_000, 9_600_012)), SIZE, SIZE)
    world.reset()
    explorer = Explorer(world.seeds)
    frames, depths = [], []
    for t in range(9):
        shot = world.next_frame(explorer.act(world)) if t else world.render()
        frames.append(shot.permute(0, 3, 1, 2).float() / 127.5 - 1)
        depths.append(world.column_depths(SIZE))
    frames, depths = torch.stack(frames, 1), torch.stack(depths, 1)
    checked = 0
    for i, p in enumerate(world.params):
        if p.theme not in ("ice cave", "dungeon", "neon city", "toxic lab"):
            continue
        fog = sm.fit_fog(frames[i], depths[i], torch.tensor(p.has_sky).expand(9), CAMERA, SIGMA)
        assert 0 <= float(fog[3]) <= sm.MAX_FOG
        if float(fog[3]) >= 0.1:
            assert (fog[:3] - torch.tensor(p.fog_color)).abs().max() < 0.15, (p.theme, fog, p.fog_color)
            checked += 1
    assert checked >= 4
    depth = torch.linspace(0.8, 4.0, SIZE).expand(3, SIZE)
    flat = torch.full((3, 3, SIZE, SIZE), 0.2)
    assert float(sm.fit_fog(flat, depth, torch.zeros(3, dtype=torch.bool), CAMERA, SIGMA)[3]) == 0


def test_the_colour_memory_brings_back_the_light_a_frame_lost() -> None:
    """A memory written from real frames with their fog, read back at the same poses, gives their colour;
    pulled towards it, a frame gone dark regains its light in proportion to the pull."""
    world, walk = _walk(4, 6, seed=9_400_400)
    sky = torch.tensor([p.has_sky for p in world.params])
    camera = replace(CAMERA, memory_colour=0.5)
    frames0, pose0, depth0, _ = walk[0]
    fog = torch.stack([sm.fit_fog(frames0[i: i + 1], depth0[i: i + 1], sky[i: i + 1], camera, SIGMA)
                       for i in range(4)])
    memory = sm.empty(pose0, TEXELS)._replace(fog=fog)
    for frames, pose, depth, _ in walk:
        memory = sm.write(memory._replace(pose=pose), frames, depth, sky, camera, TEXELS, SIGMA)
    frames, pose, depth, _ = walk[-1]
    seen = sm.look(memory._replace(pose=pose), depth, sky, SIZE, SIZE, camera, TEXELS, colour=True)
    blur = sm.relative_detail(frames, SIGMA)[0]
    known = seen.colour_confidence.expand_as(blur) > 0.9
    assert known.float().mean() > 0.5
    assert float((seen.colour - blur)[known].abs().mean()) < 0.06
    dark = frames * 0.5 - 0.5  # half the light
    lit = (frames + 1) / 2
    for pull in (0.5, 1.0):
        out = sm.apply(dark, seen.detail, seen.confidence, SIGMA, seen.colour, seen.colour_confidence, pull)
        before = float(((dark + 1) / 2 - lit)[known].abs().mean())
        after = float(((out + 1) / 2 - lit)[known].abs().mean())
        assert after < before * (1 - 0.6 * pull), (pull, before, after)
    unchanged = sm.apply(dark, seen.detail, torch.zeros_like(seen.confidence), SIGMA, seen.colour,
                         torch.zeros_like(seen.confidence), 1.0)
    assert torch.equal(unchanged, dark.float())
    with pytest.raises(ValueError, match="memory_colour"):
        replace(CAMERA, memory_colour=1.5)


def test_a_new_view_gets_the_depth_the_wall_map_suggests() -> None:
    """Through floor the map knows to a wall it knows: that wall's depth; into a tile it does not know (or
    one only generated frames' few sightings call floor), unless it is one of the maze's cells: a wall
    ``beyond`` tiles past the ray's entry."""
    pose = torch.tensor([[5.5, 5.5, 0.0], [5.5, 5.5, 0.0], [5.5, 5.5, 0.0]])  # facing east (+x)
    walls = sm.empty(pose, 8).walls.clone()
    row = 5 * sm.MAP_TILES
    walls[0, row + 6] = walls[0, row + 7] = -2 * sm.KNOWN_EMPTY
    walls[0, row + 8] = sm.WALL_EVIDENCE  # row 0: floor to x = 8, then a wall: its face at x = 8
    walls[2, row + 6] = -0.1 * sm.KNOWN_EMPTY  # row 2: a generated frame's guess of floor does not count
    depth = sm.guess_depth(walls, pose, 32, CAMERA, beyond=1.0)
    centre = depth[:, 15:17].mean(1)
    assert float(centre[0]) == pytest.approx(2.5, abs=0.02)
    # Rows 1 and 2 know only their own tile: the ray enters the next at x = 6, the wall stands one tile on.
    assert centre[1:].tolist() == pytest.approx([1.5, 1.5], abs=0.02)
    assert torch.isfinite(depth).all() and float(depth.min()) > 0.4
    # The maze's cells (odd column and row) are never walls: from the passage at x = 4 the ray goes on through
    # the unknown cell (5, 5) and stops in the unknown passage after it, at x = 6 (+ beyond).
    passage = torch.tensor([[4.5, 5.5, 0.0]])
    ahead = sm.guess_depth(sm.empty(passage, 8).walls, passage, 32, CAMERA, beyond=1.0)
    assert float(ahead[:, 15:17].mean()) == pytest.approx(2.5, abs=0.02)


def test_a_reading_that_puts_a_wall_where_none_can_stand_takes_the_maps_guess() -> None:
    """A reading nearer than the floor the map knows (or inside one of the maze's cells) is a wall the DiT
    drew where the world has none: the previous frame's depth becomes the map's guess there; a reading at or
    past what the map rules out stays, as do streams without a memory."""
    pose = torch.tensor([[5.5, 5.5, 0.0], [5.5, 5.5, 0.0]])  # facing east (+x), in the cell (5, 5)
    memory = sm.empty(pose, 8)
    walls = memory.walls.clone()
    row = 5 * sm.MAP_TILES
    walls[:, row + 6] = -2 * sm.KNOWN_EMPTY  # the passage x ∈ [6, 7) was seen empty; (7, 5) is a cell
    walls[:, row + 8] = sm.WALL_EVIDENCE  # and a wall at x = 8
    memory = memory._replace(walls=walls)
    clear = sm.clear_depth(walls, pose, 32, CAMERA)
    assert clear[:, 14:18].flatten().tolist() == pytest.approx([2.5] * 8, abs=0.06)
    cam = replace(CAMERA, memory_reveal=0.5)
    keys = held("forward").expand(2, -1)
    redraw = sm.Redrawer(memory, keys, torch.tensor([True, False]), cam)
    reading = torch.full((2, 32), 1.0)  # a wall half a tile ahead, at x = 6.5: in the passage seen empty
    reading[:, :4] = 0.4  # the left columns look across the cell at its side wall
    out = redraw.depth(reading)
    assert out[0, 14:18].tolist() == pytest.approx([2.5] * 4, abs=0.02)  # the mapped wall at x = 8
    assert torch.equal(out[1], reading[1])  # no memory: the reading stays
    near = redraw.depth(torch.full((2, 32), 2.45))  # within the margin of the wall: kept as read
    assert near[0, 14:18].tolist() == pytest.approx([2.45] * 4, abs=0.02)


def test_a_reading_past_a_corner_of_the_maze_the_map_has_not_seen_empty_stops_there() -> None:
    """The maze's corners (even column and row) are walls unless a room cleared them: a reading that puts its
    wall farther than the first corner the map has not seen empty takes the corner's depth; once the map has
    seen that corner empty, the next one bounds it."""
    pose = torch.tensor([[5.5, 5.5, math.pi / 4]] * 2)  # looking across the corner (6, 6)
    memory = sm.empty(pose, 8)
    corner, met = sm.corner_depth(memory.walls, pose, 32, CAMERA)
    assert bool(met[:, 15:17].all())
    assert corner[:, 15:17].flatten().tolist() == pytest.approx([0.5 * math.sqrt(2)] * 4, abs=0.05)
    cam = replace(CAMERA, memory_reveal=0.5)
    keys = held("forward").expand(2, -1)
    far = torch.full((2, 32), 3.0)  # the DiT's picture opened up: a wall three tiles off, past the corner
    out = sm.Redrawer(memory, keys, torch.tensor([True, False]), cam).depth(far)
    assert out[0, 15:17].tolist() == pytest.approx([0.5 * math.sqrt(2)] * 2, abs=0.05)
    assert torch.equal(out[1], far[1])  # no memory: as read
    walls = memory.walls.clone()
    walls[:, 6 * sm.MAP_TILES + 6] = -2 * sm.KNOWN_EMPTY  # the corner was a room's, seen empty
    seen = memory._replace(walls=walls)
    # The next corner on the diagonal, (8, 8), is 2.5 √2 ≈ 3.54 tiles off: a wall read at 3.45 stays.
    kept = sm.Redrawer(seen, keys, torch.tensor([True, False]), cam).depth(torch.full((2, 32), 3.45))
    assert kept[0, 15:17].tolist() == pytest.approx([3.45] * 2, abs=0.02)
    beyond = sm.Redrawer(seen, keys, torch.tensor([True, False]), cam).depth(torch.full((2, 32), 5.0))
    assert beyond[0, 15:17].tolist() == pytest.approx([2.5 * math.sqrt(2)] * 2, abs=0.1)  # (a ray along the
    # diagonal grazes the passages beside the corner)


def test_the_memory_fills_what_a_turn_uncovers(memory_model: WorldModel) -> None:
    """With ``camera.memory_reveal`` the columns a turn uncovers (NaN in the carried depth) take the wall
    map's guess and are drawn with the memory's texture; the others, and streams without a memory, keep
    theirs; without it nothing changes."""
    cam = replace(memory_model.config.camera, memory_reveal=0.5)
    pose = torch.tensor([[4.5, 4.5, 0.0], [4.5, 4.5, 0.0]])
    memory = sm.empty(pose, 8)
    keys = held("turn_right").expand(2, -1)
    carried = torch.full((2, 16), 2.0)
    carried[:, 12:] = math.nan  # the turn's new side
    active = torch.tensor([True, False])
    redraw = sm.Redrawer(memory, keys, active, cam)
    redraw.motion(keys)
    out = redraw.reveal(carried)
    assert torch.isfinite(out[0]).all() and torch.equal(out[0, :12], carried[0, :12])
    assert torch.isnan(out[1, 12:]).all()  # no memory: nothing to guess from
    assert redraw.revealed is not None and redraw.revealed[0, 12:].all() and not redraw.revealed[0, :12].any()
    off = sm.Redrawer(memory, keys, active, replace(cam, memory_reveal=0.0))
    off.motion(keys)
    assert off.reveal(carried) is carried and off.revealed is None
    with pytest.raises(ValueError, match="memory_reveal"):
        replace(CAMERA, memory_reveal=-1.0)
    # Drawn: where revealed, the memory's detail replaces the frame's own even where the frame's is stronger.
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(1, 3, 16, 16, generator=g) * 2 - 1) * 0.5
    detail = 0.05 * torch.randn(1, 3, 16, 16, generator=g)
    confidence = torch.ones(1, 1, 16, 16)
    reveal = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    reveal[..., 12:] = True
    kept = sm.apply(frames, detail, confidence, 1.0)
    drawn = sm.apply(frames, detail, confidence, 1.0, reveal=reveal)
    assert torch.allclose(drawn[..., :11], kept[..., :11], atol=1e-6)
    assert float((drawn[..., 13:] - kept[..., 13:]).abs().mean()) > 0.02
