"""Self-supervised pretraining of a ResNet with Fast-MoCo, MoCo v3, MoCo v2 or MoCo v1 (and, through variants.py,
BYOL, SimSiam, NNCLR and the paper's ablations).

    accelerate launch pretrain.py --epochs 100                      # ImageNet-1k streamed from the Hub
    python pretrain.py --data demo --arch resnet18 --image-size 32  # built-in demo data, CPU friendly

Every default is the method's published recipe (README, "Methods and recipes"); any of them can be overridden.
"""

import dataclasses
import functools
import itertools
import math
import os
import time
import traceback
from enum import Enum
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
import gpu_augment
import knn
import runs
import together
import variants as vr
from cli import Precision, fail, options, saved_args, user_errors
from data import augmentations, loader_for, pretrain_data, sample_seed, small_crops

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
# Each method's published (ImageNet) recipe, and the small-data one (32-96 px datasets, --recipe small)
RECIPES = dict(imagenet={**fm.RECIPES, **vr.RECIPES}, small={**fm.SMALL_RECIPES, **vr.SMALL_RECIPES})
VIT_RECIPES = dict(imagenet=fm.VIT_RECIPES, small=fm.SMALL_VIT_RECIPES)  # MoCo v3 / Fast-MoCo when --arch is a ViT


ABLATIONS = "Ablations (paper Sec. 5, Appendix C; docs/variants.md)"  # a --help panel after the everyday options
Method = Enum("Method", {m: m for m in RECIPES["imagenet"]}, type=str)
Recipe = Enum("Recipe", {r: r for r in RECIPES}, type=str)
Pipeline = Enum("Pipeline", {p: p for p in vr.PIPELINES}, type=str)  # Table 4a, in the paper's words
Combine = Enum("Combine", {c: c for c in vr.COMBINES}, type=str)
AugmentOn = Enum("AugmentOn", {a: a for a in ("cpu", "device")}, type=str)


def one_line_errors(batches, rank, output_dir):
    """Yield from the iterator `batches`: a ValueError of the data (no decodable image) as its one-line error, any
    other exception of the loader (an unreadable shard, a dead worker) after its traceback as a one-line error that
    names the process (together.leave_together passes it to the others). The exceptions of the loop body that consumes
    the batches never pass through here."""
    try:
        yield from batches
    except ValueError as e:  # raised in a worker, its message holds the worker's traceback: keep the last line
        fail(str(e).strip().splitlines()[-1].removeprefix("ValueError: "))
    except Exception as e:
        traceback.print_exc()
        fail(f"the data loader of process {rank} failed ({type(e).__name__}: {together.first_line(e)}); fix the data "
             f"and rerun the same command: it resumes from the last checkpoint in {output_dir}")


# ----------------------------------------------------------------------------- the algorithm of one step

def batch_loss(o, rank, model, target, views, queue, step):
    """This step's (loss, keys to enqueue or None) under the run's settings `o`: variants.py's (BYOL, SimSiam, NNCLR,
    the ablations) or fastmoco.py's. Their random draws are seeded per step (and process), so a resumed run repeats
    them."""
    if o.variant:
        return vr.variant_loss(o.method, model, target, views, queue, o.r["tau"], o.ablation,
                               sample_seed(o.seed, step, rank))
    g = torch.Generator().manual_seed(sample_seed(o.seed, step))  # MoCo v1/v2 shuffle-BN: same on every process
    return fm.step_loss(o.method, model, target, views[0], views[1], o.r["tau"], queue, g)


def resolve_recipe(recipe: str, method: str, overrides: dict) -> dict:
    """The recipe with the flags that were given (the architecture too: ResNet-50 unless the recipe names another;
    MoCo v3's ViT recipe when it is a timm ViT); a recipe's warm-up is cut to a tenth of the run (MoCo v3's 10 epochs
    would otherwise outlast a short run), a --warmup-epochs given explicitly is kept."""
    arch = overrides.get("arch") or RECIPES[recipe][method].get("arch", "resnet50")
    vit = method in VIT_RECIPES[recipe] and not backbones.check(arch) and backbones.is_vit(arch)
    r = {"arch": "resnet50", **(VIT_RECIPES if vit else RECIPES)[recipe][method],
         **{n: v for n, v in overrides.items() if v is not None}}
    if overrides.get("warmup_epochs") is None:
        r["warmup_epochs"] = min(r["warmup_epochs"], r["epochs"] / 10)
    return r


def queue_settings(method, r, queue_size, warm_queue) -> tuple:
    """(whether the method has a queue -- MoCo's negatives or NNCLR's support set --, its size, --warm-queue) from
    the flags (None: the recipe's); the resolved --warm-queue is written into r."""
    queued = fm.TRAITS[method]["queue"] > 0
    if warm_queue and not queued:
        fail(f"--warm-queue fills MoCo v1/v2's queue or NNCLR's support set: --method {method} has none")
    warm_queue = r["warm_queue"] = queued and (r.get("warm_queue", False) if warm_queue is None else warm_queue)
    return queued, queue_size or r.get("queue_size") or fm.TRAITS[method]["queue"], warm_queue


