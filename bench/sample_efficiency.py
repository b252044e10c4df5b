"""Sample efficiency on real CIFAR-10: Fast-MoCo vs MoCo v3 at equal epochs, and MoCo v3 at 2x the epochs.

    python -m bench.sample_efficiency                                   # CPU scale (~15 min on 2 idle cores)
    python -m bench.sample_efficiency --train-images 50000 --test-images 10000 --epochs 200 --batch-size 512 \
        --workers 8 --threads 0                                         # full scale, one GPU (see README)

Each run is `python pretrain.py` in a subprocess (ResNet-18, small stem, 32 px) on a seeded subset of the parquet
files; then this script scores each checkpoint (and the 2E run's checkpoint at epoch E) by kNN top-1 as pretrain.py's
monitor does (k=200, t=0.1; bank = the training subset's clean views, queries = the test subset's). The paper's claim
(Fast-MoCo Table 4b): at equal epochs Fast-MoCo beats MoCo v3, roughly matching MoCo v3 at several times the epochs.
Skips (exit 0) when the data folder is absent: users do not have it, nothing here depends on it.
"""

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

if not __package__:  # run as a file (python bench/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints as ck
import fastmoco as fm
import knn
from data import clean_transform

ROOT = Path(__file__).resolve().parents[1]

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
COLUMNS = ["run", "method", "epochs", "steps", "kNN@E", "kNN@2E", "train_s", "img/s", "seed"]


