"""What the step benchmarks share: one method's training step exactly as pretrain.py runs it (EMA, autocast forward of
the online and target encoders, backward, clip, optimizer), its floor (the bare backbone work), and a timer."""

import statistics
import time

import torch

import fastmoco as fm


def setup(method, arch, image_size, batch, device="cpu", precision="bf16", channels_last=True, small_stem=False,
          recipe="imagenet", grid=2, k=2, seed=0, compile_backend=None, queue_size=4096):
    """(step, floor, parts) closures on one fixed random batch of two views (the data pipeline is bench/data_pipeline.py).
    step: one optimisation step of `method` as in pretrain.py's loop (no host sync).
    floor: the backbone work the step cannot avoid: online forward+backward on the views (Fast-MoCo: on the patches),
    target backbone forward on the full views; no heads, loss, EMA or optimizer.
    parts: {name: closure} pieces of the step timed alone (EMA, optimizer step, divide+combine).
    MoCo v1/v2: a queue of queue_size keys and split BN (8 groups), as pretrain.py runs them on one process.
    compile_backend: torch.compile the two encoders with this backend (e.g. inductor)."""
    r = (fm.RECIPES if recipe == "imagenet" else fm.SMALL_RECIPES)[method]  # optimizer, lr, clip, momentum, tau
    torch.manual_seed(seed)
    model = fm.OnlineEncoder(method, arch, small_stem, grid, k)
    queued = method in ("mocov1", "mocov2")
    if queued:
        fm.split_bn(model.backbone, next(s for s in (8, 4, 2, 1) if batch % s == 0 and batch // s >= 8 or s == 1))
    target = fm.target_encoder(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    target.to(device, memory_format=fmt)
    opt = fm.make_optimizer(model, r["optimizer"], r["lr"] * batch / 256, r["weight_decay"], r["fix_predictor_lr"])
    x1, x2 = (torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
              for _ in range(2))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = lambda: torch.autocast(torch.device(device).type, dtype, enabled=dtype is not None)  # noqa: E731
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    queue, ptr, g = fm.make_queue(queue_size, 128, device) if queued else None, [0], torch.Generator().manual_seed(seed)
    net, tnet = ((torch.compile(model, backend=compile_backend), torch.compile(target, backend=compile_backend))
                 if compile_backend else (model, target))

    def step():
        fm.ema_update(target, model, r["momentum"])
        with autocast():
            loss, keys = fm.step_loss(method, net, tnet, x1, x2, r["tau"], queue, g)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if r["clip_grad"]:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), r["clip_grad"])
        scaler.step(opt)
        scaler.update()
        if queued:
            ptr[0] = fm.enqueue(queue, ptr[0], keys)

    views = (lambda x: fm.divide(x, grid)) if method == "fastmoco" else (lambda x: x)

    def floor():
        with autocast():
            out = model.backbone(views(x1)).float().sum() + model.backbone(views(x2)).float().sum()
            with torch.no_grad():
                target.backbone(x1), target.backbone(x2)
        model.zero_grad(set_to_none=True)
        out.backward()

    feats = torch.randn(grid * grid * batch, model.backbone.dim, device=device)  # (P*N, D) patch embeddings
    parts = {"ema": lambda: fm.ema_update(target, model, r["momentum"]),
             "opt.step": opt.step}
    if method == "fastmoco":
        parts["divide+combine"] = lambda: (fm.divide(x1, grid), fm.combine(feats, grid * grid, k))
    return step, floor, parts


def timed(fn, device) -> float:
    """Seconds of one call, device work included (a sync before and after: only benchmarks do this)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def interleaved(fns: dict, steps: int, warmup: int, device) -> dict:
    """{name: median seconds} of the callables run round-robin (rotating the order every round), so a change in machine
    load hits every one alike; `warmup` untimed rounds first (allocator, kernel selection)."""
    names, times = list(fns), {n: [] for n in fns}
    for i in range(warmup + steps):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t = timed(fns[n], device)
            if i >= warmup:
                times[n].append(t)
    return {n: statistics.median(v) for n, v in times.items()}


def markdown(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows])
