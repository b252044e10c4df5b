"""Import a published MoCo v1 / v2 / v3 or Fast-MoCo checkpoint (a torch.save pickle, .pth.tar) as a checkpoint of this
project (safetensors), which linear_probe.py, semisup.py, transfer/convert.py and pretrain.py --resume read unchanged.

    python -m transfer.import_weights fastmoco_e100.pth.tar runs/official/fastmoco-e100.safetensors
    python linear_probe.py runs/official/fastmoco-e100.safetensors --data /data/imagenet-1k

Safety: the file is read with torch.load(weights_only=True) on the CPU and with nothing else, so only tensors and plain
containers are rebuilt; a file that needs any other Python object is refused before anything in it runs.
Every tensor is mapped by name, never by position (the official Fast-MoCo linear evaluation renames by position). The
layout is detected from the key names; docs/checkpoints-io.md lists the layouts and what a resume can and cannot do.
"""

import _compat_pickle
import hashlib
import io
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer


if not __package__:  # run as a file (python transfer/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints as ck
import fastmoco as fm
import runs
from cli import fail


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

# layout -> (method, repository, what its file holds, official batch, iterations per ImageNet-1k epoch, licence)
LAYOUTS = {
    "mocov1": ("mocov1", "facebookresearch/moco", "MoCo v1: state_dict module.encoder_q/encoder_k.* (fc Linear), "
               "module.queue", 256, 5004, "cc-by-nc-4.0"),
    "mocov2": ("mocov2", "facebookresearch/moco", "MoCo v2: the same with an fc.0/fc.2 MLP", 256, 5004, "cc-by-nc-4.0"),
    "mocov3": ("mocov3", "facebookresearch/moco-v3", "MoCo v3 ResNet: state_dict module.base_encoder/"
               "momentum_encoder/predictor.*", 4096, 312, "cc-by-nc-4.0"),
    # orashi/Fast-MoCo config.yaml: "bs 512 one epoch is 2502.28it", 100 epochs = 250300 iterations (ceil)
    "fastmoco": ("fastmoco", "orashi/Fast-MoCo", "Fast-MoCo: model module.backbone.<i>/encoder.1/bbone_ema/"
                 "encoder_ema/predictor.*", 512, 2503, "unknown"),
}
BACKBONE_ONLY = "a ResNet backbone alone (torchvision names under module./encoder_q./base_encoder./backbone., or a " \
                "linear-*.pth.tar probe file)"
# Linear top-1 (ImageNet-1k) the authors publish for their files, by (method, epochs): REFERENCE / the repos' READMEs.
PUBLISHED = {("mocov1", 200): 60.6, ("mocov2", 200): 67.7, ("mocov2", 800): 71.1, ("mocov3", 100): 68.9,
             ("mocov3", 300): 72.8, ("mocov3", 1000): 74.6, ("fastmoco", 100): 73.5, ("fastmoco", 200): 75.1,
             ("fastmoco", 400): 75.5}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# Fast-MoCo: backbone = nn.Sequential(*resnet.children()[:-1]); children 2, 3, 8 (ReLU, max-pool, avg-pool) hold nothing
FASTMOCO_STAGES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# Fast-MoCo projection_MLP / prediction_MLP attribute names -> fastmoco.mlp's nn.Sequential indices
FASTMOCO_PROJECTOR = {"linear1": "0", "bn1": "1", "linear2": "3", "bn2": "4", "linear3": "6", "bn3": "7"}
FASTMOCO_PREDICTOR = {"linear1": "0", "bn1": "1", "layer2": "3"}


def supported() -> str:
    return "; ".join(f"{d} ({repo})" for _, repo, d, *_ in LAYOUTS.values()) + "; or " + BACKBONE_ONLY


# ----------------------------------------------------------------------------- reading

