#!/usr/bin/env bash
# Every command that made the shipped default model (assets/default), in order; docs/TRAINING.md gives the
# CPU time, iterations and results of each. Runs are resumable: re-run a stage with --resume to continue it.
# Stages stop themselves after their --cpu-minutes (process CPU time), saving and exporting their model.
#
#   bash scripts/train_default.sh            # everything (about 5 CPU-hours on a 2-core CPU)
#   STAGE=truth bash scripts/train_default.sh  # one stage: autoencoder | teacher | truth | decoder | warp |
#                                              # reproject | long | memory | rollouts20 | export
# (the decoder, warp and long stages are measured experiments the shipped model does not use; STAGE=all skips
# them)
set -euo pipefail
THREADS=${THREADS:-2}
STAGE=${STAGE:-all}
run() { [[ ( "$STAGE" == all && "$1" != decoder && "$1" != warp && "$1" != long ) || "$STAGE" == "$1" ]]; }
# with_camera SRC DST JSON: a copy of model directory SRC whose config.json has these camera fields.
with_camera() {
  rm -rf "$2" && cp -r "$1" "$2"
  python -c "import json, sys; p = sys.argv[1]; c = json.load(open(p)); c['config']['camera'].update(json.loads(sys.argv[2]))
json.dump(c, open(p, 'w'), indent=2)" "$2/config.json" "$3"
}

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
    --snapshot-minutes 30 --sample-every 1000 --iterations 1688
fi

# 3. The student: self-forcing against the engine (distill truth), 1-2 steps, from the teacher. Rollouts
#    from 1-9 engine frames, 10 generated frames each, every 4th iteration with a prompt switch. Four
#    segments, as they were run (docs/TRAINING.md: why each): plain regression; + log-spectrum term x2
#    (its iteration-98 model also started the first decoder run); x6; then cache sigma 0 baked in.
T=runs/teacher-f4/model
TRUTH=(--teacher "$T" --student-steps 2 --max-context 9 --rollout-frames 10 --lr 3e-4 --threads 1
       --checkpoint-every 50)
if run truth; then
  worldloop distill truth "${TRUTH[@]}" --out runs/truth --iterations 781
  worldloop distill truth "${TRUTH[@]}" --student runs/truth/model --latent-spectrum-weight 2 \
    --out runs/truth-sharp --iterations 98
  cp -r runs/truth-sharp/model runs/truth-sharp-model-for-decoder
  worldloop distill truth "${TRUTH[@]}" --student runs/truth/model --latent-spectrum-weight 2 \
    --out runs/truth-sharp --iterations 156 --resume
  worldloop distill truth "${TRUTH[@]}" --student runs/truth-sharp/model --latent-spectrum-weight 6 \
    --out runs/truth-sharp6 --iterations 179
  cp -r runs/truth-sharp6/model runs/sharp6-8min
  worldloop distill truth "${TRUTH[@]}" --student runs/sharp6-8min --latent-spectrum-weight 6 \
    --context-sigma 0 --out runs/truth-cs0 --iterations 171
  cp -r runs/truth-cs0/model runs/cs0-8min
  worldloop distill truth "${TRUTH[@]}" --student runs/sharp6-8min --latent-spectrum-weight 6 \
    --context-sigma 0 --out runs/truth-cs0 --iterations 347 --resume   # the shipped student
fi

# 4. (Measured, not shipped.) The decoder fine-tuned on generated latents against the engine's frames,
#    following the student: on the iteration-98 model of step 3's second segment, then the cache-sigma-0
#    student at 171 iterations, then that student at 467 iterations. It sharpened the blurry students but
#    made the final one blurrier (docs/TRAINING.md), so the shipped model keeps assets/autoencoder's decoder.
DECODER=(--teacher "$T" --student-steps 2 --train decoder --max-context 9 --rollout-frames 10 --lr 1e-3
         --decoder-lr-scale 0.2 --decoder-frames 16 --threads 1 --checkpoint-every 50)
if run decoder; then
  worldloop distill truth "${DECODER[@]}" --student runs/truth-sharp-model-for-decoder --out runs/decoder \
    --iterations 428
  worldloop distill truth "${DECODER[@]}" --student runs/cs0-8min --vae runs/decoder/model \
    --out runs/decoder2 --iterations 334
  cp -r runs/truth-cs0 runs/truth-cs0-467
  worldloop distill truth "${TRUTH[@]}" --student runs/sharp6-8min --latent-spectrum-weight 6 \
    --context-sigma 0 --out runs/truth-cs0-467 --iterations 467 --resume
  worldloop distill truth "${DECODER[@]}" --student runs/truth-cs0-467/model --vae runs/decoder2/model \
    --out runs/decoder3 --iterations 120
