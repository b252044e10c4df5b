"""pretrain.py end to end, as a user runs it: a subprocess per run, on small data the tests write themselves."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import torchvision

import checkpoints as ck
import fastmoco as fm
from data import demo_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here starts pretrain.py as a subprocess


def run(*args, check=True, env=None, timeout=600, stem=("--no-small-stem",)):
    """python pretrain.py ARGS -> CompletedProcess (tiny, fast defaults a test can override). The standard stem
    at 32 px is ~16x cheaper than the small stem, so tests use it unless they test the stem."""
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
           "--workers", "0", "--no-tensorboard", "--log-every", "1", *stem, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no", **(env or {})})
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def read_log(d):
    return [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["fastmoco", "mocov3", "mocov2", "mocov1"])
def test_method_runs_and_checkpoint_loads_into_torchvision(parquet, tmp_path, method):
    extra = ["--queue-size", "16"] if method in ("mocov1", "mocov2") else []
    run("--data", parquet, "--method", method, "--max-steps", 3, "--save-every", 2,
        "--output-dir", tmp_path, *extra)
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (tmp_path / "ckpt-0000002.safetensors").is_file()
    tensors, meta = ck.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert meta["method"] == method and meta["step"] == 3 and meta["args"]["seed"] == 0
    assert meta["fastmoco_sha256"] == ck.source_hash()
    assert not any(k.startswith(("module.", "_orig_mod.")) or ".module." in k for k in tensors)
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(ck.prefixed(tensors, "backbone."), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    # resumable content: momentum encoder, optimizer buffers, and the queue for MoCo v1/v2
    assert any(k.startswith("target.backbone.") for k in tensors) and any(k.startswith("optimizer.") for k in tensors)
    assert ("queue" in tensors) == (method in ("mocov1", "mocov2"))


def test_small_stem_checkpoint_loads_into_modified_torchvision(parquet, tmp_path):
    run("--data", parquet, "--max-steps", 1, "--output-dir", tmp_path, stem=())  # 32 px: small stem by default
    tensors, meta = ck.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert meta["small_stem"] is True and meta["args"]["small_stem"] is None
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(ck.prefixed(tensors, "backbone."), strict=True)


@pytest.mark.parametrize("method", ["fastmoco", "mocov2"])
def test_resume_continues_exactly(parquet, tmp_path, method):
    """Stop at step 3, resume to step 6: the losses of steps 4-6 and the final weights equal an uninterrupted run's
    bit for bit (data order and augmentations are seeded per step and image; optimizer, queue, EMA are saved)."""
    extra = ["--queue-size", "16"] if method == "mocov2" else []
    common = ["--data", parquet, "--method", method, "--epochs", 2, *extra]
    run(*common, "--max-steps", 6, "--output-dir", tmp_path / "full")
    run(*common, "--max-steps", 3, "--output-dir", tmp_path / "part")
    run(*common, "--max-steps", 6, "--output-dir", tmp_path / "part", "--resume", tmp_path / "part/ckpt.safetensors")
    full, part = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in part] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in part] == [r["loss"] for r in full]
    a, _ = ck.load_checkpoint(tmp_path / "full/ckpt.safetensors")
    b, _ = ck.load_checkpoint(tmp_path / "part/ckpt.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k


def test_hub_unreachable_fails_fast_with_a_way_forward(tmp_path):
    t = time.time()
    p = run("--data", "someone/some-dataset", "--output-dir", tmp_path, check=False,
            env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})  # a closed port: refused at once
    assert p.returncode == 1 and time.time() - t < 60
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Hugging Face Hub" in err[0] and "--data" in err[0], p.stderr


def test_official_init(parquet, tmp_path):
    """--official-init reaches the run: the target starts apart from the online encoder, head gammas below 1."""
    run("--data", parquet, "--max-steps", 1, "--official-init", "--output-dir", tmp_path)
    t, meta = ck.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert meta["args"]["official_init"] is True
    # after one EMA step from an independent draw (m 0.99), the target is still ~99% its own init
    assert (t["target.backbone.conv1.weight"] - t["backbone.conv1.weight"]).abs().mean() > 1e-3
    for k in ("projector.1.weight", "predictor.1.weight", "target.projector.1.weight"):
        assert 0 <= t[k].min() and t[k].max() < 1.01 and abs(t[k].mean() - 0.5) < 0.05, k


@pytest.mark.parametrize("args, words", [
    (["--arch", "resnet7"], "unknown --arch"),
    (["--grid", 3], "--grid 3 must divide"),
    (["--combine-k", 4], "--combine-k must be in 1..3"),
    (["--method", "mocov2", "--queue-size", 20], "--queue-size 20 is not divisible"),
    (["--batch-size", 64], "fewer than one global batch"),
    (["--method", "mocov3", "--official-init"], "--official-init is the official Fast-MoCo code's init"),
])
def test_bad_arguments_get_one_line_errors(parquet, tmp_path, args, words):
    p = run("--data", parquet, "--output-dir", tmp_path, *args, check=False)
    # datasets' "Generating train split" progress comes first where this run is the first to load the parquet files
    # (this test alone, or first on its pytest-xdist worker): the error is the one line besides it
    err = [x for x in p.stderr.strip().splitlines() if not x.startswith("Generating ")]
    assert p.returncode == 1 and words in p.stderr and len(err) == 1, p.stderr
    assert not (tmp_path / "ckpt.safetensors").exists()


def test_max_steps_0_writes_the_initial_checkpoint(parquet, tmp_path):
    """--max-steps 0 is zero steps (a random-init baseline for the probes), never "the default": a step-0 checkpoint
    whose backbone is the seed's initialisation."""
    run("--data", parquet, "--max-steps", 0, "--output-dir", tmp_path)
    t, meta = ck.load_checkpoint(tmp_path / "ckpt.safetensors")
    torch.manual_seed(0)
    init = fm.OnlineEncoder("fastmoco", "resnet18", False).state_dict()
    assert meta["step"] == 0 and torch.equal(t["backbone.conv1.weight"], init["backbone.conv1.weight"])


