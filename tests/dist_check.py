"""Run by tests/test_distributed.py under `accelerate launch` with 2 CPU processes (gloo).

Each process takes its half of a seeded global batch; the gathered loss, the DDP-averaged gradients and the MoCo queue
must equal a single-process computation on the whole global batch. BN runs in eval mode (running statistics): torch's
SyncBatchNorm needs GPUs, and per-process batch statistics would differ from the global ones by construction.
"""

import sys

import torch
from accelerate import Accelerator

import fastmoco as fm

acc = Accelerator(cpu=True)
method = sys.argv[1]
assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
rank, world = fm.world()
assert (rank, world) == (acc.process_index, 2)

torch.manual_seed(0)
model = fm.OnlineEncoder(method, "resnet18", small_stem=True)
model.eval()  # see module docstring
target = fm.target_encoder(model).eval()
ref = fm.OnlineEncoder(method, "resnet18", small_stem=True).eval()
ref.load_state_dict(model.state_dict())
ddp = acc.prepare(model)

N = 4  # per process
TAU = 0.02  # small: at init the features are nearly parallel, and tau=1 would give ~log(2N) whatever the labels
x1, x2 = torch.randn(2 * N, 3, 32, 32), torch.randn(2 * N, 3, 32, 32)
mine = slice(rank * N, (rank + 1) * N)
queue = torch.nn.functional.normalize(torch.randn(16, 128), dim=1)
g = lambda: torch.Generator().manual_seed(7)  # noqa: E731  same shuffle-BN permutation on both processes

if method == "fastmoco":
    loss = fm.fastmoco_loss(ddp, target, x1[mine], x2[mine], TAU)
elif method == "mocov3":
    loss = fm.mocov3_loss(ddp, target, x1[mine], x2[mine], TAU)
else:
    loss, keys = fm.moco_loss(ddp, target, x1[mine], x2[mine], queue, 0.2, g())
    q2 = queue.clone()
    fm.enqueue(q2, 0, keys)
acc.backward(loss)
mean_loss = acc.reduce(loss.detach(), "mean")

# The single-process reference on the whole global batch (torch.distributed is not used below: world() would
# still report 2, so the reference computes its loss by hand).
if method == "fastmoco":
    (_, p1), (_, p2) = ref(x1, x2)
    k1, k2 = target(x1), target(x2)
    ref_loss = (fm.infonce(p1.reshape(6, 2 * N, -1), k2, TAU) + fm.infonce(p2.reshape(6, 2 * N, -1), k1, TAU)) / 2
elif method == "mocov3":
    (_, q1), (_, q2_) = ref(x1, x2)
    ref_loss = fm.infonce(q1, target(x2), TAU, two_tau=True) + fm.infonce(q2_, target(x1), TAU, two_tau=True)
else:
    ((_, q),) = ref(x1)
    k = torch.nn.functional.normalize(target(x2).float(), dim=1)
    ref_loss = fm.queue_loss(q, k, queue, 0.2)
    ref_queue = queue.clone()
    ref_queue[:2 * N] = k
    assert torch.allclose(q2, ref_queue, atol=1e-5), "queue differs from the single-process queue"
ref_loss.backward()

assert torch.allclose(mean_loss, ref_loss, rtol=1e-5, atol=1e-6), (mean_loss.item(), ref_loss.item())
for (name, p), r in zip(model.named_parameters(), ref.parameters()):
    if r.grad is not None or p.grad is not None:
        assert torch.allclose(p.grad, r.grad, rtol=1e-3, atol=1e-6), f"gradient of {name} differs"
# gather of a channels_last tensor (shuffle-BN gathers pretrain.py's channels_last views): rank order, values kept
local = (torch.arange(96.0).view(2, 3, 4, 4) + 100 * rank).contiguous(memory_format=torch.channels_last)
assert torch.equal(fm.gather(local), torch.cat([torch.arange(96.0).view(2, 3, 4, 4) + 100 * r for r in range(2)]))

print(f"OK rank {rank} local {acc.local_process_index} world {world} {method} loss {mean_loss.item():.6f} == {ref_loss.item():.6f}")
# leave the process group before exit: a gloo thread still running at interpreter exit can abort the process
# ("terminate called without an active exception", seen once under load) after every check above passed
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
