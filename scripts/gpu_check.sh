#!/usr/bin/env bash
# The one-call GPU check (app/gpu_check.py): CUDA checks (≤ 2 min), then `worldloop speedrun` on the rest of
# MINUTES; results in OUT (gpu_check.json, report.md, curves.png, bundle.tar.000…: ≤ 8 files of ≤ 16 MiB);
# `cat OUT/bundle.tar.* | tar -x -C DEST` gives DEST/model (the student) and DEST/teacher/model.
#
#   scripts/gpu_check.sh OUT [MINUTES] [worldloop gpu-check options...]
#   scripts/gpu_check.sh "$OUT" 9                                      # on the GPU machine
#   scripts/gpu_check.sh /tmp/dry 1 --device cpu --preset tiny         # the CPU dry run (tests/test_gpu_check.py)
#
# Installs nothing: when `worldloop` is not importable it runs from this checkout through a temporary folder
# of links; what a bare CUDA image lacks comes from .gpu/ (made here by `python scripts/gpu_pack.py`): a
# compact MiniLM (the prompt encoder) and the websockets wheel (bench's serving phase), unpacked to /tmp only
# when missing ($WORLDLOOP_GPU_PACK names another such folder). The whole call is bounded by `timeout`
# (MINUTES + 40 s, or $GPU_CHECK_HARD_LIMIT_S), and gpu_check.json always exists at the end: rewritten after
# every step, or an error line if none was written.
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT [MINUTES] [worldloop gpu-check options...]}
MINUTES=${2:-9}
shift $(( $# < 2 ? $# : 2 ))
source scripts/gpu_env.sh
HARD=${GPU_CHECK_HARD_LIMIT_S:-$("$PY" -c "print(int(float('$MINUTES') * 60 + 40))")}
PYTHONUNBUFFERED=1 timeout -k 10 "$HARD" "$PY" -m worldloop.app.cli gpu-check --out "$OUT" --minutes "$MINUTES" "$@"
rc=$?
if [ ! -s "$OUT/gpu_check.json" ]; then
  printf '{"error": "worldloop gpu-check ended with status %s before writing its results"}\n' "$rc" > "$OUT/gpu_check.json"
fi
exit $rc
