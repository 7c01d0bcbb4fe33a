"""The model that ships in assets/default: present, loadable by every command, small enough to carry, trained.

"Trained" is checked by behaviour, not by metadata: started from engine frames of held-out worlds, its next
frames must be far closer to the engine's than those of the same architecture with random weights, and a
prompt must steer the colours of the world it makes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from worldloop.app.loading import DEFAULT_MODEL_DIR, choose_model
from worldloop.distill.eval import metrics
from worldloop.distill.eval.evaluate import engine_clips
from worldloop.distill.world.themes import THEMES
from worldloop.models.checkpoint import load_model, read_state, shard_files, write_model_card
from worldloop.models.world_model import WorldModel

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_FILE_BYTES = 16 * 2**20  # what a GPU session can carry back, and a sane size for a git blob


@pytest.fixture(scope="module")
def shipped() -> WorldModel:
    return WorldModel.from_pretrained(DEFAULT_MODEL_DIR, max_sessions=4)


def test_the_default_model_ships_and_is_what_play_uses() -> None:
    files = load_model(DEFAULT_MODEL_DIR)
    assert files.config.name == "default" and files.dit_ema is not None
    assert files.metadata.get("stage") in {"teacher", "cd", "dmd", "truth"}
    assert files.metadata.get("step", 0) > 0
    sizes = {f.name: f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir()}
    assert all(size < MAX_FILE_BYTES for size in sizes.values()), sizes
    choice = choose_model(None, None, fallback=True)
    assert choice.trained and choice.path == DEFAULT_MODEL_DIR and choice.warning() is None


# The eval reports the shipped models' cards were written from (README: Results).
CARD_REPORTS = {"default": "docs/eval-cpu/default/report.json",
                "autoencoder": "docs/eval-cpu/autoencoder/assets/report.json"}


@pytest.mark.parametrize("name", sorted(CARD_REPORTS))
def test_the_shipped_models_carry_their_card_and_shard_index(name: str, tmp_path: Path) -> None:
    folder = DEFAULT_MODEL_DIR.parent / name
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: \"mit\"\n") and "training_data:" in card
    # the card is what write_model_card makes of the folder and its report today (regenerate it if not)
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    report = json.loads((Path(__file__).resolve().parents[1] / CARD_REPORTS[name]).read_text())
    for row in report.get("autoencoder_only", []):  # measured as assets/autoencoder: the copy stands in
        row["model"] = str(copy)
    for row in report.get("runs", []):  # measured as the shipped folder itself: so is the copy
        if Path(row.get("model", "")).resolve() == folder.resolve():
            row["model"] = str(copy)
    write_model_card(copy, report)
    assert (copy / "README.md").read_text() == card
    if name == "default":
        one_step = next(r for r in report["runs"] if r["steps"] == 1)["horizons"]["1"]["psnr"]
        assert "model-index:" in card and f"| this model | 1 | {one_step:.2f} |" in card
        index = json.loads((folder / "dit_ema.safetensors.index.json").read_text())
        shards = shard_files(folder / "dit_ema.safetensors")
        assert sorted(set(index["weight_map"].values())) == [f.name for f in shards] and len(shards) == 2
        assert set(index["weight_map"]) == set(read_state(folder / "dit_ema.safetensors")[0])


def _next_frames(wm: WorldModel, frames: np.ndarray, keys: np.ndarray, prompts: list[str],
                 context_frames: int, frames_after: int) -> np.ndarray:
    sessions = [wm.new_session(p, seed=i, first_frames=frames[i, :context_frames],
                               first_keys=keys[i, :context_frames]) for i, p in enumerate(prompts)]
    made = range(context_frames, context_frames + frames_after)
    out = [wm.next_frame(sessions, keys[:, t].tolist()) for t in made]
    for s in sessions:
        wm.close_session(s)
    return np.stack(out, 1)


def test_it_continues_engine_worlds_better_than_copying_and_than_random_weights(shipped: WorldModel) -> None:
    """A delta model with random weights already copies the last frame (x0 = previous + a small output), so
    the bar is both: the trained model beats copying the last engine frame and a random-weight DiT."""
    context_frames, frames_after = shipped.config.dit.sink + shipped.config.dit.window, 4
    clips = engine_clips(*shipped.frame_shape, 4, context_frames + frames_after, seed=7,
                         device=torch.device("cpu"))
    truth = metrics.from_uint8(clips.frames[:, context_frames:].reshape(-1, *shipped.frame_shape, 3))
    last = np.repeat(clips.frames[:, context_frames - 1: context_frames], frames_after, axis=1)
    copied = metrics.from_uint8(last.reshape(-1, *shipped.frame_shape, 3))
    copy_psnr = metrics.psnr(copied, truth).mean().item()

    def psnr(wm: WorldModel) -> float:
        made = _next_frames(wm, clips.frames, clips.keys, clips.prompts, context_frames, frames_after)
        made_t = metrics.from_uint8(made.reshape(-1, *shipped.frame_shape, 3))
        return metrics.psnr(made_t, truth).mean().item()

    torch.manual_seed(0)
    untrained = WorldModel.from_pretrained(DEFAULT_MODEL_DIR, max_sessions=4)
    for p in untrained.dit.parameters():  # the same autoencoder, a DiT with fresh random weights
        torch.nn.init.normal_(p, std=0.02)
    trained_psnr, random_psnr = psnr(shipped), psnr(untrained)
    assert trained_psnr > copy_psnr + 1.0, (trained_psnr, copy_psnr)
    assert trained_psnr > random_psnr + 1.5, (trained_psnr, random_psnr)


def test_prompts_steer_the_world(shipped: WorldModel) -> None:
    """From nothing but a prompt (the built-in world's own wording), a hell fortress comes out redder than an
    ice cave."""
    worlds = engine_clips(*shipped.frame_shape, 64, 1, seed=11, device=torch.device("cpu"))
    prompt = {THEMES[t]: p for t, p in zip(worlds.themes, worlds.prompts, strict=True)}

    def redness(prompt: str) -> float:
        s = shipped.new_session(prompt, seed=3)
        frames = np.stack([shipped.next_frame([s], [1])[0] for _ in range(3)])
        frames = frames.reshape(-1, 3).astype(np.float64)
        shipped.close_session(s)
        return float(frames[:, 0].mean() - frames[:, 2].mean())  # red minus blue, 0..255 units

    hell, ice = redness(prompt["hell fortress"]), redness(prompt["ice cave"])
    assert hell > ice + 30, (prompt["hell fortress"], hell, prompt["ice cave"], ice)
