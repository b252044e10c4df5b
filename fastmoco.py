"""Fast-MoCo (Ci et al., ECCV 2022) and the MoCo family it builds on (v1, v2, v3), as plain functions.

Copy-pasteable: imports only torch, torchvision and the standard library. No I/O (checkpoint files: checkpoints.py),
no launch code. RECIPES holds every method's published numbers, SMALL_RECIPES the small-data ones (32-96 px
datasets), TRAITS what sets the methods apart besides their recipes.

One complete training step, in the official order (lr, EMA before the forward, loss, clip, step, enqueue), with this
module imported as `fm`; any of METHODS runs as written (a test executes this block), on a CPU in seconds:

    import torch

    method, B, total = "fastmoco", 8, 100  # B images per step (all processes), `total` steps in the run
    r = fm.RECIPES[method]
    model = fm.OnlineEncoder(method, "resnet18", small_stem=True)  # 32 px images: the CIFAR stem
    target = fm.target_encoder(model)
    base_lr = r["lr"] * B / 256  # recipe lrs are per 256 images
    optimizer = fm.make_optimizer(model, r["optimizer"], base_lr, r["weight_decay"], r["fix_predictor_lr"])
    queue, ptr = fm.make_queue(4 * B, 128), 0  # MoCo v1/v2's negatives (recipe: K = 65536); unused otherwise
    step, x1, x2 = 0, torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)  # two augmented views of B images
    fm.set_lr(optimizer, fm.lr_at(step, total, base_lr, r["warmup_epochs"] * 10, r["warmup_from"]))  # 10 steps/epoch
    fm.ema_update(target, model, fm.momentum_at(step, total, r["momentum"], r["cosine_momentum"]))
    loss, keys = fm.step_loss(method, model, target, x1, x2, r["tau"], queue, torch.Generator().manual_seed(step))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if r["clip_grad"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["clip_grad"])
    optimizer.step()
    if keys is not None:  # MoCo v1/v2: this step's keys replace the oldest negatives
        ptr = fm.enqueue(queue, ptr, keys)

With several processes, wrap `model` in DDP (it is called once per step) and move `target` yourself; pretrain.py does
this with Accelerate, plus mixed precision, data, resume and logging.
"""

import copy
import functools
import itertools
import math
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

