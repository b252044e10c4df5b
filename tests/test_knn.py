"""The kNN monitor at ImageNet size (knn.py): chunked scoring against a slow loop, its memory, the balanced bank
subset, streamed splits; and data.process_shards: each streamed example decoded by one process only."""

import itertools
import json
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import knn
import linear_probe
from conftest import ROOT, stage


def slow_scores(queries, bank, labels, classes, k, t):
    """Class scores of the weighted kNN, written out with loops: cosine similarity of each pair, the k largest
    vote exp(sim / t) for their label."""
    out = []
    for q in queries.tolist():
        sims = []
        for j, b in enumerate(bank.tolist()):
            dot = sum(x * y for x, y in zip(q, b))
            sims.append((dot / math.sqrt(sum(x * x for x in q) * sum(y * y for y in b)), j))
        scores = [0.0] * classes
        for s, j in sorted(sims, reverse=True)[:k]:
            scores[int(labels[j])] += math.exp(s / t)
        out.append(scores)
    return out


@pytest.mark.parametrize("dtype, margin", [(torch.float32, 1e-4), (torch.float16, 0.05)])
def test_knn_predict_matches_slow_loop(dtype, margin):
    """Chunked, in fp32 (CPU) or fp16 (the CUDA bank dtype): the slow loop's top-1 for every query whose best class
    leads the second by more than `margin` of its score (ties aside; fp16 rounds similarities to ~5e-4)."""
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 8, generator=g), torch.randn(120, 8, generator=g)
    labels, classes, k = torch.randint(0, 5, (300,), generator=g), 5, 20
    ref = torch.tensor(slow_scores(queries, bank, labels, classes, k, 0.1))
    top2 = ref.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > margin * top2[:, 0]
    assert decided.sum() >= 100  # the comparison covers most queries
    for chunk in (1, 7, 1000):
        pred = knn.knn_predict(knn.normalized(queries, dtype), knn.normalized(bank, dtype), labels, classes, k,
                                0.1, chunk)
        assert torch.equal(pred[decided], ref.argmax(1)[decided]), chunk


