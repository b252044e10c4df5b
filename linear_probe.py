"""Linear evaluation of a pretrained ResNet (Fast-MoCo / SimSiam protocol), and a weighted kNN classifier.

    accelerate launch linear_probe.py runs/pretrain/ckpt.safetensors --data /data/imagenet-1k   # paper: 90 epochs
    python linear_probe.py runs/pretrain/ckpt.safetensors --data demo --arch resnet18 --image-size 32 \
        --batch-size 256 --epochs 30 --cached-features --knn                                   # minutes on a CPU

The backbone is frozen (eval mode: BN statistics frozen too) and a linear classifier is trained on its pooled
features; at the end the run checks that no backbone tensor changed. Writes DIR/linear.safetensors (`fc.weight`,
`fc.bias`: torchvision's names, so backbone + fc load into a torchvision ResNet), DIR/log.jsonl and DIR/results.json.
"""

import itertools
import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, List, NamedTuple, Optional

import torch
import torch.nn as nn
import typer
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import backbones
import checkpoints as ck
import fastmoco as fm
import knn
import runs
from cli import Precision, fail, labelled_splits, options, saved_args, user_errors
from data import (IGNORE, labelled_loss, num_classes, probe_transforms, process_shards, sample_seed,
                  with_labels)

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


# The paper's protocol (SimSiam / Fast-MoCo: LARS, lr 0.8 at batch 4096, 90 epochs), and one for small data: a
# classifier on BN-normalised features (BatchNorm without affine, as MAE's linear probe; folded into fc when saved),
# SGD, which converges in the tens of epochs a small data set gets. lr per 256 images.
RECIPES = dict(imagenet=dict(batch_size=4096, epochs=90, lr=0.05, optimizer="lars", normalize=False),
               small=dict(batch_size=256, epochs=30, lr=0.1, optimizer="sgd", normalize=True))
Recipe = Enum("Recipe", {r: r for r in RECIPES}, type=str)


def classifier(dim: int, classes: int, normalize: bool) -> nn.Module:
    """The linear classifier: fc (N(0, 0.01) init, as MoCo / SimSiam's lincls), after a BatchNorm1d without affine
    for the small recipe (still linear: folded into fc by linear_weights)."""
    fc = nn.Linear(dim, classes)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), fc) if normalize else nn.Sequential(fc)


def linear_weights(clf: nn.Module) -> dict:
    """{fc.weight, fc.bias} of the whole classifier, the BN (eval mode: running statistics) folded into fc, so the
    backbone + fc load into a torchvision ResNet: W x' + b with x' = (x - mu) / s is (W / s) x + (b - W mu / s)."""
    fc = clf[-1]
    w, b = fc.weight.detach().clone(), fc.bias.detach().clone()
    if len(clf) == 2:
        bn = clf[0]
        s = (bn.running_var + bn.eps).sqrt()
        w, b = w / s, b - (w / s) @ bn.running_mean
    return {"fc.weight": w, "fc.bias": b}


RANGES = {"image_size": (8,), "batch_size": (1,), "epochs": (1,), "lr": (0,), "weight_decay": (0,), "knn_k": (1,),
          "knn_t": (">0",), "workers": (0,)}  # option: (low,) or (low, high); None (the recipe's) is not checked


def encode(backbone, ds, transform, o, acc, progress, what):
    """One clean pass over a split: pooled features (n, D) and labels (n,), gathered from every process."""
    loader = acc.prepare(torch.utils.data.DataLoader(with_labels(ds, o.image_column, transform),
                                                     batch_size=o.batch_size // acc.num_processes,
                                                     num_workers=o.workers))
    streamed = isinstance(ds, torch.utils.data.IterableDataset)  # no length to show
    task = progress.add_task(f"encode {what}", total=None if streamed else len(loader), info="")
    feats, labels, bad = [], [], 0
    for b in loader:
        with acc.autocast():
            f = backbone(b["x"])
        f, y, ok = acc.gather_for_metrics((f.float(), b["y"], b["ok"]))
        feats.append(f[ok])  # undecodable images (data.with_labels) leave no row
        labels.append(y[ok])
        bad += len(ok) - int(ok.sum())
        progress.advance(task)
    progress.remove_task(task)
    if not sum(map(len, labels)):
        fail(f"no image of the {what} split could be decoded (the 'skipped undecodable image' warnings name them)")
    return torch.cat(feats), torch.cat(labels), bad