def schedules(step, total, per_epoch, base_lr, r) -> tuple:
    """(lr, EMA momentum) of `step` under recipe r: warmup epochs, milestones as fractions of the run."""
    lr = fm.lr_at(step, total, base_lr, round(r["warmup_epochs"] * per_epoch), r["warmup_from"],
                  [round(f * total) for f in r["milestones"]])
    return lr, fm.momentum_at(step, total, r["momentum"], r["cosine_momentum"])


@dataclasses.dataclass
class Run:
    """A pretraining run's moving parts: what a step changes and what a checkpoint holds. `model` is the prepared
    (DDP) online encoder, called once per step; `online` the same module unwrapped; `queue` MoCo's negatives or
    NNCLR's support set (or None) with its pointer `ptr`; `cursor` where a stream's workers are (or None); `log` the
    main process's log.jsonl (else None) and `window` the steps since its last row (runs.Window)."""
    acc: Accelerator
    model: nn.Module
    online: nn.Module
    target: nn.Module
    optimizer: torch.optim.Optimizer
    queue: Optional[torch.Tensor] = None
    ptr: int = 0
    step: int = 0
    skipped: int = 0
    cursor: object = None
    log: object = None
    window: object = None


def train_step(run: Run, views, lr, m, loss_fn, clip_grad, check_finite, fill=False):
    """One optimisation step in the official order: lr, EMA before the forward, loss, backward, clip, step,
    enqueue (run.ptr moves). check_finite (--skip-nonfinite): apply nothing when the loss or a gradient is not finite
    on some process. fill (--warm-queue's first K/B steps): only enqueue this batch's keys of the unchanged encoders
    (the loss is logged). Returns (loss, outcome): "applied"; "skipped" (check_finite found a non-finite value: the
    caller rolls the EMA and BN statistics back); "overflow" (fp16: the loss scaler found inf gradients and skipped
    the optimizer step, lowering its scale; the EMA, BN statistics and queue moved, as under the official code's
    AMP)."""
    acc, model, optimizer = run.acc, run.model, run.optimizer
    if fill:
        with torch.no_grad(), acc.autocast():
            loss, keys = loss_fn(model, run.target, views, run.queue, run.step)
        run.ptr = fm.enqueue(run.queue, run.ptr, keys)
        return loss, "applied"
    fm.set_lr(optimizer, lr)
    fm.ema_update(run.target, run.online, m)  # official order: before the forward
    with acc.autocast():  # covers the target forward too
        loss, keys = loss_fn(model, run.target, views, run.queue, run.step)
    optimizer.zero_grad(set_to_none=True)
    acc.backward(loss)
    if clip_grad:
        acc.clip_grad_norm_(model.parameters(), clip_grad)  # unscales fp16 gradients first
    elif check_finite and acc.scaler is not None:
        acc.unscale_gradients()  # the check below sees the true gradients
    if check_finite and not runs.all_finite(loss, model, acc):
        if acc.scaler is not None:  # unscale_ recorded the overflow: update() lowers the scale and ends the step,
            acc.scaler.update()  # else the next step's unscale_ raises "already been called since the last update()"
        return loss, "skipped"
    optimizer.step()
    if run.queue is not None:
        run.ptr = fm.enqueue(run.queue, run.ptr, keys)
    return loss, "overflow" if acc.scaler is not None and optimizer.step_was_skipped else "applied"


# ----------------------------------------------------------------------------- setup

RANGES = {  # option: (low,) or (low, high), ">0": above 0; an option left to the recipe (None) is not checked
    "image_size": (8,), "grid": (1,), "combine_k": (1,), "combine_lambda": (0, 1), "beta_alpha": (">0",),
    "combinations": (0,), "multi_crop": (0,), "multi_crop_size": (8,), "batch_size": (1,), "epochs": (1,),
    "max_steps": (0,), "lr": (0,), "weight_decay": (0,), "warmup_epochs": (0,), "momentum": (0, 1), "tau": (">0",),
    "clip_grad": (0,), "bn_splits": (1,), "queue_size": (1,), "save_every": (0,), "keep": (0,),
    "max_bad_fraction": (0, 1), "log_every": (1,), "knn_every": (0,), "knn_bank_size": (0,), "workers": (0,)}


