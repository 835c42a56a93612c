#!/usr/bin/env bash
# Every GPU check of the face stage and its neighbours, in one run (< 8 minutes on one H200).
#   1. the ported dlib descriptor's parity with dlib on every shared face, on CUDA (fp32, bf16)
#   2. the face stage end to end, JPEG bytes -> embeddings, on the shared photos repeated
#      (target: >= 2000 images/s on one H200)
#   3. exact kNN timing (bench/bench_identity.py --gpu-knn, when that entry point exists)
#   4. the training step benchmark (bench/bench_training.py)
# Prepare .gpu/ on the development machine first (bench/gpu_prepare.sh) and carry it; logs and
# JSON results go to $OUT (or bench/results/gpu-check/). Each step has its own time limit; a
# failing step is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench/results/gpu-check}
mkdir -p "$OUTDIR" bench/results
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -d .gpu ]; then  # what bench/gpu_prepare.sh packed: unpack the binary wheels, import the rest zipped
  SITE=/tmp/lineup-gpu-site
  rm -rf "$SITE" && mkdir -p "$SITE/face_recognition_models/models"
  for w in .gpu/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
  : > "$SITE/face_recognition_models/__init__.py"
  ln -s "$PWD"/.gpu/models/*.dat "$SITE/face_recognition_models/models/"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  for w in .gpu/zip/*.whl; do export PYTHONPATH="$PYTHONPATH:$PWD/$w"; done
fi
[ -d .gpu/faces ] && export LINEUP_SHARED_FACES="$PWD/.gpu/faces"
export PYTHONUNBUFFERED=1
declare -A RC
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  RC[$name]=${PIPESTATUS[0]}
  echo "=== $name: exit ${RC[$name]} after $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUTDIR/gpu.txt"
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA: nothing to check"; exit 1; }

step parity 120 "$PY" bench/bench_dlib_torch.py parity --device cuda
step stage 150 "$PY" bench/bench_dlib_torch.py stage --device cuda --repeat-photos 20 --batch 512 --repeats 3 --decode-workers 16
if grep -q -- "--gpu-knn" bench/bench_identity.py 2>/dev/null; then
  step knn 90 "$PY" bench/bench_identity.py --gpu-knn
else
  echo "=== knn: skipped (bench/bench_identity.py has no --gpu-knn entry point yet)"; RC[knn]=skipped
fi
step training 100 "$PY" bench/bench_training.py --device cuda --time-budget-s 70 --out "$OUTDIR/training.json"

echo "=== summary"; for k in parity stage knn training; do echo "$k: ${RC[$k]:-not run}"; done
