"""Surface memory: the texture a stream has seen on each surface of a grid maze, kept where it lies.

The built-in world (and any world of unit-high walls on a grid, seen from half their height) repeats its
textures: every wall face shows one texture across one tile, the floor and the ceiling one texture per world
unit, the sky one panorama around the camera. A reprojecting model moves the previous frame by the camera's
motion, so it keeps what it saw only as long as the picture keeps it: every resample blurs the texture, and
what a step or a turn brings into view has no texture at all (the regression-trained DiT draws the mean of
what it could be). Kept in *texture coordinates* instead — wall (u along the face, v up it), floor and
ceiling (the point's position modulo one tile), sky (azimuth, elevation) — what the stream saw once can be
drawn sharp again anywhere that surface appears, for as long as the stream lasts.

What is stored is each texel's *relative detail*: the frame divided by its Gaussian blur, minus one. Light,
fog and the theme's colours are the blur's: they vary across the world and the DiT may change them (a prompt
switch), so they come from the frame being drawn, and only the detail comes from memory
(``apply``: the blurred frame times one plus the detail).

Where a pixel lies needs the camera's pose in the world's grid (x, y in tiles, heading in radians: the
built-in world's convention, ``distill.world``) and the wall depth through each pixel column. The pose is
given with the stream's first frames (a stream started from the built-in world knows it) and then
dead-reckoned from the held keys (``advance``), stopped at the walls the memory has seen (``blocked``). The
depth is the model's reading (``models.camera.DepthNet``, carried by the camera); walls stand on the grid's
lines, so each column's wall point is snapped to the nearer grid line its depth allows (``wall_hits``), which
makes the texture coordinate exact wherever the depth is within half a tile.

On the built-in world's frames with the engine's poses and depths (8 held-out worlds, explorer keys), a memory
written from the first 9 frames restores the texture of frames 9 to 71 to 34.2–38.7 dB and 0.95–0.98 of the
engine's sharpness, where the blurred frames alone are at 29.7–32.5 dB and 0.41–0.45.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from worldloop.models.camera import Motion, focal_pixels, gaussian_blur, key_motion
from worldloop.models.config import CameraConfig

WALL, FLOOR, CEILING, SKY = range(4)
SKY_TILES = 8  # the sky's panorama is this many texture tiles around
MAX_DETAIL = 4.0  # relative detail is clamped to ±this (a dark pixel over a darker blur)
MAP_TILES = 64  # the wall map covers tiles [0, 64)² of the grid (the built-in world's mazes are 17 across)
RADIUS = 0.25  # tiles: how close the camera comes to a wall (the built-in world's collision margin)
WALL_NEAR = 2.0  # tiles: a wall read nearer than this counts in full in the wall map, farther ones less
EMPTY_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75)  # where along a column's ray to its wall the map sees floor
EMPTY_WEIGHT = 0.5  # each of those points, per column sighting
MAX_EMPTY = 8.0  # tiles: no farther
MARCH = 0.05  # tiles: the step of a ray through the wall map
WALL_EVIDENCE = 4.0  # sightings (a wall across a sixteenth of the frame: one) that make a tile a wall: fewer
# let the depth network's misreadings through (at 0.5, 30 % of the mapped walls of 16 rollouts from 9 engine
# frames stood on floor, and stopped the camera where the world lets it walk; at 4, 5 %)
KNOWN_EMPTY = 1.0  # sightings of floor that let a guessed depth pass a tile (generated frames' few do not)
PHANTOM_MARGIN = 0.15  # tiles: how far short of what the wall map rules out a reading may put a wall
CORNER_MARGIN = 0.3  # tiles: how far past an unseen corner of the maze a reading may put its wall
MAX_FOG = 0.35  # per tile: the densest fog fit_fog considers (the built-in themes: 0.03 to 0.32)


class Memory(NamedTuple):
    """The surface memory of N streams: each stream's camera pose (N, 3) (x, y in tiles, heading in radians,
    in the world's grid); per texel of its atlas (``atlas_size``), the weighted sum of the relative detail
    seen there (N, 3, S) and the sum of the weights (N, 1, S); and per grid tile, the weight of the wall
    sightings there (N, MAP_TILES²): positive where walls were seen, negative where the floor was, which
    stops the camera at walls as the world does. With ``camera.memory_colour``, per texel also the weighted
    sum of the colour seen there with the fog taken out (N, 3, S) and its weights (N, 1, S), and the
    stream's fog (N, 4): its colour (r, g, b in [0, 1]) and density per tile (``fit_fog``)."""

    pose: Tensor
    detail: Tensor
    weight: Tensor
    walls: Tensor
    colour: Tensor
    colour_weight: Tensor
    fog: Tensor


def atlas_size(texels: int) -> int:
    """Texels of one stream's atlas: wall, floor and ceiling ``texels`` × ``texels`` each, the sky
    ``SKY_TILES · texels`` around × ``texels`` up."""
    return (3 + SKY_TILES) * texels * texels


def empty(pose: Tensor, texels: int) -> Memory:
    """A memory that has seen nothing, for cameras at ``pose`` (N, 3)."""
    n, s = pose.shape[0], atlas_size(texels)

    def zeros(*shape: int) -> Tensor:
        return pose.new_zeros(n, *shape, dtype=torch.float32)

    return Memory(pose.float(), zeros(3, s), zeros(1, s), zeros(MAP_TILES * MAP_TILES), zeros(3, s),
                  zeros(1, s), zeros(4))


def forget_looks(memory: Memory) -> Memory:
    """``memory`` without the texture and colour it saw (a new prompt is a new look); the walls and the
    pose stay."""
    return memory._replace(detail=torch.zeros_like(memory.detail), weight=torch.zeros_like(memory.weight),
                           colour=torch.zeros_like(memory.colour),
                           colour_weight=torch.zeros_like(memory.colour_weight))


