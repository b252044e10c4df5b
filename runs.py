"""The mechanics of a pretraining run, apart from the algorithm: its output directory (which checkpoint to resume
from, automatically after a crash or a pre-emption, past truncated or corrupt files; rotation of periodic
checkpoints; a log that matches the resumed state), the state a resume needs, the guards (argument ranges,
undecodable images, non-finite steps) and the log rows (loss window, kNN monitor). Checkpoints are written by
fastmoco.save_checkpoint (atomic, checksummed). Bad input or state raises ValueError with a one-line message."""

import contextlib
import errno
import functools
import json
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from safetensors import SafetensorError, safe_open

import fastmoco as fm
from data import clean_transform, load_rgb, process_shards, with_labels


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
        "log_every", "knn_every", "knn_bank_size", "workers", "streaming", "mixed_precision", "channels_last",
        "tensorboard", "log_with"}


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


# ----------------------------------------------------------------------------- kNN monitor at ImageNet size
# The bank is a (labelled subset of the) train split encoded once per evaluation, L2-normalised rows in half precision
# on the device; queries are scored in chunks, so no (n_val, n_train) similarity (ImageNet: 256 GB in fp32) exists.

def bank_dtype(device) -> torch.dtype:
    """fp16 on CUDA: half of fp32's memory, and on unit vectors 8x finer than bf16 (10 mantissa bits, not 7). fp32 on
    the CPU: exact, and fp16 matmul is no faster there (measured on the development Xeon, one thread: 228 ms fp16,
    185 ms fp32 for (1024, 512) x (512, 20000); bf16 took 43 ms, but only with AMX, and is 8x coarser)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def normalized(f, dtype) -> torch.Tensor:
    """Rows L2-normalised in fp32, then stored in `dtype` (the form knn_predict takes)."""
    return torch.nn.functional.normalize(f.float(), dim=1).to(dtype)


@torch.no_grad()
def knn_predict(queries, bank, bank_y, classes, k=200, t=0.1, chunk=1024):
    """fm.knn_predict's weighted vote (Wu et al. 2018: the k most cosine-similar bank entries vote exp(sim / t)),
    `chunk` queries at a time: memory (chunk, M), not (n, M). queries (n, D), bank (M, D): normalized() rows; the
    similarity is computed in the bank's dtype, the vote in fp32. -> predicted labels (n,)."""
    pred = []
    for q in queries.split(chunk):
        w, idx = (q.to(bank.dtype) @ bank.T).topk(min(k, len(bank)), dim=1)  # (chunk, M) -> (chunk, k)
        scores = torch.zeros(len(q), classes, device=bank.device)
        pred.append(scores.scatter_add_(1, bank_y[idx], (w.float() / t).exp()).argmax(1))
    return torch.cat(pred) if pred else torch.zeros(0, dtype=torch.long, device=bank.device)


