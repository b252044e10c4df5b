"""Any timm backbone (backbones.py) and MoCo v3's ViT: unit checks against timm itself and slow loop references, and
the stage scripts end to end on a tiny ViT and a ConvNeXt (slow)."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import backbones
import checkpoints as ck
import fastmoco as fm
import pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ("vit_tiny_patch16_224", {"patch_size": 4, "img_size": 32, "depth": 2})


def test_timm_backbone_has_timms_state_dict_and_feature_size():
    for arch, kw in [("convnext_atto", {}), TINY_VIT]:
        net, ref = backbones.build(arch, kwargs=kw), timm.create_model(arch, num_classes=0, **kw)
        assert net.dim == ref.num_features
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, net.dim)


def test_torchvision_names_keep_torchvisions_layout_which_timm_loads():
    net = backbones.build("resnet18")  # torchvision's, not timm's, though timm has a resnet18 too
    assert type(net).__module__.startswith("torchvision")
    timm.create_model("resnet18", num_classes=0).load_state_dict(net.state_dict(), strict=True)


def test_one_line_errors_for_what_cannot_be_built():
    assert "unknown --arch no_such_net" in backbones.check("no_such_net")
    assert "--small-stem" in backbones.check("convnext_atto", small_stem=True)
    assert "--arch-kwargs" in backbones.check("resnet18", {"depth": 2})
    assert backbones.check("convnext_atto") is None and backbones.check("resnet50") is None
    assert backbones.parse_kwargs("patch_size=4, img_size=32,act=gelu") == {"patch_size": 4, "img_size": 32,
                                                                             "act": "gelu"}
    with pytest.raises(ValueError, match="not name=value"):
        backbones.parse_kwargs("patch_size")


def test_sincos_position_embedding_equals_the_formula_written_cell_by_cell():
    h, w, dim = 3, 5, 8
    pe = backbones.sincos_2d(h, w, dim)
    assert pe.shape == (1, 1 + h * w, dim) and (pe[0, 0] == 0).all()
    q = dim // 4
    for t in range(h * w):  # moco-v3: meshgrid over (w, h) in 'ij' order, so cell t has coordinates (t // h, t % h)
        a, b = t // h, t % h
        for i in range(q):
            om = 1.0 / 10000 ** (i / q)
            want = [math.sin(a * om), math.cos(a * om), math.sin(b * om), math.cos(b * om)]
            got = [pe[0, 1 + t, j * q + i].item() for j in range(4)]
            assert got == pytest.approx(want, abs=1e-6)


def test_mocov3_vit_freezes_the_patch_projection_and_position_embedding_and_adamw_leaves_them():
    torch.manual_seed(0)
    net = backbones.mocov3_vit(backbones.build(*TINY_VIT[:1], kwargs=TINY_VIT[1]))
    assert not net.pos_embed.requires_grad and not net.patch_embed.proj.weight.requires_grad
    assert torch.equal(net.pos_embed, backbones.sincos_2d(8, 8, 192))
    qkv = net.blocks[0].attn.qkv.weight  # (3*192, 192): each of Q, K, V Xavier-uniform on its own
    assert qkv.abs().max() <= math.sqrt(6 / (192 + 192)) and net.cls_token.abs().max() < 1e-4
    model = fm.OnlineEncoder("mocov3", backbone=net, vit=True)
    assert len([m for m in model.projector if isinstance(m, torch.nn.Linear)]) == 3  # MoCo v3's ViT projector
    opt = fm.make_optimizer(model, "adamw", 1e-3, 0.1)
    assert isinstance(opt, torch.optim.AdamW)
    frozen = [net.pos_embed.clone(), net.patch_embed.proj.weight.clone()]
    target = fm.target_encoder(model)
    loss = fm.mocov3_loss(model, target, torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), 0.2)
    loss.backward()
    opt.step()
    assert torch.equal(frozen[0], net.pos_embed) and torch.equal(frozen[1], net.patch_embed.proj.weight)
    assert not torch.equal(qkv, torch.zeros_like(qkv))


def test_fastmoco_on_a_vit_combines_the_half_size_patches_encoded_alone():
    torch.manual_seed(0)
    net = backbones.build(*TINY_VIT[:1], kwargs=TINY_VIT[1]).eval()
    model = fm.OnlineEncoder("fastmoco", backbone=net).eval()
    x = torch.randn(3, 3, 32, 32)
    f = model.features(x)  # (6*3, 192)
    with torch.no_grad():
        cells = [[net(x[i:i + 1, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16])[0] for r in range(2) for c in range(2)]
                 for i in range(3)]  # each patch through the ViT alone, its 4x4 grid of tokens
    want = torch.stack([torch.stack([(cells[i][a] + cells[i][b]) / 2 for i in range(3)])
                        for a, b in itertools.combinations(range(4), 2)]).flatten(0, 1)
    assert f.shape == (18, 192)
    torch.testing.assert_close(f, want, atol=1e-5, rtol=1e-5)


def test_a_vit_selects_mocov3s_vit_recipe_and_a_convnet_keeps_the_resnet_one():
    r = pretrain.resolve_recipe("imagenet", "mocov3", {"arch": "vit_small_patch16_224"})
    assert (r["optimizer"], r["lr"], r["weight_decay"], r["tau"], r["cosine_momentum"], r["mocov3_vit"]) == (
        "adamw", 1.5e-4, 0.1, 0.2, True, True)
    assert r["warmup_epochs"] == 30  # 40 of 300, cut to a tenth of the run as every recipe's
    assert pretrain.resolve_recipe("imagenet", "fastmoco", {"arch": "vit_small_patch16_224"})["optimizer"] == "adamw"
    assert pretrain.resolve_recipe("imagenet", "mocov3", {"arch": "convnext_atto"})["optimizer"] == "lars"
    assert pretrain.resolve_recipe("small", "mocov2", {"arch": "vit_tiny_patch16_224"})["optimizer"] == "sgd"


def run(script, *args, check=True):
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no"})
    if check and p.returncode:
        raise AssertionError(f"{script} {args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.mark.slow
@pytest.mark.parametrize("method,arch,kwargs", [("fastmoco", *TINY_VIT), ("mocov3", *TINY_VIT),
                                                ("mocov2", "convnext_atto", {})])
def test_timm_backbone_pretrains_probes_finetunes_and_loads_into_timm(parquet, tmp_path, method, arch, kwargs):
    kw = ",".join(f"{k}={v}" for k, v in kwargs.items())
    out = tmp_path / "pre"
    run("pretrain.py", "--data", parquet, "--recipe", "small", "--method", method, "--arch", arch,
        *(["--arch-kwargs", kw] if kw else []), "--image-size", "32", "--batch-size", "8", "--max-steps", "2",
        "--workers", "0", "--no-tensorboard", "--knn-every", "1", "--output-dir", out,
        *(["--queue-size", "16"] if method == "mocov2" else []))
    tensors, meta = ck.load_checkpoint(out / "ckpt.safetensors")
    assert meta["arch"] == arch and meta["arch_kwargs"] == kwargs and meta["small_stem"] is False
    net = timm.create_model(arch, num_classes=0, **kwargs)
    net.load_state_dict(ck.prefixed(tensors, "backbone."), strict=True)
    if method != "mocov2":  # MoCo v3's ViT: the frozen parts did not move in two AdamW steps
        fresh = backbones.mocov3_vit(timm.create_model(arch, num_classes=0, **kwargs))
        assert torch.equal(tensors["backbone.pos_embed"], fresh.pos_embed.detach())
    run("linear_probe.py", out / "ckpt.safetensors", "--data", parquet, "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--output-dir", tmp_path / "lin")
    assert json.loads((tmp_path / "lin" / "results.json").read_text())["arch"] == arch
    run("semisup.py", out / "ckpt.safetensors", "--data", parquet, "--epochs", "1", "--batch-size", "8",
        "--fraction", "0.5", "--workers", "0", "--output-dir", tmp_path / "semi")
    ft, ft_meta = ck.load_checkpoint(tmp_path / "semi" / "finetuned.safetensors")
    timm.create_model(arch, num_classes=10, **ft_meta["arch_kwargs"]).load_state_dict(ft, strict=True)
    run("transfer/export_timm.py", out / "ckpt.safetensors", tmp_path / "hub")
    hub = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(hub(x), net.eval()(x))
    p = run("transfer/convert.py", out / "ckpt.safetensors", tmp_path / "d2.pkl", check=False)
    assert p.returncode == 1 and "not a torchvision ResNet" in p.stderr.strip().splitlines()[-1]