def _world_step(pose: Tensor, motion: Motion) -> tuple[Tensor, Tensor, Tensor]:
    """The heading after the turn and the step (dx, dy) in the grid of ``motion`` from ``pose``."""
    step, strafe, turn = motion
    angle = torch.remainder(pose[:, 2] + turn, 2 * math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return angle, step * cos - strafe * sin, step * sin + strafe * cos


def advance(pose: Tensor, motion: Motion) -> Tensor:
    """Poses (N, 3) after one frame's ``motion`` (``key_motion``'s (step, strafe, turn), or ``blocked``'s):
    turn first, then step along the new heading and strafe axis (the built-in world's rule)."""
    angle, dx, dy = _world_step(pose, motion)
    return torch.stack([pose[:, 0] + dx, pose[:, 1] + dy, angle], 1)


def map_tile(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The wall map's index of the tile under each point (x, y) (any shape, tiles), and whether it lies
    inside the map (outside: the index of the nearest edge tile)."""
    ix, iy = torch.floor(x).long(), torch.floor(y).long()
    inside = (ix >= 0) & (ix < MAP_TILES) & (iy >= 0) & (iy < MAP_TILES)
    return iy.clamp(0, MAP_TILES - 1) * MAP_TILES + ix.clamp(0, MAP_TILES - 1), inside


def is_wall(walls: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """(N,) bool: the tile under (x, y) (N,) has been seen to be a wall (``WALL_EVIDENCE``)."""
    index, inside = map_tile(x, y)
    return inside & (walls.gather(1, index[:, None])[:, 0] >= WALL_EVIDENCE)


def _cell(index: Tensor) -> Tensor:
    """Whether each wall-map tile ``index`` is one of the maze's cells (odd column and row:
    ``distill.world.maze``), which are never walls."""
    return (index % MAP_TILES % 2 == 1) & (index // MAP_TILES % 2 == 1)


def _unseen_corner(index: Tensor, value: Tensor) -> Tensor:
    """Whether each wall-map tile ``index`` (evidence ``value``) is one of the maze's corners (even column and
    row: a wall unless a room cleared it) that the map has not seen empty."""
    return (index % MAP_TILES % 2 == 0) & (index // MAP_TILES % 2 == 0) & (value > -KNOWN_EMPTY)


def is_solid(walls: Tensor, x: Tensor, y: Tensor, own: Tensor | None = None) -> Tensor:
    """(N,) bool: the tile under (x, y) (N,) stops the camera: a wall seen (``is_wall``), or one of the maze's
    corners (even column and row) not seen empty, which the picture draws as a wall (``corner_depth``),
    unless it is the tile ``own`` (N,) the camera stands in."""
    index, inside = map_tile(x, y)
    value = walls.gather(1, index[:, None])[:, 0]
    corner = _unseen_corner(index, value)
    if own is not None:
        corner = corner & (index != own)
    return inside & ((value >= WALL_EVIDENCE) | corner)


def blocked(memory: Memory, keys: Tensor, camera: CameraConfig) -> Motion:
    """The motion of held ``keys`` (N, num_keys) from the memory's poses, each axis of the step dropped
    where it would bring the camera within ``RADIUS`` of a tile that stops it (``is_solid``: a wall the memory
    knows, or a corner of the maze it has not seen empty) (the built-in world's rule: one axis at a time, so
    the camera slides along walls). Returned as (step, strafe, turn) along the
    turned camera's axes."""
    motion = key_motion(keys, camera)
    angle, dx, dy = _world_step(memory.pose, motion)
    x, y = memory.pose[:, 0], memory.pose[:, 1]
    own = map_tile(x, y)[0]

    def hits(px: Tensor, py: Tensor) -> Tensor:
        out = torch.zeros_like(px, dtype=torch.bool)
        for ox in (-RADIUS, RADIUS):
            for oy in (-RADIUS, RADIUS):
                out |= is_solid(memory.walls, px + ox, py + oy, own)
        return out

    dx = torch.where((dx != 0) & hits(x + dx, y), torch.zeros_like(dx), dx)
    dy = torch.where((dy != 0) & hits(x + dx, y + dy), torch.zeros_like(dy), dy)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return dx * cos + dy * sin, dy * cos - dx * sin, motion[2]


class March(NamedTuple):
    """Each column's ray (N, W, 2) from cameras at ``pose`` (N, 3), sampled every ``MARCH`` tiles out to
    ``MAX_EMPTY``: the samples' distance along the heading (S,), the wall map's tile under each (N, W, S) and
    its evidence there (N, W, S; 0 outside the map), and the tile each camera stands in (N, 1, 1). One march
    serves every reading of the map below."""

    pose: Tensor
    rays: Tensor
    t: Tensor
    index: Tensor
    value: Tensor
    own: Tensor


def march(walls: Tensor, pose: Tensor, width: int, camera: CameraConfig) -> March:
    """The wall map ``walls`` sampled along the rays of ``width`` pixel columns from ``pose`` (``March``)."""
    rays = column_rays(pose, width, camera)
    n, w = rays.shape[:2]
    t = torch.arange(1, int(MAX_EMPTY / MARCH) + 1, device=pose.device, dtype=torch.float32) * MARCH
    index, inside = map_tile(pose[:, 0, None, None] + t.view(1, 1, -1) * rays[..., 0:1],
                             pose[:, 1, None, None] + t.view(1, 1, -1) * rays[..., 1:2])
    value = torch.where(inside, walls.gather(1, index.view(n, -1)).view(n, w, -1), torch.zeros_like(t))
    own = map_tile(pose[:, 0], pose[:, 1])[0].view(-1, 1, 1)
    return March(pose, rays, t, index, value, own)


def map_depth(walls: Tensor, pose: Tensor, reading: Tensor, camera: CameraConfig) -> Tensor:
    """Each column's wall depth (N, W) from cameras at ``pose`` (N, 3) where the wall map knows it: the ray
    crosses tiles seen empty (evidence below zero) until it meets a mapped wall (``is_wall``), within
    ``MAX_EMPTY`` tiles; the hit is snapped to the wall's grid line (``wall_hits``). Columns whose ray meets
    a tile the map does not know first keep ``reading``."""
    return _mapped(march(walls, pose, reading.shape[1], camera), reading)


def _mapped(m: March, reading: Tensor) -> Tensor:
    """``map_depth`` from a march."""
    wall = m.value >= WALL_EVIDENCE
    known = wall | (m.value < 0)
    # The first sample that is not known empty: a wall there gives the depth, anything else does not.
    stop = (~known | wall).float().argmax(-1, keepdim=True)
    hit = wall.gather(-1, stop)[..., 0] & (~known | wall).any(-1)
    snapped, _, _ = wall_hits(m.pose, m.t[stop[..., 0]], m.rays)
    return torch.where(hit, snapped, reading)


