"""The mechanics of a pretraining run, apart from the algorithm: its output directory (which checkpoint to resume
from, automatically after a crash or a pre-emption, past truncated or corrupt files; rotation of periodic
checkpoints; a log that matches the resumed state), the state a resume needs, the guards (argument ranges,
undecodable images, non-finite steps) and the log rows (loss window; the kNN monitor is knn.py, the failure watch of
several processes together.py). Checkpoints are written by
fastmoco.save_checkpoint (atomic, checksummed). Bad input or state raises ValueError with a one-line message."""

import errno
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from safetensors import SafetensorError, safe_open

import checkpoints as ck


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


class Point(NamedTuple):
    """A checkpoint to continue from."""
    path: Path
    tensors: dict
    meta: dict


def resume_point(output_dir: Path, resume):
    """The Point to continue from, or None for a fresh run.

    --resume PATH: that file, or a one-line error. Otherwise DIR's newest checkpoint that loads and passes its
    checksum (a crash can leave a truncated or corrupt file: warn and fall back to the previous one)."""
    if resume is not None:
        try:
            return Point(resume, *ck.load_checkpoint(resume))
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(str(e)) from None
    for p in candidates(output_dir):
        try:
            tensors, meta = ck.load_checkpoint(p)
        except ValueError as e:
            warn(f"skipping {e}")
            continue
        print(f"resuming from {p} (step {meta.get('step')}); use another --output-dir to start a new run",
              file=sys.stderr, flush=True)
        return Point(p, tensors, meta)
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


def open_log(path: Path, step: int):
    """log.jsonl opened for appending, without the rows after `step` (a resumed run writes them again)."""
    trim_log(path, step)
    return open(path, "a")


class PendingLog:
    """An evaluation's log.jsonl, written as DIR/log.jsonl.tmp (made at the first row) and renamed over log.jsonl
    with the results (commit): a rerun that fails leaves the earlier results and their log as they were."""

    def __init__(self, path: Path):
        self.path, self.tmp, self.f = path, path.with_name(path.name + ".tmp"), None

    def write(self, row: dict):
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.tmp, "w")
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def commit(self):
        if self.f is not None:
            self.f.close()
            os.replace(self.tmp, self.path)


def write_text(path: Path, text: str):
    """Write a small file atomically (a temporary name, then a rename): never half a results.json."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rotate(output_dir: Path, keep: int):
    """Keep the newest `keep` periodic checkpoints DIR/ckpt-STEP.safetensors (0 = keep all)."""
    if keep > 0:  # (a bare [:-keep] would delete them all for keep = 0)
        for old in sorted(output_dir.glob("ckpt-*.safetensors"))[:-keep]:
            old.unlink()


# ----------------------------------------------------------------------------- the state of a run

def state_tensors(model, target, optimizer, queue, ptr, acc) -> dict:
    """Everything a resume needs, as flat tensors (docs/checkpoints-io.md, "Checkpoint layout")."""
    t = dict(model.state_dict())  # backbone.* (torchvision names), projector.*, predictor.*
    t.update({f"target.{k}": v for k, v in target.state_dict().items()})
    t.update(ck.optimizer_tensors(optimizer))
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
    target.load_state_dict(ck.prefixed(tensors, "target."))
    ck.load_optimizer_tensors(optimizer, tensors)
    if queue is not None:
        queue.copy_(tensors["queue"])
    return int(tensors["queue_ptr"]) if queue is not None else 0, meta["step"], meta.get("skipped_steps", 0)


def load_scaler(scaler, tensors):
    """The fp16 loss scaler's state (scaler.* entries), if the run has a scaler and the checkpoint saved one."""
    if scaler is not None:
        scaler.load_state_dict({k[7:]: v.item() for k, v in tensors.items() if k.startswith("scaler.")} or
                               scaler.state_dict())


# Flags a resumed run may change: where and how it runs, not what it computes.
FREE = {"data", "resume", "output_dir", "max_steps", "save_every", "keep", "skip_nonfinite", "max_bad_fraction",
        "log_every", "knn_every", "knn_bank_size", "workers", "streaming", "mixed_precision", "channels_last",
        "tensorboard", "log_with"}


