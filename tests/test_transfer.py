"""transfer/: the detectron2 conversion checked key by key against detectron2's ResNet layout (written down here),
the detectron2 configs, the torchvision detection fine-tune end to end on a tiny generated dataset, and the one-line
errors of transfer/*.py and plot.py for output paths that cannot be written."""

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import checkpoints as ck
import fastmoco as fm
import plot
import transfer.convert as convert
import transfer.detect as detect
import transfer.export_timm as export
import transfer.import_weights as iw
from conftest import METHODS, ROOT, call, stage


# ----------------------------------------------------------------------------- detectron2 conversion

def detectron2_layout(depth: int) -> dict:
    """{name: shape} of detectron2's build_resnet_backbone (modeling/backbone/resnet.py) for an R-depth: a stem
    `stem.conv1` (7x7, 64) with its norm; stages res2..res5; each block has conv1..conv3 (BottleneckBlock: 1x1, 3x3,
    1x1 with 4x expansion; BasicBlock for R18/34: two 3x3) and, where the block changes the channel count, a 1x1
    `shortcut`; every conv carries a `.norm` (weight, bias, running_mean, running_var)."""
    blocks, bottleneck = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth], depth >= 50

    def conv(name, c_out, c_in, k):
        return {f"{name}.weight": (c_out, c_in, k, k),
                **{f"{name}.norm.{s}": (c_out,) for s in ("weight", "bias", "running_mean", "running_var")}}

    layout, c_in = conv("stem.conv1", 64, 3, 7), 64
    for stage_i, n in enumerate(blocks):
        width = 64 * 2 ** stage_i
        c_out = 4 * width if bottleneck else width
        for b in range(n):
            p, cin = f"res{stage_i + 2}.{b}", c_in if b == 0 else c_out
            if bottleneck:
                layout.update({**conv(f"{p}.conv1", width, cin, 1), **conv(f"{p}.conv2", width, width, 3),
                               **conv(f"{p}.conv3", c_out, width, 1)})
            else:
                layout.update({**conv(f"{p}.conv1", width, cin, 3), **conv(f"{p}.conv2", c_out, width, 3)})
            if cin != c_out:
                layout.update(conv(f"{p}.shortcut", c_out, cin, 1))
        c_in = c_out
    return layout


