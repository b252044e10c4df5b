"""Self-supervised pretraining of a ResNet with Fast-MoCo, MoCo v3, MoCo v2 or MoCo v1 (and, through variants.py,
BYOL, SimSiam, NNCLR and the paper's ablations).

    accelerate launch pretrain.py --epochs 100                      # ImageNet-1k streamed from the Hub
    python pretrain.py --data demo --arch resnet18 --image-size 32  # built-in demo data, CPU friendly

Every default is the method's published recipe (README, "Methods and recipes"); any of them can be overridden.
"""

import json
import math
import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn as nn
import typer
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import fastmoco as fm
import runs
import variants as vr
from data import augmentations, clean_transform, fail, load_split, loader_for, sample_seed, small_crops

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)

# Each method's published recipe (REFERENCE: official code where it differs from the paper). lr is per 256 images:
# the lr used is lr * batch_size / 256. Warmup and milestones are in epochs / fractions of the run.
RECIPES = {
    "fastmoco": dict(epochs=100, batch_size=512, lr=0.05, weight_decay=1e-4, optimizer="sgd", warmup_epochs=1,
                     warmup_from=0.25, momentum=0.99, cosine_momentum=False, tau=1.0, clip_grad=1.0,
                     fix_predictor_lr=True, milestones=(), aug="fastmoco", sync_bn=True),
    "mocov3": dict(epochs=100, batch_size=4096, lr=0.6, weight_decay=1e-6, optimizer="lars", warmup_epochs=10,
                   warmup_from=0.0, momentum=0.99, cosine_momentum=True, tau=1.0, clip_grad=0.0,
                   fix_predictor_lr=False, milestones=(), aug="mocov3", sync_bn=True),
    "mocov2": dict(epochs=200, batch_size=256, lr=0.03, weight_decay=1e-4, optimizer="sgd", warmup_epochs=0,
                   warmup_from=0.0, momentum=0.999, cosine_momentum=False, tau=0.2, clip_grad=0.0,
                   fix_predictor_lr=False, milestones=(), aug="mocov2", sync_bn=False),
    "mocov1": dict(epochs=200, batch_size=256, lr=0.03, weight_decay=1e-4, optimizer="sgd", warmup_epochs=0,
                   warmup_from=0.0, momentum=0.999, cosine_momentum=False, tau=0.07, clip_grad=0.0,
                   fix_predictor_lr=False, milestones=(0.6, 0.8), aug="mocov1", sync_bn=False),  # 120/160 of 200
    # Appendix C.1 frameworks (100 epochs there; REFERENCE gives no recipe: the numbers are the original papers').
    # SimSiam and NNCLR have no momentum encoder: their target is a copy refreshed with m = 0 (= the online weights).
    "byol": dict(epochs=100, batch_size=4096, lr=0.2, weight_decay=1.5e-6, optimizer="lars", warmup_epochs=10,
                 warmup_from=0.0, momentum=0.996, cosine_momentum=True, tau=1.0, clip_grad=0.0,
                 fix_predictor_lr=False, milestones=(), aug="mocov3", sync_bn=True),
    "simsiam": dict(epochs=100, batch_size=512, lr=0.05, weight_decay=1e-4, optimizer="sgd", warmup_epochs=0,
                    warmup_from=0.0, momentum=0.0, cosine_momentum=False, tau=1.0, clip_grad=0.0,
                    fix_predictor_lr=True, milestones=(), aug="mocov2", sync_bn=True),
    "nnclr": dict(epochs=100, batch_size=4096, lr=0.3, weight_decay=1e-6, optimizer="lars", warmup_epochs=10,
                  warmup_from=0.0, momentum=0.0, cosine_momentum=False, tau=0.1, clip_grad=0.0,
                  fix_predictor_lr=False, milestones=(), aug="mocov3", sync_bn=True),
}


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class Method(str, Enum):
    fastmoco = "fastmoco"
    mocov3 = "mocov3"
    mocov2 = "mocov2"
    mocov1 = "mocov1"
    byol = "byol"
    simsiam = "simsiam"
    nnclr = "nnclr"


