"""Several machines and failures at scale, with real `accelerate launch` runs on CPU (gloo). Two launchers on this
machine play two machines of one process each (--num_machines 2, --machine_rank 0/1, --main_process_ip
127.0.0.1); one launcher with 2 processes plays one machine. Every test asserts the world it got."""

import os
import re
import resource
import struct
import subprocess
import sys

import pytest
from test_pretrain import ROOT, read_log
from test_reliability import assert_same_run

import checkpoints as ck
from data import demo_dataset

pytestmark = pytest.mark.slow  # every test starts launchers
TINY = ["--arch", "resnet18", "--image-size", "32", "--no-small-stem", "--workers", "0", "--log-every", "1",
        "--no-tensorboard"]


def launch(port, script, *args, machines=1, machine_args=None, preexec_fn=None, timeout=300):
    """`accelerate launch SCRIPT ARGS`, 2 CPU processes in all: one launcher (machines=1) or two launchers of one
    process each (machines=2) -> [(returncode, stdout, stderr)] per launcher. Accelerate's --num_processes is the
    total over all machines; ACCELERATE_USE_CPU=1 with --multi_gpu is what starts gloo processes on CPU (--cpu
    --num_processes 2 starts one, --multi_gpu alone two of rank 0)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(machines):
        node = ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"] if machines > 1 else []
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", str(machines), *node, "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), *map(str, args), *map(str, (machine_args or {}).get(rank, []))]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, preexec_fn=preexec_fn))
    try:  # a bound far below the collective timeout (gloo: 30 min), to catch a hang, not to time the run
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            p.kill()


def check(results):
    for rc, out, err in results:
        assert rc == 0, out[-2000:] + err[-4000:]
    return results


# ----------------------------------------------------------------------------- two machines

@pytest.mark.parametrize("method, port", [("fastmoco", 29811), ("mocov2", 29812)])
def test_two_machines_equal_one_process(method, port):
    """Loss and gradients (and the MoCo queue, shuffle-BN for MoCo v2) of two machines of one process each equal the
    single-process result on the same global batch (tests/dist_check.py). Each launcher started exactly one
    process: rank r, local rank 0, in a world of 2."""
    results = check(launch(port, ROOT / "tests" / "dist_check.py", method, machines=2))
    for machine, (_, out, _) in enumerate(results):
        assert re.findall(r"OK rank (\d) local (\d) world (\d)", out) == [(str(machine), "0", "2")], out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("multinode")
    demo_dataset("train").select(range(32)).to_parquet(str(d / "train-0.parquet"))
    return d


def test_two_machine_run_resumes_exactly(data, tmp_path):
    """pretrain.py on two machines (Fast-MoCo, with the CPU SyncBN across them): stopped after step 2 and started
    again with the same commands, it ends with the losses and the bit-identical checkpoint of a straight run. A
    machine that cannot see the checkpoint (its own --output-dir) is refused with one line on both machines."""
    args = [*TINY, "--data", data, "--batch-size", 8, "--epochs", 2]
    check(launch(29813, ROOT / "pretrain.py", *args, "--max-steps", 6, "--output-dir", tmp_path / "full", machines=2))
    check(launch(29814, ROOT / "pretrain.py", *args, "--max-steps", 2, "--output-dir", tmp_path / "part", machines=2))
    check(launch(29815, ROOT / "pretrain.py", *args, "--max-steps", 6, "--output-dir", tmp_path / "part", machines=2))
    _, meta = ck.load_checkpoint(tmp_path / "part/ckpt.safetensors")
    assert meta["world_size"] == 2 and meta["step"] == 6
    assert_same_run(tmp_path / "full", tmp_path / "part")
    results = launch(29816, ROOT / "pretrain.py", *args, "--max-steps", 8, machines=2,
                     machine_args={0: ["--output-dir", tmp_path / "part"], 1: ["--output-dir", tmp_path / "other"]})
    for rc, _, err in results:
        assert rc != 0 and error_lines(err, "would start from different steps (6, 0, by process)"), err[-4000:]
    assert ck.load_checkpoint(tmp_path / "part/ckpt.safetensors")[1]["step"] == 6


# ----------------------------------------------------------------------------- failures on several processes

def error_lines(text, words):
    """The lines of `text` that start with "error:" and hold `words` (two processes share a pipe: found anywhere)."""
    return re.findall(rf"error: [^\n]*{re.escape(words)}[^\n]*", text)


def test_full_disk_on_the_main_process_stops_every_process(data, tmp_path):
    """The main process's periodic save fails (RLIMIT_FSIZE of half a checkpoint: EFBIG, as a full disk or quota):
    both processes exit non-zero with the one-line error, each printing it (before, the other one went on to its
    next step's all-reduce and waited there), and the last good checkpoint and log survive unchanged."""
    args = [*TINY, "--data", data, "--batch-size", 8, "--save-every", 1, "--output-dir", tmp_path]
    check(launch(29821, ROOT / "pretrain.py", *args, "--max-steps", 1))
    ckpt, log = tmp_path / "ckpt.safetensors", (tmp_path / "log.jsonl").read_text()
    before = ckpt.read_bytes()

    def limit():  # in the launcher before exec, inherited by both processes; only the main process writes files
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))

    [(rc, out, err)] = launch(29822, ROOT / "pretrain.py", *args, "--max-steps", 4, preexec_fn=limit)
    assert rc != 0
    lines = error_lines(err, "free disk space and rerun the same command")
    assert len(lines) == 2 and "cannot write" in lines[0] and "File too large" in lines[0], err[-6000:]
    assert "Connection closed by peer" not in err, err[-6000:]
    assert ckpt.read_bytes() == before and (tmp_path / "log.jsonl").read_text().startswith(log)
    assert not list(tmp_path.glob("ckpt-*.safetensors")) and not list(tmp_path.glob("*.tmp"))
    assert ck.load_checkpoint(ckpt)[1]["step"] == 1


