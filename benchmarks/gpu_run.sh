#!/usr/bin/env bash
# The device check of issue 13 on a GPU machine without internet, from the repo root:
#   bash ../shared/gpu/fetch-wheels.sh       # here, once: open_clip, webdataset, zarr, ... as wheels in .whl/
#   bash benchmarks/gpu_run.sh OUT_DIR [FASHION_MNIST_DIR]   # there: writes OUT_DIR/speed-cuda.json and a log
# A copy of part of Fashion-MNIST will do (speed.py reads 4,000 + 2,000 training images).
set -euo pipefail
out=${1:?usage: gpu_run.sh OUT_DIR [FASHION_MNIST_DIR]}
fmnist=${2:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
site="${TMPDIR:-/tmp}/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())"
python3 benchmarks/speed.py --device cuda --fmnist "$fmnist" --out "$out/speed-cuda.json" 2> "$out/speed-cuda.log"
