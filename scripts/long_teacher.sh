#!/usr/bin/env bash
# The long teachers: flow-matching teachers trained for many CPU-hours, continued session after session
# (docs/TRAINING.md, "Stage 9"). Two runs side by side, one thread each (a second thread gives this model
# almost nothing, docs/training-recipe.md), so one 2-core machine trains both:
#   adamw      the default recipe of `worldloop train teacher`
#   muon-keys  the same with Muon on the hidden matrices and held random keys (30 % of frames, held 1-8)
# Each run checkpoints every 100 iterations, stops cleanly on SIGTERM and resumes where it stopped; its log's
# cpu_minutes and its snapshots (every 15 CPU minutes, runs/long/NAME/snapshots/cpuMMMM.MMM) count over all
# its segments, so each run has one learning curve.
#
#   bash scripts/long_teacher.sh start      # start, or resume, both runs in the background
#   bash scripts/long_teacher.sh status     # iteration, CPU minutes and recent loss of each run
#   bash scripts/long_teacher.sh stop       # SIGTERM: each saves a checkpoint and exports its model
#   bash scripts/long_teacher.sh eval       # quick eval of every snapshot (learning_speed.py --eval-only)
# EXTRA="--compile" adds flags to the runs it starts; ROOT, VAE and THREADS (of eval) can be set too.
set -euo pipefail
ROOT=${ROOT:-runs/long}
VAE=${VAE:-assets/autoencoder}
RUNS=(adamw muon-keys)
flags() {
  case "$1" in
    adamw) ;;
    muon-keys) echo "--optimizer muon --random-keys 0.3 --key-hold 8" ;;
  esac
}
running() { pgrep -f -- "--out $ROOT/$1 " >/dev/null; }

case "${1:-status}" in
  start)
    mkdir -p "$ROOT"
    for r in "${RUNS[@]}"; do
      if running "$r"; then echo "$r: already running"; continue; fi
      resume=(); [[ -f "$ROOT/$r/checkpoint.pt" ]] && resume=(--resume)
      # shellcheck disable=SC2046  # the flags are words
      setsid nohup worldloop train teacher --vae "$VAE" --out "$ROOT/$r" --threads 1 --checkpoint-every 100 \
        --snapshot-minutes 15 --sample-every 0 --iterations 200000 $(flags "$r") ${EXTRA:-} "${resume[@]}" \
        >>"$ROOT/$r.log" 2>&1 </dev/null &
      echo "$r: started ${resume[*]:-from scratch} (log $ROOT/$r.log)"
    done ;;
  stop)
    for r in "${RUNS[@]}"; do pkill -TERM -f -- "--out $ROOT/$r " && echo "$r: told to stop" || true; done ;;
  status)
    for r in "${RUNS[@]}"; do
      state=stopped; running "$r" && state=running
      last=$(tail -n 1 "$ROOT/$r/log.jsonl" 2>/dev/null || echo '{}')
      python - "$r" "$state" "$last" "$ROOT/$r/log.jsonl" <<'EOF'
import json, sys
name, state, last, path = sys.argv[1:]
r = json.loads(last)
try:
    losses = [json.loads(x)["loss"] for x in open(path).read().splitlines()[-20:]]
except (OSError, ValueError, KeyError):
    losses = []
mean = sum(losses) / len(losses) if losses else float("nan")
print(f"{name}: {state}, iteration {r.get('iteration', 0)}, {r.get('cpu_minutes', 0):.1f} CPU-min, "
      f"loss (last 20 logs) {mean:.4f}")
EOF
    done ;;
  eval)
    # learning_speed.py evaluates ROOT/NAME/run and its snapshots: link the runs into that layout
    for r in "${RUNS[@]}"; do
      mkdir -p "$ROOT/eval/$r" && ln -sfn "$(realpath "$ROOT/$r")" "$ROOT/eval/$r/run"
      # shellcheck disable=SC2046  # the flags are words
      python benchmarks/learning_speed.py --eval-only --root "$ROOT/eval" --name "$r" --threads "${THREADS:-1}" \
        -- $(flags "$r") || echo "$r: not evaluated"
    done
    done_runs=(); for r in "${RUNS[@]}"; do [[ -f "$ROOT/eval/$r/result.json" ]] && done_runs+=("$ROOT/eval/$r"); done
    [[ ${#done_runs[@]} -gt 0 ]] && python benchmarks/learning_speed.py --table "${done_runs[@]}" ;;
  *) echo "usage: $0 start|status|stop|eval" >&2; exit 2 ;;
esac
