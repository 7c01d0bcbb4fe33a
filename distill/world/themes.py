"""Themes of the built-in world, the exact parameters of one world, and the prompt that describes them.

A ``Theme`` lists the choices a theme allows (surfaces, fog, light ranges); ``sample_params(seed, theme)``
draws one world's exact ``WorldParams`` with per-episode jitter; ``describe(params)`` turns those exact
numbers into the prompt, word by word (colour names from the colours, fog and light words from the densities),
so the prompt is a function of the parameters and the theme name can be read back with ``theme_from_prompt``.
"""

from __future__ import annotations

import colorsys
import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from worldloop.distill.world.skies import SKIES

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Surface:
    """A textured surface: a pattern from ``textures.PATTERNS`` (or a sky from ``skies.SKIES``)."""

    pattern: str
    color: RGB  # albedo; for a sky, its top colour
    detail: RGB  # the pattern's second colour (moss, mortar glow, lit windows...); a sky's horizon colour
    scale: int = 4  # repeats of the pattern per tile (rows of bricks, panels...)


@dataclass(frozen=True)
class Theme:
    name: str
    walls: tuple[Surface, ...]
    accents: tuple[Surface, ...]  # a few wall tiles use this instead (doors, hazard panels, glyphs)
    floors: tuple[Surface, ...]
    ceilings: tuple[Surface, ...]  # ceilings or skies
    fog_color: RGB
    fog_density: tuple[float, float]  # per tile of distance: visibility ≈ 3 / density tiles
    ambient: tuple[float, float]
    lamps: tuple[int, int]  # point lights in the maze
    lamp_power: tuple[float, float]
    torch: tuple[float, float]  # the camera's own light
    light_color: RGB


@dataclass(frozen=True)
class WorldParams:
    """Everything that makes one world look the way it does; JSON-able through ``to_dict``/``from_dict``."""

    seed: int
    theme: str
    wall: Surface
    accent: Surface
    floor: Surface
    ceiling: Surface
    fog_color: RGB
    fog_density: float
    ambient: float
    lamps: int
    lamp_power: float
    torch: float
    light_color: RGB
    rooms: int  # open rooms carved into the maze
    loops: float  # fraction of inner walls knocked out (0 = a perfect maze)
    accent_rate: float  # fraction of wall tiles with the accent surface

    @property
    def has_sky(self) -> bool:
        return self.ceiling.pattern in SKIES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldParams:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"world params need exactly the fields {sorted(names)}, got {sorted(data)}")
        fixed: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("wall", "accent", "floor", "ceiling"):
                value = Surface(value["pattern"], tuple(value["color"]), tuple(value["detail"]),
                                int(value["scale"]))
            elif isinstance(value, list):
                value = tuple(value)
            fixed[key] = value
        return cls(**fixed)


