"""kNN top-1 curves from pretrain.py's log.jsonl: against epochs and against training time (kNN time excluded).

    python plot.py runs/pretrain                                  # one run
    python plot.py runs/fastmoco-s0 runs/fastmoco-s1 runs/mocov3-s0 runs/mocov3-s1 -o curves.png

Each argument is a run's --output-dir (or its log.jsonl). Runs whose names differ only by a trailing seed suffix
(`-s0`, `-seed1`, ...) are one line: the mean over seeds, with a band from the lowest to the highest seed. The runs
need `--knn-every N` to have kNN rows in their logs.
"""

import json
import os
import re
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def knn_rows(run: Path) -> list:
    """The kNN rows (epoch, knn_top1, train_seconds if logged) of one run's log.jsonl."""
    log = run if run.suffix == ".jsonl" else run / "log.jsonl"
    if not log.is_file():
        raise ValueError(f"{log} does not exist: pass a pretrain.py --output-dir")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "knn_top1" in r]
    if not rows:
        raise ValueError(f"{log} has no kNN rows: pretrain with --knn-every N")
    return rows


def label_of(run: Path) -> str:
    name = run.parent.name if run.suffix == ".jsonl" else run.name
    return re.sub(r"-(s|seed)\d+$", "", name)


def draw(groups: dict, out: Path, title: str = "") -> Path:
    """groups {label: [run, ...]} -> a PNG with two panels (kNN top-1 vs epoch, vs training minutes)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, runs in groups.items():
        logs = [knn_rows(Path(r)) for r in runs]
        n = min(len(rows) for rows in logs)  # seeds stopped at different points: plot what all of them have
        acc = np.array([[r["knn_top1"] for r in rows[:n]] for rows in logs])  # (seeds, points)
        epoch = np.array([r["epoch"] for r in logs[0][:n]])
        xs = [("epoch", epoch)]
        if all("train_seconds" in r for rows in logs for r in rows[:n]):
            minutes = np.array([[r["train_seconds"] / 60 for r in rows[:n]] for rows in logs]).mean(0)
            xs.append(("training minutes", minutes))
        for ax, (name, x) in zip(axes, xs):
            line, = ax.plot(x, acc.mean(0), marker="o", ms=3, label=f"{label} ({len(runs)} seed"
                                                                     f"{'s' if len(runs) > 1 else ''})")
            if len(runs) > 1:
                ax.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
            ax.set_xlabel(name)
    axes[0].set_ylabel("kNN top-1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        save(fig, out, plt.rcParams["savefig.format"])
    finally:
        plt.close(fig)
    return out


def save(fig, out: Path, default_format: str):
    """fig as `out`, written to a temporary sibling and renamed: never a half-written image, and an earlier one stays
    until the new one is complete. A path that cannot be written is a ValueError with a one-line message."""
    if out.is_dir():
        raise ValueError(f"cannot write {out}: it is a folder: choose another output path (-o)")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            fig.savefig(tmp, dpi=120, format=out.suffix[1:] or default_format)  # the format from `out`, not `tmp`
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        blocker = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else e.strerror or str(e)
        raise ValueError(f"cannot write {out}: {why}: choose another output path (-o)") from None


@app.command()
def main(
    runs: Annotated[list[Path], typer.Argument(help="pretrain.py output directories (or their log.jsonl files).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("knn.png"),
    title: Annotated[str, typer.Option(help="Figure title.")] = "",
):
    """Plot kNN top-1 against epochs and training time, one line per run (seeds averaged)."""
    groups = {}
    for run in runs:
        groups.setdefault(label_of(run), []).append(run)
    try:
        draw(groups, out, title)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
