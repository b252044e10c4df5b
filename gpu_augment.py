"""Augmentation on the accelerator (pretrain.py --augment-on device). The DataLoader workers only decode, copy each
image into one fixed L x L uint8 canvas (scaled down only if larger) and draw every view's random parameters; the
crops, colour jitter, grayscale, Gaussian blur, solarize, flip and normalisation then run batched on the device, in
pure torch.

The parameters are drawn by the CPU pipeline's own transform objects (data.augmentations), with the same torch RNG
calls in the same order, so under a per-image seed (data.Views) a view gets exactly the crop box, jitter factors and
order, blur sigma and coin flips the CPU pipeline would have drawn: same recipe, same seeds, resumable as before. Only
rounding differs: the ops run in float instead of uint8 in between (and images larger than L, 512 px at 224, are
cropped from a scaled-down copy).

Why pure torch and not NVIDIA DALI: no extra dependency (DALI is CUDA-only, so it would leave CPU runs and the CPU
tests on another code path), and the ops are torchvision's formulas, so each is tested against
torchvision.transforms.v2.functional here on CPU (tests/test_gpu_augment.py)."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from fastmoco import to_device

# The parameter slots of each op in a view's row, in the order of its transforms:
# crop: top, left, height, width (pixels of the original image), its H, W; jitter: applied, brightness, contrast,
# saturation, hue factors (NaN: not drawn), the order of the four; blur: applied, sigma; others: applied.
WIDTH = dict(crop=6, jitter=9, gray=1, blur=2, solarize=1, flip=1, normalize=0)
# transforms drawn under a coin flip (RandomApply or torchvision's _RandomApplyTransform: `torch.rand(1) >= p` skips)
COINS = (v2.RandomApply, v2.RandomGrayscale, v2.RandomHorizontalFlip, v2.RandomSolarize)


def ops(compose) -> list:
    """[(kind, p or None, transform)] of one view's v2.Compose; p: its coin's probability (None: always applied)."""
    out = []
    for t in compose.transforms:
        p = t.p if isinstance(t, COINS) else None
        inner = t.transforms[0] if isinstance(t, v2.RandomApply) and len(t.transforms) == 1 else t
        kind = (("crop" if isinstance(inner, v2.RandomResizedCrop) else
                 "jitter" if isinstance(inner, v2.ColorJitter) else
                 "gray" if isinstance(inner, v2.RandomGrayscale) else
                 "blur" if isinstance(inner, v2.GaussianBlur) else
                 "solarize" if isinstance(inner, v2.RandomSolarize) else
                 "flip" if isinstance(inner, v2.RandomHorizontalFlip) else
                 "normalize" if isinstance(inner, v2.Normalize) else
                 None if isinstance(inner, (v2.ToImage, v2.ToDtype)) else "unknown"))
        if kind == "unknown" or (kind == "crop") != (not out):
            raise ValueError(f"--augment-on device has no batched version of {t} (the first op must be the "
                             "RandomResizedCrop): use --augment-on cpu")
        if kind:
            out.append((kind, p, inner))
    return out


# ----------------------------------------------------------------------------- the DataLoader workers' part

class Source:
    """PIL image -> ((L, L, 3) uint8 canvas with the image at its top left, (2,) the image's size there): one size, so
    a batch stacks, with no resampling for images up to L px (an image larger than L is scaled down to fit, aspect
    kept). The crop boxes, drawn in the original's pixels, are mapped onto it (resized_crop)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        f = min(1.0, self.size / max(img.size))
        if f < 1:
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BILINEAR)
        canvas = torch.zeros(self.size, self.size, 3, dtype=torch.uint8)
        canvas.numpy()[:img.height, :img.width] = np.asarray(img)
        return canvas, torch.tensor([img.height, img.width])


