"""Camera reprojection (models/camera.py): the flow of each key's motion, the raycast world's inverse depth,
agreement with the built-in world's own frames, the DiT's moved-previous input, and a reprojecting
WorldModel."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tests.train_fakes import FakePromptEncoder
from worldloop.distill.eval.metrics import sharpness
from worldloop.distill.world.engine import World, WorldConfig
from worldloop.models.camera import (
    Anchor,
    DepthNet,
    Reprojector,
    camera_step,
    carry_column_depth,
    compose,
    focal_pixels,
    gaussian_blur,
    inverse_depth,
    key_motion,
    plane_fill_flow,
    pose_flow,
    reprojection_flow,
    resample,
    with_reprojector,
)
from worldloop.models.config import CameraConfig, ModelConfig, preset
from worldloop.models.dit import DiT
from worldloop.models.keys import KEYS, keys_to_tensor
from worldloop.models.world_model import WorldModel

pytestmark = pytest.mark.usefixtures("single_thread")
CAMERA = CameraConfig(reproject=True)
BIT = {name: 1 << i for i, name in enumerate(KEYS)}


def held(*names: str) -> torch.Tensor:
    return keys_to_tensor(torch.tensor([sum(BIT[n] for n in names)]))


def test_the_camera_is_the_built_in_worlds() -> None:
    world = WorldConfig()
    assert (CAMERA.fov_degrees, CAMERA.move_step, CAMERA.turn_degrees) == (
        world.fov_degrees, world.move_speed, world.turn_degrees)


def test_key_motion_normalises_diagonals_and_cancels_opposites() -> None:
    step, strafe, turn = key_motion(torch.cat([held("forward", "right"), held("forward", "back"),
                                               held("turn_left"), held()]), CAMERA)
    assert math.isclose(step[0].item(), 0.1 / math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(strafe[0].item(), 0.1 / math.sqrt(2), rel_tol=1e-6)
    assert step[1].item() == 0 and turn[2].item() == pytest.approx(-math.radians(4))
    assert step[3].item() == strafe[3].item() == turn[3].item() == 0


def test_no_keys_do_not_move_the_frame() -> None:
    q = torch.rand(1, 16, 16)
    flow = reprojection_flow(q, held(), CAMERA)
    assert flow.abs().max().item() < 1e-5
    frame = torch.rand(1, 3, 16, 16)
    assert torch.allclose(resample(frame, flow), frame, atol=1e-5)


def test_a_turn_slides_the_picture_and_a_step_magnifies_it_by_depth() -> None:
    w = 64
    f = focal_pixels(w, CAMERA)
    q = torch.full((1, w, w), 0.5)
    turn = reprojection_flow(q, held("turn_right"), CAMERA)
    # The centre of the new frame shows what was f·tan(4°) pixels right of the old centre, at any depth.
    centre = turn[0, 0, w // 2 - 1: w // 2 + 1, w // 2 - 1: w // 2 + 1]
    assert centre.mean().item() == pytest.approx(f * math.tan(math.radians(4)), rel=0.02)
    assert torch.allclose(turn, reprojection_flow(q * 3, held("turn_right"), CAMERA), atol=1e-4)
    step = reprojection_flow(q, held("forward"), CAMERA)
    u = torch.arange(w) + 0.5 - w / 2
    # A step of s towards a plane at depth 1/q: the pixel u came from u · (1/q − s)/(1/q) = u / (1 + s q).
    assert torch.allclose(step[0, 0, 5], u / (1 + 0.1 * 0.5) - u, atol=1e-4)
    near = reprojection_flow(q * 4, held("forward"), CAMERA)
    assert (near[0, 0, :, -1].abs() > step[0, 0, :, -1].abs() * 3).all()  # nearer walls move faster
    sky = reprojection_flow(torch.zeros(1, w, w), held("forward"), CAMERA)
    assert sky.abs().max().item() < 1e-5  # the sky does not come closer


def test_inverse_depth_of_walls_floor_and_sky() -> None:
    h = w = 64
    half = 0.5 * focal_pixels(w, CAMERA)
    depth = torch.tensor([[2.0] * (w // 2) + [0.5] * (w // 2)])
    for sky in (False, True):
        q = inverse_depth(depth, torch.tensor([sky]), h, CAMERA)[0]
        assert q[h // 2, 0].item() == pytest.approx(0.5) and q[h // 2, -1].item() == pytest.approx(2.0)
        rows = (torch.arange(h) + 0.5 - h / 2).abs()
        assert q[-1, 0].item() == pytest.approx(rows[-1].item() / half)  # the floor under a far wall
        assert q[0, 0].item() == pytest.approx(0.0 if sky else rows[0].item() / half)
        assert q[0, -1].item() == pytest.approx(2.0)  # a near wall covers the whole column


@pytest.mark.parametrize("keys", [("forward",), ("turn_right",), ("right",), ("forward", "turn_left")])
def test_reprojection_predicts_the_engines_next_frame(keys: tuple[str, ...]) -> None:
    """The engine's frame moved by the keys at the engine's own depth is much closer to its next frame than
    the frame itself (measured on these worlds: +4 dB strafing, +7 forward, +8 turning and forward, +9
    turning)."""
    size = 128
    world = World(list(range(1 << 30, (1 << 30) + 8)), size, size)
    world.reset()
    before = world.render()
    depth = world.column_depths(size)
    sky = torch.tensor([p.has_sky for p in world.params])
    code = sum(BIT[k] for k in keys)
    after = world.next_frame(torch.full((8,), code))
    moving = ~world.collided
    assert moving.sum() >= 4

    def unit(frames: torch.Tensor) -> torch.Tensor:
        return frames.permute(0, 3, 1, 2).float()[moving] / 255

    q = inverse_depth(depth, sky, size, CAMERA)[moving]
    moved = resample(unit(before), reprojection_flow(q, held(*keys).expand(len(q), -1), CAMERA))

    def psnr(a: torch.Tensor) -> float:
        return (10 * torch.log10(1 / (a - unit(after)).square().flatten(1).mean(1))).mean().item()

    assert psnr(moved) > psnr(unit(before)) + 3


@pytest.mark.parametrize("turn", [-1, 1])
def test_the_plane_fill_draws_what_a_turn_reveals_in_perspective(turn: int) -> None:
    """Turned 6 frames at once from the engine's frame and depth, the strip the turn brings in is closer to
    the engine's when the wall at the frame's edge is continued as a plane than when the edge column is
    repeated (measured on these worlds: +1.7 dB turning left, +3.0 right); what the frame saw reads as
    before."""
    size, frames = 128, 6
    world = World(list(range(10_000_000, 10_000_016)), size, size)
    world.reset()
    before = world.render().permute(0, 3, 1, 2).float() / 255
    depth = world.column_depths(size)
    sky = torch.tensor([p.has_sky for p in world.params])
    for _ in range(frames):
        after = world.next_frame(torch.full((16,), BIT["turn_right" if turn > 0 else "turn_left"]))
    after = after.permute(0, 3, 1, 2).float() / 255
    q = inverse_depth(depth, sky, size, CAMERA)
    angle = torch.full((16,), turn * math.radians(CAMERA.turn_degrees * frames))
    flow = pose_flow(q, angle, torch.zeros(16, 2), CAMERA)
    filled = plane_fill_flow(flow, depth, CAMERA)
    source_x = torch.arange(size).view(1, 1, size) + flow[:, 0]
    revealed = ((source_x < -0.5) | (source_x > size - 0.5))[:, None].expand_as(after)
    assert 0.2 < revealed.float().mean().item() < 0.5
    assert torch.equal(filled[:, :, ~revealed[0, 0]], flow[:, :, ~revealed[0, 0]])

    def psnr(f: torch.Tensor) -> float:
        error = (resample(before, f, "bicubic").clamp(0, 1) - after)[revealed]
        return 10 * math.log10(1 / error.square().mean())

    assert psnr(filled) > psnr(flow) + 1.0


def test_the_plane_fill_holds_a_wall_seen_edge_on_near_the_edge_depth() -> None:
    """A wall line the ray never meets (behind the camera, or parallel) leaves the edge's depth within 4×:
    every revealed pixel reads the edge column, within the frame's rows scaled by at most 4."""
    n, h, w = 3, 16, 32
    depth = torch.stack([torch.linspace(1, 8, w), torch.linspace(8, 1, w), torch.full((w,), 2.0)])
    flow = torch.zeros(n, 2, h, w)
    flow[:, 0] = -10.0  # everything reads 10 px to the left: the left 10 columns are revealed
    filled = plane_fill_flow(flow, depth, CAMERA)
    revealed = filled[:, :, :, :10]
    reads_x = torch.arange(10).view(1, 1, 10) + revealed[:, 0]
    assert torch.equal(reads_x, torch.zeros_like(reads_x))
    rows = torch.arange(h).view(1, h, 1) + revealed[:, 1] - (h - 1) / 2
    centred = (torch.arange(h).view(1, h, 1) - (h - 1) / 2).expand_as(rows)
    ratio = rows / centred
    assert bool(((ratio >= 0.25 - 1e-5) & (ratio <= 4 + 1e-5)).all())
    assert torch.allclose(ratio[2], torch.ones_like(ratio[2]))  # a wall square to the view keeps its rows
    assert torch.equal(filled[:, :, :, 10:], flow[:, :, :, 10:])