def settle(o, args: dict) -> list:
    """Step 1 (no work yet): each value checked (RANGES), the recipe resolved into o.r and the settings it decides
    written into `o` (arch, image_size, small_stem, queue, patches, variant; arch and image_size into `args` too: the
    checkpoint saves them resolved and a resume compares them), the ablations checked together. Returns the trackers."""
    with user_errors():
        trackers = runs.check_stage(args, RANGES, ["tensorboard"] * o.tensorboard + (o.log_with or []))
    o.r = r = resolve_recipe(o.recipe, o.method, dict(
        arch=o.arch, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, weight_decay=o.weight_decay,
        warmup_epochs=o.warmup_epochs, momentum=o.momentum, tau=o.tau, clip_grad=o.clip_grad))
    o.arch = args["arch"] = r["arch"]
    with user_errors():
        r["arch_kwargs"] = backbones.parse_kwargs(o.arch_kwargs)
    if o.image_size is None:
        o.image_size = args["image_size"] = r.get("image_size", 224)
    if o.small_stem is None:  # a torchvision ResNet's CIFAR stem; timm models keep their own
        o.small_stem = r.get("small_stem", o.image_size <= 64) and backbones.is_torchvision(o.arch)
    o.queued, o.queue_size, o.warm_queue = queue_settings(o.method, r, o.queue_size, o.warm_queue)
    o.patches = fm.TRAITS[o.method]["patches"] if o.patches is None else o.patches
    o.ablation = vr.Ablation(o.patches, o.pipeline, o.combine, o.combine_lambda, o.beta_alpha, o.combinations,
                             o.same_view, o.multi_crop)
    o.variant = vr.is_variant(o.method, o.ablation)
    if o.official_init and o.method != "fastmoco":
        fail(f"--official-init is the official Fast-MoCo code's init: --method {o.method} has its own (drop it)")
    if (o.official_init or o.pipeline.startswith("montage")) and not backbones.is_torchvision(o.arch):
        fail(f"--official-init and --pipeline montage-* reach into a torchvision ResNet: --arch {o.arch} is not one")
    if o.variant and (msg := vr.check(o.method, o.ablation, o.grid, o.combine_k, o.momentum)):
        fail(msg)
    return trackers


def check_args(acc, o):
    """One-line errors for settings that cannot run together on these processes, before any work."""
    B, world, grid, k = o.r["batch_size"], acc.num_processes, o.grid, o.combine_k
    if msg := backbones.check(o.arch, o.r["arch_kwargs"], o.small_stem):
        fail(msg)
    if B % world:
        fail(f"--batch-size {B} is not divisible by the {world} processes: use a multiple of {world}")
    if o.patches and (o.image_size % grid or not 1 <= k < grid * grid):
        fail(f"--grid {grid} must divide --image-size {o.image_size} and --combine-k must be in 1..{grid * grid - 1} "
             f"(got {k})")
    if o.queued and o.queue_size % B:
        fail(f"--queue-size {o.queue_size} is not divisible by the global batch {B}: MoCo enqueues whole batches")
    smallest = min(o.image_size // grid if o.patches else o.image_size,
                   o.multi_crop_size if o.multi_crop else o.image_size)
    if (acc.device.type == "cpu" and acc.mixed_precision == "bf16" and smallest <= (4 if o.small_stem else 16)
            and backbones.is_torchvision(o.arch)):
        # torch 2.14 CPU: the bf16 weight gradient of a stride-2 conv on a 1x1 input (layer4.0 here) is sometimes inf
        fail(f"{smallest} px inputs reach layer4 at 1x1, where CPU bf16 gives non-finite gradients: use "
             "--mixed-precision no, --small-stem, or a larger --image-size")
    if o.resume is not None and not o.resume.is_file():
        fail(f"--resume {o.resume} does not exist")