class Params:
    """PIL image -> (P,) float64: one view's random parameters, drawn as the view's CPU transforms draw them."""

    def __init__(self, compose):
        self.compose, self.ops = compose, ops(compose)

    def __call__(self, img):
        row, like = [], [torch.empty(1, dtype=torch.uint8).expand(1, img.height, img.width)]  # the size alone: a
        for kind, p, t in self.ops:  # PIL image in make_params costs ~1 ms in torchvision's type checks
            on = p is None or not bool(torch.rand(1) >= p)  # the coin exactly as torchvision tosses it
            if kind == "crop":
                c = t.make_params(like)
                row += [c["top"], c["left"], c["height"], c["width"], img.height, img.width]
            elif kind == "jitter":
                j = t.make_params(like) if on else {}
                row += [on] + [math.nan if j.get(f) is None else j[f] for f in
                               ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")]
                row += j["fn_idx"].tolist() if on else [0, 1, 2, 3]
            elif kind == "blur":
                row += [on, t.make_params(like)["sigma"][0] if on else 1.0]
            elif kind != "normalize":
                row.append(on)
        return torch.tensor(row, dtype=torch.float64)


# ----------------------------------------------------------------------------- the device's part, one op each

def gray(x):
    """(B, 3, H, W) -> (B, 1, H, W): ITU-R 601-2 luma, torchvision's weights."""
    return x[:, 0:1] * 0.2989 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)


def contrast(x, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)


def saturation(x, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * gray(x)).clamp(0, 1)


