"""One-GPU measurement (issue 13), sized for <= 8 minutes: step img/s and peak memory of Fast-MoCo, MoCo v3 and MoCo v2
at ResNet-50 / 224 px / bf16 / channels_last (synthetic inputs), the Fast-MoCo / MoCo v3 step ratio, torch.compile
on/off for the Fast-MoCo step, a LARS step (fastmoco.LARS's per-parameter loop vs a torch._foreach_* version), and
the DataLoader's img/s with the CPU pipeline and with --augment-on device's workers at the machine's core count, plus
the device side of --augment-on device.

    bash bench/gpu.sh                 # one GPU: python -m bench.gpu --device cuda
    python -m bench.gpu --quick       # CPU smoke run: ResNet-18, 32 px, a few steps (what the tests run)
"""

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

if not __package__:  # run as a file (python bench/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastmoco as fm
import gpu_augment
from bench.common import interleaved, markdown, setup
from bench.data_pipeline import Files, jpegs
from data import Views, augmentations

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


class ForeachLARS(fm.LARS):
    """fastmoco.LARS with the per-parameter Python loop replaced by torch._foreach_* calls over all tensors at once
    (a few kernels per step instead of ~10 per tensor); the same update (tests/test_gpu_bench.py)."""

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            mats = [p.ndim > 1 for p in ps]
            d = [p.grad.add(p, alpha=g["weight_decay"]) if m else p.grad for p, m in zip(ps, mats)]
            wide = [i for i, m in enumerate(mats) if m]  # 1-D tensors (biases, BN) get no trust ratio
            if wide:
                pn = torch._foreach_norm([ps[i] for i in wide])
                dn = torch._foreach_norm([d[i] for i in wide])
                for i, a, b in zip(wide, pn, dn):
                    r = g["trust_coefficient"] * a / b
                    d[i] = d[i] * torch.where((a > 0) & (b > 0), r, torch.ones_like(r))
            mu = [self.state[p].setdefault("mu", torch.zeros_like(p)) for p in ps]
            torch._foreach_mul_(mu, g["momentum"])
            torch._foreach_add_(mu, d)
            torch._foreach_add_(ps, mu, alpha=-g["lr"])


def step_rows(arch, size, batch, device, precision, steps, warmup, compile_backend) -> list:
    """Per method: median step time, img/s, peak memory; and the Fast-MoCo step under torch.compile."""
    cuda = torch.device(device).type == "cuda"
    rows = []
    for method, backend in [("fastmoco", None), ("mocov3", None), ("mocov2", None), ("fastmoco", compile_backend)]:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = setup(method, arch, size, batch, device, precision, channels_last=True,
                     compile_backend=backend)[0]  # only `step` holds the model: `del step` frees it before the next
        t = interleaved({"step": step}, steps, warmup + (2 if backend else 0), device)["step"]
        rows.append({"method": method, "torch.compile": backend or "off", "step_ms": f"{1e3 * t:.1f}",
                     "img/s": f"{batch / t:.1f}",
                     "peak_MiB": f"{torch.cuda.max_memory_allocated() / 2 ** 20:.0f}" if cuda else "-"})
        del step
    return rows


def lars_rows(arch, device, steps) -> list:
    """Optimizer step time of LARS over `arch`'s online model (random gradients), loop vs foreach."""
    model = fm.OnlineEncoder("mocov3", arch, False).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {"fastmoco.LARS (loop)": fm.LARS(model.parameters(), lr=0.1, weight_decay=1e-6),
            "ForeachLARS": ForeachLARS(model.parameters(), lr=0.1, weight_decay=1e-6)}
    t = interleaved({n: o.step for n, o in opts.items()}, steps, 2, device)
    return [{"optimizer": n, "tensors": len(list(model.parameters())), "step_ms": f"{1e3 * v:.2f}"}
            for n, v in t.items()]


