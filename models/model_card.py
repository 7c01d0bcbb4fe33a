"""The model card of a model directory: ``README.md`` with YAML front matter, as model hubs read it.

    checkpoint.write_model_card(Path("assets/default"), report=json.loads(Path("report.json").read_text()))

The front matter says what a program needs (licence, library, tags, what it was trained on and how, and the
eval figures as a ``model-index``); the text under it says the same for a person, with how to play the model
and the files it holds. Everything comes from the directory itself (``config.json``: the config and the
training metadata; the weights' headers: parameter counts) and, when given, a ``worldloop eval`` report:
the rows of this model (matched by its path or the run it was exported from). ``write_model_card``,
``save_model`` and ``export_model`` (``models/checkpoint.py``) write it; this module only makes the text, and
the same inputs make the same card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worldloop.models.config import ModelConfig

CARD_FILE = "README.md"
LICENSE = "mit"  # the project's licence (pyproject.toml)
TRAINING_DATA = ("the built-in world only (`worldloop world`): procedurally generated maze worlds in the "
                 "themes of distill/world/themes.py, rendered by the project's own raycaster while its "
                 "explorer (or random keys) drives; prompts are the worlds' own descriptions. No external "
                 "images, videos or text.")
HORIZON_METRICS = ("psnr", "ssim")
STAGES = {"vae": "the latent autoencoder, `worldloop train vae`",
          "teacher": "the causal teacher, flow matching with teacher forcing, `worldloop train teacher`",
          "cd": "causal consistency distillation of the teacher, `worldloop distill cd`",
          "dmd": "self-forcing distribution matching distillation, `worldloop distill dmd`"}


def model_card(config: ModelConfig, metadata: dict[str, Any], weights: dict[str, int], files: dict[str, int],
               evals: list[dict[str, Any]]) -> str:
    """The card's text: ``weights`` maps each weight file's stem to its parameter count, ``files`` each file
    of the directory to its size, ``evals`` holds the report rows of this model (``eval_rows``)."""
    front = {
        "license": LICENSE,
        "library_name": "worldloop",
        "pipeline_tag": "text-to-video",
        "tags": ["worldloop", "world-model", "interactive", "video-generation", "diffusion", "causal",
                 "autoencoder" if _autoencoder_only(metadata) else "few-step"],
        "training_data": TRAINING_DATA,
        "training": _training(metadata),
    }
    if evals:
        front["model-index"] = [{"name": _name(config, metadata), "results": [_result(row) for row in evals]}]
    body = [f"# worldloop {_name(config, metadata)}", "", _summary(config, metadata, weights), "",
            *_use(metadata), *_training_text(metadata), *_eval_text(evals), *_files_text(files),
            "## Licence", "", "MIT, as the worldloop project.", ""]
    return "---\n" + _yaml(front) + "---\n\n" + "\n".join(body)


def eval_rows(report: dict[str, Any], path: Path, metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """This model's rows of a ``worldloop eval`` report: world-model runs and autoencoder-only rows whose
    model is ``path`` or the directory it was exported from; a ValueError when there are none."""
    names = {_norm(path)} | ({_norm(metadata["exported_from"])} if "exported_from" in metadata else set())
    every = [*report.get("runs", []), *report.get("autoencoder_only", [])]
    episodes = report.get("config", {}).get("episodes")
    rows = [r | {"episodes": episodes} for r in every if _norm(r.get("model", "")) in names]
    if not rows:
        found = sorted({str(r.get("model")) for r in every})
        raise ValueError(f"the eval report has no rows of {path} (it has: {', '.join(found) or 'none'})")
    return rows


def _norm(path: str | Path) -> str:
    return str(Path(path).resolve())


def _autoencoder_only(metadata: dict[str, Any]) -> bool:
    return metadata.get("stage") == "vae"


def _name(config: ModelConfig, metadata: dict[str, Any]) -> str:
    return f"{config.name} {'autoencoder' if _autoencoder_only(metadata) else metadata.get('stage', 'model')}"


def _training(metadata: dict[str, Any]) -> dict[str, Any]:
    keep = ("stage", "preset", "step", "previous_steps", "student_steps", "teacher", "student", "cpu_minutes",
            "note", "exported_from", "weights")
    renamed = {"step": "iterations", "previous_steps": "previous_iterations"}  # the format's names
    out = {renamed.get(k, k): metadata[k] for k in keep if k in metadata}
    if isinstance(metadata.get("train"), dict):
        out["settings"] = {k: v for k, v in sorted(metadata["train"].items()) if k not in ("out", "device")}
    return out


def _result(row: dict[str, Any]) -> dict[str, Any]:
    """One report row as a model-index result (its metrics rounded to what the eval can tell apart)."""
    if "horizons" not in row:  # an autoencoder-only row
        metrics = [("psnr", "PSNR (dB)", row["psnr"]),
                   ("psnr", "PSNR of the worst frame (dB)", row["psnr_min"]), ("ssim", "SSIM", row["ssim"]),
                   ("sharpness_ratio", "sharpness ratio (1: as sharp as the engine)", row["sharpness_ratio"])]
        task = {"type": "image-to-image", "name": "encode → decode of held-out world frames"}
        held_out = f"{row.get('eval_frames', 'held-out')} frames of held-out worlds"
    else:
        steps = f"{row['steps']} step{'s' if row['steps'] != 1 else ''}"
        metrics = [(m, f"{m.upper()} at horizon {h}, {steps}", v[m]) for h, v in row["horizons"].items()
                   for m in HORIZON_METRICS]
        if "keys" in row:
            per_key = row["keys"]["model"]["per_key"]
            metrics.append(("accuracy", f"key accuracy through the IDM (per key), {steps}", per_key))
        if "prompt_switch" in row:
            adherence = row["prompt_switch"]["adherence"]
            metrics.append(("accuracy", f"prompt adherence after a switch, {steps}", adherence))
        task = {"type": "video-prediction", "name": "next frames from keys, a prompt and context frames"}
        held_out = f"{row.get('episodes') or 'several'} held-out worlds"
    return {"task": task,
            "dataset": {"type": "worldloop-built-in-world", "name": f"the built-in world, {held_out}"},
            "metrics": [{"type": t, "name": n, "value": round(float(v), 4)} for t, n, v in metrics]}


def _summary(config: ModelConfig, metadata: dict[str, Any], weights: dict[str, int]) -> str:
    params = ", ".join(f"{stem} {n / 1e6:.2f}M parameters" for stem, n in weights.items())
    if _autoencoder_only(metadata):
        return (f"The latent autoencoder of a worldloop world model: {config.height}×{config.width} RGB "
                f"frames ↔ {config.latent_channels}×{config.latent_size[0]}×{config.latent_size[1]} latents "
                f"(f{config.vae.downsample}). {params}.")
    return (f"A worldloop world model: a causal few-step diffusion transformer with a rolling KV cache that "
            f"makes {config.height}×{config.width} frames at {config.fps} FPS from held keys (W A S D, Q E) "
            f"and a text prompt, with {config.sampling.steps} denoising step(s) per frame "
            f"({config.sampling.first_frame_steps} for a stream's first). {params}.")


def _use(metadata: dict[str, Any]) -> list[str]:
    if _autoencoder_only(metadata):
        return ["## Use", "", "```bash",
                "worldloop train teacher --vae DIR   # a world model on these latents",
                "worldloop eval --autoencoder DIR    # its reconstruction figures", "```", ""]
    return ["## Use", "", "```bash", "worldloop play --model DIR",
            "worldloop rollout --model DIR --prompt \"an ice cave\" --seconds 10 --out ice.mp4", "```", ""]


def _training_text(metadata: dict[str, Any]) -> list[str]:
    t = _training(metadata)
    lines = ["## Training", "", f"Data: {TRAINING_DATA}", ""]
    if "stage" in t:
        done = f"{t['iterations']:,} iterations" if "iterations" in t else "an unknown number of iterations"
        before = f" after {t['previous_iterations']:,} of the model it started from" \
            if t.get("previous_iterations") else ""
        lines += [f"Stage `{t['stage']}` ({STAGES.get(t['stage'], 'a training stage')}): {done}{before}"
                  + (f", {t['cpu_minutes']:.0f} CPU minutes" if "cpu_minutes" in t else "") + "."]
    lines += [f"{label}: `{t[k]}`." for k, label in (("teacher", "Teacher"), ("student", "Started from"),
                                                     ("exported_from", "Exported from")) if k in t]
    if "note" in t:
        lines.append(f"Recipe: {t['note']}")
    if "settings" in t:
        lines.append("Settings: " + ", ".join(f"{k} {v}" for k, v in t["settings"].items()) + ".")
    return [*lines, ""]


def _eval_text(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["## Evaluation", "", "No eval report was given: `worldloop eval` measures one, and "
                "`worldloop export --report` puts its figures here.", ""]
    lines = ["## Evaluation", "", "Against the built-in world's engine (`worldloop eval`), "
             f"{_result(rows[0])['dataset']['name'].removeprefix('the built-in world, ')}:", ""]
    auto = [r for r in rows if "horizons" not in r]
    if auto:
        lines += ["| autoencoder | PSNR dB | worst frame | SSIM | sharpness ratio | decode ms |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| encode → decode | {r['psnr']:.2f} | {r['psnr_min']:.2f} | {r['ssim']:.3f} | "
                  f"{r['sharpness_ratio']:.3f} | {r.get('decode_ms', float('nan')):.1f} |" for r in auto]
        lines.append("")
    runs = [r for r in rows if "horizons" in r]
    if runs:
        horizons = list(runs[0]["horizons"])
        lines += ["| | steps | " + " | ".join(f"PSNR h{h}" for h in horizons) + " | "
                  + " | ".join(f"SSIM h{h}" for h in horizons) + " | keys (per key) | prompt adherence |",
                  "| --- " * (4 + 2 * len(horizons)) + "|"]
        def cells(h: dict[str, dict[str, float]], prefix: str) -> str:
            return " | ".join([*(f"{h[k][prefix + 'psnr']:.2f}" for k in horizons),
                               *(f"{h[k][prefix + 'ssim']:.3f}" for k in horizons)])

        lines.append(f"| copy the last frame | – | {cells(runs[0]['horizons'], 'copy_last_')} | | |")
        for r in runs:
            keys = f"{r['keys']['model']['per_key']:.3f}" if "keys" in r else ""
            adherence = f"{r['prompt_switch']['adherence']:.3f}" if "prompt_switch" in r else ""
            lines.append(f"| this model | {r['steps']} | {cells(r['horizons'], '')} | {keys} | {adherence} |")
        lines += ["", "PSNR in dB, h frames after the context; keys: the keys an inverse-dynamics model "
                  "reads back from the frames; prompt adherence: the theme classifier's agreement after a "
                  "prompt switch.", ""]
    return lines


def _files_text(files: dict[str, int]) -> list[str]:
    about = {"config.json": "the model config and its training metadata", CARD_FILE: "this card",
             "dit": "DiT weights (fp32, what training continues from)", "dit_ema": "EMA of the DiT weights "
             "(what plays)", "vae": "autoencoder weights"}
    lines = ["## Files", ""]
    for name, size in files.items():
        stem = name.split("-0", 1)[0].removesuffix(".safetensors")
        what = about.get(name) or ("shard index (Hugging Face layout)" if name.endswith(".index.json")
                                   else about.get(stem, "weights"))
        shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
        lines.append(f"- `{name}` ({shown}): {what}")
    return [*lines, ""]


def _yaml(value: Any, indent: int = 0) -> str:
    """A small YAML writer for the front matter: mappings, lists and scalars (strings as JSON strings, which
    YAML reads as double-quoted scalars)."""
    pad = " " * indent
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                out.append(f"{pad}{key}:\n{_yaml(item, indent + 2)}")
            else:
                out.append(f"{pad}{key}: {_scalar(item)}\n")
        return "".join(out)
    if isinstance(value, list):
        out = []
        for item in value:
            nested = isinstance(item, (dict, list)) and item
            text = _yaml(item, indent + 2) if nested else f"{_scalar(item)}\n"
            out.append(f"{pad}- {text.lstrip()}")
        return "".join(out)
    return f"{pad}{_scalar(value)}\n"


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(str(value), ensure_ascii=False)
