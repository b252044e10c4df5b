"""Step cost: Fast-MoCo vs MoCo v3 under the same recipe (backbone, batch, image size, precision), and each step vs its
floor (the bare backbone work: online forward+backward on the views / patches + target forward), all in one run.

    python -m bench.step_cost                                             # CPU: ResNet-18, 224 px, batch 16
    python -m bench.step_cost --device cuda --arch resnet50 --batch-size 64 --steps 100   # one GPU (see README)

Timed round-robin, median of --steps calls each, on one fixed batch (the loader is bench/data_pipeline.py). Goals
(issue 6): Fast-MoCo / MoCo v3 <= 1.05 (the paper: 38.5 h / 36 h = 1.07); step / floor <= 1.15.
"""

import os
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

if not __package__:  # run as a file (python bench/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved, markdown, setup

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
COLUMNS = ["method", "step_ms", "floor_ms", "step/floor", "img/s", "ema_ms", "opt.step_ms", "divide+combine_ms"]


@app.command()
def main(
    arch: Annotated[str, typer.Option(help="torchvision ResNet (the paper: resnet50).")] = "resnet18",
    image_size: Annotated[int, typer.Option(help="View size (the paper: 224; patches are half of it).")] = 224,
    batch_size: Annotated[int, typer.Option(help="Images per step (per device).")] = 16,
    steps: Annotated[int, typer.Option(help="Timed steps per method (median).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = 2,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16.")] = "bf16",
    channels_last: Annotated[bool, typer.Option(help="channels_last (pretrain.py's default except fp32 on CPU).")
                             ] = True,
    small_stem: Annotated[bool, typer.Option(help="CIFAR-style stem (for 32-64 px).")] = False,
    recipe: Annotated[str, typer.Option(help="imagenet or small: each method's optimizer, clip, tau.")] = "imagenet",
    threads: Annotated[int, typer.Option(help="CPU threads (0 = torch's default: one per core).")] = 0,
):
    """Print a table: median step time of each method, its floor, their ratio, and a breakdown of the small parts."""
    if threads:
        torch.set_num_threads(threads)
    methods = {m: setup(m, arch, image_size, batch_size, device, mixed_precision, channels_last, small_stem,
                      recipe)
               for m in ("fastmoco", "mocov3")}
    fns = {f"{m}.{what}": fn for m, (step, floor, _) in methods.items() for what, fn in (("step", step),
                                                                                          ("floor", floor))}
    fns.update({f"{m}.{p}": fn for m, (_, _, parts) in methods.items() for p, fn in parts.items()})
    t = interleaved(fns, steps, warmup, device)
    rows = [{"method": m, "step_ms": f"{1e3 * t[m + '.step']:.1f}", "floor_ms": f"{1e3 * t[m + '.floor']:.1f}",
             "step/floor": f"{t[m + '.step'] / t[m + '.floor']:.3f}", "img/s": f"{batch_size / t[m + '.step']:.1f}",
             **{f"{p}_ms": f"{1e3 * t[f'{m}.{p}']:.2f}" if f"{m}.{p}" in t else "-"
                for p in ("ema", "opt.step", "divide+combine")}} for m in methods]
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"{arch}, {image_size} px, batch {batch_size}, {device}, {mixed_precision}, channels_last={channels_last}, "
          f"{torch.get_num_threads()} threads, median of {steps} interleaved steps{load}\n")
    print(markdown(COLUMNS, rows))
    print(f"\nFast-MoCo / MoCo v3 step time: {t['fastmoco.step'] / t['mocov3.step']:.3f} (goal <= 1.05); "
          f"floors: {t['fastmoco.floor'] / t['mocov3.floor']:.3f}")


if __name__ == "__main__":
    app()
