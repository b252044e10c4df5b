"""Shared fixtures of the evaluation-stage tests: small labelled parquet data and one tiny pretrain.py checkpoint per
method, made once per session. And the two tiers: tests marked `slow` (subprocess runs of the stage scripts, SIGKILL,
two processes, loss-decreases) are skipped unless pytest gets --slow, or an -m expression that chooses for itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The suite checks the project's logic, bit for bit, on the CPU of any machine. A visible GPU would let Accelerate
# and every subprocess run pick CUDA: non-deterministic cuDNN under the bit-exact resume tests, and CPU-only refusals
# (bf16 on 1x1 maps) that CUDA does not make. Hidden here, before anything initialises CUDA; the CUDA paths are
# checked by bench/device_check.sh.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
METHODS = ("fastmoco", "mocov3", "mocov2", "mocov1")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the slow tier too (subprocesses, SIGKILL, two "
                     "processes, loss-decreases): the whole suite, as CI runs it")


def pytest_collection_modifyitems(config, items):
    """Skipped, not deselected: a run of a file holding only slow tests still collects them (exit 0, not 5)."""
    if config.getoption("--slow") or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow tier: add --slow to run it")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


def stage(script, *args, check=True, timeout=600):
    """python SCRIPT ARGS for a stage script at the repository root, python -m transfer.NAME ARGS for
    transfer/NAME.py (run from the root) -> CompletedProcess."""
    where = ["-m", script[:-3].replace("/", ".")] if "/" in script else [str(ROOT / script)]
    cmd = [sys.executable, *where, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"})
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def labelled(tmp_path_factory):
    """A Hugging Face style folder: train-*.parquet (48 demo images) and test-*.parquet (20), columns image, label."""
    from data import demo_dataset

    d = tmp_path_factory.mktemp("labelled")
    demo_dataset("train").select(range(48)).to_parquet(str(d / "train-00000-of-00001.parquet"))
    demo_dataset("test").select(range(20)).to_parquet(str(d / "test-00000-of-00001.parquet"))
    return d


@pytest.fixture(scope="session")
def parquet(labelled):
    """The same folder under the name the pretraining tests use."""
    return labelled


@pytest.fixture(scope="session")
def pretrained(labelled, tmp_path_factory):
    """{method: checkpoint} of one pretrain.py step each (resnet18, standard stem, 32 px), the four runs at once."""
    runs = {}
    for method in METHODS:
        d = tmp_path_factory.mktemp(method)
        cmd = [sys.executable, str(ROOT / "pretrain.py"), "--data", str(labelled), "--method", method, "--arch",
               "resnet18", "--image-size", "32", "--no-small-stem", "--batch-size", "8", "--queue-size", "16",
               "--max-steps", "1", "--workers", "0", "--no-tensorboard", "--output-dir", str(d)]
        runs[method] = d, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no",
                                                "OMP_NUM_THREADS": "1"})
    for method, (d, p) in runs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"pretrain.py {method} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return {method: d / "ckpt.safetensors" for method, (d, _) in runs.items()}


def call(module, *args, **options):
    """module.main(*args, **options) in this process (typer leaves `main` a plain function): no interpreter start-up
    per run. A one-line error comes back as SystemExit."""
    return module.main(*args, **options)