def test_linear_probe_knn_is_the_shared_one():
    g = torch.Generator().manual_seed(1)
    bank, queries, labels = torch.randn(50, 4, generator=g), torch.randn(30, 4, generator=g), torch.arange(50) % 3
    pred = torch.tensor(slow_scores(queries, bank, labels, 3, 10, 0.1)).argmax(1)
    y = torch.arange(30) % 3
    want = 100.0 * (pred == y).float().mean().item()
    assert linear_probe.knn_accuracy(bank, labels, queries, y, 3, 10, 0.1, chunk=4) == pytest.approx(want)


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create while the mode is on (views excluded: they share their
    base's memory); a tensor's bytes count until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.live += t.nbytes
                weakref.finalize(t, self.free, t.nbytes)
        self.peak = max(self.peak, self.live)
        return out


def test_knn_peak_memory_grows_with_the_chunk_not_with_n_val_x_n_train():
    M, chunk = 4000, 64
    bank, bank_y = knn.normalized(torch.randn(M, 16), torch.float32), torch.randint(0, 10, (M,))

    def peak(n_val, chunk):
        q = knn.normalized(torch.randn(n_val, 16), torch.float32)
        with PeakBytes() as p:
            knn.knn_predict(q, bank, bank_y, 10, chunk=chunk)
        return p.peak

    small, large = peak(256, chunk), peak(2048, chunk)
    assert large <= 1.1 * small  # 8x the queries: the same peak (plus the (n_val,) predictions)
    assert large <= 3 * chunk * M * 4  # a few (chunk, M) fp32 similarities at most
    assert peak(512, 512) >= 512 * M * 4  # the measure sees an all-at-once (n_val, M) similarity


def test_balanced_subset():
    labels = [0] * 50 + [1] * 30 + [2] * 3 + [3] * 17  # class 2 has fewer than its share
    idx = knn.balanced_bank(labels, 40, seed=0)
    counts = [sum(labels[i] == c for i in idx) for c in range(4)]
    assert len(idx) == 40 == len(set(idx)) and idx == sorted(idx)
    assert counts[2] == 3 and sorted(counts) == [3, 12, 12, 13]  # 37 over the three others: 12 or 13 each
    assert idx == knn.balanced_bank(labels, 40, seed=0) != knn.balanced_bank(labels, 40, seed=1)


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    """datasets 5 sleeps 5 s at the end of every pass over a shuffled stream (apache/arrow#45214): not in tests."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Labelled parquet in 3 train shards (16 demo images each) and 3 test shards (7 each): 3 does not divide 2."""
    d = tmp_path_factory.mktemp("sharded")
    train, test = data.demo_dataset("train").select(range(48)), data.demo_dataset("test").select(range(21))
    for i in range(3):
        train.select(range(16 * i, 16 * i + 16)).to_parquet(str(d / f"train-{i:05d}-of-00003.parquet"))
        test.select(range(7 * i, 7 * i + 7)).to_parquet(str(d / f"test-{i:05d}-of-00003.parquet"))
    return d


def fingerprint(img):
    return hash(img.tobytes())


def test_streamed_examples_are_decoded_once_across_processes(sharded):
    """3 shards, 2 processes (simulated by rank / world): the shared helper, the streamed linear probe's train stream
    and the kNN's streamed split each decode every example exactly once over the two processes. The old
    composition (decode, then split_dataset_by_node) decodes each twice, which this counter sees."""
    import datasets.distributed

    train, n = data.load_split(str(sharded), "train", True)
    everything = [fingerprint(ex["image"]) for ex in train]
    assert len(set(everything)) == n == 48
    decoded = []
    count = lambda img: decoded.append(fingerprint(img)) or torch.zeros(1)  # noqa: E731 (a transform that counts)
    for r in range(2):
        assert sum(1 for _ in data.with_labels(data.process_shards(train, r, 2), "image", count)) > 0
    assert sorted(decoded) == sorted(everything)

    decoded.clear()  # the streamed probe: each process's first epoch of its endless stream
    for r in range(2):
        share = sum(1 for _ in data.process_shards(train, r, 2))
        assert len(list(itertools.islice(linear_probe.train_stream(train, "image", count, 0, r, 2), share))) == share
    assert sorted(decoded) == sorted(everything)

    decoded.clear()
    for r in range(2):
        list(datasets.distributed.split_dataset_by_node(data.with_labels(train, "image", count), r, 2))
    assert len(decoded) == 2 * n

    decoded.clear()  # the kNN's streamed validation split
    val, n_val = data.load_split(str(sharded), "test", True)
    for r in range(2):
        ds, workers = knn.knn_split(val, "image", count, r, 2, workers=4)
        assert workers == ds.ds.num_shards == (2 if r == 0 else 1) and len(list(ds)) == (14 if r == 0 else 7)
    assert len(decoded) == len(set(decoded)) == n_val == 21


def test_streamed_bank_subset_is_capped_and_balanced(sharded):
    train, _ = data.load_split(str(sharded), "train", True)
    ys = [[ex["y"] for ex in knn.knn_split(train, "image", lambda img: 0, r, 2, 0, 20, 0)[0]] for r in range(2)]
    assert [sorted(y) for y in ys] == [list(range(10))] * 2  # 10 per process, 1 per class (of 10) each
    again = [ex["y"] for ex in knn.knn_split(train, "image", lambda img: 0, 0, 2, 0, 20, 0)[0]]
    assert again == ys[0]  # seeded: the same bank at every evaluation


def test_knn_top1_streamed_equals_map_style(sharded):
    """The same top-1 from the streamed and the map-style splits (the same bank and queries, read differently), and
    a bank subset of the requested size."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    import fastmoco as fm

    backbone = fm.OnlineEncoder("mocov3", "resnet18", False, 2, 2).backbone
    splits = {s: [data.load_split(str(sharded), split, s)[0] for split in ("train", "test")] for s in (False, True)}
    (a, na), (b, nb) = (knn.knn_top1(backbone, *splits[s], "image", 32, acc) for s in (False, True))
    assert na == nb == 48 and a == pytest.approx(b)
    assert knn.knn_top1(backbone, *splits[False], "image", 32, acc, bank_size=20)[1] == 20
    assert knn.knn_top1(backbone, *splits[True], "image", 32, acc, bank_size=20)[1] == 20


@pytest.mark.slow
def test_pretrain_knn_on_streamed_data_with_a_bank_subset(sharded, tmp_path):
    """--streaming --knn-every 1 --knn-bank-size 20: the monitor runs on a streamed train and validation split, its
    rows say the bank size; a negative size is a one-line error."""
    common = ["--data", sharded, "--arch", "resnet18", "--image-size", 32, "--no-small-stem", "--batch-size", 8,
              "--workers", 0, "--no-tensorboard", "--streaming", "--max-steps", 2, "--knn-every", 1]
    stage("pretrain.py", *common, "--knn-bank-size", 20, "--output-dir", tmp_path / "a")
    rows = [json.loads(line) for line in (tmp_path / "a/log.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["knn_bank"]) for r in knn] == [(0, 20)] and 0 <= knn[0]["knn_top1"] <= 100
    p = stage("pretrain.py", *common, "--knn-bank-size", -1, "--output-dir", tmp_path / "b", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: --knn-bank-size -1")
    assert "--knn-bank-size" in stage("pretrain.py", "--help").stdout


@pytest.mark.slow
def test_two_processes_decode_each_example_once(sharded, tmp_path):
    """A real `accelerate launch` of tests/knn_check.py, 2 CPU processes, 3 train shards: the kNN monitor decodes
    every bank and query image once over the two processes and scores as one process does (uneven shares
    gathered); the streamed probe's two processes augment disjoint shards, as many images as their batches hold
    (2 epochs x 6 steps x 4), and finish without waiting on each other (each loops over its own shards)."""
    import hashlib
    import os
    import subprocess
    import sys

    from accelerate import Accelerator

    import fastmoco as fm

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29711", str(ROOT / "tests" / "knn_check.py"), str(sharded), str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    fp = lambda split: [hashlib.sha256(ex["image"].tobytes()).hexdigest()[:16]  # noqa: E731
                        for ex in data.load_split(str(sharded), split, True)[0]]
    train, test = fp("train"), fp("test")
    assert sorted(r0["knn_decoded"][0] + r1["knn_decoded"][0]) == sorted(train + test)  # the whole bank, once
    b20 = r0["knn_decoded"][1] + r1["knn_decoded"][1]
    assert len(b20) == len(set(b20)) == 20 + 21 and set(b20) >= set(test)  # the subset bank and every query
    torch.manual_seed(0)
    one = knn.knn_top1(fm.resnet("resnet18", False), *[data.load_split(str(sharded), s, True)[0]
                                                        for s in ("train", "test")], "image", 32, Accelerator(cpu=True))
    assert r0["knn"][0] == r1["knn"][0] and r0["knn"][0][0] == pytest.approx(one[0]) and one[1] == 48
    assert r0["knn"][1][1] == 20
    a, b = r0["probe_decoded"], r1["probe_decoded"]
    assert len(a) == len(b) == 2 * 6 * 4 and set(a) <= set(train[:32]) and set(b) <= set(train[32:])
    assert json.loads((tmp_path / "probe/results.json").read_text())["world_size"] == 2

def vote(q, bank, labels, classes, k, t):
    """knn.knn_predict on raw features (it takes normalized rows)."""
    return knn.knn_predict(knn.normalized(q, torch.float32), knn.normalized(bank, torch.float32), labels, classes, k, t)


def test_knn_weighted_vote_by_hand():
    """Query e1. Bank: one class-1 entry at cos 1.0, three class-0 entries at cos 0.8, one class-2 entry at cos -1.
    t=0.1: class 1 scores e^10 = 22026 > class 0 3*e^8 = 8943 -> 1, although class 0 is the majority.
    t=1:   class 1 scores e^1 = 2.72  < class 0 3*e^0.8 = 6.68 -> 0."""
    bank = torch.tensor([[5.0, 0.0], [0.8, 0.6], [1.6, -1.2], [0.4, 0.3], [-2.0, 0.0]])  # norms differ on purpose
    labels = torch.tensor([1, 0, 0, 0, 2])
    q = torch.tensor([[2.0, 0.0]])
    assert math.exp(1 / 0.1) > 3 * math.exp(0.8 / 0.1) and math.exp(1 / 1.0) < 3 * math.exp(0.8 / 1.0)
    assert vote(q, bank, labels, classes=3, k=4, t=0.1).tolist() == [1]
    assert vote(q, bank, labels, classes=3, k=4, t=1.0).tolist() == [0]
    # k larger than the bank: every entry votes; the far class-2 entry adds only e^{-1/t}
    assert vote(q, bank, labels, classes=3, k=200, t=0.1).tolist() == [1]
    assert vote(q, bank, labels, classes=3, k=200, t=1.0).tolist() == [0]
    # k = 1: nearest neighbour only
    assert vote(q, bank, labels, classes=3, k=1, t=1.0).tolist() == [1]
    # query -e1: the class-2 entry is the only close one
    q2 = torch.tensor([[-1.0, 0.0], [2.0, 0.0]])
    assert vote(q2, bank, labels, classes=4, k=1, t=0.1).tolist() == [2, 1]
