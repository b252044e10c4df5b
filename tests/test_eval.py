"""linear_probe.py and semisup.py end to end (subprocesses on parquet files the tests write), their self-checks, the
subset rules, and one-line errors for bad inputs."""

import io
import json
import math
import os
import subprocess
import sys
import pickle
import random
import re

import datasets
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

import checkpoints as ck
import fastmoco as fm
import linear_probe
import semisup
from conftest import METHODS, ROOT, call, stage
from data import clean_transform

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128),
           (255, 128, 0)]


def colours(n, seed):
    """8 classes of solid-colour 32 px images (each pixel value jittered by up to 20 per image)."""
    rng = random.Random(seed)
    images = [Image.new("RGB", (32, 32), tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[i % 8]))
              for i in range(n)]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(num_classes=8))
    return datasets.Dataset.from_dict({"image": images, "label": [i % 8 for i in range(n)]}, features=features)


def torchvision_weights(path, arch="resnet18"):
    """Plain torchvision ResNet weights (with fc.*) saved with safetensors, no metadata."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_through_linear_probe_and_semisup(labelled, pretrained, tmp_path, method, monkeypatch):
    """In process (main() called directly) to save interpreter start-ups; the subprocess path is tested below."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    ckpt = pretrained[method]
    # the paper's augmented protocol for one method, the cached-features mode for the others
    cached = method != "fastmoco"
    call(linear_probe, ckpt, data=str(labelled), batch_size=16, epochs=2, workers=0, knn=True,
         output_dir=tmp_path / "lin", cached_features=cached)
    r = json.loads((tmp_path / "lin/results.json").read_text())
    assert r["method"] == method and r["arch"] == "resnet18" and r["image_size"] == 32 and r["val_images"] == 20
    assert r["cached_features"] == cached and r["best_top1"] >= r["top1"]
    assert all(0 <= r[k] <= 100 for k in ("top1", "top5", "best_top1", "knn_top1")) and r["top5"] >= r["top1"]
    # backbone + the probe's fc load strictly into a torchvision ResNet-18 and reproduce the reported accuracy
    net = torchvision.models.resnet18(num_classes=10)
    fc, _ = ck.load_checkpoint(tmp_path / "lin/linear.safetensors")
    net.load_state_dict({**ck.prefixed(ck.load_checkpoint(ckpt)[0], "backbone."), **fc})
    test = datasets.load_dataset("parquet", data_dir=str(labelled), split="test")
    x = torch.stack([clean_transform(32)(im.convert("RGB")) for im in test["image"]])
    with torch.no_grad():
        top1 = 100.0 * (net.eval()(x).argmax(1) == torch.tensor(test["label"])).float().mean().item()
    assert top1 == pytest.approx(r["top1"], abs=1e-4)

    call(semisup, ckpt, data=str(labelled), fraction=0.25, batch_size=8, epochs=1, lr_backbone=0.01, workers=0,
         output_dir=tmp_path / "semi")
    r = json.loads((tmp_path / "semi/results.json").read_text())  # demo labels i % 10: 1 of every class
    assert r["labelled_images"] == 10 and r["val_images"] == 20 and 0 <= r["top1"] <= r["top5"] <= 100
    tensors, meta = ck.load_checkpoint(tmp_path / "semi/finetuned.safetensors")
    torchvision.models.resnet18(num_classes=10).load_state_dict(tensors)  # strict: a whole torchvision model
    assert not torch.equal(tensors["conv1.weight"], ck.load_checkpoint(ckpt)[0]["backbone.conv1.weight"])  # fine-tuned