METHODS = ("fastmoco", "mocov3", "mocov2", "mocov1")
# What sets the methods apart besides their recipe, read by every file (variants.py's three included), so no file
# re-derives it from a method's name. queue: rows of MoCo's negatives / NNCLR's support set by default (0: none) and
# key_dim their width; shuffle_bn: the key's BN over a shuffled batch (split BN on one process, MoCo v1/v2);
# zero_init_residual: torchvision's init with the last BN of each block at 0 (MoCo v3 / Fast-MoCo / BYOL; the official
# MoCo v1/v2 build the ResNet as is); ema: a momentum encoder (SimSiam and NNCLR use the online branch's own output);
# loss_scale: 2 where the original sums its two symmetric terms (MoCo v3 scales each by 2 tau, BYOL).
TRAITS = {
    "fastmoco": dict(patches=True, queue=0, key_dim=0, shuffle_bn=False, zero_init_residual=True, ema=True,
                     loss_scale=1.0),
    "mocov3": dict(patches=False, queue=0, key_dim=0, shuffle_bn=False, zero_init_residual=True, ema=True,
                   loss_scale=2.0),
    "mocov2": dict(patches=False, queue=65536, key_dim=128, shuffle_bn=True, zero_init_residual=False, ema=True,
                   loss_scale=1.0),
    "mocov1": dict(patches=False, queue=65536, key_dim=128, shuffle_bn=True, zero_init_residual=False, ema=True,
                   loss_scale=1.0),
    "byol": dict(patches=False, queue=0, key_dim=0, shuffle_bn=False, zero_init_residual=True, ema=True,
                 loss_scale=2.0),
    "simsiam": dict(patches=False, queue=0, key_dim=0, shuffle_bn=False, zero_init_residual=True, ema=False,
                    loss_scale=1.0),
    "nnclr": dict(patches=False, queue=98304, key_dim=256, shuffle_bn=False, zero_init_residual=True, ema=False,
                  loss_scale=1.0),
}
# Each method's published recipe (official code where it differs from the paper). lr is per 256 images: the lr used
# is lr * batch_size / 256. Warmup is in epochs, milestones in fractions of the run; momentum is the EMA's m.
RECIPES = {
    "fastmoco": dict(epochs=100, batch_size=512, lr=0.05, weight_decay=1e-4, optimizer="sgd", warmup_epochs=1,
                     warmup_from=0.25, momentum=0.99, cosine_momentum=False, tau=1.0, clip_grad=1.0,
                     fix_predictor_lr=True, milestones=(), aug="fastmoco", sync_bn=True),
    "mocov3": dict(epochs=100, batch_size=4096, lr=0.6, weight_decay=1e-6, optimizer="lars", warmup_epochs=10,
                   warmup_from=0.0, momentum=0.99, cosine_momentum=True, tau=1.0, clip_grad=0.0,
                   fix_predictor_lr=False, milestones=(), aug="mocov3", sync_bn=True),
    "mocov2": dict(epochs=200, batch_size=256, lr=0.03, weight_decay=1e-4, optimizer="sgd", warmup_epochs=0,
                   warmup_from=0.0, momentum=0.999, cosine_momentum=False, tau=0.2, clip_grad=0.0,
                   fix_predictor_lr=False, milestones=(), aug="mocov2", sync_bn=False),
    "mocov1": dict(epochs=200, batch_size=256, lr=0.03, weight_decay=1e-4, optimizer="sgd", warmup_epochs=0,
                   warmup_from=0.0, momentum=0.999, cosine_momentum=False, tau=0.07, clip_grad=0.0,
                   fix_predictor_lr=False, milestones=(0.6, 0.8), aug="mocov1", sync_bn=False),  # 120/160 of 200
}
# Small data (32-96 px, up to ~100k images: CIFAR-10/100, STL-10, Imagenette at low resolution), `--recipe small`.
# lightly's CIFAR-10 benchmark trains every method with one recipe: SGD lr 0.06 x B/128 (0.12 per 256), wd 5e-4,
# cosine, no warm-up, no blur, queue 4096, m 0.99, tau 0.1; solo-learn's CIFAR configs add the CIFAR stem (3x3
# stride 1, no max-pool), crops of 8-100% and MoCo v3's tau 0.2 / m 0.99 -> 1. Fast-MoCo's tau and lr are starting
# values (SimSiam's lr, MoCo v3's tau), swept on the demo and on 2 epochs of CIFAR-10 (docs/small-data.md).
# MoCo v1 follows MoCo's own CIFAR demo (lr 0.06 at batch 512). warm_queue (ours): fill the queue with real keys
# before the first update; from random vectors MoCo v2 collapsed on CIFAR-10 (docs/small-data.md). ResNet-18, as
# in all of them: MoCo v1 on a ResNet-50 at 32 px falls below its random init there, ours and the demo's alike.
SMALL = dict(arch="resnet18", epochs=200, batch_size=256, image_size=32, small_stem=True, lr=0.12, weight_decay=5e-4,
             optimizer="sgd", warmup_epochs=0, warmup_from=0.0, momentum=0.99, cosine_momentum=False, tau=0.1,
             clip_grad=0.0, fix_predictor_lr=False, milestones=(), aug="small", sync_bn=True, queue_size=4096,
             warm_queue=True)