def subset(src: Path, dst: Path, split: str, n: int, seed: int):
    """Write the first n images of a seeded permutation of src's `split` parquet as dst/split-00000-of-00001.parquet."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(src.glob(f"{split}-*.parquet")))
    n = min(n, table.num_rows)
    idx = np.random.default_rng(seed).permutation(table.num_rows)[:n]
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(idx), dst / f"{split}-00000-of-00001.parquet")
    return n


def clean_views(folder: Path, split: str):
    """(images (n, 3, 32, 32) clean views, labels (n,)) of a subset parquet, decoded once for every evaluation."""
    import pyarrow.parquet as pq
    from PIL import Image

    t = clean_transform(32)
    table = pq.read_table(folder / f"{split}-00000-of-00001.parquet").to_pydict()
    x = torch.stack([t(Image.open(io.BytesIO(im["bytes"])).convert("RGB")) for im in table["image"]])
    return x, torch.tensor(table["label"])


@torch.no_grad()
def knn_top1(backbone, bank, queries, precision: str, batch=500) -> float:
    """kNN top-1 (k=200, t=0.1, as pretrain.py's monitor) of `backbone`: bank = train subset, queries = test subset."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    backbone.eval().to(dev, memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def feats(x):  # (n, 512) on the CPU
        with torch.autocast(dev, dtype or torch.float32, enabled=dtype is not None):
            return torch.cat([backbone(b.to(dev, memory_format=torch.channels_last)).float().cpu()
                              for b in x.split(batch)])

    (xb, yb), (xq, yq) = bank, queries
    pred = knn.knn_predict(knn.normalized(feats(xq), torch.float32), knn.normalized(feats(xb), torch.float32), yb,
                           int(yb.max()) + 1)
    return 100.0 * (pred == yq).float().mean().item()


@torch.no_grad()
def initial_backbone(seed: int, bank, precision: str, batch=500):
    """Every run's initial backbone (pretrain.py seeds, then builds the backbone first), with its BN running statistics
    estimated on the bank images: with BN's defaults (mean 0, var 1) the random-feature baseline would look worse than
    it is, and any training step would seem to help just by updating them."""
    torch.manual_seed(seed)
    net = fm.resnet("resnet18", small_stem=True)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
        for b in bank[0].split(batch):
            net(b)
    return net


def backbone_from(ckpt: Path):
    """The online ResNet-18 (small stem) of a pretrain.py checkpoint, loaded strictly."""
    net = fm.resnet("resnet18", small_stem=True)
    net.load_state_dict(ck.prefixed(ck.load_checkpoint(ckpt)[0], "backbone."))
    return net


def pretrain(out: Path, data: Path, method: str, epochs: int, save_every: int, common: list, threads: int) -> float:
    """One pretrain.py run; returns its wall seconds (0 if a finished run in `out` is reused)."""
    if (out / "ckpt.safetensors").exists():
        return 0.0  # finished earlier (e.g. an interrupted benchmark started again): reuse it
    for f in out.glob("*.*"):  # a half-finished run starts again from scratch: its log would mix two runs
        f.unlink()
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--data", str(data), "--method", method, "--epochs", str(epochs),
           "--save-every", str(save_every), "--output-dir", str(out), *common]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode:
        raise SystemExit(f"error: pretrain.py failed ({method}, {epochs} epochs):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def table(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows])


@app.command()
def main(
    data: Annotated[Path, typer.Option(help="Folder with CIFAR-10 train-*/test-*.parquet (image, label).")] = (
        ROOT.parent / "shared/data/cifar10"),
    train_images: Annotated[int, typer.Option(help="Seeded subset of the train split (pretraining + kNN bank).")] = 2000,
    test_images: Annotated[int, typer.Option(help="Seeded subset of the test split (kNN queries).")] = 1000,
    epochs: Annotated[int, typer.Option(help="E: Fast-MoCo and MoCo v3 train E epochs, the second MoCo v3 2E.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Global batch, the same for every run.")] = 64,
    warmup_epochs: Annotated[int, typer.Option(help="lr warmup, the same for every run (MoCo v3's recipe: 10 "
                                                    "of its 100+ epochs; Fast-MoCo's: 1).")] = 1,
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (bf16 is ~3x faster than fp32 on an "
                                                      "AVX-512 CPU).")] = "bf16",
    workers: Annotated[int, typer.Option(help="DataLoader workers of each run.")] = 1,
    threads: Annotated[int, typer.Option(help="torch threads per run (0 = one per core). On a shared machine 1 "
                                              "is ~4x faster than 2: idle threads spin at every barrier.")] = 1,
    seed: Annotated[int, typer.Option(help="Seeds the subsets and every run (init, data order, augmentation).")] = 0,
    out: Annotated[Path, typer.Option(help="Subsets, runs (one folder per configuration) and CONFIGURATION.md go "
                                           "here; a finished run of the same configuration is reused.")] = (
        ROOT / "bench/results/sample_efficiency"),
):
    """Fast-MoCo vs MoCo v3 (equal epochs) and MoCo v3 (2x epochs): kNN top-1 on the CIFAR-10 test split."""
    if not any(data.glob("train-*.parquet")) or not any(data.glob("test-*.parquet")):
        print(f"skipped: no CIFAR-10 parquet files (train-*/test-*.parquet) in {data}; pass --data FOLDER")
        raise typer.Exit(0)
    if threads:
        torch.set_num_threads(threads)
    config = f"n{train_images}-q{test_images}-E{epochs}-b{batch_size}-w{warmup_epochs}-{mixed_precision}-seed{seed}"
    sub = out / f"cifar10-{train_images}-{test_images}-seed{seed}"
    n = subset(data, sub, "train", train_images, seed)
    subset(data, sub, "test", test_images, seed)
    bank, queries = clean_views(sub, "train"), clean_views(sub, "test")
    per_epoch = n // batch_size
    # Same recipe for every run except what defines each method (heads, loss, augmentation, optimizer: README).
    common = ["--arch", "resnet18", "--image-size", "32", "--small-stem", "--batch-size", str(batch_size),
              "--warmup-epochs", str(warmup_epochs), "--mixed-precision", mixed_precision, "--seed", str(seed),
              "--workers", str(workers), "--log-every", "10", "--no-tensorboard"]
    init = knn_top1(initial_backbone(seed, bank, mixed_precision), bank, queries, mixed_precision)
    print(f"kNN top-1 of the initial backbone (seed {seed}, BN statistics of the bank): {init:.2f}", flush=True)
    rows = []
    for name, method, ep in [("fastmoco-E", "fastmoco", epochs), ("mocov3-E", "mocov3", epochs),
                             ("mocov3-2E", "mocov3", 2 * epochs)]:
        d = out / config / name
        # the 2E run also saves its checkpoint at epoch E
        wall = pretrain(d, sub, method, ep, epochs * per_epoch if ep > epochs else 0, common, threads)
        mid = sorted(d.glob("ckpt-*.safetensors"))
        knn = {ep: knn_top1(backbone_from(d / "ckpt.safetensors"), bank, queries, mixed_precision)}
        if mid:
            knn[epochs] = knn_top1(backbone_from(mid[-1]), bank, queries, mixed_precision)
        rows.append({"run": name, "method": method, "epochs": ep, "steps": ep * per_epoch,
                     "kNN@E": f"{knn[epochs]:.2f}", "kNN@2E": f"{knn[2 * epochs]:.2f}" if 2 * epochs in knn else "-",
                     "train_s": f"{wall:.0f}" if wall else "reused",
                     "img/s": f"{ep * per_epoch * batch_size / wall:.1f}" if wall else "-", "seed": seed})
        print(table(rows[-1:]), flush=True)
    text = (f"CIFAR-10 subset: {n} train images (pretraining, kNN bank), {len(queries[1])} test images (kNN queries); "
            f"E = {epochs}, batch {batch_size}, {mixed_precision}, seed {seed}; kNN top-1 of the initial backbone "
            f"(BN statistics of the bank) {init:.2f}\n\n{table(rows)}\n")
    (out / f"{config}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    app()
