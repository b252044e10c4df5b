"""Data pipeline: decoded + two-view-augmented images per second on ONE CPU core at 224 px, pretrain.py's pipeline
(data.Views: JPEG bytes -> PIL -> both views, seeded per image) vs the same augmentation in plain torchvision, and the
worker part of --augment-on device (decode, copy into the (16/7 x size)^2 canvas, draw both views' parameters).

    python -m bench.data_pipeline                          # 500x375 JPEGs (a typical ImageNet image)
    python -m bench.data_pipeline --source-size 1000x750   # large JPEGs, where PIL's draft mode can decode at 1/2 scale

The JPEGs are synthetic (smooth colour fields, shapes and sensor-like noise, quality 90: decode cost similar to a
photo); no dataset needed. A loader with W workers feeds about W x the img/s below (one core each, main process aside).
"""

import functools
import io
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torchvision.transforms as T
import typer
from PIL import Image, ImageDraw
from torchvision.transforms import v2

if not __package__:  # run as a file (python bench/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data
import gpu_augment
from bench.common import markdown
from data import MEAN, STD, Views, augmentations

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
COLUMNS = ["pipeline", "source", "img/s/core", "ms/img"]


def jpegs(n: int, w: int, h: int, seed=0) -> list:
    """n synthetic JPEG files (bytes) of w x h pixels."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        d = ImageDraw.Draw(field)
        for _ in range(8):
            x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, h // 3)
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        a = np.asarray(field, dtype=np.int16) + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Files:
    """A dataset of JPEG bytes that decodes on access, as a `datasets` Image column does."""

    def __init__(self, blobs):
        self.blobs = blobs

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        return {"image": Image.open(io.BytesIO(self.blobs[i]))}


def plain_fastmoco(size: int):
    """Fast-MoCo's augmentation (data.augmentations('fastmoco')) written with torchvision.transforms v1."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                      T.RandomApply([T.GaussianBlur(2 * round(0.05 * size) + 1, (0.1, 2.0))], p=0.5),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def with_torchvision_blur(name: str, size: int):
    """augmentations(name, size) with torchvision's k x k GaussianBlur in place of data.SeparableBlur (as before)."""
    data.SeparableBlur, fast = v2.GaussianBlur, data.SeparableBlur
    try:
        return augmentations(name, size)
    finally:
        data.SeparableBlur = fast


def rates(fns: dict, n: int, rounds: int) -> dict:
    """{name: images per second} of each fn(i) over i in range(n): passes interleaved round-robin after one untimed
    warm-up pass, best of `rounds` (the pass least disturbed by other load on the machine)."""
    best = {name: float("inf") for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for i in range(n):
                fn(i)
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: n / t for name, t in best.items()}


def two(t, img):
    return t(img), t(img)


def decode_draft(blob: bytes, size: int):
    img = Image.open(io.BytesIO(blob))
    img.draft("RGB", (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale while both sides stay >= size
    return img.convert("RGB")


@app.command()
def main(
    images: Annotated[int, typer.Option(help="Distinct JPEGs per pass.")] = 32,
    rounds: Annotated[int, typer.Option(help="Passes per pipeline (best is reported).")] = 3,
    size: Annotated[int, typer.Option(help="Crop size of the views.")] = 224,
    source_size: Annotated[str, typer.Option(help="WxH of the JPEGs.")] = "500x375",
):
    """Print a table of decode-only and decode + two-view augmentation rates on one core."""
    torch.set_num_threads(1)  # one core, as one DataLoader worker
    w, h = map(int, source_size.split("x"))
    blobs = jpegs(images, w, h)
    files, src = Files(blobs), f"{w}x{h} JPEG"
    fm_views, v3_views = Views(files, "image", augmentations("fastmoco", size), 0), Views(
        files, "image", augmentations("mocov3", size), 0)
    fm_before = Views(files, "image", with_torchvision_blur("fastmoco", size), 0)
    plain = plain_fastmoco(size)
    canvas = 16 * size // 7  # pretrain.py's --augment-on device
    on_dev = {name: Views(files, "image", gpu_augment.DeviceViews(augmentations(name, size), canvas).worker, 0)
              for name in ("fastmoco", "mocov3")}
    pipelines = {
        "decode (PIL)": lambda i: files[i]["image"].convert("RGB"),
        f"decode, PIL draft mode (sides >= {size} px)": lambda i: decode_draft(blobs[i], size),
        "data.Views, Fast-MoCo aug (pretrain.py)": lambda i: fm_views[(0, i)],
        "data.Views, MoCo v3 aug (pretrain.py)": lambda i: v3_views[(0, i)],
        "data.Views, Fast-MoCo aug, torchvision's k x k blur": lambda i: fm_before[(0, i)],
        "torchvision.transforms v1, Fast-MoCo aug": lambda i: two(plain, files[i]["image"].convert("RGB")),
        **{f"data.Views, --augment-on device worker, {label} ({canvas}^2 canvas)": functools.partial(
            lambda name, i: on_dev[name][(0, i)], name) for name, label in (("fastmoco", "Fast-MoCo"),
                                                                            ("mocov3", "MoCo v3"))},
    }
    rows = [{"pipeline": name, "source": src, "img/s/core": f"{r:.1f}", "ms/img": f"{1e3 / r:.2f}"}
            for name, r in rates(pipelines, images, rounds).items()]
    print(f"{size} px views, two views per image, 1 thread, best of {rounds} interleaved passes over {images} images\n")
    print(markdown(COLUMNS, rows))


if __name__ == "__main__":
    app()