SMALL_RECIPES = {
    "fastmoco": dict(SMALL, lr=0.5, tau=0.2, clip_grad=1.0, fix_predictor_lr=True),
    "mocov3": dict(SMALL, tau=0.2, cosine_momentum=True, aug="small-asymmetric"),
    "mocov2": dict(SMALL, sync_bn=False),
    "mocov1": dict(SMALL, lr=0.03, sync_bn=False),
}
# MoCo v3's ViT recipe (paper Sec. 4 and Table 1; facebookresearch/moco-v3 CONFIG.md, ViT-Small/Base): AdamW, lr 1.5e-4
# per 256, wd 0.1, 40 warm-up epochs of 300, batch 4096, tau 0.2, m 0.99 -> 1 (cosine), no clipping; the backbone is
# MoCo v3's ViT (mocov3_vit: fixed sin-cos position embedding, frozen random patch projection) and the projector has
# 3 layers. Fast-MoCo on a ViT is beyond the paper: the same recipe with the patches on (each patch at half the
# resolution, the position embedding interpolated to its grid); its own heads are 3/2 layers already.
VIT = dict(epochs=300, batch_size=4096, lr=1.5e-4, weight_decay=0.1, optimizer="adamw", warmup_epochs=40,
           warmup_from=0.0, momentum=0.99, cosine_momentum=True, tau=0.2, clip_grad=0.0, fix_predictor_lr=False,
           milestones=(), aug="mocov3", sync_bn=True, mocov3_vit=True)
VIT_RECIPES = {"mocov3": VIT, "fastmoco": dict(VIT, aug="fastmoco")}
# Small data on a ViT (beyond every paper here): the small recipe's data side with MoCo v3's ViT optimisation; lr
# 5e-4 per 256 and 10% warm-up, as ViTs trained from scratch on CIFAR use (a few epochs of lr 1.5e-4 move a ViT little).
SMALL_VIT = dict(SMALL, small_stem=False, optimizer="adamw", lr=5e-4, weight_decay=0.1, warmup_epochs=20, tau=0.2,
                 cosine_momentum=True, mocov3_vit=True)
SMALL_VIT_RECIPES = {"mocov3": dict(SMALL_VIT, aug="small-asymmetric"), "fastmoco": dict(SMALL_VIT, clip_grad=0.0)}
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")


# ----------------------------------------------------------------------------- model

def resnet(arch: str, small_stem: bool = False, zero_init_residual: bool = True) -> nn.Module:
    """A torchvision ResNet without its classifier: (N, 3, H, W) -> pooled features (N, D).

    fc is replaced by Identity, so the state dict has torchvision's key names minus `fc.*`.
    small_stem: 3x3 stride-1 conv1 and no max-pool, the usual CIFAR variant for 32-64 px images.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    # Fast-MoCo / MoCo v3 both build the backbone with zero_init_residual=True.
    net = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
    net.dim = net.fc.in_features  # 512 (resnet18/34) or 2048
    net.fc = nn.Identity()
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


def mlp(dims, bias=True, last_bn=False, last_bn_affine=True, bn=True) -> nn.Sequential:
    """Linear(+BN+ReLU) layers for dims[0] -> ... -> dims[-1]; the last layer has no ReLU, optionally a BN."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(b)] if bn else []
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=last_bn_affine))
    return nn.Sequential(*layers)


def heads(method: str, dim: int, vit: bool = False):
    """(projector, predictor) of each method; predictor is Identity for MoCo v1/v2. vit: MoCo v3's ViT projector
    (3 layers; moco-v3 builder.py MoCo_ViT); Fast-MoCo's is 3 layers on any backbone."""
    if method == "fastmoco":
        # SimSiam's heads (Fast-MoCo Sec. 4). The official code's last projector BN is affine; SimSiam's is not.
        return (mlp([dim, 2048, 2048, 2048], bias=True, last_bn=True, last_bn_affine=True),
                mlp([2048, 512, 2048], bias=True))
    if method == "mocov3":
        # MoCo v3: bias-free 4096/256 MLPs (the projector 2 layers on a ResNet, 3 on a ViT), last BN without affine.
        dims = [dim, 4096, 4096, 256] if vit else [dim, 4096, 256]
        return (mlp(dims, bias=False, last_bn=True, last_bn_affine=False),
                mlp([256, 4096, 256], bias=False))
    if method == "mocov2":
        return mlp([dim, 2048, 128], bn=False), nn.Identity()  # MoCo v2: 2048-ReLU-128, no BN
    if method == "mocov1":
        return nn.Linear(dim, 128), nn.Identity()
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


