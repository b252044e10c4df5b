"""A real `accelerate launch` with 2 CPU processes (gloo): gathered losses, gradients and the MoCo queue equal the
single-process result on the same global batch (the checks run inside tests/dist_check.py, on every process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method, port", [("fastmoco", 29631), ("mocov3", 29632), ("mocov2", 29633)])
def test_two_processes_equal_one(method, port):
    # ACCELERATE_USE_CPU=1 + --multi_gpu is what starts 2 gloo processes on CPU (--cpu alone starts one).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(ROOT / "tests" / "dist_check.py"), method]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    ok = [line for line in p.stdout.splitlines() if line.startswith("OK rank")]
    assert sorted(line.split()[2] for line in ok) == ["0", "1"], p.stdout  # both ranks ran and passed