class NumpyOnly(pickle.Unpickler):
    """Reads back a converter output without trusting it: only numpy array reconstruction may be called."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        return super().find_class(module, name)


def read_pkl(path):
    with open(path, "rb") as f:
        return NumpyOnly(f).load()


def test_detectron2_layout_written_down_matches_known_counts():
    """Sanity of the expectation itself: R50 has 53 convs (1 + 16 blocks x 3 + 4 shortcuts), R18 20 (1 + 16 + 3)."""
    assert sum(k.endswith("weight") and not k.endswith("norm.weight") for k in detectron2_layout(50)) == 53
    assert sum(k.endswith("weight") and not k.endswith("norm.weight") for k in detectron2_layout(18)) == 20
    assert detectron2_layout(50)["res5.0.shortcut.weight"] == (2048, 1024, 1, 1)


@pytest.mark.slow
def test_torchvision_r50_converts_to_the_detectron2_layout(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(tmp_path / "r50.safetensors"))
    stage("transfer/convert.py", tmp_path / "r50.safetensors", tmp_path / "r50.pkl")
    obj = read_pkl(tmp_path / "r50.pkl")
    assert obj["__author__"] == "fastmoco" and obj["matching_heuristics"] is True and set(obj) == {
        "model", "__author__", "matching_heuristics"}
    model, layout = obj["model"], detectron2_layout(50)
    assert sorted(model) == sorted(layout)  # every key, none missing, none extra (no fc, no num_batches_tracked)
    assert all(model[k].shape == layout[k] and model[k].dtype == np.float32 for k in layout)
    for d2, tv in [("stem.conv1.weight", "conv1.weight"), ("stem.conv1.norm.running_var", "bn1.running_var"),
                   ("res2.0.shortcut.weight", "layer1.0.downsample.0.weight"),
                   ("res2.0.shortcut.norm.bias", "layer1.0.downsample.1.bias"),
                   ("res4.5.conv2.norm.running_mean", "layer3.5.bn2.running_mean"),
                   ("res5.2.conv3.weight", "layer4.2.conv3.weight")]:
        assert np.array_equal(model[d2], sd[tv].numpy()), d2


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_converts(pretrained, tmp_path, method):
    call(convert, pretrained[method], tmp_path / "d2.pkl")
    model = read_pkl(tmp_path / "d2.pkl")["model"]
    layout = detectron2_layout(18)
    assert sorted(model) == sorted(layout) and all(model[k].shape == layout[k] for k in layout)
    tensors, _ = ck.load_checkpoint(pretrained[method])
    assert np.array_equal(model["res3.0.shortcut.norm.weight"], tensors["backbone.layer2.0.downsample.1.weight"])


def test_restricted_reader_refuses_other_code(tmp_path):
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"model": Path(tmp_path)}))
    with pytest.raises(pickle.UnpicklingError, match="refused pathlib"):
        read_pkl(tmp_path / "bad.pkl")


def test_convert_refuses_small_stem_and_other_suffixes(tmp_path):
    save_file(fm.resnet("resnet18", small_stem=True).state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(SystemExit, match="small 3x3 stem; detectron2's ResNet stem is 7x7"):
        call(convert, tmp_path / "small.safetensors", tmp_path / "x.pkl", arch="resnet18")
    with pytest.raises(SystemExit, match="must end in .pkl"):
        call(convert, tmp_path / "small.safetensors", tmp_path / "x.pth", arch="resnet18")
    assert not list(tmp_path.glob("x.*"))


def test_detectron2_configs():
    """The paper's settings (REFERENCE: MoCo's detectron2 recipe) as the configs state them."""
    d = ROOT / "transfer" / "configs"
    base = yaml.safe_load((d / "Base-RCNN-C4-SyncBN.yaml").read_text())
    assert base["MODEL"]["RESNETS"] == dict(DEPTH=50, NORM="SyncBN", STRIDE_IN_1X1=False)
    assert base["INPUT"]["FORMAT"] == "RGB" and base["MODEL"]["BACKBONE"]["FREEZE_AT"] == 0
    assert base["MODEL"]["PIXEL_MEAN"] == [123.675, 116.28, 103.53] and base["MODEL"]["PIXEL_STD"] == [58.395, 57.12,
                                                                                                       57.375]
    assert base["SOLVER"]["IMS_PER_BATCH"] == 16
    voc, coco = (yaml.safe_load((d / f).read_text()) for f in ("voc_R_50_C4_24k.yaml", "coco_R_50_C4_2x.yaml"))
    assert voc["_BASE_"] == coco["_BASE_"] == "Base-RCNN-C4-SyncBN.yaml"
    assert voc["SOLVER"]["MAX_ITER"] == 24000 and voc["SOLVER"]["STEPS"] == "(18000, 22000)"
    assert voc["MODEL"] == dict(MASK_ON=False, ROI_HEADS=dict(NUM_CLASSES=20))
    assert "voc_2012_trainval" in voc["DATASETS"]["TRAIN"] and voc["DATASETS"]["TEST"] == '("voc_2007_test",)'
    assert coco["MODEL"]["MASK_ON"] is True and coco["SOLVER"]["MAX_ITER"] == 180000


# ----------------------------------------------------------------------------- torchvision detection fine-tune

def make_detection_data(root: Path, n=6, size=64, seed=0):
    """n images (the last 2 for validation) with a red square (class 'square') and a blue disc ('disc') each,
    written twice: root/voc (VOC layout, 1-based inclusive boxes) and root/coco (COCO json with polygons)."""
    rng = random.Random(seed)
    voc, cocodir = root / "voc", root / "coco"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    cats = [dict(id=1, name="square"), dict(id=2, name="disc")]
    coco = {s: dict(images=[], annotations=[], categories=cats) for s in ("train", "val")}
    for i in range(n):
        split, name = "train" if i < n - 2 else "val", f"{i:06d}"
        img = Image.new("RGB", (size, size), tuple(rng.randrange(60) for _ in range(3)))
        objs = []
        for c in (1, 2):
            w = rng.randrange(14, 24)
            x, y = rng.randrange(0, size - w), rng.randrange(0, size - w)
            draw = ImageDraw.Draw(img).rectangle if c == 1 else ImageDraw.Draw(img).ellipse
            draw([x, y, x + w - 1, y + w - 1], fill=(230, 40, 40) if c == 1 else (40, 40, 230))
            objs.append((c, x, y, w))
        img.save(voc / "JPEGImages" / f"{name}.jpg")
        (cocodir / split).mkdir(parents=True, exist_ok=True)
        img.save(cocodir / split / f"{name}.jpg")
        xml = "".join(f"<object><name>{cats[c - 1]['name']}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin>"
                      f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + w}</ymax></bndbox></object>"
                      for c, x, y, w in objs)
        (voc / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>{size}</width><height>{size}</height></size>{xml}</annotation>")
        coco[split]["images"].append(dict(id=i + 1, file_name=f"{name}.jpg", width=size, height=size))
        for c, x, y, w in objs:
            coco[split]["annotations"].append(dict(
                id=len(coco[split]["annotations"]) + 1, image_id=i + 1, category_id=c, iscrowd=0, bbox=[x, y, w, w],
                area=w * w, segmentation=[[x, y, x + w, y, x + w, y + w, x, y + w]]))
    (cocodir / "annotations").mkdir(exist_ok=True)
    for s in ("train", "val"):
        (voc / "ImageSets/Main" / f"{s}.txt").write_text("\n".join(im["file_name"][:-4] for im in coco[s]["images"]))
        (cocodir / "annotations" / f"instances_{s}.json").write_text(json.dumps(coco[s]))
    return voc, cocodir


@pytest.fixture(scope="module")
def detection_data(tmp_path_factory):
    return make_detection_data(tmp_path_factory.mktemp("detection"))


def test_voc_and_coco_sources_agree(detection_data):
    voc, coco = detection_data
    a, b = detect.read_source(f"{voc}:train"), detect.read_source(f"{coco}:train")
    assert [c["name"] for c in a["categories"]] == [c["name"] for c in b["categories"]] == ["square", "disc"]
    def boxes(d):  # (file name, class name, box) of every annotation
        files = {im["id"]: Path(im["file_name"]).name for im in d["images"]}
        cats = {c["id"]: c["name"] for c in d["categories"]}
        return sorted((files[x["image_id"]], cats[x["category_id"]], tuple(x["bbox"])) for x in d["annotations"])

    assert boxes(a) == boxes(b) and len(a["annotations"]) == 8
    merged = detect.merge([a, b])  # VOC07 + VOC12 style: ids renumbered, classes matched by name
    assert len(merged["images"]) == 8 and len({im["id"] for im in merged["images"]}) == 8
    assert [c["name"] for c in merged["categories"]] == [c["name"] for c in a["categories"]]


def test_voc_class_names_give_the_20_voc_classes(tmp_path):
    """A VOC-format set whose names are all VOC classes keeps VOC's 20 classes in their usual order (VOC07 and VOC12
    then agree); 'dog' is class 12, 'aeroplane' class 1."""
    for sub in ("Annotations", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "ImageSets/Main/test.txt").write_text("a\n")
    (tmp_path / "Annotations/a.xml").write_text(
        "<annotation><size><width>10</width><height>8</height></size><object><name>dog</name><difficult>1</difficult>"
        "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>8</ymax></bndbox></object></annotation>")
    d = detect.read_source(f"{tmp_path}:test")
    assert [c["name"] for c in d["categories"]] == list(detect.VOC_CLASSES) and len(d["categories"]) == 20
    (a,) = d["annotations"]
    assert a["category_id"] == 12 and a["bbox"] == [0, 1, 5, 7] and a["iscrowd"] == 1  # difficult: ignored


class Oracle(torch.nn.Module):
    """A 'detector' that returns given boxes per image, in dataset order (for testing the mAP wiring)."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions = list(predictions)

    def forward(self, images):
        return [self.predictions.pop(0) for _ in images]


