"""Export a checkpoint's backbone as a timm model folder (the layout timm's push_to_hf_hub writes), optionally uploaded
to the Hugging Face Hub.

    python -m transfer.export_timm runs/pretrain/ckpt.safetensors runs/hub/r50 --results runs/linear/results.json
    python -m transfer.export_timm runs/official/fastmoco-e100.safetensors runs/hub/e100 --push-to-hub me/fastmoco-r50

The folder holds model.safetensors (the online backbone; timm's ResNet uses torchvision's key names, so the tensors are
written unchanged), config.json (architecture, num_classes 0, num_features, global_pool, pretrained_cfg with this
project's evaluation preprocessing) and README.md (a model card). Load it with
timm.create_model("local-dir:FOLDER", pretrained=True) or, once uploaded, "hf-hub:REPO".
The CIFAR small stem (3x3 conv1, no max-pool) is refused: timm's ResNet cannot build it, so a timm user would get a
model that silently differs from the one trained.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from safetensors import SafetensorError
from safetensors.torch import save_file


if not __package__:  # run as a file (python transfer/NAME.py), not with -m: the project's modules are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backbones
import checkpoints as ck
import runs
from cli import fail
from data import MEAN, STD


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

PAPERS = {"fastmoco": "Fast-MoCo (Ci et al., ECCV 2022, arXiv:2207.08220)",
          "mocov3": "MoCo v3 (Chen, Xie and He, ICCV 2021, arXiv:2104.02057)",
          "mocov2": "MoCo v2 (Chen, Fan, Girshick and He, 2020, arXiv:2003.04297)",
          "mocov1": "MoCo (He et al., CVPR 2020, arXiv:1911.05722)",
          "byol": "BYOL (Grill et al., NeurIPS 2020, arXiv:2006.07733)",
          "simsiam": "SimSiam (Chen and He, CVPR 2021, arXiv:2011.10566)",
          "nnclr": "NNCLR (Dwibedi et al., ICCV 2021, arXiv:2104.14548)"}


def timm_config(arch: str, dim: int, image_size: int, net=None, kwargs: dict = None) -> dict:
    """config.json as timm's save_config_for_hf writes it. The preprocessing is this project's evaluation view
    (data.clean_transform): bilinear resize by 256/224 above 64 px, centre crop, ImageNet mean/std. net: a timm
    backbone (its own first conv, classifier and pooling; kwargs: the timm arguments it was built with)."""
    config = dict(architecture=arch, num_classes=0, num_features=dim, global_pool="avg", pretrained_cfg=dict(
        tag="fastmoco", custom_load=False, input_size=[3, image_size, image_size], fixed_input_size=False,
        interpolation="bilinear", crop_pct=0.875 if image_size > 64 else 1.0, crop_mode="center", mean=list(MEAN),
        std=list(STD), num_classes=0, pool_size=[-(-image_size // 32)] * 2, first_conv="conv1", classifier="fc"))
    if net is not None:
        pool = getattr(net, "global_pool", "avg")
        config.update(global_pool=pool if isinstance(pool, str) else getattr(pool, "pool_type", "avg"),
                      model_args=dict(kwargs or {}))
        config["pretrained_cfg"].update({k: net.pretrained_cfg[k] for k in ("first_conv", "classifier")})
        config["pretrained_cfg"].pop("pool_size")
    return config


def dataset_id(meta: dict) -> Optional[str]:
    """The Hub id of the pretraining data, when it was one (local folders and 'demo' name no Hub dataset)."""
    data = (meta.get("args") or {}).get("data") if isinstance(meta.get("args"), dict) else None
    if not data or data == "demo" or data.startswith(("/", ".", "~")) or Path(data).exists() or data.count("/") != 1:
        return None
    return data


def results_table(paths: list, arch: str) -> str:
    """Markdown rows for linear_probe.py / semisup.py results.json files (checked to be of this architecture)."""
    rows = []
    for p in paths:
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            fail(f"--results {p} is not a readable results.json ({e}): pass the file linear_probe.py or semisup.py "
                 "wrote")
        if not isinstance(r, dict) or "top1" not in r:
            fail(f"--results {p} has no top1: pass a results.json written by linear_probe.py or semisup.py")
        if r.get("arch", arch) != arch:
            fail(f"--results {p} is for a {r['arch']}, not this {arch}: pass the results of this checkpoint")
        kind = (f"semi-supervised, {r['labelled_fraction']:g} of the labels" if "labelled_fraction" in r else
                "linear probe" + (" (cached features)" if r.get("cached_features") else ""))
        top5 = f"{r['top5']:.2f}" if isinstance(r.get("top5"), (int, float)) else "-"
        rows.append(f"| {kind} | {r['top1']:.2f} | {top5} | {r.get('epochs', '-')} | {r.get('train_images', '-')} | "
                    f"{r.get('classes', '-')} | {r.get('val_split', '-')} |")
    return "\n".join(["| evaluation | top-1 | top-5 | epochs | train images | classes | split |",
                      "|---|---|---|---|---|---|---|", *rows])


def model_card(meta: dict, arch: str, licence: str, results: list, repo: Optional[str]) -> str:
    """README.md: front matter the Hub reads (library_name timm, tags, license, datasets), then what the weights are."""
    method, source = meta.get("method"), meta.get("source") if isinstance(meta.get("source"), dict) else {}
    data = dataset_id(meta)
    tags = ["image-feature-extraction", "timm", "self-supervised-learning", *([method] if method else [])]
    front = ["---", "library_name: timm", f"license: {licence}", "pipeline_tag: image-feature-extraction", "tags:",
             *[f"- {t}" for t in tags]] + (["datasets:", f"- {data}"] if data else []) + ["---"]
    epochs = meta.get("epoch")
    lines = [f"# {arch}, {PAPERS.get(method, 'self-supervised')} pretraining", "",
             f"- **Method:** {PAPERS.get(method, method or 'not recorded in the checkpoint')}",
             f"- **Architecture:** timm / torchvision `{arch}`, no classifier (`num_classes=0`: pooled features)",
             f"- **Pretraining epochs:** {epochs:g}" if isinstance(epochs, (int, float)) else
             "- **Pretraining epochs:** not recorded",
             f"- **Pretraining data:** {data or (meta.get('args') or {}).get('data', 'not recorded')}",
             f"- **Image size:** {meta.get('image_size', 224)}"]
    if source:
        lines.append(f"- **Source:** `{source.get('file')}` from {source.get('repo', 'a published file')}, imported "
                     f"with this project's transfer/import_weights.py (md5 {source.get('md5', 'not recorded')})")
        if source.get("published_linear_top1"):
            lines.append(f"- **Published linear top-1 (ImageNet-1k):** {source['published_linear_top1']} (the "
                         "authors' number, not measured here)")
    recipe = meta.get("recipe")
    if isinstance(recipe, dict):
        lines += ["", "## Recipe", "", *[f"- `{k}`: {v}" for k, v in recipe.items()]]
    lines += ["", "## Results", "", results_table(results, arch) if results else
              "No evaluation results were attached (export with `--results results.json` from linear_probe.py or "
              "semisup.py)."]
    name = f"hf-hub:{repo}" if repo else "local-dir:PATH/TO/THIS/FOLDER"
    lines += ["", "## Usage", "", "```python", "import timm", "",
              f'model = timm.create_model("{name}", pretrained=True)  # (N, 3, H, W) -> (N, {meta["dim"]})',
              "cfg = timm.data.resolve_data_config({}, model=model)", "transform = timm.data.create_transform(**cfg)",
              "```", ""]
    return "\n".join(front + lines)


def write_folder(out: Path, files: dict):
    """Write {name: writer(path)} into a temporary sibling folder, then move it to `out` (replacing an earlier export
    only after the new one is complete), so `out` is never a half-written folder."""
    if out.exists() and not (out / "config.json").is_file():
        fail(f"{out} exists and is not an earlier export (no config.json): pass a new folder")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        ck.share_as_umask_says(tmp)  # mkdtemp makes it 0700, and the rename keeps that
        for name, write in files.items():
            write(tmp / name)
            ck.share_as_umask_says(tmp / name)  # save_file writes 0600
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:  # the folder or its parent went away, a full disk
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        fail(f"cannot write {out}: {getattr(e, 'strerror', None) or e}: choose another output folder")


def push(out: Path, repo: str):
    """Upload the folder to the Hub repository `repo` (created if needed), or fail with one line."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        fail(f"HF_HUB_OFFLINE is set, so nothing was uploaded; {out} is complete: rerun with the Hub reachable, or "
             f"upload it later with `hf upload {repo} {out}`")
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(out), commit_message="Add model (fastmoco export)")
    except Exception as e:  # no network, no token, no permission: huggingface_hub / httpx raise many types
        fail(f"cannot upload to {repo} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
             f"{out} is complete: log in with `hf auth login` and rerun, or upload it later with "
             f"`hf upload {repo} {out}`")
    print(f"uploaded {out} to https://huggingface.co/{repo}")


