#!/usr/bin/env bash
# One GPU call that trains what the CPU budget could not (docs/TRAINING.md, stages 5-7: "the next step is a
# GPU run of the critic on 16-32-frame rollouts"), from the shipped student, bounded to MINUTES of wall clock:
#
#   1. reproject (40 % of the time): START (a "delta" student; default assets/default) converted to a
#      reprojecting student (its depth network fitted on the engine's depths first) and trained by self-forcing
#      against the engine: stage 5's recipe with stage 6's carried depth, at GPU batch;
#   2. critic (the rest): from 1's model, 24-frame rollouts with gradients through all of them, the previous
#      frame moved from 16-frame anchors, and a patch critic on the decoded rollout frames, so what a step or a
#      turn reveals is drawn as the engine draws it rather than as the mean of what it could be.
#   A START that already reprojects (what phase 2 made, once shipped) skips phase 1: phase 2 gets all the time.
#   If a phase ends without exporting a model (it exports at the end, on SIGTERM and at every checkpoint), it is
#   tried once more without bf16 at half the batch and, for phase 2, without the critic, in the time left.
#   What comes back in OUT (at most 8 files of at most 16 MiB): gpu_train.json (each phase's command, status,
#   seconds and last log line) and bundle.tar.000, … (both phases' models, logs and train.json;
#   `cat OUT/bundle.tar.* | tar -x -C DEST` gives DEST/reproject/model and DEST/critic/model). Evaluate them
#   where the call came from: `worldloop eval --model DEST/critic/model@1 --model assets/default@1`.
#
#   scripts/gpu_train.sh OUT [MINUTES] [extra distill-truth options for both phases...]
#   scripts/gpu_train.sh "$OUT" 9                        # on the GPU machine, .gpu carried (scripts/gpu_pack.py)
#   START=DIR DEVICE=cpu BATCH=2 ITERATIONS=2 ADVERSARIAL_START=1 scripts/gpu_train.sh /tmp/t 2   # CPU dry run
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_train.sh OUT [MINUTES] [distill truth options...]}
MINUTES=${2:-9}
shift $(( $# < 2 ? $# : 2 ))
source scripts/gpu_env.sh
START=${START:-assets/default}
WORK=${WORK:-/tmp/worldloop-gpu-train}
DEVICE=${DEVICE:-cuda}
# 32 on the first call: 160-310 frames/s, launch-bound, 1.3-3.2 s an iteration. Phase 2 holds about 0.5 GB per
# rollout in float32 (measured on the CPU: 2.5 GB at batch 2, 4.5 at 6), so 64 fits an H200 many times over.
BATCH=${BATCH:-64}
RETRY=(--no-bf16 --batch-size $(( BATCH > 1 ? BATCH / 2 : 1 )))  # a failed phase's second try
ITERATIONS=${ITERATIONS:-100000}  # the phases stop on time; a dry run caps them
MARGIN_S=40  # kept back for the bundle
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
TOTAL_S=$("$PY" -c "print(int(float('$MINUTES') * 60))")
# Both phases regress the decoded frames onto the engine's in pixels, not only the latents (stage 11: at equal
# CPU minutes --pixel-weight 10 without the latent spectrum term kept 0.5-0.9 dB more of the first frames).
COMMON=(--teacher "$START" --student-steps 2 --max-context 9 --lr 3e-4 --latent-spectrum-weight 0
        --pixel-weight 10 --context-sigma 0 --device "$DEVICE" --batch-size "$BATCH" --iterations "$ITERATIONS"
        --checkpoint-every 50 --log-every 10)
# The uncovered strip repeats the edge column ("edge"): "plane" (docs/TRAINING.md, stage 12) won held turns but
# lost 0.6-0.8 dB at horizons 4 / 16 in the eval's mixed keys, trained with it or not. Pass --reveal-fill plane
# to try it.
PHASE1=(--student "$START" --reproject --resample bicubic --depth-memory 1)
# Gradients through every rollout frame: through the last 8 only, the first second lost 0.7-1.0 dB (stage 11).
PHASE2=(--student "$WORK/reproject/model" --rollout-frames 24 --grad-frames 0 --anchor-frames 16
        --anchor-lowpass 2)
ADVERSARIAL_START=${ADVERSARIAL_START:-60}  # the critic's first iteration (a dry run: 1, so it runs)
CRITIC=(--adversarial-weight 0.3 --critic-lr-scale 10 --critic-updates 4 --adversarial-start "$ADVERSARIAL_START")
RECORD="$WORK/phases.jsonl"
: > "$RECORD"

# phase NAME SECONDS ARGS...: one `distill truth` run into $WORK/NAME, stopped by its own --minutes and, should
# that not come, by SIGTERM (the loop saves and exports on it) 30 s later; records what happened.
phase() {
  local name=$1 seconds=$2
  shift 2
  local started=$SECONDS
  if [ "$seconds" -lt 20 ]; then
    printf '{"phase": "%s", "rc": null, "skipped": "%s s left"}\n' "$name" "$seconds" >> "$RECORD"
    return 1
  fi
  PYTHONUNBUFFERED=1 timeout -s TERM -k 20 $((seconds + 30)) "$PY" -m worldloop.app.cli distill truth \
    "${COMMON[@]}" "$@" --out "$WORK/$name" --minutes "$("$PY" -c "print(round($seconds / 60, 2))")" \
    2>&1 | tee "$WORK/$name.out" | tr "\r" "\n" | grep --line-buffered -v -e "it/s" -e "s/it" -e "frame/s"
  local rc=${PIPESTATUS[0]}
  "$PY" - "$name" "$rc" $((SECONDS - started)) "$WORK/$name.out" "$*" >> "$RECORD" <<'EOF'
import json, sys
name, rc, seconds, log, args = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
lines = [x for x in open(log, errors="replace").read().replace("\r", "\n").splitlines() if x.strip()]
print(json.dumps({"phase": name, "rc": rc, "seconds": seconds, "args": args, "last_lines": lines[-6:]}))
EOF
  # A model it exported (at the end, on SIGTERM, or at its last checkpoint before a failure or a kill) is kept:
  # a retry would start over and throw it away.
  [ -f "$WORK/$name/model/config.json" ]
}
left() { echo $((TOTAL_S - MARGIN_S - SECONDS)); }

if "$PY" -c "import sys; from worldloop.models.checkpoint import read_config
sys.exit(0 if read_config(sys.argv[1])[0].camera.reproject else 1)" "$START"; then
  printf '{"phase": "reproject", "rc": null, "skipped": "%s already reprojects"}\n' "$START" >> "$RECORD"
  PHASE2[1]=$START
else
  phase reproject $(( ($(left)) * 2 / 5 )) "${PHASE1[@]}" "$@" ||
    { rm -rf "$WORK/reproject"; phase reproject $(( ($(left)) * 2 / 5 )) "${PHASE1[@]}" "$@" "${RETRY[@]}"; }
fi
if [ -f "${PHASE2[1]}/config.json" ]; then
  phase critic "$(left)" "${PHASE2[@]}" "${CRITIC[@]}" "$@" ||
    { rm -rf "$WORK/critic"; phase critic "$(left)" "${PHASE2[@]}" "$@" "${RETRY[@]}"; }
fi

"$PY" - "$WORK" "$OUT" "$SECONDS" <<'EOF'
import json, sys
from pathlib import Path
from worldloop.app.gpu_check import write_bundle
from worldloop.models.timing import hardware
work, out, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
phases = [json.loads(x) for x in (work / "phases.jsonl").read_text().splitlines() if x.strip()]
# The playable form only: the raw float32 weights (dit-*.safetensors, 37 MB a model) would not fit the 64 MiB.
parts = write_bundle(work, ("*/model/config.json", "*/model/README.md", "*/model/dit_ema*", "*/model/vae.safetensors",
                            "*/log.jsonl", "*/train.json", "*.out"), out)
import torch
summary = {"hardware": hardware("cuda" if torch.cuda.is_available() else "cpu"), "seconds": seconds, "phases": phases,
           "models": sorted(str(p.parent.relative_to(work)) for p in work.glob("*/model/config.json")),
           "bundle": [p.name for p in parts]}
(out / "gpu_train.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("seconds", "models", "bundle")}))
for p in phases:
    print(p["phase"], "rc", p.get("rc"), p.get("seconds"), "s:", (p.get("last_lines") or [p.get("skipped")])[-1])
EOF
[ -f "$WORK/critic/model/config.json" ] || [ -f "$WORK/reproject/model/config.json" ]