def _clear(m: March) -> tuple[Tensor, Tensor, Tensor]:
    """How far each column's ray of ``m`` runs through tiles no wall can stand in: the camera's own tile,
    tiles seen empty (``KNOWN_EMPTY``) and the maze's unknown cells (odd column and row:
    ``distill.world.maze``, never walls). Returns the distance along the heading at which it enters the first
    other tile (N, W) (``MAX_EMPTY`` if none is met), whether it met one (N, W) and whether that tile is a
    mapped wall (N, W)."""
    wall = m.value >= WALL_EVIDENCE
    passable = ((m.value <= -KNOWN_EMPTY) | (m.index == m.own) | _cell(m.index)) & ~wall
    stop = (~passable).float().argmax(-1, keepdim=True)
    met = (~passable).any(-1)
    at = torch.where(met, m.t[stop[..., 0]], torch.full_like(stop[..., 0], MAX_EMPTY, dtype=torch.float32))
    return at, met, met & wall.gather(-1, stop)[..., 0]


def _guess(m: March, clear: tuple[Tensor, Tensor, Tensor], beyond: float) -> Tensor:
    """``guess_depth`` from a march and its ``_clear``."""
    at, _, wall = clear
    depth = torch.where(wall, at, (at + beyond).clamp(max=MAX_EMPTY))
    return wall_hits(m.pose, depth, m.rays)[0]


def guess_depth(walls: Tensor, pose: Tensor, width: int, camera: CameraConfig, beyond: float) -> Tensor:
    """Each column's wall depth (N, W) from cameras at ``pose`` (N, 3) as the wall map suggests it where the
    view is new (``camera.memory_reveal``): the ray crosses the tiles no wall can stand in (``_clear``: the
    camera's own, tiles seen empty, the maze's cells); a mapped wall there gives the depth, and any other tile
    the map does not know puts a wall ``beyond`` tiles past the ray's entry into it, at most ``MAX_EMPTY``
    tiles away. Snapped to the grid as a reading is (``wall_hits``). (Letting the rays through unknown cells:
    on 16 held-out worlds of another eval seed, +0.2 dB at horizon 64, sharpness 0.24 → 0.35, exact keys
    0.86 → 0.92; stopping them at the unknown tiles between four cells as well gained nothing.)"""
    m = march(walls, pose, width, camera)
    return _guess(m, _clear(m), beyond)


def clear_depth(walls: Tensor, pose: Tensor, width: int, camera: CameraConfig) -> Tensor:
    """Each column's depth (N, W) along the heading up to which the wall map rules a wall out (``_clear``):
    a reading nearer than this puts a wall where none can stand."""
    return _clear(march(walls, pose, width, camera))[0]


def corner_depth(walls: Tensor, pose: Tensor, width: int, camera: CameraConfig) -> tuple[Tensor, Tensor]:
    """Each column's depth (N, W) along the heading to the first of the maze's corners its ray enters that the
    wall map has not seen empty (but the one the camera stands in: a room's), snapped to the grid
    (``wall_hits``), and whether the ray meets one within ``MAX_EMPTY`` tiles (N, W). The corners are the
    tiles at an even column and row (``distill.world.maze``: cells stand on odd tiles, the tiles between two
    cells are walls or passages, and a corner is a wall unless a room cleared it), so a wall read farther
    away than one is a guess the map can bound."""
    return _corner(march(walls, pose, width, camera))


def _corner(m: March) -> tuple[Tensor, Tensor]:
    """``corner_depth`` from a march."""
    corner = _unseen_corner(m.index, m.value) & (m.index != m.own)
    met = corner.any(-1)
    first = corner.float().argmax(-1, keepdim=True)
    at = (m.t[first[..., 0]] - MARCH).clamp(min=MARCH)  # the sample before the first inside the corner
    return wall_hits(m.pose, torch.where(met, at, torch.full_like(at, MAX_EMPTY)), m.rays)[0], met


def column_rays(pose: Tensor, width: int, camera: CameraConfig) -> Tensor:
    """The ray through each pixel column's centre (N, W, 2), of unit length along the heading."""
    c = (torch.arange(width, device=pose.device, dtype=torch.float32) + 0.5 - width / 2) / focal_pixels(
        width, camera)
    a = pose[:, 2:3]
    heading = torch.stack([torch.cos(a), torch.sin(a)], -1)  # (N, 1, 2)
    right = torch.stack([-torch.sin(a), torch.cos(a)], -1)
    return heading + right * c.view(1, -1, 1)