@app.command()
def main(
    ckpt: Annotated[Path, typer.Argument(help="pretrain.py or transfer/import_weights.py checkpoint, or torchvision "
                                              "ResNet weights (safetensors).")],
    output: Annotated[Path, typer.Argument(help="Folder to write (model.safetensors, config.json, README.md).")],
    results: Annotated[Optional[List[Path]], typer.Option(
        help="results.json of linear_probe.py / semisup.py on this checkpoint, shown in the model card "
             "(repeatable).")] = None,
    license: Annotated[Optional[str], typer.Option(
        help="Hub licence id of the weights. Default: the source's for imported weights (MoCo: cc-by-nc-4.0), "
             "else 'unknown' -- set the one you release your weights under.")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(
        help="Also upload the folder to this Hub repository (user/name), with huggingface_hub.")] = None,
):
    """Write CKPT's backbone as a timm model folder (timm's push_to_hf_hub layout); optionally upload it."""
    try:
        runs.writable(output, folder=True)
    except OSError as e:
        fail(f"{e}: choose another output folder")
    try:
        net, meta = backbones.load(ckpt)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    arch = meta["arch"]
    if meta["small_stem"]:
        fail(f"{ckpt} has the CIFAR small stem (3x3 stride-1 conv1, no max-pool), which timm's {arch} cannot build: "
             "export a standard-stem checkpoint, or load backbone.* into fastmoco.resnet(arch, small_stem=True)")
    if push_to_hub is not None and push_to_hub.count("/") != 1:
        fail(f"--push-to-hub {push_to_hub} is not a Hub repository id: use user/name")
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    licence = license or source.get("license") or "unknown"
    meta = dict(meta, dim=net.dim)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}  # timm's ResNet names = torchvision's
    config = timm_config(arch, net.dim, meta.get("image_size") or 224,
                         None if backbones.is_torchvision(arch) else net, meta.get("arch_kwargs"))
    card = model_card(meta, arch, licence, results or [], push_to_hub)
    write_folder(output, {
        "model.safetensors": lambda p: save_file(state, str(p), metadata={"format": "pt"}),
        "config.json": lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
        "README.md": lambda p: p.write_text(card)})
    print(f"wrote {output}: {arch} backbone ({meta.get('method') or 'torchvision weights'}), {len(state)} tensors, "
          f"{net.dim} features; licence {licence}")
    if push_to_hub:
        push(output, push_to_hub)


if __name__ == "__main__":
    app()
