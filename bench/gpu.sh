#!/usr/bin/env bash
# One GPU, sized for <= 8 minutes: step img/s and peak memory of Fast-MoCo, MoCo v3, MoCo v2 at ResNet-50 / 224 px /
# bf16 / channels_last, the Fast-MoCo / MoCo v3 ratio, torch.compile on/off, LARS loop vs foreach, and the loader's
# img/s with the CPU pipeline and with --augment-on device at this machine's core count (bench/gpu.py).
# Usage: bash bench/gpu.sh [more bench/gpu.py options]. Not yet run on a GPU (the first lent GPU, 2026-12-04, ran
# bench/device_check.sh, which measured this script's step and loader rows; its compile and LARS rows are open).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m bench.gpu --device cuda "$@"
