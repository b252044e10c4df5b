"""MoCo's own single-GPU CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb), written again from its
description as an independent yardstick for pretrain.py's MoCo v1/v2: nothing here imports the project's code.

    python -m bench.moco_reference --data runs/small-data/data --out runs/ref --epochs 6 --batch-size 128

The demo: ResNet-18 with its BN split in 8 groups (SplitBatchNorm, a one-GPU stand-in for shuffle-BN) and fc -> 128,
a key encoder updated by EMA (m 0.99), a random initial queue of K 4096 keys, tau 0.1, asymmetric loss, key batch
shuffled; SGD lr 0.06 per 512 images, momentum 0.9, wd 5e-4, cosine lr per epoch; views RandomResizedCrop(32,
scale 0.08-1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2; kNN monitor k 200, t 0.1 on the 512-d
backbone features, bank = the training images. --v2: MoCo v2's head (512-2048-ReLU-128) and tau 0.2 on the same loop.
--arch resnet50: the same loop on a ResNet-50 (how the fall of issue 20 was traced, docs/small-data.md). Writes
OUT/log.jsonl in pretrain.py's format (loss rows every --log-every steps, knn_top1 rows), so bench/small_data.py tables
and plots it beside pretrain.py's runs.
"""

import io
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import typer
from PIL import Image
from torchvision import transforms as T

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
NORM = T.Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])  # the demo's CIFAR-10 statistics


class SplitBatchNorm(nn.BatchNorm2d):
    """BN over `splits` groups of the batch in training (sample i in group i % splits); the running statistics are
    the groups' mean."""

    def __init__(self, num_features, splits, **kw):
        super().__init__(num_features, **kw)
        self.splits = splits

    def forward(self, x):
        N, C, H, W = x.shape
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        mean, var = self.running_mean.repeat(self.splits), self.running_var.repeat(self.splits)
        y = F.batch_norm(x.view(-1, C * self.splits, H, W), mean, var, self.weight.repeat(self.splits),
                         self.bias.repeat(self.splits), True, self.momentum, self.eps).view(N, C, H, W)
        self.running_mean.data.copy_(mean.view(self.splits, C).mean(0))
        self.running_var.data.copy_(var.view(self.splits, C).mean(0))
        return y


class Base(nn.Module):
    """torchvision's ResNet-18 with split BN; `small_stem`: the demo's 3x3 stride-1 conv1 and no max-pool."""

    def __init__(self, arch, splits, small_stem, head_v2):
        super().__init__()
        net = getattr(torchvision.models, arch)(num_classes=128, norm_layer=partial(SplitBatchNorm, splits=splits))
        if small_stem:
            net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        if head_v2:
            net.fc = nn.Sequential(nn.Linear(net.fc.in_features, 2048), nn.ReLU(), nn.Linear(2048, 128))
        self.fc, net.fc = net.fc, nn.Identity()
        self.net = net

    def forward(self, x):
        return self.fc(self.net(x))


class MoCo(nn.Module):
    def __init__(self, arch, K, m, tau, splits, small_stem, head_v2):
        super().__init__()
        self.K, self.m, self.tau = K, m, tau
        self.q, self.k = Base(arch, splits, small_stem, head_v2), Base(arch, splits, small_stem, head_v2)
        for pq, pk in zip(self.q.parameters(), self.k.parameters()):
            pk.data.copy_(pq.data)
            pk.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(128, K), dim=0))
        self.ptr = 0

    def forward(self, im_q, im_k):
        with torch.no_grad():
            for pq, pk in zip(self.q.parameters(), self.k.parameters()):
                pk.data = pk.data * self.m + pq.data * (1.0 - self.m)
        q = F.normalize(self.q(im_q), dim=1)
        with torch.no_grad():
            shuffle = torch.randperm(im_k.shape[0])
            k = F.normalize(self.k(im_k[shuffle]), dim=1)[torch.argsort(shuffle)]
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().detach()], 1) / self.tau
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        with torch.no_grad():
            self.queue[:, self.ptr:self.ptr + len(k)] = k.T
            self.ptr = (self.ptr + len(k)) % self.K
        return loss


