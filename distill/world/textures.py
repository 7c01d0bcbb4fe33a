"""Procedural textures of the built-in world: wall, floor and ceiling patterns, baked once per world.

A pattern maps texture coordinates (u across, v down, both in [0, 1)) of a batch of worlds to three layers:
``mix`` (0 = the surface's colour, 1 = its detail colour), ``shade`` (a brightness multiplier: mortar, seams,
grain) and ``glow`` (1 = the texel emits its detail colour and ignores the light: lava, neon, lamps, sky).
Patterns tile seamlessly — noise lattices wrap — because walls repeat every tile and floors every world unit.

Baked texels hold four channels: albedo RGB and the emission fraction ``e``; the renderer shows
``albedo · (light · (1 − e) + e)``. Skies are patterns too, in ``skies``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worldloop.distill.world.hashing import uniform


@dataclass(frozen=True)
class Layers:
    mix: torch.Tensor  # (B, h, w) in [0, 1]
    shade: torch.Tensor  # (B, h, w) brightness multiplier
    glow: torch.Tensor  # (B, h, w) in [0, 1]
    white: torch.Tensor | float = 0.0  # (B, h, w) white light added on top: stars, sun, sparkles


@dataclass(frozen=True)
class Canvas:
    """Texture coordinates and per-world randomness for one surface of a batch of worlds."""

    u: torch.Tensor  # (1, h, w), across, in [0, 1)
    v: torch.Tensor  # (1, h, w), down, in [0, 1)
    seed: torch.Tensor  # (B, 1, 1) long
    scale: torch.Tensor  # (B, 1, 1) float: the pattern's repeat count (rows of bricks, panels, ...)
    salt: int  # distinguishes surfaces of one world
    weights: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # interpolation matrices

    def rand(self, *counters: torch.Tensor | int) -> torch.Tensor:
        return uniform(self.seed, self.salt, *counters)

    def cell(self, salt: int, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """A random value per pattern cell (row, col < 1024), one hash per texel."""
        return uniform(self.seed, self.salt, salt, (row * 1024 + col).long())

    def noise(self, fu: int, fv: int | None = None, salt: int = 0) -> torch.Tensor:
        """Smooth periodic value noise in [0, 1] with ``fu`` × ``fv`` lattice cells per texture."""
        fv = fu if fv is None else fv
        h, w = self.u.shape[-2:]
        dev = self.seed.device
        cell = torch.arange(fv, device=dev).view(1, fv, 1) * fu + torch.arange(fu, device=dev)
        lattice = self.rand(1000 + salt, cell)  # (B, fv, fu)
        for n, f in ((h, fv), (w, fu)):
            if (n, f) not in self.weights:
                self.weights[n, f] = _cubic_weights(n, f, dev)
        return (self.weights[h, fv] @ lattice @ self.weights[w, fu].T).clamp(0, 1)  # (B, h, w)

    def fbm(self, freq: int, octaves: int = 3, salt: int = 0) -> torch.Tensor:
        h, w = self.u.shape[-2:]
        total, amp, norm = 0.0, 1.0, 0.0
        for k in range(octaves):
            f = freq << k
            if f > min(h, w):
                break
            total = total + amp * self.noise(f, f, salt + 17 * k)
            norm += amp
            amp *= 0.5
        return total / norm


def _cubic_weights(n: int, f: int, device: torch.device) -> torch.Tensor:
    """(n, f) matrix interpolating f periodic lattice values at n texel centres (Catmull-Rom cubic)."""
    x = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * (f / n) - 0.5
    i0 = torch.floor(x)
    t = (x - i0)[:, None]
    weights = torch.cat([(-t ** 3 + 2 * t ** 2 - t) / 2, (3 * t ** 3 - 5 * t ** 2 + 2) / 2,
                         (-3 * t ** 3 + 4 * t ** 2 + t) / 2, (t ** 3 - t ** 2) / 2], dim=1)  # (n, 4)
    columns = (i0.long()[:, None] + torch.arange(-1, 3, device=device)) % f
    return torch.zeros(n, f, device=device).scatter_add_(1, columns, weights)


def _cells(c: Canvas, rows: torch.Tensor, cols: torch.Tensor, stagger: float = 0.5):
    """Brick-like cells: (row, col) indices and (fu, fv) inside the cell; odd rows shift by ``stagger``."""
    row = torch.floor(c.v * rows)
    shifted = c.u + stagger * (row % 2) / cols
    col = torch.floor(shifted * cols) % cols
    return row, col, torch.frac(shifted * cols), torch.frac(c.v * rows)


def _seam(fu: torch.Tensor, fv: torch.Tensor, wu: float | torch.Tensor, wv: float | torch.Tensor):
    """1 on the cell's left/top border (the shared mortar line), 0 inside."""
    return ((fu < wu) | (fv < wv)).float()


