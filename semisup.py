"""Semi-supervised fine-tuning of a pretrained ResNet on 1% or 10% of the labels (Fast-MoCo paper, Table 2).

    accelerate launch semisup.py runs/pretrain/ckpt.safetensors --data /data/imagenet-1k --fraction 0.01
    accelerate launch semisup.py ckpt.safetensors --data /data/imagenet-1k --subset-file 1percent.txt \
        --id-column image                                                  # SimCLR's published 1% list
    python semisup.py ckpt.safetensors --data demo --arch resnet18 --image-size 32 --fraction 0.1 --batch-size 64

The whole network (backbone + a new linear classifier) is fine-tuned on a labelled subset of the train split and
evaluated on the FULL validation split. A sibling of linear_probe.py: same data handling, the backbone trains.
Writes DIR/finetuned.safetensors (a torchvision ResNet state dict with fc), DIR/log.jsonl and DIR/results.json.
"""

import json
import os
from pathlib import Path
from typing import Annotated, List, Optional

import torch
import torch.nn as nn
import typer
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import backbones
import checkpoints as ck
import fastmoco as fm
import runs
from cli import Precision, fail, labelled_splits, options, saved_args, user_errors
from data import IGNORE, labelled_loss, num_classes, probe_transforms, with_labels

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

# Paper Appendix B.3 decays the lrs by 0.2 at two points without saying where: we use 60% and 80% of the run.
MILESTONES, GAMMA = (0.6, 0.8), 0.2


RANGES = {"image_size": (8,), "batch_size": (1,), "epochs": (1,), "lr_head": (0,), "lr_backbone": (0,),
          "workers": (0,)}  # option: (low,) or (low, high); None (the default's) is not checked