def check_same_run(point, args: dict):
    """A resumed run must compute what the checkpoint's run computed: a one-line error naming the flags that differ
    (auto-resume picks up DIR's checkpoint, so a new experiment in an old --output-dir would otherwise mix the two)."""
    if point is None:  # a fresh run
        return
    path, meta = point.path, point.meta
    if meta.get("format") != "fastmoco-pretrain-v1":  # e.g. a backbone-only import (transfer/import_weights.py)
        raise ValueError(f"{path} is not a pretraining checkpoint (format {meta.get('format')}): --resume needs one "
                         "written by pretrain.py, or imported from a full published pretraining file")
    saved = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    if (meta.get("method"), meta.get("arch")) != (args["method"], args["arch"]):
        raise ValueError(f"{path} is a {meta.get('method')}/{meta.get('arch')} checkpoint; this run is "
                         f"{args['method']}/{args['arch']} (a new run needs a new --output-dir)")
    differ = [k for k, v in args.items() if k not in FREE and k in saved and saved[k] != v]
    if differ:
        raise ValueError(f"{path} was written by a run with other settings ({', '.join(differ)}): use a new "
                         "--output-dir for a new run, or the checkpoint's settings to continue it")


# ----------------------------------------------------------------------------- guards

def check_ranges(ranges: dict):
    """{"--flag": (value, low) or (value, low, high)}: a one-line error for the first value out of range (or NaN);
    low ">0": above 0. None values (the recipe's default) are not checked."""
    for name, (v, lo, *hi) in ranges.items():
        top = hi[0] if hi else math.inf
        if v is not None and not (math.isfinite(v) and (v > 0 if lo == ">0" else v >= lo) and v <= top):
            low = "a number above 0" if lo == ">0" else f"a number from {lo}"
            raise ValueError(f"{name} {v} is out of range: use {low}" + (f" to {top}" if hi else
                                                                          "" if lo == ">0" else " up"))


def check_options(args: dict, ranges: dict):
    """check_ranges over a stage script's options {name: value}: ranges {name: (low,) or (low, high)}, the flags
    named --name-with-dashes."""
    check_ranges({"--" + k.replace("_", "-"): (args[k], *lim) for k, lim in ranges.items()})


def trackers(log_with) -> list:
    """--log-with a,b --log-with c -> ["a", "b", "c"] for Accelerate, or a one-line error for a name Accelerate does
    not know or a tracker that is not installed (Accelerate would leave that one out without a word)."""
    names = list(dict.fromkeys(n.strip() for s in log_with or [] for n in s.split(",") if n.strip()))
    for n in names:
        if n not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"--log-with {n} is not a tracker: choose from {', '.join(LOGGER_TYPE_TO_CLASS)}")
        if n not in {str(t) for t in get_available_trackers()}:
            raise ValueError(f"--log-with {n}: {n} is not installed; pip install {n.replace('_', '-')} "
                             "(or pip install -r requirements-trackers.txt)")
    return names


def check_stage(args: dict, ranges: dict, log_with) -> list:
    """A stage script's checks before any work: each value (check_options), its --output-dir (check_writable), its
    trackers -> the tracker names for Accelerate."""
    check_options(args, ranges)
    check_writable(args["output_dir"])
    return trackers(log_with)


