#!/usr/bin/env bash
# Full CIFAR-10 (50,000 / 10,000 images, ResNet-18 CIFAR stem, 32 px, --recipe small) on one GPU: Fast-MoCo vs its
# Table 4b baseline (fastmoco --no-patches) vs MoCo v3 at equal epochs, one seed. Prints the kNN table and writes
# runs/gpu-cifar/knn.png. Usage: bash bench/gpu_cifar.sh [CIFAR-10 parquet folder, default .data/cifar10, which
# bench/device_prepare.sh fills]. Not yet run whole on a GPU. Sizing from the device check (one H200, 2026-12-04,
# bench/results/2026-12-04-h200-device-check.md): with three runs sharing 16 cores an epoch took ~23 s of training
# (loader-bound, ~2,200 img/s each) and each kNN ~20 s; one run at a time with 15 workers, EPOCHS=10 is estimated at
# ~8 minutes for the three runs.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-.data/cifar10}
EPOCHS=${EPOCHS:-10}
RUNS=${RUNS:-claim}  # or budget (Fast-MoCo at EPOCHS vs MoCo v3 at 1x, 2x, 4x), vit (both on a small ViT): docs/small-data.md
if ! ls "$DATA"/train-*.parquet > /dev/null 2>&1; then  # bench/small_data skips (exit 0) without data: not here
    echo "error: no CIFAR-10 parquet files in $DATA: run bench/device_prepare.sh (and carry .data), or pass the folder"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m bench.small_data --data "$DATA" --runs "$RUNS" --seeds 0 --train-images 50000 --test-images 10000 \
    --epochs "$EPOCHS" --batch-size 512 --knn-every 5 --workers "$(( $(nproc) - 1 ))" --mixed-precision bf16 \
    --out runs/gpu-cifar