def loader_rows(size, source, images, workers, batch, device, batches) -> list:
    """img/s of a DataLoader (W workers) over synthetic JPEGs: the CPU pipeline vs --augment-on device's workers, and
    the batched device augmentation alone (both views)."""
    w, h = map(int, source.split("x"))
    files = Files(jpegs(images, w, h))
    on_dev = gpu_augment.DeviceViews(augmentations("fastmoco", size), 16 * size // 7)
    rows = []
    for name, transforms in [("CPU pipeline (data.augmentations)", augmentations("fastmoco", size)),
                             ("--augment-on device workers", on_dev.worker)]:
        keys = [[(0, (i * batch + j) % images) for j in range(batch)] for i in range(batches + 2)]
        loader = torch.utils.data.DataLoader(Views(files, "image", transforms, 0), batch_sampler=keys,
                                             num_workers=workers, pin_memory=device != "cpu",
                                             prefetch_factor=4 if workers else None)
        it = iter(loader)
        for _ in range(2):  # workers started, first batches in flight
            last = next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            last = next(it)
        rate = batches * batch / (time.perf_counter() - t0)
        rows.append({"pipeline": name, "workers": workers, "img/s": f"{rate:.1f}"})
    t = interleaved({"aug": lambda: on_dev(last[:-1], device)}, 5, 2, device)["aug"]
    rows.append({"pipeline": f"device side of --augment-on device ({device})", "workers": "-",
                 "img/s": f"{batch / t:.1f}"})
    return rows


@app.command()
def main(
    quick: Annotated[bool, typer.Option(help="CPU smoke run: ResNet-18, 32 px, batch 4, 2 steps, tiny loader.")
                     ] = False,
    device: Annotated[str, typer.Option(help="cuda or cpu.")] = "cuda",
    arch: Annotated[str, typer.Option(help="torchvision ResNet (the paper: resnet50).")] = "resnet50",
    image_size: Annotated[int, typer.Option(help="View size.")] = 224,
    batch_size: Annotated[int, typer.Option(help="Images per step on the one device.")] = 128,
    steps: Annotated[int, typer.Option(help="Timed steps per method (median).")] = 20,
    compile_backend: Annotated[str, typer.Option(help="torch.compile backend of the compiled Fast-MoCo step.")
                               ] = "inductor",
    workers: Annotated[Optional[int], typer.Option(help="Loader workers (default: every core).")] = None,
):
    """Print the tables: steps per method, LARS, loader."""
    if quick:
        device, arch, image_size, batch_size, steps = "cpu", "resnet18", 32, 4, 2
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here: run on a GPU machine, or pass --quick (or --device cpu)")
    workers = (os.cpu_count() or 1) if workers is None else workers
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {os.cpu_count()} cores; {arch}, {image_size} px, batch {batch_size}, "
          f"bf16, channels_last, synthetic inputs, median of {steps} steps\n")
    rows = step_rows(arch, image_size, batch_size, device, "bf16", steps, 1 if quick else 3, compile_backend)
    print(markdown(["method", "torch.compile", "step_ms", "img/s", "peak_MiB"], rows))
    ms = {(r["method"], r["torch.compile"]): float(r["step_ms"]) for r in rows}
    print(f"\nFast-MoCo / MoCo v3 step time: {ms['fastmoco', 'off'] / ms['mocov3', 'off']:.3f}; torch.compile "
          f"({compile_backend}) / eager, Fast-MoCo: {ms['fastmoco', compile_backend] / ms['fastmoco', 'off']:.3f}\n")
    print(markdown(["optimizer", "tensors", "step_ms"], lars_rows(arch, device, steps)))
    print()
    print(markdown(["pipeline", "workers", "img/s"],
                   loader_rows(image_size, "96x64" if quick else "500x375", 8 if quick else 256, workers,
                               batch_size, device, 2 if quick else 20)))


if __name__ == "__main__":
    app()