def test_missing_data_path(tmp_path):
    p = run("--data", tmp_path / "nope", "--output-dir", tmp_path, check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr


def test_streaming_image_folder_and_saved_dataset(parquet, tmp_path):
    """The other local sources: parquet streamed, an image folder, a dataset saved with save_to_disk."""
    # one parquet file = one shard, two workers: the worker without a shard must end, not hang
    run("--data", parquet, "--streaming", "--workers", 2, "--max-steps", 2, "--output-dir", tmp_path / "s", timeout=300)
    folder = tmp_path / "images"
    for i, ex in enumerate(demo_dataset("test").select(range(16))):
        (folder / str(ex["label"])).mkdir(parents=True, exist_ok=True)
        ex["image"].save(folder / str(ex["label"]) / f"{i}.png")
    run("--data", folder, "--max-steps", 2, "--output-dir", tmp_path / "f")
    datasets.load_dataset("parquet", data_dir=str(parquet), split="train").save_to_disk(str(tmp_path / "saved"))
    run("--data", tmp_path / "saved", "--max-steps", 2, "--output-dir", tmp_path / "d")
    for d in "sfd":
        assert len(read_log(tmp_path / d)) == 2


def test_knn_monitor_does_not_change_training(parquet, tmp_path):
    run("--data", parquet, "--epochs", 2, "--output-dir", tmp_path / "a")
    run("--data", parquet, "--epochs", 2, "--knn-every", 1, "--output-dir", tmp_path / "b")
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    knn = [r for r in b if "knn_top1" in r]
    assert [r["step"] for r in knn] == [0, 6, 12] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    assert all(r["knn_seconds"] > 0 and "loss" not in r for r in knn)  # logged apart from the training rows
    assert [r["loss"] for r in a] == [r["loss"] for r in b if "loss" in r]


def test_cpu_bf16_with_1x1_layer4_inputs_is_refused(parquet, tmp_path):
    """torch's CPU bf16 conv weight-gradient is sometimes inf for a stride-2 conv on a 1x1 input: refuse up front."""
    p = run("--data", parquet, "--mixed-precision", "bf16", "--output-dir", tmp_path, check=False)
    assert p.returncode == 1 and "non-finite gradients" in p.stderr, p.stderr


@pytest.mark.parametrize("method", ["mocov3", "mocov2"])
def test_bf16_autocast_run(parquet, tmp_path, method):
    """Mixed precision from the flag (as from `accelerate launch --mixed_precision bf16`), channels_last by default."""
    run("--data", parquet, "--method", method, "--queue-size", 16, "--mixed-precision", "bf16", "--max-steps", 2,
        "--output-dir", tmp_path)
    rows = read_log(tmp_path)
    meta = ck.load_checkpoint(tmp_path / "ckpt.safetensors")[1]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert meta["args"]["mixed_precision"] == "bf16"


def test_recipe_overrides_reach_the_schedules(parquet, tmp_path):
    """--lr (per 256 images), --warmup-epochs, --momentum, --tau, --weight-decay, --clip-grad override the recipe
    (with channels_last forced on in fp32, which the default leaves off on CPU)."""
    run("--data", parquet, "--epochs", 2, "--max-steps", 7, "--lr", 0.1, "--warmup-epochs", 1, "--momentum", 0.9,
        "--tau", 0.5, "--weight-decay", 0.001, "--clip-grad", 2.0, "--channels-last", "--output-dir", tmp_path)
    rows, meta = read_log(tmp_path), ck.load_checkpoint(tmp_path / "ckpt.safetensors")[1]
    base = 0.1 * 8 / 256  # 48 images / batch 8 = 6 steps per epoch, warmup 6 steps from base/4 (Fast-MoCo)
    assert rows[0]["lr"] == pytest.approx(base * 0.25) and rows[6]["lr"] == pytest.approx(base)
    assert all(r["m"] == 0.9 for r in rows)
    assert {k: meta["recipe"][k] for k in ("tau", "weight_decay", "clip_grad", "momentum")} == dict(
        tau=0.5, weight_decay=0.001, clip_grad=2.0, momentum=0.9)


def test_workers_do_not_change_the_run_and_old_checkpoints_rotate(parquet, tmp_path):
    """Augmentations are seeded per image, so 2 DataLoader workers give the same losses as none; --keep 2 keeps the
    newest two periodic checkpoints."""
    run("--data", parquet, "--max-steps", 4, "--output-dir", tmp_path / "a")
    run("--data", parquet, "--max-steps", 4, "--workers", 2, "--save-every", 1, "--keep", 2, "--output-dir",
        tmp_path / "b")
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt-*")) == ["ckpt-0000002.safetensors",
                                                                       "ckpt-0000003.safetensors"]


