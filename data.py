"""Data for the stage scripts: the built-in demo set, Hugging Face datasets (Hub streaming, local parquet / image
folders / saved datasets), each method's augmentations, and seeded samplers that make runs exactly resumable.
Bad input raises ValueError with a one-line message (the stage scripts print it as their error)."""

import io
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms import v2

import fastmoco as fm

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- augmentation

class SeparableBlur(v2.GaussianBlur):
    """v2.GaussianBlur (same sigma draw, reflect padding, rounding) as two 1-D convolutions instead of one k x k:
    ~3.5x faster at 224 px (k=23), where the blur was ~2/3 of the augmentation time (bench/data_pipeline.py).
    Equal to torchvision's output up to float rounding: a few pixel values in 10^5 differ by 1."""

    def transform(self, inpt, params):
        pil = not isinstance(inpt, torch.Tensor)
        x = v2.functional.pil_to_tensor(inpt) if pil else inpt  # (C, H, W) uint8
        (kx, ky), (sx, sy), C = self.kernel_size, params["sigma"], x.shape[-3]
        y = torch.nn.functional.pad(x.reshape(-1, *x.shape[-3:]).float(), [kx // 2, kx // 2, ky // 2, ky // 2],
                                    mode="reflect")
        y = torch.nn.functional.conv2d(y, gaussian_kernel(kx, sx).view(1, 1, 1, kx).expand(C, 1, 1, kx), groups=C)
        y = torch.nn.functional.conv2d(y, gaussian_kernel(ky, sy).view(1, 1, ky, 1).expand(C, 1, ky, 1), groups=C)
        y = (y.round_() if not x.is_floating_point() else y).to(x.dtype).reshape(x.shape)
        return v2.functional.to_pil_image(y, mode=inpt.mode) if pil else y


def gaussian_kernel(k: int, sigma: float) -> torch.Tensor:
    """(k,) normalised Gaussian weights, as torchvision's."""
    x = torch.linspace(-(k // 2), k // 2, k)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def augmentations(name: str, size: int):
    """The two views' transforms (PIL -> normalised tensor) of each method's recipe."""
    kernel = 2 * round(0.05 * size) + 1  # 23 at 224 px, as in BYOL / MoCo v3
    blur = lambda p: v2.RandomApply([SeparableBlur(kernel, sigma=(0.1, 2.0))], p=p)  # noqa: E731
    tail = [v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if name.startswith("small"):  # --recipe small (solo-learn, lightly): crops of 8-100%, no blur at 32-96 px
        base = [v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2 if name == "small-asymmetric" else 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(0.2)]
        if name == "small-asymmetric":  # solo-learn's "asymmetric" CIFAR views: solarize view 2 only
            return v2.Compose(base + tail), v2.Compose(base + [v2.RandomSolarize(128, p=0.2)] + tail)
        return (v2.Compose(base + tail),) * 2
    if name == "mocov1":
        t = v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0)), v2.RandomGrayscale(0.2),
                        v2.ColorJitter(0.4, 0.4, 0.4, 0.4)] + tail)
        return t, t
    if name in ("mocov2", "fastmoco"):  # MoCo v2 "aug+"; Fast-MoCo's official code crops with bicubic
        interp = v2.InterpolationMode.BICUBIC if name == "fastmoco" else v2.InterpolationMode.BILINEAR
        t = v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=interp),
                        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
                        blur(0.5)] + tail)
        return t, t
    # MoCo v3 (BYOL's asymmetric views): view 1 always blurred; view 2 rarely blurred, sometimes solarised.
    base = [v2.RandomResizedCrop(size, scale=(0.2, 1.0)), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(0.2)]
    return (v2.Compose(base + [blur(1.0)] + tail),
            v2.Compose(base + [blur(0.1), v2.RandomSolarize(128, p=0.2)] + tail))


def small_crops(name: str, size: int, n: int, scale=(0.05, 0.14)):
    """SwAV multi-crop (Fast-MoCo Table 4b): n low-resolution views, view 1's pipeline with RandomResizedCrop(size,
    scale) (SwAV's 96 px crops of 5-14% of the image)."""
    t = augmentations(name, size)[0].transforms
    return (v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=t[0].interpolation)] + t[1:]),) * n