S = Surface
_THEMES: tuple[Theme, ...] = (
    Theme("dungeon",
          walls=(S("brick", (0.46, 0.44, 0.41), (0.36, 0.3, 0.24), 6),
                 S("mossy_brick", (0.43, 0.43, 0.39), (0.2, 0.33, 0.1), 6),
                 S("stone_blocks", (0.42, 0.39, 0.35), (0.3, 0.27, 0.22), 5)),
          accents=(S("door", (0.42, 0.26, 0.13), (0.12, 0.11, 0.1), 4),),
          floors=(S("flagstones", (0.34, 0.31, 0.27), (0.22, 0.19, 0.15), 5),),
          ceilings=(S("beams", (0.34, 0.22, 0.12), (0.14, 0.09, 0.05), 5),
                    S("rock", (0.3, 0.28, 0.26), (0.2, 0.18, 0.16), 4)),
          fog_color=(0.2, 0.14, 0.09), fog_density=(0.12, 0.3), ambient=(0.25, 0.4), lamps=(6, 12),
          lamp_power=(1.0, 1.5), torch=(0.2, 0.4), light_color=(1.0, 0.82, 0.6)),
    Theme("ice cave",
          walls=(S("ice", (0.6, 0.78, 0.9), (0.85, 0.95, 1.0), 4),
                 S("rock", (0.5, 0.62, 0.75), (0.75, 0.86, 0.95), 4)),
          accents=(S("ice", (0.35, 0.55, 0.8), (0.7, 0.88, 1.0), 4),),
          floors=(S("snow", (0.86, 0.9, 0.95), (0.62, 0.7, 0.82), 4),),
          ceilings=(S("rock", (0.45, 0.56, 0.68), (0.72, 0.82, 0.92), 4),),
          fog_color=(0.7, 0.82, 0.92), fog_density=(0.12, 0.32), ambient=(0.5, 0.7), lamps=(2, 5),
          lamp_power=(0.5, 0.8), torch=(0.2, 0.35), light_color=(0.85, 0.95, 1.05)),
    Theme("desert ruins",
          walls=(S("sandstone", (0.8, 0.63, 0.4), (0.58, 0.42, 0.26), 4),
                 S("stone_blocks", (0.76, 0.6, 0.4), (0.6, 0.45, 0.3), 5)),
          accents=(S("glyphs", (0.74, 0.56, 0.35), (0.42, 0.29, 0.16), 4),),
          floors=(S("sand", (0.88, 0.74, 0.52), (0.72, 0.56, 0.36), 3),),
          ceilings=(S("clear_sky", (0.22, 0.45, 0.82), (0.93, 0.85, 0.7), 1),
                    S("dusk_sky", (0.28, 0.18, 0.42), (1.0, 0.62, 0.36), 1)),
          fog_color=(0.9, 0.8, 0.64), fog_density=(0.03, 0.1), ambient=(0.85, 1.0), lamps=(0, 0),
          lamp_power=(0.0, 0.0), torch=(0.0, 0.1), light_color=(1.0, 0.95, 0.85)),
    Theme("toxic lab",
          walls=(S("panels", (0.55, 0.6, 0.58), (0.45, 1.0, 0.25), 4),
                 S("tiles", (0.75, 0.8, 0.77), (0.5, 0.6, 0.56), 6)),
          accents=(S("hazard", (0.92, 0.76, 0.12), (0.08, 0.08, 0.08), 4),),
          floors=(S("grate", (0.36, 0.4, 0.38), (0.05, 0.12, 0.04), 6),
                  S("tiles", (0.62, 0.66, 0.64), (0.38, 0.44, 0.4), 4)),
          ceilings=(S("light_panels", (0.45, 0.5, 0.48), (0.8, 1.0, 0.72), 2),),
          fog_color=(0.22, 0.42, 0.1), fog_density=(0.1, 0.26), ambient=(0.3, 0.45), lamps=(4, 8),
          lamp_power=(0.8, 1.2), torch=(0.2, 0.3), light_color=(0.85, 1.0, 0.85)),
    Theme("neon city",
          walls=(S("windows", (0.16, 0.13, 0.22), (1.0, 0.82, 0.45), 6),
                 S("neon_grid", (0.1, 0.08, 0.16), (1.0, 0.2, 0.8), 4)),
          accents=(S("neon_grid", (0.08, 0.1, 0.16), (0.15, 0.95, 1.0), 2),),
          floors=(S("asphalt", (0.14, 0.14, 0.17), (0.36, 0.3, 0.5), 4),),
          ceilings=(S("night_sky", (0.03, 0.02, 0.09), (0.38, 0.13, 0.42), 1),),
          fog_color=(0.26, 0.08, 0.3), fog_density=(0.08, 0.2), ambient=(0.3, 0.45), lamps=(6, 10),
          lamp_power=(0.8, 1.3), torch=(0.1, 0.2), light_color=(1.0, 0.75, 1.0)),
    Theme("hell fortress",
          walls=(S("lava_brick", (0.34, 0.1, 0.07), (1.0, 0.42, 0.06), 5),
                 S("rock", (0.3, 0.12, 0.1), (0.5, 0.2, 0.12), 4)),
          accents=(S("door", (0.22, 0.08, 0.05), (0.6, 0.25, 0.08), 4),),
          floors=(S("basalt", (0.2, 0.13, 0.11), (1.0, 0.38, 0.05), 4),),
          ceilings=(S("smoky_sky", (0.14, 0.02, 0.02), (0.8, 0.26, 0.06), 1),
                    S("rock", (0.22, 0.1, 0.08), (0.35, 0.15, 0.1), 4)),
          fog_color=(0.5, 0.12, 0.04), fog_density=(0.12, 0.28), ambient=(0.3, 0.45), lamps=(4, 8),
          lamp_power=(0.8, 1.2), torch=(0.1, 0.25), light_color=(1.0, 0.62, 0.45)),
    Theme("jungle temple",
          walls=(S("vines", (0.48, 0.47, 0.4), (0.17, 0.42, 0.1), 5),
                 S("mossy_brick", (0.45, 0.44, 0.37), (0.2, 0.4, 0.1), 5)),
          accents=(S("glyphs", (0.5, 0.5, 0.42), (0.26, 0.3, 0.2), 4),),
          floors=(S("grass", (0.3, 0.5, 0.17), (0.16, 0.3, 0.09), 4),
                  S("flagstones", (0.42, 0.42, 0.35), (0.22, 0.35, 0.12), 5)),
          ceilings=(S("overcast_sky", (0.5, 0.64, 0.66), (0.78, 0.86, 0.78), 1),
                    S("clear_sky", (0.3, 0.55, 0.8), (0.75, 0.86, 0.78), 1)),
          fog_color=(0.58, 0.68, 0.58), fog_density=(0.08, 0.2), ambient=(0.7, 0.9), lamps=(0, 0),
          lamp_power=(0.0, 0.0), torch=(0.0, 0.1), light_color=(0.95, 1.0, 0.92)),
)
del S

