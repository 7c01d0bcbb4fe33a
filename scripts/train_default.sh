#!/usr/bin/env bash
# Every command that made the shipped default model (assets/default), in order; docs/TRAINING.md gives the
# CPU time, iterations and results of each. Runs are resumable: re-run a stage with --resume to continue it.
# Stages stop themselves after their --cpu-minutes (process CPU time), saving and exporting their model.
#
#   bash scripts/train_default.sh            # everything (about 4 CPU-hours on a 2-core CPU)
#   STAGE=truth bash scripts/train_default.sh  # one stage: autoencoder | teacher | truth | decoder | export
set -euo pipefail
THREADS=${THREADS:-2}
STAGE=${STAGE:-all}
run() { [[ "$STAGE" == all || "$STAGE" == "$1" ]]; }

# 1. The autoencoder (f4 × 8 channels), as shipped in assets/autoencoder (docs/autoencoder.md): a first run,
#    then decoder-only fine-tunes with the log-spectrum term. Skip it to reuse assets/autoencoder.
if run autoencoder; then
  worldloop train vae --preset default --out runs/vae-f4c8 --iterations 8000 --lr 1e-3 --threads "$THREADS"
  prev=runs/vae-f4c8/model
  for w in 1 3 8 16 24; do
    worldloop train vae --preset default --init-from "$prev" --decoder-only --spectrum-weight "$w" \
      --iterations 1000 --lr 2e-4 --out "runs/vae-f4c8-spec$w" --threads "$THREADS"
    prev="runs/vae-f4c8-spec$w/model"
  done
fi
VAE=${VAE:-assets/autoencoder}

# 2. The teacher: flow matching on engine clips with the recipe's defaults (delta prediction, cache σ 0.3,
#    batch 4, lr 1e-3, bf16 on AVX512-BF16 CPUs); docs/training-recipe.md.
if run teacher; then
  worldloop train teacher --vae "$VAE" --out runs/teacher-f4 --threads "$THREADS" --checkpoint-every 100 \
    --snapshot-minutes 30 --sample-every 1000 --cpu-minutes "${TEACHER_MINUTES:-70}"
fi

# 3. The student: self-forcing against the engine (distill truth), 1-2 steps, from the teacher. Rollouts
#    from 1-9 engine frames, 10 generated frames each, every 4th iteration with a prompt switch.
if run truth; then
  worldloop distill truth --teacher runs/teacher-f4/model --student-steps 2 --max-context 9 \
    --rollout-frames 10 --lr 3e-4 --out runs/truth --threads "$THREADS" --checkpoint-every 50 \
    --snapshot-minutes 15 --cpu-minutes "${TRUTH_MINUTES:-120}"
fi

# 4. The decoder fine-tuned on the student's generated latents against the engine's frames.
if run decoder; then
  worldloop distill truth --teacher runs/teacher-f4/model --student runs/truth/model --train decoder \
    --max-context 9 --rollout-frames 10 --lr 1e-3 --decoder-lr-scale 0.2 --decoder-frames 16 \
    --out runs/truth-decoder --threads "$THREADS" --checkpoint-every 50 --cpu-minutes "${DECODER_MINUTES:-20}"
fi

# 5. Evaluate against the shipped model and export the shipping form (1 step; 2 steps with --steps 2).
if run export; then
  worldloop eval --model assets/default@1,2 --model runs/truth-decoder/model@1,2 --drift-seconds 60 \
    --out runs/eval-default
  worldloop export --model runs/truth-decoder/model --out assets/default --steps 1 \
    --report runs/eval-default/report.json --note "docs/TRAINING.md"
fi
