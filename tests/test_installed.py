"""An installed worldloop (``pip install .``, not editable) plays without the repository.

The wheel is built from this checkout and installed into a fresh virtual environment that sees this
environment's dependencies (torch, …) through a path file but not its editable worldloop; then
``worldloop play --help`` and a short ``worldloop rollout`` of the shipped model run from another directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"OMP_NUM_THREADS": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel of this checkout installed; returns its bin folder."""
    root = tmp_path_factory.mktemp("installed")
    setuptools_major = int(version("setuptools").split(".")[0])
    isolation = ["--no-build-isolation"] if setuptools_major >= 77 else []  # else pip fetches setuptools
    source = root / "source"  # a copy: building in place would leave build/ behind, stale on the next build
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs",
                                  ".*_cache")
    shutil.copytree(REPO, source, ignore=skip)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(root / "wheel"),
          str(source)], cwd=root)
    wheel = next((root / "wheel").glob("worldloop-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    (site / "worldloop_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=root)
    return venv / "bin"


def test_the_installed_package_imports_from_site_packages(installed: Path, tmp_path: Path) -> None:
    code = ("import worldloop.models.dit as dit, worldloop.app.loading as loading; "
            "print(dit.__file__, loading.DEFAULT_MODEL_DIR)")
    out = _run([str(installed / "python"), "-c", code], cwd=tmp_path).stdout.split()
    assert all(str(REPO) not in line for line in out), out
    shipped = Path(out[1])
    assert shipped.name == "default" and (shipped / "config.json").is_file()
    # the model card and the shard index travel with the weights
    assert (shipped / "README.md").is_file() and (shipped / "dit_ema.safetensors.index.json").is_file()
    assert (shipped.parent / "autoencoder" / "README.md").is_file()


def test_play_help_and_a_rollout_of_the_shipped_model(installed: Path, tmp_path: Path) -> None:
    worldloop = str(installed / "worldloop")
    assert "usage: worldloop play" in _run([worldloop, "play", "--help"], cwd=tmp_path).stdout
    _run([worldloop, "rollout", "--prompt", "an ice cave", "--frames", "3", "--out", "out.mp4", "--quiet"],
         cwd=tmp_path)
    assert (tmp_path / "out.mp4").stat().st_size > 0
    sidecar = json.loads(next(tmp_path.glob("out*.json")).read_text())
    assert sidecar["model"]["trained"] and str(REPO) not in json.dumps(sidecar)