class OnlineEncoder(nn.Module):
    """The online encoder of every method: backbone -> (Fast-MoCo: divide, encode, combine) -> projector -> predictor.

    forward(*views) -> per view a pair (z, p): the projection z and the prediction p = predictor(z) (p is z for MoCo
    v1/v2, whose predictor is Identity), rows (R*N, d) with R = C(grid^2, k) combinations for Fast-MoCo, else 1.
    variants.Encoder subclasses it (features, make_heads), so every method and ablation shares this contract.
    backbone: any module (N, 3, H, W) -> (N, backbone.dim) instead of the torchvision ResNet `arch` (e.g. a timm
    model; a ViT must accept the half-size patches); vit: MoCo v3's ViT heads."""

    def __init__(self, method="fastmoco", arch="resnet50", small_stem=False, grid=2, k=2, backbone=None, vit=False):
        super().__init__()
        self.method, self.grid, self.k, self.vit = method, grid, k, vit
        self.patches = TRAITS[method]["patches"]  # combinatorial patches on the online branch
        self.zero_init_residual = TRAITS[method]["zero_init_residual"]
        self.backbone = resnet(arch, small_stem, self.zero_init_residual) if backbone is None else backbone
        self.projector, self.predictor = self.make_heads(self.backbone.dim)

    def make_heads(self, dim: int):
        return heads(self.method, dim, self.vit)

    def features(self, x):
        """(N, C, H, W) view -> (R*N, D) pooled backbone features of its online samples."""
        if not self.patches:
            return self.backbone(x)  # (N, D)
        # Fast-MoCo Sec. 3.2: encode the n*n patches in one batch, combine after global pooling.
        f = self.backbone(divide(x, self.grid))  # (n*n*N, D)
        return combine(f, self.grid ** 2, self.k)  # (C*N, D), C = C(n*n, k)

    def head(self, f):
        z = self.projector(f)
        return z, self.predictor(z)

    def branch(self, x):
        return self.head(self.features(x))

    def forward(self, *views):
        # Each view is its own batch (BN statistics per view), as in MoCo v3 and SimSiam.
        return tuple(self.branch(x) for x in views)


def target_encoder(model: OnlineEncoder, independent: bool = False) -> nn.Module:
    """The momentum (EMA) encoder: a frozen copy of backbone + projector (no predictor), initialised equal (MoCo v3,
    BYOL). independent: drawn afresh instead (torchvision's ResNet init, torch's head init), as the official
    Fast-MoCo code does: it builds its target as a second model."""
    target = nn.Sequential(OrderedDict(backbone=copy.deepcopy(model.backbone),
                                       projector=copy.deepcopy(model.projector)))
    if independent:
        for m in target.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        last = {torchvision.models.resnet.BasicBlock: "bn2", torchvision.models.resnet.Bottleneck: "bn3"}
        for m in target.backbone.modules():  # after the loop above, which visits a block before its BNs
            if type(m) in last and model.zero_init_residual:
                nn.init.zeros_(getattr(m, last[type(m)]).weight)
        for m in target.projector.modules():
            if isinstance(m, (nn.Linear, nn.modules.batchnorm._BatchNorm)):
                m.reset_parameters()
    target.requires_grad_(False)
    return target


def uniform_bn(*heads: nn.Module):
    """Head BN gammas ~ U(0, 1), as in the official Fast-MoCo code (it patches BatchNorm.reset_parameters with the
    default of SenseTime's internal SyncBN; its ResNet sets the backbone's gammas back to 1)."""
    for m in itertools.chain(*(h.modules() for h in heads)):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.uniform_(m.weight)