def _bevel(fu: torch.Tensor, fv: torch.Tensor, width: float) -> torch.Tensor:
    """Brightness falling off toward the cell edges: a raised block."""
    edge = torch.minimum(torch.minimum(fu, 1 - fu), torch.minimum(fv, 1 - fv))
    return (edge / width).clamp(max=1.0) * 0.25 + 0.75


def _zeros(c: Canvas) -> torch.Tensor:
    return torch.zeros(c.seed.shape[0], *c.u.shape[-2:], device=c.seed.device)


def brick(c: Canvas) -> Layers:
    rows = c.scale
    row, col, fu, fv = _cells(c, rows, torch.clamp(torch.floor(rows / 2), min=2))
    mortar = _seam(fu, fv, 0.07, 0.11)
    tint = c.cell(1, row, col)
    shade = (0.8 + 0.3 * c.cell(2, row, col) + 0.3 * (c.fbm(8) - 0.5)) * _bevel(fu, fv, 0.15)
    return Layers(0.45 * tint ** 2, shade * (1 - 0.6 * mortar), _zeros(c))


def mossy_brick(c: Canvas) -> Layers:
    base = brick(c)
    moss = ((c.fbm(4, salt=5) + 0.35 * c.v) > 0.78).float() * (0.6 + 0.4 * c.noise(16, salt=6))
    return Layers(torch.maximum(base.mix, moss), base.shade * (1 - 0.2 * moss), base.glow)


def stone_blocks(c: Canvas) -> Layers:
    rows = torch.clamp(torch.floor(c.scale * 0.7), min=3)
    row = torch.floor(c.v * rows)
    cols = torch.full_like(rows, 2.0)
    shifted = c.u + c.cell(3, row, torch.zeros_like(row))  # each course of blocks starts somewhere else
    col, fu, fv = torch.floor(shifted * cols) % cols, torch.frac(shifted * cols), torch.frac(c.v * rows)
    mortar = _seam(fu, fv, 0.05, 0.07)
    rough = c.fbm(8, salt=1)
    shade = (0.7 + 0.4 * c.cell(4, row, col) + 0.5 * (rough - 0.5)) * _bevel(fu, fv, 0.2) ** 2
    return Layers(0.6 * c.noise(4, salt=2), shade * (1 - 0.7 * mortar), _zeros(c))


def sandstone(c: Canvas) -> Layers:
    row, col, fu, fv = _cells(c, c.scale, torch.full_like(c.scale, 2.0), stagger=0.37)
    joint = _seam(fu, fv, 0.025, 0.05)
    layers = 0.9 + 0.1 * torch.sin(2 * math.pi * (c.v * 4 * c.scale + 0.6 * c.noise(4, salt=3)))
    erosion = c.fbm(8, salt=4)
    shade = (0.85 + 0.2 * c.cell(5, row, col)) * layers * (0.8 + 0.35 * erosion) * (1 - 0.45 * joint)
    return Layers((erosion * 0.9).clamp(0, 1) ** 2, shade, _zeros(c))


def glyphs(c: Canvas) -> Layers:
    base = sandstone(c)
    cell_u, cell_v = torch.floor(c.u * 6), torch.floor(c.v * 6)
    inner = (cell_u > 0) & (cell_u < 5) & (cell_v > 0) & (cell_v < 5)
    fu, fv = torch.frac(c.u * 6), torch.frac(c.v * 6)
    carved = inner & (c.cell(6, cell_v, cell_u) > 0.5) & (fu > 0.2) & (fu < 0.8) & (fv > 0.2) & (fv < 0.8)
    return Layers(torch.where(carved, 1.0, base.mix), base.shade * (1 - 0.45 * carved.float()), base.glow)


