"""Backbones by name for the stage scripts: torchvision's ResNets (fastmoco.resnet, the official codes' layout) or
any timm model (`timm.create_model(name, num_classes=0, **kwargs)`), so fastmoco.py stays free of timm: it takes
any nn.Module with a `dim` attribute (its pooled feature size).

    net = build("vit_small_patch16_224")                # timm, state dict = timm.create_model(name, num_classes=0)'s
    net, meta = load("runs/x/ckpt.safetensors")          # any pretrain.py checkpoint, strictly

A timm ViT is built with dynamic_img_size=True (a constructor switch, no parameter changes): its position embedding
is interpolated to the input's grid, so Fast-MoCo's half-resolution patches and other crop sizes run through it.
mocov3_vit() turns a timm ViT into MoCo v3's (facebookresearch/moco-v3 vits.py): fixed 2D sin-cos position
embedding, frozen random patch projection, MoCo v3's init; the state-dict keys stay timm's.
"""

import ast
import math

import torch
import torch.nn as nn

import checkpoints as ck
import fastmoco as fm

TIMM_HINT = "python -c \"import timm; print(timm.list_models('vit*'))\""


def is_torchvision(arch: str) -> bool:
    return arch in fm.ARCHS


def parse_kwargs(text: str) -> dict:
    """'patch_size=4,img_size=32,depth=6' -> {'patch_size': 4, 'img_size': 32, 'depth': 6} (Python literals; a
    bare word stays a string). Raises ValueError with the part that does not parse."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"--arch-kwargs {text!r}: {part!r} is not name=value (e.g. patch_size=4,img_size=32)")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def check(arch: str, kwargs: dict = None, small_stem: bool = False) -> str:
    """A one-line error for an architecture this project cannot build, or None."""
    if is_torchvision(arch):
        return f"--arch-kwargs are for timm models: torchvision's {arch} takes none (drop them)" if kwargs else None
    try:
        import timm
    except ImportError:
        return f"--arch {arch} is not a torchvision ResNet ({', '.join(fm.ARCHS)}); for timm models: pip install timm"
    if not timm.is_model(arch):
        return (f"unknown --arch {arch}: use a torchvision ResNet ({', '.join(fm.ARCHS)}) or a timm model name "
                f"({TIMM_HINT})")
    if small_stem:
        return f"--small-stem rebuilds a torchvision ResNet's stem: timm's {arch} has its own (use --no-small-stem)"
    return None


def is_vit(arch: str) -> bool:
    """Whether `arch` names one of timm's VisionTransformers (MoCo v3's ViT recipe applies)."""
    if is_torchvision(arch):
        return False
    import timm
    return arch in timm.list_models(module="vision_transformer")


def build(arch: str, small_stem: bool = False, zero_init_residual: bool = True, kwargs: dict = None) -> nn.Module:
    """The backbone named `arch`: (N, 3, H, W) -> pooled features (N, net.dim). torchvision names go to
    fastmoco.resnet (zero_init_residual, small_stem); anything else to timm with num_classes=0 (its own init: timm's
    ResNets zero-init the last BN of each block, as MoCo v3 / Fast-MoCo do)."""
    if is_torchvision(arch):
        if kwargs:
            raise ValueError(check(arch, kwargs))
        return fm.resnet(arch, small_stem, zero_init_residual)
    if msg := check(arch, kwargs, small_stem):
        raise ValueError(msg)
    import timm
    kwargs = dict(kwargs or {})
    try:  # ViTs: interpolate the position embedding to any input size; others take no such argument
        net = timm.create_model(arch, num_classes=0, **{"dynamic_img_size": True, **kwargs})
    except TypeError:
        net = timm.create_model(arch, num_classes=0, **kwargs)
    net.dim = net.num_features
    return net


def mocov3_vit(net: nn.Module) -> nn.Module:
    """MoCo v3's ViT (vits.py of facebookresearch/moco-v3) on a timm VisionTransformer, in place: its init (Q, K and
    V each Xavier-uniform, other linears Xavier-uniform with zero bias, class token N(0, 1e-6), patch projection
    uniform), a fixed 2D sin-cos position embedding and a frozen random patch projection (MoCo v3 Sec. 4.2: the
    instability starts in the patch projection). Parameters keep their timm names and shapes."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:  # treat Q, K and V as three matrices
                val = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(net.cls_token, std=1e-6)
    proj = net.patch_embed.proj  # (embed, 3, p, p)
    val = math.sqrt(6.0 / (math.prod(proj.weight.shape[1:]) + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -val, val)
    nn.init.zeros_(proj.bias)
    proj.requires_grad_(False)
    with torch.no_grad():
        net.pos_embed.copy_(sincos_2d(*net.patch_embed.grid_size, net.embed_dim, net.num_prefix_tokens,
                                      net.pos_embed.shape[1]))
    net.pos_embed.requires_grad_(False)
    return net


def sincos_2d(h: int, w: int, dim: int, prefix: int = 1, length: int = None) -> torch.Tensor:
    """MoCo v3's fixed position embedding: (1, prefix + h*w, dim), zeros for the class token, then per grid cell
    [sin(x w), cos(x w), sin(y w), cos(y w)] with w = 1 / 10000^(i / (dim/4)), cells in moco-v3's order (its meshgrid
    is 'ij' over (w, h): the first coordinate runs slowest). length: the stored length (prefix tokens may be
    absent from the position embedding, as in timm's no_embed_class models)."""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, not {dim}")
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega  # (h*w, dim/4)
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]  # (1, h*w, dim)
    lead = (length or prefix + h * w) - h * w
    return torch.cat([torch.zeros(1, lead, dim), pos], dim=1)


def load(path, arch: str = None):
    """(backbone, metadata) from a pretrain.py checkpoint of any arch, torchvision ResNet weights, or a timm model's
    weights in safetensors (with `arch` naming it; its classifier is dropped): loaded strictly. A timm backbone is
    rebuilt from the metadata's arch and arch_kwargs. ValueError: one line."""
    tensors, meta = ck.load_checkpoint(path)
    saved = meta.get("arch")
    if is_torchvision(saved or arch or "resnet50"):
        return ck.load_backbone(path, arch)
    if saved and arch and saved != arch:
        raise ValueError(f"{path} is a {saved} checkpoint, not {arch}: pass --arch {saved} or leave it out")
    arch, kwargs = saved or arch, meta.get("arch_kwargs") or {}
    if msg := check(arch, kwargs):
        raise ValueError(f"{path}: {msg}")
    net = build(arch, kwargs=kwargs)
    head = net.pretrained_cfg.get("classifier") or "head"  # a timm classifier's weights (head.*, fc.*): not ours
    sd = ck.prefixed(tensors, "backbone.") or {k: v for k, v in tensors.items() if not k.startswith(head + ".")}
    ck.load_strictly(net, sd, f"{path} does not fit timm's {arch}")
    return net, dict(meta, arch=arch, small_stem=False, arch_kwargs=kwargs)


def attach_classifier(net: nn.Module, arch: str, classes: int) -> nn.Module:
    """Give a backbone a new linear classifier where its library keeps one (torchvision: fc; timm:
    reset_classifier), so the fine-tuned state dict loads into torchvision's / timm.create_model(arch,
    num_classes=classes)'s model. Returns the classifier (a Linear)."""
    if is_torchvision(arch):
        net.fc = nn.Linear(net.dim, classes)
    else:
        net.reset_classifier(classes)
    return net.fc if is_torchvision(arch) else net.get_classifier()
