"""A real `accelerate launch` with 2 CPU processes (gloo): gathered losses, gradients and the MoCo queue equal the
single-process result on the same global batch (the checks run inside tests/dist_check.py, on every process)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two processes under accelerate launch


@pytest.mark.parametrize("method, port", [("fastmoco", 29631), ("mocov3", 29632), ("mocov2", 29633)])
def test_two_processes_equal_one(method, port):
    # ACCELERATE_USE_CPU=1 + --multi_gpu is what starts 2 gloo processes on CPU (--cpu alone starts one).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(ROOT / "tests" / "dist_check.py"), method]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    # the two ranks share one pipe, so their lines can interleave: find the ranks anywhere in it
    assert sorted(re.findall(r"OK rank (\d+)", p.stdout)) == ["0", "1"], p.stdout  # both ranks ran and passed


@pytest.mark.parametrize("method, port", [("fastmoco", 29641), ("mocov2", 29642)])
def test_pretrain_on_two_processes(tmp_path, method, port):
    """`accelerate launch pretrain.py` on 2 CPU processes: DDP, per-process shares of each global batch, shuffle-BN
    and --warm-queue for MoCo v2, kNN features gathered from both processes, one checkpoint written by the main
    process."""
    import datasets

    from data import demo_dataset

    d = tmp_path / "data"
    demo_dataset("train").select(range(32)).to_parquet(str(d / "train-0.parquet"))
    demo_dataset("test").select(range(10)).to_parquet(str(d / "test-0.parquet"))
    assert len(datasets.load_dataset("parquet", data_dir=str(d), split="train")) == 32
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(ROOT / "pretrain.py"), "--data", str(d), "--method", method, "--arch", "resnet18",
           "--image-size", "32", "--no-small-stem", "--batch-size", "8", "--epochs", "1", "--queue-size", "16",
           "--knn-every", "1", "--workers", "0", "--log-every", "1", "--no-tensorboard", "--output-dir", str(tmp_path),
           *(["--warm-queue"] if method == "mocov2" else [])]  # MoCo v2: 2 steps fill the queue, then 2 updates
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    import checkpoints as ck

    _, meta = ck.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert meta["world_size"] == 2 and meta["step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one log line per step: only rank 0 writes
    assert [r["step"] for r in rows if "knn_top1" in r] == [0, 4]
