#!/usr/bin/env bash
# Run HERE, on a machine with pip access, before bench/device_check.sh runs on a lent GPU machine (which has torch,
# accelerate, typer, pyarrow, timm... but not `datasets`, `dill`, `multiprocess`, `pycocotools`, and no internet):
# their wheels (CPython 3.12, x86-64) into .whl/ and the CIFAR-10 parquet files into .data/cifar10. Both folders are
# git-ignored: name them in the device tool's `carry` (docs/benchmarks.md). Usage: bash bench/device_prepare.sh [CIFAR-10]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10}
ls "$DATA"/train-*.parquet "$DATA"/test-*.parquet > /dev/null  # fails here, not on the GPU machine
rm -rf .whl .data/cifar10
mkdir -p .whl .data/cifar10
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pycocotools==2.0.11
cp "$DATA"/train-*.parquet "$DATA"/test-*.parquet .data/cifar10/
du -sh .whl .data
