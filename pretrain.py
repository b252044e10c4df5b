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
from cli import Precision, fail, saved_args, user_errors
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

def batch_loss(model, target, views, queue, step, *, method, variant, tau, patches, same_view, seed, rank):
    """This step's (loss, keys to enqueue or None): variants.py's (BYOL, SimSiam, NNCLR, the ablations) or
    fastmoco.py's. Their random draws are seeded per step (and process), so a resumed run repeats them."""
    x1, x2, *small = views
    if variant:
        return vr.variant_loss(method, model, target, x1, x2, small, queue, tau, patches, same_view,
                               sample_seed(seed, step, rank))
    g = torch.Generator().manual_seed(sample_seed(seed, step))  # MoCo v1/v2 shuffle-BN: same on every process
    return fm.step_loss(method, model, target, x1, x2, tau, queue, g)


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
    NNCLR's support set (or None) with its pointer `ptr`; `cursor` where a stream's workers are (or None)."""
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


def train_step(run: Run, views, lr, m, loss_fn, clip_grad, check_finite, fill=False):
    """One optimisation step in the official order: lr, EMA before the forward, loss, backward, clip, step,
    enqueue (run.ptr moves). check_finite (--skip-nonfinite): apply nothing when the loss or a gradient is not finite
    on some process. fill (--warm-queue's first K/B steps): only enqueue this batch's keys of the unchanged encoders
    (the loss is logged). Returns (loss, outcome): "applied"; "skipped" (check_finite found a non-finite value: the
    caller rolls the EMA and BN statistics back); "overflow" (fp16: the loss scaler found inf gradients and skipped
    the optimizer step, lowering its scale; the EMA, BN statistics and queue moved, as under the official code's AMP)."""
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


def check_args(acc, r, arch, image_size, small_stem, patches, grid, k, queue_size, multi_crop, multi_crop_size,
               resume):
    """One-line errors for settings that cannot run together, before any work (each value alone: RANGES)."""
    B, world = r["batch_size"], acc.num_processes
    if msg := backbones.check(arch, r["arch_kwargs"], small_stem):
        fail(msg)
    if B % world:
        fail(f"--batch-size {B} is not divisible by the {world} processes: use a multiple of {world}")
    if patches and (image_size % grid or not 1 <= k < grid * grid):
        fail(f"--grid {grid} must divide --image-size {image_size} and --combine-k must be in 1..{grid * grid - 1} "
             f"(got {k})")
    if queue_size and queue_size % B:
        fail(f"--queue-size {queue_size} is not divisible by the global batch {B}: MoCo enqueues whole batches")
    smallest = min(image_size // grid if patches else image_size, multi_crop_size if multi_crop else image_size)
    if (acc.device.type == "cpu" and acc.mixed_precision == "bf16" and smallest <= (4 if small_stem else 16)
            and backbones.is_torchvision(arch)):
        # torch 2.14 CPU: the bf16 weight gradient of a stride-2 conv on a 1x1 input (layer4.0 here) is sometimes inf
        fail(f"{smallest} px inputs reach layer4 at 1x1, where CPU bf16 gives non-finite gradients: use "
             "--mixed-precision no, --small-stem, or a larger --image-size")
    if resume is not None and not resume.is_file():
        fail(f"--resume {resume} does not exist")


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


def at_step(meta, run: Run, per_epoch, window) -> dict:
    """A checkpoint's metadata: the run's, and where it stands."""
    return dict(meta, step=run.step, epoch=run.step / per_epoch, skipped_steps=run.skipped,
                train_seconds=window.seconds())


def log_row(acc, log, window, step, per_epoch, B, seen, bad, skipped, lr, m, skip_nonfinite, max_bad_fraction,
            output_dir) -> str:
    """Close the log window at `step` (a host sync): check the loss and bad images, write the row, return its text."""
    mean, ips = window.read(step, B)
    if not math.isfinite(mean) and not skip_nonfinite:  # checked before any save: no NaN on disk
        fail(f"loss is {mean} at step {step}; the last checkpoint in {output_dir} is intact (rerun "
             "the same command with a lower --lr, or --skip-nonfinite)")
    with user_errors():
        bad_all = runs.check_bad_images(acc, bad, seen, max_bad_fraction)
    fp16 = dict(fp16_overflows=window.overflows, loss_scale=acc.scaler.get_scale()) if acc.scaler else {}
    runs.record(acc, log, step, per_epoch, dict(loss=mean, lr=lr, m=m, img_per_s=round(ips, 1), skipped_steps=skipped,
                                                bad_images=bad_all, train_seconds=round(window.seconds(), 2), **fp16))
    window.reset(step)
    return f"loss {mean:.4f} lr {lr:.3g} m {m:.4f} {ips:.0f} img/s"


def closing_line(path, step, total, seconds, top1s) -> str:
    knn_text = f"; kNN top-1 {top1s[0]:.1f}% at the start -> {top1s[-1]:.1f}% at the end" if len(top1s) > 1 else ""
    return f"wrote {path} (step {step}/{total}, {seconds / 60:.1f} min of training){knn_text}"


@app.command()
@together.leave_together  # one process fails (full disk, a data loader): all exit at once with its one-line error
def main(
    data: Annotated[str, typer.Option(help="Hub dataset name (streamed), local folder of parquet files / images, "
                                           "a saved dataset, or 'demo' (built-in, no download).")
                ] = "ILSVRC/imagenet-1k",
    method: Annotated[Method, typer.Option(help="Fast-MoCo (ECCV 2022), MoCo v3, v2, v1, or (Fast-MoCo App. C.1) "
                                                "BYOL, SimSiam, NNCLR.")] = Method.fastmoco,
    recipe: Annotated[Recipe, typer.Option(
        help="imagenet: the papers' recipes. small: for 32-96 px datasets of up to ~100k images (CIFAR, STL-10): "
             "lightly's / solo-learn's CIFAR recipes, CIFAR stem, 32 px, batch 256, 200 epochs (README).")
    ] = Recipe.imagenet,
    arch: Annotated[Optional[str], typer.Option(
        help=f"torchvision ResNet ({', '.join(fm.ARCHS)}) or any timm model (convnext_atto, vit_small_patch16_224, "
             "...; a ViT gets MoCo v3's ViT recipe). Recipe: resnet50, small resnet18.")] = None,
    arch_kwargs: Annotated[Optional[str], typer.Option(
        help="timm model arguments, name=value,... (e.g. patch_size=4,img_size=32 for a CIFAR ViT); saved with the "
             "checkpoint, so timm.create_model(arch, num_classes=0, **them) loads its backbone strictly.")] = None,
    image_size: Annotated[Optional[int], typer.Option(
        help="Crop size of the augmented views. Recipe: 224, small 32.")] = None,
    small_stem: Annotated[Optional[bool], typer.Option(
        help="3x3 stride-1 conv1, no max-pool (CIFAR-style). Default: on for --recipe small or --image-size <= 64.")
    ] = None,
    grid: Annotated[int, typer.Option(help="Fast-MoCo: divide each view into grid x grid patches.")] = 2,
    combine_k: Annotated[int, typer.Option(
        help="Fast-MoCo: patches per combined embedding, the paper's k (1..grid^2-1).")] = 2,
    patches: Annotated[Optional[bool], typer.Option(rich_help_panel=ABLATIONS,
        help="Combinatorial patches on the online branch. Default: on for fastmoco only; fastmoco --no-patches is "
             "MoCo v3's loss under Fast-MoCo's recipe (Table 4b's baseline).")] = None,
    pipeline: Annotated[Pipeline, typer.Option(
        rich_help_panel=ABLATIONS, help="Where patches are combined (Table 4a).")] = Pipeline(vr.PIPELINES[0]),
    combine: Annotated[Combine, typer.Option(
        rich_help_panel=ABLATIONS, help="Combine operator (Sec. 5.5).")] = Combine.mean,
    combine_lambda: Annotated[float, typer.Option(
        rich_help_panel=ABLATIONS, help="--combine weighted: weight of a subset's first patch.")] = 0.5,
    beta_alpha: Annotated[float, typer.Option(
        rich_help_panel=ABLATIONS, help="--combine beta: weights ~ Beta(a, a) (Dirichlet for k>2).")] = 1.0,
    combinations: Annotated[int, typer.Option(rich_help_panel=ABLATIONS,
        help="Use this many of the C(grid^2, k) combinations, each patch equally often (Sec. 5.4); 0 = all.")] = 0,
    same_view: Annotated[bool, typer.Option(
        rich_help_panel=ABLATIONS, help="Positives from the same augmented view (Sec. 5.1).")] = False,
    multi_crop: Annotated[int, typer.Option(
        rich_help_panel=ABLATIONS, help="Extra low-resolution crops per image (Table 4b: 1).")] = 0,
    multi_crop_size: Annotated[int, typer.Option(
        rich_help_panel=ABLATIONS, help="Size of the multi-crop views (SwAV: 96 at 224).")] = 96,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Global batch (all processes). Recipe: fastmoco/simsiam 512, mocov3/byol/nnclr 4096, v2/v1 256.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Recipe: 100, mocov2/v1 200.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        help="Stop after this many optimisation steps (smoke runs, benchmarks); schedules span --epochs. 0: only the "
             "initial checkpoint (a random-init baseline for the probes).")] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="lr per 256 images (used: lr x batch/256). Recipe: fastmoco/simsiam 0.05, mocov3 0.6, byol 0.2, "
             "nnclr 0.3, v2/v1 0.03.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Recipe: 1e-4 (mocov3/nnclr 1e-6, byol 1.5e-6)")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option(
        help="Linear lr warmup. Recipe (cut to a tenth of shorter runs): fastmoco 1, mocov3/byol/nnclr 10; small 0.")
    ] = None,
    momentum: Annotated[Optional[float], typer.Option(
        help="EMA momentum m. Recipe: fastmoco 0.99 constant, mocov3 0.99 -> 1 (cosine), byol 0.996 -> 1, "
             "v2/v1 0.999; simsiam/nnclr have none.")] = None,
    tau: Annotated[Optional[float], typer.Option(
        help="InfoNCE temperature. Recipe: 1.0, mocov2 0.2, mocov1 0.07, nnclr 0.1.")] = None,
    clip_grad: Annotated[Optional[float], typer.Option(
        help="Global grad-norm clip, 0 = off. Recipe: fastmoco 1.0.")] = None,
    bn_splits: Annotated[Optional[int], typer.Option(
        help="MoCo v1/v2 on one process: normalise the batch in this many groups, with the key batch shuffled, "
             "MoCo's one-GPU stand-in for shuffle-BN (its CIFAR demo: 8). Default: 8 (fewer if the batch gives a "
             "group under 8 images) on one process; 1 with several (real shuffle-BN).")] = None,
    official_init: Annotated[bool, typer.Option(rich_help_panel=ABLATIONS,
        help="Fast-MoCo: the official code's init (EMA target drawn independently of the online encoder, head BN "
             "gammas ~ U(0, 1)) instead of MoCo v3's (target = a copy, gammas 1).")] = False,
    queue_size: Annotated[Optional[int], typer.Option(
        help="MoCo v1/v2: negatives K in the queue (65536, small 4096); NNCLR: support set size (98304, small "
             "4096). Never more than the dataset.")] = None,
    warm_queue: Annotated[Optional[bool], typer.Option(
        help="MoCo v1/v2, NNCLR: the first K/batch steps only fill the queue with real keys (no update), instead of "
             "training against random vectors. Recipe: small on, imagenet off (the official code).")] = None,
    output_dir: Annotated[Path, typer.Option(help="Checkpoints, log.jsonl and TensorBoard logs go here.")] = Path(
        "runs/pretrain"),
    seed: Annotated[int, typer.Option(help="Seeds the init, the data order and every augmentation.")] = 0,
    resume: Annotated[Optional[Path], typer.Option(
        help="Continue the run saved in this checkpoint. Default: DIR's newest valid checkpoint if there is one "
             "(restart a killed job with the same command); a new run needs a new --output-dir.")] = None,
    save_every: Annotated[int, typer.Option(help="Write DIR/ckpt-STEP.safetensors every N steps (0 = off).")] = 1000,
    keep: Annotated[int, typer.Option(help="Keep only the newest N periodic checkpoints (0 = all).")] = 3,
    skip_nonfinite: Annotated[bool, typer.Option(
        help="Skip (and count) a step whose loss or gradients are NaN/inf instead of stopping the run.")] = False,
    max_bad_fraction: Annotated[float, typer.Option(
        help="Undecodable images are skipped and logged; stop when more than this fraction of the images is.")
                                ] = 0.01,
    log_every: Annotated[int, typer.Option(help="Sync and log the loss every N steps.")] = 20,
    knn_every: Annotated[int, typer.Option(
        help="kNN top-1 of the online backbone every N epochs on labelled data with a validation or test split, "
             "local or streamed (0 = off).")] = 0,
    knn_bank_size: Annotated[int, typer.Option(
        help="kNN bank: this many train images (seeded, class-balanced; the same at every evaluation) instead of "
             "the whole split (0). For ImageNet, e.g. 100 per class: --knn-bank-size 100000.")] = 0,
    augment_on: Annotated[AugmentOn, typer.Option(
        help="cpu: the DataLoader workers augment. device: they only decode, place the image in a fixed canvas "
             "(512 px at 224) and draw each view's parameters (same recipe and seeds); crops, jitter, blur, solarize, "
             "flip and normalisation run batched on the accelerator (gpu_augment.py, docs/benchmarks.md).")
    ] = AugmentOn.cpu,
    workers: Annotated[Optional[int], typer.Option(
        help="DataLoader workers per process (default: cores / processes, max 8).")] = None,
    image_column: Annotated[str, typer.Option(help="Image column of the dataset.")] = "image",
    streaming: Annotated[Optional[bool], typer.Option(
        help="Stream the data (always for Hub names; off for local data unless set).")] = None,
    mixed_precision: Annotated[Optional[Precision], typer.Option(
        help="no, bf16 or fp16. Default: Accelerate's config / `accelerate launch --mixed_precision`.")] = None,
    channels_last: Annotated[Optional[bool], typer.Option(
        help="channels_last memory format. Default: on, except fp32 on CPU where it is ~3x slower.")] = None,
    tensorboard: Annotated[bool, typer.Option(
        help="Log to TensorBoard (DIR/pretrain) through Accelerate: the same as --log-with tensorboard.")] = True,
    log_with: Annotated[Optional[List[str]], typer.Option(
        help="Experiment trackers (Accelerate's names: tensorboard, wandb, mlflow, trackio, ...); repeat the flag or "
             "separate with commas. Each reads its usual environment (WANDB_MODE, MLFLOW_TRACKING_URI, ...).")] = None,
):
    """Pretrain a ResNet (or any timm backbone) with Fast-MoCo or a MoCo baseline; writes DIR/ckpt.safetensors."""
    args = saved_args(locals())
    # 1. every argument checked before any work: each value, then the recipe and the values together
    with user_errors():
        trackers = runs.check_stage(args, RANGES, ["tensorboard"] * tensorboard + (log_with or []))
    r = resolve_recipe(recipe.value, method.value, dict(
        arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        momentum=momentum, tau=tau, clip_grad=clip_grad))
    arch = args["arch"] = r["arch"]  # saved resolved, as image_size: resume compares it
    with user_errors():
        r["arch_kwargs"] = backbones.parse_kwargs(arch_kwargs)
    if image_size is None:  # saved resolved: resume compares it
        image_size = args["image_size"] = r.get("image_size", 224)
    if small_stem is None:  # a torchvision ResNet's CIFAR stem; timm models keep their own
        small_stem = r.get("small_stem", image_size <= 64) and backbones.is_torchvision(arch)
    queued, queue_size, warm_queue = queue_settings(method.value, r, queue_size, warm_queue)
    patches = fm.TRAITS[method.value]["patches"] if patches is None else patches
    variant = vr.is_variant(method.value, patches, pipeline.value, combine.value, combinations, same_view, multi_crop)
    if official_init and method.value != "fastmoco":
        fail(f"--official-init is the official Fast-MoCo code's init: --method {method.value} has its own (drop it)")
    if (official_init or pipeline.value.startswith("montage")) and not backbones.is_torchvision(arch):
        fail(f"--official-init and --pipeline montage-* reach into a torchvision ResNet: --arch {arch} is not one")
    if variant and (msg := vr.check(method.value, patches, grid, combine_k, pipeline.value, combine.value,
                                    combine_lambda, combinations, same_view, multi_crop, momentum)):
        fail(msg)
    acc = Accelerator(mixed_precision=mixed_precision and mixed_precision.value,
                      log_with=trackers or None, project_dir=str(output_dir))
    B, world = r["batch_size"], acc.num_processes
    check_args(acc, r, arch, image_size, small_stem, patches, grid, combine_k, queued and queue_size, multi_crop,
               multi_crop_size, resume)
    with user_errors():
        point = runs.resume_point(output_dir, resume)  # --resume, else DIR's newest valid checkpoint (or None)
        # the same run continues: its settings must be the checkpoint's (where it logs to may change)
        runs.check_same_run(point, {k: v for k, v in args.items() if k != "log_with"})

    # 2. data
    with user_errors():
        ds, n, streaming, knn_data = pretrain_data(data, streaming, image_column, B, knn_every)
    per_epoch = n // B
    if queued and queue_size > per_epoch * B:  # a queue larger than the data would hold each image's own key
        queue_size = per_epoch * B
        acc.print(f"--queue-size lowered to {queue_size}, the images of one epoch ({n} in the data set)")
    total = r["epochs"] * per_epoch
    stop = total if max_steps is None else min(total, max_steps)
    workers = min(8, (os.cpu_count() or 1) // world) if workers is None else workers

    # 3. online and target encoders, optimizer, queue (same init on every process)
    torch.manual_seed(seed)
    net = None if backbones.is_torchvision(arch) else backbones.build(arch, kwargs=r["arch_kwargs"])  # timm's
    if r.get("mocov3_vit"):
        backbones.mocov3_vit(net)
    vit = r.get("mocov3_vit", False)  # MoCo v3's ViT heads
    model = (vr.Encoder(method.value, arch, small_stem, patches, grid, combine_k, pipeline.value, combine.value,
                        combine_lambda, beta_alpha, combinations, net, vit) if variant else
             fm.OnlineEncoder(method.value, arch, small_stem, grid, combine_k, net, vit))
    split_bn(model, method.value, bn_splits, B, world)
    model, target, fmt = on_device(model, r["sync_bn"], channels_last, acc, official_init)
    base_lr = r["lr"] * B / 256
    optimizer = fm.make_optimizer(model, r["optimizer"], base_lr, r["weight_decay"], r["fix_predictor_lr"])
    # (K, 128) negatives, or NNCLR's (K, 256) support set
    queue = fm.make_queue(queue_size, fm.TRAITS[method.value]["key_dim"], acc.device) if queued else None

    # 4. resume: model, target, optimizer, queue, loss scaler, data position, RNG
    ptr, step, skipped = runs.load_state(*point[1:], model, target, optimizer, queue) if point else (0, 0, 0)
    with user_errors():
        runs.check_same_start(acc, step)  # several machines: all of them found the same checkpoint
    tensors = point[1] if point else {}
    model, optimizer = acc.prepare(model, optimizer)  # DDP: the momentum encoder has no trainable params, not prepared
    online = acc.unwrap_model(model)
    if point is not None:
        runs.load_scaler(acc.scaler, tensors)
    with user_errors():
        transforms = augmentations(r["aug"], image_size) + small_crops(r["aug"], multi_crop_size, multi_crop)
        on_dev = gpu_augment.DeviceViews(transforms, 16 * image_size // 7) if augment_on.value == "device" else None
        loader = loader_for(ds, n, streaming, image_column, on_dev.worker if on_dev else transforms, B,
                            acc.process_index, world, seed, step, stop, workers, pin=acc.device.type == "cuda",
                            stream_state=tensors.get("data.stream"))
    run = Run(acc, model, online, target, optimizer, queue, ptr, step, skipped,
              cursor=getattr(loader, "cursor", None))  # streaming: where each worker is, saved for an exact resume
    # iter() draws the workers' base seed from the torch RNG: restore the saved state after it
    batches = one_line_errors(iter(loader), acc.process_index, output_dir)
    first = next(batches, None)  # data that cannot give one batch fails here, before DIR, its log or TensorBoard exist
    batches = itertools.chain([first] if first is not None else [], batches)
    if point is not None:
        torch.set_rng_state(tensors["rng.torch"])

    # 5. train
    output_dir.mkdir(parents=True, exist_ok=True)
    acc.init_trackers("pretrain", config={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))})
    meta = dict(format="fastmoco-pretrain-v1", method=method.value, arch=arch, arch_kwargs=r["arch_kwargs"],
                small_stem=small_stem, world_size=world,
                image_size=image_size, args=args, recipe=r, fastmoco_sha256=ck.source_hash(), total_steps=total)
    log = runs.open_log(output_dir / "log.jsonl", step) if acc.is_main_process else None
    loss_fn = functools.partial(batch_loss, method=method.value, variant=variant, tau=r["tau"], patches=patches,
                                same_view=same_view, seed=seed, rank=acc.process_index)
    window = runs.Window(acc, step, point[2].get("train_seconds", 0.0) if point else 0.0)  # between two log rows
    with user_errors():  # no decodable image in a kNN split
        top1s = [knn.log_knn(acc, log, step, per_epoch, online.backbone, knn_data, image_column, image_size, window,
                             knn_bank_size, seed, workers)] if knn_every and step == 0 else []
    bad = 0  # undecodable images replaced (map-style) or skipped (streaming), this process
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not acc.is_main_process)
    with progress:
        task = progress.add_task(f"{method.value} {arch}", total=stop, completed=run.step, info="")
        for i, (*xs, info) in enumerate(batches, run.cursor.first if run.cursor else run.step):
            if run.cursor:
                run.cursor.update(i, info)
            if i < run.step:  # streaming resume: batches regenerated only to realign the workers (StreamCursor)
                continue
            if run.step >= stop:  # resumed from a run that had already finished (a stream never ends by itself)
                break
            bad += int(info[:, 0].sum())
            snap = runs.snapshot(target, online) if skip_nonfinite else None  # EMA, BN stats: rolled back on a skip
            views = on_dev(xs, acc.device, fmt) if on_dev else [x.to(acc.device, non_blocking=True,
                                                                     memory_format=fmt) for x in xs]
            lr_now, m = schedules(run.step, total, per_epoch, base_lr, r)
            loss, outcome = train_step(run, views, lr_now, m, loss_fn, r["clip_grad"], skip_nonfinite,
                                       fill=warm_queue and run.step < len(queue) // B)  # --warm-queue
            if outcome == "skipped":  # --skip-nonfinite: no optimizer, EMA, BN or queue update
                runs.restore(target, online, snap)
                run.skipped, window.skipped = run.skipped + 1, window.skipped + 1
            else:
                window.add(loss)
                window.overflows += outcome == "overflow"
            run.step += 1
            step = run.step
            if step % log_every == 0 or step == stop or (save_every and step % save_every == 0):  # host syncs
                progress.update(task, info=log_row(acc, log, window, step, per_epoch, B, max(step * B, n), bad,
                                                   run.skipped, lr_now, m, skip_nonfinite, max_bad_fraction,
                                                   output_dir))
            progress.update(task, completed=step)
            if knn_every and step % (knn_every * per_epoch) == 0:
                with user_errors():
                    top1s.append(knn.log_knn(acc, log, step, per_epoch, online.backbone, knn_data, image_column,
                                             image_size, window, knn_bank_size, seed, workers))
            if save_every and step % save_every == 0 and step < stop:
                save(run, output_dir / f"ckpt-{step:07d}.safetensors", at_step(meta, run, per_epoch, window), keep)
            if step >= stop:
                break

    # 6. the final checkpoint
    save(run, output_dir / "ckpt.safetensors", at_step(meta, run, per_epoch, window), keep)
    acc.end_training()
    if log:
        log.close()
    acc.print(closing_line(output_dir / "ckpt.safetensors", run.step, total, window.seconds(), top1s))

if __name__ == "__main__":
    app()
