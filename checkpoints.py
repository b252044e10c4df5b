"""Checkpoint files: safetensors + JSON metadata only, nothing is ever unpickled. Writes are atomic (temporary file,
fsync, rename), honour the umask, and carry a checksum of every tensor that loads verify. Keys of a pretraining
checkpoint: backbone.* (torchvision's or timm's names, no classifier), projector.*, predictor.*, target.backbone.*,
target.projector.*, optimizer.<i>.<buffer>, queue, ... (docs/checkpoints-io.md, "Checkpoint layout")."""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import fastmoco as fm


def source_hash() -> str:
    """sha256 of fastmoco.py, the method's code, recorded in every checkpoint."""
    return hashlib.sha256(Path(fm.__file__).read_bytes()).hexdigest()


def save_checkpoint(path, tensors: dict, metadata: dict):
    """Atomic write: a temporary file, fsync, then rename, so `path` is never a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = dict(metadata, tensors_sha256=tensors_hash(tensors))  # load_checkpoint detects corrupted bytes
    try:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        share_as_umask_says(tmp)
        os.replace(tmp, path)
    except (SafetensorError, OSError) as e:  # full disk, quota, file size limit, `path` a folder: `path` is untouched
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None


def umask() -> int:
    """The process's umask. Read from /proc on Linux: setting it to read it (os.umask) would change it for a moment
    for every thread of the process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_says(path):
    """Give a file 0666 & ~umask, a folder 0777 & ~umask, as open() and mkdir() would have. Temporary files and
    folders are made 0600 / 0700 (safetensors' save_file, tempfile.mkdtemp), and renaming one into place keeps that:
    on a shared cluster teammates could not read the weights."""
    try:
        os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())
    except OSError:  # a file system without modes (some network / FUSE mounts): the write itself is fine
        pass


def tensors_hash(tensors: dict) -> str:
    """sha256 of every tensor's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def load_checkpoint(path):
    """(tensors, metadata) of a safetensors checkpoint; metadata values are parsed as JSON, never evaluated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: _json_or_str(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({e}); pass a .safetensors file "
                         "written by pretrain.py or safetensors.torch.save_file") from None
    if "tensors_sha256" in meta and meta.pop("tensors_sha256") != tensors_hash(tensors):
        raise ValueError(f"{path} is corrupt: its tensors do not match the checksum written with them")
    return tensors, meta


def _json_or_str(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:  # other writers' metadata, e.g. {"format": "pt"}: keep the raw string
        return v


def prefixed(tensors: dict, prefix: str) -> dict:
    """The entries under `prefix`, with the prefix stripped (e.g. 'backbone.' -> a torchvision state dict)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer) -> dict:
    """Optimizer buffers (momentum) as flat tensors `optimizer.<param index>.<name>`."""
    return {f"optimizer.{i}.{name}": v for i, s in optimizer.state_dict()["state"].items()
            for name, v in s.items() if torch.is_tensor(v)}


def load_optimizer_tensors(optimizer, tensors: dict):
    state = {}
    for key, v in prefixed(tensors, "optimizer.").items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def load_backbone(path, arch: str = None):
    """(backbone, metadata) from a pretrain.py checkpoint (backbone.* keys) or plain torchvision ResNet weights in
    safetensors (conv1.weight, ...; fc.* ignored), loaded strictly. The architecture comes from the metadata (`arch`
    must then agree) or from `arch` (default resnet50); a 3x3 conv1 means the small stem. Raises ValueError with a
    one-line reason for anything else."""
    tensors, meta = load_checkpoint(path)
    if meta.get("arch") and meta["arch"] not in fm.ARCHS:
        raise ValueError(f"{path} holds a {meta['arch']} backbone (a timm model), not a torchvision ResNet: this tool "
                         "builds ResNets only")
    sd = prefixed(tensors, "backbone.") or {k: v for k, v in tensors.items() if not k.startswith("fc.")}
    if "conv1.weight" not in sd:
        raise ValueError(f"{path} holds no ResNet backbone (no backbone.conv1.weight or conv1.weight): pass a "
                         "checkpoint written by pretrain.py or torchvision ResNet weights saved with safetensors")
    saved = meta.get("arch")
    if saved and arch and saved != arch:
        raise ValueError(f"{path} is a {saved} checkpoint, not {arch}: pass --arch {saved} or leave it out")
    arch = saved or arch or "resnet50"
    small_stem = sd["conv1.weight"].shape[-1] == 3  # torchvision's stem is 7x7
    net = load_strictly(fm.resnet(arch, small_stem), sd, f"{path} does not fit a {arch}")
    return net, dict(meta, arch=arch, small_stem=small_stem)


def load_strictly(net, sd: dict, what: str):
    """net with the state dict sd loaded strictly, or a ValueError `what (N keys missing, ...): pass the --arch ...`."""
    expected = net.state_dict()
    bad = sorted(set(expected) ^ set(sd)) + [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{what} ({len(bad)} keys missing, extra or of another shape, e.g. {bad[0]}): pass the "
                         "--arch it was trained with")
    net.load_state_dict(sd)
    return net
