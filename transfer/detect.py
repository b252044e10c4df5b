"""Detection / instance-segmentation fine-tuning without detectron2: torchvision's Faster R-CNN or Mask R-CNN with our
pretrained backbone (ResNet + FPN), on local VOC- or COCO-format data, evaluated with COCO-style mAP (pycocotools).

    accelerate launch -m transfer.detect runs/pretrain/ckpt.safetensors \
        --train ~/VOCdevkit/VOC2007:trainval --train ~/VOCdevkit/VOC2012:trainval --val ~/VOCdevkit/VOC2007:test
    accelerate launch -m transfer.detect ckpt.safetensors --train ~/coco:train2017 --val ~/coco:val2017 --masks \
        --iters 180000

A data source is DIR:SPLIT. VOC layout: DIR/ImageSets/Main/SPLIT.txt, DIR/Annotations/ID.xml, DIR/JPEGImages/ID.jpg.
COCO layout: DIR/annotations/instances_SPLIT.json, images in DIR/SPLIT/. torchvision has no C4 head, so this is
R50-FPN: a quick, dependency-light transfer check; the paper's Table 3 setting is the detectron2 one (README).
Writes DIR/model.safetensors, DIR/log.jsonl and DIR/results.json (AP, AP50, AP75 in percent; segm too with --masks).
"""

import json
import sys
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, List, Optional

import numpy as np
import torch
import torch.nn as nn
import typer
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision.transforms.v2 import functional as TF

if not __package__:  # run as a file (python transfer/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints as ck
import fastmoco as fm
import runs
from cli import fail
from data import MEAN, STD

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def numbers(row: dict, prefix: str = "") -> dict:
    """The numbers of a log row or the results for the trackers, nested mAPs flattened: {"bbox": {"AP": x}} ->
    {"bbox/AP": x} (names and paths stay in log.jsonl and results.json)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":  # COCOeval gives np.float64
            out[prefix + k] = v
    return out


# ----------------------------------------------------------------------------- data: everything becomes a COCO dict

def voc_to_coco(root: Path, split: str) -> dict:
    """A VOC split as a COCO-style dict; boxes from VOC's 1-based inclusive pixels to COCO [x, y, w, h]. Classes: the
    20 VOC classes in their usual order when every name is one of them, else the names in order of appearance."""
    ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    images, objects = [], []
    for i, name in enumerate(ids):
        tree = ET.parse(root / "Annotations" / f"{name}.xml").getroot()
        size = tree.find("size")
        images.append(dict(id=i, file_name=str(root / "JPEGImages" / f"{name}.jpg"),
                           width=int(size.find("width").text), height=int(size.find("height").text)))
        for obj in tree.findall("object"):
            b = [float(obj.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
            difficult = obj.find("difficult") is not None and obj.find("difficult").text.strip() == "1"
            objects.append((i, obj.find("name").text.strip(), b, difficult))
    names = list(dict.fromkeys(o[1] for o in objects))
    names = list(VOC_CLASSES) if set(names) <= set(VOC_CLASSES) else names
    # difficult objects become crowd regions: not trained on, ignored by the evaluation
    anns = [dict(id=j + 1, image_id=i, category_id=names.index(cls) + 1, iscrowd=int(difficult),
                 bbox=[b[0] - 1, b[1] - 1, b[2] - b[0] + 1, b[3] - b[1] + 1],
                 area=(b[2] - b[0] + 1) * (b[3] - b[1] + 1)) for j, (i, cls, b, difficult) in enumerate(objects)]
    return dict(images=images, annotations=anns, categories=[dict(id=j + 1, name=n) for j, n in enumerate(names)])


def read_source(source: str) -> dict:
    """DIR:SPLIT -> COCO-style dict with absolute image paths, or a one-line error."""
    root, _, split = source.rpartition(":")
    root = Path(root).expanduser()
    if not split or not root.is_dir():
        fail(f"{source} is not DIR:SPLIT with an existing DIR (e.g. ~/VOCdevkit/VOC2007:trainval, ~/coco:val2017)")
    if (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
        return voc_to_coco(root, split)
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        fail(f"{source}: neither {root}/ImageSets/Main/{split}.txt (VOC) nor {ann} (COCO) exists")
    d = json.loads(ann.read_text())
    for im in d["images"]:
        im["file_name"] = str(root / split / im["file_name"])
    return d


def merge(dicts, names=None) -> dict:
    """Concatenate COCO-style dicts (VOC07 + VOC12): fresh image / annotation ids, categories matched by name (in the
    order of `names` when given, so train and val agree)."""
    names = list(names or [])
    out = dict(images=[], annotations=[], categories=[])
    for d in dicts:
        cat_name = {c["id"]: c["name"] for c in d["categories"]}
        names += [n for n in cat_name.values() if n not in names]
        image_id = {}
        for im in d["images"]:
            image_id[im["id"]] = len(out["images"]) + 1
            out["images"].append(dict(im, id=image_id[im["id"]]))
        for a in d["annotations"]:
            out["annotations"].append(dict(a, id=len(out["annotations"]) + 1, image_id=image_id[a["image_id"]],
                                           category_id=names.index(cat_name[a["category_id"]]) + 1))
    out["categories"] = [dict(id=j + 1, name=n) for j, n in enumerate(names)]
    return out


class Detection(torch.utils.data.Dataset):
    """(image (3, H, W) in [0, 1], target) per image of a COCO-style dict; crowd / difficult boxes are not trained
    on. Training adds a random horizontal flip (detectron2's only default augmentation besides scale)."""

    def __init__(self, coco: dict, masks: bool, train: bool):
        self.images, self.masks, self.train = coco["images"], masks, train
        self.anns = {im["id"]: [] for im in self.images}
        for a in coco["annotations"]:
            self.anns[a["image_id"]].append(a)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        im = self.images[i]
        img = TF.to_dtype(TF.pil_to_tensor(Image.open(im["file_name"]).convert("RGB")), torch.float32, scale=True)
        anns = [a for a in self.anns[im["id"]] if not a.get("iscrowd") and a["bbox"][2] > 1 and a["bbox"][3] > 1]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # COCO [x, y, w, h] -> [x1, y1, x2, y2]
        t = dict(boxes=boxes, labels=torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                 image_id=im["id"])
        if self.masks:
            from pycocotools import mask as mask_util

            h, w = im["height"], im["width"]
            rles = [mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)) if isinstance(
                a["segmentation"], list) else a["segmentation"] for a in anns]
            t["masks"] = torch.as_tensor(np.stack([mask_util.decode(r) for r in rles]) if rles else
                                         np.zeros((0, h, w), np.uint8))
        if self.train and torch.rand(()) < 0.5:
            img = img.flip(-1)
            t["boxes"][:, [0, 2]] = img.shape[-1] - t["boxes"][:, [2, 0]]
            if self.masks:
                t["masks"] = t["masks"].flip(-1)
        return img, t