fi

# 4. The warp student (docs/TRAINING.md, stage 4; measured, not shipped): stage 3's student converted to warp
#    prediction (zero flow, its key flow prior fitted on engine frames first), trained on in three segments
#    of self-forcing against the engine. 4a ran with bilinear resampling (commit 5365263), 4b with plain bicubic (the same commit, its
#    resampler patched by an experiment runner), 4c with the clamped bicubic of models/dit.py today; the
#    commands below run all three with today's resampler.
if run warp; then
  worldloop distill truth "${TRUTH[@]}" --student runs/truth-cs0/model --latent-spectrum-weight 6 \
    --context-sigma 0 --prediction warp --out runs/x-warp3 --cpu-minutes 10
  worldloop distill truth "${TRUTH[@]}" --student runs/x-warp3/model --latent-spectrum-weight 6 \
    --out runs/x-bicubic --cpu-minutes 10
  worldloop distill truth "${TRUTH[@]}" --student runs/x-bicubic/model --latent-spectrum-weight 6 \
    --out runs/y-a --cpu-minutes 10   # the evaluated student (the run went on to 20; its 10-minute snapshot)
  worldloop eval --model runs/y-a/model@1,2 --drift-seconds 60 --out runs/eval-warp
fi

# 4″. Camera reprojection (docs/TRAINING.md, stage 5): stage 3d's student at iteration 347 (runs/final; the
#    assets/default of commit a7fd2a0) converted with --reproject (its depth network fitted on engine frames
#    first, about 10 minutes; its output layer zeroed) and trained on with bicubic resampling, 2 threads.
#    The run of record took this in two commands (the conversion and fit in a script calling the same
#    distill.stages.shared functions, runs/reproj-zero, then `--student runs/reproj-zero --resample
#    bicubic`); its 15-CPU-minute snapshot was evaluated against its 60. Stage 7 repeated the command as it
#    stands (--cpu-minutes 15, --threads 1 and --teacher/--student assets/default, whose weights are
#    runs/final's) and used its 15-minute snapshot.
if run reproject; then
  worldloop distill truth "${TRUTH[@]}" --threads 2 --student runs/final --latent-spectrum-weight 6 \
    --context-sigma 0 --reproject --resample bicubic --depth-memory 0 --out runs/reproj-bicubic \
    --cpu-minutes 60 --snapshot-minutes 15
  worldloop eval --model runs/reproj-bicubic/snapshots/cpu0015.000@1,2 --drift-seconds 60 --out runs/eval-rb15
  worldloop eval --model runs/reproj-bicubic/snapshots/cpu0060.000@1,2 --drift-seconds 60 --out runs/eval-rb60
  # Stage 6 (docs/TRAINING.md): the same 15-minute weights with the carried wall depth (camera.depth_memory 1),
  # no training.
  R15=runs/reproj-bicubic/snapshots/cpu0015.000
  with_camera "$R15" runs/rb15-mem1.0 '{"depth_memory": 1.0}'
  worldloop eval --model runs/rb15-mem1.0@1 --drift-seconds 60 --out runs/eval-rb15-mem
  # Stage 7: the same weights moving their previous frame from anchors (no training), then a fine-tune with them.
  with_camera "$R15" runs/rb15-a16 '{"depth_memory": 1.0, "anchor_frames": 16}'
  with_camera "$R15" runs/rb15-a8 '{"depth_memory": 1.0, "anchor_frames": 8}'
  with_camera "$R15" runs/rb15-a16-lp2 '{"depth_memory": 1.0, "anchor_frames": 16, "anchor_lowpass": 2.0}'
  worldloop eval --model runs/rb15-mem1.0@1 --model runs/rb15-a16@1 --model runs/rb15-a8@1 \
    --model runs/rb15-a16-lp2@1 --drift-seconds 10 --out runs/eval-s7-quick
  worldloop eval --model runs/rb15-a16-lp2@1 --drift-seconds 60 --out runs/eval-rb15-a16lp2
  with_camera runs/rb15-a16-lp2 runs/rb15-a16-lp2-nn '{"resample": "nearest"}'
  worldloop eval --model runs/rb15-a16-lp2-nn@1 --drift-seconds 10 --out runs/eval-s7-nn
  worldloop distill truth "${TRUTH[@]}" --student "$R15" --latent-spectrum-weight 6 --context-sigma 0 \
    --depth-memory 1 --anchor-frames 16 --out runs/s7-anchor16 --cpu-minutes 15 --snapshot-minutes 5
