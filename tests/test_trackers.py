"""--log-with: every stage script sends its config, every number of its log.jsonl (at the row's step) and of its
results.json to Accelerate's trackers. Checked offline by reading each tracker's local store back: wandb's offline run
file, MLflow's file store, trackio's SQLite database. A tracker that is not installed skips its tests
(pip install -r requirements-trackers.txt); a tracker named but not installed is a one-line error."""

import importlib
import importlib.util
import json
import sqlite3
import struct
from pathlib import Path

import pytest

import linear_probe
import pretrain
import runs
import semisup
import transfer.detect as detect
from conftest import call, stage

TRACKERS = ("wandb", "mlflow", "trackio")
SCRIPTS = (pretrain, linear_probe, semisup, detect)


def installed(name):
    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------- the flag (fast)

def test_names_repeat_or_separate_with_commas(monkeypatch):
    monkeypatch.setattr(runs, "get_available_trackers", lambda: ["tensorboard", "wandb", "mlflow"])
    assert runs.trackers(None) == []
    assert runs.trackers(["tensorboard,wandb", " mlflow ", "wandb"]) == ["tensorboard", "wandb", "mlflow"]
    with pytest.raises(ValueError, match=r"^--log-with tensorbord is not a tracker: choose from .*tensorboard"):
        runs.trackers(["tensorbord"])
    # Accelerate itself would drop a tracker that is not installed without a word
    with pytest.raises(ValueError, match=r"^--log-with trackio: trackio is not installed; pip install trackio "
                                         r"\(or pip install -r requirements-trackers.txt\)$"):
        runs.trackers(["wandb,trackio"])


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_a_missing_tracker_stops_each_script_before_any_work(module, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "get_available_trackers", lambda: ["tensorboard"])
    first = {pretrain: dict(data="demo"), detect: dict(ckpt=tmp_path / "absent", train=["a:b"], val=["a:b"])}.get(
        module, dict(ckpt=tmp_path / "absent", data="demo"))
    with pytest.raises(SystemExit, match=r"^error: --log-with wandb: wandb is not installed; pip install wandb"):
        call(module, **first, log_with=["wandb"], output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- reading the stores back

def wandb_records(path: Path) -> list:
    """The protobuf records of a wandb run file: a LevelDB-style log (7-byte file header, 32 KiB blocks, each record
    in chunks with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, chunk, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = chunk + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def wandb_run(store: Path, project: str):
    """(config, {(step, key): value}) of the offline wandb run of `project`."""
    for path in store.glob("wandb/offline-run-*/run-*.wandb"):
        records = wandb_records(path)
        kinds = [r.WhichOneof("record_type") for r in records]
        if any(k == "run" and r.run.project == project for k, r in zip(kinds, records)):
            config = {i.key: json.loads(i.value_json) for k, r in zip(kinds, records) if k == "config"
                      for i in r.config.update}
            rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                    for k, r in zip(kinds, records)
                    if k == "history"]
            return config, {(row["_step"], key): v for row in rows for key, v in row.items() if key[0] != "_"}
    raise AssertionError(f"no wandb run of {project} in {store}")


def mlflow_run(store: Path, project: str):
    """(params, {(step, key): value}) from MLflow's file store: EXPERIMENT/meta.yaml names the experiment,
    RUN/params/KEY holds the value, RUN/metrics/KEY one 'timestamp value step' line per log."""
    for meta in store.glob("mlruns/*/meta.yaml"):
        if f"name: {project}\n" in meta.read_text():
            (run,) = [d for d in meta.parent.iterdir() if d.is_dir()]
            params = {p.name: p.read_text() for p in (run / "params").iterdir()}
            metrics = {(int(step), p.relative_to(run / "metrics").as_posix()): float(v)  # bbox/AP: a folder
                       for p in (run / "metrics").rglob("*") if p.is_file()
                       for _, v, step in map(str.split, p.read_text().splitlines())}
            return params, metrics
    raise AssertionError(f"no MLflow experiment {project} in {store}")


def trackio_run(store: Path, project: str):
    """(config, {(step, key): value}) from trackio's SQLite database of `project`."""
    db = sqlite3.connect(store / "trackio" / f"{project}.db")
    (config,) = [json.loads(c) for (c,) in db.execute("SELECT config FROM configs")]
    metrics = {(step, k): v for step, m in db.execute("SELECT step, metrics FROM metrics ORDER BY id")
               for k, v in json.loads(m).items()}
    return config, metrics


READ = {"wandb": wandb_run, "mlflow": mlflow_run, "trackio": trackio_run}


# ----------------------------------------------------------------------------- every stage, every tracker (slow)

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One local store for all trackers and stages (each stage is its own project / experiment), offline."""
    d = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(WANDB_MODE="offline", WANDB_DIR=str(d), WANDB_SILENT="true",
                         MLFLOW_TRACKING_URI=f"file:{d / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
                         TRACKIO_DIR=str(d / "trackio")).items():
            mp.setenv(k, v)
        yield d


def log_with():
    names = [t for t in TRACKERS if installed(t)]
    if not names:
        pytest.skip("no tracker installed: pip install -r requirements-trackers.txt")
    return ["--log-with", ",".join(names)]


def flat(row: dict, prefix="") -> dict:
    """The numbers of a row, nested dicts as a/b keys: {"bbox": {"AP": 1.0}} -> {"bbox/AP": 1.0}."""
    out = {}
    for k, v in row.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else
                   {prefix + k: v} if type(v) in (int, float) else {})
    return out


def expected(out: Path, step_of: str, last_step=None) -> dict:
    """{(step, key): value} of every number in log.jsonl (nested mAPs as bbox/AP) and results.json (at the last
    step), as the trackers should hold them."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    if (out / "results.json").is_file():
        rows.append(dict(json.loads((out / "results.json").read_text()), **{step_of: last_step}))
    return {(row[step_of], key): v for row in rows for key, v in flat(row).items() if key != step_of}


@pytest.fixture(scope="module")
def runs_(store, labelled, tmp_path_factory):
    """{stage: (output dir, {(step, key): value} expected)} of one tiny run of each stage with every installed
    tracker, each run's checkpoint from the pretrain run."""
    out = {s: tmp_path_factory.mktemp(s) for s in ("pretrain", "linear_probe", "semisup", "detect")}
    flags = log_with()
    stage("pretrain.py", "--data", labelled, "--arch", "resnet18", "--image-size", 32, "--no-small-stem",
          "--batch-size", 8, "--queue-size", 16, "--epochs", 1, "--knn-every", 1, "--log-every", 2, "--workers", 0,
          "--no-tensorboard", *flags, "--output-dir", out["pretrain"])
    ckpt = out["pretrain"] / "ckpt.safetensors"
    stage("linear_probe.py", ckpt, "--data", labelled, "--batch-size", 16, "--epochs", 2, "--cached-features",
          "--knn", "--workers", 0, *flags, "--output-dir", out["linear_probe"])
    stage("semisup.py", ckpt, "--data", labelled, "--fraction", 0.5, "--batch-size", 8, "--epochs", 2,
          "--workers", 0, *flags, "--output-dir", out["semisup"])
    from test_transfer import make_detection_data

    voc, _ = make_detection_data(tmp_path_factory.mktemp("detection"))
    stage("transfer/detect.py", ckpt, "--train", f"{voc}:train", "--val", f"{voc}:val", "--iters", 2, "--eval-every",
          1, "--batch-size", 2, "--min-size", 64, "--max-size", 64, "--workers", 0, *flags, "--output-dir",
          out["detect"])
    return {"pretrain": (out["pretrain"], expected(out["pretrain"], "step"), 8),
            "linear_probe": (out["linear_probe"], expected(out["linear_probe"], "epoch", 2), 16),
            "semisup": (out["semisup"], expected(out["semisup"], "epoch", 2), 8),
            "detect": (out["detect"], expected(out["detect"], "step", 2), 2)}


@pytest.mark.slow
@pytest.mark.parametrize("tracker", TRACKERS)
@pytest.mark.parametrize("name", ["pretrain", "linear_probe", "semisup", "detect"])
def test_every_number_reaches_the_tracker(name, tracker, runs_, store):
    if not installed(tracker):
        pytest.skip(f"{tracker} is not installed: pip install -r requirements-trackers.txt")
    out, want, batch_size = runs_[name]
    config, got = READ[tracker](store, name)
    assert str(config["batch_size"]) == str(batch_size) and str(config["seed"]) == "0"
    assert str(config["output_dir"]) == str(out)
    missing = {k: v for k, v in want.items() if k not in got or got[k] != pytest.approx(v, rel=1e-6)}
    assert not missing, f"{tracker} lacks or differs on {sorted(missing)[:10]}"
    keys = {key for _, key in want}
    must = {"pretrain": {"loss", "lr", "knn_top1"}, "linear_probe": {"loss", "top1", "best_top1", "knn_top1"},
            "semisup": {"loss", "top1", "best_top1", "labelled_images"},
            "detect": {"loss", "lr", "bbox/AP", "bbox/AP50"}}[name]
    assert must <= keys  # the check above covered the numbers that matter