THEME_TABLE: dict[str, Theme] = {t.name: t for t in _THEMES}
THEMES: tuple[str, ...] = tuple(THEME_TABLE)


def _jitter_color(rng: random.Random, color: RGB, brightness: float) -> RGB:
    return tuple(round(min(1.0, max(0.0, c * brightness + rng.uniform(-0.035, 0.035))), 3) for c in color)


def _jitter_surface(rng: random.Random, choices: tuple[Surface, ...]) -> Surface:
    s = rng.choice(choices)
    b = rng.uniform(0.85, 1.15)
    scale = max(1, s.scale + rng.choice((-1, 0, 0, 1))) if s.pattern not in SKIES else 1
    return Surface(s.pattern, _jitter_color(rng, s.color, b), _jitter_color(rng, s.detail, b), scale)


def sample_params(seed: int, theme: str | None = None) -> WorldParams:
    """One world's exact parameters, a pure function of (seed, theme); ``theme=None`` draws the theme too."""
    if theme is not None and theme not in THEME_TABLE:
        raise ValueError(f"unknown theme {theme!r}; choose one of {', '.join(THEMES)}")
    rng = random.Random(f"worldloop-world-{seed}")
    t = THEME_TABLE[theme or rng.choice(THEMES)]
    fog_b = rng.uniform(0.9, 1.1)
    return WorldParams(
        seed=int(seed),
        theme=t.name,
        wall=_jitter_surface(rng, t.walls),
        accent=_jitter_surface(rng, t.accents),
        floor=_jitter_surface(rng, t.floors),
        ceiling=_jitter_surface(rng, t.ceilings),
        fog_color=_jitter_color(rng, t.fog_color, fog_b),
        fog_density=round(rng.uniform(*t.fog_density), 3),
        ambient=round(rng.uniform(*t.ambient), 3),
        lamps=rng.randint(*t.lamps),
        lamp_power=round(rng.uniform(*t.lamp_power), 3),
        torch=round(rng.uniform(*t.torch), 3),
        light_color=t.light_color,
        rooms=rng.randint(1, 4),
        loops=round(rng.uniform(0.03, 0.15), 3),
        accent_rate=round(rng.uniform(0.04, 0.12), 3),
    )



def retheme(params: WorldParams, theme: str) -> WorldParams:
    """The same maze in another theme: ``params``' seed and layout (rooms, loops, accent rate, so the same
    map), with the look ``sample_params(params.seed, theme)`` draws. A prompt switch in the engine's truth."""
    look = sample_params(params.seed, theme)
    return dataclasses.replace(look, rooms=params.rooms, loops=params.loops, accent_rate=params.accent_rate)