def hue(x, f):
    """Rotate the hue by f (B,) turns: RGB -> HSV, h + f mod 1, HSV -> RGB (torchvision's float formulas)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    d = maxc - minc
    s = d / torch.where(d == 0, 1, maxc)
    dd = torch.where(d == 0, 1, d)
    rc, gc, bc = (maxc - r) / dd, (maxc - g) / dd, (maxc - b) / dd
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(d == 0, 0, h / 6 + 1).fmod(1)
    h = (h + f.view(-1, 1, 1)).remainder(1) * 6
    i = h.floor()
    fr, i = h - i, i.long().remainder(6)
    p, q, t = ((maxc * (1 - s)).clamp(0, 1), (maxc * (1 - s * fr)).clamp(0, 1),
               (maxc * (1 - s * (1 - fr))).clamp(0, 1))
    # sector i of the hexcone -> which of (v, t, p, q) each channel takes
    table = torch.stack([torch.stack(c, 0) for c in ((maxc, t, p), (q, maxc, p), (p, maxc, t), (p, q, maxc),
                                                     (t, p, maxc), (maxc, p, q))], 0)  # (6, 3, B, H, W)
    return table.gather(0, i[None, None].expand(1, 3, *i.shape))[0].transpose(0, 1)


def solarize(x, threshold):
    return torch.where(x >= threshold, 1 - x, x)


def blur(x, sigma, k):
    """Per-image Gaussian blur, sigma (B,), k x k kernel as two 1-D passes, reflect padding (torchvision's)."""
    B, C, H, W = x.shape
    t = torch.linspace(-(k // 2), k // 2, k, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(-1, 1)) ** 2)
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k): one kernel per image, all its channels
    y = F.pad(x.reshape(1, B * C, H, W), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, k), groups=B * C)
    return F.conv2d(y, w.view(B * C, 1, k, 1), groups=B * C).view(B, C, H, W)


def _filter(d, cubic: bool):
    """torch's antialiased interpolation kernels: triangle (bilinear), Keys cubic with a = -0.5 (bicubic, as PIL)."""
    d = d.abs()
    if not cubic:
        return (1 - d).clamp(min=0)
    a = -0.5
    return torch.where(d < 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                       torch.where(d < 2, (((d - 5) * d + 8) * d - 4) * a, 0))


def resample_weights(start, length, lo, hi, out: int, n: int, cubic: bool):
    """(B, out, n) weights that resample the source pixels [lo, hi) of a box [start, start + length) (B,) onto `out`
    pixels, as F.interpolate(antialias=True) does on the cropped box (its centres, support, renormalisation)."""
    scale = (length / out)[:, None, None]  # (B, 1, 1)
    support = (4 if cubic else 2) / 2 * scale.clamp(min=1)
    centre = start[:, None, None] + scale * (torch.arange(out, device=start.device, dtype=start.dtype)[:, None] + 0.5)
    j = torch.arange(n, device=start.device, dtype=start.dtype)  # (n,)
    inside = ((j >= torch.maximum((centre - support + 0.5).floor(), lo[:, None, None])) &
              (j < torch.minimum((centre + support + 0.5).floor(), hi[:, None, None])))
    w = _filter((j + 0.5 - centre) / scale.clamp(min=1), cubic) * inside
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def resized_crop(src, box, hw, placed, size: int, cubic: bool):
    """The crops of a batch, resized to size x size: src (B, C, L, L) in [0, 1], box (B, 4) top, left, height, width
    in the pixels of originals of size hw (B, 2), which fill the top left `placed` (B, 2) pixels of the source. Two
    batched matmuls; clamped to [0, 1] as the CPU pipeline's uint8 output is."""
    L, placed = src.shape[-1], placed.to(box.dtype)
    sy, sx = placed[:, 0] / hw[:, 0], placed[:, 1] / hw[:, 1]
    top, left, h, w = box[:, 0] * sy, box[:, 1] * sx, box[:, 2] * sy, box[:, 3] * sx
    wy = resample_weights(top, h, top.floor(), torch.minimum((top + h).ceil(), placed[:, 0]), size, L, cubic)
    wx = resample_weights(left, w, left.floor(), torch.minimum((left + w).ceil(), placed[:, 1]), size, L, cubic)
    dtype = src.dtype
    return (wy.to(dtype)[:, None] @ src @ wx.to(dtype).transpose(1, 2)[:, None]).clamp(0, 1)  # (B, C, size, size)


JITTER = (brightness, contrast, saturation, hue)  # torchvision's fn_idx numbering


def jitter(x, q):
    """ColorJitter with per-image factors and order: q (B, 9) = applied, 4 factors (NaN: off), the order of the 4."""
    on, f, order = q[:, 0] > 0, q[:, 1:5], q[:, 5:9].long()
    for pos in range(4):
        for fn_id, fn in enumerate(JITTER):
            m = on & (order[:, pos] == fn_id) & ~f[:, fn_id].isnan()
            x = torch.where(m.view(-1, 1, 1, 1), fn(x, f[:, fn_id].nan_to_num(1.0).to(x.dtype)), x)
    return x


def apply(view_ops, src, placed, params):
    """One view of the batch: src (B, 3, L, L) float in [0, 1] and the images' sizes in it (B, 2) (Source), params
    (B, P) from Params -> (B, 3, size, size)."""
    x, k = None, 0
    for kind, p, t in view_ops:
        q, k = params[:, k:k + WIDTH[kind]], k + WIDTH[kind]
        on = q[:, :1].view(-1, 1, 1, 1) > 0 if q.shape[1] else None
        if kind == "crop":
            x = resized_crop(src, q[:, :4], q[:, 4:6], placed, t.size[0],
                             cubic=t.interpolation == v2.InterpolationMode.BICUBIC)
        elif kind == "jitter":
            x = jitter(x, q)
        elif kind == "gray":
            x = torch.where(on, gray(x).expand_as(x), x)
        elif kind == "blur":
            x = torch.where(on, blur(x, q[:, 1], t.kernel_size[0]), x)
        elif kind == "solarize":  # PIL inverts uint8 values >= threshold; in [0, 1]: >= threshold / 255
            x = torch.where(on, solarize(x, t.threshold / 255), x)
        elif kind == "flip":
            x = torch.where(on, x.flip(-1), x)
        else:
            mean, std = (to_device(torch.tensor(v), x.device).to(x.dtype).view(1, -1, 1, 1)
                         for v in (t.mean, t.std))
            x = (x - mean) / std
    return x


class DeviceViews:
    """pretrain.py's hook: `worker` are the DataLoader's transforms (source, then each view's parameters); calling
    the object on a batch (source, params of each view) returns the views on the device."""

    def __init__(self, transforms, source: int):
        self.view_ops = [ops(t) for t in transforms]
        self.worker = (Source(source), *(Params(t) for t in transforms))

    def __call__(self, batch, device, memory_format=torch.contiguous_format):
        (src, placed), *params = batch
        src = src.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, L, L)
        placed = placed.to(device, non_blocking=True)
        return [apply(v, src, placed, p.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
                for v, p in zip(self.view_ops, params)]
