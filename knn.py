"""The kNN monitor (weighted kNN top-1, k 200, t 0.1, on clean views) that pretrain.py runs every --knn-every epochs
and linear_probe.py --knn reports: one knn_predict for both. The bank is a (labelled subset of the) train split
encoded once per evaluation, L2-normalised rows in half precision on the device; queries are scored in chunks, so no
(n_val, n_train) similarity (ImageNet: 256 GB in fp32) exists."""

import math

import numpy as np
import torch

from data import clean_transform, load_rgb, process_shards, with_labels

BATCH = 256  # images per forward of the backbone while encoding the bank and the queries


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
    """Weighted kNN (Wu et al. 2018, as in MoCo's CIFAR demo): the k most cosine-similar bank entries vote for their
    label with weight exp(sim / t), `chunk` queries at a time: memory (chunk, M), not (n, M). queries (n, D), bank
    (M, D): normalized() rows; the similarity is computed in the bank's dtype, the vote in fp32. -> labels (n,)."""
    pred = []
    for q in queries.split(chunk):
        w, idx = (q.to(bank.dtype) @ bank.T).topk(min(k, len(bank)), dim=1)  # (chunk, M) -> (chunk, k)
        scores = torch.zeros(len(q), classes, device=bank.device)
        pred.append(scores.scatter_add_(1, bank_y[idx], (w.float() / t).exp()).argmax(1))
    return torch.cat(pred) if pred else torch.zeros(0, dtype=torch.long, device=bank.device)


def balanced_bank(labels, size: int, seed: int) -> list:
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
    balanced_bank (or of all); streamed, its whole shards (data.process_shards), shuffled (seeded) for a subset."""
    import datasets

    if not isinstance(ds, torch.utils.data.IterableDataset):
        idx = range(len(ds))
        if 0 < size < len(ds):  # the labels alone, from Arrow: no image is read
            idx = balanced_bank(ds.with_format("numpy", columns=["label"])[:]["label"], size, seed)
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
def knn_top1(backbone, train, val, column, size, acc, bank_size=0, seed=0, workers=0) -> tuple:
    """kNN top-1 (k=200, t=0.1) of `backbone` on clean views, and the bank's size: the train split (or a labelled
    subset of `bank_size`, the same at every evaluation) as the bank, gathered on every process; each process scores
    its share of the val split against it."""
    t, dtype, rank, world = clean_transform(size), bank_dtype(acc.device), acc.process_index, acc.num_processes
    backbone.eval()
    bank, bank_y = knn_features(backbone, *knn_split(train, column, t, rank, world, workers, bank_size, seed),
                                BATCH, dtype, acc)
    bank, bank_y = gather_rows(acc, bank)[:bank_size or None], gather_rows(acc, bank_y)[:bank_size or None]
    q, q_y = knn_features(backbone, *knn_split(val, column, t, rank, world, workers), BATCH, dtype, acc)
    backbone.train()
    if not len(bank) or not acc.reduce(torch.tensor(len(q_y), device=acc.device), "sum").item():
        raise ValueError("no image of the kNN monitor's train or validation split could be decoded (the 'skipped "
                         "undecodable image' warnings name them): fix the data, or drop --knn-every")
    pred = knn_predict(q, bank, bank_y, int(bank_y.max()) + 1)
    hits, seen = acc.reduce(torch.tensor([int((pred == q_y).sum()), len(q_y)], device=acc.device), "sum").tolist()
    return 100.0 * hits / seen, len(bank)


