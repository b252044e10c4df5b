"""Fast-MoCo's variants and ablations, as plain functions on top of fastmoco.py.

- Other frameworks, with and without combinatorial patches (Fast-MoCo Appendix C.1): BYOL, SimSiam, NNCLR.
- Multi-crop (Table 4b): extra low-resolution views encoded whole, as additional online samples.
- Sec. 5 / Table 4a / Figs. 3-4: the combine operator (mean, fixed weight, Beta-sampled weight, max), how many of the
  combinations are used, where the combine happens (the six pipelines of Table 4a), positives from the same view.

The core method stays in fastmoco.py, which a reader can copy alone; this module only adds what the ablations change.
Imports only torch and the standard library besides fastmoco.
"""

import dataclasses
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastmoco as fm

METHODS = ("byol", "simsiam", "nnclr")  # besides fastmoco.METHODS
COMBINES = ("mean", "weighted", "beta", "max")
# Appendix C.1 frameworks (100 epochs there; REFERENCE gives no recipe: the numbers are the original papers'), in
# fastmoco.RECIPES' format. SimSiam and NNCLR have no momentum encoder: their target is a copy refreshed with m = 0
# (= the online weights).
RECIPES = {
    "byol": dict(epochs=100, batch_size=4096, lr=0.2, weight_decay=1.5e-6, optimizer="lars", warmup_epochs=10,
                 warmup_from=0.0, momentum=0.996, cosine_momentum=True, tau=1.0, clip_grad=0.0,
                 fix_predictor_lr=False, milestones=(), aug="mocov3", sync_bn=True),
    "simsiam": dict(epochs=100, batch_size=512, lr=0.05, weight_decay=1e-4, optimizer="sgd", warmup_epochs=0,
                    warmup_from=0.0, momentum=0.0, cosine_momentum=False, tau=1.0, clip_grad=0.0,
                    fix_predictor_lr=True, milestones=(), aug="mocov2", sync_bn=True),
    "nnclr": dict(epochs=100, batch_size=4096, lr=0.3, weight_decay=1e-6, optimizer="lars", warmup_epochs=10,
                  warmup_from=0.0, momentum=0.0, cosine_momentum=False, tau=0.1, clip_grad=0.0,
                  fix_predictor_lr=False, milestones=(), aug="mocov3", sync_bn=True),
}
SMALL_RECIPES = {  # --recipe small (fastmoco.SMALL: lightly's CIFAR-10 benchmark recipe, used for every method there)
    "byol": dict(fm.SMALL, tau=1.0, aug="small-asymmetric"),
    "simsiam": dict(fm.SMALL, tau=1.0, momentum=0.0, fix_predictor_lr=True),
    "nnclr": dict(fm.SMALL, tau=0.2, momentum=0.0, aug="small-asymmetric"),  # solo-learn's CIFAR NNCLR: tau 0.2
}
# Table 4a, in the paper's words. Fast-MoCo is divide-encode-combine.
PIPELINES = ("divide-encode-combine", "divide-combine-encode", "sample-combine-encode", "sample-encode-combine",
             "encode-only", "montage-encode-divide-combine")


@dataclasses.dataclass(frozen=True)
class Ablation:
    """A run's ablation settings (pretrain.py's "Ablations" options); the defaults are Fast-MoCo's own."""
    patches: bool = True  # combinatorial patches on the online branch
    pipeline: str = PIPELINES[0]  # where the patches are combined (Table 4a)
    combine: str = "mean"  # the combine operator (Sec. 5.5)
    lam: float = 0.5  # --combine weighted: the weight of a subset's first patch
    alpha: float = 1.0  # --combine beta: weights ~ Beta(alpha, alpha)
    combinations: int = 0  # how many of the C(P, k) combinations (Sec. 5.4); 0 = all
    same_view: bool = False  # positives from the same view (Sec. 5.1)
    multi_crop: int = 0  # extra low-resolution crops per image (Table 4b)


# ----------------------------------------------------------------------------- heads of the other frameworks

