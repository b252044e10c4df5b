"""The mechanics of a pretraining run, apart from the algorithm: its output directory (which checkpoint to resume
from, automatically after a crash or a pre-emption, past truncated or corrupt files; rotation of periodic
checkpoints; a log that matches the resumed state), the state a resume needs, the guards (argument ranges,
undecodable images, non-finite steps) and the log rows (loss window, kNN monitor). Checkpoints are written by
fastmoco.save_checkpoint (atomic, checksummed). Bad input or state raises ValueError with a one-line message."""

import contextlib
import functools
import json
import math
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

import fastmoco as fm
from data import clean_transform


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
            raise ValueError(str(e)) from None
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


def open_log(path: Path, step: int):
    """log.jsonl opened for appending, without the rows after `step` (a resumed run writes them again)."""
    trim_log(path, step)
    return open(path, "a")


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


def load_scaler(scaler, tensors):
    """The fp16 loss scaler's state (scaler.* entries), if the run has a scaler and the checkpoint saved one."""
    if scaler is not None:
        scaler.load_state_dict({k[7:]: v.item() for k, v in tensors.items() if k.startswith("scaler.")} or
                               scaler.state_dict())


# Flags a resumed run may change: where and how it runs, not what it computes.
FREE = {"data", "resume", "output_dir", "max_steps", "save_every", "keep", "skip_nonfinite", "max_bad_fraction",
        "log_every", "knn_every", "workers", "streaming", "mixed_precision", "channels_last", "tensorboard"}


def check_same_run(point, args: dict):
    """A resumed run must compute what the checkpoint's run computed: a one-line error naming the flags that differ
    (auto-resume picks up DIR's checkpoint, so a new experiment in an old --output-dir would otherwise mix the two)."""
    if point is None:  # a fresh run
        return
    path, _, meta = point
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
    """{"--flag": (value, low) or (value, low, high)}: a one-line error for the first value out of range (or NaN)."""
    for name, (v, lo, *hi) in ranges.items():
        if not (lo <= v <= (hi or [math.inf])[0] and math.isfinite(v)):
            raise ValueError(f"{name} {v} is out of range: use a finite number from {lo}"
                             + (f" to {hi[0]}" if hi else " up"))


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


def log_knn(acc, log, step, per_epoch, backbone, knn_data, column, size, window) -> float:
    """Log kNN top-1 of the online backbone; its time does not count as training time. Returns top-1."""
    t0 = time.perf_counter()
    top1 = knn_top1(backbone, *knn_data, column, size, acc)
    record(acc, log, step, per_epoch, dict(knn_top1=top1, knn_seconds=time.perf_counter() - t0,
                                           train_seconds=round(window.seconds() - (time.perf_counter() - t0), 2)))
    window.t += time.perf_counter() - t0
    return top1


# ----------------------------------------------------------------------------- several processes: fail together

def check_same_start(acc, step: int):
    """Every process must continue from the same step. Each one looks for the checkpoint in --output-dir itself, so on
    several machines that folder has to be one they all share."""
    steps = acc.gather(torch.tensor([step], device=acc.device)).tolist()
    if len(set(steps)) > 1:
        raise ValueError(f"the processes would start from different steps ({', '.join(map(str, steps))}, by process): "
                         "on several machines --output-dir must be a folder all of them share (NFS, Lustre), under "
                         "the same path")


POLL, GRACE = 1.0, 10.0  # seconds: how often each process looks for a failure; how long a failing one waits


def shared_store():
    """A client of the key-value store that torch.distributed's processes meet at (MASTER_ADDR:MASTER_PORT, hosted
    by the launcher), with keys of this launch only (torchrun may restart workers with the same store), or None on
    one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=30))
    return dist.PrefixStore(f"fastmoco-failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


class FailureWatch(threading.Thread):
    """A daemon thread that ends this process with another process's one-line error as soon as one is posted."""

    def __init__(self):
        super().__init__(daemon=True)
        self.lock, self.done, self.store = threading.Lock(), threading.Event(), None

    def run(self):
        while not self.done.wait(POLL):
            with self.lock:
                if self.done.is_set():
                    return
                try:
                    self.store = self.store or shared_store()  # None until the process group exists
                    if self.store is None or not self.store.check(["error"]):
                        continue
                    msg = self.store.get("error").decode()
                except Exception:  # the store is gone: the launcher of another machine ended (a normal end there)
                    return
                print(msg, file=sys.stderr, flush=True)  # before the poster may exit (see post)
                with contextlib.suppress(Exception):
                    self.store.add("read", 1)
                os._exit(1)  # the main thread may be blocked inside a collective: no exception could reach it

    def post(self, msg: str) -> bool:
        """Print this process's one-line error and publish it (the first one posted wins), then wait, at most GRACE
        seconds, until every process has printed it: torchrun stops the other processes of a machine as soon as one
        exits. Returns False on one process (nobody to tell, nothing printed)."""
        with self.lock:
            self.done.set()
            try:
                store = self.store or shared_store()
            except Exception:
                store = None
            if store is None:
                return False
            print(msg, file=sys.stderr, flush=True)
            try:
                if not store.check(["error"]):
                    store.set("error", msg)
                store.add("read", 1)
                world, t = dist.get_world_size(), time.time()
                while store.add("read", 0) < world and time.time() - t < GRACE:
                    time.sleep(0.05)
            except Exception:  # the store is gone: nobody is left to tell
                pass
            return True


def first_line(e: Exception) -> str:
    """The first line of an exception's message, printable (a corrupt file's bytes can reach it)."""
    line = (str(e).strip().splitlines() or [""])[0]
    return "".join(c if c.isprintable() else " " for c in line).strip().rstrip(":")


def leave_together(main):
    """Decorator of a script's main: when one process fails (a full disk under the main process's save, an exception
    in one process's data loader, out of memory), every process exits within seconds with that one-line error.

    Without it the others would block in their next collective (DDP's gradient all-reduce) until its timeout (NCCL
    10 min, gloo 30 min), or die with a long traceback where gloo notices the dead peer. Why a store and a thread:
    a flag carried by the step's collectives needs the failing process to still join them (its loader has no
    batch) and a host sync per step; a short collective timeout also ends legitimately slow ones (a checkpoint
    write, the kNN monitor). The store costs nothing in the step: one small request per process per second, and
    it covers a failure anywhere in main. A process killed outright (SIGKILL, a lost machine) posts nothing: torchrun
    stops the others on its machine, the collective timeout the rest."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        watch = FailureWatch()
        watch.start()
        try:
            return main(*args, **kwargs)
        except SystemExit as e:  # a one-line error (fail)
            if isinstance(e.code, str) and watch.post(e.code):
                raise SystemExit(1) from None  # printed by post, before any process exited
            raise
        except Exception as e:  # anything else: this process prints its traceback, every process a line naming it
            if not (dist.is_initialized() and dist.get_world_size() > 1):
                raise
            traceback.print_exc()
            watch.post(f"error: process {dist.get_rank()} failed ({type(e).__name__}: {first_line(e)}); its traceback "
                       "is above in its output; rerun the same command: it resumes from the last checkpoint")
            raise SystemExit(1) from None
        finally:
            watch.done.set()
    return run
