"""The stage scripts' shared surface: one-line errors, the precision choice, the options as a run's settings and as
saved, the labelled splits the evaluations read. Nothing here defines the method (fastmoco.py) or a run's files
(runs.py)."""

import contextlib
from enum import Enum
from pathlib import Path
from types import SimpleNamespace

from data import load_split

Precision = Enum("Precision", {p: p for p in ("no", "bf16", "fp16")}, type=str)


def fail(msg):
    """A one-line, user-facing error: exits with status 1, no traceback (data.py and runs.py raise ValueError)."""
    raise SystemExit(f"error: {msg}")


@contextlib.contextmanager
def user_errors():
    """data.py, runs.py and backbones.py raise ValueError for bad input (or a state the run cannot continue from):
    end the run with its one-line message."""
    try:
        yield
    except ValueError as e:
        fail(e)


def options(params: dict) -> SimpleNamespace:
    """main()'s parameters as attributes, choices as their values: the run's settings, which its steps complete (the
    recipe's values, the data's size...)."""
    return SimpleNamespace(**{k: v.value if isinstance(v, Enum) else v for k, v in params.items()})


def saved_args(params: dict) -> dict:
    """main()'s parameters as the checkpoint and results record them: paths as strings, choices as their values."""
    return {k: (str(v) if isinstance(v, Path) else v.value if isinstance(v, Enum) else v) for k, v in params.items()}


def labelled_splits(data: str, image_column: str, streaming: bool = False):
    """(train, n_train, val, n_val, val split name) of labelled --data, or a one-line error."""
    import datasets

    datasets.disable_progress_bars()  # stderr stays clean for a one-line error; our rich bars show the work
    with user_errors():  # data.py: a path that does not exist, an unreachable Hub
        train, n = load_split(data, "train", streaming)
        val, n_val, name = *load_split(data, "validation", streaming), "validation"
        if val is None:
            val, n_val, name = *load_split(data, "test", streaming), "test"
    if train is None or val is None:
        fail(f"{data} needs a train split and a validation or test split (e.g. train-*.parquet and test-*.parquet)")
    for split, ds in (("train", train), (name, val)):
        missing = [c for c in (image_column, "label") if c not in (ds.column_names or [])]
        if missing:
            fail(f"the {split} split of {data} has no {' or '.join(missing)} column: this stage needs labelled "
                 f"images (columns {image_column}, label); it has {', '.join(ds.column_names or [])}")
    return train, n, val, n_val, name