@pytest.mark.parametrize("keys", [("forward",), ("turn_right",), ("right",), ("forward", "turn_left")])
def test_carried_depth_is_the_engines_after_the_move(keys: tuple[str, ...]) -> None:
    """Each column's wall point moved by the keys lands where the engine then sees its walls: on the columns
    it covers the carried inverse depth is far closer to the engine's next one than the unmoved depth (the
    wall edges a move uncovers aside), and the columns a turn brings in are unknown (NaN), on its side."""
    size = 128
    world = World(list(range(1 << 30, (1 << 30) + 8)), size, size)
    world.reset()
    before = world.column_depths(size)
    code = sum(BIT[k] for k in keys)
    world.next_frame(torch.full((8,), code))
    moving = ~world.collided
    assert moving.sum() >= 4
    after, before = world.column_depths(size)[moving], before[moving]
    carried = carry_column_depth(before, held(*keys).expand(len(before), -1), CAMERA)
    known = torch.isfinite(carried)
    assert known.float().mean() > 0.85

    def error(depth: torch.Tensor) -> float:
        return (1 / depth - 1 / after)[known].abs().median().item()

    assert error(carried) < 0.01 and error(carried) < 0.2 * error(before)
    if "turn_right" in keys:  # a right turn brings walls in on the right
        assert (~known[:, -3:]).all() and known[:, :3].all()