def test_map_wiring_with_perfect_and_wrong_predictions(detection_data):
    from accelerate import Accelerator

    gt = detect.merge([detect.read_source(f"{detection_data[1]}:val")])
    ds = detect.Detection(gt, masks=True, train=False)
    targets = [ds[i][1] for i in range(len(ds))]

    def predictions(shift=0.0, relabel=False):
        out = []
        for t in targets:
            boxes = t["boxes"].clone()
            boxes[:, [0, 2]] += shift * (boxes[:, 2] - boxes[:, 0])[:, None]
            labels = 3 - t["labels"] if relabel else t["labels"]
            out.append(dict(boxes=boxes, labels=labels, scores=torch.ones(len(boxes)),
                            masks=t["masks"][:, None].float()))
        return out

    acc = Accelerator(cpu=True)
    perfect = detect.evaluate(Oracle(predictions()), ds, gt, True, acc, 2)
    assert perfect["bbox"] == pytest.approx(dict(AP=100, AP50=100, AP75=100))
    assert perfect["segm"] == pytest.approx(dict(AP=100, AP50=100, AP75=100))
    # shifted by half a width: IoU 1/3 < 0.5 -> nothing matches; swapped classes -> nothing matches
    assert detect.evaluate(Oracle(predictions(0.5)), ds, gt, False, acc, 2)["bbox"]["AP50"] == 0
    assert detect.evaluate(Oracle(predictions(relabel=True)), ds, gt, False, acc, 2)["bbox"]["AP50"] == 0
    # shifted by 1/5: IoU 2/3 -> matched at 0.5, not at 0.75
    r = detect.evaluate(Oracle(predictions(0.2)), ds, gt, False, acc, 2)["bbox"]
    assert r["AP50"] == pytest.approx(100) and r["AP75"] == 0