def heads(method: str, dim: int, vit: bool = False):
    """(projector, predictor) of BYOL / SimSiam / NNCLR, else fastmoco.heads."""
    if method == "byol":  # BYOL Sec. 3.3: Linear 4096 + BN + ReLU + Linear 256; the predictor has the same shape
        return fm.mlp([dim, 4096, 256]), fm.mlp([256, 4096, 256])
    if method == "simsiam":  # SimSiam Sec. 4: 3 layers of 2048, BN on the output (no affine); 512-d bottleneck
        return fm.mlp([dim, 2048, 2048, 2048], last_bn=True, last_bn_affine=False), fm.mlp([2048, 512, 2048])
    if method == "nnclr":  # NNCLR Sec. 4.1: projector [2048, 2048, 256] with BN, predictor [4096, 256]
        return fm.mlp([dim, 2048, 2048, 256], last_bn=True), fm.mlp([256, 4096, 256])
    return fm.heads(method, dim, vit)


# ----------------------------------------------------------------------------- combine: operators and subsets

def balanced_subsets(P: int, k: int, m: int):
    """m of the C(P, k) k-subsets of range(P) in which every patch occurs equally often (m*k/P times), the
    lexicographically first such set (depth-first search). Sec. 5.4 uses 2, 4 or 6 of the 6 pairs of a 2x2 grid."""
    subsets = list(itertools.combinations(range(P), k))
    if not 1 <= m <= len(subsets) or (m * k) % P:
        raise ValueError(f"cannot pick {m} of the {len(subsets)} {k}-subsets of {P} patches with every patch used "
                         f"equally often: m*k must be a multiple of {P}")
    each, counts = m * k // P, [0] * P

    def search(start, chosen):
        if len(chosen) == m:
            return chosen
        for i in range(start, len(subsets)):
            if all(counts[p] < each for p in subsets[i]):
                for p in subsets[i]:
                    counts[p] += 1
                found = search(i + 1, chosen + [subsets[i]])
                if found:
                    return found
                for p in subsets[i]:
                    counts[p] -= 1
        return None

    return search(0, [])


def combine_with(f: torch.Tensor, P: int, subsets, op: str = "mean", lam: float = 0.5, alpha: float = 1.0):
    """(P*N, D) patch-major embeddings -> (len(subsets)*N, D), subset-major: each subset of each image's patches
    combined by `op` (Sec. 5.5): mean; weighted (the subset's first patch gets lam, the others share 1 - lam);
    beta (weights ~ Dirichlet(alpha), i.e. (l, 1 - l) with l ~ Beta(alpha, alpha) for pairs, drawn per image and
    subset from the CPU generator); max (elementwise)."""
    D = f.shape[-1]
    g = f.reshape(P, -1, D)[fm.to_device(torch.tensor(subsets), f.device)]  # (C, k, N, D)
    C, k, N, _ = g.shape
    if op == "max":
        return g.amax(1).reshape(-1, D)
    if op == "mean":
        w = torch.full((C, k, N), 1.0 / k)
    elif op == "weighted":
        w = torch.tensor([lam] + [(1.0 - lam) / (k - 1)] * (k - 1))[None, :, None].expand(C, k, N)
    elif op == "beta":
        w = torch.distributions.Dirichlet(torch.full((k,), float(alpha))).sample((C, N)).permute(0, 2, 1)
    else:
        raise ValueError(f"unknown combine {op!r}: choose one of {', '.join(COMBINES)}")
    return (fm.to_device(w.contiguous(), f.device).to(f.dtype)[..., None] * g).sum(1).reshape(-1, D)


# ----------------------------------------------------------------------------- input-side constructions (Table 4a)

