"""pyproject.toml: `pip install -e .` makes the project importable from any folder and installs the fastmoco-*
commands; it names every top-level module, so none is left out of a wheel."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_names_every_module():
    tool = pyproject()["tool"]["setuptools"]
    assert sorted(tool["py-modules"]) == sorted(p.stem for p in ROOT.glob("*.py"))
    folders = {p.parent.name for p in ROOT.glob("*/*.py")} - {"tests", ".venv"}
    assert sorted(tool["packages"]) == sorted(folders)
    for target in pyproject()["project"]["scripts"].values():  # every command points at a typer app
        module, name = target.split(":")
        assert name == "app" and (ROOT / f"{module.replace('.', '/')}.py").is_file()


def test_core_dependencies_leave_out_the_extras():
    """The core is requirements.txt less what only the tests or the trackers need."""
    project = pyproject()["project"]
    core = {d.split(">")[0].split("<")[0].split("=")[0] for d in project["dependencies"]}
    pinned = {line.split("==")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    assert core <= pinned and not core & {"pytest", "wandb", "mlflow", "trackio", "onnx"}
    assert set(project["optional-dependencies"]) >= {"trackers", "onnx", "test"}


@pytest.mark.slow
def test_editable_install_outside_the_repo(tmp_path):
    """pip install -e . into a throwaway venv that sees this venv's packages through a .pth (torch is not installed
    again), then from another folder: the modules import and a command answers -h."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([python, "-c", "import fastmoco, pretrain, transfer.detect, bench.gpu; print(fastmoco.__file__)"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert Path(p.stdout.strip()) == ROOT / "fastmoco.py"
    for command in ("fastmoco-pretrain", "fastmoco-import-weights"):
        p = subprocess.run([venv / "bin" / command, "-h"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert p.returncode == 0 and f"Usage: {command}" in p.stdout, p.stderr[-3000:]
