#!/usr/bin/env bash
# Issue 13's open device checks on a GPU machine without internet, from the repo root:
#   bash ../shared/gpu/fetch-wheels.sh       # here, once: open_clip, webdataset, zarr, ... as wheels in .whl/
#   bash benchmarks/gpu_run.sh OUT_DIR [FASHION_MNIST_DIR]
# 1. teacher_mfu.py: the bf16 ViT-L-14 forward's kernel-time profile, each attention path, torch.compile per mode
#    (OUT_DIR/teacher-mfu-cuda.json), cut off after MFU_SECONDS (default 330) so step 2 still runs;
# 2. speed.py: stage one, then stage two's four runs at 300 steps, compiled included (OUT_DIR/speed-cuda-300.json).
# Each JSON is rewritten after every section, so a run cut short keeps what it measured.
# The full speed run is `python3 benchmarks/speed.py --device cuda` (a copy of part of Fashion-MNIST will do).
set -euo pipefail
out=${1:?usage: gpu_run.sh OUT_DIR [FASHION_MNIST_DIR]}
fmnist=${2:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
site="${TMPDIR:-/tmp}/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())"
timeout "${MFU_SECONDS:-330}" python3 benchmarks/teacher_mfu.py --out "$out/teacher-mfu-cuda.json" \
    2> "$out/teacher-mfu-cuda.log" || echo "teacher_mfu.py stopped (exit $?): see $out/teacher-mfu-cuda.log"
python3 benchmarks/speed.py --device cuda --fmnist "$fmnist" --steps 300 --skip teacher_forward \
    --skip stage_one_jpeg --out "$out/speed-cuda-300.json" 2> "$out/speed-cuda-300.log"