def clean_transform(size: int):
    """Non-augmented evaluation view: resize (x256/224 above 64 px) and centre crop."""
    return v2.Compose([v2.Resize(size if size <= 64 else size * 256 // 224, antialias=True), v2.CenterCrop(size),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def sample_seed(*ints) -> int:
    """A seed that is a fixed function of (run seed, epoch, index, ...): augmentation does not depend on worker
    scheduling, so a resumed run draws exactly the same views."""
    s = 0
    for i in ints:
        s = (s * 1_000_003 + int(i)) % (2 ** 63)
    return s


# ----------------------------------------------------------------------------- data

DEMO_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "x", "frame", "half-disc")


def demo_dataset(split: str):
    """Built-in demo data: 10 classes of procedurally drawn 32 px shapes (DEMO_CLASSES), 2,560 train / 1,000 test.
    Each image: one light grey shape (radius 9-14 px, at a random place) on a dark grey background. The class is
    the shape alone, and what varies within a class (place, size) is what the crops vary, so two views of an image
    share its shape and little else. Random features separate these shapes poorly (kNN ~19%). Measured while
    designing it: random grey levels per image (or colours) give every image a brightness that survives the
    colour jitter, and contrastive learning then separates images by brightness instead of shape."""
    import datasets

    rng = random.Random(0 if split == "train" else 1)
    images, labels = [], []
    for i in range(2560 if split == "train" else 1000):
        c, s = i % 10, 32
        bg, fg = (40, 40, 40), (215, 215, 215)
        img = Image.new("RGB", (s, s), bg)
        d = ImageDraw.Draw(img)
        r = rng.uniform(9, 14)
        x, y = rng.uniform(r, s - r), rng.uniform(r, s - r)
        box, w = [x - r, y - r, x + r, y + r], max(2, round(r / 4))
        name = DEMO_CLASSES[c]
        if name == "circle":
            d.ellipse(box, fill=fg)
        elif name == "square":
            d.rectangle(box, fill=fg)
        elif name == "triangle":
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fg)
        elif name == "cross":
            d.rectangle([x - r, y - r / 3, x + r, y + r / 3], fill=fg)
            d.rectangle([x - r / 3, y - r, x + r / 3, y + r], fill=fg)
        elif name == "ring":
            d.ellipse(box, outline=fg, width=w)
        elif name == "star":  # five points, inner radius 0.45 r
            d.polygon([(x + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                        y - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)], fill=fg)
        elif name == "diamond":
            d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fg)
        elif name == "x":
            for sign in (1, -1):
                d.line([(x - r, y - sign * r), (x + r, y + sign * r)], fill=fg, width=max(2, round(r / 2.2)))
        elif name == "frame":
            d.rectangle(box, outline=fg, width=w)
        else:  # half-disc, flat side down
            d.pieslice(box, 180, 360, fill=fg)
        images.append(img)
        labels.append(c)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=list(DEMO_CLASSES)))
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def check_hub(name: str):
    """Fail within seconds, with a way forward, when a Hub dataset cannot be reached (never hang)."""
    from huggingface_hub import HfApi

    local = "pass local data instead: --data /path/to/folder (parquet files or images) or --data demo"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ValueError(f"HF_HUB_OFFLINE is set, so {name!r} cannot be streamed from the Hub; {local}")
    try:
        HfApi().dataset_info(name, timeout=10)
    except Exception as e:  # network, DNS, auth, gating, missing repo: all end the same way
        hint = "log in with `hf auth login` and accept its terms on the Hub, or " if "401" in str(e) or "gated" in str(
            e).lower() else ""
        raise ValueError(f"cannot reach {name!r} on the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); {hint}{local}") from None