def read_split(folder: Path, split: str):
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted(folder.glob(f"{split}-*.parquet"))).to_pydict()
    images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in rows["image"]]
    return images, torch.tensor(rows["label"])


class Pairs(torch.utils.data.Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.transform(self.images[i])


@torch.no_grad()
def knn(net, bank_x, bank_y, test_x, test_y, k=200, t=0.1, classes=10):
    net.eval()
    feats = lambda x: torch.cat([F.normalize(net(c), dim=1) for c in x.split(500)])  # noqa: E731
    bank, test = feats(bank_x), feats(test_x)
    net.train()
    w, idx = (test @ bank.T).topk(min(k, len(bank)), dim=1)
    scores = torch.zeros(len(test), classes).scatter_add_(1, bank_y[idx], (w / t).exp())
    return 100.0 * (scores.argmax(1) == test_y).float().mean().item()


@app.command()
def main(
    data: Annotated[Path, typer.Option(help="Folder of train-*.parquet and test-*.parquet (image, label).")],
    out: Annotated[Path, typer.Option(help="Writes OUT/log.jsonl.")],
    arch: Annotated[str, typer.Option(help="torchvision ResNet (the demo: resnet18).")] = "resnet18",
    epochs: int = 6, batch_size: int = 128,
    lr: Annotated[float, typer.Option(help="lr per 512 images (the demo: 0.06 at batch 512).")] = 0.06,
    weight_decay: float = 5e-4, queue_size: int = 4096, momentum: float = 0.99,
    tau: Annotated[Optional[float], typer.Option(help="Default: 0.1, with --v2 0.2.")] = None,
    bn_splits: int = 8,
    small_stem: Annotated[bool, typer.Option(help="The demo's CIFAR stem; --no-small-stem: torchvision's.")] = True,
    v2: Annotated[bool, typer.Option(help="MoCo v2's MLP head (512-2048-ReLU-128), tau 0.2.")] = False,
    knn_every: int = 2, log_every: int = 20, seed: int = 0, workers: int = 1,
):
    torch.manual_seed(seed)
    tau = tau or (0.2 if v2 else 0.1)
    train_images, train_y = read_split(data, "train")
    test_images, test_y = read_split(data, "test")
    clean = T.Compose([T.ToTensor(), NORM])
    bank_x = torch.stack([clean(im) for im in train_images])
    test_x = torch.stack([clean(im) for im in test_images])
    views = T.Compose([T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                       T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                       T.ToTensor(), NORM])
    loader = torch.utils.data.DataLoader(Pairs(train_images, views), batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    model = MoCo(arch, queue_size, momentum, tau, bn_splits, small_stem, v2)
    base_lr = lr * batch_size / 512
    optimizer = torch.optim.SGD(model.q.parameters(), lr=base_lr, momentum=0.9, weight_decay=weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    per_epoch, step, losses, t0 = len(loader), 0, [], time.perf_counter()
    with open(out / "log.jsonl", "w") as log:
        def write(**row):
            log.write(json.dumps(dict(step=step, epoch=round(step / per_epoch, 3), **row)) + "\n")
            log.flush()

        write(knn_top1=knn(model.q.net, bank_x, train_y, test_x, test_y), train_seconds=0.0)
        for epoch in range(epochs):
            for g in optimizer.param_groups:  # the demo's cosine schedule, set once per epoch
                g["lr"] = base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
            for x1, x2 in loader:
                loss = model(x1, x2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
                if step % log_every == 0:
                    write(loss=sum(losses) / len(losses), lr=optimizer.param_groups[0]["lr"],
                          train_seconds=round(time.perf_counter() - t0, 2))
                    losses = []
            if knn_every and (epoch + 1) % knn_every == 0:
                t1 = time.perf_counter()
                write(knn_top1=knn(model.q.net, bank_x, train_y, test_x, test_y),
                      train_seconds=round(t1 - t0, 2))
                t0 += time.perf_counter() - t1  # evaluation time is not training time
    (out / "done").write_text("")
    print(f"kNN top-1 in {out / 'log.jsonl'}")


if __name__ == "__main__":
    app()