def ice(c: Canvas) -> Layers:
    body = c.fbm(4, salt=7)
    crack = ((c.noise(8, salt=8) - 0.5).abs() < 0.025).float()
    shade = 0.85 + 0.3 * c.fbm(16, salt=9) + 0.25 * crack
    return Layers((0.8 * body + crack).clamp(0, 1), shade, _zeros(c))


def rock(c: Canvas) -> Layers:
    rough = c.fbm(4, octaves=4, salt=10)
    crevice = (1 - (2 * c.noise(8, salt=48) - 1).abs()) ** 10  # ridged noise: thin dark cracks
    strata = torch.sin(2 * math.pi * (c.v * 3 + 0.8 * c.noise(2, salt=49)))
    shade = (0.45 + 0.9 * rough + 0.08 * strata) * (1 - 0.55 * crevice)
    return Layers(c.noise(2, salt=11), shade, _zeros(c))


def panels(c: Canvas) -> Layers:
    row, col, fu, fv = _cells(c, torch.full_like(c.scale, 2.0), torch.full_like(c.scale, 2.0), stagger=0.0)
    seam = _seam(fu, fv, 0.03, 0.03)
    rivet = torch.zeros_like(fu)
    for cu, cv in ((0.1, 0.1), (0.9, 0.1), (0.1, 0.9), (0.9, 0.9)):
        rivet = torch.maximum(rivet, (((fu - cu) ** 2 + (fv - cv) ** 2) < 0.0015).float())
    stripe = ((c.v > 0.44) & (c.v < 0.5)).float() * (c.rand(7, col) > 0.3).float()
    grime = c.fbm(8, salt=12)
    shade = (0.85 + 0.15 * c.cell(8, row, col) - 0.25 * grime * c.v) * (1 - 0.6 * seam) + 0.35 * rivet
    return Layers(stripe, shade, stripe)


def hazard(c: Canvas) -> Layers:
    band = (c.v > 0.2) & (c.v < 0.8)
    stripes = (torch.frac((c.u + c.v) * c.scale / 2) < 0.5) & band
    grime = c.fbm(8, salt=13)
    shade = (0.8 + 0.3 * grime) * (1 - 0.5 * ((c.v - 0.2).abs() < 0.02).float())
    return Layers(stripes.float(), shade * torch.where(band, 1.0, 0.6), _zeros(c))


def windows(c: Canvas) -> Layers:
    rows, cols = c.scale, torch.clamp(torch.floor(c.scale / 2), min=2)
    row, col, fu, fv = _cells(c, rows, cols, stagger=0.0)
    pane = (fu > 0.22) & (fu < 0.78) & (fv > 0.25) & (fv < 0.8)
    lit = pane & (c.cell(9, row, col) > 0.45)
    dim = 0.45 + 0.55 * c.cell(10, row, col)
    shade = torch.where(pane, 0.35, 0.8 + 0.3 * c.fbm(8, salt=14))
    return Layers(lit.float(), shade, lit.float() * dim)


def neon_grid(c: Canvas) -> Layers:
    fu, fv = torch.frac(c.u * c.scale / 2), torch.frac(c.v * c.scale / 2)
    line = ((fu < 0.06) | (fv < 0.06)).float()
    shade = 0.7 + 0.5 * c.fbm(4, salt=15)
    return Layers(line, shade, line)


def lava_brick(c: Canvas) -> Layers:
    row, col, fu, fv = _cells(c, c.scale, torch.clamp(torch.floor(c.scale / 2), min=2))
    mortar = _seam(fu, fv, 0.09, 0.14)
    crack = ((c.noise(8, salt=16) - 0.5).abs() < 0.02).float()
    hot = torch.maximum(mortar, crack)
    shade = (0.7 + 0.4 * c.cell(11, row, col) + 0.3 * (c.fbm(8) - 0.5)) * _bevel(fu, fv, 0.15)
    return Layers(hot, shade, hot * (0.75 + 0.25 * c.noise(4, salt=17)))