def random_crops(x: torch.Tensor, n: int, count: int) -> torch.Tensor:
    """(N, C, H, W) -> (count*N, C, H/n, W/n): `count` crops of the grid's patch size per image, at independent
    uniformly random positions (overlaps allowed), crop-major like fastmoco.divide. Positions come from the CPU
    generator (variant_loss seeds it per step, so a resumed run draws the same crops)."""
    N, _, H, W = x.shape
    h, w = H // n, W // n
    top, left = torch.randint(0, H - h + 1, (count * N,)), torch.randint(0, W - w + 1, (count * N,))
    rows = fm.to_device(top[:, None] + torch.arange(h), x.device)  # (M, h)
    cols = fm.to_device(left[:, None] + torch.arange(w), x.device)  # (M, w)
    img = torch.arange(N, device=x.device).repeat(count)  # crop c of image i is row c*N + i
    return x[img[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def undivide(pieces: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of fastmoco.divide: (n*n*N, C, h, w) patch-major -> (N, C, n*h, n*w)."""
    _, C, h, w = pieces.shape
    x = pieces.reshape(n, n, -1, C, h, w).permute(2, 3, 0, 4, 1, 5)  # (N, C, n_row, h, n_col, w)
    return x.reshape(-1, C, n * h, n * w)


def paste(pieces: torch.Tensor, n: int, subsets) -> torch.Tensor:
    """Combine at the input (Divide-/Sample-Combine-Encode): (n*n*N, C, h, w) patch-major pieces -> one canvas per
    subset and image, (len(subsets)*N, C, n*h, n*w): the subset's pieces at their grid cells, zeros elsewhere
    (zero = the dataset mean after normalisation)."""
    P, canvases = n * n, []
    pieces = pieces.reshape(P, -1, *pieces.shape[1:])  # (P, N, C, h, w)
    for s in subsets:
        keep = torch.zeros(P, 1, 1, 1, 1, device=pieces.device, dtype=pieces.dtype)
        keep[list(s)] = 1.0
        canvases.append(undivide((pieces * keep).flatten(0, 1), n))  # (N, C, H, W)
    return torch.cat(canvases)


def feature_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet up to layer4, before global pooling: (N, 3, H, W) -> (N, D, H', W')."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def montage_features(x: torch.Tensor, n: int, fmap) -> torch.Tensor:
    """Montage-Encode-Divide (JigClu, Chen et al. 2021): cell p of montage i holds patch p of image (i + p) % N, so
    one montage mixes n*n images, every patch in its original cell; the montages' feature maps (fmap: images ->
    (N, D, H', W')) are cut into the n x n cells and average-pooled, then un-shifted back to their images.
    Returns (n*n*N, D) patch-major, like backbone(divide(x, n)). JigClu: a feature map whose side n does not divide
    (7 at 224 px with n = 2) is bilinearly resized to the next multiple first."""
    P, N = n * n, x.shape[0]
    pieces = fm.divide(x, n)
    pieces = pieces.reshape(P, N, *pieces.shape[1:])  # (P, N, C, h, w)
    mont = undivide(torch.cat([pieces[p].roll(-p, 0) for p in range(P)]), n)  # (N, C, H, W)
    f = fmap(mont)  # (N, D, H', W')
    H2, W2 = -(-f.shape[2] // n) * n, -(-f.shape[3] // n) * n
    if (H2, W2) != f.shape[2:]:
        f = F.interpolate(f, size=(H2, W2), mode="bilinear", align_corners=False)
    D = f.shape[1]
    cells = f.reshape(N, D, n, H2 // n, n, W2 // n).mean((3, 5)).permute(2, 3, 0, 1).reshape(P, N, D)
    return torch.cat([cells[p].roll(p, 0) for p in range(P)])  # patch p of image j sat in montage (j - p) % N


# ----------------------------------------------------------------------------- the online encoder of every variant

class Encoder(fm.OnlineEncoder):
    """fastmoco.OnlineEncoder with the ablation knobs: the other frameworks' heads, and with patches the pipeline,
    combine operator and number of combinations. The same contract (forward -> per view (z, p), rows (R*N, d)) and
    state-dict keys (backbone.*, projector.*, predictor.*), so fastmoco.target_encoder, ema_update and the checkpoint
    code apply unchanged; multi-crop views (the third on) are encoded whole (Table 4b). With the defaults (and for
    every run without patches) features() is OnlineEncoder's own, so a change there reaches every variant."""

    def __init__(self, method="fastmoco", arch="resnet50", small_stem=False, grid=2, k=2, ablation=Ablation(),
                 backbone=None, vit=False):
        super().__init__(method, arch, small_stem, grid, k, backbone, vit)
        a = ablation
        self.patches, self.pipeline, self.combine, self.lam, self.alpha = (a.patches, a.pipeline, a.combine, a.lam,
                                                                           a.alpha)
        self.all = math.comb(grid * grid, k)
        self.subsets = balanced_subsets(grid * grid, k, a.combinations or self.all) if a.patches else []

    def make_heads(self, dim: int):
        return heads(self.method, dim, self.vit)

    def chosen(self):
        """This forward's subsets: all C(P, k), or (Sec. 5.4) the balanced subset relabelled by a random
        permutation of the patches, so every pair is seen over training and each patch equally often per step."""
        if len(self.subsets) == self.all:
            return self.subsets
        perm = torch.randperm(self.grid ** 2).tolist()
        return [tuple(sorted(perm[p] for p in s)) for s in self.subsets]

    def features(self, x):
        """(N, C, H, W) global view -> (R*N, D) backbone features of its R online samples per image."""
        n, P, pipe = self.grid, self.grid ** 2, self.pipeline
        if not self.patches or (pipe == PIPELINES[0] and self.combine == "mean" and len(self.subsets) == self.all):
            return super().features(x)  # the whole view, or the core method's divide-encode-combine
        if pipe == "encode-only":  # n*n independent square crops, each its own sample, nothing combined
            return self.backbone(random_crops(x, n, P))
        if pipe in ("divide-combine-encode", "sample-combine-encode"):  # stitch at the input, then encode
            pieces = fm.divide(x, n) if pipe == "divide-combine-encode" else random_crops(x, n, P)
            return self.backbone(paste(pieces, n, self.chosen()))  # (C*N, D)
        if pipe == "montage-encode-divide-combine":
            f = montage_features(x, n, lambda m: feature_map(self.backbone, m))
        else:  # Fast-MoCo divides (Sec. 3.2); Sample-Encode-Combine crops at random positions instead
            f = self.backbone(fm.divide(x, n) if pipe == "divide-encode-combine" else random_crops(x, n, P))
        subsets = self.chosen()
        if self.combine == "mean" and len(subsets) == self.all:
            return fm.combine(f, P, self.k)  # the core method's one-matmul combine
        return combine_with(f, P, subsets, self.combine, self.lam, self.alpha)  # (C*N, D)

    def forward(self, *views):
        """views: x1, x2 (global), then any multi-crop views (encoded whole: Table 4b) -> per view (z, p).
        Each view is its own batch (BN statistics per view)."""
        return tuple(self.branch(x) if i < 2 else self.head(self.backbone(x)) for i, x in enumerate(views))


# ----------------------------------------------------------------------------- losses

def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL Eq. 2: ||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z), mean over rows. z: the target (no gradient)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam Eq. 1 with stop-grad: D(p, stopgrad(z)) = -cos(p, z), mean over rows."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


@torch.no_grad()
def nearest(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """NNCLR Eq. 1: the support-set row nearest to each row of z (support rows are unit vectors, so the nearest
    in Euclidean distance of the normalised z is the most cosine-similar). (N, d), (K, d) -> (N, d)."""
    return support[(F.normalize(z.float(), dim=1) @ support.float().T).argmax(1)]


def variant_loss(method, model, target, views, queue=None, tau=1.0, ablation=Ablation(), seed=0):
    """One step's loss of any variant on views (x1, x2, *multi-crop views); `model` (maybe DDP-wrapped) is called
    exactly once. Returns (loss, keys to
    enqueue: NNCLR's support-set entries gathered from all processes, else None). The forward's random draws
    (crop positions, subset relabelling, Beta weights) come from the CPU generator seeded with `seed` (pass one
    derived from run seed, step and rank), so a resumed run repeats them exactly.

    Pairs: each online sample of view 1 against the target of view 2 and vice versa; multi-crop views against the
    targets of both views; --same-view (Sec. 5.1): each view against its own target. The loss is the mean over
    pairs, times 2 where the original sums its two symmetric terms (MoCo v3, BYOL)."""
    x1, x2 = views[:2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        (z1, p1), (z2, p2), *rest = model(*views)  # rows (R*N, d)
    N = x1.shape[0]
    with torch.no_grad():
        if not fm.TRAITS[method]["ema"] and not ablation.patches:
            t = [z1.detach().float(), z2.detach().float()]  # SimSiam / NNCLR: stop-grad on the same forward
        else:
            # EMA target (fastmoco, mocov3, byol). SimSiam / NNCLR have none (target = a copy with m = 0): with
            # patches the online branch never sees the whole view, so it is forwarded a second time (App. C.1).
            t = [target(x1).float(), target(x2).float()]  # (N, d) each
    group = lambda p: p.reshape(-1, N, p.shape[-1])  # noqa: E731  (R*N, d) -> (R, N, d)
    q = [group(p1), group(p2)] + [group(p) for _, p in rest]
    pairs = ([(0, 0), (1, 1)] if ablation.same_view else
             [(0, 1), (1, 0)] + [(i, j) for i in range(2, len(q)) for j in (0, 1)])
    off, keys = fm.world()[0] * N, None
    if method in ("fastmoco", "mocov3"):  # the core methods' own loss, over these pairs
        return fm.pair_loss(method, q, [fm.gather(t_) for t_ in t], pairs, tau, off), None  # targets (world*N, d)
    if method == "byol":
        losses = [byol_loss(q[i], t[j][None]) for i, j in pairs]
    elif method == "simsiam":
        losses = [simsiam_loss(q[i], t[j][None]) for i, j in pairs]
    elif method == "nnclr":  # the positive is the nearest neighbour of the target in the support set
        nn_ = [fm.gather(nearest(t_, queue)) for t_ in t]
        losses = [fm.infonce(q[i], nn_[j], tau, off) for i, j in pairs]
        keys = fm.gather(F.normalize(t[0], dim=1))  # NNCLR: the support set holds view-1 embeddings
    else:
        raise ValueError(f"unknown method {method!r}")
    return fm.TRAITS[method]["loss_scale"] * sum(losses) / len(losses), keys


# ----------------------------------------------------------------------------- which runs are variants, and checks

def is_variant(method, ablation: Ablation) -> bool:
    """Does the run need Encoder and variant_loss, or is it one of the four core methods exactly as fastmoco.py
    defines them? Any option this module adds, or patches on (off) for another method than fastmoco."""
    a = ablation
    return (method in METHODS or a.patches != fm.TRAITS[method]["patches"] or a.pipeline != PIPELINES[0]
            or a.combine != "mean" or bool(a.combinations or a.same_view or a.multi_crop))


def check(method, ablation: Ablation, grid, k, momentum) -> str:
    """A one-line message for an option combination that cannot run, or None."""
    a = ablation
    patches, pipeline, combine, lam, combinations = a.patches, a.pipeline, a.combine, a.lam, a.combinations
    if fm.TRAITS[method]["shuffle_bn"]:  # the queue path has no variants
        return f"--method {method} has no variants: use fastmoco, mocov3, byol, simsiam or nnclr"
    if not fm.TRAITS[method]["ema"] and momentum is not None:
        return f"--method {method} has no momentum encoder: drop --momentum"
    if not patches and (pipeline != PIPELINES[0] or combine != "mean" or combinations):
        return "--pipeline, --combine and --combinations change the patches: add --patches"
    if combine in ("weighted", "beta") and k < 2:
        return f"--combine {combine} weighs several patches: use --combine-k 2 or more"
    if not 0.0 <= lam <= 1.0:
        return f"--combine-lambda {lam} must be in [0, 1]"
    if pipeline in ("divide-combine-encode", "sample-combine-encode", "encode-only") and combine != "mean":
        return f"--pipeline {pipeline} combines nothing after the encoder: --combine does not apply"
    if pipeline == "encode-only" and combinations:
        return "--pipeline encode-only has no combinations: drop --combinations"
    if patches and combinations:
        try:
            balanced_subsets(grid * grid, k, combinations)
        except ValueError as e:
            return f"--combinations {combinations}: {e}"
    if a.same_view and a.multi_crop:
        return "--same-view pairs each view with itself: it does not combine with --multi-crop"
    return None
