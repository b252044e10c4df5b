"""transfer/import_weights.py and transfer/export_timm.py: files in each published layout are built here with the
official model code restated (facebookresearch/moco and moco-v3 builder.py, orashi/Fast-MoCo fastmoco_builder.py),
one real optimizer step and torch.save, then imported; every tensor, the features, the heads and the momentum buffers
are compared with the source modules themselves (matched by object or by value, not through the importer's rules)."""

import copy
import json
import os
import pickle
import random
import stat
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
import yaml
from PIL import Image
from safetensors.torch import load_file

import checkpoints as ck
import fastmoco as fm
import runs
import transfer.convert as convert
import transfer.export_timm as export
import transfer.import_weights as iw
from conftest import ROOT, call, stage

ONLINE = fm.OnlineEncoder


# ----------------------------------------------------------------------------- the official models, restated

def randomise_bn(model: nn.Module):
    """Non-trivial BN affine parameters and running statistics, so a tensor under the wrong name shows."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)


def v3_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):  # moco-v3 MoCo._build_mlp
    layers = []
    for i in range(num_layers):
        d1, d2 = input_dim if i == 0 else mlp_dim, output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


class ProjectionMLP(nn.Module):  # Fast-MoCo projection_MLP
    def __init__(self, d, h=2048, o=2048):
        super().__init__()
        self.linear1, self.bn1 = nn.Linear(d, h), nn.BatchNorm1d(h)
        self.linear2, self.bn2 = nn.Linear(h, h), nn.BatchNorm1d(h)
        self.linear3, self.bn3 = nn.Linear(h, o), nn.BatchNorm1d(o)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.activation(self.bn1(self.linear1(torch.flatten(x, 1))))
        return self.bn3(self.linear3(self.activation(self.bn2(self.linear2(x)))))


class PredictionMLP(nn.Module):  # Fast-MoCo prediction_MLP
    def __init__(self):
        super().__init__()
        self.linear1, self.bn1, self.layer2 = nn.Linear(2048, 512), nn.BatchNorm1d(512), nn.Linear(512, 2048)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.layer2(self.activation(self.bn1(self.linear1(x))))


def official(layout: str, arch: str, K: int = 16):
    """(model, online backbone module, [(our head name, official module)], target module) as the official code builds
    them; the target differs from the online encoder, as after training."""
    net = getattr(torchvision.models, arch)
    if layout in ("mocov1", "mocov2"):
        m = nn.Module()
        m.encoder_q, m.encoder_k = net(num_classes=128), net(num_classes=128)
        if layout == "mocov2":
            for e in (m.encoder_q, m.encoder_k):
                e.fc = nn.Sequential(nn.Linear(e.fc.weight.shape[1], e.fc.weight.shape[1]), nn.ReLU(), e.fc)
        m.register_buffer("queue", nn.functional.normalize(torch.randn(128, K), dim=0))
        m.register_buffer("queue_ptr", torch.tensor([8]))
        online, target, heads = m.encoder_q, m.encoder_k, [("projector", m.encoder_q.fc)]
    elif layout == "mocov3":
        m = nn.Module()
        m.base_encoder, m.momentum_encoder = net(num_classes=4096), net(num_classes=4096)
        hidden = m.base_encoder.fc.weight.shape[1]
        del m.base_encoder.fc, m.momentum_encoder.fc
        m.base_encoder.fc, m.momentum_encoder.fc = v3_mlp(2, hidden, 4096, 256), v3_mlp(2, hidden, 4096, 256)
        m.predictor = v3_mlp(2, 256, 4096, 256, False)
        online, target, heads = m.base_encoder, m.momentum_encoder, [("projector", m.base_encoder.fc),
                                                                      ("predictor", m.predictor)]
    else:
        tv, tv_ema = net(), net()
        m = nn.Module()
        m.backbone = nn.Sequential(*list(tv.children())[:-1])
        m.encoder = nn.Sequential(m.backbone, ProjectionMLP(tv.fc.in_features))
        m.bbone_ema = nn.Sequential(*list(tv_ema.children())[:-1])
        m.encoder_ema = nn.Sequential(m.bbone_ema, ProjectionMLP(tv.fc.in_features))
        m.predictor = PredictionMLP()
        online, target, heads = tv, m.encoder_ema, [("projector", m.encoder[1]), ("predictor", m.predictor)]
    if layout != "fastmoco":
        for p_q, p_k in zip(online.parameters(), target.parameters()):
            p_k.data.copy_(p_q.data + 0.01 * torch.randn_like(p_q))
            p_k.requires_grad = False
    randomise_bn(m)
    return m, online, heads, target


def official_file(path, layout, arch, K=16, epoch=2, last_iter=3):
    """torch.save the layout after one optimizer step with random gradients (the official optimizer construction)."""
    m, online, heads, target = official(layout, arch, K)
    if layout == "fastmoco":  # two groups by name; the EMA copies are not frozen there, they just get no gradient
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        opt = torch.optim.SGD([{"params": [p for n, p in named if "predictor" not in n]},
                               {"params": [p for n, p in named if "predictor" in n]}], lr=0.1, momentum=0.9)
        trained = [p for n, p in named if not n.startswith(("bbone_ema", "encoder_ema"))]
    else:  # MoCo v1/v2: SGD(model.parameters()); v3: LARS(model.parameters()) (state "mu", as fastmoco.LARS)
        opt = (fm.LARS if layout == "mocov3" else torch.optim.SGD)(m.parameters(), lr=0.1, momentum=0.9)
        trained = [p for p in m.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = {f"module.{k}": v for k, v in m.state_dict().items()}  # DistributedDataParallel's prefix
    if layout == "fastmoco":
        obj = {"model": sd, "optimizer": opt.state_dict(), "last_iter": last_iter}
    else:
        obj = {"epoch": epoch, "arch": arch, "state_dict": sd, "optimizer": opt.state_dict()}
    if layout == "mocov3":  # torch GradScaler.state_dict()
        obj["scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                         "_growth_tracker": 5}
    torch.save(obj, path)
    return m, online, heads, target, opt


def features(module, x):
    with torch.no_grad():
        return module.eval()(x).flatten(1)


def pooled(resnet):
    """A torchvision ResNet's pooled features (its classifier removed)."""
    r = copy.deepcopy(resnet)
    r.fc = nn.Identity()
    return r


