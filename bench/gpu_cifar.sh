#!/usr/bin/env bash
# Full CIFAR-10 (50,000 / 10,000 images, ResNet-18 CIFAR stem, 32 px, --recipe small) on one GPU, sized for <= 8 minutes
# on a current GPU: Fast-MoCo vs its Table 4b baseline (fastmoco --no-patches) vs MoCo v3 at equal epochs, one seed.
# Prints the kNN table and writes runs/gpu-cifar/knn.png. Usage: bash bench/gpu_cifar.sh [CIFAR-10 parquet folder]
# Not yet run on a GPU (none was lent to this project): the epoch count is an estimate, lower EPOCHS if it runs long.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10}
EPOCHS=${EPOCHS:-15}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m bench.small_data --data "$DATA" --runs claim --seeds 0 --train-images 50000 --test-images 10000 \
    --epochs "$EPOCHS" --batch-size 512 --knn-every 5 --workers "$(( $(nproc) - 1 ))" --mixed-precision bf16 \
    --out runs/gpu-cifar