@pytest.mark.slow
def test_linear_probe_on_streamed_data(labelled, pretrained, tmp_path, monkeypatch):
    """--streaming (as for Hub data): augmented batches from the stream, clean passes dispatched by Accelerate; the
    clean passes see every image once."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    call(linear_probe, pretrained["mocov1"], data=str(labelled), streaming=True, batch_size=16, epochs=2, workers=0,
         knn=True, output_dir=tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["val_images"] == 20 and r["train_images"] == 48 and 0 <= r["knn_top1"] <= 100
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_linear_probe_separable_features_and_torchvision_weights(tmp_path):
    """Solid colours through a fixed random backbone are linearly separable: the probe reaches 100% top-1.
    Plain torchvision weights (no metadata, fc.* present) are accepted."""
    d = tmp_path / "colours"
    colours(64, 0).to_parquet(str(d / "train-0.parquet"))
    colours(32, 1).to_parquet(str(d / "validation-0.parquet"))
    torchvision_weights(tmp_path / "tv.safetensors")
    stage("linear_probe.py", tmp_path / "tv.safetensors", "--data", d, "--arch", "resnet18", "--image-size", 32,
          "--batch-size", 16, "--epochs", 100, "--lr", 100, "--workers", 0, "--cached-features",
          "--output-dir", tmp_path / "out")
    r = json.loads((tmp_path / "out/results.json").read_text())
    assert r["top1"] == 100.0 and r["val_split"] == "validation" and r["classes"] == 8 and r["method"] is None
    log = [json.loads(line) for line in (tmp_path / "out/log.jsonl").read_text().splitlines()]
    assert len(log) == 100 and log[-1]["loss"] < log[0]["loss"]


def test_knn_accuracy_by_hand():
    """Bank: class 0 at e1 and (1, .1), class 1 at e2 and (.1, 1), class 2 at -e1. Queries and labels:
    (1, .05) -> 0 (true 0); (.05, 1) -> 1 (true 1); (-1, .2): cos 0.98 to -e1 gives e^9.8 for class 2, against
    at most 2 e^{2.9} for class 1 (cos <= 0.29) and e^{-9.8}-ish for class 0 -> 2 (true 1, wrong). Top-1: 2/3."""
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])
    bank_y = torch.tensor([0, 0, 1, 1, 2])
    q, q_y = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.2]]), torch.tensor([0, 1, 1])
    assert math.exp(0.98 / 0.1) > 2 * math.exp(0.29 / 0.1)
    assert linear_probe.knn_accuracy(bank, bank_y, q, q_y, 3, 200, 0.1) == pytest.approx(200 / 3)
    assert linear_probe.knn_accuracy(bank, bank_y, q, q_y, 3, 200, 0.1, chunk=1) == pytest.approx(200 / 3)
    # k = 1: the third query's nearest entry is -e1 too
    assert linear_probe.knn_accuracy(bank, bank_y, q, q_y, 3, 1, 0.1) == pytest.approx(200 / 3)


def test_accuracy_top1_top5_by_hand():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6], [0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0]])
    # row 0: label 0 is top-1; row 1: label 2 is 5th of 7 (top-5, not top-1); row 2: label 6 is last (miss)
    assert linear_probe.accuracy(logits, torch.tensor([0, 2, 6])) == pytest.approx([100 / 3, 200 / 3])


def test_frozen_backbone_check_fires():
    net = fm.resnet("resnet18")
    net.eval()
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))  # eval mode: BN statistics untouched
    linear_probe.check_frozen(net, reference)
    with torch.no_grad():
        net.layer3[1].conv2.weight[0, 0, 0, 0] += 1e-6  # one weight
    with pytest.raises(RuntimeError, match="frozen backbone changed .*1 tensors, e.g. layer3.1.conv2.weight"):
        linear_probe.check_frozen(net, reference)
    net = fm.resnet("resnet18")
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()(torch.randn(2, 3, 32, 32))  # train mode: a forward updates the BN running statistics
    with pytest.raises(RuntimeError, match="bn1.running_mean"):
        linear_probe.check_frozen(net, reference)


def test_balanced_subset_is_class_balanced_and_seeded():
    labels = [c for c in range(5) for _ in range(20 + 10 * c)]  # 20, 30, 40, 50, 60 images per class
    rows = semisup.balanced_subset(labels, 0.1, seed=0)
    counts = [sum(labels[r] == c for r in rows) for c in range(5)]
    assert counts == [2, 3, 4, 5, 6] and rows == sorted(set(rows))
    assert rows == semisup.balanced_subset(labels, 0.1, seed=0)
    assert rows != semisup.balanced_subset(labels, 0.1, seed=1)
    assert [sum(labels[r] == c for r in semisup.balanced_subset(labels, 0.01, 0)) for c in range(5)] == [1] * 5


def test_subset_file_by_row_and_by_id_column(tmp_path):
    names = [f"n0{i % 3}_{i}.JPEG" for i in range(12)]
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 12, "file": names, "label": [0] * 12})
    (tmp_path / "rows.txt").write_text("3\n1\n\n7\n")
    assert semisup.subset_from_file(tmp_path / "rows.txt", ds, None, "image") == [1, 3, 7]
    (tmp_path / "ids.txt").write_text("n00_9.JPEG\nn02_5.JPEG\n")
    assert semisup.subset_from_file(tmp_path / "ids.txt", ds, "file", "image") == [5, 9]
    ds.cast_column("image", datasets.Image(decode=False))
    with pytest.raises(SystemExit, match="pass --id-column"):
        semisup.subset_from_file(tmp_path / "ids.txt", ds, None, "image")
    (tmp_path / "bad.txt").write_text("n00_9.JPEG\nn09_99.JPEG\n")
    with pytest.raises(SystemExit, match="1 of the 2 ids .* are not in column file .e.g. n09_99.JPEG"):
        semisup.subset_from_file(tmp_path / "bad.txt", ds, "file", "image")


@pytest.mark.slow
def test_semisup_honours_a_subset_file(labelled, pretrained, tmp_path):
    (tmp_path / "subset.txt").write_text("\n".join(map(str, [0, 5, 11, 17, 23, 29, 35, 41])))
    stage("semisup.py", pretrained["mocov3"], "--data", labelled, "--subset-file", tmp_path / "subset.txt",
          "--batch-size", 4, "--epochs", 1, "--workers", 0, "--output-dir", tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    _, meta = ck.load_checkpoint(tmp_path / "finetuned.safetensors")
    assert meta["subset"] == [0, 5, 11, 17, 23, 29, 35, 41] and r["labelled_images"] == 8
    assert r["lr_backbone"] == 1e-6  # 8/48 labelled: the 10% recipe's backbone lr


class Payload:
    """Unpickling this would create a file: proof that nothing was unpickled if the file is absent."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["linear_probe.py", "semisup.py"])