def writable(path, folder: bool = False):
    """Raise OSError('cannot write PATH: why') now, before any work, if PATH (a file, or a folder written whole and
    renamed into place) cannot be written later: a file's PATH is a folder, a parent is a file, or the nearest
    existing parent cannot be written to. Makes nothing: a refused command leaves no empty folders behind."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise OSError(f"cannot write {path}: it is a folder")
    nearest = next((p for p in path.absolute().parents if p.exists()), Path("/"))  # under a file nothing exists
    if not nearest.is_dir():
        raise OSError(f"cannot write {path}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):  # also False on a read-only file system
        raise OSError(f"cannot write {path}: Permission denied")


def check_writable(folder: Path, flag: str = "--output-dir"):
    """A one-line error now, not a traceback after the work, when `folder` cannot be written: a file is tried in it,
    or in its nearest existing parent (which must then take the new folders). Makes nothing, so every process of a
    run can check at once."""
    path = Path(folder).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"cannot write to {flag} {folder} ({e.strerror}): choose another path") from None


def check_bad_images(acc, bad: int, seen: int, max_fraction: float) -> int:
    """The undecodable images of all processes (`bad`: this process's); stop when they are more than `max_fraction`
    of the images (read so far, or in the data set)."""
    bad = int(acc.reduce(torch.tensor(float(bad), device=acc.device), "sum").item())
    if bad > max_fraction * seen:
        raise ValueError(f"{bad} images could not be decoded (the 'skipped undecodable image' warnings name them), "
                         f"more than --max-bad-fraction {max_fraction} of {seen}: fix or remove them, or raise "
                         "--max-bad-fraction")
    return bad


def all_finite(loss, model, acc) -> bool:
    """--skip-nonfinite: are the loss and the (unscaled) gradients finite on every process?"""
    ok = torch.isfinite(loss.detach()).all()
    ok &= torch.stack([p.grad.isfinite().all() for p in model.parameters() if p.grad is not None]).all()
    return acc.reduce(ok.float(), "sum").item() == acc.num_processes


def snapshot(target, online) -> list:
    """What a step changes besides the optimizer: the target encoder (EMA) and both encoders' BN statistics."""
    return [t.clone() for t in (*target.state_dict().values(), *online.buffers())]


def restore(target, online, snap: list):
    for t, saved in zip((*target.state_dict().values(), *online.buffers()), snap):
        t.copy_(saved)


# ----------------------------------------------------------------------------- log rows

class Window:
    """The summed loss and the throughput of the steps since the last log row (one host sync per row)."""

    def __init__(self, acc, step, trained=0.0):
        self.acc, self.loss, self.trained = acc, torch.zeros((), device=acc.device), trained
        self.reset(step)

    def reset(self, step):
        self.trained = self.seconds()
        self.loss.zero_()
        self.t, self.step, self.skipped = time.perf_counter(), step, 0  # skipped: non-finite steps not in the sum
        self.overflows = 0  # fp16: steps whose optimizer step the loss scaler skipped (in the sum: the loss is finite)

    def seconds(self) -> float:
        """Training seconds of the run so far (kNN evaluations excluded: they move `t` forward)."""
        return self.trained + time.perf_counter() - self.t if hasattr(self, "t") else self.trained

    def add(self, loss):
        self.loss += loss.detach()

    def read(self, step, batch) -> tuple:
        """(mean loss over all processes and the window's applied steps, images per second)."""
        done = step - self.step - self.skipped
        mean = self.acc.reduce(self.loss, "mean").item() / done if done else math.nan
        return mean, (step - self.step) * batch / (time.perf_counter() - self.t)


def record(acc, log, step, per_epoch, row):
    """One row of log.jsonl (the main process's open file `log`, else None) and of the trackers (TensorBoard)."""
    row = dict(step=step, epoch=round(step / per_epoch, 3), **row)
    if log:
        log.write(json.dumps(row) + "\n")
        log.flush()
    acc.log({k: v for k, v in row.items() if k != "step"}, step=step)


# ----------------------------------------------------------------------------- several processes: one start

def check_same_start(acc, step: int):
    """Every process must continue from the same step. Each one looks for the checkpoint in --output-dir itself, so on
    several machines that folder has to be one they all share."""
    steps = acc.gather(torch.tensor([step], device=acc.device)).tolist()
    if len(set(steps)) > 1:
        raise ValueError(f"the processes would start from different steps ({', '.join(map(str, steps))}, by process): "
                         "on several machines --output-dir must be a folder all of them share (NFS, Lustre), under "
                         "the same path")
