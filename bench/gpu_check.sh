#!/usr/bin/env bash
# Every GPU check of the face stage and its neighbours, in one run (step limits add up to < 8 minutes).
#   1. the ported dlib descriptor's parity with dlib on every shared face, on CUDA (fp32, bf16)
#   2. the face stage end to end as the faces asset runs it (run_face_partition -> analyze_chunks: rows
#      read from disk, decoded by nvjpeg on a thread while the previous chunk is analysed, chunks of 256),
#      on --images (default 1024) JPEGs of ~3 MP that the bench generates from the shared photos (target,
#      never measured here yet: >= 2000 images/s on one H200); results in $OUTDIR/stage.json
#   3. dlib's shape predictor ported to torch (the stage's landmarks) on CUDA: parity with its CPU run
#      on every shared photo's faces, and faces/s with and without the Triton in-order tree sum
#   4. exact kNN timing (bench/bench_identity.py --gpu-knn, when that entry point exists)
#   5. the training step benchmark (bench/bench_training.py)
#   6. the device-fused pass on CUDA (bench/bench_decode_once.py --backend torch --device cuda): every
#      table against the separate stages (nvjpeg's pixels vs Pillow's for expressions and image scores)
# Prepare .gpu/ on the development machine first (bench/gpu_prepare.sh) and carry it; logs and
# JSON results go to $OUT (or bench/results/gpu-check/). Each step has its own time limit; a
# failing step is reported and the next one runs. Figures are printed as soon as they are measured.
#   bash bench/gpu_check.sh                               # on the GPU machine
#   bash bench/gpu_check.sh --device cpu --images 40      # here: step 2 only, on CPU, to test the script
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda IMAGES=1024
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--images N]" >&2; exit 2 ;;
  esac
done
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
if [ "$DEVICE" = cpu ]; then  # the stage step alone, small: checks the script and the path, not a GPU figure
  step stage 600 "$PY" bench/bench_dlib_torch.py stage --device cpu --images "$IMAGES" --batch 8 --repeats 1 \
    --decode-workers 2 --photos-dir "${TMPDIR:-/tmp}/lineup-gpu-check-photos" --out "$OUTDIR/stage.json"
  echo "=== summary"; echo "stage (cpu): ${RC[stage]}"; exit "${RC[stage]}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUTDIR/gpu.txt"
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA: nothing to check"; exit 1; }

# limits: 90 + 150 + 45 + 60 + 90 + 40 s, plus unpacking: under 8 minutes
step parity 90 "$PY" bench/bench_dlib_torch.py parity --device cuda
step stage 150 "$PY" bench/bench_dlib_torch.py stage --device cuda --images "$IMAGES" --batch 256 --repeats 3 \
  --decode-workers 16 --photos-dir "${TMPDIR:-/tmp}/lineup-gpu-check-photos" --out "$OUTDIR/stage.json"
step landmarks 45 "$PY" bench/bench_shape_predictor_torch.py device --device cuda --faces 4000 --repeats 3
cp bench/results/shape-predictor-device-*.json "$OUTDIR/" 2>/dev/null
if grep -q -- "--gpu-knn" bench/bench_identity.py 2>/dev/null; then
  step knn 60 "$PY" bench/bench_identity.py --gpu-knn
else
  echo "=== knn: skipped (bench/bench_identity.py has no --gpu-knn entry point yet)"; RC[knn]=skipped
fi
step training 90 "$PY" bench/bench_training.py --device cuda --time-budget-s 60 --out "$OUTDIR/training.json"
step fused 40 "$PY" bench/bench_decode_once.py --backend torch --device cuda --copies 1 --json "$OUTDIR/fused.json"

echo "=== summary"; for k in parity stage landmarks knn training fused; do echo "$k: ${RC[$k]:-not run}"; done
