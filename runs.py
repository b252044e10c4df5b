"""A run's output directory for the stage scripts: which checkpoint to resume from (automatic resume after a crash or
a pre-emption, past truncated or corrupt files), rotation of periodic checkpoints, and a log that matches the resumed
state. Checkpoints are written by fastmoco.save_checkpoint (atomic, checksummed)."""

import json
import sys
from pathlib import Path

from safetensors import SafetensorError, safe_open

import fastmoco as fm
from data import fail


def warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def candidates(output_dir: Path) -> list:
    """DIR's checkpoints, newest step first (the step is read from each file's header; unreadable headers last)."""
    found = []
    for p in [output_dir / "ckpt.safetensors", *sorted(output_dir.glob("ckpt-*.safetensors"))]:
        try:
            with safe_open(str(p), framework="pt") as f:
                step = json.loads((f.metadata() or {}).get("step", "-1"))
        except (SafetensorError, OSError, ValueError):
            step = -2  # still tried last, so load_checkpoint names the problem in the warning
        if p.is_file():
            found.append((step, p.name != "ckpt.safetensors", p))  # same step: the final file first
    return [p for *_, p in sorted(found, key=lambda t: (-t[0], t[1]))]


def resume_point(output_dir: Path, resume):
    """(path, tensors, metadata) to continue from, or None for a fresh run.

    --resume PATH: that file, or a one-line error. Otherwise DIR's newest checkpoint that loads and passes its
    checksum (a crash can leave a truncated or corrupt file: warn and fall back to the previous one)."""
    if resume is not None:
        try:
            return (resume, *fm.load_checkpoint(resume))
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
    for p in candidates(output_dir):
        try:
            tensors, meta = fm.load_checkpoint(p)
        except ValueError as e:
            warn(f"skipping {e}")
            continue
        print(f"resuming from {p} (step {meta.get('step')}); use another --output-dir to start a new run",
              file=sys.stderr, flush=True)
        return p, tensors, meta
    return None


def trim_log(path: Path, step: int):
    """Drop log rows after `step` (written after the checkpoint a run resumes from) and a torn last line."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    path.write_text("".join(r + "\n" for r in rows))


def rotate(output_dir: Path, keep: int):
    """Keep the newest `keep` periodic checkpoints DIR/ckpt-STEP.safetensors (0 = keep all)."""
    if keep > 0:  # (a bare [:-keep] would delete them all for keep = 0)
        for old in sorted(output_dir.glob("ckpt-*.safetensors"))[:-keep]:
            old.unlink()
