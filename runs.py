"""A run's output directory for the stage scripts: which checkpoint to resume from (automatic resume after a crash or
a pre-emption, past truncated or corrupt files), rotation of periodic checkpoints, and a log that matches the resumed
state. Checkpoints are written by fastmoco.save_checkpoint (atomic, checksummed)."""

import json
import math
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import fastmoco as fm
from data import fail


def warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def candidates(output_dir: Path) -> list:
    """DIR's checkpoints, newest step first (the step is read from each file's header; unreadable headers last)."""
    found = []
    for p in [output_dir / "ckpt.safetensors", *sorted(output_dir.glob("ckpt-*.safetensors"))]:
        try:
            with safe_open(str(p), framework="pt") as f:
                step = json.loads((f.metadata() or {}).get("step", "-1"))
        except (SafetensorError, OSError, ValueError):
            step = -2  # still tried last, so load_checkpoint names the problem in the warning
        if p.is_file():
            found.append((step, p.name != "ckpt.safetensors", p))  # same step: the final file first
    return [p for *_, p in sorted(found, key=lambda t: (-t[0], t[1]))]


def resume_point(output_dir: Path, resume):
    """(path, tensors, metadata) to continue from, or None for a fresh run.

    --resume PATH: that file, or a one-line error. Otherwise DIR's newest checkpoint that loads and passes its
    checksum (a crash can leave a truncated or corrupt file: warn and fall back to the previous one)."""
    if resume is not None:
        try:
            return (resume, *fm.load_checkpoint(resume))
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
    for p in candidates(output_dir):
        try:
            tensors, meta = fm.load_checkpoint(p)
        except ValueError as e:
            warn(f"skipping {e}")
            continue
        print(f"resuming from {p} (step {meta.get('step')}); use another --output-dir to start a new run",
              file=sys.stderr, flush=True)
        return p, tensors, meta
    return None


def trim_log(path: Path, step: int):
    """Drop log rows after `step` (written after the checkpoint a run resumes from) and a torn last line."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    path.write_text("".join(r + "\n" for r in rows))


def rotate(output_dir: Path, keep: int):
    """Keep the newest `keep` periodic checkpoints DIR/ckpt-STEP.safetensors (0 = keep all)."""
    if keep > 0:  # (a bare [:-keep] would delete them all for keep = 0)
        for old in sorted(output_dir.glob("ckpt-*.safetensors"))[:-keep]:
            old.unlink()


# ----------------------------------------------------------------------------- the state of a run

def state_tensors(model, target, optimizer, queue, ptr, acc) -> dict:
    """Everything a resume needs, as flat tensors (see README, "Checkpoint layout")."""
    t = dict(model.state_dict())  # backbone.* (torchvision names), projector.*, predictor.*
    t.update({f"target.{k}": v for k, v in target.state_dict().items()})
    t.update(fm.optimizer_tensors(optimizer))
    if queue is not None:
        t.update(queue=queue, queue_ptr=torch.tensor(ptr))
    t["rng.torch"] = torch.get_rng_state()
    if acc.scaler is not None:  # fp16 loss scaler
        t.update({f"scaler.{k}": torch.tensor(v) for k, v in acc.scaler.state_dict().items()
                  if isinstance(v, (int, float))})
    return t


def load_state(tensors, meta, model, target, optimizer, queue) -> tuple:
    """Load a checkpoint's model, target, optimizer and queue in place -> (queue pointer, step, skipped steps)."""
    online = ("backbone", "projector", "predictor")
    model.load_state_dict({k: v for k, v in tensors.items() if k.split(".")[0] in online})
    target.load_state_dict(fm.prefixed(tensors, "target."))
    fm.load_optimizer_tensors(optimizer, tensors)
    if queue is not None:
        queue.copy_(tensors["queue"])
    return int(tensors["queue_ptr"]) if queue is not None else 0, meta["step"], meta.get("skipped_steps", 0)


# Flags a resumed run may change: where and how it runs, not what it computes.
FREE = {"data", "resume", "output_dir", "max_steps", "save_every", "keep", "skip_nonfinite", "max_bad_fraction",
        "log_every", "knn_every", "workers", "streaming", "mixed_precision", "channels_last", "tensorboard"}


def check_same_run(point, args: dict):
    """A resumed run must compute what the checkpoint's run computed: a one-line error naming the flags that differ
    (auto-resume picks up DIR's checkpoint, so a new experiment in an old --output-dir would otherwise mix the two)."""
    path, _, meta = point
    if meta.get("format") != "fastmoco-pretrain-v1":  # e.g. a backbone-only import (transfer/import_weights.py)
        fail(f"{path} is not a pretraining checkpoint (format {meta.get('format')}): --resume needs one written by "
             "pretrain.py, or imported from a full published pretraining file")
    saved = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    if (meta.get("method"), meta.get("arch")) != (args["method"], args["arch"]):
        fail(f"{path} is a {meta.get('method')}/{meta.get('arch')} checkpoint; this run is {args['method']}/"
             f"{args['arch']} (a new run needs a new --output-dir)")
    differ = [k for k, v in args.items() if k not in FREE and k in saved and saved[k] != v]
    if differ:
        fail(f"{path} was written by a run with other settings ({', '.join(differ)}): use a new --output-dir for a "
             f"new run, or the checkpoint's settings to continue it")


# ----------------------------------------------------------------------------- guards

def check_ranges(ranges: dict):
    """{"--flag": (value, low) or (value, low, high)}: a one-line error for the first value out of range (or NaN)."""
    for name, (v, lo, *hi) in ranges.items():
        if not (lo <= v <= (hi or [math.inf])[0] and math.isfinite(v)):
            fail(f"{name} {v} is out of range: use a finite number from {lo}" + (f" to {hi[0]}" if hi else " up"))


def check_bad_images(bad: int, seen: int, max_fraction: float):
    """Stop when more than `max_fraction` of the images (read so far, or in the data set) could not be decoded."""
    if bad > max_fraction * seen:
        fail(f"{bad} images could not be decoded (the 'skipped undecodable image' warnings name them), more than "
             f"--max-bad-fraction {max_fraction} of {seen}: fix or remove them, or raise --max-bad-fraction")


def all_finite(loss, model, acc) -> bool:
    """--skip-nonfinite: are the loss and (unless fp16's scaler handles them) the gradients finite on every process?"""
    ok = torch.isfinite(loss.detach()).all()
    if acc.scaler is None:
        ok &= torch.stack([p.grad.isfinite().all() for p in model.parameters() if p.grad is not None]).all()
    return acc.reduce(ok.float(), "sum").item() == acc.num_processes


def snapshot(target, online) -> list:
    """What a step changes besides the optimizer: the target encoder (EMA) and both encoders' BN statistics."""
    return [t.clone() for t in (*target.state_dict().values(), *online.buffers())]


def restore(target, online, snap: list):
    for t, saved in zip((*target.state_dict().values(), *online.buffers()), snap):
        t.copy_(saved)