def wall_hits(pose: Tensor, depth: Tensor, rays: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each column's wall depth snapped to the grid (N, W), its texture coordinate u (N, W) in [0, 1) and the
    wall tile it hit (N, W) (its index in the wall map; -1 where the depth fits no grid line or the tile lies
    outside the map).

    The column's wall point at ``depth`` is moved along its ray to the nearer of the two grid lines through
    its rounded coordinates (x = round(x) or y = round(y)), the one whose depth is closer in ratio; u is the
    point's position along that face, mirrored as the built-in world mirrors it (so a face reads left to
    right from where it is seen)."""
    px, py = pose[:, 0:1], pose[:, 1:2]
    rx, ry = rays[..., 0], rays[..., 1]
    d = depth.float().clamp_min(1e-2)
    hx, hy = px + d * rx, py + d * ry

    def to_line(p: Tensor, line: Tensor, r: Tensor) -> Tensor:
        t = (line - p) / torch.where(r.abs() < 1e-6, torch.full_like(r, 1e-6), r)
        return torch.where(t > 0.05, t, torch.full_like(t, math.inf))

    tx, ty = to_line(px, torch.round(hx), rx), to_line(py, torch.round(hy), ry)
    on_x = (tx / d).log().abs() <= (ty / d).log().abs()
    t = torch.where(on_x, tx, ty)
    ok = torch.isfinite(t) & ((t / d).log().abs() < 0.7)
    t = torch.where(ok, t, d)
    along = torch.where(on_x, py + t * ry, px + t * rx)
    u = torch.frac(along)
    u = torch.where((on_x & (rx > 0)) | (~on_x & (ry < 0)), 1 - u, u)
    # The tile behind the face: past the line in the ray's direction.
    line_x, line_y = px + t * rx, py + t * ry
    tx_ = torch.where(on_x, torch.round(line_x) - (rx < 0).float(), torch.floor(line_x))
    ty_ = torch.where(on_x, torch.floor(line_y), torch.round(line_y) - (ry < 0).float())
    tx_, ty_ = tx_.long(), ty_.long()
    inside = ok & (tx_ >= 0) & (tx_ < MAP_TILES) & (ty_ >= 0) & (ty_ < MAP_TILES)
    tile = torch.where(inside, ty_.clamp(0, MAP_TILES - 1) * MAP_TILES + tx_.clamp(0, MAP_TILES - 1), -1)
    return t, u.clamp(0, 1 - 1e-6), tile


def fit_pose(depth: Tensor, camera: CameraConfig, steps: int = 10, headings: int = 90) -> Tensor:
    """A camera pose (3,) in the grid's frame that fits one frame's column ``depth`` (W,) (a picture given
    without its pose): the position within its tile (x, y in [0, 1)) and the heading (in [0, π/2): the grid
    looks the same every quarter turn) whose rays put the walls the depth reads on grid lines, tried on a
    ``steps`` × ``steps`` × ``headings`` lattice; near walls (which place the grid best) count most."""
    offsets = torch.arange(steps, dtype=torch.float32) / steps
    angles = torch.arange(headings, dtype=torch.float32) * (0.5 * math.pi / headings)
    x, y, a = torch.meshgrid(offsets, offsets, angles, indexing="ij")
    poses = torch.stack([x.reshape(-1), y.reshape(-1), a.reshape(-1)], 1).to(depth.device)
    d = depth.float().reshape(1, -1).expand(len(poses), -1)
    t, _, _ = wall_hits(poses, d, column_rays(poses, d.shape[1], camera))
    misfit = (t / d.clamp_min(1e-2)).log().abs().clamp(max=0.7)
    near = 1 / d.clamp_min(0.25)
    return poses[int(((misfit * near).sum(1) / near.sum(1)).argmin())]


def coordinates(pose: Tensor, depth: Tensor, sky: Tensor, height: int, width: int, camera: CameraConfig,
                texels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each pixel's texel in the atlas (N, H·W) long, its footprint (N, H·W): texels of its surface per
    pixel across (1 or less: the pixel sees the texture at full resolution), and each column's snapped wall
    depth and wall tile (N, W) (``wall_hits``), for a frame of cameras at ``pose`` (N, 3) whose columns see
    walls ``depth`` (N, W) tiles away and ``sky`` (N,) bool above them."""
    n = pose.shape[0]
    f = focal_pixels(width, camera)
    half = 0.5 * camera.wall_height
    rays = column_rays(pose, width, camera)
    perp, u_wall, tile = wall_hits(pose, depth, rays)
    surface, distance = surfaces(perp, sky, height, width, camera)
    is_wall = surface == WALL
    y = _rows(height, pose.device)
    v_wall = (0.5 + y * perp[:, None, :] / (f * 2 * half)).clamp(0, 1 - 1e-6)
    plane = f * half / y.abs()  # each row's floor (or ceiling) distance along the heading
    points = pose[:, None, None, :2] + plane.view(1, height, 1, 1) * rays[:, None, :, :]
    fu, fv = torch.frac(points[..., 0]), torch.frac(points[..., 1])
    azimuth = torch.remainder(torch.atan2(rays[..., 1], rays[..., 0]) / (2 * math.pi), 1.0)[:, None, :]
    elevation = (y.abs() / (height / 2)).clamp(max=1 - 1e-6)
    u = torch.where(is_wall, u_wall[:, None, :], torch.where(surface == SKY, azimuth, fu))
    v = torch.where(is_wall, v_wall, torch.where(surface == SKY, elevation, fv))
    across = torch.where(surface == SKY, SKY_TILES * texels, texels)
    iu = (u * across).long().clamp(max=SKY_TILES * texels - 1)
    iv = (v * texels).long().clamp(0, texels - 1)
    base = torch.where(surface == SKY, 3 * texels * texels, surface * texels * texels)
    index = base + iv * across + torch.minimum(iu, across - 1)
    footprint = torch.where(surface == SKY, torch.ones_like(distance), distance * texels / f)
    return index.view(n, -1), footprint.view(n, -1), perp, tile, distance.view(n, -1)


def _rows(height: int, device: torch.device) -> Tensor:
    """Each pixel row's offset from the horizon (1, H, 1), in pixels (positive: below it)."""
    return (torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2).view(1, height, 1)


def surfaces(depth: Tensor, sky: Tensor, height: int, width: int, camera: CameraConfig
             ) -> tuple[Tensor, Tensor]:
    """What each pixel sees (N, H, W): ``WALL``, ``FLOOR``, ``CEILING`` or ``SKY``, and how far along the
    heading (tiles), for columns whose walls stand ``depth`` (N, W) away and ``sky`` (N,) above them."""
    f = focal_pixels(width, camera)
    half = 0.5 * camera.wall_height
    y = _rows(height, depth.device)
    is_wall = y.abs() < (f * half / depth.float().clamp_min(1e-2))[:, None, :]
    top = torch.where(sky.view(-1, 1, 1), SKY, CEILING)
    surface = torch.where(is_wall, WALL, torch.where(y > 0, FLOOR, top))
    plane = (f * half / y.abs()).expand(depth.shape[0], height, width)
    return surface, torch.where(is_wall, depth.float()[:, None, :].expand_as(plane), plane)


def fit_fog(frames: Tensor, depth: Tensor, sky: Tensor, camera: CameraConfig, sigma: float) -> Tensor:
    """One stream's fog from its frames (T, 3, H, W) in [-1, 1], their column depth (T, W) and sky flags
    (T,): (4,) its colour (r, g, b in [0, 1]) and density per tile. Every surface is taken for one colour
    (wall, floor, ceiling) lit evenly and seen through ``fog + (colour - fog) · exp(-density · distance)``,
    as the built-in world draws it; the density is the grid value (0 to MAX_FOG per tile) whose least-squares
    fit leaves the smallest residual. Lamps and texture are the residual's; what matters here is how the
    colour of a surface changes with its distance."""
    t, _, h, w = frames.shape
    blur = relative_detail(frames, sigma)[0][..., ::2, ::2].permute(0, 2, 3, 1).reshape(-1, 3)
    surface, distance = surfaces(depth, sky, h, w, camera)
    surface, distance = surface[..., ::2, ::2].reshape(-1), distance[..., ::2, ::2].reshape(-1)
    seen = surface != SKY
    if int(seen.sum()) < 16:
        return frames.new_zeros(4)
    blur, surface, distance = blur[seen], surface[seen], distance[seen].clamp(max=MAX_EMPTY)
    kinds = torch.stack([surface == kind for kind in (WALL, FLOOR, CEILING)], 1).float()
    best: tuple[float, Tensor] | None = None
    for density in torch.linspace(0, MAX_FOG, 36).tolist():
        e = torch.exp(-density * distance)[:, None]
        design = torch.cat([1 - e, e * kinds], 1)
        if density == 0:  # no fog: its colour is not in the picture (a zero column the solver cannot take)
            solution = torch.cat([blur.new_zeros(1, 3), torch.linalg.lstsq(kinds, blur).solution])
        else:
            solution = torch.linalg.lstsq(design, blur).solution
        residual = float((design @ solution - blur).square().sum())
        # A denser fog must fit better, not as well (a fog-free frame fits every density alike).
        if best is None or residual < best[0] - max(1e-3 * best[0], 1e-6 * len(blur)):
            best = (residual, torch.cat([solution[0].clamp(0, 1), torch.tensor([density])]))
    assert best is not None
    return best[1].to(frames.device)