def balanced_subset(labels, fraction: float, seed: int) -> list:
    """Deterministic class-balanced subset: round(fraction * n_c) (at least 1) rows of every class c, drawn by a
    permutation seeded with `seed`. Returns sorted row indices."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        take = max(1, round(fraction * len(rows)))
        keep += rows[torch.randperm(len(rows), generator=g)[:take]].tolist()
    return sorted(keep)


def subset_from_file(path: Path, ds, id_column: Optional[str], image_column: str) -> list:
    """Rows named by a subset file, one id per line (SimCLR's 1% / 10% ImageNet lists name image files, e.g.
    n01440764_10026.JPEG). With --id-column, a line names the row whose value in that column, or its file name,
    equals it (for the image column: the stored image's file name); without, a line is a row index (0-based)."""
    import datasets

    if not path.is_file():
        fail(f"--subset-file {path} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if id_column is None:
        if not all(i.isdigit() for i in ids):
            fail(f"{path} holds names, not row numbers: pass --id-column COLUMN (e.g. --id-column {image_column})")
        rows = sorted({int(i) for i in ids})
        if rows and rows[-1] >= len(ds):
            fail(f"{path} names row {rows[-1]}, but the train split has {len(ds)} rows (numbered from 0)")
        return rows
    if id_column not in ds.column_names:
        fail(f"--id-column {id_column} is not a column of the train split ({', '.join(ds.column_names)})")
    col = ds.cast_column(id_column, datasets.Image(decode=False)) if id_column == image_column else ds
    index = {}
    for r, v in enumerate(col[id_column]):
        v = str(v["path"] if isinstance(v, dict) else v)
        index[v] = index[Path(v).name] = r
    missing = [i for i in ids if i not in index]
    if missing:
        fail(f"{len(missing)} of the {len(ids)} ids in {path} are not in column {id_column} (e.g. {missing[0]})")
    return sorted({index[i] for i in ids})


@torch.no_grad()
def evaluate(net, ds, column, transform, batch, workers, acc):
    """Top-1 / top-5 in percent of the whole network on one clean pass over a split (all processes)."""
    net.eval()
    loader = acc.prepare(torch.utils.data.DataLoader(with_labels(ds, column, transform), batch_size=batch,
                                                     num_workers=workers))
    logits, labels = [], []
    for b in loader:
        with acc.autocast():
            out = net(b["x"])
        out, y, ok = acc.gather_for_metrics((out.float(), b["y"], b["ok"]))
        logits.append(out[ok])  # undecodable images (data.with_labels) leave no row
        labels.append(y[ok])
    net.train()
    logits, y = torch.cat(logits), torch.cat(labels)
    if not len(y):
        fail("no image of the validation split could be decoded (the 'skipped undecodable image' warnings name "
             "them)")
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (n, 5)
    return [100.0 * (top[:, :k] == y[:, None]).any(1).float().mean().item() for k in (1, 5)]


def settle(o, args: dict) -> tuple:
    """Step 1, before any work: each value and the checkpoint (o.image_size resolved from it). Returns (trackers,
    backbone, its metadata)."""
    with user_errors():
        trackers = runs.check_stage(args, RANGES, o.log_with)
    if o.arch is not None and (msg := backbones.check(o.arch)):
        fail(msg)
    if o.subset_file is None and not 0 < o.fraction <= 1:
        fail(f"--fraction {o.fraction} must be in (0, 1]")
    try:
        net, meta = backbones.load(o.ckpt, o.arch)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    o.image_size = o.image_size if o.image_size is not None else meta.get("image_size") or 224
    return trackers, net, meta


def labelled_subset(o, acc) -> tuple:
    """The data and the labelled subset: (train, val, val split name, classes, subset rows); o.workers, the subset's
    size and fraction (o.subset_size, o.labelled) and the schedule it decides (o.epochs, o.lr_backbone) resolved."""
    B, world = o.batch_size, acc.num_processes
    o.workers = min(8, (os.cpu_count() or 1) // world) if o.workers is None else o.workers
    if B % world:
        fail(f"--batch-size {B} is not divisible by the {world} processes: use a multiple of {world}")
    train, _, val, _, val_name = labelled_splits(o.data, o.image_column)
    if isinstance(train, torch.utils.data.IterableDataset):
        fail(f"{o.data} is streamed, but a labelled subset needs random access: download it and pass the local folder")
    with user_errors():
        classes = num_classes(train)
    rows = (subset_from_file(o.subset_file, train, o.id_column, o.image_column) if o.subset_file else
            balanced_subset(train["label"], o.fraction, o.seed))
    o.subset_size, o.labelled = len(rows), len(rows) / len(train)
    o.epochs = (60 if o.labelled <= 0.05 else 20) if o.epochs is None else o.epochs  # paper: 1% 60 epochs, 10% 20
    o.lr_backbone = (0.0 if o.labelled <= 0.05 else 1e-6) if o.lr_backbone is None else o.lr_backbone
    if len(rows) < B:
        fail(f"the labelled subset has {len(rows)} images, fewer than one batch of {B}: lower --batch-size")
    return train, val, val_name, classes, rows


def fine_tune(o, acc, model, optimizer, loader, val, progress, log) -> list:
    """Step 3: lrs x0.2 at two points (per iteration), evaluated on the full validation split after each epoch.
    Returns the epochs' rows (epoch, loss, top1, top5)."""
    _, test_tf = probe_transforms(o.image_size)
    total, step, history = o.epochs * len(loader), 0, []
    milestones = [round(f * total) for f in MILESTONES]
    task = progress.add_task(f"fine-tune on {o.subset_size} labels", total=total, info="")
    for epoch in range(o.epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for b in loader:
            for g in optimizer.param_groups:
                g["lr"] = fm.lr_at(step, total, g["base_lr"], milestones=milestones, gamma=GAMMA)
            with acc.autocast():  # undecodable images (data.with_labels) are left out of the loss
                loss = labelled_loss(model(b["x"]), torch.where(b["ok"], b["y"], IGNORE))
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            optimizer.step()
            step += 1
            progress.update(task, completed=step)
        top1, top5 = evaluate(model, val, o.image_column, test_tf, o.batch_size // acc.num_processes, o.workers, acc)
        history.append(dict(epoch=epoch + 1, loss=loss.item(), top1=top1, top5=top5))
        progress.update(task, info=f"loss {loss.item():.4f} top1 {top1:.2f} top5 {top5:.2f}")
        acc.log(history[-1], step=epoch + 1)
        if log:
            log.write(history[-1])
    return history


@app.command()
def main(
    ckpt: Annotated[Path, typer.Argument(help="pretrain.py checkpoint, or torchvision ResNet weights (safetensors).")],
    data: Annotated[str, typer.Option(help="Labelled local data: folder with train-*.parquet and validation-*/test-*."
                                           "parquet (columns image, label), an image folder, or 'demo'.")
                    ] = "ILSVRC/imagenet-1k",
    fraction: Annotated[float, typer.Option(
        help="Labelled fraction of the train split, drawn class-balanced and seeded (ignored with --subset-file). "
             "Paper: 0.01 and 0.1.")] = 0.01,
    subset_file: Annotated[Optional[Path], typer.Option(
        help="Labelled subset, one id per line (e.g. SimCLR's 1percent.txt); see --id-column.")] = None,
    id_column: Annotated[Optional[str], typer.Option(
        help="Column the subset file's ids refer to (the image column: its file names). None: ids are row numbers.")
    ] = None,
    arch: Annotated[Optional[str], typer.Option(
        help="torchvision ResNet or timm model. Default: the checkpoint's (which it must match), else resnet50.")
    ] = None,
    image_size: Annotated[Optional[int], typer.Option(
        help="Crop size. Default: the checkpoint's pretraining size, else 224.")] = None,
    batch_size: Annotated[int, typer.Option(help="Global batch. Paper: 256.")] = 256,
    epochs: Annotated[Optional[int], typer.Option(help="Paper: 60 for 1% of the labels, 20 for 10%.")] = None,
    lr_head: Annotated[float, typer.Option(help="lr of the linear classifier. Paper: 0.05.")] = 0.05,
    lr_backbone: Annotated[Optional[float], typer.Option(
        help="lr of the backbone. Paper (as printed): 0 for 1%, 1e-6 for 10%.")] = None,
    output_dir: Annotated[Path, typer.Option(help="finetuned.safetensors, log.jsonl, results.json.")] = Path(
        "runs/semisup"),
    seed: Annotated[int, typer.Option(help="Seeds the subset, the classifier init and the data order.")] = 0,
    workers: Annotated[Optional[int], typer.Option(
        help="DataLoader workers per process (default: cores / processes, max 8).")] = None,
    image_column: Annotated[str, typer.Option(help="Image column of the dataset.")] = "image",
    mixed_precision: Annotated[Optional[Precision], typer.Option(
        help="no, bf16 or fp16. Default: Accelerate's config.")] = None,
    log_with: Annotated[Optional[List[str]], typer.Option(
        help="Experiment trackers (Accelerate's names: tensorboard, wandb, mlflow, trackio, ...) that also get the "
             "config, each epoch's row of log.jsonl and the results; repeat the flag or separate with commas.")] = None,
):
    """Fine-tune a pretrained backbone and a linear classifier on a labelled subset; writes DIR/results.json."""
    o = options(locals())  # the settings: the steps below complete them
    args = saved_args(vars(o))  # as finetuned.safetensors records them
    # 1. checks before any work: each value, the checkpoint, the data, the subset
    trackers, net, meta = settle(o, args)
    acc = Accelerator(mixed_precision=o.mixed_precision, log_with=trackers or None, project_dir=str(o.output_dir))
    train, val, val_name, classes, rows = labelled_subset(o, acc)

    # 2. model: the pretrained backbone plus a new classifier (torchvision's fc, timm's head), both trained, BN train
    torch.manual_seed(o.seed)
    fc = backbones.attach_classifier(net, meta["arch"], classes)  # torchvision's fc, timm's own classifier
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    head = set(map(id, fc.parameters()))
    groups = [dict(params=[p for p in net.parameters() if id(p) not in head], base_lr=o.lr_backbone),
              dict(params=list(fc.parameters()), base_lr=o.lr_head)]
    # paper Appendix B.3: SGD, Nesterov momentum 0.9, no weight decay, no gradient clipping
    optimizer = torch.optim.SGD(groups, lr=o.lr_head, momentum=0.9, nesterov=True, weight_decay=0.0)
    train_tf, _ = probe_transforms(o.image_size)
    loader = torch.utils.data.DataLoader(with_labels(train.select(rows), o.image_column, train_tf),
                                         batch_size=o.batch_size // acc.num_processes, shuffle=True, drop_last=True,
                                         num_workers=o.workers, persistent_workers=o.workers > 0)
    model, optimizer, loader = acc.prepare(net.to(acc.device), optimizer, loader)

    # 3. fine-tune
    acc.init_trackers("semisup", config={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))})
    log = runs.PendingLog(o.output_dir / "log.jsonl") if acc.is_main_process else None  # nothing written yet
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not acc.is_main_process)
    with progress:
        history = fine_tune(o, acc, model, optimizer, loader, val, progress, log)

    # 4. results: LAST epoch's top-1/top-5 on the full validation split, and the BEST top-1 over epochs
    best = max(history, key=lambda h: h["top1"])
    results = dict(top1=history[-1]["top1"], top5=history[-1]["top5"], best_top1=best["top1"],
                   best_top5=best["top5"], best_epoch=best["epoch"], epochs=o.epochs, labelled_images=len(rows),
                   labelled_fraction=o.labelled, subset_file=o.subset_file and str(o.subset_file),
                   train_images=len(train), val_images=len(val), val_split=val_name, classes=classes,
                   lr_head=o.lr_head, lr_backbone=o.lr_backbone, arch=meta["arch"], small_stem=meta["small_stem"],
                   image_size=o.image_size, checkpoint=str(o.ckpt), method=meta.get("method"))
    if acc.is_main_process:
        o.output_dir.mkdir(parents=True, exist_ok=True)
        ck.save_checkpoint(o.output_dir / "finetuned.safetensors", acc.unwrap_model(model).state_dict(),
                           dict(format="fastmoco-semisup-v1", arch=meta["arch"], small_stem=meta["small_stem"],
                                arch_kwargs=meta.get("arch_kwargs") or {}, image_size=o.image_size, args=args,
                                results=results, subset=rows))
        runs.write_text(o.output_dir / "results.json", json.dumps(results, indent=2) + "\n")
        log.commit()
    # the trackers get the numbers of the results (not flags: those are in the config)
    acc.log({k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            step=o.epochs)
    acc.end_training()
    acc.print(json.dumps({k: results[k] for k in ("top1", "top5", "best_top1", "labelled_images")}))


if __name__ == "__main__":
    app()
