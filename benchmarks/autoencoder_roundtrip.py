"""How an autoencoder holds up under repeated round trips (encode → decode → encode → …), as a reprojecting
model makes one every frame (decode the previous latent, move it, encode it again).

Held-out engine frames are encoded and decoded again and again (no motion, no DiT); after each listed number
of round trips it prints the PSNR against the engine frame, the sharpness ratio (Laplacian variance over the
engine frame's: above 1 means the decoder adds detail of its own) and the mean brightness. An autoencoder at
a fixed point keeps its first round trip's figures.

    python benchmarks/autoencoder_roundtrip.py assets/autoencoder runs/vae-rt1/model
    python benchmarks/autoencoder_roundtrip.py assets/autoencoder --frames 16 --trips 1,4,16,64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from worldloop.distill.eval import metrics
from worldloop.distill.eval.autoencoder import held_out_frames, sharpness_ratio
from worldloop.distill.stages.shared import load_vae
from worldloop.models import checkpoint


@torch.no_grad()
def round_trips(path: Path, frames: int, trips: list[int]) -> list[dict[str, float]]:
    """PSNR, sharpness ratio and mean brightness (images in [0, 1]) after each of ``trips`` round trips of the
    first frame of ``frames`` held-out worlds (the eval's autoencoder worlds)."""
    config, _ = checkpoint.read_config(path)
    vae = load_vae(config, path).eval()
    engine, _ = held_out_frames(config.height, config.width, worlds=frames, frames=1)
    x = torch.from_numpy(engine).permute(0, 3, 1, 2).float() / 255
    rows, current = [], x
    for n in range(1, max(trips) + 1):
        current = (vae.decode(vae.encode(current * 2 - 1)) + 1) / 2
        if n in trips:
            rows.append({"trips": n, "psnr": float(metrics.psnr(current, x).mean()),
                         "sharpness": sharpness_ratio(current, x), "brightness": float(current.mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="model or autoencoder directories")
    parser.add_argument("--frames", type=int, default=16, help="held-out engine frames (one per world)")
    parser.add_argument("--trips", default="1,2,4,8,16,32,64", help="round trips after which to measure")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trips = sorted({int(t) for t in args.trips.split(",")})
    print(f"PSNR (dB) / sharpness ratio / mean brightness (0-1) after N round trips; {args.frames} "
          f"held-out frames")
    print("| autoencoder | " + " | ".join(f"{t}" for t in trips) + " |")
    print("| --- |" + " --- |" * len(trips))
    for path in args.models:
        rows = round_trips(path, args.frames, trips)
        print(f"| {path} | " + " | ".join(f"{r['psnr']:.2f} / {r['sharpness']:.2f} / {r['brightness']:.3f}"
                                          for r in rows) + " |")


if __name__ == "__main__":
    main()
