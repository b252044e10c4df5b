#!/usr/bin/env bash
# The first check on a lent NVIDIA GPU (H100/H200): <= 9 min wall with setup, one table (bench/device_check.py).
# Prepare here first (bash bench/device_prepare.sh: wheels in .whl/, CIFAR-10 in .data/cifar10), then run this on the
# GPU machine with both folders carried; docs/benchmarks.md gives the exact call. Extra options go to device_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3  # the only Python such a machine promises
if [ -d .whl ]; then  # what the machine's image lacks, installed beside it (nothing can be fetched there)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import datasets, accelerate, typer, safetensors" || { echo "error: a package is missing: run bench/device_prepare.sh here and carry .whl"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
LOG=${OUT:-runs}/device_check.log
mkdir -p "$(dirname "$LOG")"
PYTHONUNBUFFERED=1 timeout 540 $PY -m bench.device_check "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
[ -n "${OUT:-}" ] && cp runs/device-check/table.md runs/device-check/fast-tier.log "$OUT"/ 2>/dev/null  # the default --out
exit "$rc"