def vines(c: Canvas) -> Layers:
    base = stone_blocks(c)
    strand = (c.noise(16, 1, salt=18) > 0.62) & (c.v < 0.25 + 0.9 * c.noise(8, 1, salt=19))
    leaves = c.fbm(8, salt=20) > 0.62
    green = (strand | leaves).float()
    shade = torch.where(green > 0, 0.7 + 0.5 * c.noise(32, salt=21), base.shade)
    return Layers(torch.maximum(base.mix * 0.5, green), shade, base.glow)


def planks(c: Canvas) -> Layers:
    row, col, fu, fv = _cells(c, c.scale, torch.ones_like(c.scale), stagger=0.5)
    seam = _seam(torch.ones_like(fu), fv, 0.0, 0.08) + (fu < 0.015).float()
    grain = torch.sin(2 * math.pi * (c.u * 3 + 2.0 * c.noise(4, 16, salt=22) + row * 0.37))
    shade = (0.8 + 0.2 * c.cell(12, row, col) + 0.08 * grain) * (1 - 0.6 * seam.clamp(max=1))
    return Layers(0.3 * c.cell(13, row, col), shade, _zeros(c))


def door(c: Canvas) -> Layers:
    """Vertical planks held by two dark iron bands."""
    cols = c.scale
    col, fu = torch.floor(c.u * cols), torch.frac(c.u * cols)
    grain = torch.sin(2 * math.pi * (c.v * 2 + 2.0 * c.noise(16, 4, salt=23) + col * 0.41))
    band = (((c.v - 0.22).abs() < 0.04) | ((c.v - 0.78).abs() < 0.04)).float()
    shade = (0.8 + 0.2 * c.rand(14, col) + 0.08 * grain) * (1 - 0.6 * (fu < 0.06).float())
    return Layers(band, shade * (1 + 0.3 * band), _zeros(c))


def flagstones(c: Canvas) -> Layers:
    rows = torch.clamp(torch.floor(c.scale / 2), min=2)
    row, col, fu, fv = _cells(c, rows, rows, stagger=0.5)
    seam = _seam(fu, fv, 0.05, 0.05)
    shade = (0.75 + 0.35 * c.cell(15, row, col) + 0.3 * (c.fbm(8, salt=24) - 0.5)) * _bevel(fu, fv, 0.1)
    return Layers(0.7 * c.fbm(4, salt=25), shade * (1 - 0.6 * seam), _zeros(c))


def tiles(c: Canvas) -> Layers:
    row, col, fu, fv = _cells(c, c.scale, c.scale, stagger=0.0)
    grout = _seam(fu, fv, 0.06, 0.06)
    checker = (row + col) % 2
    shade = (0.9 + 0.15 * c.cell(16, row, col) - 0.2 * c.fbm(8, salt=26) ** 2) * (1 - 0.45 * grout)
    return Layers(0.6 * checker, shade, _zeros(c))


def sand(c: Canvas) -> Layers:
    ripple = torch.sin(2 * math.pi * (c.v * c.scale + 1.5 * c.noise(2, salt=27)))
    grains = c.noise(32, salt=28)
    return Layers(0.6 * c.fbm(2, salt=29), 0.88 + 0.1 * ripple + 0.12 * (grains - 0.5), _zeros(c))


def snow(c: Canvas) -> Layers:
    drift = c.fbm(4, salt=30)
    return Layers((drift - 0.35).clamp(0, 1), 0.92 + 0.1 * c.noise(32, salt=31), _zeros(c))


def grate(c: Canvas) -> Layers:
    fu, fv = torch.frac(c.u * c.scale), torch.frac(c.v * c.scale)
    bar = (fu < 0.3) | (fv < 0.3)
    shade = torch.where(bar, 0.9 + 0.2 * c.fbm(8, salt=32), 0.25)
    return Layers((~bar).float(), shade, _zeros(c))


def asphalt(c: Canvas) -> Layers:
    puddle = (c.fbm(2, salt=33) > 0.6).float()
    grains = c.noise(32, salt=34)
    return Layers(0.8 * puddle, 0.8 + 0.35 * grains + 0.4 * puddle, _zeros(c))