# torch's two wordings of a refused global: "Unsupported global: GLOBAL exec was not an allowed global" (any torch
# >= 2.4) and, for os / posix / sys / nt, "Trying to load unsupported GLOBAL posix.system whose module posix is
# blocked" (2.14)
REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+) whose module")
# the lines around the reason in torch's weights_only error: what to do in general, links, the 2.6 default change
BOILERPLATE = re.compile(r"^(Weights only load failed|\(\d\)|In PyTorch|Check the documentation|Please file an "
                         r"issue)")
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def read(path: Path) -> dict:
    """The unpickled top-level dict of a torch.save file, rebuilt with weights_only=True (tensors, dicts, lists,
    numbers and strings only), or a one-line error naming the file."""
    if not path.is_file():
        fail(f"{path} does not exist: pass the downloaded .pth.tar file")
    if path.suffix == ".safetensors":
        fail(f"{path} is a safetensors file, not a torch.save pickle: linear_probe.py, semisup.py and "
             "transfer/convert.py read it directly")
    if path.stat().st_size == 0:
        fail(f"{path} is empty: download it again")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": two lines before our one
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, or RuntimeError, KeyError, EOFError, ... for bytes of no torch.save file
        wanted = unsafe_globals(path) or [g for g in [refused_global(e)] if g]
        if wanted:
            fail(f"refused {path}: it wants to run {', '.join(wanted[:4])} when loaded (a pickle can run code); only "
                 "tensors and plain data are read: if you trust the file, load it and torch.save its state dict alone")
        fail(f"{path} is not a PyTorch checkpoint ({reason(e)}): pass the published .pth.tar as downloaded")
    if not isinstance(obj, dict):
        fail(f"{path} holds a {type(obj).__name__}, not a checkpoint dict: supported layouts are {supported()}")
    return obj


def reason(e: Exception) -> str:
    """The line of torch's error that says what went wrong (e.g. 'Unsupported operand 190'), without the advice
    around it."""
    lines = [line.strip() for line in str(e).splitlines()]
    lines = [line.replace("WeightsUnpickler error:", "").strip() for line in lines if not BOILERPLATE.match(line)]
    why = next((line for line in lines if line), "").split(". ")[0][:160]  # miniz adds advice sentences too
    return why if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {why}" if why else type(e).__name__


def global_name(module: str, name: str) -> str:
    """module.name as Python 3 spells it: protocol 2 pickles (torch.save's) carry Python 2 module names, e.g.
    __builtin__.exec or commands.Popen for subprocess.Popen, as pickle.load maps them."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def refused_global(e: Exception) -> str:
    """The global torch's weights_only unpickler refused, named in its error, or ''."""
    m = REFUSED_GLOBAL.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
    if not m:
        return ""
    module, _, name = (m[1] or m[2]).rpartition(".")
    return global_name(module or "builtins", name)  # torch writes builtins.exec as "exec"


def unsafe_globals(path: Path) -> list:
    """The globals in the file's pickles that torch's weights_only unpickler does not allow, in order, each once.
    torch names only the first it meets, and in a plain pickle.dump file (protocol 4 and 5 frames) none: it stops at
    'Unsupported operand 149' before. So the pickle is read here opcode by opcode (pickletools: nothing is called or
    built)."""
    try:
        if zipfile.is_zipfile(path):  # torch.save's default format: the object is the pickle <name>/data.pkl
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:  # a plain pickle, or torch's legacy format: the pickles come first, the tensor bytes after them
            with open(path, "rb") as f:
                data = f.read(64 << 20)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return []
    allowed = torch._weights_only_unpickler._get_allowed_globals()  # private, hence torch pinned in requirements
    return list(dict.fromkeys(g for g in pickled_globals(data) if g not in allowed))


