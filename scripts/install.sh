#!/usr/bin/env bash
# Install what a fresh machine lacks: the Fashion-MNIST package (demo and tests), torch, and dho itself.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -e "$FMNIST" ] && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || echo "warning: could not install dataset-fashion-mnist; the demo and tests need it" >&2
fi

# torch + torchvision as a matching pair (a mismatched torchvision fails at import); newer pairs work too.
if ! python -c "import torch, torchvision" 2>/dev/null; then
    python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
python -m pip install -q -e ".[dev]"