def test_composed_steps_are_the_engines_relative_pose() -> None:
    """Composing each frame's ``camera_step`` gives the map from the camera after eight frames of mixed keys
    to the camera before them that the engine's own poses give."""
    world = World(list(range(1 << 30, (1 << 30) + 8)), 64, 64)
    world.reset()
    start = world.poses.clone()
    turn, offset = torch.zeros(8), torch.zeros(8, 2)
    script = [("forward",), ("forward", "turn_left"), ("right",), ("turn_right",), ("forward", "left"),
              ("forward",), ("back", "turn_right"), ("forward",)]
    moved = torch.ones(8, dtype=torch.bool)
    for keys in script:
        world.move(torch.full((8,), sum(BIT[k] for k in keys)))
        moved &= ~world.collided
        turn, offset = compose(turn, offset, *camera_step(held(*keys).expand(8, -1), CAMERA))
    assert moved.sum() >= 3
    end = world.poses
    # The engine's heading a is the camera's z axis (cos a, sin a); its x axis (right) is (−sin a, cos a).
    d = (end[:, :2] - start[:, :2])
    a0 = start[:, 2]
    in_start = torch.stack([-torch.sin(a0) * d[:, 0] + torch.cos(a0) * d[:, 1],
                            torch.cos(a0) * d[:, 0] + torch.sin(a0) * d[:, 1]], 1)
    turned = torch.remainder(end[:, 2] - a0 + math.pi, 2 * math.pi) - math.pi
    assert torch.allclose(turn[moved], turned[moved], atol=1e-4)
    assert torch.allclose(offset[moved], in_start[moved], atol=1e-4)