def basalt(c: Canvas) -> Layers:
    crack = ((c.noise(4, salt=35) - 0.5).abs() < 0.03) | ((c.noise(8, salt=36) - 0.5).abs() < 0.015)
    shade = 0.55 + 0.6 * c.fbm(8, salt=37)
    return Layers(crack.float(), shade, crack.float() * (0.7 + 0.3 * c.noise(4, salt=38)))


def grass(c: Canvas) -> Layers:
    blades = c.noise(32, salt=39)
    return Layers(c.fbm(4, salt=40), 0.65 + 0.6 * blades, _zeros(c))


def beams(c: Canvas) -> Layers:
    beam = torch.frac(c.u * 2) < 0.22
    base = planks(c)
    return Layers(torch.where(beam, 1.0, base.mix), torch.where(beam, 0.9, base.shade), base.glow)


def light_panels(c: Canvas) -> Layers:
    row, col, fu, fv = _cells(c, torch.full_like(c.scale, 2.0), torch.full_like(c.scale, 2.0), stagger=0.0)
    seam = _seam(fu, fv, 0.04, 0.04)
    lamp = (fu > 0.3) & (fu < 0.7) & (fv > 0.15) & (fv < 0.85) & ((row + col) % 2 == 0)
    shade = (0.8 + 0.2 * c.cell(17, row, col)) * (1 - 0.6 * seam)
    return Layers(lamp.float(), shade, lamp.float())


Pattern = Callable[[Canvas], Layers]

PATTERNS: dict[str, Pattern] = {
    "brick": brick, "mossy_brick": mossy_brick, "stone_blocks": stone_blocks, "sandstone": sandstone,
    "glyphs": glyphs, "ice": ice, "rock": rock, "panels": panels, "hazard": hazard, "windows": windows,
    "neon_grid": neon_grid, "lava_brick": lava_brick, "vines": vines, "planks": planks, "door": door,
    "flagstones": flagstones, "tiles": tiles, "sand": sand, "snow": snow, "grate": grate,
    "asphalt": asphalt, "basalt": basalt, "grass": grass, "beams": beams, "light_panels": light_panels,
}


def bake(
    patterns: list[str],
    colors: torch.Tensor,
    details: torch.Tensor,
    scales: torch.Tensor,
    seeds: torch.Tensor,
    size: tuple[int, int],
    salt: int,
    table: dict[str, Pattern],
    wall: bool = False,
) -> torch.Tensor:
    """Bake one surface of each world: ``table[patterns[b]]`` with colours (B, 3) → texels (B, h·w, 4).

    Worlds are grouped by pattern so each pattern runs once per batch. Wall textures get a contact shadow
    toward the floor and the ceiling (v = 1 is the floor).
    """
    h, w = size
    device = seeds.device
    v = ((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h).view(1, h, 1).expand(1, h, w)
    u = ((torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w).view(1, 1, w).expand(1, h, w)
    out = torch.empty(len(patterns), h, w, 4, device=device)
    for name in sorted(set(patterns)):
        idx = torch.tensor([i for i, p in enumerate(patterns) if p == name], device=device)
        if name not in table:
            raise ValueError(f"unknown pattern {name!r}")
        fn = table[name]
        canvas = Canvas(u, v, seeds[idx].view(-1, 1, 1), scales[idx].view(-1, 1, 1).float(), salt)
        layers = fn(canvas)
        shape = (len(idx), h, w)
        mix, shade = layers.mix.clamp(0, 1).expand(shape), layers.shade.expand(shape)
        glow = layers.glow.clamp(0, 1).expand(shape)
        if wall:
            shade = shade * (1 - 0.45 * torch.exp(-(1 - v) * 14)) * (1 - 0.25 * torch.exp(-v * 14))
        color, detail = colors[idx].view(-1, 1, 1, 3), details[idx].view(-1, 1, 1, 3)
        albedo = (color + (detail - color) * mix.unsqueeze(-1)) * shade.unsqueeze(-1)
        albedo = albedo + torch.as_tensor(layers.white, device=device).expand(shape).unsqueeze(-1)
        out[idx] = torch.cat([albedo, glow.unsqueeze(-1)], dim=-1)
    return out.reshape(len(patterns), h * w, 4)
