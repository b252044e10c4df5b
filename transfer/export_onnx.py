"""Export a checkpoint's backbone to ONNX: (N, 3, H, W) images -> (N, D) pooled features, in eval mode (BN running
statistics), with a dynamic batch axis; then check onnxruntime against PyTorch.

    python -m transfer.export_onnx runs/pretrain/ckpt.safetensors runs/onnx/r50.onnx
    python -m transfer.export_onnx resnet18-weights.safetensors r18.onnx --arch resnet18 --image-size 224

Input "images": float32 (N, 3, S, S), S the checkpoint's pretraining size (else 224; --image-size), normalised as
this project's evaluation view does (ImageNet mean / std, also in the file's metadata). Output "features": float32
(N, D), D 512 or 2048 (wider for wide_resnet*). One self-contained .onnx file (no .data sidecar: every ResNet here is
under ONNX's 2 GB limit), written under a temporary name and renamed into place, with the umask's permissions.
Before the rename, onnxruntime (CPU) runs the file on two random batches (2 and 3 images: the batch axis is really
dynamic) and its output is compared with the PyTorch backbone's; over 1e-4 x the output scale the command exits 1
and writes nothing. Needs `pip install -r requirements-onnx.txt` (onnx, onnxscript, onnxruntime).
"""

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer


if not __package__:  # run as a file (python transfer/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backbones
import checkpoints as ck
import runs
from cli import fail
from data import MEAN, STD

# Opset 18: the dynamo exporter's own opset (onnxscript's torchlib is written for it; asking for an older one runs
# ONNX's version converter over the graph afterwards, one more thing that can go wrong). A ResNet uses only Conv,
# Relu, MaxPool, Add, ReduceMean and Reshape, so newer opsets add nothing for it, and 18 runs in every current runtime
# (onnxruntime >= 1.14, TensorRT >= 8.6, OpenVINO >= 2023.0).
OPSET = 18
BATCHES = (2, 3)  # the check's batch sizes: the example batch of the export (2) and another one
TOLERANCE = 1e-4  # max abs difference allowed, relative to the output scale (the largest |feature| of PyTorch's)
INPUT, OUTPUT = "images", "features"


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def onnx_modules():
    """(onnx, onnxruntime), or a one-line error naming what is missing (onnxscript: the dynamo exporter needs it)."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        fail(f"ONNX export needs onnx, onnxscript and onnxruntime (not installed: {', '.join(missing)}): "
             "pip install -r requirements-onnx.txt")
    import onnx
    import onnxruntime
    return onnx, onnxruntime


def export(net, image_size: int, path: Path):
    """Write `net` (eval mode) to `path` as ONNX: input INPUT (N, 3, S, S), output OUTPUT (N, D), N dynamic."""
    example = torch.randn(BATCHES[0], 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    # The dynamo exporter (torch.export), deliberately, not the legacy TorchScript one: it is torch's default and
    # maintained path (the TorchScript exporter is deprecated and warns), a ResNet has no data-dependent control flow,
    # and its dynamic batch dimension exports cleanly (checked below on two batch sizes, for every architecture in
    # the tests). external_data=False: one file; with the default, the weights would go to a `path`.data sidecar
    # whose name is recorded inside the graph, which the rename into place would break.
    torch.onnx.export(net, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                      output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                      verbose=False)


def describe(onnx, path: Path, meta: dict, image_size: int):
    """Record what the graph is and how to feed it in the file's metadata_props (Netron and onnx.load show them)."""
    model = onnx.load(str(path))
    props = dict(source="fastmoco transfer/export_onnx.py", arch=meta["arch"], small_stem=str(meta["small_stem"]),
                 method=str(meta.get("method") or "torchvision weights"), image_size=str(image_size),
                 preprocessing=f"RGB in [0, 1], normalised with mean {list(MEAN)} and std {list(STD)}")
    onnx.helper.set_model_props(model, props)
    model.doc_string = f"{meta['arch']} backbone: {INPUT} (N, 3, {image_size}, {image_size}) -> {OUTPUT} (N, D)"
    onnx.save(model, str(path))