@torch.no_grad()
def accuracy(logits, y, ks=(1, 5)):
    """Top-k accuracies in percent. logits (n, C), y (n,)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (n, k)
    hit = top == y[:, None]
    return [100.0 * hit[:, :k].any(1).float().mean().item() for k in ks]


@torch.no_grad()
def knn_accuracy(train_f, train_y, val_f, val_y, classes, k, t, chunk=1024) -> float:
    """Weighted kNN top-1 in percent (Wu et al. 2018), pretrain.py's monitor's (knn.knn_predict): train features are
    the bank (half precision on a GPU), queries in chunks."""
    dtype = knn.bank_dtype(train_f.device)
    pred = knn.knn_predict(knn.normalized(val_f, dtype), knn.normalized(train_f, dtype), train_y, classes, k, t,
                            chunk)
    return 100.0 * (pred == val_y).float().mean().item()


class Endless(torch.utils.data.IterableDataset):
    """A streamed split's epochs one after another (set_epoch reshuffles its shards). With whole shards per process
    (data.process_shards) the processes hold uneven shares, yet each must give every epoch's n // B batches, as
    pretrain.py's stream does."""

    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        for epoch in itertools.count():
            self.ds.set_epoch(epoch)
            empty = True
            for ex in self.ds:
                empty = False
                yield ex
            if empty:  # a DataLoader worker without a shard: end it rather than spin
                return


def train_stream(train, column, transform, seed, rank, world):
    """This process's endless stream of augmented {x, y} train examples: its whole shards, shuffled, and only then
    decoded and augmented (with_labels), so each example is decoded by one process only."""
    return Endless(with_labels(process_shards(train, rank, world).shuffle(seed=seed), column, transform))