def test_detector_under_bf16_decodes_boxes_in_fp32():
    """bf16 covers the ResNet and FPN only: the heads get fp32 features, so boxes at 512-1100 px are not rounded to
    bf16's 4-8 px steps (under a whole-model autocast they were), and the weights keep their state_dict keys."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    acc = SimpleNamespace(autocast=lambda: torch.autocast("cpu", torch.bfloat16))  # Accelerate's bf16 autocast on CPU
    model = detect.build(torchvision.models.resnet18(), 2, False, False, 1100, 1100)
    keys = list(model.state_dict())
    detect.autocast_backbone(model, acc).eval()
    seen = []
    model.rpn.head.register_forward_pre_hook(lambda m, args: seen.append({f.dtype for f in args[0]}))
    with torch.no_grad():
        out = model([torch.rand(3, 1100, 1100)])[0]
    assert seen == [{torch.float32}] and out["boxes"].dtype == torch.float32 and list(model.state_dict()) == keys
    big = out["boxes"][out["boxes"] > 520]
    assert len(big) > 10 and (big % 4 != 0).float().mean() > 0.5  # bf16 would put every one on a 4 or 8 px step


@pytest.mark.slow
def test_faster_rcnn_on_voc_format_end_to_end(pretrained, detection_data, tmp_path):
    voc, _ = detection_data
    stage("transfer/detect.py", pretrained["fastmoco"], "--train", f"{voc}:train", "--val", f"{voc}:val", "--iters", 3,
          "--batch-size", 2, "--min-size", 64, "--max-size", 64, "--workers", 0, "--output-dir", tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["head"] == "faster_rcnn_fpn" and r["classes"][:2] == ["square", "disc"] and r["val_images"] == 2
    assert all(0 <= r["bbox"][k] <= 100 for k in ("AP", "AP50", "AP75")) and "segm" not in r
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in log)
    tensors, _ = ck.load_checkpoint(tmp_path / "model.safetensors")
    assert tensors["backbone.body.conv1.weight"].shape == (64, 3, 7, 7)  # our ResNet under torchvision's FPN


@pytest.mark.slow
def test_mask_rcnn_on_coco_format_end_to_end(pretrained, detection_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    _, coco = detection_data
    call(detect, pretrained["mocov2"], train=[f"{coco}:train"], val=[f"{coco}:val"], masks=True, iters=1,
         batch_size=2, min_size=64, max_size=64, sync_bn=False, workers=0, output_dir=tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["head"] == "mask_rcnn_fpn" and set(r["segm"]) == {"AP", "AP50", "AP75"}
    tensors, _ = ck.load_checkpoint(tmp_path / "model.safetensors")
    assert any(k.startswith("roi_heads.mask_head") for k in tensors)
    assert "backbone.body.bn1.weight" in tensors  # FrozenBatchNorm2d buffers (--no-sync-bn)


@pytest.mark.slow
def test_detect_bad_sources(pretrained, detection_data, tmp_path):
    voc, coco = detection_data
    with pytest.raises(SystemExit, match="neither .*ImageSets/Main/nope.txt"):
        call(detect, pretrained["fastmoco"], train=[f"{voc}:nope"], val=[f"{voc}:val"], output_dir=tmp_path)
    with pytest.raises(SystemExit, match="--masks needs COCO-format data"):
        call(detect, pretrained["fastmoco"], train=[f"{voc}:train"], val=[f"{voc}:val"], masks=True,
             output_dir=tmp_path)


# ----------------------------------------------------------------------------- output paths that cannot be written
# transfer/convert.py, export_timm.py, import_weights.py, detect.py and plot.py: an output under a read-only folder,
# under a regular file, or that is a folder is one line (exit 1) naming the path, before any work, leaving nothing.

OUTPUTS = {"transfer/convert.py": "d2.pkl", "transfer/export_timm.py": "hub", "transfer/import_weights.py":
           "r18.safetensors", "transfer/detect.py": "detect", "plot.py": "knn.png"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """What the scripts read: a ResNet-18 checkpoint (standard stem), the same backbone as a torch.save file, and a
    run folder whose log.jsonl has kNN rows."""
    d = tmp_path_factory.mktemp("sources")
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    ck.save_checkpoint(d / "r18.safetensors", {f"backbone.{k}": v for k, v in sd.items()}, dict(arch="resnet18"))
    torch.save({"state_dict": sd}, d / "r18.pth.tar")
    (d / "run").mkdir()
    (d / "run" / "log.jsonl").write_text("".join(json.dumps(dict(epoch=e, knn_top1=10.0 + e)) + "\n" for e in (0, 1)))
    return d


def arguments(script, src, out) -> list:
    """The command line of `script` reading `src`'s files and writing `out`."""
    return {"transfer/convert.py": [src / "r18.safetensors", out],
            "transfer/export_timm.py": [src / "r18.safetensors", out],
            "transfer/import_weights.py": [src / "r18.pth.tar", out],
            "transfer/detect.py": [src / "r18.safetensors", "--train", "nowhere:train", "--val", "nowhere:val",
                                   "--output-dir", out],
            "plot.py": [src / "run", "-o", out]}[script]