def pickled_globals(data: bytes) -> list:
    """module.name of every global the pickles at the start of `data` import (GLOBAL and INST carry it; STACK_GLOBAL
    takes the last two strings pushed, directly or from the memo). torch's legacy format is several pickles in a
    row, then raw tensor bytes, where the opcode reader stops."""
    found, strings, memo, f = [], [], {}, io.BytesIO(data)
    for _ in range(8):
        last = None
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    found.append(global_name(*arg.split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(global_name(*strings[-2:]))
                elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = last
                got = memo.get(arg) if op.name in ("GET", "BINGET", "LONG_BINGET") else None
                last = arg if op.name in STRING_OPS else got if isinstance(got, str) else None
                if last is not None:
                    strings.append(last)
        except Exception:  # not an opcode, or the bytes ran out: the end of the pickles
            break
    return found


def state_dict_of(obj: dict, path: Path) -> dict:
    """The tensors of a checkpoint dict (`state_dict` in MoCo's files, `model` in Fast-MoCo's, else the dict itself),
    with DistributedDataParallel's `module.` prefix removed."""
    sd = obj.get("state_dict", obj.get("model", obj))
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)} if isinstance(sd, dict) else {}
    if not sd:
        fail(f"{path} holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:8]))}): supported layouts "
             f"are {supported()}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect(sd: dict) -> Optional[str]:
    """The full published layout the keys belong to, or None."""
    if "encoder_q.conv1.weight" in sd:
        return "mocov2" if "encoder_q.fc.0.weight" in sd else "mocov1"
    if "base_encoder.conv1.weight" in sd:
        return "mocov3"
    if "backbone.0.weight" in sd and "encoder.1.linear1.weight" in sd:
        return "fastmoco"
    return None


# ----------------------------------------------------------------------------- renaming

def renames(layout: str) -> list:
    """[(official prefix, our prefix)], first match wins: ours are backbone.*, projector.*, predictor.*, target.*."""
    if layout in ("mocov1", "mocov2", "mocov3"):
        online, target = ("encoder_q", "encoder_k") if layout != "mocov3" else ("base_encoder", "momentum_encoder")
        # MoCo v1: fc is Linear(D, 128); v2: fc = (Linear, ReLU, Linear); v3: fc = (Linear, BN, ReLU, Linear, BN):
        # the same nn.Sequential indices as fastmoco.heads' mlp()
        return [(f"{online}.fc.", "projector."), (f"{online}.", "backbone."), (f"{target}.fc.", "target.projector."),
                (f"{target}.", "target.backbone."), ("predictor.", "predictor.")]
    rules = []
    for src, dst in (("backbone", "backbone"), ("bbone_ema", "target.backbone")):
        rules += [(f"{src}.{i}.", f"{dst}.{name}.") for i, name in FASTMOCO_STAGES.items()]
    for src, dst in (("encoder.1", "projector"), ("encoder_ema.1", "target.projector")):
        rules += [(f"{src}.{a}.", f"{dst}.{i}.") for a, i in FASTMOCO_PROJECTOR.items()]
    return rules + [(f"predictor.{a}.", f"predictor.{i}.") for a, i in FASTMOCO_PREDICTOR.items()]


def rename(sd: dict, rules: list) -> tuple:
    """({our name: official name}, [official names no rule covers])."""
    names, left = {}, []
    for k in sd:
        new = next((dst + k[len(src):] for src, dst in rules if k.startswith(src)), None)
        if new is None:
            left.append(k)
        else:
            names[new] = k
    return names, left


def drop_aliases(sd: dict, path: Path) -> dict:
    """Fast-MoCo's encoder = nn.Sequential(backbone, projector), so its state dict holds every backbone tensor twice
    (backbone.* and encoder.0.*; bbone_ema.* and encoder_ema.0.*): check the copies agree, keep one."""
    for alias, main in (("encoder.0.", "backbone."), ("encoder_ema.0.", "bbone_ema.")):
        for k in [k for k in sd if k.startswith(alias)]:
            twin = main + k[len(alias):]
            if twin not in sd or not torch.equal(sd[k], sd[twin]):
                fail(f"{path}: {k} is not a copy of {twin} as in the published Fast-MoCo files: the file was edited; "
                     "download it again")
            del sd[k]
    return sd


def expected(method: str, arch: str, small_stem: bool) -> dict:
    """{our name: shape} of everything a full checkpoint of `method` holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = fm.resnet(arch, small_stem)
        projector, predictor = fm.heads(method, net.dim)
    shapes = {}
    for prefix, m in (("backbone.", net), ("projector.", projector), ("predictor.", predictor),
                      ("target.backbone.", net), ("target.projector.", projector)):
        shapes.update({prefix + k: tuple(v.shape) for k, v in m.state_dict().items()})
    return shapes


def find_arch(backbone: dict, hint, path: Path) -> tuple:
    """(arch, small_stem) whose torchvision state dict (without fc) has exactly these names and shapes."""
    small_stem = backbone["conv1.weight"].shape[-1] == 3  # torchvision's stem is 7x7
    have = {k: tuple(v.shape) for k, v in backbone.items()}
    for arch in dict.fromkeys([str(hint), *fm.ARCHS]):  # the file's `arch` field first, when it names one of ours
        if arch in fm.ARCHS:
            with torch.device("meta"):
                ref = fm.resnet(arch, small_stem).state_dict()
            if have == {k: tuple(v.shape) for k, v in ref.items()}:
                return arch, small_stem
    fail(f"{path}: its backbone is none of the ResNets this project builds ({', '.join(fm.ARCHS)})")


def backbone_prefix(sd: dict) -> Optional[str]:
    for p in ("encoder_q.", "base_encoder.", "backbone.", "encoder.", ""):
        if f"{p}conv1.weight" in sd and f"{p}layer1.0.conv1.weight" in sd:
            return p
    if "backbone.0.weight" in sd and "backbone.4.0.conv1.weight" in sd:
        return "fastmoco"  # a Fast-MoCo backbone without its heads: positional children names
    return None


# ----------------------------------------------------------------------------- optimizer state

def optimizer_buffers(obj: dict, sd: dict, layout: str, names: dict, ours: list) -> tuple:
    """(our optimizer.<i>.<buffer> tensors, note). torch indexes optimizer state by parameter position, so the name
    behind each index is its place in the official model's parameters(): the order of the parameters in its saved
    state dict (torch saves modules in registration order). MoCo v1/v2/v3 pass model.parameters() (the frozen
    momentum encoder included) as one group; Fast-MoCo two groups, non-predictor then predictor. Each buffer is then
    renamed through `names` to our index; shapes are checked, and anything that does not line up is dropped whole."""
    opt = obj.get("optimizer")
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and opt.get("param_groups")):
        return {}, "no optimizer state: a resume starts the momentum buffers from zero"
    params = [k for k in sd if not k.endswith(BUFFERS) and k not in ("queue", "queue_ptr")]
    if layout == "fastmoco":
        params = [k for k in params if "predictor" not in k] + [k for k in params if "predictor" in k]
    index = [i for g in opt["param_groups"] for i in g.get("params", [])]
    official, ours_of = dict(zip(index, params)), {o: n for n, o in names.items()}
    out = {}
    for i, state in opt["state"].items():
        for buf, v in state.items():
            if not torch.is_tensor(v) or v.dim() == 0:  # a step counter, not a momentum buffer
                continue
            name = ours_of.get(official.get(i))
            if len(index) != len(params) or name not in ours or tuple(v.shape) != tuple(sd[official[i]].shape):
                return {}, (f"optimizer state dropped: its {len(index)} indices do not line up with the {len(params)} "
                            "parameters of the file; a resume starts the momentum buffers from zero")
            out[f"optimizer.{ours.index(name)}.{buf}"] = v
    return out, f"optimizer state: {len(out)} momentum buffers"


def online_order(method: str, arch: str, small_stem: bool) -> list:
    """Our parameter names in fastmoco.make_optimizer's order: the online encoder registers backbone, projector,
    predictor in that order, and the Fast-MoCo recipe's second group (the predictor, fixed lr) comes last too."""
    with torch.device("meta"):
        net = fm.resnet(arch, small_stem)
        heads = dict(zip(("projector", "predictor"), fm.heads(method, net.dim)))
    return ([f"backbone.{k}" for k, _ in net.named_parameters()] +
            [f"{h}.{k}" for h, m in heads.items() for k, _ in m.named_parameters()])


# ----------------------------------------------------------------------------- conversion

def backbone_only(sd: dict, obj: dict, path: Path, layout: Optional[str] = None, what: str = "") -> tuple:
    """(tensors, metadata, notes) of a file that holds a ResNet but not everything a full checkpoint of this project
    has: a published layout with parts missing or heads of other shapes, a linear-evaluation file, a bare backbone."""
    p = backbone_prefix(sd)
    if p is None:
        fail(f"{path}: unsupported layout (keys such as {', '.join(list(sd)[:3])}): supported layouts are "
             f"{supported()}")
    if p == "fastmoco":
        names, _ = rename(sd, renames("fastmoco"))
        backbone = {n[len("backbone."):]: sd[o] for n, o in names.items() if n.startswith("backbone.")}
    else:
        backbone = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    stages = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    backbone = {k: v for k, v in backbone.items() if k.split(".")[0] in stages}  # fc and heads dropped
    arch, small_stem = find_arch(backbone, obj.get("arch"), path)
    fc = sd.get(f"{p}fc.weight")
    what = what or (f"a linear-evaluation or supervised file (a ResNet with a {fc.shape[0]}-class fc, dropped)"
                    if fc is not None else "a ResNet backbone without heads")
    meta = dict(format="fastmoco-backbone-v1", arch=arch, small_stem=small_stem, image_size=224,
                source=dict(file=path.name, layout="backbone"))
    if layout:
        meta.update(method=LAYOUTS[layout][0])
    notes = [f"{path.name} is {what}: wrote its backbone only, which linear_probe.py, semisup.py and "
             "transfer/convert.py accept; pretrain.py --resume needs a full pretraining file"]
    return {f"backbone.{k}": v for k, v in backbone.items()}, meta, notes


def convert(obj: dict, path: Path, steps_per_epoch: Optional[int]) -> tuple:
    """(tensors, metadata, notes): the checkpoint of this project equivalent to the published file."""
    sd = state_dict_of(obj, path)
    layout = detect(sd)
    if layout is None:
        return backbone_only(sd, obj, path)
    method, repo, _, batch, spe, licence = LAYOUTS[layout]
    sd = drop_aliases(sd, path) if layout == "fastmoco" else sd
    names, left = rename(sd, renames(layout))
    queued = layout in ("mocov1", "mocov2")
    if [k for k in left if not (queued and k in ("queue", "queue_ptr"))]:
        extra = [k for k in left if k not in ("queue", "queue_ptr")]
        fail(f"{path}: {len(extra)} tensors that the {layout} layout does not have, e.g. {extra[0]}: supported "
             f"layouts are {supported()}")
    backbone = {n[len("backbone."):]: sd[o] for n, o in names.items() if n.startswith("backbone.")}
    if "conv1.weight" not in backbone:
        fail(f"{path}: a {layout} file without its online backbone: download it again")
    arch, small_stem = find_arch(backbone, obj.get("arch"), path)
    want = expected(method, arch, small_stem)
    bad = [n for n in names if tuple(sd[names[n]].shape) != want.get(n, ())]
    if bad:  # e.g. official MoCo v2 on a ResNet-18 has a 512-wide MLP, fastmoco.heads a 2048-wide one
        first = names[bad[0]]
        return backbone_only(sd, obj, path, layout, f"a {layout} file whose {first} (and {len(bad) - 1} more) has "
                             f"shape {tuple(sd[first].shape)}, where fastmoco.heads('{method}') of a {arch} has "
                             f"{want.get(bad[0], 'no such tensor')}")
    missing = sorted(set(want) - set(names)) + [q for q in ("queue", "queue_ptr") if queued and q not in sd]
    if missing:
        return backbone_only(sd, obj, path, layout, f"a {layout} file without {missing[0]} (and {len(missing) - 1} "
                             "more)")

    tensors = {n: sd[o] for n, o in names.items()}
    args = dict(method=method, arch=arch, image_size=224, small_stem=True if small_stem else None,
                data="ILSVRC/imagenet-1k")  # what pretrain.py records for the flags that rebuild this model
    if queued:  # official (128, K), a column per key; ours (K, 128), a row per key
        tensors.update(queue=sd["queue"].T.contiguous(), queue_ptr=torch.tensor(int(sd["queue_ptr"].reshape(-1)[0])))
        args["queue_size"] = None if sd["queue"].shape[1] == 65536 else sd["queue"].shape[1]
    if method == "fastmoco":
        args.update(grid=2, k=2)  # official config: split_num 2, combs 2
    opt, opt_note = optimizer_buffers(obj, sd, layout, names, online_order(method, arch, small_stem))
    tensors.update(opt)
    scaler = obj.get("scaler") if isinstance(obj.get("scaler"), dict) else {}  # MoCo v3: fp16 GradScaler
    tensors.update({f"scaler.{k}": torch.tensor(v) for k, v in scaler.items() if isinstance(v, (int, float))})
    tensors["rng.torch"] = torch.Generator().manual_seed(0).get_state()  # the file has none: a fresh, fixed state

    spe = steps_per_epoch or spe
    count = obj.get("last_iter" if layout == "fastmoco" else "epoch", 0)
    count = int(count) if isinstance(count, (int, float)) or torch.is_tensor(count) and count.numel() == 1 else 0
    step = count if layout == "fastmoco" else count * spe
    epoch = step / spe
    meta = dict(format="fastmoco-pretrain-v1", method=method, arch=arch, small_stem=small_stem, image_size=224,
                args=args, recipe=dict(source=f"the official {repo} recipe", batch_size=batch, epochs=round(epoch)),
                step=step, epoch=epoch, total_steps=step, skipped_steps=0,
                source=dict(file=path.name, layout=layout, repo=repo, license=licence,
                            published_linear_top1=PUBLISHED.get((method, round(epoch)))))
    return tensors, meta, [opt_note]


def md5(path: Path) -> str:
    """The digest the Fast-MoCo README lists for its files (d6ea9023... for e100)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@app.command()
def main(
    src: Annotated[Path, typer.Argument(help="Published checkpoint (.pth.tar): MoCo v1/v2/v3 ResNet, Fast-MoCo, or a "
                                             "backbone-only / linear-evaluation file.")],
    output: Annotated[Path, typer.Argument(help="Checkpoint of this project to write (.safetensors).")],
    steps_per_epoch: Annotated[Optional[int], typer.Option(
        help="Iterations per epoch of the source run, for the step a resume continues from. Default: ImageNet-1k at "
             "the official batch (MoCo v1/v2 5004, v3 312, Fast-MoCo 2503).")] = None,
):
    """Convert a published checkpoint into this project's format (safetensors, named keys)."""
    if output.suffix != ".safetensors":
        fail(f"{output} must end in .safetensors: the output is a checkpoint of this project")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        fail(f"--steps-per-epoch {steps_per_epoch} is out of range: use a positive number")
    try:
        runs.writable(output)  # before reading a file of hundreds of MB
    except OSError as e:
        fail(f"{e}: choose another output path")
    obj = read(src)
    tensors, meta, notes = convert(obj, src, steps_per_epoch)
    meta["source"]["md5"] = md5(src)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        ck.save_checkpoint(output, tensors, meta)  # atomic: a temporary file, then a rename
    except OSError as e:
        fail(f"{e}: choose another output path")
    parts = sorted({k.split(".")[0] for k in tensors})
    print(f"wrote {output}: {meta.get('method', 'backbone of')} {meta['arch']} from {src.name} "
          f"({meta['source']['layout']} layout, md5 {meta['source']['md5']}), {len(tensors)} tensors: "
          f"{', '.join(parts)}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    app()