# ---------------------------------------------------------------------------------------------------------
# The prompt: every word comes from a number in the params.

_WALL_WORDS = {
    "brick": "{c} brick walls", "mossy_brick": "mossy {c} brick walls",
    "stone_blocks": "{c} stone block walls",
    "sandstone": "{c} sandstone walls", "glyphs": "glyph-carved {c} walls", "ice": "cracked {c} ice walls",
    "rock": "rough {c} rock walls", "panels": "{c} metal panel walls with glowing {d} stripes",
    "tiles": "{c} tiled walls", "windows": "{c} facades with {d} lit windows",
    "neon_grid": "{c} walls with {d} neon grid lines", "lava_brick": "{c} brick walls veined with {d} lava",
    "vines": "vine-covered {c} stone walls",
}
_FLOOR_WORDS = {
    "flagstones": "{c} flagstone floor", "snow": "{c} snowy floor", "sand": "rippled {c} sand floor",
    "grate": "{c} metal grate floor", "tiles": "{c} tiled floor", "asphalt": "wet {c} asphalt floor",
    "basalt": "{c} basalt floor cracked with {d} lava", "grass": "{c} grassy floor",
}
_CEILING_WORDS = {
    "beams": "{c} wooden beam ceiling", "rock": "{c} rock ceiling", "light_panels": "{d} light panel ceiling",
    "clear_sky": "under a {c} sky", "dusk_sky": "under a {c} dusk sky",
    "night_sky": "under a starry {c} night sky",
    "smoky_sky": "under a {d} smoky sky", "overcast_sky": "under an overcast {c} sky",
}


def colour_name(rgb: RGB) -> str:
    """A plain English name for a colour: 'dark brown', 'pale blue', 'grey', ..."""
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    hue = h * 360
    if v < 0.12:
        return "black"
    if s < 0.2:
        return "dark grey" if v < 0.3 else "grey" if v < 0.7 else "pale grey" if v < 0.88 else "white"
    if (15 <= hue < 50 or ((hue < 15 or hue >= 345) and s < 0.5)) and v < 0.58:
        return "dark brown" if v < 0.3 else "brown"
    if 20 <= hue < 55 and s < 0.55 and v >= 0.58:
        return "tan"
    names = ((15, "red"), (40, "orange"), (68, "yellow"), (160, "green"), (195, "teal"), (250, "blue"),
             (285, "purple"), (335, "magenta"), (361, "red"))
    name = next(n for limit, n in names if hue < limit)
    if name == "teal" and v > 0.65:
        name = "cyan"
    if name in ("red", "magenta") and s < 0.45 and v > 0.6:
        return "pink"
    if v < 0.3:
        return f"dark {name}"
    if s < 0.35 and v > 0.75:
        return f"pale {name}"
    return name


def _fog_word(density: float) -> str:
    return "faint" if density < 0.07 else "light" if density < 0.13 else "misty" if density < 0.2 else \
        "thick" if density < 0.27 else "dense"


def _light_word(p: WorldParams) -> str:
    level = p.ambient + 0.015 * p.lamps * p.lamp_power + 0.3 * p.torch
    return "dark" if level < 0.4 else "dim" if level < 0.6 else "softly lit" if level < 0.85 else "bright"


def describe(params: WorldParams) -> str:
    """The prompt for a world, e.g. 'a dim dungeon of mossy grey brick walls, brown flagstone floor, ...'."""
    def phrase(table: dict[str, str], s: Surface) -> str:
        return table[s.pattern].format(c=colour_name(s.color), d=colour_name(s.detail))

    return (f"a {_light_word(params)} {params.theme} of {phrase(_WALL_WORDS, params.wall)}, "
            f"{phrase(_FLOOR_WORDS, params.floor)}, {phrase(_CEILING_WORDS, params.ceiling)}, "
            f"{_fog_word(params.fog_density)} {colour_name(params.fog_color)} fog")


def theme_from_prompt(prompt: str) -> str:
    """The theme named in a prompt made by ``describe``; ValueError when none or several are named."""
    found = [t for t in THEMES if t in prompt.lower()]
    if len(found) != 1:
        raise ValueError(f"prompt names {len(found)} themes, expected one: {prompt!r}")
    return found[0]