fi

# 4‴. Stage 8 (docs/TRAINING.md; measured, not shipped): the shipped student on 24-frame rollouts with
#    gradients through the last 8, 45 CPU-minutes at 1 thread, each 15-minute snapshot evaluated.
if run long; then
  worldloop distill truth --teacher assets/default --student assets/default --student-steps 2 \
    --max-context 9 --rollout-frames 24 --grad-frames 8 --lr 3e-4 --threads 1 --checkpoint-every 25 \
    --latent-spectrum-weight 6 --context-sigma 0 --out runs/s8-long --cpu-minutes 45 --snapshot-minutes 15
  worldloop eval --model assets/default@1 --drift-seconds 10 --out runs/eval-s8-shipped10
  for m in 15 30 45; do
    worldloop eval --model "runs/s8-long/snapshots/cpu00$m.000@1" --drift-seconds 10 --out "runs/eval-s8-long$m"
  done
fi

# 4⁗. Stages 13-14 (docs/TRAINING.md), the shipped model since 2026-12-04: stage 3d's student converted to
#    reprojection (its depth network fitted on engine frames, output layer zeroed; one step at lr 1e-12, so
#    the reprojection alone), given a surface memory with colour (camera.surface_memory 64, memory_colour
#    0.3; anchors of 16 with a 2-px low-pass, carried depth), then trained 30 CPU-minutes with the memory on.
S3=runs/truth-cs0/model
if run memory; then
  worldloop distill truth --teacher "$S3" --student "$S3" --student-steps 2 --max-context 9 --reproject \
    --resample bicubic --depth-memory 1 --anchor-frames 16 --anchor-lowpass 2 --context-sigma 0 \
    --batch-size 2 --iterations 1 --lr 1e-12 --threads 1 --out runs/base-reproj-run
  with_camera runs/base-reproj-run/model runs/mem64-c0.3 '{"surface_memory": 64, "memory_colour": 0.3}'
  worldloop distill truth --teacher "$S3" --student runs/mem64-c0.3 --student-steps 2 --max-context 9 \
    --rollout-frames 10 --lr 3e-4 --threads 1 --checkpoint-every 50 --latent-spectrum-weight 6 \
    --context-sigma 0 --out runs/memc-truth --cpu-minutes 30 --snapshot-minutes 10
fi
SHIP=${SHIP:-runs/memc-truth/snapshots/cpu0030.000}

# 5. Stage 16 (docs/TRAINING.md, 2026-12-05), the shipped weights: stage 14's student with stage 15's runtime
#    (the memory draws what a turn uncovers at the wall map's guess: camera.memory_reveal 0.5; repaint_frames
#    and the wall evidence are defaults), trained 30 CPU-minutes on 20-frame rollouts with that runtime.
if run rollouts20; then
  with_camera "$SHIP" runs/ship-s15 '{"memory_reveal": 0.5}'
  worldloop distill truth --teacher runs/ship-s15 --student runs/ship-s15 --student-steps 2 --max-context 9 \
    --rollout-frames 20 --lr 3e-4 --threads 1 --latent-spectrum-weight 6 --context-sigma 0 \
    --out runs/rv-truth20 --cpu-minutes 30 --snapshot-minutes 10
fi
SHIP16=${SHIP16:-runs/rv-truth20/snapshots/cpu0030.000}

# 6. The shipping form: the bank of looks a prompt switch starts from (`worldloop looks`: 17 training worlds,
#    every pattern of every theme, 300 frames each), the eval against the engine, the export (1 step; 2 with
#    --steps 2) with the eval's figures in its model card.
if run export; then
  rm -rf runs/ship-default && cp -r "$SHIP16" runs/ship-default
  worldloop looks --model runs/ship-default --frames 300
  worldloop eval --model runs/ship-default@1,2 --drift-seconds 60 --out runs/eval-default
  worldloop export --model runs/ship-default --out assets/default --steps 1 \
    --report runs/eval-default/report.json --note "docs/TRAINING.md, stage 16"
fi
