"""A recipe sweep: one short `pretrain.py` run per (lr, tau) cell, each with its own kNN monitor, and a table of the
final kNN top-1 (rows lr, columns tau); docs/small-data.md has the sweep of Fast-MoCo's --recipe small lr and tau:

    python -m bench.sweep --data demo --lr 0.25,0.5,1,2 --tau 0.1,0.2,0.5 -- --arch resnet18 --no-small-stem \
        --batch-size 128 --epochs 2

Flags after `--` go to every run unchanged (data, method and recipe are set here). Runs whose checkpoint exists are
not run again: rerun the command after an interruption.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def final_knn(run: Path):
    """(kNN top-1 at initialisation, at the end) from a run's log.jsonl."""
    rows = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "knn_top1" in r]
    return rows[0]["knn_top1"], rows[-1]["knn_top1"]


def table(results: dict, lrs: list, taus: list) -> str:
    """{(lr, tau): (init, end)} -> a markdown table of the end values, rows lr, columns tau."""
    lines = ["| lr \\ tau | " + " | ".join(f"{t:g}" for t in taus) + " |", "|---" * (len(taus) + 1) + "|"]
    return "\n".join(lines + [f"| {lr:g} | " + " | ".join(f"{results[lr, t][1]:.1f}" for t in taus) + " |"
                              for lr in lrs])


# A command's context_settings replace the app's: -h again here, or it would reach pretrain.py and start the grid.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": ["-h", "--help"]})
def main(
    ctx: typer.Context,
    data: Annotated[str, typer.Option(help="pretrain.py --data (demo, a local folder).")] = "demo",
    method: Annotated[str, typer.Option(help="pretrain.py --method.")] = "fastmoco",
    recipe: Annotated[str, typer.Option(help="The recipe the sweep starts from (imagenet or small).")] = "small",
    lr: Annotated[str, typer.Option(help="Comma-separated lr values (per 256 images).")] = "0.25,0.5,1,2",
    tau: Annotated[str, typer.Option(help="Comma-separated temperatures.")] = "0.1,0.2,0.5",
    knn_every: Annotated[int, typer.Option(
        help="Epochs between kNN evaluations: make --epochs a multiple of it (the table shows the last kNN).")] = 1,
    out: Annotated[Path, typer.Option(help="One run folder per cell.")] = Path("runs/sweep"),
):
    """Run the grid, print the table."""
    lrs, taus = [float(x) for x in lr.split(",")], [float(x) for x in tau.split(",")]
    results = {}
    for lr_ in lrs:
        for tau_ in taus:
            run = out / f"lr{lr_:g}-tau{tau_:g}"
            if not (run / "ckpt.safetensors").is_file():
                cmd = [sys.executable, str(ROOT / "pretrain.py"), "--data", data, "--method", method, "--recipe",
                       recipe, "--lr", str(lr_), "--tau", str(tau_), "--knn-every", str(knn_every),
                       "--no-tensorboard", "--output-dir", str(run), *ctx.args]
                print(" ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            results[lr_, tau_] = final_knn(run)
    init = {r[0] for r in results.values()}
    print(f"{method}, --recipe {recipe}, {' '.join(ctx.args)}: kNN top-1 at the end "
          f"(at initialisation: {', '.join(f'{x:.1f}' for x in sorted(init))})\n")
    print(table(results, lrs, taus))


if __name__ == "__main__":
    app()