def in_process(script, src, out):
    """The same command through main() in this process: the one-line error as SystemExit."""
    ckpt = src / "r18.safetensors"
    {"transfer/convert.py": lambda: call(convert, ckpt, out, arch=None),
     "transfer/export_timm.py": lambda: call(export, ckpt, out, results=None, license=None, push_to_hub=None),
     "transfer/import_weights.py": lambda: call(iw, src / "r18.pth.tar", out, steps_per_epoch=None),
     "transfer/detect.py": lambda: call(detect, ckpt, train=["nowhere:train"], val=["nowhere:val"], output_dir=out),
     "plot.py": lambda: call(plot, [src / "run"], out=out, title="")}[script]()


@pytest.fixture
def unwritable(tmp_path, request):
    """case -> (an output path that cannot be written, what the error says, a check that nothing was left)."""
    def make(case, name):
        if case == "read-only folder":
            if os.geteuid() == 0:
                pytest.skip("root writes into read-only folders")
            ro = tmp_path / "ro"
            ro.mkdir()
            ro.chmod(0o555)
            request.addfinalizer(lambda: ro.chmod(0o755))  # so that pytest can remove it
            return ro / name, "Permission denied", lambda: list(ro.iterdir()) == []
        if case == "under a file":
            (tmp_path / "file").write_text("mine")
            return (tmp_path / "file" / name, f"{tmp_path / 'file'} is a file, not a folder",
                    lambda: (tmp_path / "file").read_text() == "mine")
        out = tmp_path / name  # a folder where a file is to go
        target = out / "model.safetensors" if name == "detect" else out
        target.mkdir(parents=True)
        return out, "it is a folder", lambda: target.is_dir() and list(target.iterdir()) == []
    return make


CASES = [(script, case) for script in OUTPUTS for case in ("read-only folder", "under a file")] + [
    (script, "a folder") for script in ("transfer/convert.py", "transfer/import_weights.py", "transfer/detect.py",
                                        "plot.py")]


def check_error(line, out, why):
    target = out / "model.safetensors" if out.name == "detect" else out
    assert line.startswith(f"error: cannot write {target}: {why}: choose another "), line


@pytest.mark.parametrize("script, case", CASES)
def test_unwritable_outputs_are_one_line_errors(sources, unwritable, script, case):
    out, why, untouched = unwritable(case, OUTPUTS[script])
    with pytest.raises(SystemExit) as e:
        in_process(script, sources, out)
    check_error(str(e.value), out, why)
    assert "\n" not in str(e.value) and untouched()


@pytest.mark.slow
@pytest.mark.parametrize("script, case", CASES)
def test_unwritable_outputs_as_a_user_runs_them(sources, unwritable, script, case):
    out, why, untouched = unwritable(case, OUTPUTS[script])
    p = stage(script, *arguments(script, sources, out), check=False)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    check_error(p.stderr.strip(), out, why)
    assert untouched()
