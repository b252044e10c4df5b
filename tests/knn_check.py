"""Run by tests/test_knn.py under `accelerate launch` with 2 CPU processes (gloo), on streamed parquet of 3 train
shards: the kNN monitor (knn.knn_top1, uneven shares gathered) and the streamed linear probe (linear_probe.main),
each process recording a fingerprint of every image it decodes. Writes OUT/rank{r}.json; the test checks them.

    python tests/knn_check.py DATA OUT
"""

import hashlib
import json
import sys
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

import fastmoco as fm
import knn
import linear_probe

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # see tests/test_knn.py
data, out = sys.argv[1], Path(sys.argv[2])
acc = Accelerator(cpu=True)
assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
rank = acc.process_index


def fingerprint(img) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()[:16]


decoded = []
load_rgb = knn.load_rgb


def counting_load_rgb(value):  # the kNN's streamed decode
    img = load_rgb(value)
    decoded.append(fingerprint(img))
    return img


knn.load_rgb = counting_load_rgb
torch.manual_seed(0)
backbone = fm.resnet("resnet18", False)
splits = [datasets.load_dataset("parquet", data_dir=data, split=s, streaming=True) for s in ("train", "test")]
result = dict(rank=rank, knn=[], knn_decoded=[])
for bank_size in (0, 20):
    decoded.clear()
    result["knn"].append(knn.knn_top1(backbone, *splits, "image", 32, acc, bank_size))
    result["knn_decoded"].append(list(decoded))

decoded.clear()  # the streamed probe: its train transform counts the augmented decodes
probe_transforms = linear_probe.probe_transforms
linear_probe.probe_transforms = lambda size: (lambda img: decoded.append(fingerprint(img)) or
                                              probe_transforms(size)[0](img), probe_transforms(size)[1])
save_file(backbone.state_dict(), str(out / f"tv{rank}.safetensors"))
linear_probe.main(out / f"tv{rank}.safetensors", data=data, arch="resnet18", image_size=32, batch_size=8, epochs=2,
                  workers=0, streaming=True, recipe=linear_probe.Recipe.small, output_dir=out / "probe")
result["probe_decoded"] = list(decoded)
(out / f"rank{rank}.json").write_text(json.dumps(result))