def balanced_subset(labels, size: int, seed: int) -> list:
    """Sorted indices of `size` examples, class-balanced: in a seeded random order, every class's first example,
    then every class's second, ... So each class gets size // C or one more (all it has, if fewer)."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    y = np.asarray(labels)[perm]
    order = np.argsort(y, kind="stable")  # grouped by class, each group in permutation order
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y)) - np.searchsorted(y[order], y[order])  # position within its class
    return sorted(perm[np.lexsort((np.arange(len(y)), rank))[:size]].tolist())


class LabelledStream(torch.utils.data.IterableDataset):
    """A streamed split as {x, y}: each DataLoader worker keeps at most ceil(size / workers) examples, and at most
    ceil(that / classes) of a class (roughly balanced; reading stops once it has them); size None: all.
    Images are decoded (load_rgb) only once kept; undecodable ones are skipped."""

    def __init__(self, ds, column, transform, size=None, classes=None):
        self.ds, self.column, self.transform, self.size, self.classes = ds, column, transform, size, classes

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        cap = math.ceil(self.size / (info.num_workers if info else 1)) if self.size else math.inf
        per_class = math.ceil(cap / self.classes) if self.size and self.classes else math.inf
        kept, counts = 0, {}
        for ex in self.ds:
            if kept >= cap:
                return
            y = ex["label"]
            if counts.get(y, 0) < per_class and (img := load_rgb(ex[self.column])) is not None:
                counts[y], kept = counts.get(y, 0) + 1, kept + 1
                yield {"x": self.transform(img), "y": y, "ok": True}  # undecodable images were skipped above


def knn_split(ds, column, transform, rank, world, workers, size=0, seed=0):
    """(this process's part of a split as {x, y} examples, its DataLoader workers): map-style, every world-th of
    balanced_subset (or of all); streamed, its whole shards (data.process_shards), shuffled (seeded) for a subset."""
    import datasets

    if not isinstance(ds, torch.utils.data.IterableDataset):
        idx = range(len(ds))
        if 0 < size < len(ds):  # the labels alone, from Arrow: no image is read
            idx = balanced_subset(ds.with_format("numpy", columns=["label"])[:]["label"], size, seed)
        return with_labels(ds.select(idx[rank::world]), column, transform), workers
    if isinstance((ds.features or {}).get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))  # decoded by LabelledStream, when kept
    ds = process_shards(ds, rank, world)
    classes = getattr((ds.features or {}).get("label"), "num_classes", None)
    ds = LabelledStream(ds.shuffle(seed=seed, buffer_size=10_000) if size else ds, column, transform,
                        math.ceil(size / world) if size else None, classes)
    return ds, min(workers, ds.ds.num_shards)  # a worker without a shard would sit idle


def gather_rows(acc, x) -> torch.Tensor:
    """The rows of `x` from every process, concatenated in process order (their counts may differ)."""
    if acc.num_processes == 1:
        return x
    n = acc.gather(torch.tensor([len(x)], device=acc.device)).tolist()
    padded = acc.gather(acc.pad_across_processes(x, dim=0))  # (world * max(n), ...)
    return torch.cat([padded[r * max(n):r * max(n) + m] for r, m in enumerate(n)])


@torch.no_grad()
def knn_features(backbone, ds, workers, batch, dtype, acc) -> tuple:
    """(normalized features (n, D) in `dtype`, labels (n,)) of this process's examples, on the device."""
    f, y = [torch.zeros(0, backbone.dim, dtype=dtype, device=acc.device)], [torch.zeros(0, dtype=torch.long,
                                                                                            device=acc.device)]
    for b in torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers):
        ok = b["ok"].to(acc.device)  # undecodable images (data.with_labels) leave no row
        with acc.autocast():
            f.append(normalized(backbone(b["x"].to(acc.device)), dtype)[ok])
        y.append(b["y"].to(acc.device)[ok])
    return torch.cat(f), torch.cat(y)


@torch.no_grad()
def knn_top1(backbone, train, val, column, size, acc, bank_size=0, seed=0, workers=0, batch=256) -> tuple:
    """kNN top-1 (k=200, t=0.1) of `backbone` on clean views, and the bank's size: the train split (or a labelled
    subset of `bank_size`, the same at every evaluation) as the bank, gathered on every process; each process scores
    its share of the val split against it."""
    t, dtype, rank, world = clean_transform(size), bank_dtype(acc.device), acc.process_index, acc.num_processes
    backbone.eval()
    bank, bank_y = knn_features(backbone, *knn_split(train, column, t, rank, world, workers, bank_size, seed),
                                batch, dtype, acc)
    bank, bank_y = gather_rows(acc, bank)[:bank_size or None], gather_rows(acc, bank_y)[:bank_size or None]
    q, q_y = knn_features(backbone, *knn_split(val, column, t, rank, world, workers), batch, dtype, acc)
    backbone.train()
    if not len(bank) or not acc.reduce(torch.tensor(len(q_y), device=acc.device), "sum").item():
        raise ValueError("no image of the kNN monitor's train or validation split could be decoded (the 'skipped "
                         "undecodable image' warnings name them): fix the data, or drop --knn-every")
    pred = knn_predict(q, bank, bank_y, int(bank_y.max()) + 1)
    hits, seen = acc.reduce(torch.tensor([int((pred == q_y).sum()), len(q_y)], device=acc.device), "sum").tolist()
    return 100.0 * hits / seen, len(bank)


def log_knn(acc, log, step, per_epoch, backbone, knn_data, column, size, window, bank_size=0, seed=0,
            workers=0) -> float:
    """Log kNN top-1 of the online backbone (knn_top1); its time does not count as training time. Returns top-1."""
    t0 = time.perf_counter()
    top1, bank = knn_top1(backbone, *knn_data, column, size, acc, bank_size, seed, workers)
    record(acc, log, step, per_epoch, dict(knn_top1=top1, knn_bank=bank, knn_seconds=time.perf_counter() - t0,
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