def test_tensorboard_image_column_and_resume_mismatch(tmp_path):
    """TensorBoard event files through Accelerate; a renamed image column via --image-column; a checkpoint of another
    method is refused on --resume."""
    d = tmp_path / "data"
    d.mkdir()
    demo_dataset("train").select(range(16)).rename_column("image", "img").to_parquet(str(d / "train-0.parquet"))
    p = run("--data", d, "--max-steps", 1, "--output-dir", tmp_path / "x", check=False)
    assert p.returncode == 1 and "--image-column image is not a column" in p.stderr
    cmd = ["--data", d, "--image-column", "img", "--max-steps", 1, "--output-dir", tmp_path / "r"]
    run(*cmd, "--tensorboard")
    assert list((tmp_path / "r").rglob("events.out.tfevents.*"))
    p = run(*cmd, "--method", "mocov3", "--resume", tmp_path / "r/ckpt.safetensors", check=False)
    assert p.returncode == 1 and "is a fastmoco/resnet18 checkpoint" in p.stderr


def test_seed_and_a_finer_grid(parquet, tmp_path):
    """--seed changes init, order and views; --grid 4 --combine-k 3 (C(16,3) = 560 combinations) trains too."""
    run("--data", parquet, "--max-steps", 2, "--output-dir", tmp_path / "a")
    run("--data", parquet, "--max-steps", 2, "--seed", 1, "--output-dir", tmp_path / "b")
    assert [r["loss"] for r in read_log(tmp_path / "a")] != [r["loss"] for r in read_log(tmp_path / "b")]
    run("--data", parquet, "--max-steps", 2, "--grid", 4, "--combine-k", 3, "--output-dir", tmp_path / "g")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(tmp_path / "g"))


def test_data_errors_become_one_line_errors_but_the_loop_body_keeps_its_own(capsys):
    """data.py raises ValueError (e.g. no decodable image, inside the loader); pretrain.py ends with its one-line
    message. Any other exception of the loader (an unreadable shard) becomes a one-line error naming the process,
    after its traceback. An exception of the training step itself keeps its traceback."""
    import pretrain

    def loader(error):
        yield 1
        raise error

    with pytest.raises(SystemExit, match="^error: no image of the dataset can be decoded$"):
        for _ in pretrain.one_line_errors(loader(ValueError("no image of the dataset can be decoded")), 0, "DIR"):
            pass
    from_worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"data.py\", line 1\nValueError: no image of the data set ...\n")
    with pytest.raises(SystemExit, match=r"^error: no image of the data set \.\.\.$"):  # the worker's last line
        for _ in pretrain.one_line_errors(loader(from_worker), 0, "DIR"):
            pass
    shard = OSError("Couldn't deserialize thrift: don't know what type: \x0f\nDeserializing page header failed.")
    with pytest.raises(SystemExit, match=r"^error: the data loader of process 1 failed \(OSError: Couldn't "
                                         r"deserialize thrift: don't know what type\); fix the data and rerun the "
                                         r"same command: it resumes from the last checkpoint in DIR$"):
        for _ in pretrain.one_line_errors(loader(shard), 1, "DIR"):
            pass
    assert "Traceback" in capsys.readouterr().err and "Deserializing page header failed" in shard.args[0]
    for error in (ValueError("a bug in the step"), OSError("a bug in the step")):
        with pytest.raises(type(error), match="a bug in the step"):
            for _ in pretrain.one_line_errors(loader(ValueError("unused")), 0, "DIR"):
                raise error