# ----------------------------------------------------------------------------- model and evaluation

def frozen_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d -> FrozenBatchNorm2d with the same statistics (torchvision's detection default)."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            frozen_bn(child)
    return module


def build(net, classes: int, masks: bool, sync_bn: bool, min_size: int, max_size: int):
    """Faster / Mask R-CNN (FPN) on the pretrained ResNet, all layers trainable, our input normalisation."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    net = net if sync_bn else frozen_bn(net)  # sync_bn: trainable BN, synchronised by the caller (MoCo's recipe)
    head = MaskRCNN if masks else FasterRCNN
    return head(_resnet_fpn_extractor(net, trainable_layers=5), num_classes=classes + 1, min_size=min_size,
                max_size=max_size, image_mean=list(MEAN), image_std=list(STD))


def autocast_backbone(model, acc):
    """Mixed precision for the ResNet and FPN only: their features return in fp32, so anchors, box decoding, losses
    and ROI pooling stay fp32 (under a whole-model bf16 autocast torchvision decodes boxes in the head's dtype: 4 px
    steps at 512-1023 px, 8 px above). The module and its state_dict keys are unchanged."""
    fpn, forward = model.backbone, model.backbone.forward

    def run(x):
        with acc.autocast():
            return OrderedDict((k, v.float()) for k, v in forward(x).items())

    fpn.forward = run
    return model


@torch.no_grad()
def evaluate(model, ds: Detection, gt: dict, masks: bool, acc, batch: int) -> dict:
    """COCO mAP (pycocotools) of `model` on `ds`: each process predicts its share of the images."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    mine = torch.utils.data.Subset(ds, range(acc.process_index, len(ds), acc.num_processes))
    dets = []
    for images, targets in torch.utils.data.DataLoader(mine, batch_size=batch, collate_fn=lambda b: tuple(zip(*b))):
        outputs = model([im.to(acc.device) for im in images])  # the backbone under autocast (autocast_backbone)
        for t, o in zip(targets, outputs):
            boxes = o["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # -> [x, y, w, h]
            for j in range(len(boxes)):
                d = dict(image_id=t["image_id"], category_id=int(o["labels"][j]), bbox=boxes[j].tolist(),
                         score=float(o["scores"][j]))
                if masks:
                    rle = mask_util.encode(np.asfortranarray((o["masks"][j, 0] > 0.5).cpu().numpy().astype(np.uint8)))
                    d["segmentation"] = dict(rle, counts=rle["counts"].decode())
                dets.append(d)
    model.train()
    dets = gather_object(dets) if acc.num_processes > 1 else dets
    coco = COCO()
    coco.dataset = dict(gt, info={})
    coco.createIndex()
    results = {}
    for kind in ("bbox", "segm") if masks else ("bbox",):
        if not dets:  # pycocotools cannot load an empty result list
            results[kind] = dict(AP=0.0, AP50=0.0, AP75=0.0)
            continue
        # segm: leave out the boxes, so pycocotools takes areas from the masks
        e = COCOeval(coco, coco.loadRes([{k: v for k, v in d.items() if kind == "bbox" or k != "bbox"}
                                         for d in dets]), kind)
        e.evaluate()
        e.accumulate()
        e.summarize()
        results[kind] = dict(AP=100 * e.stats[0], AP50=100 * e.stats[1], AP75=100 * e.stats[2])
    return results


RANGES = {"iters": (1,), "batch_size": (1,), "lr": (0,), "weight_decay": (0,), "warmup": (0,), "min_size": (32,),
          "max_size": (32,), "eval_every": (0,), "workers": (0,)}  # option: (low,) or (low, high)


@app.command()
def main(
    ckpt: Annotated[Path, typer.Argument(help="pretrain.py checkpoint, or torchvision ResNet weights (safetensors).")],
    train: Annotated[List[str], typer.Option(help="DIR:SPLIT (VOC or COCO layout); repeat to concatenate.")],
    val: Annotated[List[str], typer.Option(help="DIR:SPLIT to evaluate on; repeat to concatenate.")],
    masks: Annotated[bool, typer.Option(help="Mask R-CNN (needs COCO polygons / RLE) instead of Faster R-CNN.")
                     ] = False,
    iters: Annotated[int, typer.Option(help="Iterations. MoCo VOC recipe: 24000 (lr x0.1 at 75% and ~92%).")] = 24000,
    batch_size: Annotated[int, typer.Option(help="Global images per iteration. Recipe: 16.")] = 16,
    lr: Annotated[float, typer.Option(help="SGD lr at batch 16 (scaled linearly). MoCo's recipe: 0.02.")] = 0.02,
    weight_decay: Annotated[float, typer.Option(help="Recipe: 1e-4.")] = 1e-4,
    warmup: Annotated[int, typer.Option(help="Linear warmup iterations. Recipe: 100.")] = 100,
    min_size: Annotated[int, typer.Option(help="Shorter image side after resizing. Recipe: 800.")] = 800,
    max_size: Annotated[int, typer.Option(help="Longer image side cap. Recipe: 1333.")] = 1333,
    sync_bn: Annotated[bool, typer.Option(
        help="Train BN (synchronised across GPUs), as MoCo's recipe; --no-sync-bn freezes it (torchvision).")] = True,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N iterations (0 = only at the end).")] = 0,
    output_dir: Annotated[Path, typer.Option(help="model.safetensors, log.jsonl, results.json.")] = Path(
        "runs/detect"),
    seed: Annotated[int, typer.Option(help="Seeds the heads' init, data order and flips.")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader workers per process.")] = 4,
    log_with: Annotated[Optional[List[str]], typer.Option(
        help="Experiment trackers (Accelerate's names: tensorboard, wandb, mlflow, trackio, ...) that also get the "
             "config, each row of log.jsonl and the results; repeat the flag or separate with commas.")] = None,
):
    """Fine-tune Faster / Mask R-CNN on the pretrained backbone; writes DIR/results.json with COCO mAP."""
    # the trackers' config: every option, lists and paths as text
    config = {k: ",".join(v) if isinstance(v, list) else str(v) if isinstance(v, Path) else v
              for k, v in locals().items() if v is not None}
    # 1. checks before any work
    try:
        runs.check_options(locals(), RANGES)
        trackers = runs.trackers(log_with)
    except ValueError as e:
        fail(e)
    try:
        net, meta = ck.load_backbone(ckpt)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    try:
        runs.writable(output_dir / "model.safetensors")  # before the hours of training, not after
    except OSError as e:
        fail(f"{e}: choose another --output-dir")
    acc = Accelerator(log_with=trackers or None, project_dir=str(output_dir))
    if batch_size % acc.num_processes:
        fail(f"--batch-size {batch_size} is not divisible by the {acc.num_processes} processes")
    train_gt = merge([read_source(s) for s in train])
    val_gt = merge([read_source(s) for s in val], [c["name"] for c in train_gt["categories"]])
    unseen = [c["name"] for c in val_gt["categories"][len(train_gt["categories"]):]]
    if unseen:
        fail(f"--val has classes that --train lacks ({', '.join(unseen)}): the detector could not predict them")
    if masks and not all("segmentation" in a for a in train_gt["annotations"]):
        fail("--masks needs COCO-format data with a segmentation for every annotation")

    # 2. model, optimizer (SGD momentum 0.9), data
    torch.manual_seed(seed)
    model = autocast_backbone(build(net, len(train_gt["categories"]), masks, sync_bn, min_size, max_size), acc)
    if sync_bn and acc.num_processes > 1 and acc.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    base_lr = lr * batch_size / 16
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=base_lr, momentum=0.9,
                                weight_decay=weight_decay)
    loader = torch.utils.data.DataLoader(Detection(train_gt, masks, True), batch_size=batch_size // acc.num_processes,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         collate_fn=lambda b: tuple(zip(*b)))
    model, optimizer, loader = acc.prepare(model.to(acc.device), optimizer, loader)
    milestones = [round(0.75 * iters), round(22 / 24 * iters)]  # 18k / 22k of 24k

    # 3. train: warmup then x0.1 steps, per iteration
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        log = open(output_dir / "log.jsonl", "w") if acc.is_main_process else None
    except OSError as e:
        fail(f"cannot write {output_dir}: {e.strerror or e}: choose another --output-dir")
    acc.init_trackers("detect", config=config)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not acc.is_main_process)
    step, epoch, val_ds = 0, 0, Detection(val_gt, masks, False)
    with progress:
        task = progress.add_task("detection", total=iters, info="")
        while step < iters:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for images, targets in loader:
                lr_now = fm.lr_at(step, iters, base_lr, warmup, 0.001, milestones)  # detectron2: warmup from lr/1000
                fm.set_lr(optimizer, lr_now)
                losses = model(list(images), list(targets))  # the backbone under autocast (autocast_backbone)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                acc.backward(loss)
                optimizer.step()
                step += 1
                row = dict(step=step, lr=lr_now, loss=loss.item(), **{k: v.item() for k, v in losses.items()})
                if eval_every and step % eval_every == 0 and step < iters:
                    row.update(evaluate(acc.unwrap_model(model), val_ds, val_gt, masks, acc, 2))
                acc.log(numbers(row), step=step)
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                progress.update(task, completed=step, info=f"loss {row['loss']:.3f}")
                if step >= iters:
                    break
            epoch += 1

    # 4. final evaluation and results
    results = evaluate(acc.unwrap_model(model), val_ds, val_gt, masks, acc, 2)
    results.update(iters=iters, train_images=len(train_gt["images"]), val_images=len(val_gt["images"]),
                   classes=[c["name"] for c in train_gt["categories"]], arch=meta["arch"], checkpoint=str(ckpt),
                   method=meta.get("method"), head="mask_rcnn_fpn" if masks else "faster_rcnn_fpn")
    if acc.is_main_process:
        log.close()
        try:
            ck.save_checkpoint(output_dir / "model.safetensors", acc.unwrap_model(model).state_dict(),
                               dict(format="fastmoco-detect-v1", results=results))
            (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        except OSError as e:  # the folder went away or filled up during the run
            why = f"cannot write {e.filename}: {e.strerror}" if e.strerror else str(e)
            fail(f"{why}: free space or choose another --output-dir; the mAP was "
                 f"{json.dumps({k: results[k] for k in ('bbox', 'segm') if k in results})}")
    acc.log(numbers(results), step=iters)
    acc.end_training()
    acc.print(json.dumps({k: results[k] for k in ("bbox", "segm") if k in results}))


if __name__ == "__main__":
    app()
