"""Make .gpu/ for scripts/gpu_check.sh, here (with the test venv and the network), before a GPU call.

    python scripts/gpu_pack.py            # then: run scripts/gpu_check.sh "$OUT" 9 with carry [".gpu"]

.gpu/minilm: the prompt encoder as a compact copy (float16, only the tokens the built-in world's prompts use:
about 22 MB instead of 88, so it travels with the repository under the 64 MiB limit); .gpu/wheels: the
websockets wheel for Python 3.12 on x86-64 (the CUDA image lacks it; bench's serving phase needs it).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from worldloop.app.gpu_check import compact_minilm, world_prompts
from worldloop.models.text import default_model_path


def main() -> int:
    root = Path(__file__).resolve().parent.parent / ".gpu"
    info = compact_minilm(default_model_path(), root / "minilm", world_prompts())
    print(f"{root / 'minilm'}: {info['bytes'] / 2**20:.1f} MiB, {info['tokens_kept']} tokens kept")
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 28)] + ["--platform=manylinux2014_x86_64"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d",
                    str(root / "wheels"), f"websockets=={version('websockets')}"], check=True)
    print(f"{root / 'wheels'}: {', '.join(p.name for p in (root / 'wheels').iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