def check_frozen(backbone, reference: dict):
    """The frozen-backbone self-check: every backbone tensor (weights and BN statistics) equals the loaded one."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v.cpu(), reference[k])]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during training ({len(changed)} tensors, e.g. {changed[0]}); "
                           "this is a bug: the results were not written")


def cached_batches(feats, labels, batch, seed, epoch):
    """One epoch of shuffled mini-batches of the cached features, in the same order on every process."""
    perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(sample_seed(seed, epoch)))
    for i in range(len(feats) // batch):
        idx = perm[i * batch:(i + 1) * batch].to(feats.device)
        yield feats[idx], labels[idx]


def augmented_batches(backbone, loader, steps, acc):
    """One epoch (`steps` batches) of augmented views encoded by the frozen backbone: (features, labels)."""
    for b in itertools.islice(loader, steps):
        with torch.no_grad(), acc.autocast():
            f = backbone(b["x"].to(acc.device))
        yield f.float(), torch.where(b["ok"], b["y"], IGNORE).to(acc.device)  # undecodable: left out of the loss


def train_epoch(fc, optimizer, batches, schedule, acc, progress, task) -> tuple:
    """One epoch of the classifier on (features, labels) batches, lr per iteration; schedule: (step, total steps,
    base lr). -> (step, last loss)."""
    step, total, base_lr = schedule
    for f, y in batches:
        fm.set_lr(optimizer, fm.lr_at(step, total, base_lr))
        loss = labelled_loss(fc(f), y)
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        optimizer.step()
        step += 1
        progress.update(task, completed=step)
    return step, loss


def evaluate(clf, val_f, val_y) -> tuple:
    """top-1, top-5 of the classifier in eval mode (BN-normalised probes use their running statistics)."""
    clf.eval()
    top1, top5 = accuracy(clf(val_f), val_y)
    clf.train()
    return top1, top5


def settle(o, args: dict) -> tuple:
    """Step 1, before any work: each value, the checkpoint, the protocol (the checkpoint's recipe unless --recipe)
    resolved into `o` (image_size, recipe, r, batch_size, epochs, lr). Returns (trackers, backbone, its metadata)."""
    with user_errors():
        trackers = runs.check_stage(args, RANGES, o.log_with)
    if o.arch is not None and (msg := backbones.check(o.arch)):
        fail(msg)
    try:
        backbone, meta = backbones.load(o.ckpt, o.arch)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    o.image_size = o.image_size if o.image_size is not None else meta.get("image_size") or 224
    saved = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    o.recipe = o.recipe or saved.get("recipe", "imagenet")
    o.r = RECIPES[o.recipe]
    o.batch_size, o.epochs, o.lr = (o.r[k] if v is None else v for k, v in (
        ("batch_size", o.batch_size), ("epochs", o.epochs), ("lr", o.lr)))
    return trackers, backbone, meta


class Splits(NamedTuple):
    train: object  # the train split (a datasets.Dataset, or an IterableDataset when streamed)
    n: int  # its size
    val: object
    val_name: str  # "validation" or "test"
    classes: int


def labelled_data(o, acc) -> Splits:
    """The labelled splits, checked against the batch; o.workers and o.streaming resolved."""
    B, world = o.batch_size, acc.num_processes
    o.workers = min(8, (os.cpu_count() or 1) // world) if o.workers is None else o.workers
    if B % world:
        fail(f"--batch-size {B} is not divisible by the {world} processes: use a multiple of {world}")
    hub = not Path(o.data).expanduser().exists() and o.data != "demo"
    o.streaming = hub if o.streaming is None else (o.streaming or hub)
    train, n, val, _, val_name = labelled_splits(o.data, o.image_column, o.streaming)
    if n // B == 0 and not o.cached_features:
        fail(f"{o.data} has {n} training images, fewer than one batch of {B}: lower --batch-size")
    with user_errors():
        classes = num_classes(train)
    return Splits(train, n, val, val_name, classes)


def fit(o, acc, backbone, fc, optimizer, data: Splits, progress, log) -> tuple:
    """Steps 3-4: the features (the validation split once -- the backbone is frozen and the test view deterministic
    --, the clean train split for --cached-features / --knn, otherwise a loader of augmented train views), then the
    classifier, per-iteration cosine, evaluated after every epoch. -> (history, val labels, undecodable images, kNN
    top-1 or None)."""
    train, n, val, val_name, classes = data
    B, world = o.batch_size, acc.num_processes
    train_tf, test_tf = probe_transforms(o.image_size)
    val_f, val_y, bad = encode(backbone, val, test_tf, o, acc, progress, val_name)
    train_f = train_y = loader = None
    if o.cached_features or o.knn:
        train_f, train_y, bad_train = encode(backbone, train, test_tf, o, acc, progress, "train")
        bad += bad_train
    if o.cached_features:
        per_epoch = max(1, len(train_f) // B)
        B = min(B, len(train_f))
    else:
        per_epoch = n // B
        ds = (train_stream(train, o.image_column, train_tf, o.seed, acc.process_index, world) if o.streaming else
              with_labels(train, o.image_column, train_tf))
        loader = torch.utils.data.DataLoader(ds, batch_size=B // world, shuffle=not o.streaming, drop_last=True,
                                             num_workers=o.workers, persistent_workers=o.workers > 0)
        loader = iter(loader) if o.streaming else acc.prepare(loader)  # streamed: one endless iterator
    total, step, history = o.epochs * per_epoch, 0, []
    task = progress.add_task("linear probe", total=total, info="")
    for epoch in range(o.epochs):
        if loader is not None and hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = (cached_batches(train_f, train_y, B, o.seed, epoch) if o.cached_features else
                   augmented_batches(backbone, loader, per_epoch, acc))
        step, loss = train_epoch(fc, optimizer, batches, (step, total, o.base_lr), acc, progress, task)
        top1, top5 = evaluate(acc.unwrap_model(fc), val_f, val_y)
        history.append(dict(epoch=epoch + 1, loss=loss.item(), top1=top1, top5=top5))
        progress.update(task, info=f"loss {loss.item():.4f} top1 {top1:.2f} top5 {top5:.2f}")
        acc.log(history[-1], step=epoch + 1)
        if log:
            log.write(history[-1])
    knn_top1 = knn_accuracy(train_f, train_y, val_f, val_y, classes, o.knn_k, o.knn_t) if o.knn else None
    return history, val_y, bad, knn_top1


@app.command()
def main(
    ckpt: Annotated[Path, typer.Argument(help="pretrain.py checkpoint, or torchvision ResNet weights (safetensors).")],
    data: Annotated[str, typer.Option(help="Labelled data: Hub name (streamed), local folder with train-*.parquet and "
                                           "validation-*/test-*.parquet (columns image, label), or 'demo'.")
                    ] = "ILSVRC/imagenet-1k",
    arch: Annotated[Optional[str], typer.Option(
        help="torchvision ResNet or timm model. Default: the checkpoint's (which it must match), else resnet50.")
    ] = None,
    image_size: Annotated[Optional[int], typer.Option(
        help="Crop size. Default: the checkpoint's pretraining size, else 224 (test: Resize 256, CenterCrop 224).")
    ] = None,
    recipe: Annotated[Optional[Recipe], typer.Option(
        help="imagenet: the paper's protocol. small: SGD on BN-normalised features, for 32-96 px data sets. "
             "Default: the checkpoint's pretraining recipe, else imagenet.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch. Paper: 4096; small 256.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Paper: 90; small 30.")] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="lr per 256 images (used: lr x batch/256), cosine to 0. Paper: LARS 0.05 (= 0.8 at batch 4096); "
             "small: SGD 0.1.")] = None,
    weight_decay: Annotated[float, typer.Option(help="Paper: 0.")] = 0.0,
    cached_features: Annotated[bool, typer.Option(
        help="Encode each image once without augmentation and train on the cached features (fast; not the paper's "
             "augmented protocol).")] = False,
    knn: Annotated[bool, typer.Option(help="Also report weighted kNN top-1 (clean train split as the bank).")] = False,
    knn_k: Annotated[int, typer.Option(help="kNN neighbours.")] = 200,
    knn_t: Annotated[float, typer.Option(help="kNN temperature.")] = 0.1,
    output_dir: Annotated[Path, typer.Option(help="linear.safetensors, log.jsonl, results.json.")] = Path(
        "runs/linear"),
    seed: Annotated[int, typer.Option(help="Seeds the classifier init and the data order.")] = 0,
    workers: Annotated[Optional[int], typer.Option(
        help="DataLoader workers per process (default: cores / processes, max 8).")] = None,
    image_column: Annotated[str, typer.Option(help="Image column of the dataset.")] = "image",
    streaming: Annotated[Optional[bool], typer.Option(
        help="Stream the data (always for Hub names; off for local data unless set).")] = None,
    mixed_precision: Annotated[Optional[Precision], typer.Option(
        help="no, bf16 or fp16 for the backbone forward. Default: Accelerate's config.")] = None,
    log_with: Annotated[Optional[List[str]], typer.Option(
        help="Experiment trackers (Accelerate's names: tensorboard, wandb, mlflow, trackio, ...) that also get the "
             "config, each epoch's row of log.jsonl and the results; repeat the flag or separate with commas.")] = None,
):
    """Linear probe (and kNN) of a frozen pretrained backbone; writes DIR/results.json."""
    o = options(locals())  # the settings: the steps below complete them
    args = saved_args(vars(o))  # as linear.safetensors records them
    # 1. checks before any work: each value, the checkpoint, then the data
    trackers, backbone, meta = settle(o, args)
    acc = Accelerator(mixed_precision=o.mixed_precision, log_with=trackers or None, project_dir=str(o.output_dir))
    data = labelled_data(o, acc)

    # 2. frozen backbone (eval mode: BN uses its pretrained statistics) and the linear classifier
    torch.manual_seed(o.seed)
    backbone.requires_grad_(False).eval().to(acc.device)
    reference = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    fc = classifier(backbone.dim, data.classes, o.r["normalize"])
    o.base_lr = o.lr * o.batch_size / 256
    optimizer = (fm.LARS(fc.parameters(), lr=o.base_lr, weight_decay=o.weight_decay) if o.r["optimizer"] == "lars"
                 else torch.optim.SGD(fc.parameters(), lr=o.base_lr, momentum=0.9, weight_decay=o.weight_decay))
    fc, optimizer = acc.prepare(fc.to(acc.device), optimizer)

    # 3-4. features, then the classifier
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not acc.is_main_process)
    acc.init_trackers("linear_probe", config={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))})
    log = runs.PendingLog(o.output_dir / "log.jsonl") if acc.is_main_process else None  # nothing written yet
    with progress:
        history, val_y, bad, knn_top1 = fit(o, acc, backbone, fc, optimizer, data, progress, log)

    # 5. self-check, then results: the LAST epoch's top-1/top-5 and the BEST top-1 over epochs (the official
    #    Fast-MoCo solver reports the best)
    check_frozen(backbone, reference)
    best = max(history, key=lambda h: h["top1"])
    results = dict(top1=history[-1]["top1"], top5=history[-1]["top5"], best_top1=best["top1"],
                   best_top5=best["top5"], best_epoch=best["epoch"], epochs=o.epochs, train_images=data.n,
                   val_images=len(val_y), val_split=data.val_name, classes=data.classes, arch=meta["arch"],
                   small_stem=meta["small_stem"], image_size=o.image_size, cached_features=o.cached_features,
                   checkpoint=str(o.ckpt), method=meta.get("method"), world_size=acc.num_processes,
                   recipe=o.recipe, lr=o.lr, batch_size=o.batch_size, undecodable_images=bad)
    if o.knn:
        results.update(knn_top1=knn_top1, knn_k=o.knn_k, knn_t=o.knn_t)
    if acc.is_main_process:
        o.output_dir.mkdir(parents=True, exist_ok=True)
        ck.save_checkpoint(o.output_dir / "linear.safetensors", linear_weights(acc.unwrap_model(fc)),
                           dict(format="fastmoco-linear-v1", args=args, results=results))
        runs.write_text(o.output_dir / "results.json", json.dumps(results, indent=2) + "\n")
        log.commit()
    # the trackers get the numbers of the results (not flags: those are in the config)
    acc.log({k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            step=o.epochs)
    acc.end_training()
    acc.print(json.dumps({k: results[k] for k in ("top1", "top5", "best_top1") + (("knn_top1",) if o.knn else ())}))


if __name__ == "__main__":
    app()
