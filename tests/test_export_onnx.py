"""transfer/export_onnx.py: a checkpoint's backbone as ONNX. The written file is run with onnxruntime and compared with
a torchvision ResNet built here and loaded strictly from the checkpoint's tensors (not through fastmoco.load_backbone),
on batch sizes other than the two the command checks itself; then the one-line refusals and the file's mode. Skipped
without onnxruntime (pip install -r requirements-onnx.txt)."""

import os
import stat
import subprocess
import sys

import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import checkpoints as ck
import fastmoco as fm  # noqa: E402
import transfer.export_onnx as export  # noqa: E402
from conftest import ROOT, call, stage  # noqa: E402


def randomise_bn(model: nn.Module):
    """BN running statistics far from (0, 1) and affine parameters far from (1, 0): an export that used the batch's
    statistics (train mode) or dropped a BN gives other features."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def pretrain_checkpoint(path, arch="resnet18", small_stem=False, image_size=64, method="mocov3"):
    """A checkpoint as pretrain.py writes one (online encoder with heads, a momentum encoder that differs from it,
    metadata) -> the online backbone's state dict."""
    torch.manual_seed(0)
    online = fm.OnlineEncoder(method, arch, small_stem)
    target = fm.target_encoder(online, independent=True)  # other weights: exporting the target would show
    randomise_bn(online.backbone)
    tensors = dict(online.state_dict()) | {f"target.{k}": v for k, v in target.state_dict().items()}
    ck.save_checkpoint(path, tensors, dict(format="fastmoco-pretrain-v1", method=method, arch=arch,
                                           small_stem=small_stem, image_size=image_size, args=dict(method=method)))
    return ck.prefixed(tensors, "backbone.")


def torchvision_backbone(arch, state, small_stem=False):
    """torchvision's ResNet with the pooled features as output (fc = Identity), the CIFAR stem restated, loaded
    strictly from `state`, in eval mode."""
    net = getattr(torchvision.models, arch)()
    net.fc = nn.Identity()
    if small_stem:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.load_state_dict(state, strict=True)
    return net.eval()


def shapes(model):
    """{name: [dims]} of the graph's inputs and outputs; a dynamic dimension is its name."""
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}