def size_run(o, acc, n):
    """Step 2's settings that need the data's size n: steps per epoch, total and stop step, the queue (never more
    than the images of one epoch), the workers."""
    B, world = o.r["batch_size"], acc.num_processes
    o.n, o.per_epoch = n, n // B
    if o.queued and o.queue_size > o.per_epoch * B:  # a queue larger than the data would hold each image's own key
        o.queue_size = o.per_epoch * B
        acc.print(f"--queue-size lowered to {o.queue_size}, the images of one epoch ({n} in the data set)")
    o.total = o.r["epochs"] * o.per_epoch
    o.stop = o.total if o.max_steps is None else min(o.total, o.max_steps)
    o.workers = min(8, (os.cpu_count() or 1) // world) if o.workers is None else o.workers


def split_bn(model, method, bn_splits, B, world):
    """MoCo v1/v2: BN over groups of the batch (--bn-splits; default 8 on one process, 1 with several, where the real
    shuffle-BN runs), MoCo's one-GPU stand-in for shuffle-BN. The target is a copy: its BN is split too."""
    if bn_splits and not fm.TRAITS[method]["shuffle_bn"]:
        fail(f"--bn-splits emulates MoCo v1/v2's shuffle-BN: --method {method} has none (drop --bn-splits)")
    if fm.TRAITS[method]["shuffle_bn"]:
        bn_splits = bn_splits or (1 if world > 1 else next(s for s in (8, 4, 2, 1) if B % s == 0 and B // s >= 8))
        if B // world % bn_splits:
            fail(f"--bn-splits {bn_splits} does not divide the batch of {B // world} per process")
        fm.split_bn(model.backbone, bn_splits)


def on_device(model, sync_bn, channels_last, acc, official_init=False):
    """(online encoder, its momentum encoder, memory format), on acc.device; SyncBN across several processes.
    official_init: the official Fast-MoCo code's init (target drawn independently, head BN gammas ~ U(0, 1))."""
    if sync_bn and acc.num_processes > 1:  # torch's SyncBN runs on GPUs only, fastmoco's on CPUs too
        model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if acc.device.type == "cuda" else
                 fm.convert_sync_bn(model))
    target = fm.target_encoder(model, independent=official_init)  # MoCo v3: the momentum encoder uses SyncBN too
    if official_init:
        fm.uniform_bn(model.projector, model.predictor, target.projector)
    if channels_last is None:  # measured on a 2-core AVX-512 CPU: channels_last helps bf16, hurts fp32
        channels_last = acc.device.type != "cpu" or acc.mixed_precision != "no"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(acc.device, memory_format=fmt), target.to(acc.device, memory_format=fmt), fmt


def build(o, acc) -> tuple:
    """Step 3: (online encoder, momentum encoder, optimizer, queue or None, memory format), the same init on every
    process (seeded here)."""
    torch.manual_seed(o.seed)
    net = None if backbones.is_torchvision(o.arch) else backbones.build(o.arch, kwargs=o.r["arch_kwargs"])  # timm's
    if o.r.get("mocov3_vit"):
        backbones.mocov3_vit(net)
    vit = o.r.get("mocov3_vit", False)  # MoCo v3's ViT heads
    model = (vr.Encoder(o.method, o.arch, o.small_stem, o.grid, o.combine_k, o.ablation, net, vit) if o.variant else
             fm.OnlineEncoder(o.method, o.arch, o.small_stem, o.grid, o.combine_k, net, vit))
    split_bn(model, o.method, o.bn_splits, o.r["batch_size"], acc.num_processes)
    model, target, fmt = on_device(model, o.r["sync_bn"], o.channels_last, acc, o.official_init)
    o.base_lr = o.r["lr"] * o.r["batch_size"] / 256
    optimizer = fm.make_optimizer(model, o.r["optimizer"], o.base_lr, o.r["weight_decay"], o.r["fix_predictor_lr"])
    # (K, 128) negatives, or NNCLR's (K, 256) support set
    queue = fm.make_queue(o.queue_size, fm.TRAITS[o.method]["key_dim"], acc.device) if o.queued else None
    return model, target, optimizer, queue, fmt


# ----------------------------------------------------------------------------- saving

def save(run: Run, path, meta, keep):
    """Write the run's state from the main process (atomic), then keep only the newest `keep` periodic checkpoints."""
    acc = run.acc
    acc.wait_for_everyone()
    tensors = runs.state_tensors(run.online, run.target, run.optimizer, run.queue, run.ptr, acc)
    if run.cursor:  # streaming: where every worker of every process is, (world * W, 2)
        tensors["data.stream"] = acc.gather(run.cursor.state(meta["step"]).to(acc.device))
    if acc.is_main_process:
        try:
            ck.save_checkpoint(path, tensors, meta)
        except OSError as e:
            fail(f"{e}; free disk space and rerun the same command: it resumes from the last checkpoint in "
                 f"{path.parent}, which is intact")
        runs.rotate(path.parent, keep)
    acc.wait_for_everyone()  # if the write fails, the others are still here to leave with its error (not exiting 0)


def at_step(meta, run: Run, per_epoch) -> dict:
    """A checkpoint's metadata: the run's, and where it stands."""
    return dict(meta, step=run.step, epoch=run.step / per_epoch, skipped_steps=run.skipped,
                train_seconds=run.window.seconds())


def log_row(run: Run, o, lr, m, bad) -> str:
    """Close the log window at run.step (a host sync): check the loss and bad images, write the row, return its
    text. bad: undecodable images replaced or skipped so far by this process."""
    acc, step, B, window = run.acc, run.step, o.r["batch_size"], run.window
    mean, ips = window.read(step, B)
    if not math.isfinite(mean) and not o.skip_nonfinite:  # checked before any save: no NaN on disk
        fail(f"loss is {mean} at step {step}; the last checkpoint in {o.output_dir} is intact (rerun "
             "the same command with a lower --lr, or --skip-nonfinite)")
    with user_errors():
        bad_all = runs.check_bad_images(acc, bad, max(step * B, o.n), o.max_bad_fraction)
    fp16 = dict(fp16_overflows=window.overflows, loss_scale=acc.scaler.get_scale()) if acc.scaler else {}
    runs.record(acc, run.log, step, o.per_epoch, dict(
        loss=mean, lr=lr, m=m, img_per_s=round(ips, 1), skipped_steps=run.skipped, bad_images=bad_all,
        train_seconds=round(window.seconds(), 2), **fp16))
    window.reset(step)
    return f"loss {mean:.4f} lr {lr:.3g} m {m:.4f} {ips:.0f} img/s"


def knn_row(run: Run, o, knn_data) -> float:
    """Log kNN top-1 of the online backbone (knn.knn_top1); its time does not count as training time."""
    t0 = time.perf_counter()
    with user_errors():  # no decodable image in a kNN split
        top1, bank = knn.knn_top1(run.online.backbone, *knn_data, o.image_column, o.image_size, run.acc,
                                  o.knn_bank_size, o.seed, o.workers)
    runs.record(run.acc, run.log, run.step, o.per_epoch, dict(
        knn_top1=top1, knn_bank=bank, knn_seconds=time.perf_counter() - t0,
        train_seconds=round(run.window.seconds() - (time.perf_counter() - t0), 2)))
    run.window.t += time.perf_counter() - t0
    return top1


def train(run: Run, o, batches, to_views, loss_fn, meta, knn_data) -> list:
    """Step 5: train from run.step to o.stop on `batches` ((*views, info) of this process; to_views puts them on the
    device), logging, evaluating kNN and saving periodic checkpoints on the way. Returns the kNN top-1s."""
    warm_steps = len(run.queue) // o.r["batch_size"] if o.warm_queue else 0  # --warm-queue: fill the queue first
    top1s = [knn_row(run, o, knn_data)] if o.knn_every and run.step == 0 else []
    bad = 0  # undecodable images replaced (map-style) or skipped (streaming), this process
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not run.acc.is_main_process)
    with progress:
        task = progress.add_task(f"{o.method} {o.arch}", total=o.stop, completed=run.step, info="")
        for i, (*xs, info) in enumerate(batches, run.cursor.first if run.cursor else run.step):
            if run.cursor:
                run.cursor.update(i, info)
            if i < run.step:  # streaming resume: batches regenerated only to realign the workers (StreamCursor)
                continue
            if run.step >= o.stop:  # resumed from a run that had already finished (a stream never ends by itself)
                break
            bad += int(info[:, 0].sum())
            snap = runs.snapshot(run.target, run.online) if o.skip_nonfinite else None  # rolled back on a skip
            lr, m = schedules(run.step, o.total, o.per_epoch, o.base_lr, o.r)
            loss, outcome = train_step(run, to_views(xs), lr, m, loss_fn, o.r["clip_grad"], o.skip_nonfinite,
                                       fill=run.step < warm_steps)
            if outcome == "skipped":  # --skip-nonfinite: no optimizer, EMA, BN or queue update
                runs.restore(run.target, run.online, snap)
                run.skipped, run.window.skipped = run.skipped + 1, run.window.skipped + 1
            else:
                run.window.add(loss)
                run.window.overflows += outcome == "overflow"
            run.step += 1
            step = run.step
            if step % o.log_every == 0 or step == o.stop or (o.save_every and step % o.save_every == 0):  # syncs
                progress.update(task, info=log_row(run, o, lr, m, bad))
            progress.update(task, completed=step)
            if o.knn_every and step % (o.knn_every * o.per_epoch) == 0:
                top1s.append(knn_row(run, o, knn_data))
            if o.save_every and step % o.save_every == 0 and step < o.stop:
                save(run, o.output_dir / f"ckpt-{step:07d}.safetensors", at_step(meta, run, o.per_epoch), o.keep)
            if step >= o.stop:
                break
    return top1s


def closing_line(path, step, total, seconds, top1s) -> str:
    knn_text = f"; kNN top-1 {top1s[0]:.1f}% at the start -> {top1s[-1]:.1f}% at the end" if len(top1s) > 1 else ""
    return f"wrote {path} (step {step}/{total}, {seconds / 60:.1f} min of training){knn_text}"


# main()'s options: typer.Option arguments by name (main's signature gives each its type and default)
OPTIONS = dict(
    data=dict(help="Hub dataset name (streamed), local folder of parquet files / images, a saved dataset, or 'demo' "
                   "(built-in, no download)."),
    method=dict(help="Fast-MoCo (ECCV 2022), MoCo v3, v2, v1, or (Fast-MoCo App. C.1) BYOL, SimSiam, NNCLR."),
    recipe=dict(help="imagenet: the papers' recipes. small: for 32-96 px datasets of up to ~100k images (CIFAR, "
                     "STL-10): lightly's / solo-learn's CIFAR recipes, CIFAR stem, 32 px, batch 256, 200 epochs "
                     "(README)."),
    arch=dict(help=f"torchvision ResNet ({', '.join(fm.ARCHS)}) or any timm model (convnext_atto, "
                   "vit_small_patch16_224, ...; a ViT gets MoCo v3's ViT recipe). Recipe: resnet50, small resnet18."),
    arch_kwargs=dict(help="timm model arguments, name=value,... (e.g. patch_size=4,img_size=32 for a CIFAR ViT); "
                          "saved with the checkpoint, so timm.create_model(arch, num_classes=0, **them) loads its "
                          "backbone strictly."),
    image_size=dict(help="Crop size of the augmented views. Recipe: 224, small 32."),
    small_stem=dict(help="3x3 stride-1 conv1, no max-pool (CIFAR-style). Default: on for --recipe small or "
                         "--image-size <= 64."),
    grid=dict(help="Fast-MoCo: divide each view into grid x grid patches."),
    combine_k=dict(help="Fast-MoCo: patches per combined embedding, the paper's k (1..grid^2-1)."),
    patches=dict(rich_help_panel=ABLATIONS, help="Combinatorial patches on the online branch. Default: on for "
                                                 "fastmoco only; fastmoco --no-patches is MoCo v3's loss under "
                                                 "Fast-MoCo's recipe (Table 4b's baseline)."),
    pipeline=dict(rich_help_panel=ABLATIONS, help="Where patches are combined (Table 4a)."),
    combine=dict(rich_help_panel=ABLATIONS, help="Combine operator (Sec. 5.5)."),
    combine_lambda=dict(rich_help_panel=ABLATIONS, help="--combine weighted: weight of a subset's first patch."),
    beta_alpha=dict(rich_help_panel=ABLATIONS, help="--combine beta: weights ~ Beta(a, a) (Dirichlet for k>2)."),
    combinations=dict(rich_help_panel=ABLATIONS, help="Use this many of the C(grid^2, k) combinations, each patch "
                                                      "equally often (Sec. 5.4); 0 = all."),
    same_view=dict(rich_help_panel=ABLATIONS, help="Positives from the same augmented view (Sec. 5.1)."),
    multi_crop=dict(rich_help_panel=ABLATIONS, help="Extra low-resolution crops per image (Table 4b: 1)."),
    multi_crop_size=dict(rich_help_panel=ABLATIONS, help="Size of the multi-crop views (SwAV: 96 at 224)."),
    batch_size=dict(help="Global batch (all processes). Recipe: fastmoco/simsiam 512, mocov3/byol/nnclr 4096, v2/v1 "
                         "256."),
    epochs=dict(help="Recipe: 100, mocov2/v1 200."),
    max_steps=dict(help="Stop after this many optimisation steps (smoke runs, benchmarks); schedules span --epochs. "
                        "0: only the initial checkpoint (a random-init baseline for the probes)."),
    lr=dict(help="lr per 256 images (used: lr x batch/256). Recipe: fastmoco/simsiam 0.05, mocov3 0.6, byol 0.2, "
                 "nnclr 0.3, v2/v1 0.03."),
    weight_decay=dict(help="Recipe: 1e-4 (mocov3/nnclr 1e-6, byol 1.5e-6)"),
    warmup_epochs=dict(help="Linear lr warmup. Recipe (cut to a tenth of shorter runs): fastmoco 1, "
                            "mocov3/byol/nnclr 10; small 0."),
    momentum=dict(help="EMA momentum m. Recipe: fastmoco 0.99 constant, mocov3 0.99 -> 1 (cosine), byol 0.996 -> 1, "
                       "v2/v1 0.999; simsiam/nnclr have none."),
    tau=dict(help="InfoNCE temperature. Recipe: 1.0, mocov2 0.2, mocov1 0.07, nnclr 0.1."),
    clip_grad=dict(help="Global grad-norm clip, 0 = off. Recipe: fastmoco 1.0."),
    bn_splits=dict(help="MoCo v1/v2 on one process: normalise the batch in this many groups, with the key batch "
                        "shuffled, MoCo's one-GPU stand-in for shuffle-BN (its CIFAR demo: 8). Default: 8 (fewer if "
                        "the batch gives a group under 8 images) on one process; 1 with several (real shuffle-BN)."),
    official_init=dict(rich_help_panel=ABLATIONS, help="Fast-MoCo: the official code's init (EMA target drawn "
                                                       "independently of the online encoder, head BN gammas ~ U(0, "
                                                       "1)) instead of MoCo v3's (target = a copy, gammas 1)."),
    queue_size=dict(help="MoCo v1/v2: negatives K in the queue (65536, small 4096); NNCLR: support set size (98304, "
                         "small 4096). Never more than the dataset."),
    warm_queue=dict(help="MoCo v1/v2, NNCLR: the first K/batch steps only fill the queue with real keys (no "
                         "update), instead of training against random vectors. Recipe: small on, imagenet off (the "
                         "official code)."),
    output_dir=dict(help="Checkpoints, log.jsonl and TensorBoard logs go here."),
    seed=dict(help="Seeds the init, the data order and every augmentation."),
    resume=dict(help="Continue the run saved in this checkpoint. Default: DIR's newest valid checkpoint if there is "
                     "one (restart a killed job with the same command); a new run needs a new --output-dir."),
    save_every=dict(help="Write DIR/ckpt-STEP.safetensors every N steps (0 = off)."),
    keep=dict(help="Keep only the newest N periodic checkpoints (0 = all)."),
    skip_nonfinite=dict(help="Skip (and count) a step whose loss or gradients are NaN/inf instead of stopping the "
                             "run."),
    max_bad_fraction=dict(help="Undecodable images are skipped and logged; stop when more than this fraction of the "
                               "images is."),
    log_every=dict(help="Sync and log the loss every N steps."),
    knn_every=dict(help="kNN top-1 of the online backbone every N epochs on labelled data with a validation or test "
                        "split, local or streamed (0 = off)."),
    knn_bank_size=dict(help="kNN bank: this many train images (seeded, class-balanced; the same at every "
                            "evaluation) instead of the whole split (0). For ImageNet, e.g. 100 per class: "
                            "--knn-bank-size 100000."),
    augment_on=dict(help="cpu: the DataLoader workers augment. device: they only decode, place the image in a fixed "
                         "canvas (512 px at 224) and draw each view's parameters (same recipe and seeds); crops, "
                         "jitter, blur, solarize, flip and normalisation run batched on the accelerator "
                         "(gpu_augment.py, docs/benchmarks.md)."),
    workers=dict(help="DataLoader workers per process (default: cores / processes, max 8)."),
    image_column=dict(help="Image column of the dataset."),
    streaming=dict(help="Stream the data (always for Hub names; off for local data unless set)."),
    mixed_precision=dict(help="no, bf16 or fp16. Default: Accelerate's config / `accelerate launch "
                              "--mixed_precision`."),
    channels_last=dict(help="channels_last memory format. Default: on, except fp32 on CPU where it is ~3x slower."),
    tensorboard=dict(help="Log to TensorBoard (DIR/pretrain) through Accelerate: the same as --log-with "
                          "tensorboard."),
    log_with=dict(help="Experiment trackers (Accelerate's names: tensorboard, wandb, mlflow, trackio, ...); repeat "
                       "the flag or separate with commas. Each reads its usual environment (WANDB_MODE, "
                       "MLFLOW_TRACKING_URI, ...)."),
)


def option(name: str):
    """The typer.Option of main's parameter `name` (its help, its --help panel)."""
    return typer.Option(**OPTIONS[name])


@app.command()
@together.leave_together  # one process fails (full disk, a data loader): all exit at once with its one-line error
def main(
    data: Annotated[str, option("data")] = "ILSVRC/imagenet-1k",
    method: Annotated[Method, option("method")] = Method.fastmoco,
    recipe: Annotated[Recipe, option("recipe")] = Recipe.imagenet,
    arch: Annotated[Optional[str], option("arch")] = None,
    arch_kwargs: Annotated[Optional[str], option("arch_kwargs")] = None,
    image_size: Annotated[Optional[int], option("image_size")] = None,
    small_stem: Annotated[Optional[bool], option("small_stem")] = None,
    grid: Annotated[int, option("grid")] = 2,
    combine_k: Annotated[int, option("combine_k")] = 2,
    patches: Annotated[Optional[bool], option("patches")] = None,
    pipeline: Annotated[Pipeline, option("pipeline")] = Pipeline(vr.PIPELINES[0]),
    combine: Annotated[Combine, option("combine")] = Combine.mean,
    combine_lambda: Annotated[float, option("combine_lambda")] = 0.5,
    beta_alpha: Annotated[float, option("beta_alpha")] = 1.0,
    combinations: Annotated[int, option("combinations")] = 0,
    same_view: Annotated[bool, option("same_view")] = False,
    multi_crop: Annotated[int, option("multi_crop")] = 0,
    multi_crop_size: Annotated[int, option("multi_crop_size")] = 96,
    batch_size: Annotated[Optional[int], option("batch_size")] = None,
    epochs: Annotated[Optional[int], option("epochs")] = None,
    max_steps: Annotated[Optional[int], option("max_steps")] = None,
    lr: Annotated[Optional[float], option("lr")] = None,
    weight_decay: Annotated[Optional[float], option("weight_decay")] = None,
    warmup_epochs: Annotated[Optional[int], option("warmup_epochs")] = None,
    momentum: Annotated[Optional[float], option("momentum")] = None,
    tau: Annotated[Optional[float], option("tau")] = None,
    clip_grad: Annotated[Optional[float], option("clip_grad")] = None,
    bn_splits: Annotated[Optional[int], option("bn_splits")] = None,
    official_init: Annotated[bool, option("official_init")] = False,
    queue_size: Annotated[Optional[int], option("queue_size")] = None,
    warm_queue: Annotated[Optional[bool], option("warm_queue")] = None,
    output_dir: Annotated[Path, option("output_dir")] = Path("runs/pretrain"),
    seed: Annotated[int, option("seed")] = 0,
    resume: Annotated[Optional[Path], option("resume")] = None,
    save_every: Annotated[int, option("save_every")] = 1000,
    keep: Annotated[int, option("keep")] = 3,
    skip_nonfinite: Annotated[bool, option("skip_nonfinite")] = False,
    max_bad_fraction: Annotated[float, option("max_bad_fraction")] = 0.01,
    log_every: Annotated[int, option("log_every")] = 20,
    knn_every: Annotated[int, option("knn_every")] = 0,
    knn_bank_size: Annotated[int, option("knn_bank_size")] = 0,
    augment_on: Annotated[AugmentOn, option("augment_on")] = AugmentOn.cpu,
    workers: Annotated[Optional[int], option("workers")] = None,
    image_column: Annotated[str, option("image_column")] = "image",
    streaming: Annotated[Optional[bool], option("streaming")] = None,
    mixed_precision: Annotated[Optional[Precision], option("mixed_precision")] = None,
    channels_last: Annotated[Optional[bool], option("channels_last")] = None,
    tensorboard: Annotated[bool, option("tensorboard")] = True,
    log_with: Annotated[Optional[List[str]], option("log_with")] = None,
):
    """Pretrain a ResNet (or any timm backbone) with Fast-MoCo or a MoCo baseline; writes DIR/ckpt.safetensors."""
    o = options(locals())  # the settings: the steps below complete them
    args = saved_args(vars(o))  # as the checkpoint records them
    # 1. every argument checked before any work: each value, then the recipe and the values together
    trackers = settle(o, args)
    acc = Accelerator(mixed_precision=o.mixed_precision, log_with=trackers or None, project_dir=str(o.output_dir))
    check_args(acc, o)
    with user_errors():
        point = runs.resume_point(o.output_dir, o.resume)  # --resume, else DIR's newest valid checkpoint (or None)
        # the same run continues: its settings must be the checkpoint's (where it logs to may change)
        runs.check_same_run(point, {k: v for k, v in args.items() if k != "log_with"})

    # 2. data
    B, world = o.r["batch_size"], acc.num_processes
    with user_errors():
        ds, n, o.streaming, knn_data = pretrain_data(o.data, o.streaming, o.image_column, B, o.knn_every)
    size_run(o, acc, n)

    # 3. online and target encoders, optimizer, queue (same init on every process)
    model, target, optimizer, queue, fmt = build(o, acc)

    # 4. resume: model, target, optimizer, queue, loss scaler, data position, RNG
    ptr, step, skipped = (runs.load_state(point.tensors, point.meta, model, target, optimizer, queue) if point else
                          (0, 0, 0))
    with user_errors():
        runs.check_same_start(acc, step)  # several machines: all of them found the same checkpoint
    tensors = point.tensors if point else {}
    model, optimizer = acc.prepare(model, optimizer)  # DDP: the momentum encoder has no trainable params, not prepared
    if point is not None:
        runs.load_scaler(acc.scaler, tensors)
    with user_errors():
        transforms = augmentations(o.r["aug"], o.image_size) + small_crops(o.r["aug"], o.multi_crop_size, o.multi_crop)
        on_dev = gpu_augment.DeviceViews(transforms, 16 * o.image_size // 7) if o.augment_on == "device" else None
        loader = loader_for(ds, n, o.streaming, o.image_column, on_dev.worker if on_dev else transforms, B,
                            acc.process_index, world, o.seed, step, o.stop, o.workers, pin=acc.device.type == "cuda",
                            stream_state=tensors.get("data.stream"))
    run = Run(acc, model, acc.unwrap_model(model), target, optimizer, queue, ptr, step, skipped,
              cursor=getattr(loader, "cursor", None))  # streaming: where each worker is, saved for an exact resume
    # iter() draws the workers' base seed from the torch RNG: restore the saved state after it
    batches = one_line_errors(iter(loader), acc.process_index, o.output_dir)
    first = next(batches, None)  # data that cannot give one batch fails here, before DIR, its log or TensorBoard exist
    batches = itertools.chain([first] if first is not None else [], batches)
    if point is not None:
        torch.set_rng_state(tensors["rng.torch"])

    # 5. train
    o.output_dir.mkdir(parents=True, exist_ok=True)
    acc.init_trackers("pretrain", config={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))})
    meta = dict(format="fastmoco-pretrain-v1", method=o.method, arch=o.arch, arch_kwargs=o.r["arch_kwargs"],
                small_stem=o.small_stem, world_size=world, image_size=o.image_size, args=args, recipe=o.r,
                fastmoco_sha256=ck.source_hash(), total_steps=o.total)
    run.log = runs.open_log(o.output_dir / "log.jsonl", step) if acc.is_main_process else None
    run.window = runs.Window(acc, step, point.meta.get("train_seconds", 0.0) if point else 0.0)  # between two log rows
    loss_fn = functools.partial(batch_loss, o, acc.process_index)
    to_views = ((lambda xs: on_dev(xs, acc.device, fmt)) if on_dev else
                (lambda xs: [x.to(acc.device, non_blocking=True, memory_format=fmt) for x in xs]))
    top1s = train(run, o, batches, to_views, loss_fn, meta, knn_data)

    # 6. the final checkpoint
    save(run, o.output_dir / "ckpt.safetensors", at_step(meta, run, o.per_epoch), o.keep)
    acc.end_training()
    if run.log:
        run.log.close()
    acc.print(closing_line(o.output_dir / "ckpt.safetensors", run.step, o.total, run.window.seconds(), top1s))


if __name__ == "__main__":
    app()
