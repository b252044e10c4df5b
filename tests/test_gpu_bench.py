"""bench/gpu.py (bench/gpu.sh's measurement): its CPU smoke mode prints the tables; its foreach LARS is
fastmoco.LARS."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmoco as fm

ROOT = Path(__file__).resolve().parents[1]


def test_foreach_lars_equals_the_loop():
    """Five steps on a model with 1-D and n-D parameters, one of them with no gradient and one all zero (the trust
    ratio's guards): the same parameters and momentum buffers as fastmoco.LARS."""
    from bench.gpu import ForeachLARS

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        net[2].bias.requires_grad_(False)
        torch.nn.init.zeros_(net[2].weight)
    opts = [fm.LARS(nets[0].parameters(), lr=0.5, weight_decay=1e-2),
            ForeachLARS(nets[1].parameters(), lr=0.5, weight_decay=1e-2)]
    for s in range(5):
        grads = [torch.randn_like(p) for p in nets[0].parameters()]
        for net, opt in zip(nets, opts):
            for p, g in zip(net.parameters(), grads):
                p.grad = None if not p.requires_grad else g.clone()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.equal(nets[0][0].weight, nets[1][0].weight * 0)


@pytest.mark.slow
def test_gpu_bench_quick_mode_prints_its_tables():
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick", "--compile-backend", "eager", "--workers", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    heads = [line for line in p.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert heads[0] == "| method | torch.compile | step_ms | img/s | peak_MiB |"
    assert [h.split(" | ")[0:2] for h in heads[1:5]] == [["| fastmoco", "off"], ["| mocov3", "off"],
                                                         ["| mocov2", "off"], ["| fastmoco", "eager"]]
    assert "Fast-MoCo / MoCo v3 step time:" in p.stdout and "| ForeachLARS | " in p.stdout
    assert "| --augment-on device workers | 1 | " in p.stdout
    assert "| CPU pipeline (data.augmentations) | 1 |" in p.stdout
    assert "device side of --augment-on device (cpu)" in p.stdout


@pytest.mark.slow
def test_gpu_bench_without_cuda_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    p = subprocess.run([sys.executable, "-m", "bench.gpu"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1 and "--quick" in p.stderr.strip().splitlines()[-1]


def test_the_suite_hides_cuda_from_itself_and_its_subprocesses():
    """On a CUDA machine too, every test and subprocess runs on the CPU (conftest.py): the bit-exact tests hold."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "0"


@pytest.mark.slow
def test_device_check_quick_mode_runs_every_part(labelled, tmp_path):
    """bench/device_check.py's CPU smoke run: the SIGKILL + resume rows are bit-exact on the CPU, every row ok; the
    CIFAR-10 part runs its three pretrain.py runs side by side on the demo images (labelled parquet)."""
    p = subprocess.run([sys.executable, "-m", "bench.device_check", "--quick", "--data", str(labelled), "--out",
                        str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [r for r in p.stdout.split("\n\n")[-2].splitlines()[2:]]
    assert all(r.endswith("| ok |") for r in rows), rows
    resumed = [r for r in rows if "SIGKILL + resume" in r]
    assert len(resumed) == 2 and all("weights off by 0.0e+00" in r and "NOT killed" not in r for r in resumed)
    assert any(r.startswith("| step fastmoco resnet18") for r in rows)
    assert any(r.startswith("| loader: --augment-on device workers") for r in rows)
    assert any(r.startswith("| CIFAR-10 kNN at epoch 2 of 2 | fastmoco ") for r in rows), rows


def test_device_check_fails_loudly(monkeypatch, tmp_path):
    """No CUDA, or no data, is one line and exit 1; a part that raises is a FAIL row and exit 1, the others still run."""
    from typer.testing import CliRunner

    from bench import device_check as dc

    result = CliRunner().invoke(dc.app, ["--out", str(tmp_path)])
    assert result.exit_code == 1 and "no CUDA device here" in result.output
    monkeypatch.setattr(dc.torch.cuda, "is_available", lambda: True)
    result = CliRunner().invoke(dc.app, ["--data", str(tmp_path / "absent"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "holds no CIFAR-10 parquet files" in result.output

    def broken(*a):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(dc, "smoke_rows", broken)
    monkeypatch.setattr(dc, "cifar_part", lambda *a: [])  # (a CIFAR-10 folder may be there: not run here)
    monkeypatch.setattr(dc, "step_rows", lambda *a: [dict(check="step", result="1 ms", seconds="-", ok="ok")])
    monkeypatch.setattr(dc, "loader_rows", lambda *a: [dict(pipeline="cpu", workers=0, **{"img/s": "1"})])
    result = CliRunner().invoke(dc.app, ["--quick", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "| (a part of the check) | RuntimeError: CUDA error: out of memory | - | FAIL |" in result.output
    assert "| step | 1 ms | - | ok |" in result.output and (tmp_path / "table.md").is_file()
