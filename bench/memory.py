"""Memory: peak memory of a training step, Fast-MoCo vs MoCo v3 (pretrain.py's step: bench/common.py).

    python -m bench.memory                                                # CPU: peak RSS, ResNet-18, batch 16
    python -m bench.memory --device cuda --arch resnet50 --batch-size 64  # one GPU: torch.cuda.max_memory_allocated

On CUDA the numbers are the allocator's (tensors only); on CPU each method runs in its own process and the numbers
are resident memory (ru_maxrss, the process's high-water mark), which includes the Python / torch runtime.
"""

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

if not __package__:  # run as a file (python bench/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown, setup

ROOT = Path(__file__).resolve().parents[1]  # `python -m bench.memory` runs from here

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
COLUMNS = ["method", "before_MiB", "peak_MiB", "step_MiB"]
MiB = 2 ** 20


def rss() -> float:
    """Current resident memory of this process (Linux /proc), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(method, arch, image_size, batch, device, precision, steps) -> dict:
    """Memory once the models, optimizer and batch exist (before), the peak over `steps` steps, and the difference
    (what a step adds: activations, gradients, optimizer state)."""
    cuda = torch.device(device).type == "cuda"
    step, _, _ = setup(method, arch, image_size, batch, device, precision, channels_last=cuda or precision != "no")
    before = torch.cuda.memory_allocated() if cuda else rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "before_MiB": round(before / MiB), "peak_MiB": round(peak / MiB),
            "step_MiB": round((peak - before) / MiB)}


@app.command()
def main(
    arch: Annotated[str, typer.Option(help="torchvision ResNet (the paper: resnet50).")] = "resnet18",
    image_size: Annotated[int, typer.Option(help="View size.")] = 224,
    batch_size: Annotated[int, typer.Option(help="Images per step per device (the recipe: 512 over 8 GPUs = 64; "
                                                  "CPU default reduced to 16).")] = 16,
    steps: Annotated[int, typer.Option(help="Steps measured (the optimizer state appears at the first).")] = 2,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16.")] = "bf16",
    only: Annotated[Optional[str], typer.Option(hidden=True, help="Measure one method, print JSON (internal).")
                    ] = None,
):
    """Print a table of each method's memory before the first step, at its peak, and their difference."""
    args = dict(arch=arch, image_size=image_size, batch=batch_size, device=device, precision=mixed_precision,
                steps=steps)
    if only:
        print(json.dumps(measure(only, **args)))
        return
    rows = []
    for method in ("fastmoco", "mocov3"):
        if device == "cpu":  # a fresh process each: ru_maxrss is a high-water mark that never goes down
            flags = dict(arch=arch, image_size=image_size, batch_size=batch_size, steps=steps, device=device,
                         mixed_precision=mixed_precision)
            cmd = [sys.executable, "-m", "bench.memory", "--only", method] + [
                f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        else:
            torch.cuda.empty_cache()
            rows.append(measure(method, **args))
    what = "allocated tensors (torch.cuda)" if device != "cpu" else "resident memory of the process (RSS)"
    print(f"{arch}, {image_size} px, batch {batch_size}, {device}, {mixed_precision}, {what}, {steps} steps\n")
    print(markdown(COLUMNS, rows))


if __name__ == "__main__":
    app()