def load_split(data: str, split: str, streaming: bool):
    """(dataset, number of examples) of one split of --data: 'demo', a local folder (parquet files named like
    `train-*.parquet`, an image folder, or a dataset saved with save_to_disk), a parquet file, or a Hub name (always
    streamed). (None, 0) if the split is absent."""
    import datasets

    if data == "demo":
        ds = demo_dataset("train" if split == "train" else "test")
        return ds, len(ds)
    path = Path(data).expanduser()
    if not path.exists():
        if data.startswith((".", "/", "~")) or data.count("/") != 1:
            raise ValueError(f"data path {data} does not exist: pass a folder of parquet files or images, a Hub name, "
                             "or demo")
        check_hub(data)
        try:
            ds = datasets.load_dataset(data, split=split, streaming=True)
        except ValueError:  # no such split
            return None, 0
        n = ds.info.splits[split].num_examples if ds.info.splits and split in ds.info.splits else 0
        return ds, n
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        ds = ds.get(split) if isinstance(ds, datasets.DatasetDict) else (ds if split == "train" else None)
        return (ds, len(ds)) if ds is not None else (None, 0)
    files = sorted(str(f) for f in path.rglob("*.parquet")) if path.is_dir() else [str(path)]
    if files and files[0].endswith(".parquet"):
        named = [f for f in files if Path(f).name.startswith(f"{split}-") or f"/{split}/" in f]
        if not named and split != "train":
            return None, 0
        import pyarrow.parquet as pq

        n = sum(pq.ParquetFile(f).metadata.num_rows for f in named or files)
        return datasets.load_dataset("parquet", data_files=named or files, split="train", streaming=streaming), n
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    except ValueError:
        return None, 0
    return (ds.to_iterable_dataset(num_shards=64) if streaming else ds), len(ds)


def pretrain_data(data: str, streaming, column: str, batch: int, knn: bool):
    """pretrain.py's data: (train split, its size, whether it streams, (train, val) splits for the kNN monitor or
    None). Streaming: always for Hub names, else as asked (default off); the kNN's validation split streams too."""
    hub = not Path(data).expanduser().exists() and data != "demo"
    streaming = hub if streaming is None else (streaming or hub)
    ds, n = load_split(data, "train", streaming)
    if ds is None:
        raise ValueError(f"no training split found in {data}")
    if n == 0:
        raise ValueError(f"cannot tell how many images {data}'s train split holds (its card lists no size): download "
                         "it and pass the local folder")
    if column not in (ds.column_names or [column]):
        raise ValueError(f"--image-column {column} is not a column of {data} (columns: {', '.join(ds.column_names)})")
    if n < batch:
        raise ValueError(f"{data} has {n} images, fewer than one global batch of {batch}: lower --batch-size")
    if not knn:
        return ds, n, streaming, None
    val, _ = load_split(data, "validation", streaming)  # streamed like the train split: never materialised
    val = val if val is not None else load_split(data, "test", streaming)[0]
    if val is None or any("label" not in (split.column_names or []) for split in (ds, val)):
        raise ValueError("--knn-every needs labelled data (a label column) with a validation or test split")
    return ds, n, streaming, (ds, val)


def load_rgb(value):
    """An RGB PIL image from a dataset value (undecoded {"bytes", "path"}, raw bytes, or PIL), or None if it cannot
    be decoded (truncated, empty, not an image, a decompression bomb). Modes are converted: grayscale, CMYK and
    palette -> RGB, 16-bit -> 8-bit, transparency composited on white."""
    try:
        img = value
        if isinstance(value, dict):
            img = value.get("bytes") or value.get("path")
        if isinstance(img, (bytes, bytearray)):
            img = io.BytesIO(img)
        if not isinstance(img, Image.Image):
            img = Image.open(img)
        img.load()  # decode now: a truncated file fails here, not inside the transforms
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: scale to 8 bits
            a = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(a / 257 if a.max() > 255 else a, 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB")
        return img if img.width and img.height else None
    except Exception:  # PIL raises many types on broken files; one bad file must not end a multi-hour run
        return None


def skipped(what):
    print(f"warning: skipped undecodable image {what}", file=sys.stderr, flush=True)


class Views(torch.utils.data.Dataset):
    """Map-style: key (epoch, index) -> the transformed views of image `index`, seeded by (seed, epoch, index), and
    an info row (1 if image `index` is undecodable, 0, 0, 0). An undecodable image is replaced by the next decodable
    one, so batches keep their size and the run stays deterministic."""

    def __init__(self, ds, column, transforms, seed):
        self.ds, self.column, self.transforms, self.seed = ds, column, transforms, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, i = key
        img = load_rgb(self.ds[i][self.column])
        bad = int(img is None)  # counted once, in its own slot
        if bad:
            skipped(f"#{i}")
        for j in range(i + 1, i + len(self.ds)):  # the stand-in: the next decodable image
            if img is not None:
                break
            img = load_rgb(self.ds[j % len(self.ds)][self.column])
        if img is None:
            raise ValueError("no image of the data set can be decoded (the 'skipped undecodable image' warnings "
                             "name them): check the files and --image-column")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, i))
            return (*(t(img) for t in self.transforms), torch.tensor([bad, 0, 0, 0]))