def check(ort, path: Path, net, image_size: int) -> list:
    """[(batch, max abs difference, output scale)] of onnxruntime (CPU) against PyTorch on random batches."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in BATCHES:
        x = torch.randn(n, 3, image_size, image_size, generator=g)
        with torch.no_grad():
            ref = net(x)
        out = torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])
        if out.shape != ref.shape:
            return [(n, float("inf"), ref.abs().max().item())]
        rows.append((n, (out - ref).abs().max().item(), ref.abs().max().item()))
    return rows


@app.command()
def main(
    ckpt: Annotated[Path, typer.Argument(help="pretrain.py or transfer/import_weights.py checkpoint, or torchvision "
                                              "ResNet weights (safetensors).")],
    output: Annotated[Path, typer.Argument(help="The .onnx file to write (replaced if it exists).")],
    arch: Annotated[Optional[str], typer.Option(
        help="torchvision ResNet or timm model. Default: the checkpoint's (which it must match), else resnet50.")
    ] = None,
    image_size: Annotated[Optional[int], typer.Option(
        min=1, help="Height and width of the input. Default: the checkpoint's pretraining size, else 224.")] = None,
):
    """Write CKPT's backbone as ONNX (images (N, 3, S, S) -> pooled features (N, D), dynamic N) and check it with
    onnxruntime."""
    try:
        runs.writable(output)
    except OSError as e:
        fail(f"{e}: choose another output file")
    onnx, ort = onnx_modules()
    if arch is not None and (msg := backbones.check(arch)):
        fail(msg)
    try:
        net, meta = backbones.load(ckpt, arch)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    net.eval()  # BN uses its running statistics; the graph holds them (folded into the convolutions)
    size = image_size or meta.get("image_size") or 224
    tmp = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            export(net, size, tmp)
        except Exception as e:  # the exporter's own errors (torch.export, onnxscript), e.g. a timm model it cannot trace
            if isinstance(e, OSError):
                raise
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            fail(f"torch.onnx.export failed for {meta['arch']} at {size} px ({type(e).__name__}: {first}); {output} "
                 "was not written")
        describe(onnx, tmp, meta, size)
        try:
            rows = check(ort, tmp, net, size)
        except Exception as e:  # onnxruntime refuses the graph or a batch size: an exporter bug, not the user's
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            fail(f"onnxruntime cannot run the exported {meta['arch']} ({type(e).__name__}: {first}); {output} was "
                 "not written")
        n, diff, scale = max(rows, key=lambda r: r[1] / max(r[2], 1e-12))
        if not diff <= TOLERANCE * scale:  # also catches NaN
            fail(f"onnxruntime's features differ from PyTorch's by {diff:.3g} (max abs, batch {n}), over the "
                 f"tolerance {TOLERANCE:g} x the output scale {scale:.3g}; {output} was not written")
        ck.share_as_umask_says(tmp)  # mkstemp makes it 0600, and the rename keeps that
        os.replace(tmp, output)
        tmp = None
    except OSError as e:  # a full disk, the folder went away
        fail(f"cannot write {output}: {getattr(e, 'strerror', None) or e}: choose another output file")
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    diffs = ", ".join(f"{d:.2g} at batch {b}" for b, d, _ in rows)
    print(f"wrote {output}: {meta['arch']} backbone ({meta.get('method') or 'torchvision weights'}"
          f"{', small stem' if meta['small_stem'] else ''}), ONNX opset {OPSET}, {INPUT} (N, 3, {size}, {size}) -> "
          f"{OUTPUT} (N, {net.dim}); onnxruntime vs PyTorch max abs diff {diffs} (tolerance {TOLERANCE:g} x the output "
          f"scale {max(s for _, _, s in rows):.3g})")


if __name__ == "__main__":
    app()