def test_one_move_from_an_anchor_beats_a_move_every_frame() -> None:
    """Eight frames of walking and turning: the engine's first frame moved once by the composed motion is
    closer to the eighth frame and sharper than that frame moved eight times, one frame at a time (each
    resampling blurs), both at the engine's own depth of each new frame."""
    size = 128
    world = World(list(range(1 << 30, (1 << 30) + 8)), size, size)
    world.reset()
    sky = torch.tensor([p.has_sky for p in world.params])

    def unit(frames: torch.Tensor) -> torch.Tensor:
        return frames.permute(0, 3, 1, 2).float() / 255

    first = unit(world.render())
    chained = first
    turn, offset = torch.zeros(8), torch.zeros(8, 2)
    moving = torch.ones(8, dtype=torch.bool)
    for keys in [("forward",)] * 4 + [("forward", "turn_right")] * 4:
        world.move(torch.full((8,), sum(BIT[k] for k in keys)))
        moving &= ~world.collided
        step = camera_step(held(*keys).expand(8, -1), CAMERA)
        q = inverse_depth(world.column_depths(size), sky, size, CAMERA)
        chained = resample(chained, pose_flow(q, *step, CAMERA), "bicubic")
        turn, offset = compose(turn, offset, *step)
    anchored = resample(first, pose_flow(q, turn, offset, CAMERA), "bicubic")
    truth = unit(world.render())
    assert moving.sum() >= 4

    def psnr(a: torch.Tensor) -> float:
        return (10 * torch.log10(1 / (a - truth).square().flatten(1).mean(1)))[moving].mean().item()

    def detail(a: torch.Tensor) -> float:  # the eval's sharpness: the variance of the Laplacian
        return sharpness(a)[moving].mean().item()

    assert psnr(anchored) > psnr(chained) and detail(anchored) > 1.3 * detail(chained)


