"""Every script in bench/ and transfer/ runs both ways, `python -m bench.NAME` and `python bench/NAME.py`, from any
folder, and every typer app takes -h for --help. The lists are found, not written: a new script is covered the day it
lands."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
# A script is a file with a typer app or a __main__ block; bench/common.py and friends are imported, never run.
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for folder in ("bench", "transfer") for p in (ROOT / folder).glob("*.py")
                 if re.search(r'typer\.Typer\(|__name__ == "__main__"', p.read_text()))
# Every typer app: the stage scripts at the root and the scripts above.
APPS = sorted(p.name for p in ROOT.glob("*.py") if "typer.Typer(" in p.read_text()) + \
    [s for s in SCRIPTS if "typer.Typer(" in (ROOT / s).read_text()]


def help_of(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must find the project by itself
    return subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"})


def test_scripts_are_found():
    assert {"bench/data_pipeline.py", "bench/step_cost.py", "transfer/import_weights.py", "transfer/detect.py"} \
        <= set(SCRIPTS)
    assert "bench/common.py" not in SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_as_a_file(script, tmp_path):
    """python /abs/bench/NAME.py --help from another folder (the bootstrap uses the file's own path, so this covers
    the repository root too; the -m form is what test_short_help imports and the other tests run)."""
    p = help_of([str(ROOT / script)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Usage:" in p.stdout and "--help" in p.stdout


@pytest.mark.parametrize("script", APPS)
def test_short_help(script, capsys):
    """-h is --help for every app. Parsed only, never invoked: an app that passes unknown options through (bench/sweep.py
    hands them to pretrain.py) would otherwise start its work when it takes -h for one of them."""
    command = typer.main.get_command(importlib.import_module(script[:-3].replace("/", ".")).app)
    with pytest.raises(typer.Exit) as exit_:  # help prints, then exits 0 before main runs
        command.make_context(Path(script).name, ["-h"])
    assert exit_.value.exit_code == 0 and "Usage:" in capsys.readouterr().out