# ----------------------------------------------------------------------------- divide / combine

def divide(x: torch.Tensor, n: int) -> torch.Tensor:
    """(N, C, H, W) -> (n*n*N, C, H/n, W/n): non-overlapping grid, patch-major (row p*N + i is patch p of image i),
    patches numbered row by row. Fast-MoCo Sec. 3.2: cut after augmentation and normalisation, no resize."""
    N, C, H, W = x.shape
    h, w = H // n, W // n
    x = x.reshape(N, C, n, h, n, w).permute(2, 4, 0, 1, 3, 5)  # (n_row, n_col, N, C, h, w)
    return x.reshape(n * n * N, C, h, w)


def combinations(P: int, k: int) -> torch.Tensor:
    """(C(P, k), P) weights averaging every k-subset of P patches, subsets in lexicographic order."""
    subsets = list(itertools.combinations(range(P), k))
    w = torch.zeros(len(subsets), P)
    for c, s in enumerate(subsets):
        w[c, list(s)] = 1.0 / k
    return w


def combine(f: torch.Tensor, P: int, k: int) -> torch.Tensor:
    """(P*N, D) patch-major embeddings -> (C*N, D), C = C(P, k): the mean of every k-subset of each image's P
    patch embeddings, combination-major. One matmul, no Python loop over subsets."""
    D = f.shape[-1]
    w = combination_weights(P, k, f.device, f.dtype)  # (C, P)
    return (w @ f.reshape(P, -1)).reshape(-1, D)  # (C, N*D) -> (C*N, D)


