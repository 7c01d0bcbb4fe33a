"""``worldloop looks``: give a model with a surface memory its bank of looks (``looks.safetensors``).

    worldloop looks --model assets/default                       # 2 worlds per theme, 200 frames each
    worldloop looks --model runs/student/model --per-theme 3 --frames 300

A prompt switch makes the surface memory forget the old prompt's texture and colour. With a bank, the new
prompt's surfaces start from the look of the training world whose prompt is nearest to it (the texture of its
walls, floor, ceiling and sky, their colours, its fog), so the picture takes the new theme's look at once
instead of the DiT's blur in the new colours. The bank is built from the built-in world's engine: the
explorer walks ``--per-theme`` worlds of every theme (training seeds, every wall, floor and ceiling pattern of
the theme among them) for ``--frames`` frames, and a surface memory writes each frame at the engine's own pose
and depth (``distill/stages/looks.py``). The detail is stored as int8 (the sky's at ``--sky-texels`` per
tile), the colour as uint8 at ``--colour-texels``, so a bank of 14 worlds takes about 0.6 MiB. A prompt whose
sentence vector is not near any entry's (``LOOK_MATCH``: "a forest", "the moon") gets no look. Replaces the
directory's bank, if it had one; ``worldloop export`` carries it over.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from worldloop.app.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("looks", help="build a model's bank of looks (a new prompt's first texture)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help="a model directory with a surface memory (camera.surface_memory > 0)")
    p.add_argument("--per-theme", type=int, default=2, help="worlds per theme (default: %(default)s)")
    p.add_argument("--frames", type=int, default=200,
                   help="frames walked through each (default: %(default)s)")
    p.add_argument("--detail-texels", type=int, default=0,
                   help="texels per tile the walls', floor's and ceiling's detail is kept at (0: the model's "
                        "own, the default)")
    p.add_argument("--sky-texels", type=int, default=16,
                   help="texels per sky tile its detail is kept at (default: %(default)s)")
    p.add_argument("--colour-texels", type=int, default=8,
                   help="texels per tile the colour is kept at (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from worldloop.distill.stages.looks import bank_worlds, build_looks
    from worldloop.models.checkpoint import CheckpointError, read_config
    from worldloop.models.surface_memory import LOOKS_FILE, load_looks, save_looks
    from worldloop.models.text import PromptEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config, _ = read_config(args.model)
    except CheckpointError as err:
        raise UserError(str(err)) from err
    texels = config.camera.surface_memory
    if texels <= 0:
        raise UserError(f"{args.model}: the model keeps no surface memory (camera.surface_memory 0), so it "
                        "has no use for a bank of looks")
    args.detail_texels = args.detail_texels or texels
    for name, size in (("--detail-texels", args.detail_texels), ("--sky-texels", args.sky_texels),
                       ("--colour-texels", args.colour_texels)):
        if not 1 <= size <= texels:
            raise UserError(f"{name} must be in 1..{texels} (the model's texels per tile), got {size}")
    try:
        worlds = bank_worlds(args.per_theme)
    except ValueError as err:
        raise UserError(str(err)) from err
    if args.frames < 2:
        raise UserError(f"--frames must be at least 2, got {args.frames}")
    start = time.perf_counter()
    looks = build_looks(config.camera, config.height, config.width, worlds, args.frames,
                        PromptEncoder(config.dit.max_prompt_tokens))
    tmp = args.model / (LOOKS_FILE + ".tmp")
    save_looks(tmp, looks, texels, args.detail_texels, args.sky_texels, args.colour_texels)
    load_looks(tmp, texels)  # it reads back before it replaces the old one
    tmp.replace(args.model / LOOKS_FILE)
    size = (args.model / LOOKS_FILE).stat().st_size
    print(f"{args.model / LOOKS_FILE}: {len(worlds)} worlds × {args.frames} frames, {size / 2**10:.0f} KiB, "
          f"{time.perf_counter() - start:.0f} s")
    for w in worlds:
        print(f"  {w.seed}  {w.theme:<13}  walls {w.wall.pattern}, floor {w.floor.pattern}, "
              f"ceiling {w.ceiling.pattern}")
    return 0
