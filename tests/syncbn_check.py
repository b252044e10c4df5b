"""Run by tests/test_reliability.py under `accelerate launch` with 2 CPU processes (gloo).

fastmoco.SyncBatchNorm on the online and target encoders (MoCo v3: BN in the backbone and both heads, as the recipe's
sync_bn) in training mode: each process takes half of a global batch; the loss, the BN outputs' effect on the loss,
the gradients and the running statistics of both encoders must equal one process with plain BatchNorm on the whole
global batch.
"""

import torch
from accelerate import Accelerator

import fastmoco as fm

acc = Accelerator(cpu=True)
rank, world = fm.world()
assert acc.num_processes == 2 and (rank, world) == (acc.process_index, 2), "expected 2 processes"

torch.manual_seed(0)
ref = fm.OnlineEncoder("mocov3", "resnet18", small_stem=True)  # plain BatchNorm: the reference
ref_target = fm.target_encoder(ref)
model = fm.convert_sync_bn(fm.OnlineEncoder("mocov3", "resnet18", small_stem=True))
model.load_state_dict(ref.state_dict())
target = fm.convert_sync_bn(fm.target_encoder(model))
assert sum(isinstance(m, fm.SyncBatchNorm) for m in model.modules()) == sum(
    isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ref.modules()) > 20
ddp = acc.prepare(model)

N, TAU = 4, 0.2  # per process
x1, x2 = torch.randn(2 * N, 3, 32, 32) * 2 + 1, torch.randn(2 * N, 3, 32, 32)  # mean/var far from 0/1
mine = slice(rank * N, (rank + 1) * N)
loss = fm.mocov3_loss(ddp, target, x1[mine], x2[mine], TAU)
acc.backward(loss)
mean_loss = acc.reduce(loss.detach(), "mean")

(_, q1), (_, q2) = ref(x1, x2)
with torch.no_grad():
    k1, k2 = ref_target(x1), ref_target(x2)
ref_loss = fm.infonce(q1, k2, TAU, two_tau=True) + fm.infonce(q2, k1, TAU, two_tau=True)
ref_loss.backward()

assert torch.allclose(mean_loss, ref_loss, rtol=1e-5, atol=1e-6), (mean_loss.item(), ref_loss.item())
for (name, p), r in zip(model.named_parameters(), ref.parameters()):
    assert torch.allclose(p.grad, r.grad, rtol=1e-3, atol=1e-6), f"gradient of {name} differs"
for mine_sd, ref_sd in ((model.state_dict(), ref.state_dict()), (target.state_dict(), ref_target.state_dict())):
    assert mine_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        if "running" in k or "num_batches" in k:
            assert torch.allclose(mine_sd[k].float(), ref_sd[k].float(), rtol=1e-4, atol=1e-6), f"{k} differs"
print(f"OK rank {rank} syncbn loss {mean_loss.item():.6f} == {ref_loss.item():.6f}")