def _fogged(fog: Tensor, distance: Tensor, index: Tensor, texels: int) -> Tensor:
    """How much of a surface's own colour reaches each pixel (N, P) through the fog (1 for the sky)."""
    e = torch.exp(-fog[:, 3:4] * distance)
    return torch.where(index >= 3 * texels * texels, torch.ones_like(e), e)


def relative_detail(frames: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """Frames (N, 3, H, W) in [-1, 1] → (their blur, in [0, 1]; their relative detail, clamped)."""
    lit = (frames.float() + 1) / 2
    blur = gaussian_blur(lit, sigma)
    return blur, (lit / blur.clamp_min(0.02) - 1).clamp(-MAX_DETAIL, MAX_DETAIL)


def write(memory: Memory, frames: Tensor, depth: Tensor, sky: Tensor, camera: CameraConfig, texels: int,
          sigma: float, trust: Tensor | float = 1.0, fill: bool = False,
          look_trust: Tensor | float | None = None) -> Memory:
    """``memory`` after seeing ``frames`` (N, 3, H, W) in [-1, 1] from its poses: each pixel adds its detail
    to its texel, weighted by ``trust`` (per stream or one) over its footprint squared beyond one texel (a far
    surface's pixel averages its texture; a near one sees it whole). ``fill``: only as much as the texel
    still lacks confidence (``read``), so what the memory holds firmly stays as it is. ``look_trust``
    (default: ``trust``) weighs the look (detail and colour) instead, ``trust`` then the wall map only."""
    n, _, h, w = frames.shape
    index, footprint, perp, tile, distance = coordinates(memory.pose, depth, sky, h, w, camera, texels)
    blur, detail = relative_detail(frames, sigma)
    trust = torch.as_tensor(trust, device=frames.device, dtype=torch.float32).reshape(-1, 1)
    share = (1 / footprint.clamp_min(1) ** 2)[:, None, :]
    if fill:
        share = share * (1 - _confidence(memory.weight.gather(2, index[:, None, :])))
    if look_trust is not None:
        look_trust = torch.as_tensor(look_trust, device=frames.device, dtype=torch.float32).reshape(-1, 1)
    weight = (trust if look_trust is None else look_trust)[:, :, None] * share
    spread = index[:, None, :].expand(n, 3, -1)
    add = memory.detail.scatter_add(2, spread, detail.reshape(n, 3, -1) * weight)
    walls = map_walls(memory.walls, memory.pose, depth.float(), perp, tile, trust, camera)
    out = memory._replace(detail=add, weight=memory.weight.scatter_add(2, index[:, None, :], weight),
                          walls=walls)
    if camera.memory_colour == 0:  # a model that does not draw colour keeps none
        return out
    # The colour with the fog taken out, weighted by how much of it came through the fog.
    e = _fogged(memory.fog, distance, index, texels)[:, None, :]
    fog = memory.fog[:, :3, None]
    own = (fog + (blur.reshape(n, 3, -1) - fog) / e.clamp_min(0.05)).clamp(0, 1.5)
    through = weight * e.square()
    return out._replace(colour=memory.colour.scatter_add(2, spread, own * through),
                        colour_weight=memory.colour_weight.scatter_add(2, index[:, None, :], through))


def map_walls(walls: Tensor, pose: Tensor, depth: Tensor, perp: Tensor, tile: Tensor, trust: Tensor,
              camera: CameraConfig) -> Tensor:
    """The wall map (N, MAP_TILES²) after one frame's sightings from ``pose`` (N, 3): each column's wall tile
    (``wall_hits``: ``tile``, at the snapped depth ``perp``, read at ``depth``) gains evidence as far as the
    reading can place it on the grid (near walls: a depth off by 12 % moves a wall 5 tiles away past the next
    grid line, one 1.5 tiles away not; and only where snapping moved it little), and the tiles its ray
    crossed before it, seen empty, lose some; the camera's own tile is empty. Evidence weighs ``trust`` (N, 1)
    per sighting (walls its square); ``is_wall`` reads ``WALL_EVIDENCE`` sightings as a wall."""
    n, w = perp.shape
    per_column = trust / max(1, w // 16)  # a wall seen across a sixteenth of the frame: one sighting
    reading = depth.clamp_min(1e-2)
    placed = (WALL_NEAR / reading).clamp(max=1).square() * ((perp / reading).log().abs() < 0.1).float()
    # A wall counts trust squared: a generated frame's wall is a guess, and a wall mapped where there is none
    # stops the camera for good, where a floor mapped where a wall stands only lets it walk on.
    walls = walls.scatter_add(1, tile.clamp_min(0), per_column * trust * placed * (tile >= 0).float())
    rays = column_rays(pose, w, camera)
    empty = torch.minimum(perp, reading)  # along each ray, tiles short of the wall are empty
    fractions = torch.tensor(EMPTY_FRACTIONS, device=pose.device).view(1, 1, -1)
    along = (empty[..., None] * fractions).clamp(max=MAX_EMPTY)  # (N, W, F)
    index, inside = map_tile(pose[:, 0, None, None] + along * rays[..., 0:1],
                             pose[:, 1, None, None] + along * rays[..., 1:2])
    seen_empty = (per_column * EMPTY_WEIGHT).view(-1, 1, 1) * inside.float()  # (N, W, F)
    walls = walls.scatter_add(1, index.view(n, -1), -seen_empty.expand_as(along).reshape(n, -1))
    own = map_tile(pose[:, 0], pose[:, 1])[0][:, None]
    emptied = torch.minimum(walls.gather(1, own), -per_column * EMPTY_WEIGHT)
    return walls.scatter(1, own, emptied)


class Look(NamedTuple):
    """What a memory holds for a frame (``look``): the detail (N, 3, H, W), attenuated by the footprint
    beyond one texel, and its confidence (N, 1, H, W) in [0, 1]; the colour seen through the stream's fog at
    this frame's distances (N, 3, H, W) in [0, 1] and its confidence (both None unless asked for)."""

    detail: Tensor
    confidence: Tensor
    colour: Tensor | None = None
    colour_confidence: Tensor | None = None


def look(memory: Memory, depth: Tensor, sky: Tensor, height: int, width: int, camera: CameraConfig,
         texels: int, colour: bool = False) -> Look:
    """What the memory holds for a frame seen from its poses whose columns see walls ``depth`` (N, W) away
    (confidences: the texel's weight, saturating at one full-resolution sighting)."""
    n = memory.pose.shape[0]
    index, footprint, _, _, distance = coordinates(memory.pose, depth, sky, height, width, camera, texels)
    at = index[:, None, :]
    weight = memory.weight.gather(2, at)
    detail = memory.detail.gather(2, at.expand(n, 3, -1)) / weight.clamp_min(1e-6)
    detail = detail / footprint.clamp_min(1)[:, None, :]
    out = Look(detail.view(n, 3, height, width), _confidence(weight).view(n, 1, height, width))
    if not colour:
        return out
    seen = memory.colour_weight.gather(2, at)
    own = memory.colour.gather(2, at.expand(n, 3, -1)) / seen.clamp_min(1e-6)
    e = _fogged(memory.fog, distance, index, texels)[:, None, :]
    fog = memory.fog[:, :3, None]
    through = (fog + (own - fog) * e).clamp(0, 1)
    return out._replace(colour=through.view(n, 3, height, width),
                        colour_confidence=_confidence(seen).view(n, 1, height, width))


def read(memory: Memory, depth: Tensor, sky: Tensor, height: int, width: int, camera: CameraConfig,
         texels: int) -> tuple[Tensor, Tensor]:
    """The detail the memory holds for a frame seen from its poses and its confidence (``look``)."""
    seen = look(memory, depth, sky, height, width, camera, texels)
    return seen.detail, seen.confidence


def _confidence(weight: Tensor) -> Tensor:
    """A texel's weight → how far its detail is trusted, in [0, 1]: one at half a full-resolution sighting."""
    return (weight / 0.5).clamp(max=1)


def apply(frames: Tensor, detail: Tensor, confidence: Tensor, sigma: float, colour: Tensor | None = None,
          colour_confidence: Tensor | None = None, pull: float = 0.0, reveal: Tensor | None = None) -> Tensor:
    """``frames`` (N, 3, H, W) in [-1, 1] with their own detail replaced by the memory's where it is
    confident: their blur times one plus the detail, in [-1, 1]; with ``colour`` (N, 3, H, W) in [0, 1], the
    blur first moves ``pull`` × its confidence of the way towards the colour's own blur (the light and colour
    a long rollout loses, a little each frame); pixels the memory knows nothing of stay as they were.
    Where ``reveal`` (N, 1, H, W) bool (pixels the camera's motion uncovered: the frame there is a guess) the
    memory's detail is drawn whether or not the frame's own is stronger. (Drawing its colour there in full as
    well lost 0.6 dB at horizon 1 of the eval's rollouts for no gain: a turn's first columns mostly continue
    the wall beside them, which the moved frame's fill already has.)"""
    blur, own = relative_detail(frames, sigma)
    changed = confidence > 0
    if colour is not None and colour_confidence is not None and pull > 0:
        towards = pull * colour_confidence
        blur = blur + towards * (gaussian_blur(colour, sigma) - blur)
        changed = changed | (towards > 0)
    # Only the memory's detail finer than the blur: its coarser part (a texture seen slightly misplaced, a
    # lighter or darker sighting) would multiply into the next frame's colours and, frame after frame, take
    # the picture to black or white.
    detail = detail - gaussian_blur(detail, sigma)
    # Only where the memory's detail is stronger than the frame's own: a freshly moved frame (or the DiT's)
    # may be sharper than the average of the sightings, and then it stays.
    energy = gaussian_blur(torch.cat([detail, own]).square().mean(1, keepdim=True), sigma)
    stronger = energy[: len(detail)] > energy[len(detail):]
    stronger = (stronger if reveal is None else stronger | reveal).float()
    confidence = confidence * stronger
    mixed = confidence * detail + (1 - confidence) * own
    out = (blur * (1 + mixed) * 2 - 1).clamp(-1, 1)
    return torch.where(changed, out, frames.float())


class Redrawer:
    """The surface memory of a batch of streams as ``Reprojector.move``'s ``redraw``: it writes the previous
    frame at its pose (a generated frame fills only what the memory lacks, at ``camera.memory_trust``), moves
    the poses by the held keys, and draws the memory's detail on the moved frame. ``memory`` holds the
    streams' memory after the call; rows where ``active`` (N,) is False (no pose) keep their frame. Rows
    where ``learns`` (N,) is False (repainting after a prompt switch) do not write their look (texture and
    colour): what they draw then is the new prompt's look from the bank of looks, if the model has one."""

    def __init__(self, memory: Memory, keys: Tensor, active: Tensor, camera: CameraConfig,
                 learns: Tensor | None = None) -> None:
        self.memory, self.keys, self.active, self.camera = memory, keys, active, camera
        self.learns = active if learns is None else active & learns
        self.step: Motion | None = None
        self.drawn: Look | None = None  # what the memory holds for the new frame (``see``, ``finish``)
        self.revealed: Tensor | None = None  # (N, W) the columns ``reveal`` gave a depth

    def motion(self, keys: Tensor) -> Motion:
        """``blocked``'s motion for streams with a memory, the keys' own for the rest (remembered for the
        call that follows, which moves the poses by it)."""
        free, held = key_motion(keys, self.camera), blocked(self.memory, keys, self.camera)
        self.step = tuple(torch.where(self.active, h, f) for h, f in zip(held, free, strict=True))
        return self.step

    def depth(self, depth: Tensor) -> Tensor:
        """The previous frame's column depth from the wall map where it knows the walls (streams with a
        memory; ``map_depth``), else ``depth``; a reading that puts a wall where the map rules one out (nearer
        than ``clear_depth`` by more than ``PHANTOM_MARGIN``: a wall the DiT drew in a corridor the stream has
        seen, or in one of the maze's cells) takes the map's guess instead (``guess_depth``), so the picture
        does not keep a wall the world does not have; one that reads a wall more than ``CORNER_MARGIN`` past
        a corner of the maze the map has not seen empty takes the corner's depth (``corner_depth``), so the
        picture does not open up, frame after frame, into the far, fogged and blurred plain that the DiT's
        drift makes of a maze it has not seen."""
        m = march(self.memory.walls, self.memory.pose, depth.shape[1], self.camera)  # one march for all three
        mapped = _mapped(m, depth.float())
        clear = _clear(m)
        phantom = mapped < clear[0] - PHANTOM_MARGIN
        if bool(phantom.any()):
            mapped = torch.where(phantom, _guess(m, clear, self.camera.memory_reveal), mapped)
        corner, met = _corner(m)
        mapped = torch.where(met & (mapped > corner + CORNER_MARGIN), corner, mapped)
        return torch.where(self.active.view(-1, 1), mapped, depth.float()).to(depth.dtype)

    def _step(self) -> Motion:
        """This frame's motion: ``motion``'s, or the keys' own if it was not asked for."""
        return self.step if self.step is not None else key_motion(self.keys, self.camera)

    def reveal(self, carried: Tensor) -> Tensor:
        """The new frame's carried column depth (N, W) with the columns the motion uncovered (NaN) given the
        wall map's guess (``guess_depth``, ``camera.memory_reveal`` > 0, streams with a memory), which the
        call that follows draws from the memory; without ``memory_reveal``, ``carried`` as it is."""
        beyond = self.camera.memory_reveal
        uncovered = ~torch.isfinite(carried) & self.active.view(-1, 1)
        if beyond <= 0 or not bool(uncovered.any()):
            self.revealed = None
            return carried
        guess = guess_depth(self.memory.walls, advance(self.memory.pose, self._step()), carried.shape[1],
                            self.camera, beyond)
        self.revealed = uncovered
        return torch.where(uncovered, guess.to(carried.dtype), carried)

    def __call__(self, moved: Tensor, depth: Tensor, previous: Tensor, previous_depth: Tensor, sky: Tensor,
                 still: Tensor) -> Tensor:
        cam, texels = self.camera, self.camera.surface_memory
        trust = cam.memory_trust * (self.active & ~still).float()
        memory = write(self.memory, previous, previous_depth, sky, cam, texels, cam.memory_sigma, trust,
                       fill=True, look_trust=trust * self.learns.float())
        self.memory = memory._replace(pose=advance(memory.pose, self._step()))
        seen = self.see(depth, sky, *moved.shape[-2:])
        active = self.active.view(-1, 1, 1, 1).float()
        reveal = None
        if self.revealed is not None:
            reveal = (self.revealed & ~still.view(-1, 1))[:, None, None, :].expand(-1, 1, moved.shape[-2], -1)
        return apply(moved, seen.detail, seen.confidence * active, cam.memory_sigma, seen.colour,
                     seen.colour_confidence, cam.memory_colour, reveal)

    def see(self, depth: Tensor, sky: Tensor, height: int, width: int) -> Look:
        """What the memory holds for the new frame (its poses, its columns' wall ``depth`` (N, W)), kept for
        ``finish``; called by ``__call__``, and by a move in which no camera moves (no redraw then)."""
        cam = self.camera
        self.drawn = look(self.memory, depth, sky, height, width, cam, cam.surface_memory,
                          colour=cam.memory_colour > 0)
        return self.drawn

    def finish(self, frames: Tensor) -> Tensor:
        """The new frames (N, 3, H, W) in [-1, 1] as made by the DiT from the moved ones, with the memory's
        detail drawn on them again where it is stronger than theirs (the autoencoder's round trip and the DiT
        soften what the redraw drew; a still camera's frame gets it as a moving one's does, so the picture
        does not soften when the player stops); rows without a memory as they are."""
        if self.drawn is None:
            return frames
        confidence = self.drawn.confidence * self.active.view(-1, 1, 1, 1).float()
        return apply(frames, self.drawn.detail.to(frames), confidence.to(frames), self.camera.memory_sigma)


LOOKS_FILE = "looks.safetensors"  # a model directory's bank of looks (``Looks``), when it has one
# The least cosine similarity of a prompt's sentence vector to a bank entry's for the entry's look to be used.
# With a bank of two worlds per theme: the built-in world's prompts of held-out worlds ≥ 0.93 (each to a world
# of its theme); "an ice cave" 0.72, "lava" 0.55, "a dungeon" 0.53; "a forest" 0.40, "a pink candy land" 0.36,
# "the moon" 0.28 (no look: the picture keeps the DiT's own).
LOOK_MATCH = 0.45


class Looks(NamedTuple):
    """A bank of K looks: what a surface memory held after a long walk through each of K worlds (the
    texture and fog-free colour of its walls, floor, ceiling and sky), keyed by the sentence vector of the
    world's prompt. A stream whose prompt changes starts the new look from the entry whose prompt is nearest
    (``nearest_look``, ``with_look``) instead of from nothing: the model then draws the new prompt's textures
    at once, where its DiT alone, trained by regression, keeps the old picture's structure under new colours.

    ``prompts`` (K, D) unit vectors; ``detail`` (K, 3, S) each texel's mean relative detail; ``colour``
    (K, 3, S) its mean colour with the fog taken out, in [0, 1.5]; ``confidence`` (K, 2, S) of the detail
    and of the colour, in [0, 1] (``_confidence``); ``fog`` (K, 4) as ``Memory.fog``."""

    prompts: Tensor
    detail: Tensor
    colour: Tensor
    confidence: Tensor
    fog: Tensor


def looks_of(memory: Memory, prompts: Tensor) -> Looks:
    """The bank of what each stream of ``memory`` (K streams) holds, keyed by its prompt's vector (K, D)."""
    detail = memory.detail / memory.weight.clamp_min(1e-6)
    colour = memory.colour / memory.colour_weight.clamp_min(1e-6)
    confidence = torch.cat([_confidence(memory.weight), _confidence(memory.colour_weight)], 1)
    return Looks(torch.nn.functional.normalize(prompts.float(), dim=-1), detail, colour, confidence,
                 memory.fog.float())


def nearest_look(looks: Looks, prompt: Tensor) -> int | None:
    """The entry of ``looks`` whose prompt vector is nearest (cosine) to ``prompt`` (D,), or None when even
    that one is not similar enough (``LOOK_MATCH``: the prompt speaks of none of the bank's worlds)."""
    vector = torch.nn.functional.normalize(prompt.float().to(looks.prompts.device), dim=-1)
    similarity = looks.prompts @ vector
    best = int(similarity.argmax())
    return best if float(similarity[best]) >= LOOK_MATCH else None


def with_look(memory: Memory, looks: Looks, entry: int) -> Memory:
    """One stream's ``memory`` (unbatched: pose (3,), detail (3, S), …) with the texture, colour and fog of
    ``looks``' entry in place of its own (a new prompt's look); its pose and walls stay."""
    weight = 0.5 * looks.confidence[entry].to(memory.detail)  # ``_confidence``'s inverse
    detail, colour = looks.detail[entry].to(weight), looks.colour[entry].to(weight)
    return memory._replace(detail=detail * weight[0:1], weight=weight[0:1].clone(),
                           colour=colour * weight[1:2], colour_weight=weight[1:2].clone(),
                           fog=looks.fog[entry].to(memory.fog))


LOOK_DETAIL_STEP = 100.0  # a bank's detail is kept as int8 in steps of 1/100 (±1.27, what a mean holds)
LOOK_COLOUR_TOP = 1.5  # its colour as uint8 from 0 to this (``write``'s fog-free colour is clamped there)


def _planes(atlas: Tensor, texels: int) -> tuple[Tensor, Tensor]:
    """An atlas (K, C, S) as images: wall, floor and ceiling (K, C·3, T, T) and the sky (K, C, T, 8T)."""
    k, c, _ = atlas.shape
    t2 = texels * texels
    return (atlas[..., :3 * t2].reshape(k, c * 3, texels, texels),
            atlas[..., 3 * t2:].reshape(k, c, texels, SKY_TILES * texels))


def _atlas(planes: Tensor, sky: Tensor) -> Tensor:
    """``_planes``' inverse."""
    k, c = sky.shape[:2]
    return torch.cat([planes.reshape(k, c, -1), sky.reshape(k, c, -1)], -1)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Images (K, C, H, W) at ``size``: area means down, bilinear up."""
    if tuple(x.shape[-2:]) == size:
        return x
    if size[0] < x.shape[-2]:
        return torch.nn.functional.adaptive_avg_pool2d(x, size)
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


# A bank's parts (``save_looks``): per field, its channels, how it is quantised (to stored integers and
# back) and at which of the stored resolutions its surfaces and its sky are kept.
_LOOK_PARTS = {
    "detail": (3, torch.int8, lambda x: (x * LOOK_DETAIL_STEP).round().clamp(-127, 127),
               lambda q: q / LOOK_DETAIL_STEP, "detail_texels", "sky_texels"),
    "colour": (3, torch.uint8, lambda x: (x / LOOK_COLOUR_TOP * 255).round().clamp(0, 255),
               lambda q: q * (LOOK_COLOUR_TOP / 255), "colour_texels", "colour_texels"),
    "confidence": (2, torch.uint8, lambda x: (x * 255).round().clamp(0, 255), lambda q: (q / 255).clamp(0, 1),
                   "colour_texels", "colour_texels"),
}


def save_looks(path: str | Path, looks: Looks, texels: int, detail_texels: int | None = None,
               sky_texels: int | None = None, colour_texels: int | None = None) -> None:
    """Write a bank of looks for atlases of ``texels`` per tile: the detail of the walls, floor and ceiling
    at ``detail_texels`` per tile and the sky's at ``sky_texels`` (int8, ``LOOK_DETAIL_STEP``), the colour
    and the confidences at ``colour_texels`` (uint8; a texture's colour varies slowly, its detail is the
    detail's), the prompt vectors in half precision."""
    sizes = {"texels": texels, "detail_texels": detail_texels or texels, "sky_texels": sky_texels or texels,
             "colour_texels": colour_texels or texels}
    for name, size in sizes.items():
        if size < 1 or size > texels:
            raise ValueError(f"{name} must be in 1..{texels}, got {size}")
    tensors = {"prompts": looks.prompts.to(torch.float16), "fog": looks.fog.float()}
    for name, (_, dtype, quantise, _, plane_size, sky_size) in _LOOK_PARTS.items():
        planes, sky = _planes(getattr(looks, name).float(), texels)
        tensors[name] = quantise(_resize(planes, (sizes[plane_size],) * 2)).to(dtype)
        sky_shape = (sizes[sky_size], SKY_TILES * sizes[sky_size])
        tensors[f"sky_{name}"] = quantise(_resize(sky, sky_shape)).to(dtype)
    save_file({name: value.detach().cpu().contiguous() for name, value in tensors.items()}, str(path),
              metadata={name: str(size) for name, size in sizes.items()})


def load_looks(path: str | Path, texels: int) -> Looks:
    """Read a bank written by ``save_looks`` as atlases of ``texels`` per tile; ValueError when the file is
    not one (or one for another atlas size)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        sizes = {name: int(meta[name]) for name in ("texels", "detail_texels", "sky_texels", "colour_texels")}
    except Exception as exc:  # safetensors raises its own error types for truncated or garbage files
        raise ValueError(f"{path}: not a bank of looks ({type(exc).__name__}: {exc})") from None
    if sizes["texels"] != texels:
        raise ValueError(f"{path}: a bank for surface memories of {sizes['texels']} texels per tile, this "
                         f"model's has {texels}")
    if "prompts" not in tensors or tensors["prompts"].dim() != 2:
        raise ValueError(f"{path}: not a bank of looks (no prompts)")
    k = tensors["prompts"].shape[0]
    expected = {"fog": (torch.float32, (k, 4))}
    for name, (channels, dtype, _, _, plane_size, sky_size) in _LOOK_PARTS.items():
        expected[name] = (dtype, (k, channels * 3, sizes[plane_size], sizes[plane_size]))
        expected[f"sky_{name}"] = (dtype, (k, channels, sizes[sky_size], SKY_TILES * sizes[sky_size]))
    for name, (dtype, shape) in expected.items():
        if name not in tensors or tensors[name].dtype != dtype or tuple(tensors[name].shape) != shape:
            got = "none" if name not in tensors else f"{tensors[name].dtype} {tuple(tensors[name].shape)}"
            raise ValueError(f"{path}: not a bank of looks ({name}: {got}, expected {dtype} {shape})")
    parts = {}
    for name, (_, _, _, restore, _, _) in _LOOK_PARTS.items():
        planes = _resize(restore(tensors[name].float()), (texels, texels))
        sky = _resize(restore(tensors[f"sky_{name}"].float()), (texels, SKY_TILES * texels))
        parts[name] = _atlas(planes, sky)
    return Looks(torch.nn.functional.normalize(tensors["prompts"].float(), dim=-1), parts["detail"],
                 parts["colour"], parts["confidence"], tensors["fog"])
