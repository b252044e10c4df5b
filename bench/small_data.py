"""Learning curves on real CIFAR-10 under --recipe small: every method against its own random initialisation, and the
paper's claim (Table 4b) at equal epochs: Fast-MoCo vs its baseline (fastmoco --no-patches) vs MoCo v3, over seeds.

    python -m bench.small_data                                  # CPU scale (see docs/small-data.md for the budget)
    python -m bench.small_data --runs all                       # every method of the project
    python -m bench.small_data --train-images 50000 --test-images 10000 --epochs 15 --batch-size 512 \
        --knn-every 5 --seeds 0 --workers 16 --mixed-precision bf16 --out runs/gpu-cifar   # full CIFAR-10, one GPU

Each run is `python pretrain.py --recipe small` in a subprocess on a seeded subset of the parquet files, with its own
kNN monitor (k=200, t=0.1, bank = the training subset, queries = the test subset) every --knn-every epochs; a run
whose checkpoint exists is not run again (rerun the command after an interruption: finished runs are kept, the
interrupted one resumes). Prints one table row per run configuration (mean and std over seeds) and writes the curves
(kNN top-1 against epochs and against training minutes) as OUT/knn.png. Skips (exit 0) when the data folder is absent:
users do not have it, nothing here depends on it.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

if not __package__:  # run as a file (python bench/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plot  # noqa: E402
from bench.sample_efficiency import subset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
VIT = ["--arch", "vit_tiny_patch16_224", "--arch-kwargs", "patch_size=4,img_size=32,depth=4"]
RUNS = {  # name -> pretrain.py flags (after --arch resnet18, which an --arch here overrides)
    "fastmoco": ["--method", "fastmoco"],
    "fastmoco-no-patches": ["--method", "fastmoco", "--no-patches"],  # Table 4b's baseline: Fast-MoCo's recipe
    "mocov3": ["--method", "mocov3"],
    "mocov3-2x": ["--method", "mocov3"],  # 2x and 4x the epochs of the others (LONGER): the paper's "in 1/4 the epochs"
    "mocov3-4x": ["--method", "mocov3"],
    "mocov2": ["--method", "mocov2"],
    "mocov1": ["--method", "mocov1"],
    "byol": ["--method", "byol"],
    "simsiam": ["--method", "simsiam"],
    "nnclr": ["--method", "nnclr"],
    # the fidelity switches of docs/small-data.md, each against its default
    "fastmoco-official-init": ["--method", "fastmoco", "--official-init"],
    "mocov2-no-split-bn": ["--method", "mocov2", "--bn-splits", "1"],  # BN statistics shared by query and key
    "mocov2-random-queue": ["--method", "mocov2", "--no-warm-queue"],  # the official code's random initial queue
    "mocov1-random-queue": ["--method", "mocov1", "--no-warm-queue"],  # ... as in MoCo's CIFAR demo
    # MoCo's own CIFAR-10 demo, written independently of the project: bench/moco_reference.py flags, not pretrain.py's
    "reference-mocov1": [],
    "reference-mocov2": ["--v2"],  # the demo's loop with MoCo v2's head and tau
    # a small ViT (timm's ViT-Tiny width, 4 blocks, 4 px patches: 8x8 tokens at 32 px) under MoCo v3's ViT recipe;
    # Fast-MoCo on it is beyond the paper (each 16 px patch: 4x4 tokens, the position embedding interpolated)
    "vit-mocov3": ["--method", "mocov3", *VIT],
    "vit-fastmoco": ["--method", "fastmoco", *VIT],
}
LONGER = {"mocov3-2x": 2, "mocov3-4x": 4}
CLAIM = ("fastmoco", "fastmoco-no-patches", "mocov3")
BUDGET = ("fastmoco", "mocov3", "mocov3-2x", "mocov3-4x")
FIDELITY = ("fastmoco", "fastmoco-official-init", "mocov2", "mocov2-no-split-bn", "mocov2-random-queue")
PARITY = ("mocov1", "reference-mocov1", "mocov2", "reference-mocov2")
GROUPS = {"claim": CLAIM, "budget": BUDGET, "all": [n for n in list(RUNS)[:10] if n not in LONGER],
          "fidelity": FIDELITY, "parity": PARITY, "vit": ("vit-mocov3", "vit-fastmoco")}
COLUMNS = ["run", "seeds", "epochs", "kNN@init", "kNN@end", "std", "gain", "train_min", "img/s",
           "epoch reaching fastmoco@end"]


def reached(rows, score):
    """The first logged epoch whose kNN top-1 is >= score, or None."""
    return next((r["epoch"] for r in rows if r["knn_top1"] >= score), None)


def summary(runs: dict) -> list:
    """{name: [run dir, ...]} -> table rows (dicts of COLUMNS), the final kNN as mean and std over seeds."""
    logs = {name: [[json.loads(x) for x in (Path(d) / "log.jsonl").read_text().splitlines()] for d in dirs]
            for name, dirs in runs.items()}
    knn = {name: [[r for r in rows if "knn_top1" in r] for rows in seeds] for name, seeds in logs.items()}
    target = statistics.mean(k[-1]["knn_top1"] for k in knn["fastmoco"]) if "fastmoco" in knn else None
    table = []
    for name, seeds in knn.items():
        end = [k[-1]["knn_top1"] for k in seeds]
        speed = [r["img_per_s"] for rows in logs[name] for r in rows if "img_per_s" in r]
        hit = [reached(k, target) for k in seeds] if target is not None else []
        table.append({"run": name, "seeds": len(seeds), "epochs": seeds[0][-1]["epoch"],
                      "kNN@init": f"{statistics.mean(k[0]['knn_top1'] for k in seeds):.1f}",
                      "kNN@end": f"{statistics.mean(end):.1f}",
                      "std": f"{statistics.stdev(end):.1f}" if len(end) > 1 else "-",
                      "gain": f"{statistics.mean(end) - statistics.mean(k[0]['knn_top1'] for k in seeds):+.1f}",
                      "train_min": f"{statistics.mean(k[-1].get('train_seconds', 0) for k in seeds) / 60:.1f}",
                      "img/s": f"{statistics.median(speed):.0f}" if speed else "-",
                      "epoch reaching fastmoco@end": "not reached" if None in hit else
                      (f"{statistics.mean(hit):g}" if hit else "-")})
    return table


def markdown(table: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in table])


# A command's context_settings replace the app's: -h again here, or it would be handed to every pretrain.py run.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": ["-h", "--help"]})
def main(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="CIFAR-10 parquet folder (train-*.parquet, test-*.parquet).")] = Path(
        "../shared/data/cifar10"),
    runs: Annotated[str, typer.Option(help=f"'claim' ({', '.join(CLAIM)}), 'budget' ({', '.join(BUDGET)}: Fast-MoCo "
                                           f"at E epochs vs MoCo v3 at E, 2E, 4E), 'all' (every method), 'fidelity' "
                                           f"({', '.join(FIDELITY)}), 'vit' (MoCo v3 and Fast-MoCo on a small "
                                           f"ViT), or names from "
                                           f"{', '.join(RUNS)}, comma-separated (groups too).")] = "claim",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (init, data order, augmentation).")] = "0,1,2",
    train_images: Annotated[int, typer.Option(help="Training subset (the kNN bank).")] = 5000,
    test_images: Annotated[int, typer.Option(help="Test subset (the kNN queries).")] = 1000,
    epochs: Annotated[int, typer.Option(help="Epochs of every run (equal epochs: the paper's comparison).")] = 6,
    batch_size: Annotated[int, typer.Option(help="Global batch (the recipe's lr is scaled to it).")] = 64,
    image_size: Annotated[int, typer.Option(help="Crop size; the recipe's CIFAR stem.")] = 32,
    knn_every: Annotated[int, typer.Option(help="Epochs between kNN evaluations.")] = 1,
    workers: Annotated[int, typer.Option(help="DataLoader workers per run.")] = 1,
    threads: Annotated[int, typer.Option(help="torch threads per run (1 on a shared CPU, 0 = torch's default).")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="pretrain.py --mixed-precision (no, bf16, fp16).")] = "no",
    out: Annotated[Path, typer.Option(help="Run folders, knn.png.")] = Path("runs/small-data"),
):
    """Pretrain each configuration with --recipe small, print the kNN table, draw the curves.

    Flags after `--` go to every pretrain.py run (e.g. `-- --no-small-stem`)."""
    if not (data.is_dir() and list(data.glob("train-*.parquet"))):
        print(f"skip: {data} is absent (CIFAR-10 parquet files); pass --data")
        return
    names = [name for part in runs.split(",") for name in GROUPS.get(part, [part])]  # groups and names, mixed
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown run {unknown[0]}: choose from {', '.join(RUNS)}")
    sub = out / "data"
    if not (sub / "train-00000-of-00001.parquet").is_file():
        subset(data, sub, "train", train_images, 0)
        subset(data, sub, "test", test_images, 1)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = {}
    for name in names:
        for seed in map(int, seeds.split(",")):
            run = out / f"{name}-s{seed}"
            if name.startswith("reference-"):  # same images, batch, epochs, stem and seed; the demo's own recipe
                done_file = run / "done"
                stem = [a for a in ctx.args if a in ("--small-stem", "--no-small-stem")]
                cmd = [sys.executable, str(ROOT / "bench" / "moco_reference.py"), "--data", str(sub), *RUNS[name],
                       "--epochs", str(epochs), "--batch-size", str(batch_size), "--knn-every", str(knn_every),
                       "--seed", str(seed), "--workers", str(workers), "--out", str(run), *stem]
            else:
                done_file = run / "ckpt.safetensors"
                cmd = [sys.executable, str(ROOT / "pretrain.py"), "--data", str(sub), "--recipe", "small",
                       "--arch", "resnet18", *RUNS[name], "--image-size", str(image_size),
                       "--epochs", str(epochs * LONGER.get(name, 1)),
                       "--batch-size", str(batch_size), "--knn-every", str(knn_every), "--seed", str(seed),
                       "--workers", str(workers), "--mixed-precision", mixed_precision, "--no-tensorboard",
                       "--save-every", "200", "--output-dir", str(run), *ctx.args]
            if not done_file.is_file():
                print(" ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            done.setdefault(name, []).append(run)
    print(markdown(summary(done)))
    png = plot.draw(done, out / "knn.png", f"CIFAR-10, {train_images} train / {test_images} test images, ResNet-18, "
                                           f"{image_size} px, batch {batch_size}, --recipe small {' '.join(ctx.args)}")
    print(f"wrote {png}")


if __name__ == "__main__":
    app()