def test_pickle_is_refused_unread_with_a_one_line_error(labelled, tmp_path, script):
    """A torch.save-style pickle: refused as not safetensors, never unpickled, exactly one line on stderr."""
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(pickle.dumps({"state_dict": Payload(tmp_path / "unpickled")}))
    p = stage(script, ckpt, "--data", labelled, "--workers", 0, "--output-dir", tmp_path / "out", check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "is not a readable safetensors checkpoint" in err[0], p.stderr
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("module", [linear_probe, semisup], ids=["linear_probe", "semisup"])
@pytest.mark.parametrize("case", ["arch", "torchvision-arch", "unlabelled", "not-a-resnet"])
def test_bad_inputs_get_one_line_errors(labelled, pretrained, tmp_path, module, case, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    ckpt, data, extra = pretrained["fastmoco"], labelled, {}
    if case == "arch":
        extra, words = dict(arch="resnet50"), "is a resnet18 checkpoint, not resnet50: pass --arch resnet18"
    elif case == "torchvision-arch":
        ckpt = tmp_path / "tv.safetensors"
        torchvision_weights(ckpt)
        extra, words = dict(arch="resnet50"), "does not fit a resnet50"
    elif case == "not-a-resnet":
        ckpt = tmp_path / "other.safetensors"
        save_file({"encoder.weight": torch.zeros(2, 2)}, str(ckpt))
        words = "holds no ResNet backbone"
    else:
        data = tmp_path / "unlabelled"
        datasets.load_dataset("parquet", data_dir=str(labelled), split="train").remove_columns("label").to_parquet(
            str(data / "train-0.parquet"))
        datasets.load_dataset("parquet", data_dir=str(labelled), split="test").to_parquet(str(data / "test-0.parquet"))
        words = "the train split of .* has no label column: this stage needs labelled images"
    with pytest.raises(SystemExit) as e:
        call(module, ckpt, data=str(data), workers=0, output_dir=tmp_path / "out", **extra)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and re.search(words, msg), msg
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_equal_one(labelled, pretrained, tmp_path):
    """`accelerate launch` on 2 CPU processes (gloo), cached features: every image is encoded exactly once across the
    processes (gather_for_metrics drops the padding), so the classifier, its accuracy and kNN equal one process's."""
    common = [pretrained["mocov3"], "--data", labelled, "--batch-size", 16, "--epochs", 3, "--workers", 0,
              "--cached-features", "--knn"]
    stage("linear_probe.py", *common, "--output-dir", tmp_path / "one")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29651",
           str(ROOT / "linear_probe.py"), *map(str, common), "--output-dir", str(tmp_path / "two")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["val_images"] == 20
    for k in ("top1", "top5", "best_top1", "knn_top1"):
        assert two[k] == pytest.approx(one[k], abs=1e-4), k
    a, _ = ck.load_checkpoint(tmp_path / "one/linear.safetensors")
    b, _ = ck.load_checkpoint(tmp_path / "two/linear.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_with_labels_marks_undecodable_images_and_the_loss_leaves_them_out(capsys):
    """An undecodable image is a row with ok False (a blank view of the right shape, a warning naming its file);
    labelled_loss ignores its label, and a batch of only such rows gives 0, not NaN."""
    from data import IGNORE, labelled_loss, with_labels

    good = colours(3, 0)
    raw = [{"bytes": b"\xff\xd8\xff broken", "path": "cat/7.jpg"}] + [
        {"bytes": im["bytes"], "path": None} for im in good.cast_column("image", datasets.Image(decode=False))["image"]]
    ds = datasets.Dataset.from_dict({"image": raw, "label": [5, 0, 1, 2]},
                                    features=datasets.Features(image=datasets.Image(), label=datasets.Value("int64")))
    b = next(iter(torch.utils.data.DataLoader(with_labels(ds, "image", clean_transform(32)), batch_size=4)))
    assert b["ok"].tolist() == [False, True, True, True] and b["x"].shape == (4, 3, 32, 32)
    assert "skipped undecodable image cat/7.jpg" in capsys.readouterr().err
    logits = torch.randn(4, 8, requires_grad=True)
    y = torch.where(b["ok"], b["y"], IGNORE)
    torch.testing.assert_close(labelled_loss(logits, y), torch.nn.functional.cross_entropy(logits[1:], b["y"][1:]))
    none = labelled_loss(logits, torch.full((4,), IGNORE))
    none.backward()
    assert none.item() == 0 and logits.grad.abs().sum() == 0


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Labelled data with one truncated JPEG in each split: a parquet folder and an image folder (class subfolders)."""
    from data import demo_dataset

    d = tmp_path_factory.mktemp("broken")
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(jpeg, "JPEG")
    truncated = jpeg.getvalue()[:len(jpeg.getvalue()) // 2]
    for split, n in (("train", 48), ("test", 20)):
        ds = demo_dataset(split).select(range(n)).cast_column("image", datasets.Image(decode=False))
        rows = [{"bytes": truncated, "path": f"{split}-broken.jpg"}] + list(ds["image"])
        labels = [0] + list(ds["label"])
        datasets.Dataset.from_dict({"image": rows, "label": labels}, features=datasets.Features(
            image=datasets.Image(), label=ds.features["label"])).to_parquet(str(d / "parquet" / f"{split}-0.parquet"))
        for i, (im, y) in enumerate(zip(rows, labels)):
            folder = d / "folder" / split / f"class{y}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(im["bytes"])
    return d


@pytest.mark.slow
def test_evaluations_skip_and_count_undecodable_images(broken, pretrained, tmp_path):
    """One truncated JPEG per split: linear_probe (augmented views on parquet; cached features and kNN on an image
    folder), semisup and pretrain.py's kNN monitor warn, leave it out, count it, and finish."""
    ckpt = pretrained["mocov3"]
    common = ["--epochs", 1, "--batch-size", 16, "--workers", 0]
    p = stage("linear_probe.py", ckpt, "--data", broken / "parquet", *common, "--output-dir", tmp_path / "lp")
    r = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert r["undecodable_images"] == 1 and r["val_images"] == 20, r
    assert "skipped undecodable image test-broken.jpg" in p.stderr and "train-broken.jpg" in p.stderr
    stage("linear_probe.py", ckpt, "--data", broken / "folder", *common, "--cached-features", "--knn",
          "--output-dir", tmp_path / "lp2")
    r = json.loads((tmp_path / "lp2" / "results.json").read_text())
    assert r["undecodable_images"] == 2 and r["val_images"] == 20 and math.isfinite(r["knn_top1"]), r
    stage("semisup.py", ckpt, "--data", broken / "parquet", "--fraction", 0.5, *common, "--output-dir",
          tmp_path / "semi")
    assert json.loads((tmp_path / "semi" / "results.json").read_text())["val_images"] == 21
    p = stage("pretrain.py", "--data", broken / "parquet", "--arch", "resnet18", "--image-size", 32,
              "--no-small-stem", "--batch-size", 8, "--max-steps", 1, "--knn-every", 1, "--workers", 0,
              "--no-tensorboard", "--max-bad-fraction", 0.1, "--output-dir", tmp_path / "pre")
    knn = [json.loads(x) for x in (tmp_path / "pre" / "log.jsonl").read_text().splitlines() if "knn_top1" in x]
    assert len(knn) == 1 and knn[0]["knn_bank"] == 48, knn


@pytest.mark.slow
@pytest.mark.parametrize("script", ["linear_probe.py", "semisup.py"])
def test_a_failed_rerun_keeps_the_earlier_result(labelled, pretrained, tmp_path, script):
    """A rerun into a folder holding a good result that then fails (no image decodes) ends in one line and leaves
    the result, its weights and its log byte for byte; the same failure in a new folder leaves no folder."""
    bad = tmp_path / "bad"
    rows = [{"bytes": b"not an image" * 4, "path": f"{i}.jpg"} for i in range(16)]
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"image": rows, "label": [i % 2 for i in range(16)]}, features=datasets.Features(
            image=datasets.Image(), label=datasets.ClassLabel(num_classes=2))).to_parquet(str(bad / f"{split}-0.parquet"))
    out = tmp_path / "out"
    common = [pretrained["mocov3"], "--epochs", 1, "--batch-size", 8, "--workers", 0]
    stage(script, *common, "--data", labelled, "--output-dir", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"results.json", "log.jsonl"} <= set(before) and before["log.jsonl"]
    for folder in (out, tmp_path / "new"):
        more = ["--fraction", 1] if script == "semisup.py" else []  # all 16 rows, so the run reaches the images
        p = stage(script, *common, *more, "--data", bad, "--output-dir", folder, check=False)
        assert p.returncode == 1 and "could be decoded" in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not (tmp_path / "new").exists()