# ----------------------------------------------------------------------------- import

@pytest.mark.parametrize("layout,arch", [("mocov1", "resnet18"), ("mocov2", "resnet50"), ("mocov3", "resnet18"),
                                         ("fastmoco", "resnet18"), ("fastmoco", "resnet50")])
def test_import_each_layout(tmp_path, layout, arch, capsys):
    torch.manual_seed(0)
    src, out = tmp_path / "official.pth.tar", tmp_path / "ours.safetensors"
    m, online, heads, target, opt = official_file(src, layout, arch)
    call(iw, src, out, steps_per_epoch=None)
    assert f"wrote {out}" in capsys.readouterr().out
    tensors, meta = ck.load_checkpoint(out)
    method = layout
    assert (meta["format"], meta["method"], meta["arch"], meta["small_stem"]) == ("fastmoco-pretrain-v1", method,
                                                                                    arch, False)
    assert meta["step"] == (3 if layout == "fastmoco" else 2 * iw.LAYOUTS[layout][4])

    # the backbone: strictly into torchvision (only fc missing), and as linear_probe.py / semisup.py load it
    tv = getattr(torchvision.models, arch)()
    missing, unexpected = tv.load_state_dict(ck.prefixed(tensors, "backbone."), strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    backbone, _ = ck.load_backbone(out)
    x = torch.randn(2, 3, 64, 64)
    src_backbone = m.backbone if layout == "fastmoco" else pooled(online)
    torch.testing.assert_close(features(backbone, x), features(src_backbone, x), rtol=0, atol=0)
    if layout == "fastmoco":  # the torchvision module the Sequential was cut from: the same names, key by key
        ref = {k: v for k, v in online.state_dict().items() if not k.startswith("fc.")}
        assert all(torch.equal(ref[k], v) for k, v in ck.prefixed(tensors, "backbone.").items()) and \
            ref.keys() == ck.prefixed(tensors, "backbone.").keys()

    # heads and the target encoder compute what the official modules compute
    projector, predictor = fm.heads(method, backbone.dim)
    ours = {"projector": projector, "predictor": predictor}
    for name, module in heads:
        ours[name].load_state_dict(ck.prefixed(tensors, f"{name}."))
        h = torch.randn(4, next(x for x in module.modules() if isinstance(x, nn.Linear)).in_features)
        torch.testing.assert_close(features(ours[name], h), features(module, h), rtol=0, atol=0)
    tgt = nn.Sequential(fm.resnet(arch), fm.heads(method, backbone.dim)[0])
    tgt.load_state_dict({k.replace("backbone.", "0.", 1).replace("projector.", "1.", 1): v
                         for k, v in ck.prefixed(tensors, "target.").items()})
    torch.testing.assert_close(features(tgt, x), features(target, x), rtol=0, atol=0)

    # resume state: runs.load_state (what pretrain.py --resume calls) into the model and optimizer pretrain.py builds;
    # each momentum buffer is the official one of the parameter with the same values
    model = ONLINE(method, arch)
    our_opt = fm.make_optimizer(model, "lars" if method == "mocov3" else "sgd", 0.1, 0.0, method == "fastmoco")
    queue = torch.zeros(16, 128) if layout in ("mocov1", "mocov2") else None
    ptr, step, _ = runs.load_state(tensors, meta, model, fm.target_encoder(model), our_opt, queue)
    assert step == meta["step"]
    buf = "mu" if method == "mocov3" else "momentum_buffer"
    checked = 0
    for p_off, state in opt.state.items():
        p = next(p for p in model.parameters() if p.shape == p_off.shape and torch.equal(p, p_off))
        torch.testing.assert_close(our_opt.state[p][buf], state[buf], rtol=0, atol=0)
        checked += 1
    assert checked == len(list(model.parameters())) == len(our_opt.state)
    if queue is not None:
        torch.testing.assert_close(queue, m.queue.T, rtol=0, atol=0)
        assert ptr == 8
    if layout == "mocov3":
        assert tensors["scaler.scale"].item() == 1024.0 and tensors["scaler._growth_tracker"].item() == 5


@pytest.mark.slow
def test_resume_continues_from_imported_files(labelled, tmp_path):
    """pretrain.py --resume accepts an imported Fast-MoCo and MoCo v1 file (queue, SGD momentum) unchanged and trains
    on from its step."""
    procs = {}
    for layout, extra in (("fastmoco", []), ("mocov1", ["--queue-size", "16"])):
        src, ckpt = tmp_path / f"{layout}.pth.tar", tmp_path / f"{layout}.safetensors"
        official_file(src, layout, "resnet18", last_iter=3, epoch=1)
        call(iw, src, ckpt, steps_per_epoch=3 if layout == "mocov1" else None)
        cmd = [sys.executable, str(ROOT / "pretrain.py"), "--data", str(labelled), "--method", layout, "--arch",
               "resnet18", "--batch-size", "8", "--epochs", "2", "--max-steps", "4", "--workers", "0",
               "--no-tensorboard", "--save-every", "0", "--resume", str(ckpt), "--output-dir", str(tmp_path / layout),
               *extra]
        procs[layout] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"})
    for layout, p in procs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"{layout}:\n{out[-2000:]}\n{err[-3000:]}"
        tensors, meta = ck.load_checkpoint(tmp_path / layout / "ckpt.safetensors")
        assert meta["step"] == 4 and meta["method"] == layout
        before, _ = ck.load_checkpoint(tmp_path / f"{layout}.safetensors")
        assert not torch.equal(tensors["backbone.conv1.weight"], before["backbone.conv1.weight"])  # it trained


class Planted:
    """Unpickling this calls fn(*args): each payload below writes MARKER."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# payload -> the global a pickle of it names (os.system is posix.system on Linux)
PLANTED = {"system": f"{os.system.__module__}.system", "Popen": "subprocess.Popen", "exec": "builtins.exec"}


def plant(path, kind, fmt, marker):
    """A MoCo-like checkpoint dict carrying a payload, as torch.save (a zip, pickle protocol 2) or pickle.dumps
    (protocol 4+: frames, STACK_GLOBAL) writes it."""
    payload = {"system": Planted(os.system, (f"echo pwned > {marker}",)),
               "Popen": Planted(subprocess.Popen, (["sh", "-c", f"echo pwned > {marker}"],)),
               "exec": Planted(exec, (f"open({str(marker)!r}, 'w').write('pwned')",))}[kind]
    obj = {"epoch": 800, "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}, "x": payload}
    if fmt == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))


def unrestricted_load(path, fmt):
    """The control: a load that trusts the file runs the payload (and waits for Popen's shell)."""
    obj = torch.load(path, weights_only=False) if fmt == "torch.save" else pickle.loads(path.read_bytes())
    if isinstance(obj["x"], subprocess.Popen):
        obj["x"].wait()


@pytest.mark.parametrize("fmt", ["torch.save", "pickle.dumps"])
@pytest.mark.parametrize("kind", list(PLANTED))
def test_planted_payloads_are_named_and_never_run(tmp_path, kind, fmt):
    """torch names os/posix globals as 'unsupported GLOBAL posix.system whose module posix is blocked', others as
    'Unsupported global: GLOBAL exec', and a plain pickle only as 'Unsupported operand 149': each is refused with
    one line naming the global it wanted to run, without torch's warnings before it."""
    evil, marker = tmp_path / "moco_v2_800ep_pretrain.pth.tar", tmp_path / "pwned"
    plant(evil, kind, fmt, marker)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        msg = error(tmp_path, evil)
    # a plain pickle also wants torch.storage._load_from_bytes for the tensor (it runs torch.load unrestricted)
    wanted = msg.split(" it wants to run ")[1].split(" when loaded ")[0].split(", ")
    assert msg.startswith(f"error: refused {evil}: it wants") and PLANTED[kind] in wanted, msg
    assert not seen and not marker.exists()
    unrestricted_load(evil, fmt)
    assert marker.read_text().strip() == "pwned"


def test_random_and_corrupt_bytes_say_why(tmp_path):
    (tmp_path / "random.pth").write_bytes(b"\xbe" + random.Random(0).randbytes(4095))
    assert "not a PyTorch checkpoint (Unsupported operand 190): pass" in error(tmp_path, tmp_path / "random.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])  # an interrupted download
    assert "cut.pth is not a PyTorch checkpoint (" in error(tmp_path, tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty.pth is empty" in error(tmp_path, tmp_path / "empty.pth")


@pytest.mark.slow
@pytest.mark.parametrize("kind, fmt", [(k, f) for k in PLANTED for f in ("torch.save", "pickle.dumps")] +
                         [("random", None)])
def test_import_refusals_are_one_line_on_stderr(tmp_path, kind, fmt):
    """As a user runs it: exit 1, exactly one line on stderr (no traceback, no UserWarning), no output, no payload."""
    evil, marker = tmp_path / "evil.pth.tar", tmp_path / "pwned"
    if kind == "random":
        evil.write_bytes(b"\xbe" + random.Random(0).randbytes(4095))
    else:
        plant(evil, kind, fmt, marker)
    p = stage("transfer/import_weights.py", evil, tmp_path / "out.safetensors", check=False)
    why = "is not a PyTorch checkpoint (Unsupported operand 190)" if kind == "random" else PLANTED[kind]
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and why in p.stderr, p.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def error(tmp_path, src, **kw):
    with pytest.raises(SystemExit) as e:
        call(iw, src, kw.pop("out", tmp_path / "out.safetensors"), steps_per_epoch=kw.pop("steps_per_epoch", None))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert not (tmp_path / "out.safetensors").exists()
    return msg


def test_unsupported_and_broken_files(tmp_path, capsys):
    """Anything that is not a published layout gets one line: the layouts that are supported, or what to do."""
    torch.save({"head.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    msg = error(tmp_path, tmp_path / "other.pth")
    assert "unsupported layout" in msg and all(r in msg for r in ("facebookresearch/moco", "moco-v3", "Fast-MoCo"))
    torch.save({"weights": {"head.weight": torch.zeros(3, 3)}}, tmp_path / "nested.pth")
    assert "holds no tensors" in error(tmp_path, tmp_path / "nested.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "not a PyTorch checkpoint (Unsupported operand 110)" in error(tmp_path, tmp_path / "text.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert "not a checkpoint dict" in error(tmp_path, tmp_path / "list.pth")
    assert "does not exist" in error(tmp_path, tmp_path / "missing.pth.tar")
    (tmp_path / "ours.safetensors").write_bytes(b"x")
    assert "read it directly" in error(tmp_path, tmp_path / "ours.safetensors")
    official_file(tmp_path / "v1.pth.tar", "mocov1", "resnet18")
    assert "must end in .safetensors" in error(tmp_path, tmp_path / "v1.pth.tar", out=tmp_path / "out.pth")
    assert "out of range" in error(tmp_path, tmp_path / "v1.pth.tar", steps_per_epoch=0)
    # MoCo v3 with a BN after the predictor (as its ViT variant has): not what fastmoco.heads("mocov3") builds
    m, *_ = official("mocov3", "resnet18")
    sd = {f"module.{k}": v for k, v in m.state_dict().items()}
    sd.update({f"module.predictor.4.{k}": v for k, v in nn.BatchNorm1d(256, affine=False).state_dict().items()})
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": sd}, tmp_path / "v3.pth.tar")
    call(iw, tmp_path / "v3.pth.tar", tmp_path / "v3.safetensors", steps_per_epoch=None)
    note = capsys.readouterr().out
    assert "predictor.4" in note and "backbone only" in note
    assert ck.load_checkpoint(tmp_path / "v3.safetensors")[1]["format"] == "fastmoco-backbone-v1"
    # tensors no layout explains
    m, *_ = official("fastmoco", "resnet18")
    torch.save({"model": {f"module.{k}": v for k, v in {**m.state_dict(), "extra.weight": torch.zeros(1)}.items()}},
               tmp_path / "extra.pth")
    assert "extra.weight" in error(tmp_path, tmp_path / "extra.pth")
    # a Fast-MoCo file whose two copies of the backbone disagree
    m, *_ = official("fastmoco", "resnet18")
    sd = {f"module.{k}": v.clone() for k, v in m.state_dict().items()}
    sd["module.encoder.0.0.weight"] += 1
    torch.save({"model": sd, "last_iter": 1}, tmp_path / "edited.pth")
    assert "not a copy of" in error(tmp_path, tmp_path / "edited.pth")


def test_partial_files_import_their_backbone(tmp_path, capsys):
    """A linear-*.pth.tar probe file and a MoCo v2 file without its momentum encoder: the backbone is written, with a
    note saying what was missing and that a resume needs the full file; linear_probe.py's loader and
    transfer/convert.py take it, pretrain.py --resume refuses it with one line."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    randomise_bn(tv)
    sd = {f"module.{k}": v for k, v in tv.state_dict().items()}  # moco main_lincls.py: DDP(resnet) with a 1000-way fc
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": sd, "best_acc1": torch.tensor(70.0),
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "linear-100ep.pth.tar")
    out = tmp_path / "linear.safetensors"
    call(iw, tmp_path / "linear-100ep.pth.tar", out, steps_per_epoch=None)
    note = capsys.readouterr().out
    assert "linear-evaluation or supervised file" in note and "1000-class" in note and "--resume" in note
    backbone, meta = ck.load_backbone(out)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(features(backbone, x), features(pooled(tv), x), rtol=0, atol=0)
    assert meta["format"] == "fastmoco-backbone-v1" and meta["arch"] == "resnet18"
    call(convert, out, tmp_path / "d2.pkl", arch=None)
    assert (tmp_path / "d2.pkl").is_file()
    point = runs.resume_point(tmp_path, out)
    with pytest.raises(ValueError, match="not a pretraining checkpoint"):
        runs.check_same_run(point, dict(method="mocov2", arch="resnet18"))

    m, online, *_ = official("mocov1", "resnet18")
    sd = {f"module.{k}": v for k, v in m.state_dict().items() if ".encoder_k." not in f".{k}"}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, tmp_path / "no-target.pth.tar")
    call(iw, tmp_path / "no-target.pth.tar", out, steps_per_epoch=None)
    note = capsys.readouterr().out
    assert "a mocov1 file without target." in note and "backbone only" in note
    backbone, meta = ck.load_backbone(out)
    torch.testing.assert_close(features(backbone, x), features(pooled(online), x), rtol=0, atol=0)
    assert meta["method"] == "mocov1"
    # the official MoCo v2 code on a ResNet-18 builds a 512-wide MLP; fastmoco.heads("mocov2") is 2048 wide
    m, online, *_ = official("mocov2", "resnet18")
    torch.save({"epoch": 200, "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}},
               tmp_path / "v2.pth")
    call(iw, tmp_path / "v2.pth", out, steps_per_epoch=None)
    note = capsys.readouterr().out
    assert "encoder_q.fc.0.weight" in note and "(512, 512)" in note and "backbone only" in note
    torch.testing.assert_close(features(ck.load_backbone(out)[0], x), features(pooled(online), x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- export

def own_checkpoint(path, arch, small_stem=False):
    """A pretrain.py-style checkpoint (backbone and metadata) of a randomly initialised backbone."""
    net = fm.resnet(arch, small_stem)
    randomise_bn(net)
    ck.save_checkpoint(path, {f"backbone.{k}": v for k, v in net.state_dict().items()},
                       dict(format="fastmoco-pretrain-v1", method="fastmoco", arch=arch, small_stem=small_stem,
                            image_size=224, args=dict(data="ILSVRC/imagenet-1k", method="fastmoco", arch=arch),
                            recipe=dict(lr=0.05, batch_size=512), step=250200, epoch=100.0))
    return net


def front_matter(readme: str) -> dict:
    _, head, body = readme.split("---\n", 2)
    return yaml.safe_load(head) | {"body": body}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_loads_strictly_in_timm(tmp_path, arch):
    torch.manual_seed(0)
    net = own_checkpoint(tmp_path / "ckpt.safetensors", arch)
    (tmp_path / "results.json").write_text(json.dumps(dict(top1=12.345, top5=40.0, epochs=90, train_images=48,
                                                           classes=8, val_split="test", arch=arch)))
    out = tmp_path / "hub"
    call(export, tmp_path / "ckpt.safetensors", out, results=[tmp_path / "results.json"], license="mit",
         push_to_hub=None)
    x = torch.randn(2, 3, 64, 64)
    ref = features(net, x)
    written = load_file(out / "model.safetensors")
    # timm's documented file override (it loads non-strictly when num_classes differs from its default cfg's, so the
    # strictness is checked here: the same names, every value equal) and the local-dir: source (strict)
    by_file = timm.create_model(arch, pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True)
    for model in (by_file, by_dir):
        sd = model.state_dict()
        assert sd.keys() == written.keys() and all(torch.equal(sd[k], v) for k, v in written.items())
        torch.testing.assert_close(features(model, x), ref, rtol=0, atol=1e-5)
    data = timm.data.resolve_data_config({}, model=by_dir)  # what a timm user builds the eval transform from
    assert by_dir.num_classes == 0 and tuple(data["input_size"]) == (3, 224, 224) and data["crop_pct"] == 0.875
    assert data["interpolation"] == "bilinear" and tuple(data["mean"]) == (0.485, 0.456, 0.406)
    assert timm.data.create_transform(**data)(Image.new("RGB", (300, 260))).shape == (3, 224, 224)

    config = json.loads((out / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["num_features"], config["global_pool"]) == (
        arch, 0, net.dim, "avg")
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224] and config["pretrained_cfg"]["crop_pct"] == 0.875
    card = front_matter((out / "README.md").read_text())
    assert card["library_name"] == "timm" and card["license"] == "mit" and card["datasets"] == ["ILSVRC/imagenet-1k"]
    assert {"timm", "fastmoco", "self-supervised-learning"} <= set(card["tags"])
    assert "Fast-MoCo" in card["body"] and "**Pretraining epochs:** 100" in card["body"] and "12.35" in card["body"]
    assert "`lr`: 0.05" in card["body"]


def test_export_key_names_are_timms_for_every_arch():
    """timm's ResNet state dict has torchvision's names and shapes (minus fc) for every architecture of fastmoco.py."""
    with torch.device("meta"):
        for arch in fm.ARCHS:
            ours = {k: v.shape for k, v in fm.resnet(arch).state_dict().items()}
            assert ours == {k: v.shape for k, v in timm.create_model(arch, num_classes=0).state_dict().items()}, arch


def test_export_refusals_and_upload(tmp_path, monkeypatch, capsys):
    own_checkpoint(tmp_path / "small.safetensors", "resnet18", small_stem=True)
    own_checkpoint(tmp_path / "ckpt.safetensors", "resnet18")
    out = tmp_path / "hub"

    def refused(ckpt="ckpt.safetensors", **kw):
        with pytest.raises(SystemExit) as e:
            call(export, tmp_path / ckpt, kw.pop("output", out), **dict(dict(results=None, license=None,
                                                                             push_to_hub=None), **kw))
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
        return str(e.value)

    assert "small stem" in refused("small.safetensors") and not out.exists()
    (tmp_path / "r50.json").write_text(json.dumps(dict(top1=1.0, arch="resnet50")))
    assert "not this resnet18" in refused(results=[tmp_path / "r50.json"]) and not out.exists()
    assert "user/name" in refused(push_to_hub="no-slash") and not out.exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "not an earlier export" in refused(output=tmp_path / "taken")

    # offline: the folder is written, the upload fails with one line that says how to upload it later
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "hf upload me/r18" in refused(push_to_hub="me/r18") and (out / "model.safetensors").is_file()
    assert front_matter((out / "README.md").read_text())["license"] == "unknown"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    calls = []

    class Api:  # stands in for huggingface_hub.HfApi: no network in tests
        def create_repo(self, repo, exist_ok):
            calls.append(("create_repo", repo, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr("huggingface_hub.HfApi", Api)
    call(export, tmp_path / "ckpt.safetensors", out, results=None, license="apache-2.0", push_to_hub="me/r18")
    assert calls == [("create_repo", "me/r18", True), ("upload_folder", "me/r18",
                                                        ["README.md", "config.json", "model.safetensors"])]
    assert "uploaded" in capsys.readouterr().out  # and the earlier export in `out` was replaced by this one
    assert front_matter((out / "README.md").read_text())["license"] == "apache-2.0"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hub")) == []  # no temporary folders left

    class Down(Api):
        def create_repo(self, repo, exist_ok):
            raise ConnectionError("[Errno -2] Name or service not known\nmore detail")

    monkeypatch.setattr("huggingface_hub.HfApi", Down)
    assert "cannot upload to me/r18 (ConnectionError" in refused(push_to_hub="me/r18")


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_are_as_readable_as_the_umask_says(tmp_path, umask, file_mode, folder_mode):
    """Checkpoints (pretrain.py's ckpt*, linear.safetensors, finetuned.safetensors and imports all go through
    fastmoco.save_checkpoint), the timm export folder and its files, the detectron2 .pkl: 0666 / 0777 & ~umask, as
    any file a program makes, not the 0600 / 0700 of their temporary files; teammates on a shared cluster read them."""
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    old = os.umask(umask)
    try:
        own_checkpoint(tmp_path / "ckpt.safetensors", "resnet18")  # ck.save_checkpoint
        own_checkpoint(tmp_path / "ckpt.safetensors", "resnet18")  # again: replacing an earlier checkpoint
        for _ in range(2):  # a new export, then one replacing it
            call(export, tmp_path / "ckpt.safetensors", tmp_path / "hub", results=None, license=None,
                 push_to_hub=None)
        call(convert, tmp_path / "ckpt.safetensors", tmp_path / "d2.pkl", arch=None)
    finally:
        os.umask(old)
    assert mode(tmp_path / "ckpt.safetensors") == mode(tmp_path / "d2.pkl") == file_mode
    assert mode(tmp_path / "hub") == folder_mode
    assert sorted((p.name, mode(p)) for p in (tmp_path / "hub").iterdir()) == [
        (name, file_mode) for name in ("README.md", "config.json", "model.safetensors")]


@pytest.mark.slow
def test_export_an_imported_file(tmp_path):
    """The two command lines: an imported MoCo file carries its source into the card (the repository, the md5, the
    weights' licence)."""
    official_file(tmp_path / "moco.pth.tar", "mocov1", "resnet18")
    p = stage("transfer/import_weights.py", tmp_path / "moco.pth.tar", tmp_path / "moco.safetensors")
    assert "mocov1 resnet18" in p.stdout and "momentum buffers" in p.stdout
    stage("transfer/export_timm.py", tmp_path / "moco.safetensors", tmp_path / "hub")
    card = front_matter((tmp_path / "hub" / "README.md").read_text())
    assert card["license"] == "cc-by-nc-4.0" and card["datasets"] == ["ILSVRC/imagenet-1k"]
    assert "facebookresearch/moco" in card["body"] and "md5" in card["body"] and "MoCo (He et al." in card["body"]