def corrupt_pages(path):
    """Overwrite a parquet file's pages, keeping its footer: the row count still reads, the rows raise OSError."""
    raw = bytearray(path.read_bytes())
    footer = struct.unpack("<I", raw[-8:-4])[0]
    raw[4:len(raw) - 8 - footer] = b"\xff" * (len(raw) - 12 - footer)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("machines, port", [(1, 29823), (2, 29825)])
def test_data_loader_error_on_one_process_stops_every_process(tmp_path, machines, port):
    """Streaming, one parquet shard per process; after a good run to step 2, process 1's shard is damaged. The restart
    fails in process 1's data loader only: every process exits non-zero with the one-line error naming process 1
    (on two machines, each launcher prints it), and the checkpoint and log of step 2 survive unchanged."""
    train = demo_dataset("train").select(range(32))
    for i in range(2):
        train.select(range(16 * i, 16 * i + 16)).to_parquet(str(tmp_path / f"train-0000{i}-of-00002.parquet"))
    args = [*TINY, "--data", tmp_path, "--streaming", "--batch-size", 8, "--output-dir", tmp_path / "run"]
    check(launch(port, ROOT / "pretrain.py", *args, "--max-steps", 2, machines=machines))
    ckpt, before = tmp_path / "run/ckpt.safetensors", (tmp_path / "run/ckpt.safetensors").read_bytes()
    corrupt_pages(tmp_path / "train-00001-of-00002.parquet")  # the second shard: process 1's
    results = launch(port + 1, ROOT / "pretrain.py", *args, "--max-steps", 4, machines=machines)
    err = "".join(e for _, _, e in results)
    assert all(rc != 0 for rc, _, _ in results), err[-6000:]
    for _, _, e in results:  # each launcher printed the line: with two machines, each machine's process did
        assert error_lines(e, "the data loader of process 1 failed (OSError"), e[-6000:]
    assert len(error_lines(err, "the data loader of process 1 failed")) == 2, err[-6000:]
    assert "Connection closed by peer" not in err, err[-6000:]
    assert ckpt.read_bytes() == before and [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
    assert ck.load_checkpoint(ckpt)[1]["step"] == 2