Pipeline = Enum("Pipeline", {p: p for p in vr.PIPELINES}, type=str)  # Table 4a, in the paper's words
Combine = Enum("Combine", {c: c for c in vr.COMBINES}, type=str)


@torch.no_grad()
def knn_top1(backbone, train, val, column, size, acc, batch=256) -> float:
    """kNN top-1 (k=200, t=0.1) of `backbone` on clean views: train split as the bank, val split as queries."""
    t = clean_transform(size)
    backbone.eval()
    feats = []
    for ds in (train, val):
        data = ds.with_transform(lambda b: {"x": [t(im.convert("RGB")) for im in b[column]], "y": b["label"]})
        loader = acc.prepare(torch.utils.data.DataLoader(data, batch_size=batch))
        f, y = zip(*[acc.gather_for_metrics((backbone(b["x"]).float(), b["y"])) for b in loader])
        feats.append((torch.cat(f), torch.cat(y)))
    backbone.train()
    (bank, bank_y), (q, q_y) = feats
    pred = fm.knn_predict(q, bank, bank_y, int(bank_y.max()) + 1)
    return 100.0 * (pred == q_y).float().mean().item()


@app.command()
def main(
    data: Annotated[str, typer.Option(help="Hub dataset name (streamed), local folder of parquet files / images, "
                                           "a saved dataset, or 'demo' (built-in, no download).")
                ] = "ILSVRC/imagenet-1k",
    method: Annotated[Method, typer.Option(help="Fast-MoCo (ECCV 2022), MoCo v3, v2, v1, or (Fast-MoCo App. C.1) "
                                                "BYOL, SimSiam, NNCLR.")] = Method.fastmoco,
    arch: Annotated[str, typer.Option(help=f"torchvision ResNet: {', '.join(fm.ARCHS)}.")] = "resnet50",
    image_size: Annotated[int, typer.Option(help="Crop size of the augmented views.")] = 224,
    small_stem: Annotated[Optional[bool], typer.Option(
        help="3x3 stride-1 conv1, no max-pool (CIFAR-style). Default: on when --image-size <= 64.")] = None,
    grid: Annotated[int, typer.Option(help="Fast-MoCo: divide each view into grid x grid patches.")] = 2,
    k: Annotated[int, typer.Option(help="Fast-MoCo: patches averaged per combined embedding (1..grid^2-1).")] = 2,
    patches: Annotated[Optional[bool], typer.Option(
        help="Combinatorial patches on the online branch. Default: on for fastmoco only; fastmoco --no-patches is "
             "MoCo v3's loss under Fast-MoCo's recipe (Table 4b's baseline).")] = None,
    pipeline: Annotated[Pipeline, typer.Option(help="Where patches are combined (Table 4a).")] = Pipeline(
        vr.PIPELINES[0]),
    combine: Annotated[Combine, typer.Option(help="Combine operator (Sec. 5.5).")] = Combine.mean,
    combine_lambda: Annotated[float, typer.Option(help="--combine weighted: weight of a subset's first patch.")] = 0.5,
    beta_alpha: Annotated[float, typer.Option(help="--combine beta: weights ~ Beta(a, a) (Dirichlet for k>2).")] = 1.0,
    combinations: Annotated[int, typer.Option(
        help="Use this many of the C(grid^2, k) combinations, each patch equally often (Sec. 5.4); 0 = all.")] = 0,
    same_view: Annotated[bool, typer.Option(help="Positives from the same augmented view (Sec. 5.1).")] = False,
    multi_crop: Annotated[int, typer.Option(help="Extra low-resolution crops per image (Table 4b: 1).")] = 0,
    multi_crop_size: Annotated[int, typer.Option(help="Size of the multi-crop views (SwAV: 96 at 224).")] = 96,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Global batch (all processes). Recipe: fastmoco/simsiam 512, mocov3/byol/nnclr 4096, v2/v1 256.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Recipe: 100, mocov2/v1 200.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        help="Stop after this many optimisation steps (smoke runs, benchmarks); schedules span --epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="lr per 256 images (used: lr x batch/256). Recipe: fastmoco/simsiam 0.05, mocov3 0.6, byol 0.2, "
             "nnclr 0.3, v2/v1 0.03.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Recipe: 1e-4 (mocov3/nnclr 1e-6, byol 1.5e-6)")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option(
        help="Linear lr warmup. Recipe: fastmoco 1, mocov3/byol/nnclr 10.")] = None,
    momentum: Annotated[Optional[float], typer.Option(
        help="EMA momentum m. Recipe: fastmoco 0.99 constant, mocov3 0.99 -> 1 (cosine), byol 0.996 -> 1, "
             "v2/v1 0.999; simsiam/nnclr have none.")] = None,
    tau: Annotated[Optional[float], typer.Option(
        help="InfoNCE temperature. Recipe: 1.0, mocov2 0.2, mocov1 0.07, nnclr 0.1.")] = None,
    clip_grad: Annotated[Optional[float], typer.Option(
        help="Global grad-norm clip, 0 = off. Recipe: fastmoco 1.0.")] = None,
    queue_size: Annotated[Optional[int], typer.Option(
        help="MoCo v1/v2: negatives K in the queue (65536); NNCLR: support set size (98304).")] = None,
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
        help="kNN top-1 of the online backbone every N epochs on labelled local data (0 = off).")] = 0,
    workers: Annotated[Optional[int], typer.Option(
        help="DataLoader workers per process (default: cores / processes, max 8).")] = None,
    image_column: Annotated[str, typer.Option(help="Image column of the dataset.")] = "image",
    streaming: Annotated[Optional[bool], typer.Option(
        help="Stream the data (always for Hub names; off for local data unless set).")] = None,
    mixed_precision: Annotated[Optional[Precision], typer.Option(
        help="no, bf16 or fp16. Default: Accelerate's config / `accelerate launch --mixed_precision`.")] = None,
    channels_last: Annotated[Optional[bool], typer.Option(
        help="channels_last memory format. Default: on, except fp32 on CPU where it is ~3x slower.")] = None,
    tensorboard: Annotated[bool, typer.Option(help="Log to TensorBoard through Accelerate.")] = True,
):
    """Pretrain a ResNet with Fast-MoCo or a MoCo baseline; writes DIR/ckpt.safetensors."""
    args = {k: (str(v) if isinstance(v, Path) else v.value if isinstance(v, Enum) else v) for k, v in locals().items()}
    # 1. recipe defaults, then argument checks before any work
    r = {**RECIPES[method.value], **{n: v for n, v in dict(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        momentum=momentum, tau=tau, clip_grad=clip_grad).items() if v is not None}}
    small_stem = image_size <= 64 if small_stem is None else small_stem
    queued = method.value in ("mocov1", "mocov2", "nnclr")  # a queue: MoCo's negatives or NNCLR's support set
    queue_size = queue_size or (98304 if method == Method.nnclr else 65536)
    patches = method == Method.fastmoco if patches is None else patches
    variant = (method.value in vr.METHODS or patches != (method == Method.fastmoco) or same_view or multi_crop or
               combinations or pipeline.value != vr.PIPELINES[0] or combine != Combine.mean)
    if variant and (msg := vr.check(method.value, patches, grid, k, pipeline.value, combine.value,
                                    combine_lambda, combinations, same_view, multi_crop, momentum)):
        fail(msg)
    acc = Accelerator(mixed_precision=mixed_precision and mixed_precision.value,
                      log_with="tensorboard" if tensorboard else None, project_dir=str(output_dir))
    B, world = r["batch_size"], acc.num_processes
    if arch not in fm.ARCHS:
        fail(f"unknown --arch {arch}: choose one of {', '.join(fm.ARCHS)}")
    runs.check_ranges({"--lr": (r["lr"], 0), "--batch-size": (B, 1), "--keep": (keep, 0), "--log-every": (log_every, 1),
                       "--save-every": (save_every, 0), "--max-bad-fraction": (max_bad_fraction, 0, 1)})
    if B % world:
        fail(f"--batch-size {B} is not divisible by the {world} processes: use a multiple of {world}")
    if patches and (image_size % grid or not 1 <= k < grid * grid):
        fail(f"--grid {grid} must divide --image-size {image_size} and --k must be in 1..{grid * grid - 1} (got {k})")
    if queued and queue_size % B:
        fail(f"--queue-size {queue_size} is not divisible by the global batch {B}: MoCo enqueues whole batches")
    smallest = min(image_size // grid if patches else image_size, multi_crop_size if multi_crop else image_size)
    if acc.device.type == "cpu" and acc.mixed_precision == "bf16" and smallest <= (4 if small_stem else 16):
        # torch 2.14 CPU: the bf16 weight gradient of a stride-2 conv on a 1x1 input (layer4.0 here) is sometimes inf
        fail(f"{smallest} px inputs reach layer4 at 1x1, where CPU bf16 gives non-finite gradients: use "
             "--mixed-precision no, --small-stem, or a larger --image-size")
    if resume is not None and not resume.is_file():
        fail(f"--resume {resume} does not exist")
    point = runs.resume_point(output_dir, resume)  # --resume, else DIR's newest valid checkpoint (or None)
    if point is not None:
        runs.check_same_run(point, args)  # the same run continues: its settings must be the checkpoint's

    # 2. data
    hub = not Path(data).expanduser().exists() and data != "demo"
    streaming = hub if streaming is None else (streaming or hub)
    ds, n = load_split(data, "train", streaming)
    if ds is None:
        fail(f"no training split found in {data}")
    if n == 0:
        fail(f"cannot tell how many images {data}'s train split holds (its card lists no size): download it and pass "
             "the local folder")
    if image_column not in (ds.column_names or [image_column]):
        fail(f"--image-column {image_column} is not a column of {data} (columns: {', '.join(ds.column_names)})")
    per_epoch = n // B
    if per_epoch == 0:
        fail(f"{data} has {n} images, fewer than one global batch of {B}: lower --batch-size")
    total = r["epochs"] * per_epoch
    stop = min(total, max_steps) if max_steps else total
    workers = min(8, (os.cpu_count() or 1) // world) if workers is None else workers
    knn_data = None
    if knn_every:
        val, _ = load_split(data, "validation", False)
        val = val if val is not None else load_split(data, "test", False)[0]
        if streaming or val is None or "label" not in ds.column_names:
            fail("--knn-every needs local labelled data with a validation or test split (label column)")
        knn_data = (ds, val)

    # 3. model, momentum encoder, optimizer, queue (same init on every process)
    torch.manual_seed(seed)
    model = vr.Encoder(method.value, arch, small_stem, patches, grid, k, pipeline.value, combine.value, combine_lambda,
                       beta_alpha, combinations) if variant else fm.MoCo(method.value, arch, small_stem, grid, k)
    if r["sync_bn"] and world > 1:  # torch's SyncBN runs on GPUs only, fastmoco's on CPUs too
        model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if acc.device.type == "cuda" else
                 fm.convert_sync_bn(model))
    target = fm.target_encoder(model)  # official MoCo v3: the momentum encoder uses SyncBN too
    if channels_last is None:  # measured on a 2-core AVX-512 CPU: channels_last helps bf16, hurts fp32
        channels_last = acc.device.type != "cpu" or acc.mixed_precision != "no"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(acc.device, memory_format=fmt)
    target.to(acc.device, memory_format=fmt)
    base_lr = r["lr"] * B / 256
    optimizer = fm.make_optimizer(model, r["optimizer"], base_lr, r["weight_decay"], r["fix_predictor_lr"])
    queue, ptr = None, 0
    if queued:
        queue = nn.functional.normalize(torch.randn(queue_size, 256 if method == Method.nnclr else 128), dim=1).to(
            acc.device)  # (K, 128) negatives, or NNCLR's (K, 256) support set
    step, skipped = 0, 0
    if point is not None:
        _, tensors, meta = point
        ptr, step, skipped = runs.load_state(tensors, meta, model, target, optimizer, queue)
    model, optimizer = acc.prepare(model, optimizer)  # DDP: the momentum encoder has no trainable params, not prepared
    if acc.scaler is not None and point is not None:
        acc.scaler.load_state_dict({k_[7:]: v.item() for k_, v in tensors.items() if k_.startswith("scaler.")} or
                                   acc.scaler.state_dict())
    online = acc.unwrap_model(model)
    loader = loader_for(ds, n, streaming, image_column, augmentations(r["aug"], image_size) +
                        small_crops(r["aug"], multi_crop_size, multi_crop), B, acc.process_index,
                        world, seed, step, stop, workers, pin=acc.device.type == "cuda",
                        stream_state=tensors.get("data.stream") if point else None)
    cursor = getattr(loader, "cursor", None)  # streaming: where each worker is, saved for an exact resume
    batches = iter(loader)  # draws the workers' base seed from the torch RNG: restore the saved state after it
    if point is not None:
        torch.set_rng_state(tensors["rng.torch"])

    # 4. train
    output_dir.mkdir(parents=True, exist_ok=True)
    acc.init_trackers("pretrain", config={k_: v for k_, v in args.items() if isinstance(v, (int, float, str, bool))})
    meta = dict(format="fastmoco-pretrain-v1", method=method.value, arch=arch, small_stem=small_stem, world_size=world,
                image_size=image_size, args=args, recipe=r, fastmoco_sha256=fm.source_hash())
    if acc.is_main_process:
        runs.trim_log(output_dir / "log.jsonl", step)  # rows after the checkpoint are written again
    log = open(output_dir / "log.jsonl", "a") if acc.is_main_process else None

    def save(path):
        acc.wait_for_everyone()
        extra = {"data.stream": acc.gather(cursor.state(step).to(acc.device))} if cursor else {}  # (world * W, 2)
        if acc.is_main_process:
            try:
                fm.save_checkpoint(path, {**runs.state_tensors(online, target, optimizer, queue, ptr, acc), **extra},
                                   dict(meta, step=step, epoch=step / per_epoch, total_steps=total,
                                        skipped_steps=skipped))
            except OSError as e:
                fail(f"{e}; free disk space and rerun the same command: it resumes from the last checkpoint in "
                     f"{output_dir}, which is intact")
            runs.rotate(output_dir, keep)

    def record(row):
        row = dict(step=step, epoch=round(step / per_epoch, 3), **row)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
        acc.log({k_: v for k_, v in row.items() if k_ != "step"}, step=step)

    def knn() -> float:
        """Log kNN top-1 of the online backbone; returns the seconds it took (not training time)."""
        t0 = time.perf_counter()
        top1 = knn_top1(online.backbone, *knn_data, image_column, image_size, acc)
        record(dict(knn_top1=top1, knn_seconds=time.perf_counter() - t0))
        return time.perf_counter() - t0

    if knn_every and step == 0:
        knn()
    warmup, milestones = r["warmup_epochs"] * per_epoch, [round(f * total) for f in r["milestones"]]
    running, t_log, s_log = torch.zeros((), device=acc.device), time.perf_counter(), step
    skipped_log, bad = 0, 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not acc.is_main_process)
    with progress:
        task = progress.add_task(f"{method.value} {arch}", total=stop, completed=step, info="")
        for i, (x1, x2, *small, info) in enumerate(batches, cursor.first if cursor else step):
            if cursor:
                cursor.update(i, info)
            if i < step:  # streaming resume: batches regenerated only to realign the workers (StreamCursor)
                continue
            if step >= stop:  # resumed from a run that had already finished (a stream never ends by itself)
                break
            bad += int(info[:, 0].sum())  # undecodable images replaced (map-style) or skipped (streaming)
            snap = runs.snapshot(target, online) if skip_nonfinite else None  # EMA, BN stats: rolled back on a skip
            x1, x2, *small = (x.to(acc.device, non_blocking=True, memory_format=fmt) for x in (x1, x2, *small))
            lr_now = fm.lr_at(step, total, base_lr, warmup, r["warmup_from"], milestones)
            m = fm.momentum_at(step, total, r["momentum"], r["cosine_momentum"])
            fm.set_lr(optimizer, lr_now)
            fm.ema_update(target.parameters(), fm.online_params(online), m)  # official order: before the forward
            with acc.autocast():  # covers the target forward too
                if variant:  # variants.py: BYOL, SimSiam, NNCLR, the ablations
                    loss, keys = vr.step_loss(method.value, model, target, x1, x2, small, queue, r["tau"], patches,
                                              same_view, sample_seed(seed, step, acc.process_index))
                elif method == Method.fastmoco:
                    loss = fm.fastmoco_loss(model, target, x1, x2, r["tau"])
                elif method == Method.mocov3:
                    loss = fm.mocov3_loss(model, target, x1, x2, r["tau"])
                else:
                    g = torch.Generator().manual_seed(sample_seed(seed, step))  # same shuffle on every process
                    loss, keys = fm.moco_loss(model, target, x1, x2, queue, r["tau"], g)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if r["clip_grad"]:
                acc.clip_grad_norm_(model.parameters(), r["clip_grad"])
            if skip_nonfinite and not runs.all_finite(loss, model, acc):  # no optimizer, EMA, BN or queue update
                runs.restore(target, online, snap)
                skipped, skipped_log = skipped + 1, skipped_log + 1
            else:
                optimizer.step()
                if queued:
                    ptr = fm.enqueue(queue, ptr, keys)
                running += loss.detach()
            step += 1
            if step % log_every == 0 or step == stop or (save_every and step % save_every == 0):  # host syncs
                done = step - s_log - skipped_log  # steps in this window that were not skipped
                mean = acc.reduce(running, "mean").item() / done if done else math.nan
                if not math.isfinite(mean) and not skip_nonfinite:  # checked before any save: no NaN on disk
                    fail(f"loss is {mean} at step {step}; the last checkpoint in {output_dir} is intact (rerun "
                         "the same command with a lower --lr, or --skip-nonfinite)")
                bad_all = int(acc.reduce(torch.tensor(float(bad), device=acc.device), "sum").item())
                runs.check_bad_images(bad_all, max(step * B, n), max_bad_fraction)
                ips = (step - s_log) * B / (time.perf_counter() - t_log)
                record(dict(loss=mean, lr=lr_now, m=m, img_per_s=round(ips, 1), skipped_steps=skipped,
                            bad_images=bad_all))
                progress.update(task, info=f"loss {mean:.4f} lr {lr_now:.3g} m {m:.4f} {ips:.0f} img/s")
                running.zero_()
                t_log, s_log, skipped_log = time.perf_counter(), step, 0
            progress.update(task, completed=step)
            if knn_every and step % (knn_every * per_epoch) == 0:
                t_log += knn()  # kNN time is not training time
            if save_every and step % save_every == 0 and step < stop:
                save(output_dir / f"ckpt-{step:07d}.safetensors")
            if step >= stop:
                break
    save(output_dir / "ckpt.safetensors")
    acc.end_training()
    if log:
        log.close()
    acc.print(f"wrote {output_dir / 'ckpt.safetensors'} (step {step}/{total})")


if __name__ == "__main__":
    app()
