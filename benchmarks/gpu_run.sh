#!/usr/bin/env bash
# Issue 13's open device checks on a GPU machine without internet, from the repo root:
#   bash ../shared/gpu/fetch-wheels.sh       # here, once: open_clip, webdataset, zarr, ... as wheels in .whl/
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl pytest==9.0.3 \
#       pluggy==1.6.0 iniconfig==2.3.0 packaging==26.2 pygments==2.20.0 pytest-xdist==3.8.0 execnet==2.1.2  # render step
#   bash benchmarks/gpu_run.sh OUT_DIR [FASHION_MNIST_DIR [STEP ...]]
# Steps, in this order (default: all three; about 3 + 5 + 4 minutes on an H100):
#   render     tests/test_device_render.py on CUDA (views the GPU renders against the workers'), then speed.py with
#              a ViT-B-16 teacher, fast enough to outrun the workers: its bare forward, stage one, and the 500x375
#              JPEG source with teacher.render workers and device (OUT_DIR/speed-cuda-b16.json);
#   mfu        teacher_mfu.py: the bf16 ViT-L-14 forward's kernel-time profile, each attention path, torch.compile
#              per mode (OUT_DIR/teacher-mfu-cuda.json), cut off after MFU_SECONDS (default 300);
#   stage_two  speed.py: stage one, then stage two's four runs at 300 steps, compiled included
#              (OUT_DIR/speed-cuda-300.json).
# Each JSON is rewritten after every section, so a run cut short keeps what it measured.
# The full speed run is `python3 benchmarks/speed.py --device cuda` (a copy of part of Fashion-MNIST will do).
set -euo pipefail
out=${1:?usage: gpu_run.sh OUT_DIR [FASHION_MNIST_DIR [STEP ...]]}
fmnist=${2:-/usr/share/datasets/fashion-mnist}
steps=("${@:3}")
[ ${#steps[@]} -gt 0 ] || steps=(render mfu stage_two)
mkdir -p "$out"
site="${TMPDIR:-/tmp}/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fmnist=$(realpath -e "$fmnist")
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 DHO_FASHION_MNIST="$fmnist"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())"
for step in "${steps[@]}"; do
  case $step in
    render)
      python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"  # else the tests skip
      python3 -m pytest -q -p no:cacheprovider -n 0 -s tests/test_device_render.py -k cuda > "$out/test-device-render.log" 2>&1 \
        && echo "tests/test_device_render.py on CUDA: passed" || echo "tests/test_device_render.py on CUDA: FAILED (see $out/test-device-render.log)"
      grep -h "agreement" "$out/test-device-render.log" || true
      python3 benchmarks/speed.py --device cuda --fmnist "$fmnist" --teacher ViT-B-16 --skip stage_two \
        --out "$out/speed-cuda-b16.json" 2> "$out/speed-cuda-b16.log" > /dev/null || echo "speed.py (ViT-B-16) stopped: see $out/speed-cuda-b16.log" ;;
    mfu)
      timeout "${MFU_SECONDS:-300}" python3 benchmarks/teacher_mfu.py --out "$out/teacher-mfu-cuda.json" \
        2> "$out/teacher-mfu-cuda.log" > /dev/null || echo "teacher_mfu.py stopped (exit $?): see $out/teacher-mfu-cuda.log" ;;
    stage_two)
      python3 benchmarks/speed.py --device cuda --fmnist "$fmnist" --steps 300 --skip teacher_forward \
        --skip stage_one_jpeg --out "$out/speed-cuda-300.json" 2> "$out/speed-cuda-300.log" > /dev/null \
        || echo "speed.py (stage two) stopped: see $out/speed-cuda-300.log" ;;
    *) echo "unknown step '$step': render, mfu or stage_two" >&2; exit 2 ;;
  esac
done