class GlobalBatches(torch.utils.data.Sampler):
    """This process's share of each global batch of a seeded per-epoch permutation, from `start` (a step), so a
    resumed run (and a run on any number of processes) sees the same global batches."""

    def __init__(self, n, batch, rank, world, seed, start, stop):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start, self.stop, self.per_epoch = start, stop, n // batch

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        b, epoch, perm = self.batch // self.world, -1, None
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch)))
            lo = (step % self.per_epoch) * self.batch + self.rank * b
            yield [(epoch, int(i)) for i in perm[lo:lo + b]]


class StreamViews(torch.utils.data.IterableDataset):
    """Streaming: this process's shards (reshuffled each epoch), endlessly; DataLoader workers split the shards.
    Each sample carries an info row (undecodable images skipped before it, worker, epoch, position after it in the
    worker's epoch) so the run can save where every worker is; `positions` {worker: (epoch, position)} resumes there."""

    def __init__(self, ds, column, transforms, seed, positions=None):
        self.ds, self.column, self.transforms, self.seed, self.positions = ds, column, transforms, seed, positions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        start, skip = (self.positions or {}).get(wid, (0, 0))
        bad = 0
        for epoch in range(start, 10 ** 9):
            self.ds.set_epoch(epoch)
            j = -1
            for j, ex in enumerate(self.ds):
                if epoch == start and j < skip:  # consumed before the checkpoint (not decoded: cheap)
                    continue
                img = load_rgb(ex[self.column])
                if img is None:
                    bad += 1
                    skipped(f"{ex[self.column].get('path') if isinstance(ex[self.column], dict) else None} "
                            f"(epoch {epoch}, worker {wid}, position {j})")
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, wid, j, fm.world()[0]))
                    yield (*(t(img) for t in self.transforms), torch.tensor([bad, wid, epoch, j + 1]))
                bad = 0
            if j == -1:  # more workers than shards: this worker got none; end it rather than spin forever
                return


class StreamCursor:
    """Where each worker of a streaming DataLoader is, for an exact resume. Workers hand out batches in turn (batch k
    from worker k % W), and a restarted loader starts with worker 0, so the state saved after `step` batches is each
    worker's position at the last multiple of W; the resumed run regenerates and drops the step % W batches after it."""

    def __init__(self, workers, first, positions=None):
        self.W, self.first = max(1, workers), first
        self.initial = positions or {w: (0, 0) for w in range(self.W)}
        self.ends = {}  # batch index -> (epoch, position) after it

    def update(self, k, info):
        self.ends[k] = tuple(info[-1, 2:].tolist())
        self.ends.pop(k - 2 * self.W, None)

    def state(self, step) -> torch.Tensor:
        s0 = step - step % self.W
        return torch.tensor([self.ends[s0 - self.W + w] if s0 - self.W + w >= self.first else self.initial[w]
                             for w in range(self.W)])  # (W, 2)


def process_shards(ds, rank: int, world: int):
    """This process's part of a streamed dataset: whole shards (uneven by at most one) when there are at least as many
    as processes, so each example is read and decoded by one process only. REFERENCE: ImageNet's 294 shards do not
    divide 4 or 8 processes, and split_dataset_by_node then has every process read every example and keep 1/world of
    them; it is used here only when there are fewer shards than processes, where nothing better exists."""
    if world == 1:
        return ds
    if ds.num_shards >= world:
        return ds.shard(world, rank)
    import datasets.distributed

    return datasets.distributed.split_dataset_by_node(ds, rank, world)