def test_a_session_carries_its_depth_from_frame_to_frame(tiny_delta_pair, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """With ``camera.depth_memory``, each moved frame's carried depth reaches the next frame's reading, a
    reset forgets it, and without memory nothing is carried in."""
    plain, config = tiny_delta_pair
    from worldloop.models.vae import LatentAutoencoder

    torch.manual_seed(1)
    vae = LatentAutoencoder(config)
    seen: list[float] = []  # per reading: the fraction of carried columns known (-1: none passed)
    column_depth = Reprojector.column_depth

    def spy(self, latents, width, carried=None):
        seen.append(-1.0 if carried is None else torch.isfinite(carried).float().mean().item())
        return column_depth(self, latents, width, carried)

    monkeypatch.setattr(Reprojector, "column_depth", spy)
    for memory in (1.0, 0.0):
        config_r = config.replace(camera=replace(CAMERA, depth_memory=memory))
        dit_r = DiT(config_r)
        dit_r.load_state_dict(with_reprojector(plain.state_dict(), config_r))
        wm = WorldModel(config_r, dit_r, vae, FakePromptEncoder(16), precision="fp32")
        s = wm.new_session("a desert ruin", seed=3)
        seen.clear()
        for k in (0, BIT["forward"], BIT["forward"], BIT["turn_left"]):
            wm.next_frame([s], [k])
        wm.reset(s)
        wm.next_frame([s], [0])
        wm.next_frame([s], [BIT["forward"]])
        if memory:  # frame 1 has nothing to move; 2 reads afresh; 3 and 4 get the carried depth; reset
            assert seen[0] == 0.0 and seen[1] > 0.8 and seen[2] > 0.8 and seen[3] == 0.0
        else:
            assert seen == [-1.0] * 4


def test_a_session_moves_from_its_anchor_and_renews_it(tiny_delta_pair) -> None:
    """With ``camera.anchor_frames`` 3 a session's anchor ages one frame per move (not while the camera is
    still), composes the turns since it, is its newest shown frame again when due, and is forgotten on
    reset."""
    plain, config = tiny_delta_pair
    from worldloop.models.vae import LatentAutoencoder

    torch.manual_seed(1)
    config_a = config.replace(camera=replace(CAMERA, depth_memory=1.0, anchor_frames=3))
    dit = DiT(config_a)
    dit.load_state_dict(with_reprojector(plain.state_dict(), config_a))
    wm = WorldModel(config_a, dit, LatentAutoencoder(config_a), FakePromptEncoder(16), precision="fp32")
    s = wm.new_session("a desert ruin", seed=3)
    shown, ages, turns = [], [], []
    script = [0, BIT["forward"], BIT["turn_left"], 0, BIT["forward"], BIT["forward"], BIT["right"]]
    for k in script:
        shown.append(wm.next_frame([s], [k])[0])
        ages.append(None if s.anchor is None else int(s.anchor[1][3]))
        turns.append(None if s.anchor is None else float(s.anchor[1][1]))
    # Frame 1 has nothing to move; frame 2 anchors on frame 1; still frame 4 keeps the age; frame 6 is due.
    assert ages == [None, 1, 2, 2, 3, 1, 2]
    assert turns[2] == pytest.approx(-math.radians(CAMERA.turn_degrees)) and turns[5] == 0.0
    anchor_frame = s.anchor[1][0]
    assert torch.allclose(anchor_frame, torch.from_numpy(shown[4]).permute(2, 0, 1).float() / 127.5 - 1)
    wm.reset(s)
    assert s.anchor is None


class _PixelAutoencoder(torch.nn.Module):
    """An autoencoder whose latents are the frames themselves, to watch ``Reprojector.move`` in pixels."""

    dtype = torch.float32

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return frames

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


@pytest.mark.parametrize("lowpass", [0.0, 2.0])
def test_an_anchors_detail_can_carry_the_frame_befores_colours(lowpass: float) -> None:
    """The frame before is its anchor recoloured (a prompt switch the DiT followed): the whole anchor
    (``anchor_lowpass`` 0) brings the old colours back; with a low-pass the moved frame keeps the new colours
    and the anchor's detail."""
    size = 32
    camera = replace(CAMERA, anchor_frames=8, anchor_lowpass=lowpass)
    rep = Reprojector(camera, 3, (size, size), (size, size)).eval()
    torch.manual_seed(0)
    anchor_frame = (torch.rand(2, 3, size, size) - 0.5) * 0.6
    before = anchor_frame + 0.3
    zero = torch.zeros(2)
    anchor = Anchor(anchor_frame, zero, torch.zeros(2, 2), torch.ones(2, dtype=torch.long))
    moved, _, nxt = rep.move(_PixelAutoencoder(), before, held("turn_right").expand(2, -1), before, None,
                             anchor)
    shift = (moved - anchor_frame).mean().item()
    assert int(nxt.age[0]) == 2
    if lowpass:
        assert shift == pytest.approx(0.3, abs=0.03)
        detail = moved - gaussian_blur(moved, lowpass)
        assert detail.std() > 0.5 * (anchor_frame - gaussian_blur(anchor_frame, lowpass)).std()
    else:
        assert abs(shift) < 0.03


def test_a_still_camera_keeps_its_frame_exactly(tiny_delta_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """No motion, no autoencoder round trip (which, iterated on a still frame, amplifies texture into noise):
    a still row keeps its latent bit for bit, a moving row in the same batch is moved, and a batch that holds
    still does not decode at all."""
    _, config = tiny_delta_pair
    from worldloop.models.vae import LatentAutoencoder

    torch.manual_seed(0)
    rep = DiT(config.replace(camera=CAMERA)).reprojector
    vae = LatentAutoencoder(config)
    latents = torch.randn(2, config.latent_channels, *config.latent_size)
    keys = torch.cat([held(), held("forward")])
    moved, depth, anchor = rep.move(vae, latents, keys)
    assert torch.equal(moved[0], latents[0]) and not torch.allclose(moved[1], latents[1])
    assert depth.shape == (2, config.width) and anchor is None  # no camera.anchor_frames

    def no_decode(*args: object) -> None:
        raise AssertionError("a still camera decoded its frame")

    monkeypatch.setattr(vae, "decode", no_decode)
    still, _, _ = rep.move(vae, latents, torch.cat([held(), held()]))
    assert torch.equal(still, latents)


def test_the_depth_network_reads_columns_and_sky() -> None:
    net = DepthNet(4, 8)
    log_depth, sky = net(torch.randn(3, 4, 8, 8))
    assert log_depth.shape == (3, 8) and sky.shape == (3,)


def _delta(config: ModelConfig) -> ModelConfig:
    return config.replace(dit=replace(config.dit, prediction="delta"))


def test_a_reprojecting_config_needs_a_delta_dit() -> None:
    with pytest.raises(ValueError, match="delta"):
        preset("tiny").replace(camera=CAMERA)  # the tiny preset predicts v
    with pytest.raises(ValueError, match="resample"):
        CameraConfig(resample="lanczos")
    with pytest.raises(ValueError, match="anchor_frames"):
        CameraConfig(anchor_frames=-1)
    config = _delta(preset("tiny")).replace(camera=CAMERA)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_the_dit_builds_on_a_given_previous_frame(tiny_delta_pair) -> None:
    """``previous`` replaces the frame before the noisy one in both forwards: given the frame the DiT would
    have used it changes nothing, given another it changes the output by exactly the difference (delta)."""
    plain, config = tiny_delta_pair
    torch.manual_seed(0)
    c, (h, w) = config.latent_channels, config.latent_size
    context, x = torch.randn(1, 3, c, h, w), torch.randn(1, 3, c, h, w)
    sigma, keys = torch.full((1, 3), 0.5), torch.zeros(1, 3, config.dit.num_keys)
    prompt = plain.null_prompt_kv(1)
    with torch.no_grad():
        v = plain(x, sigma, keys, prompt, context=context)
        shifted = torch.cat([torch.zeros_like(context[:, :1]), context[:, :-1]], 1)
        assert torch.equal(plain(x, sigma, keys, prompt, context=context, previous=shifted), v)
        other = shifted + 1.0
        moved = plain(x, sigma, keys, prompt, context=context, previous=other)
    # x0 = previous + out and v = (x − x0)/σ: a base larger by 1 lowers v by 1/σ.
    assert torch.allclose(v - moved, torch.full_like(v, 2.0), atol=1e-4)


@pytest.fixture
def tiny_delta_pair() -> tuple[DiT, ModelConfig]:
    config = _delta(preset("tiny"))
    torch.manual_seed(0)
    dit = DiT(config).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit, config


def test_a_reprojecting_world_model_moves_only_frames_it_has(tiny_delta_pair) -> None:
    """Its first frame (no previous frame: the zero base) is the plain model's; later frames differ, cost a
    reprojection each and stay finite; a converted state dict carries a fresh, unfitted depth network."""
    plain_dit, config = tiny_delta_pair
    config_r = config.replace(camera=CAMERA)
    tensors = with_reprojector(plain_dit.state_dict(), config_r)
    assert any(k.startswith("reprojector.depth_net.") for k in tensors)
    assert float(tensors["reprojector.fitted"]) == 0.0
    dit_r = DiT(config_r)
    dit_r.load_state_dict(tensors)
    assert isinstance(dit_r.reprojector, Reprojector)
    encoder = FakePromptEncoder(config.dit.max_prompt_tokens)
    torch.manual_seed(1)
    from worldloop.models.vae import LatentAutoencoder

    vae = LatentAutoencoder(config)
    frames = []
    for cfg, dit in ((config, plain_dit), (config_r, dit_r)):
        wm = WorldModel(cfg, dit, vae, encoder, precision="fp32")
        s = wm.new_session("a desert ruin", seed=3)
        frames.append([wm.next_frame([s], [k]) for k in (0, BIT["forward"], BIT["turn_right"])])
        if dit is dit_r:
            assert wm.last_timings.reproject_ms > 0
    (first, *rest), (first_r, *rest_r) = frames
    assert (first == first_r).all()
    assert any((a != b).any() for a, b in zip(rest, rest_r, strict=True))


def test_the_onnxruntime_backend_refuses_a_reprojecting_model(tiny_delta_pair) -> None:
    dit, config = tiny_delta_pair
    config_r = config.replace(camera=CAMERA)
    dit_r = DiT(config_r)
    dit_r.load_state_dict(with_reprojector(dit.state_dict(), config_r))
    from worldloop.models.vae import LatentAutoencoder

    with pytest.raises(ValueError, match="reprojecting"):
        WorldModel(config_r, dit_r, LatentAutoencoder(config_r), FakePromptEncoder(16), backend="onnxruntime")


def test_next_frame_moves_the_frame_it_showed(tiny_delta_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """``next_frame`` hands the frame it decoded to the next frame's reprojection (no second decode of the
    same latent); ``generate`` decodes inside it. The two agree up to the shown frame's 8-bit rounding."""
    plain, config = tiny_delta_pair
    config_r = config.replace(camera=CAMERA)
    dit_r = DiT(config_r)
    dit_r.load_state_dict(with_reprojector(plain.state_dict(), config_r))
    from worldloop.models.vae import LatentAutoencoder

    torch.manual_seed(1)
    vae = LatentAutoencoder(config)
    keys = (0, BIT["forward"], BIT["turn_right"], BIT["forward"])
    given: list[bool] = []
    move = Reprojector.move

    def spy(self, vae, latents, keys, frames=None, carried=None, anchor=None, redraw=None):
        given.append(frames is not None)
        return move(self, vae, latents, keys, frames, carried, anchor, redraw)

    monkeypatch.setattr(Reprojector, "move", spy)
    runs = []
    for shown in (True, False):
        wm = WorldModel(config_r, dit_r, vae, FakePromptEncoder(16), precision="fp32")
        s = wm.new_session("a desert ruin", seed=3)
        latents = []
        for k in keys:
            if shown:
                wm.next_frame([s], [k])
            else:
                wm.generate([s], [k])
            latents.append(s.pending.clone())
        runs.append(torch.stack(latents))
    # Every frame after the first (which has nothing to move) reused the shown frame under next_frame.
    assert given == [True] * 3 + [False] * 3
    assert (runs[0] - runs[1]).abs().max().item() < 0.05


def test_the_cli_refuses_onnxruntime_for_a_reprojecting_model(
        tiny_delta_pair, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from worldloop.app.cli import main
    from worldloop.models import checkpoint
    from worldloop.models.vae import LatentAutoencoder

    dit, config = tiny_delta_pair
    config_r = config.replace(camera=CAMERA)
    dit_r = DiT(config_r)
    dit_r.load_state_dict(with_reprojector(dit.state_dict(), config_r))
    model = checkpoint.save_model(tmp_path / "m", config_r, dit_r, LatentAutoencoder(config_r))
    assert main(["bench", "--model", str(model), "--backend", "onnxruntime", "--quick"]) != 0
    assert "does not run reprojecting models" in capsys.readouterr().err


def test_a_reprojecting_dit_sees_its_moved_previous_frame(tiny_delta_pair) -> None:
    """The moved previous frame is also an input of the noisy frame's tokens (``base_in``, zero when
    converted, so a converted DiT computes what it did): once that layer is non-zero, the output depends on
    the moved frame beyond the base it adds to."""
    plain, config = tiny_delta_pair
    config_r = config.replace(camera=CAMERA)
    tensors = with_reprojector(plain.state_dict(), config_r)
    assert tensors["base_in.weight"].abs().max() == 0
    dit = DiT(config_r).eval()
    dit.load_state_dict(tensors)
    torch.manual_seed(0)
    c, (h, w) = config.latent_channels, config.latent_size
    context, x = torch.randn(1, 2, c, h, w), torch.randn(1, 2, c, h, w)
    sigma, keys = torch.full((1, 2), 0.5), torch.zeros(1, 2, config.dit.num_keys)
    previous = torch.randn(1, 2, c, h, w)
    with torch.no_grad():
        def gap() -> float:
            prompt = dit.null_prompt_kv(1)
            a = dit(x, sigma, keys, prompt, context=context, previous=previous)
            b = dit(x, sigma, keys, prompt, context=context, previous=previous + 1.0)
            return (a - b - 2.0).abs().max().item()  # a base larger by 1 lowers v by 1/σ = 2, and no more

        assert gap() < 1e-4
        dit.base_in.weight.normal_(0, 0.05)
        assert gap() > 1e-3
