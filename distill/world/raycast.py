"""The batched raycaster: grid traversal per screen column, then one texture lookup per pixel.

Conventions: map coordinates (x, y) with y pointing down the map; heading ``angle`` with direction
(cos, sin), so turning right increases the angle; walls are one tile high and the eye sits at half height,
which makes the floor and the ceiling mirror images of each other about the horizon (one plane cast serves
both). Distances are perpendicular to the view plane, so walls do not bulge (no fish-eye).

``render`` per batch of worlds:
1. Column rays ``dir + right · c`` for c across the view plane, traversed tile by tile (DDA) for a fixed
   number of steps — enough to cross the whole map, so every ray hits a wall.
2. Walls per column: hit distance → wall span on screen, texture column, light at the wall, fog.
3. Floor and ceiling (or sky) per row below the horizon: the row's distance gives the floor point of every
   column; the ceiling row above the horizon sees the same point.
4. Per pixel: pick wall or plane, gather the texel (albedo + emission), light it, fog it, to uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class View:
    height: int
    width: int
    fov: float  # horizontal field of view, radians

    @property
    def focal(self) -> float:
        """Pixels per unit of tan(angle): the projection scale for square pixels."""
        return (self.width / 2) / math.tan(self.fov / 2)


@dataclass(frozen=True)
class Scene:
    """Per-world static tensors (first dimension B) that ``render`` reads."""

    grid: torch.Tensor  # (B, G·G) long tiles, 0 empty
    size: int  # G
    # (B, 4, 11·T²) uint8 texels, planar: wall, accent, floor (T² each), ceiling or sky (8·T²); albedo in
    # steps of 2/255 (up to 2, for highlights), emission in steps of 1/255.
    atlas: torch.Tensor
    tex: int  # T
    light: torch.Tensor  # (B, (G·res)²) floor-plan light
    light_res: int
    fog_color: torch.Tensor  # (B, 3)
    fog_density: torch.Tensor  # (B,)
    torch_power: torch.Tensor  # (B,)
    sky: torch.Tensor  # (B,) bool

    def select(self, index: slice) -> Scene:
        return Scene(self.grid[index], self.size, self.atlas[index], self.tex, self.light[index],
                     self.light_res, self.fog_color[index], self.fog_density[index],
                     self.torch_power[index], self.sky[index])


@dataclass(frozen=True)
class Hits:
    dist: torch.Tensor  # (B, K) distance in units of the ray vector's length
    x_side: torch.Tensor  # (B, K) bool: the wall faces ±x
    tile: torch.Tensor  # (B, K) long: the wall's tile value
    u: torch.Tensor  # (B, K) horizontal texture coordinate in [0, 1)
    front: torch.Tensor  # (B, K, 2) a point just in front of the wall, for its light


def cast(grid: torch.Tensor, size: int, pos: torch.Tensor, rays: torch.Tensor) -> Hits:
    """Traverse the grid from ``pos`` (B, 2) along ``rays`` (B, K, 2) until each ray hits a wall."""
    px, py = pos[:, 0:1], pos[:, 1:2]
    rx, ry = rays[..., 0], rays[..., 1]
    mx = torch.floor(px).long().expand_as(rx)
    my = torch.floor(py).long().expand_as(ry)
    big = torch.full_like(rx, 1e30)
    ddx = torch.where(rx == 0, big, 1 / rx.abs())
    ddy = torch.where(ry == 0, big, 1 / ry.abs())
    step_x, step_y = torch.where(rx < 0, -1, 1), torch.where(ry < 0, -1, 1)
    side_x = torch.where(rx < 0, px - mx, mx + 1 - px) * ddx  # ray length to the next x boundary
    side_y = torch.where(ry < 0, py - my, my + 1 - py) * ddy
    hit = torch.zeros_like(rx, dtype=torch.bool)
    dist, x_side = torch.zeros_like(rx), torch.zeros_like(hit)
    tile = torch.zeros_like(mx)
    for i in range(2 * size):
        go_x = side_x < side_y
        crossing = torch.where(go_x, side_x, side_y)
        mx = mx + step_x * go_x
        my = my + step_y * ~go_x
        side_x = side_x + ddx * go_x
        side_y = side_y + ddy * ~go_x
        t = grid.gather(1, (my.clamp(0, size - 1) * size + mx.clamp(0, size - 1)).view(grid.shape[0], -1))
        new = (t.view_as(mx) > 0) & ~hit
        dist = torch.where(new, crossing, dist)
        x_side = torch.where(new, go_x, x_side)
        tile = torch.where(new, t.view_as(mx), tile)
        hit |= new
        if i % 8 == 7 and bool(hit.all()):
            break
    wall_x = torch.where(x_side, py + dist * ry, px + dist * rx)
    u = torch.frac(wall_x)
    u = torch.where((x_side & (rx > 0)) | (~x_side & (ry < 0)), 1 - u, u)
    hx, hy = px + dist * rx, py + dist * ry
    front = torch.stack([hx - 0.1 * step_x * x_side, hy - 0.1 * step_y * ~x_side], dim=-1)
    return Hits(dist, x_side, tile, u.clamp(0, 1 - 1e-6), front)


def column_rays(angle: torch.Tensor, view: View) -> torch.Tensor:
    """(B,) headings → (B, W, 2) rays through pixel-column centres; length 1 along the heading."""
    c = (2 * (torch.arange(view.width, device=angle.device) + 0.5) / view.width - 1) * math.tan(view.fov / 2)
    heading = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)[:, None, :]  # (B, 1, 2)
    right = torch.stack([-torch.sin(angle), torch.cos(angle)], dim=-1)[:, None, :]
    return heading + right * c.view(1, -1, 1)


def _light_at(scene: Scene, points: torch.Tensor) -> torch.Tensor:
    """Floor-plan light at points (B, ..., 2) → (B, ...)."""
    n = scene.size * scene.light_res
    ix = (points[..., 0] * scene.light_res).long().clamp(0, n - 1)
    iy = (points[..., 1] * scene.light_res).long().clamp(0, n - 1)
    return scene.light.gather(1, (iy * n + ix).view(points.shape[0], -1)).view(points.shape[:-1])


def _torch_light(scene: Scene, dist: torch.Tensor) -> torch.Tensor:
    power = scene.torch_power.view(-1, *([1] * (dist.dim() - 1)))
    return power / (1 + (dist / 2.5) ** 2)


def render(scene: Scene, pos: torch.Tensor, angle: torch.Tensor, view: View) -> torch.Tensor:
    """Frames of a batch of worlds: (B, H, W, 3) uint8."""
    b, h, w, t = pos.shape[0], view.height, view.width, scene.tex
    h2, tt = h // 2, t * t
    rays = column_rays(angle, view)
    # Step 2: walls, per column.
    hits = cast(scene.grid, scene.size, pos, rays)
    perp = hits.dist.clamp(min=1e-3)  # (B, W)
    col_base = (hits.tile - 1).clamp(0, 1) * tt + (hits.u * t).long()
    side_shade = torch.where(hits.x_side, 1.0, 0.78)
    wall_light = _light_at(scene, hits.front) * side_shade + _torch_light(scene, perp)
    wall_fog = torch.exp(-scene.fog_density[:, None] * perp)
    # Step 3: floor points of the rows below the horizon (row k at k + 0.5 pixels under it).
    yc = torch.arange(h2, device=pos.device, dtype=torch.float32) + 0.5
    row_dist = view.focal * 0.5 / yc  # (H/2,)
    points = pos[:, None, None, :] + row_dist.view(1, -1, 1, 1) * rays[:, None, :, :]  # (B, H/2, W, 2)
    fx = (torch.frac(points[..., 0]) * t).long()
    fy = (torch.frac(points[..., 1]) * t).long()
    floor_idx = 2 * tt + fy * t + fx
    ceil_idx = 3 * tt + fy * t + fx
    sky_w, sky_h = 8 * t, t
    azimuth = torch.atan2(rays[..., 1], rays[..., 0])  # (B, W)
    sky_col = (torch.remainder(azimuth / (2 * math.pi), 1.0) * sky_w).long().clamp(max=sky_w - 1)
    sky_row = (yc / h2 * sky_h).long().clamp(max=sky_h - 1)  # (H/2,)
    sky_idx = 3 * tt + sky_row.view(1, -1, 1) * sky_w + sky_col[:, None, :]
    top_idx = torch.where(scene.sky.view(b, 1, 1), sky_idx, ceil_idx)
    plane_light = _light_at(scene, points) + _torch_light(scene, row_dist.view(1, h2, 1))
    plane_fog = torch.exp(-scene.fog_density.view(b, 1, 1) * row_dist.view(1, h2, 1))
    top_fog = torch.where(scene.sky.view(b, 1, 1), 1.0, plane_fog)
    # Step 4: per pixel.
    y = torch.arange(h, device=pos.device, dtype=torch.float32).view(1, h, 1) + 0.5 - h / 2
    is_wall = y.abs() < (view.focal * 0.5 / perp)[:, None, :]  # (B, H, W)
    ty = ((0.5 + y * perp[:, None, :] / view.focal) * t).long().clamp(0, t - 1)
    plane_idx = torch.cat([top_idx.flip(1), floor_idx], 1)  # the ceiling mirrors the floor about the horizon
    plane_light = torch.cat([plane_light.flip(1) * 0.8, plane_light], 1)
    plane_fog = torch.cat([top_fog.flip(1), plane_fog], 1).expand(b, h, w)
    idx = torch.where(is_wall, col_base[:, None, :] + ty * t, plane_idx)
    light = torch.where(is_wall, wall_light[:, None, :], plane_light)
    fog = torch.where(is_wall, wall_fog[:, None, :], plane_fog)
    texel = scene.atlas.gather(2, idx.view(b, 1, -1).expand(b, 4, h * w)).float()  # (B, 4, H·W)
    # out = 255·(fog_color + (albedo · (light·(1 − e) + e) − fog_color) · fog), with albedo = 2·texel/255,
    # folded into one multiply-add per channel: texel · gain + offset.
    light = light.view(b, 1, -1).clamp(max=1.6)
    fog = fog.reshape(b, 1, -1)
    gain = (2 * fog) * (light + (1 - light) * texel[:, 3:] * (1 / 255))
    offset = (255 * scene.fog_color[:, :, None]) * (1 - fog) + 0.5
    out = torch.addcmul(offset, texel[:, :3], gain).clamp_(0, 255)
    return out.to(torch.uint8).view(b, 3, h, w).permute(0, 2, 3, 1).contiguous()
