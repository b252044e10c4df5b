"""bench/ scripts run end to end in tiny configurations and print the tables the README quotes (never timed here)."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(script, *args):
    p = subprocess.run([sys.executable, "-m", f"bench.{script[:-3]}", *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def table(out: str):
    """(columns, rows as dicts) of the first markdown table in `out`."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    columns = split(lines[0])
    assert set(lines[1]) <= set("|-")
    return columns, [dict(zip(columns, split(line))) for line in lines[2:]]


@pytest.mark.slow
def test_step_cost_table():
    out = bench("step_cost.py", "--arch", "resnet18", "--image-size", 32, "--batch-size", 4, "--steps", 2,
                "--warmup", 0, "--threads", 1, "--mixed-precision", "no", "--no-channels-last")
    columns, rows = table(out)
    assert columns == ["method", "step_ms", "floor_ms", "step/floor", "img/s", "ema_ms", "opt.step_ms",
                       "divide+combine_ms"]
    assert [r["method"] for r in rows] == ["fastmoco", "mocov3"]
    for r in rows:  # the ratio column is the ratio of the two time columns
        assert abs(float(r["step/floor"]) - float(r["step_ms"]) / float(r["floor_ms"])) < 0.01 * float(r["step/floor"])
    assert rows[1]["divide+combine_ms"] == "-" and float(rows[0]["divide+combine_ms"]) > 0
    assert "Fast-MoCo / MoCo v3 step time:" in out


@pytest.mark.slow
def test_data_pipeline_table():
    out = bench("data_pipeline.py", "--images", 2, "--rounds", 1, "--size", 32, "--source-size", "96x64")
    columns, rows = table(out)
    assert columns == ["pipeline", "source", "img/s/core", "ms/img"]
    assert len(rows) == 8 and all(r["source"] == "96x64 JPEG" and float(r["img/s/core"]) > 0 for r in rows)
    assert any(r["pipeline"].startswith("data.Views, Fast-MoCo") for r in rows)
    assert any(r["pipeline"].startswith("data.Views, --augment-on device worker, MoCo v3 (73^2") for r in rows)


@pytest.mark.slow
def test_memory_table():
    out = bench("memory.py", "--arch", "resnet18", "--image-size", 32, "--batch-size", 4, "--steps", 1,
                "--mixed-precision", "no")
    columns, rows = table(out)
    assert columns == ["method", "before_MiB", "peak_MiB", "step_MiB"]
    assert [r["method"] for r in rows] == ["fastmoco", "mocov3"]
    for r in rows:
        assert int(r["peak_MiB"]) >= int(r["before_MiB"]) > 0
        assert abs(int(r["step_MiB"]) - (int(r["peak_MiB"]) - int(r["before_MiB"]))) <= 1  # each rounded to MiB


@pytest.mark.slow
def test_sample_efficiency_skips_without_data(tmp_path):
    out = bench("sample_efficiency.py", "--data", tmp_path / "no-cifar10", "--out", tmp_path / "out")
    assert out.startswith("skipped: no CIFAR-10 parquet files") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("size,kernel", [(224, 23), (37, 5)])
def test_separable_blur_matches_torchvision(size, kernel):
    """data.SeparableBlur (the fast blur of every augmentation) against torchvision's k x k blur: the same sigma draw
    (same RNG use), output equal up to float rounding, for PIL images and uint8 tensors."""
    from PIL import Image
    from torchvision.transforms import v2

    from data import SeparableBlur

    g = torch.Generator().manual_seed(0)
    for i in range(3):
        x = torch.randint(0, 256, (3, size, size + 8), dtype=torch.uint8, generator=g)
        x = (v2.functional.gaussian_blur(x, 9, 3.0) // 2 + x // 2)  # some smooth structure, some noise
        for inpt in (x, Image.fromarray(x.permute(1, 2, 0).numpy())):
            outs = []
            for blur in (v2.GaussianBlur(kernel, (0.1, 2.0)), SeparableBlur(kernel, (0.1, 2.0))):
                torch.manual_seed(i)
                y = blur(inpt)
                outs.append((torch.as_tensor(np.array(y)).permute(2, 0, 1) if isinstance(y, Image.Image) else y,
                             torch.rand(())))  # the next draw: the RNG was used alike
            (ref, r_ref), (got, r_got) = outs
            assert got.shape == ref.shape and got.dtype == ref.dtype and r_got == r_ref
            diff = (got.int() - ref.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
            assert not torch.equal(got, x)  # it did blur


def test_combine_weights_built_once_and_safe_after_inference_mode():
    """fastmoco.combine's weight matrix is cached per (P, k, device, dtype) -- no per-step CPU -> GPU copy (a host
    sync) -- and a first call under inference_mode does not poison later training calls."""
    import fastmoco as fm

    fm.combination_weights.cache_clear()
    f = torch.randn(4 * 3, 5, requires_grad=True)  # P=4 patches of N=3 images, D=5
    with torch.inference_mode():
        fm.combine(f.detach(), 4, 2)
    out = fm.combine(f, 4, 2)  # (6*3, 5), through the weights cached above
    out.sum().backward()  # would raise if the cached weights were an inference tensor
    assert fm.combination_weights(4, 2, f.device, f.dtype) is fm.combination_weights(4, 2, f.device, f.dtype)
    assert fm.combination_weights.cache_info().misses == 1
    ref = torch.cat([f.view(4, 3, 5)[list(s)].mean(0) for s in itertools.combinations(range(4), 2)])  # (6*3, 5)
    assert torch.allclose(out, ref)
    assert torch.allclose(f.grad, torch.full_like(f, 1.5))  # each patch is in 3 of the 6 pairs, with weight 1/2