def loader_for(ds, n, streaming, column, transforms, batch, rank, world, seed, start, stop, workers, pin=False,
               stream_state=None):
    """DataLoader of this process's local batches (batch // world images) from step `start` to `stop`; samples are
    (x1, x2, info) (see Views, StreamViews). Images are decoded here (load_rgb), so a broken file is skipped, not
    fatal. Streaming: `stream_state` (the saved StreamCursor states of all processes) resumes inside the epoch; the
    loader's `cursor` tracks the workers."""
    import datasets

    if isinstance((ds.features or {}).get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    if streaming:
        workers = min(workers, ds.num_shards // world if ds.num_shards >= world else ds.num_shards)  # same on all
        ds = process_shards(ds, rank, world)
    kw = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
              prefetch_factor=4 if workers > 0 else None)
    if streaming:
        W, positions = max(1, workers), None
        if stream_state is not None:
            if tuple(stream_state.shape) != (world * W, 2):
                raise ValueError(f"this streamed run was saved with {len(stream_state)} data streams, not {world} "
                                 f"processes x {W} workers: resume it with the process count and --workers it was "
                                 "started with")
            positions = {w: tuple(stream_state[rank * W + w].tolist()) for w in range(W)}
        views = StreamViews(ds.shuffle(seed=seed, buffer_size=10_000), column, transforms, seed, positions)
        loader = torch.utils.data.DataLoader(views, batch_size=batch // world, drop_last=True, **kw)
        loader.cursor = StreamCursor(W, start - start % W, positions)
        return loader
    sampler = GlobalBatches(n, batch, rank, world, seed, start, stop)
    return torch.utils.data.DataLoader(Views(ds, column, transforms, seed), batch_sampler=sampler, **kw)


# ----------------------------------------------------------------------------- labelled data (evaluation stages)

def probe_transforms(size: int):
    """(train, test) transforms of the linear / semi-supervised protocol (Fast-MoCo, SimSiam): train
    RandomResizedCrop(size, bicubic) + flip, test Resize(size * 256/224) + CenterCrop(size). At 64 px and below
    (CIFAR-style data) the train view is the usual CIFAR one instead: resize, random crop with size/8 padding, flip."""
    tail = [v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if size <= 64:
        head = [v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.RandomCrop(size, padding=size // 8)]
    else:
        head = [v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    return v2.Compose(head + tail), clean_transform(size)


def with_labels(ds, column: str, transform, label: str = "label"):
    """Examples {x: transformed image, y: label, ok: decoded}: a lazy transform on map-style data, a lazy map on
    streamed data. Images are decoded here (load_rgb): an undecodable one is warned about and stands in as a black
    image with ok False, so batches and multi-process gathers keep their sizes; the consumers drop its row."""
    import datasets

    if isinstance((ds.features or {}).get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    blank = Image.new("RGB", (256, 256))

    def one(value):
        img = load_rgb(value)
        if img is None:
            skipped(value.get("path") or "(no file name)" if isinstance(value, dict) else "(no file name)")
        return transform(blank if img is None else img), img is not None

    if isinstance(ds, torch.utils.data.IterableDataset):
        return ds.map(lambda ex: dict(zip(("x", "ok"), one(ex[column])), y=ex[label]), remove_columns=ds.column_names)

    def batch(b):
        x, ok = zip(*map(one, b[column])) if b[column] else ((), ())
        return {"x": list(x), "y": b[label], "ok": list(ok)}

    return ds.with_transform(batch)


def labelled_loss(logits, y):
    """Cross-entropy over a with_labels batch whose labels of undecodable images are IGNORE (dropped; a batch of
    only those gives 0 and no gradient, where a mean would give NaN)."""
    return F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum") / (y != IGNORE).sum().clamp(min=1)


IGNORE = -100  # the label of an undecodable image in a training batch (F.cross_entropy's ignore_index)


def num_classes(ds, label: str = "label") -> int:
    """Classes of a labelled split: its ClassLabel feature, else (map-style data) the largest label + 1."""
    feature = (ds.features or {}).get(label)
    if hasattr(feature, "num_classes"):
        return feature.num_classes
    if isinstance(ds, torch.utils.data.IterableDataset):
        raise ValueError(f"cannot tell the number of classes of streamed data without a ClassLabel '{label}' column: "
             "download it and pass the local folder")
    return int(max(ds[label])) + 1
