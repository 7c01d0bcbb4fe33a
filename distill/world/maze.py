"""Maze layouts and light maps for a batch of worlds, carved in lockstep with tensor ops.

The map is a grid of ``(2n+1) × (2n+1)`` tiles for ``n × n`` maze cells: cells sit on odd (row, col) tiles,
the tiles between them are walls or passages, and the border is always wall. Tile values: 0 empty,
1 wall, 2 accent wall. A map coordinate (x, y) lies in tile (row=floor(y), col=floor(x)).

1. A perfect maze: depth-first carving, all worlds stepping together (2n² − 2 steps; each step pushes a
   random unvisited neighbour or pops the stack).
2. Open rooms: rectangles of 2–3 × 2–3 cells cleared, some with a pillar in the middle.
3. Loops: a fraction of the remaining inner walls knocked out, so the explorer can circle.
4. Accent walls: a fraction of wall tiles get the accent surface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worldloop.distill.world.hashing import randint, uniform

_DFS, _START, _ROOM, _LOOP, _ACCENT, _PILLAR, _LAMP = range(1, 8)
MAX_ROOMS = 4


def _spanning_tree(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """Step 1: (B, G·G) long tiles of a perfect maze, G = 2n+1."""
    b, g, cells = seeds.shape[0], 2 * n + 1, n * n
    dev, ar = seeds.device, torch.arange(seeds.shape[0], device=seeds.device)
    r_all = torch.arange(cells, device=dev) // n
    c_all = torch.arange(cells, device=dev) % n
    grid = torch.ones(b, g * g, dtype=torch.long, device=dev)
    grid[:, (2 * r_all + 1) * g + 2 * c_all + 1] = 0
    dr = torch.tensor([-1, 1, 0, 0], device=dev)
    dc = torch.tensor([0, 0, -1, 1], device=dev)
    visited = torch.zeros(b, cells, dtype=torch.bool, device=dev)
    stack = torch.zeros(b, cells, dtype=torch.long, device=dev)
    stack[:, 0] = randint(seeds, cells, _DFS, -1)
    visited[ar, stack[:, 0]] = True
    sp = torch.ones(b, dtype=torch.long, device=dev)  # stack size
    dirs = torch.arange(4, device=dev)
    for step in range(2 * cells - 2):
        top = stack[ar, sp - 1]
        r, c = top // n, top % n
        nr, nc = r[:, None] + dr, c[:, None] + dc  # (B, 4)
        inside = (nr >= 0) & (nr < n) & (nc >= 0) & (nc < n)
        nb = nr.clamp(0, n - 1) * n + nc.clamp(0, n - 1)
        avail = inside & ~visited.gather(1, nb)
        score = torch.where(avail, uniform(seeds[:, None], _DFS, step, dirs), -1.0)
        choice = score.argmax(1)
        has = avail.any(1)
        nxt = torch.where(has, nb[ar, choice], top)
        # The passage tile between the two cells (or the cell's own tile, already open, when popping).
        passage = (2 * r + 1 + dr[choice] * has) * g + (2 * c + 1 + dc[choice] * has)
        grid[ar, passage] = 0
        visited[ar, nxt] = True
        stack[ar, sp.clamp(max=cells - 1)] = torch.where(has, nxt, stack[ar, sp.clamp(max=cells - 1)])
        sp = torch.where(has, sp + 1, sp - 1).clamp(min=1)
    return grid


def carve(seeds: torch.Tensor, n: int, rooms: torch.Tensor, loops: torch.Tensor,
          accent_rate: torch.Tensor) -> torch.Tensor:
    """Maps for a batch of worlds → (B, G, G) long, G = 2n+1; ``rooms``, ``loops``, ``accent_rate``: (B,)."""
    if n < 3:
        raise ValueError(f"a maze needs at least 3×3 cells, got {n}")
    b, g, dev = seeds.shape[0], 2 * n + 1, seeds.device
    grid = _spanning_tree(seeds, n).view(b, g, g)
    rows = torch.arange(g, device=dev).view(1, 1, g, 1)
    cols = torch.arange(g, device=dev).view(1, 1, 1, g)
    # Step 2: rooms, as (B, MAX_ROOMS) rectangles in cell units.
    k = torch.arange(MAX_ROOMS, device=dev)
    sb = seeds[:, None]
    h, w = 2 + randint(sb, 2, _ROOM, 0, k), 2 + randint(sb, 2, _ROOM, 1, k)
    r0, c0 = randint(sb, n - h + 1, _ROOM, 2, k), randint(sb, n - w + 1, _ROOM, 3, k)
    active = (k < rooms[:, None]).view(b, MAX_ROOMS, 1, 1)
    inside = ((rows >= (2 * r0 + 1)[..., None, None]) & (rows <= (2 * (r0 + h) - 1)[..., None, None])
              & (cols >= (2 * c0 + 1)[..., None, None]) & (cols <= (2 * (c0 + w) - 1)[..., None, None]))
    grid = grid.masked_fill((inside & active).any(1), 0)
    pillar = (rows == (2 * r0 + 2)[..., None, None]) & (cols == (2 * c0 + 2)[..., None, None])
    pillar &= active & (uniform(sb, _PILLAR, k) < 0.5).view(b, MAX_ROOMS, 1, 1)
    grid = grid.masked_fill(pillar.any(1), 1)
    # Step 3: loops through walls between two cells (one odd and one even coordinate, not the border).
    r2, c2 = rows[0], cols[0]  # (1, G, 1), (1, 1, G)
    between = ((r2 % 2) != (c2 % 2)) & (r2 > 0) & (r2 < g - 1) & (c2 > 0) & (c2 < g - 1)
    tile_id = r2 * g + c2
    knock = between & (uniform(seeds.view(b, 1, 1), _LOOP, tile_id) < loops.view(b, 1, 1))
    grid = grid.masked_fill(knock, 0)
    # Step 4: accent walls.
    accent = (grid > 0) & (uniform(seeds.view(b, 1, 1), _ACCENT, tile_id) < accent_rate.view(b, 1, 1))
    return torch.where(accent, 2, grid)


def start_cells(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """A random maze cell per world (always open: cells are never walled) → (B, 2) tile centre (x, y)."""
    cell = randint(seeds, n * n, _START)
    return torch.stack([2 * (cell % n) + 1.5, 2 * (cell // n) + 1.5], dim=1).float()


def light_map(grid: torch.Tensor, seeds: torch.Tensor, lamps: torch.Tensor, lamp_power: torch.Tensor,
              ambient: torch.Tensor, res: int, max_lamps: int = 16) -> torch.Tensor:
    """Light on the floor plan: (B, G·res, G·res) = ambient occlusion × (ambient + lamps).

    Lamps hang at random cell centres and fall off as a sum of two Gaussians (separable, so each lamp costs
    two 1-D profiles and one outer product). Occlusion darkens the floor near walls, strongest in corners.
    """
    b, g = grid.shape[0], grid.shape[-1]
    dev, n = grid.device, (g - 1) // 2
    coords = (torch.arange(g * res, device=dev, dtype=torch.float32) + 0.5) / res  # texel centres
    k = torch.arange(max_lamps, device=dev)
    cell = randint(seeds[:, None], n * n, _LAMP, k)  # (B, L)
    lx, ly = (2 * (cell % n) + 1.5).float(), (2 * (cell // n) + 1.5).float()
    on = (k < lamps[:, None]).float() * lamp_power[:, None]  # (B, L)
    dx2 = (coords.view(1, 1, -1) - lx[..., None]) ** 2  # (B, L, X)
    dy2 = (coords.view(1, 1, -1) - ly[..., None]) ** 2
    light = ambient.view(b, 1, 1).expand(b, g * res, g * res)
    for sigma, weight in ((0.9, 1.0), (2.2, 0.35)):
        ax = torch.exp(-dx2 / (2 * sigma ** 2))  # (B, L, X)
        ay = torch.exp(-dy2 / (2 * sigma ** 2)) * (weight * on[..., None])  # (B, L, Y)
        light = light + torch.bmm(ay.transpose(1, 2), ax)  # (B, Y, X)
    walls = (grid > 0).float().repeat_interleave(res, 1).repeat_interleave(res, 2).unsqueeze(1)
    kernel = res + 1 if res % 2 == 0 else res
    occupancy = F.avg_pool2d(walls, kernel, stride=1, padding=kernel // 2)[:, 0]
    return light * (1 - 0.75 * occupancy)
