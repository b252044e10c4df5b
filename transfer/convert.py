"""Convert a pretrain.py checkpoint (or torchvision ResNet weights in safetensors) to detectron2's weight format.

    python -m transfer.convert runs/pretrain/ckpt.safetensors runs/pretrain/ckpt-detectron2.pkl

MoCo's convention (facebookresearch/moco, detection/): keep the online (query) backbone, rename torchvision keys to
detectron2's ResNet builder names -- layerN -> res{N+1}, bn{1,2,3} -> conv{1,2,3}.norm, downsample.0 -> shortcut,
downsample.1 -> shortcut.norm, the stem's conv1/bn1 -> stem.conv1(.norm) -- and write a pickle of
{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}, the format detectron2's
DetectionCheckpointer reads for .pkl files. fc.* and BN num_batches_tracked are dropped (detectron2 has neither).
Writing a pickle of numpy arrays is what detectron2 needs; nothing here ever reads one.
"""

import os
import pickle
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

if not __package__:  # run as a file (python transfer/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints as ck
import runs
from cli import fail

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def detectron2_name(key: str) -> str:
    """torchvision ResNet key -> detectron2 ResNet key, e.g. layer1.0.bn2.weight -> res2.0.conv2.norm.weight."""
    if not key.startswith("layer"):
        key = "stem." + key  # conv1.weight -> stem.conv1.weight, bn1.* -> stem.conv1.norm.*
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"\bbn(\d)", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(state_dict: dict) -> dict:
    """torchvision backbone state dict -> detectron2's {"model": {name: numpy}, ...} dict (not yet pickled)."""
    model = {detectron2_name(k): v.detach().float().cpu().numpy() for k, v in state_dict.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    return {"model": model, "__author__": "fastmoco", "matching_heuristics": True}


def write(output: Path, obj: dict):
    """Pickle `obj` to a temporary sibling, then rename it to `output`: never a half-written .pkl (a full disk, a
    folder that went away), and an earlier file stays until the new one is complete."""
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # open() makes it 0666 & ~umask, as any file
            pickle.dump(obj, f)
        os.replace(tmp, output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write {output}: {e.strerror or e}: choose another output path")


@app.command()
def main(
    ckpt: Annotated[Path, typer.Argument(help="pretrain.py checkpoint, or torchvision ResNet weights (safetensors).")],
    output: Annotated[Path, typer.Argument(help="detectron2 weights to write (.pkl): MODEL.WEIGHTS in the configs.")],
    arch: Annotated[Optional[str], typer.Option(
        help="torchvision ResNet. Default: the checkpoint's (which it must match), else resnet50.")] = None,
):
    """Write CKPT's backbone as detectron2 weights (MoCo's convention)."""
    if output.suffix != ".pkl":
        fail(f"{output} must end in .pkl: detectron2 reads its own weight format only from .pkl files")
    try:
        runs.writable(output)
    except OSError as e:
        fail(f"{e}: choose another output path")
    try:
        net, meta = ck.load_backbone(ckpt, arch)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if meta["small_stem"]:
        fail(f"{ckpt} has the small 3x3 stem; detectron2's ResNet stem is 7x7: convert a standard-stem checkpoint")
    obj = to_detectron2(net.state_dict())
    write(output, obj)
    print(f"wrote {output}: {meta['arch']} ({meta.get('method') or 'torchvision weights'}), {len(obj['model'])} "
          "tensors")


if __name__ == "__main__":
    app()