def run_both(path, net, size, batches=(1, 5)):
    """onnxruntime's and torchvision's features on random (N, 3, size, size) batches of the given sizes."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in batches:
        x = torch.randn(n, 3, size, size)
        with torch.no_grad():
            ref = net(x)
        yield torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), ref


def assert_same(path, net, size):
    for got, ref in run_both(path, net, size):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("small_stem, image_size, expected_size", [(False, None, 64), (True, 40, 40)],
                         ids=["standard-stem", "small-stem"])
def test_pretrain_checkpoint(tmp_path, capsys, small_stem, image_size, expected_size):
    """The online backbone of a pretraining checkpoint, eval mode, at the checkpoint's image size (or --image-size),
    with a batch axis that takes any size."""
    state = pretrain_checkpoint(tmp_path / "ckpt.safetensors", small_stem=small_stem)
    out = tmp_path / "onnx" / "r18.onnx"  # a folder that does not exist yet
    call(export, tmp_path / "ckpt.safetensors", out, arch=None, image_size=image_size)
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and "at batch 2" in printed and "at batch 3" in printed and "opset 18" in printed

    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [export.OPSET]
    assert shapes(model) == {"images": ["batch", 3, expected_size, expected_size], "features": ["batch", 512]}
    props = {p.key: p.value for p in model.metadata_props}
    assert props["arch"] == "resnet18" and props["small_stem"] == str(small_stem) and props["method"] == "mocov3"
    assert props["image_size"] == str(expected_size)
    assert sorted(os.listdir(out.parent)) == ["r18.onnx"]  # one self-contained file, no .data, no temporary file

    net = torchvision_backbone("resnet18", state, small_stem)
    assert_same(out, net, expected_size)
    target = torchvision_backbone("resnet18", ck.prefixed(ck.load_checkpoint(tmp_path / "ckpt.safetensors")[0],
                                                          "target.backbone."), small_stem)
    got, ref = next(run_both(out, target, expected_size))  # the comparison can tell the target apart
    assert not torch.allclose(got, ref, atol=1e-3)


@pytest.mark.parametrize("arch, image_size", [("resnet18", None), ("resnext50_32x4d", 64)])
def test_torchvision_weights(tmp_path, arch, image_size):
    """Plain torchvision weights (fc included, no metadata): --arch names the model, the size defaults to 224."""
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    randomise_bn(tv)
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp_path / "tv.safetensors"))
    call(export, tmp_path / "tv.safetensors", tmp_path / "tv.onnx", arch=arch, image_size=image_size)
    size = image_size or 224
    dim = tv.fc.in_features
    assert shapes(onnx.load(str(tmp_path / "tv.onnx"))) == {"images": ["batch", 3, size, size],
                                                            "features": ["batch", dim]}
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert_same(tmp_path / "tv.onnx", torchvision_backbone(arch, state), size)


def refused(*args, **options) -> str:
    """The one line the command exits with."""
    with pytest.raises(SystemExit) as e:
        call(export, *args, **dict(dict(arch=None, image_size=None), **options))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_one_line_errors(tmp_path, monkeypatch):
    pretrain_checkpoint(tmp_path / "ckpt.safetensors")
    ckpt, out = tmp_path / "ckpt.safetensors", tmp_path / "out.onnx"
    assert "does not exist" in refused(tmp_path / "missing.safetensors", out)
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(256))
    assert "not a readable safetensors checkpoint" in refused(tmp_path / "junk.safetensors", out)
    save_file({"queue": torch.zeros(4, 2)}, str(tmp_path / "nobackbone.safetensors"))
    assert "holds no ResNet backbone" in refused(tmp_path / "nobackbone.safetensors", out)
    assert "not resnet50" in refused(ckpt, out, arch="resnet50")
    assert "unknown --arch" in refused(ckpt, out, arch="vit_b_16")
    (tmp_path / "a-file").write_text("")
    assert "is a file, not a folder" in refused(ckpt, tmp_path / "a-file" / "out.onnx")
    assert "it is a folder" in refused(ckpt, tmp_path)
    for name in ("onnxruntime", "onnxscript"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, name, None)  # import raises ImportError, as when it is not installed
            msg = refused(ckpt, out)
            assert f"not installed: {name})" in msg and "pip install -r requirements-onnx.txt" in msg
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file", "ckpt.safetensors", "junk.safetensors", "nobackbone.safetensors"]


def test_a_difference_over_the_tolerance_writes_nothing(tmp_path, monkeypatch):
    """onnxruntime's features made to differ by 1e-3 of their scale: exit 1 with one line, and the earlier export in
    OUT is kept as it was."""
    pretrain_checkpoint(tmp_path / "ckpt.safetensors")
    out = tmp_path / "out.onnx"
    call(export, tmp_path / "ckpt.safetensors", out, arch=None, image_size=None)
    before = out.read_bytes()

    class Off(ort.InferenceSession):
        def run(self, *args, **kw):
            return [y + 1e-3 * abs(y).max() for y in super().run(*args, **kw)]

    monkeypatch.setattr(ort, "InferenceSession", Off)
    msg = refused(tmp_path / "ckpt.safetensors", out)
    assert "differ from PyTorch's" in msg and "was not written" in msg
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors",
                                                                                        "out.onnx"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_file_mode_follows_the_umask(tmp_path, umask, mode):
    """0666 & ~umask, as any file a program makes, not the 0600 of the temporary file; also when replacing a file."""
    pretrain_checkpoint(tmp_path / "ckpt.safetensors", image_size=32)
    out = tmp_path / "out.onnx"
    out.write_text("an earlier file")
    os.chmod(out, 0o640)
    old = os.umask(umask)
    try:
        call(export, tmp_path / "ckpt.safetensors", out, arch=None, image_size=None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode and out.read_bytes()[:1] != b"a"


@pytest.mark.slow
def test_command_lines_on_a_pretrain_run(pretrained, tmp_path):
    """A real pretrain.py checkpoint (MoCo v3, resnet18, 32 px), both command lines: python -m transfer.export_onnx
    from the root and python transfer/export_onnx.py from another folder."""
    p = stage("transfer/export_onnx.py", pretrained["mocov3"], tmp_path / "m.onnx")
    assert p.stdout.startswith(f"wrote {tmp_path / 'm.onnx'}: resnet18 backbone (mocov3)") and not p.stderr.strip()
    f = subprocess.run([sys.executable, str(ROOT / "transfer" / "export_onnx.py"), str(pretrained["fastmoco"]),
                        "f.onnx"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert f.returncode == 0 and "max abs diff" in f.stdout, f.stderr[-3000:]
    tensors, meta = ck.load_checkpoint(pretrained["fastmoco"])
    assert meta["image_size"] == 32
    net = torchvision_backbone("resnet18", ck.prefixed(tensors, "backbone."))
    assert_same(tmp_path / "f.onnx", net, 32)


@pytest.mark.parametrize("arch, kwargs", [("vit_tiny_patch16_224", {"patch_size": 8, "img_size": 32, "depth": 2}),
                                          ("convnext_atto", {})])
def test_timm_backbone(tmp_path, arch, kwargs):
    """A timm backbone's checkpoint (a MoCo v3 ViT, a ConvNeXt): the file equals timm.create_model(arch, num_classes=0,
    **arch_kwargs) loaded strictly from the checkpoint, at any batch size."""
    timm = pytest.importorskip("timm")
    import backbones
    torch.manual_seed(0)
    net = backbones.build(arch, kwargs=kwargs)
    if arch.startswith("vit"):
        backbones.mocov3_vit(net)
    online = fm.OnlineEncoder("mocov3", backbone=net, vit=arch.startswith("vit"))
    ck.save_checkpoint(tmp_path / "ckpt.safetensors", dict(online.state_dict()),
                       dict(format="fastmoco-pretrain-v1", method="mocov3", arch=arch, arch_kwargs=kwargs,
                            small_stem=False, image_size=32))
    call(export, tmp_path / "ckpt.safetensors", tmp_path / "m.onnx", arch=None, image_size=None)
    assert shapes(onnx.load(str(tmp_path / "m.onnx")))["features"] == ["batch", net.dim]
    ref = timm.create_model(arch, num_classes=0, **kwargs)
    ref.load_state_dict(ck.prefixed(ck.load_checkpoint(tmp_path / "ckpt.safetensors")[0], "backbone."), strict=True)
    assert_same(tmp_path / "m.onnx", ref.eval(), 32)
