"""Sky panoramas for open-air themes, baked like the other textures (see ``textures``).

u is the azimuth (one full turn), v the height above the horizon (0 the horizon, 1 the top of the view);
``mix`` 0 is the sky's top colour and 1 its horizon colour (which themes set close to their fog colour, so the
horizon melts into the fog), and every sky texel glows: skies are not lit.
"""

from __future__ import annotations

import torch

from worldloop.distill.world.textures import Canvas, Layers, Pattern


def _sky_gradient(c: Canvas) -> torch.Tensor:
    return (1 - c.v).clamp(0, 1) ** 2.2


def clear_sky(c: Canvas) -> Layers:
    clouds = (c.fbm(8, octaves=3, salt=41) - 0.55).clamp(min=0) * 3
    sun_u = c.rand(42)
    du = torch.remainder(c.u - sun_u + 0.5, 1.0) - 0.5
    sun = torch.exp(-((du * 4) ** 2 + ((c.v - 0.45) * 2) ** 2) * 60)
    mix = torch.maximum(_sky_gradient(c), clouds.clamp(max=1))
    return Layers(mix, 1 + 0.25 * clouds, torch.ones_like(mix), 0.9 * sun)


def dusk_sky(c: Canvas) -> Layers:
    streaks = (c.noise(8, 2, salt=43) - 0.5).clamp(min=0) * 2 * (c.v < 0.6)
    sun_u = c.rand(44)
    du = torch.remainder(c.u - sun_u + 0.5, 1.0) - 0.5
    sun = torch.exp(-((du * 4) ** 2 + ((c.v - 0.1) * 2) ** 2) * 40)
    mix = (_sky_gradient(c) ** 0.7 + 0.3 * sun).clamp(max=1)
    return Layers(mix, 1 - 0.35 * streaks, torch.ones_like(mix), 0.6 * sun)


def night_sky(c: Canvas) -> Layers:
    h, w = c.u.shape[-2:]
    iy = torch.arange(h, device=c.seed.device).view(1, h, 1)
    ix = torch.arange(w, device=c.seed.device).view(1, 1, w)
    star = c.rand(45, iy * w + ix)
    stars = ((star > 0.99) & (c.v > 0.12)).float() * (star - 0.99) / 0.01
    mix = _sky_gradient(c)
    return Layers(mix, torch.ones_like(mix), torch.ones_like(mix), 0.8 * stars)


def smoky_sky(c: Canvas) -> Layers:
    smoke = c.fbm(8, octaves=3, salt=46)
    mix = (_sky_gradient(c) ** 0.8 + 0.3 * (smoke - 0.5)).clamp(0, 1)
    return Layers(mix, 0.6 + 0.6 * smoke, torch.ones_like(mix))


def overcast_sky(c: Canvas) -> Layers:
    clouds = c.fbm(4, octaves=3, salt=47)
    mix = (_sky_gradient(c) ** 0.6 + 0.5 * clouds).clamp(0, 1)
    return Layers(mix, 0.9 + 0.2 * clouds, torch.ones_like(mix))


SKIES: dict[str, Pattern] = {
    "clear_sky": clear_sky, "dusk_sky": dusk_sky, "night_sky": night_sky, "smoky_sky": smoky_sky,
    "overcast_sky": overcast_sky,
}
