"""Reliability and security of pretrain.py, as a user meets them: a run killed with SIGKILL and restarted with the
same command continues bit for bit; corrupt, truncated and pickled files are refused; a full disk, NaN losses and
broken images end (or skip) cleanly without losing the last good checkpoint."""

import io
import os
import pickle
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import tokenize
import zlib

import datasets
import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from test_pretrain import ROOT, read_log, run

import checkpoints as ck
from data import demo_dataset, load_rgb


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two parquet shards of 24 images each (so 2 streaming workers each get one) and a 20-image test split."""
    d = tmp_path_factory.mktemp("shards")
    train = demo_dataset("train").select(range(48))
    train.select(range(24)).to_parquet(str(d / "train-00000-of-00002.parquet"))
    train.select(range(24, 48)).to_parquet(str(d / "train-00001-of-00002.parquet"))
    return d


def start(*args):
    """pretrain.py as a background process (same tiny defaults as test_pretrain.run)."""
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
           "--no-tensorboard", "--log-every", "1", "--no-small-stem", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no"})


def kill_after(p, ckpt, timeout=300):
    """SIGKILL `p` as soon as checkpoint file `ckpt` exists (mid-run: later steps are in flight)."""
    t = time.time()
    try:
        while not ckpt.exists():
            assert p.poll() is None, "the run ended before it could be killed"
            assert time.time() - t < timeout
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def assert_same_run(a, b):
    """Same losses / lr / momentum at every step and bit-identical final checkpoints."""
    ra, rb = read_log(a), read_log(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    assert [(r["loss"], r["lr"], r["m"]) for r in rb] == [(r["loss"], r["lr"], r["m"]) for r in ra]
    ta, _ = ck.load_checkpoint(a / "ckpt.safetensors")
    tb, _ = ck.load_checkpoint(b / "ckpt.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("method, streaming", [("fastmoco", False), ("mocov2", True)])
def test_sigkill_then_same_command_resumes_exactly(shards, tmp_path, method, streaming):
    """Kill a real run with SIGKILL right after its 3rd checkpoint, corrupt the newest checkpoint on disk, and rerun the
    same command: it falls back to the previous good checkpoint (with a warning) and ends with the same losses and
    bit-identical weights, optimizer buffers, target encoder and queue as a run never interrupted. Streaming uses
    2 workers (one shard each), so the resume point is inside the epoch and not a multiple of the worker count."""
    args = ["--data", shards, "--method", method, "--epochs", 2, "--max-steps", 9, "--queue-size", 16,
            "--workers", 2 if streaming else 0, *(["--streaming"] if streaming else [])]
    run(*args, "--output-dir", tmp_path / "full", timeout=300)
    d = tmp_path / "killed"
    kill_after(start(*args, "--output-dir", d, "--save-every", 1, "--keep", 3), d / "ckpt-0000004.safetensors")
    assert not (d / "ckpt.safetensors").exists()
    newest = sorted(d.glob("ckpt-*.safetensors"))[-1]
    raw = bytearray(newest.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte in the tensor data: only the checksum can tell
    newest.write_bytes(bytes(raw))
    p = run(*args, "--output-dir", d, "--save-every", 1, "--keep", 3, timeout=300)
    assert f"skipping {newest} is corrupt" in p.stderr, p.stderr
    assert "resuming from" in p.stderr
    assert_same_run(tmp_path / "full", d)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    demo_dataset("train").select(range(16)).to_parquet(str(d / "train-0.parquet"))
    return d


@pytest.mark.slow
def test_nonfinite_loss_stops_or_is_skipped(small, tmp_path):
    """A diverging run (lr 1e30): without --skip-nonfinite it stops naming the step and keeps the good checkpoints,
    never writing one after the NaN; with it, every non-finite step is skipped and counted, and leaves the weights,
    the optimizer buffers, the target encoder and the queue exactly as the last good step left them."""
    args = ["--data", small, "--method", "mocov2", "--queue-size", 16, "--lr", 1e30, "--max-steps", 4,
            "--save-every", 1, "--keep", 0]
    p = run(*args, "--output-dir", tmp_path / "stop", check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "loss is nan at step 2" in err[-1] and "is intact" in err[-1], p.stderr
    assert [f.name for f in (tmp_path / "stop").glob("ckpt*")] == ["ckpt-0000001.safetensors"]
    run(*args, "--skip-nonfinite", "--output-dir", tmp_path / "skip")
    rows = read_log(tmp_path / "skip")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 3]
    good, _ = ck.load_checkpoint(tmp_path / "skip/ckpt-0000001.safetensors")
    last, meta = ck.load_checkpoint(tmp_path / "skip/ckpt.safetensors")
    assert meta["skipped_steps"] == 3
    for k in good:
        if not k.startswith("rng."):
            assert torch.equal(good[k], last[k]), k


@pytest.mark.slow
def test_full_disk_gives_one_line_error_and_keeps_the_checkpoint(small, tmp_path):
    """A real write failure: the resumed run may not write files larger than half a checkpoint (RLIMIT_FSIZE, as on
    a full disk or quota, EFBIG instead of ENOSPC). It stops with one line, leaves no temporary file, and the
    previous checkpoint still loads, unchanged."""
    run("--data", small, "--max-steps", 1, "--output-dir", tmp_path)
    ckpt = tmp_path / "ckpt.safetensors"
    before = ckpt.read_bytes()

    def limit():  # runs in the child before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG rather than killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))

    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--data", str(small), "--arch", "resnet18", "--image-size", "32",
           "--batch-size", "8", "--workers", "0", "--no-tensorboard", "--no-small-stem", "--max-steps", "2",
           "--output-dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=limit,
                       env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no"})
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and err[-1].startswith("error: cannot write") and "File too large" in err[-1], p.stderr
    assert "is intact" in err[-1] and not list(tmp_path.glob("*.tmp"))
    assert ckpt.read_bytes() == before and ck.load_checkpoint(ckpt)[1]["step"] == 1


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(small, tmp_path):
    """Automatic resume continues the run in --output-dir: a command that would compute something else there (another
    seed, grid, batch) is refused with one line naming the flags; flags that only change how it runs are accepted."""
    run("--data", small, "--max-steps", 1, "--output-dir", tmp_path)
    p = run("--data", small, "--max-steps", 1, "--output-dir", tmp_path, "--seed", 1, "--grid", 4, check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "other settings (grid, seed)" in err[-1] and "new --output-dir" in err[-1], p.stderr
    p = run("--data", small, "--max-steps", 2, "--output-dir", tmp_path, "--log-every", 2, "--save-every", 5)
    assert "resuming from" in p.stderr and ck.load_checkpoint(tmp_path / "ckpt.safetensors")[1]["step"] == 2


def image_bytes(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def png_bomb():
    """A 1x1 PNG whose header claims 100000 x 100000 pixels (a decompression bomb: 40 GB if decoded)."""
    b = bytearray(image_bytes(Image.new("RGB", (1, 1)), "PNG"))
    b[16:24] = struct.pack(">II", 100_000, 100_000)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def bad_and_odd_images():
    """{name: (encoded bytes, expected RGB pixel at (0, 0) or None if it must be refused)}."""
    jpeg = image_bytes(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: white after compositing
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0  # index 1 (green) stays opaque
    return {
        "truncated.jpg": (jpeg[:len(jpeg) // 2], None),
        "empty": (b"", None),
        "text": (b"this is not an image" * 10, None),
        "bomb.png": (png_bomb(), None),
        "gray.png": (image_bytes(Image.new("L", (8, 8), 100), "PNG"), (100, 100, 100)),
        "cmyk.jpg": (image_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=100), (255, 255, 255)),
        "rgba.png": (image_bytes(rgba, "PNG"), (255, 255, 255)),
        "palette.png": (image_bytes(pal, "PNG", transparency=0), (0, 255, 0)),
        "16bit.png": (image_bytes(Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)), "PNG"), (128, 128, 128)),
        "1x1.png": (image_bytes(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), (1, 2, 3)),
        "large.jpg": (image_bytes(Image.new("RGB", (4000, 3000), (0, 0, 255)), "JPEG"), (0, 0, 254)),
    }


def test_load_rgb_converts_modes_and_refuses_broken_files():
    for name, (raw, pixel) in bad_and_odd_images().items():
        img = load_rgb({"bytes": raw, "path": None})
        if pixel is None:
            assert img is None, name
        else:
            assert img.mode == "RGB" and img.getpixel((0, 0)) == pytest.approx(pixel, abs=2), name


@pytest.mark.slow
def test_bad_images_are_skipped_counted_and_bounded(tmp_path):
    """Parquet data with every kind of broken and odd image among good ones: the run converts the odd ones, skips the
    4 undecodable ones (naming them), counts them in the log, and stops with one line when they exceed
    --max-bad-fraction."""
    odd = bad_and_odd_images()
    good = [{"bytes": image_bytes(ex["image"], "PNG"), "path": None} for ex in demo_dataset("train").select(range(13))]
    rows = good + [{"bytes": raw, "path": None} for raw, _ in odd.values()]  # 24 images: 3 batches of 8
    features = datasets.Features(image=datasets.Image())
    datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(str(tmp_path / "train-0.parquet"))
    bad_ids = {f"#{13 + i}" for i, (_, px) in enumerate(odd.values()) if px is None}
    p = run("--data", tmp_path, "--epochs", 1, "--max-bad-fraction", 0.5, "--output-dir", tmp_path / "ok")
    named = {w.split()[-1] for w in p.stderr.splitlines() if "skipped undecodable image" in w}
    assert named == bad_ids, p.stderr
    assert read_log(tmp_path / "ok")[-1]["bad_images"] == 4 and ck.load_checkpoint(tmp_path / "ok/ckpt.safetensors")
    p = run("--data", tmp_path, "--epochs", 1, "--output-dir", tmp_path / "stop", check=False)  # default 0.01
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "could not be decoded" in err and "--max-bad-fraction" in err, p.stderr


class Boom:
    """A pickle whose loading runs a shell command creating MARKER."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_planted_pickles_are_never_unpickled(small, tmp_path):
    """A malicious pickle as .pt / .pth / .pkl (given to --resume) and renamed to ckpt.safetensors in the output
    directory (found by automatic resume): every one is refused with one line or skipped with a warning, and its
    payload never runs."""
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(Boom(marker))
    assert b"system" in evil  # the payload is real: pickle.loads(evil) would create the marker
    for name in ("evil.pt", "evil.pth", "evil.pkl"):
        (tmp_path / name).write_bytes(evil)
        with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
            ck.load_checkpoint(tmp_path / name)
    p = run("--data", small, "--max-steps", 1, "--resume", tmp_path / "evil.pt", "--output-dir", tmp_path / "a",
            check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "evil.pt is not a readable safetensors" in err[0], p.stderr
    assert not (tmp_path / "a").exists()  # refused before any work
    d = tmp_path / "b"
    d.mkdir()
    (d / "ckpt.safetensors").write_bytes(evil)
    (d / "ckpt-0000001.safetensors").write_bytes(evil)
    p = run("--data", small, "--max-steps", 1, "--output-dir", d)  # nothing valid to resume: a fresh run
    assert p.stderr.count("warning: skipping") == 2 and "resuming" not in p.stderr
    assert ck.load_checkpoint(d / "ckpt.safetensors")[1]["step"] == 1
    assert not marker.exists()


def test_no_unpickling_or_eval_in_the_project():
    """The project's code (tokens, not comments) never uses pickle & co., eval / exec, or a torch.load without
    weights_only=True (tests excluded)."""
    for f in ROOT.glob("*.py"):
        toks = [t for t in tokenize.generate_tokens(io.StringIO(f.read_text()).readline)
                if t.type in (tokenize.NAME, tokenize.OP)]
        for i, t in enumerate(toks):
            assert t.string not in ("pickle", "marshal", "shelve", "dill", "joblib", "cloudpickle"), f.name
            assert t.string not in ("eval", "exec") or toks[i - 1].string == ".", (f.name, t.start)  # x.eval() is fine
            if t.string == "load" and toks[i - 1].string == "." and toks[i - 2].string == "torch":
                call = "".join(u.string for u in toks[i:i + 40])
                assert "weights_only=True" in call.split(")")[0], (f.name, t.start)


@pytest.mark.slow
def test_cpu_sync_bn_gives_global_batch_statistics():
    """fastmoco.SyncBatchNorm under a real 2-process gloo launch equals plain BN on the whole batch (see
    tests/syncbn_check.py): outputs (through the loss), gradients, and both encoders' running statistics."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29661", str(ROOT / "tests" / "syncbn_check.py")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    # the two ranks share one pipe, so their lines can interleave: find the ranks anywhere in it
    assert sorted(re.findall(r"OK rank (\d+)", p.stdout)) == ["0", "1"], p.stdout


def launch2(port, *args, check=True):
    """`accelerate launch pretrain.py` on 2 CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(ROOT / "pretrain.py"), "--arch", "resnet18", "--image-size", "32", "--no-small-stem",
           "--workers", "0", "--log-every", "1", "--no-tensorboard", *map(str, args)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert not check or p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.mark.slow
def test_two_process_resume_equals_uninterrupted(shards, tmp_path):
    """2 processes, Fast-MoCo with the CPU SyncBN, streaming (one shard per process): stopped at step 2 and
    restarted with the same command in the same directory, the run ends bit-identical to an uninterrupted one --
    the per-process stream positions are gathered into the checkpoint. A batch the processes cannot share is
    refused with one line."""
    args = ["--data", shards, "--streaming", "--batch-size", 8, "--epochs", 1]
    launch2(29663, *args, "--max-steps", 5, "--output-dir", tmp_path / "full")
    launch2(29664, *args, "--max-steps", 2, "--output-dir", tmp_path / "part")
    launch2(29665, *args, "--max-steps", 5, "--output-dir", tmp_path / "part")
    tensors, meta = ck.load_checkpoint(tmp_path / "part/ckpt.safetensors")
    assert meta["world_size"] == 2 and tensors["data.stream"].shape == (2, 2)
    assert_same_run(tmp_path / "full", tmp_path / "part")
    p = launch2(29666, "--data", shards, "--batch-size", 9, "--output-dir", tmp_path / "odd", check=False)
    assert p.returncode != 0 and "--batch-size 9 is not divisible by the 2 processes" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_memory_stays_flat_and_workers_are_cleaned_up(small, tmp_path):
    """100 tiny steps (MoCo v2, 16 px) with 2 DataLoader workers and a checkpoint every 25: the main process's RSS
    after 20 steps and at the end differ by less than 48 MB, and no worker outlives the run."""
    p = start("--data", small, "--method", "mocov2", "--queue-size", 16, "--image-size", 16, "--max-steps", 100,
              "--workers", 2, "--save-every", 25, "--output-dir", tmp_path)
    proc, rss, workers = psutil.Process(p.pid), {}, set()
    try:
        while p.poll() is None:
            try:
                workers |= {c.pid for c in proc.children(recursive=True)}
                log = tmp_path / "log.jsonl"
                rss[len(log.read_text().splitlines()) if log.exists() else 0] = proc.memory_info().rss
            except (psutil.NoSuchProcess, FileNotFoundError):
                break
            time.sleep(0.1)
    finally:
        p.kill()
    assert p.wait() == 0 and len(workers) >= 2
    warm, end = min(s for s in rss if s >= 20), max(rss)
    assert end >= 95 and rss[end] - rss[warm] < 48 * 2 ** 20, (rss[warm], rss[end])
    time.sleep(2)
    assert not [w for w in workers if psutil.pid_exists(w) and psutil.Process(w).status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def fp16_scaler(monkeypatch):
    """Accelerate builds no GradScaler for fp16 on the CPU: give it one, as it does on CUDA (native AMP, fp16)."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    acc = Accelerator(cpu=True)
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), True
    return acc


@pytest.mark.parametrize("clip", [None, 1.0])
def test_fp16_skip_nonfinite_then_a_good_step(fp16_scaler, clip):
    """fp16's loss scaler with --skip-nonfinite (and clipping): a skipped step halves the scale and the next step
    applies (it used to raise "unscale_() has already been called"); a gradient overflow with a finite loss is the
    scaler's own skip, reported as "overflow" and the weights stay."""
    import pretrain

    acc = fp16_scaler
    online = torch.nn.Linear(3, 1)
    target = torch.nn.Linear(3, 1).requires_grad_(False)
    model, opt = acc.prepare(online, torch.optim.SGD(online.parameters(), lr=0.1))
    x = torch.ones(2, 3)

    def loss_fn(scale):
        return lambda model, target, views, queue, step: ((model(x) * scale).sum(), None)

    def step(scale, check):
        run = pretrain.Run(acc, model, online, target, opt)
        return pretrain.train_step(run, [x], 0.1, 0.99, loss_fn(scale), clip, check)[1]

    w = online.weight.detach().clone()
    assert step(float("nan"), True) == "skipped" and acc.scaler.get_scale() == 2.0 ** 15
    assert torch.equal(online.weight, w)
    assert step(1.0, True) == "applied" and not torch.equal(online.weight, w)
    w = online.weight.detach().clone()
    assert step(1e34, False) == "overflow" and torch.equal(online.weight, w)  # 1e34 * 2**15: inf in fp32
    assert acc.scaler.get_scale() == 2.0 ** 14
    assert step(1.0, False) == "applied" and not torch.equal(online.weight, w)


BAD_VALUES = [  # (script, arguments, words of the one-line error)
    ("pretrain", ["--max-steps", "-5"], "--max-steps -5 is out of range: use a number from 0 up"),
    ("pretrain", ["--epochs", "0"], "--epochs 0 is out of range: use a number from 1 up"),
    ("pretrain", ["--epochs", "-1"], "--epochs -1 is out of range"),
    ("pretrain", ["--image-size", "0"], "--image-size 0 is out of range: use a number from 8 up"),
    ("pretrain", ["--momentum", "1.5"], "--momentum 1.5 is out of range: use a number from 0 to 1"),
    ("pretrain", ["--knn-every", "-1"], "--knn-every -1 is out of range"),
    ("pretrain", ["--grid", "0"], "--grid 0 is out of range"),
    ("pretrain", ["--tau", "0"], "--tau 0.0 is out of range: use a number above 0"),
    ("pretrain", ["--lr", "-0.1"], "--lr -0.1 is out of range"),
    ("pretrain", ["--workers", "-1"], "--workers -1 is out of range"),
    ("pretrain", ["--lr", "nan"], "--lr nan is out of range"),
    ("pretrain", ["--log-every", "0"], "--log-every 0 is out of range"),
    ("pretrain", ["--max-bad-fraction", "1.5"], "--max-bad-fraction 1.5 is out of range: use a number from 0 to 1"),
    ("linear_probe", ["--epochs", "0"], "--epochs 0 is out of range"),
    ("linear_probe", ["--epochs", "-1"], "--epochs -1 is out of range"),
    ("linear_probe", ["--batch-size", "0"], "--batch-size 0 is out of range"),
    ("linear_probe", ["--knn", "--knn-k", "0"], "--knn-k 0 is out of range"),
    ("linear_probe", ["--lr", "-1"], "--lr -1.0 is out of range"),
    ("semisup", ["--epochs", "0"], "--epochs 0 is out of range"),
    ("semisup", ["--epochs", "-2"], "--epochs -2 is out of range"),
    ("semisup", ["--batch-size", "0"], "--batch-size 0 is out of range"),
    ("semisup", ["--lr-backbone", "-1"], "--lr-backbone -1.0 is out of range"),
    ("transfer.detect", ["--iters", "0"], "--iters 0 is out of range"),
    ("transfer.detect", ["--lr", "-0.02"], "--lr -0.02 is out of range"),
]


@pytest.mark.parametrize("script, args, words", BAD_VALUES + [
    (s, ["--output-dir", "FILE/run"], "cannot write to --output-dir FILE/run (Not a directory): choose another path")
    for s in ("pretrain", "linear_probe", "semisup")])
def test_zero_negative_and_unwritable_values_are_one_line_errors(tmp_path, script, args, words):
    """0 never means "the default" and a negative value never runs: each is refused in one line naming the flag,
    before any work (no checkpoint is read, no folder made); so is an output folder that cannot be written."""
    import importlib

    from typer.testing import CliRunner

    (tmp_path / "file").write_text("")
    args = [a.replace("FILE", str(tmp_path / "file")) for a in args]
    first = {"pretrain": ["--data", "demo"], "transfer.detect": ["CKPT", "--train", "a:train", "--val", "a:val"]}.get(
        script, ["CKPT", "--data", "demo"])  # the checkpoint is never read: the values are checked first
    first = [a.replace("CKPT", str(tmp_path / "absent.safetensors")) for a in first]
    out = [] if "--output-dir" in args else ["--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(importlib.import_module(script).app, first + args + out)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: " + words.replace("FILE", str(tmp_path / "file")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