@functools.cache
def combination_weights(P: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """combinations(P, k) on `device` in `dtype`, built once: a fresh CPU -> GPU copy every step would be a
    host-device sync (a pageable copy waits for the stream). Read-only: shared by every call."""
    with torch.inference_mode(False):  # a first call under inference_mode must not cache an inference tensor
        return combinations(P, k).to(device, dtype)


# ----------------------------------------------------------------------------- losses

def infonce(q: torch.Tensor, k: torch.Tensor, tau: float = 1.0, offset: int = 0, two_tau: bool = False):
    """In-batch InfoNCE, no communication. q: (N, d) or (R, N, d) local queries (R groups of the same N images,
    e.g. Fast-MoCo's C combinations); k: (M, d) keys gathered from all processes, no grad. The positive of query
    (r, i) is key offset + i, with offset = rank * N. Returns the mean over all R*N rows.
    two_tau multiplies by 2*tau (MoCo v3's loss); Fast-MoCo's official loss has no such factor."""
    q = q.reshape(-1, *q.shape[-2:]) if q.dim() == 3 else q[None]  # (R, N, d)
    R, N, _ = q.shape
    q, k = F.normalize(q.reshape(R * N, -1).float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.T / tau  # (R*N, M)
    labels = (offset + torch.arange(N, device=q.device)).repeat(R)  # row r*N + i -> key offset + i
    loss = F.cross_entropy(logits, labels)
    return loss * 2 * tau if two_tau else loss


def queue_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float):
    """MoCo v1/v2: cross-entropy over [l_pos, l_neg(queue)] / tau with label 0. q, k: (N, d); queue: (K, d)."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    l_pos = (q * k).sum(1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.T  # (N, K)
    logits = torch.cat([l_pos, l_neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


# ----------------------------------------------------------------------------- distributed helpers

def world():
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all processes along dim 0, in rank order (no gradient: used for keys only)."""
    _, ws = world()
    if ws == 1:
        return x
    x = x.contiguous()  # the outputs in the input's layout (a channels_last x would give channels_last outputs)
    out = [torch.empty_like(x) for _ in range(ws)]
    dist.all_gather(out, x)
    return torch.cat(out)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor (a permutation, indices, weights) onto `device`; on CUDA through pinned memory and
    asynchronously, so the host does not wait for the queued GPU work (a pageable copy does)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def shuffle_bn_forward(encoder: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MoCo Sec. 3.3 shuffle-BN: run the key encoder on a random permutation of the global batch, so the BN
    statistics of a process's keys come from other images than its queries; return the local keys in the
    original order. generator must give the same permutation on every process (seed it with the step)."""
    rank, ws = world()
    b = x.shape[0]
    if ws == 1:  # one process: the shuffle matters with SplitBatchNorm (MoCo's single-GPU stand-in), not otherwise
        perm = to_device(torch.randperm(b, generator=generator), x.device)
        return encoder(x[perm]).float()[torch.argsort(perm)]
    perm = to_device(torch.randperm(b * ws, generator=generator), x.device)
    k = gather(encoder(gather(x)[perm[rank * b:(rank + 1) * b]]).float())  # (ws*b, d), shuffled order
    return k[torch.argsort(perm)][rank * b:(rank + 1) * b]


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch norm of x (N, C, *) with the statistics of the global batch of all processes: one all_reduce of
    (sum, sum of squares, count) forward and one of (sum dy, sum dy * xhat) backward, as torch's SyncBatchNorm does."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims, C = [0, *range(2, x.dim())], x.shape[1]
        shape = [1, C] + [1] * (x.dim() - 2)
        xf = x.float()
        s = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([xf.numel() / C])])  # (2C + 1,)
        dist.all_reduce(s)
        n = s[-1]
        mean = s[:C] / n
        var = (s[C:2 * C] / n - mean * mean).clamp_min(0)  # biased: what normalises the batch
        invstd = (var + eps).rsqrt()
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, n)
        ctx.mark_non_differentiable(mean, var)
        y = xhat * weight.view(shape) + bias.view(shape) if weight is not None else xhat
        return y.to(x.dtype), mean, var * n / (n - 1).clamp_min(1)  # running_var is unbiased

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        xhat, weight, invstd, n = ctx.saved_tensors
        dims, C = [0, *range(2, xhat.dim())], xhat.shape[1]
        shape = [1, C] + [1] * (xhat.dim() - 2)
        dyf = dy.float()
        sums = torch.cat([dyf.sum(dims), (dyf * xhat).sum(dims)])  # local (C,) + (C,): the affine grads
        g = sums.clone()
        dist.all_reduce(g)
        w = weight.view(shape).float() if weight is not None else 1.0
        dx = w * invstd.view(shape) * (dyf - (g[:C] / n).view(shape) - xhat * (g[C:] / n).view(shape))
        if weight is None:
            return dx.to(dy.dtype), None, None, None
        return dx.to(dy.dtype), sums[C:].to(weight.dtype), sums[:C].to(weight.dtype), None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all processes on any device, CPU (gloo) included -- torch's
    nn.SyncBatchNorm runs on GPUs only. Same parameters and buffers as BatchNorm1d/2d; plain BN on one process."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not (self.training and world()[1] > 1):
            return super().forward(x)
        y, mean, var = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked += 1
        return y


def channels_last(x: torch.Tensor) -> bool:
    """x is stored channels_last (and not also contiguous, as 1x1 maps and single channels are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class SplitBatchNorm(nn.BatchNorm2d):
    """MoCo's one-GPU stand-in for shuffle-BN (its official CIFAR-10 demo: 8 splits): in training, the batch is
    normalised as `splits` groups (samples i, i + splits, ...) with their own statistics, as if spread over that many
    GPUs, so with the key batch shuffled (shuffle_bn_forward) a query and its key never share BN statistics. Running
    statistics: the mean over the groups. Same parameters and buffers as BatchNorm2d (checkpoints load into
    torchvision)."""

    def __init__(self, num_features, splits=8, **kw):
        super().__init__(num_features, **kw)
        self.splits = splits

    def forward(self, x):
        if not self.training or self.splits == 1:
            return super().forward(x)
        N, C, S = x.shape[0], x.shape[1], self.splits
        mean, var = self.running_mean.repeat(S), self.running_var.repeat(S)  # (S*C,), updated by batch_norm
        y = F.batch_norm(x.reshape(N // S, S * C, *x.shape[2:]), mean, var, self.weight.repeat(S),
                         self.bias.repeat(S), True, self.momentum, self.eps)  # row a, block b: sample a*S + b
        with torch.no_grad():
            self.running_mean.copy_(mean.view(S, C).mean(0))
            self.running_var.copy_(var.view(S, C).mean(0))
            self.num_batches_tracked += 1
        y = y.reshape(x.shape)  # the grouping reshape copies a channels_last x to NCHW: hand the next layer its format
        return y.contiguous(memory_format=torch.channels_last) if channels_last(x) else y


def split_bn(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm2d of `module` by SplitBatchNorm(splits), keeping its parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = SplitBatchNorm(child.num_features, splits, eps=child.eps, momentum=child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            split_bn(child, splits)
    return module


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d of `module` by SyncBatchNorm, keeping its parameters, buffers and frozen flags."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            for p, q in zip(bn.parameters(), child.parameters()):
                p.requires_grad_(q.requires_grad)
            setattr(module, name, bn.to(next(child.buffers(), torch.empty(0)).device))
        else:
            convert_sync_bn(child)
    return module


# ----------------------------------------------------------------------------- EMA, queue, schedules, optimizer

@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float):
    """target = m * target + (1 - m) * online for each target parameter and the online parameter of the same name
    (the online predictor has no counterpart), one fused op over all tensors. Pass the unwrapped online module (no
    DDP `module.` prefix). BN buffers are not averaged: the target keeps its own running statistics (as in the
    official MoCo / Fast-MoCo code)."""
    online = dict(online.named_parameters())
    names, params = zip(*target.named_parameters())
    torch._foreach_lerp_(list(params), [online[n] for n in names], 1.0 - m)


def make_queue(K: int, dim: int, device=None) -> torch.Tensor:
    """(K, dim) random unit vectors: MoCo's initial negatives (or NNCLR's support set) before the first keys arrive."""
    queue = F.normalize(torch.randn(K, dim), dim=1)
    return queue if device is None else queue.to(device)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """MoCo FIFO queue: write keys (n, d) at ptr, wrapping around the K slots; return the new pointer."""
    K = queue.shape[0]
    queue[(ptr + torch.arange(keys.shape[0], device=queue.device)) % K] = keys.to(queue.dtype)
    return (ptr + keys.shape[0]) % K


def lr_at(step: int, total: int, base: float, warmup: int = 0, warmup_from: float = 0.0,
          milestones=(), gamma: float = 0.1) -> float:
    """Per-iteration lr: linear warmup from warmup_from*base to base over `warmup` steps, then cosine to 0 over the
    rest, or (MoCo v1) step decay by gamma at each milestone step when milestones are given."""
    if step < warmup:
        return base * (warmup_from + (1.0 - warmup_from) * step / warmup)
    if milestones:
        return base * gamma ** sum(step >= s for s in milestones)
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def momentum_at(step: int, total: int, m: float, cosine: bool = False) -> float:
    """EMA momentum: constant m, or (MoCo v3) m rising to 1 by a half cosine over the run."""
    if not cosine:
        return m
    return 1.0 - (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * min(step / max(1, total), 1.0)))


class LARS(torch.optim.Optimizer):
    """LARS as in MoCo v3: 1-D parameters (biases, BN) get neither weight decay nor the trust-ratio scaling."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = g["trust_coefficient"] * p_norm / d_norm
                    d = d * torch.where((p_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def make_optimizer(model: OnlineEncoder, name: str, lr: float, weight_decay: float, fix_predictor_lr: bool = False):
    """SGD (momentum 0.9), LARS or AdamW (MoCo v3's ViT) over the online model's trainable parameters (a frozen
    patch projection stays out). fix_predictor_lr puts the predictor in its own group whose lr stays at `lr`
    (SimSiam / Fast-MoCo: the predictor is not scheduled); see set_lr."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if fix_predictor_lr:
        pred = set(map(id, model.predictor.parameters()))
        groups = [dict(params=[p for p in trainable if id(p) not in pred]),
                  dict(params=list(model.predictor.parameters()), fixed_lr=True)]
    else:
        groups = [dict(params=trainable)]
    if name == "adamw":  # moco-v3 main_moco.py: AdamW over all parameters, wd included
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose sgd, lars or adamw")


def set_lr(optimizer, lr: float):
    for g in optimizer.param_groups:
        if not g.get("fixed_lr", False):
            g["lr"] = lr


# ----------------------------------------------------------------------------- per-method step losses
# The caller does the EMA update first (as the official code does, at the start of the forward) and runs this under
# autocast; `model` may be DDP-wrapped: it is called exactly once, so DDP sees one forward per backward.

def pair_loss(method, q: list, k: list, pairs, tau: float, offset: int):
    """Fast-MoCo's and MoCo v3's loss over (online, target) view pairs (i, j): the mean of infonce(q[i], k[j]) times
    the method's loss_scale (MoCo v3: the sum of its two terms, each scaled by 2*tau; Fast-MoCo: the mean of the
    2*C cross-entropies, no 2*tau factor, as its official code). q[i] (R, N, d) predictions of view i; k[j]
    (world*N, d) targets of view j gathered from every process. variants.py's losses call this one too."""
    losses = [infonce(q[i], k[j], tau, offset, two_tau=method == "mocov3") for i, j in pairs]
    return TRAITS[method]["loss_scale"] * sum(losses) / len(losses)


def fastmoco_loss(model, target, x1, x2, tau=1.0):
    """Fast-MoCo: the C combined predictions of view 1 against the targets of view 2 of the global batch, and
    symmetric (pair_loss)."""
    (_, p1), (_, p2) = model(x1, x2)  # (C*N, d) each, combination-major
    with torch.no_grad():
        k1, k2 = gather(target(x1).float()), gather(target(x2).float())  # (world*N, d)
    N, off = x1.shape[0], world()[0] * x1.shape[0]
    p1, p2 = p1.reshape(-1, N, p1.shape[-1]), p2.reshape(-1, N, p2.shape[-1])  # (C, N, d)
    return pair_loss("fastmoco", [p1, p2], [k1, k2], [(0, 1), (1, 0)], tau, off)


def mocov3_loss(model, target, x1, x2, tau=1.0):
    """MoCo v3: ctr(q1, k2) + ctr(q2, k1), each scaled by 2*tau (pair_loss)."""
    (_, q1), (_, q2) = model(x1, x2)
    with torch.no_grad():
        k1, k2 = gather(target(x1).float()), gather(target(x2).float())
    off = world()[0] * x1.shape[0]
    return pair_loss("mocov3", [q1, q2], [k1, k2], [(0, 1), (1, 0)], tau, off)


def moco_loss(model, target, x1, x2, queue, tau, generator):
    """MoCo v1/v2: query from view 1, key from view 2 (shuffle-BN), negatives from the queue (one direction).
    Returns (loss, keys gathered from all processes) -- enqueue the keys after the step."""
    ((_, q),) = model(x1)
    with torch.no_grad():
        k = F.normalize(shuffle_bn_forward(target, x2, generator), dim=1)  # (N, d)
    return queue_loss(q, k, queue, tau), gather(k)


def step_loss(method, model, target, x1, x2, tau, queue=None, generator=None):
    """(loss, keys to enqueue or None) of one step of any of METHODS; generator: MoCo v1/v2's shuffle-BN
    permutation (the same on every process: seed it with the step)."""
    if method == "fastmoco":
        return fastmoco_loss(model, target, x1, x2, tau), None
    if method == "mocov3":
        return mocov3_loss(model, target, x1, x2, tau), None
    if method in ("mocov2", "mocov1"):
        return moco_loss(model, target, x1, x2, queue, tau, generator)
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
