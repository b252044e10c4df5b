"""Unit tests for fastmoco.py.

Every check compares the vectorised code against an independent, deliberately slow reference: explicit Python
loops, the `math` module on Python floats, hand-computed closed forms, or torch's own optimizers / torchvision's own
models. Everything runs on CPU with tiny tensors (resnet18 with small_stem=True and 16-32 px images where a model
is needed).
"""

import itertools
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoints as ck
import fastmoco as fm  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spin-waiting made
    the 2-thread run of the Fast-MoCo training test ~25x slower (127 s vs 5 s). Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- slow references

def _unit(v):
    """A 1-D tensor as a Python list of floats scaled to unit L2 norm (math.sqrt, no F.normalize)."""
    v = [float(a) for a in v]
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _ce(logits, label):
    """-log softmax(logits)[label] with math.exp / math.log on Python floats."""
    return -math.log(math.exp(logits[label]) / sum(math.exp(s) for s in logits))


def ref_infonce(q, k, tau, offset=0):
    """q: (N, d) or (R, N, d); k: (M, d). Mean over rows (r, i) of the cross-entropy whose positive is key
    offset + i, logits = cos(q, k_j) / tau. Pure Python."""
    q = q.double()
    if q.dim() == 2:
        q = q[None]
    keys = [_unit(row) for row in k.double()]
    losses = []
    for r in range(q.shape[0]):
        for i in range(q.shape[1]):
            qi = _unit(q[r, i])
            losses.append(_ce([_dot(qi, kj) / tau for kj in keys], offset + i))
    return sum(losses) / len(losses)


def ref_queue_loss(q, k, queue, tau):
    """MoCo: logits [q.k, q.queue_0, ..., q.queue_{K-1}] / tau (q, k L2-normalised), label 0. Pure Python."""
    losses = []
    negs = [[float(a) for a in row] for row in queue.double()]
    for i in range(q.shape[0]):
        qi, ki = _unit(q[i].double()), _unit(k[i].double())
        losses.append(_ce([_dot(qi, ki) / tau] + [_dot(qi, n) / tau for n in negs], 0))
    return sum(losses) / len(losses)


def tiny_moco(method, **kw):
    torch.manual_seed(0)
    return fm.OnlineEncoder(method, "resnet18", small_stem=True, **kw)


# ----------------------------------------------------------------------------- divide / combine

@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("N", [1, 3, 5])
@pytest.mark.parametrize("HW", [(12, 12), (12, 24)])
def test_divide_matches_loop_slices(n, N, HW):
    """Row p*N + i of divide(x, n) is patch p = r*n + c (row by row) of image i: x[i, :, r*h:(r+1)*h, c*w:(c+1)*w]."""
    torch.manual_seed(0)
    H, W = HW
    x = torch.randn(N, 3, H, W)
    out = fm.divide(x, n)
    h, w = H // n, W // n
    assert out.shape == (n * n * N, 3, h, w)
    for i in range(N):
        for r in range(n):
            for c in range(n):
                p = r * n + c
                assert torch.equal(out[p * N + i], x[i, :, r * h:(r + 1) * h, c * w:(c + 1) * w]), (i, r, c)


def test_divide_indivisible_size_raises():
    """A 32 px image cannot be cut into a 3x3 grid of equal patches: it must fail loudly, not mis-slice."""
    with pytest.raises((RuntimeError, ValueError)):
        fm.divide(torch.zeros(2, 3, 32, 32), 3)


PK = [(4, 1), (4, 2), (4, 3), (9, 2), (16, 2)]


@pytest.mark.parametrize("P,k", PK)
def test_combinations_weights(P, k):
    """One row per k-subset in itertools (lexicographic) order, weight 1/k on its members, 0 elsewhere."""
    w = fm.combinations(P, k)
    subsets = list(itertools.combinations(range(P), k))
    assert w.shape == (math.comb(P, k), P) == (len(subsets), P)
    for c, s in enumerate(subsets):
        for p in range(P):
            expect = torch.tensor(1.0 / k).item() if p in s else 0.0  # 1/k rounded to float32
            assert w[c, p].item() == expect, (c, p)


@pytest.mark.parametrize("P,k", PK)
@pytest.mark.parametrize("N", [1, 3])
def test_combine_matches_loop_means(P, k, N):
    """Row c*N + i is the mean of image i's patch embeddings f[p*N + i] over the c-th k-subset (explicit sums)."""
    torch.manual_seed(0)
    D = 5
    f = torch.randn(P * N, D, dtype=torch.float64)
    out = fm.combine(f, P, k)
    C = math.comb(P, k)
    assert out.shape == (C * N, D) and out.dtype == torch.float64
    for c, s in enumerate(itertools.combinations(range(P), k)):
        for i in range(N):
            for d in range(D):
                expect = sum(f[p * N + i, d].item() for p in s) / k
                # rel 1e-7, not 1e-12: combinations() builds its 1/k weights in float32 even for float64 input
                assert out[c * N + i, d].item() == pytest.approx(expect, rel=1e-7, abs=1e-9), (c, i, d)


@pytest.mark.parametrize("P,k", [(4, 2), (4, 3), (9, 2)])
def test_combine_keeps_dtype_bfloat16(P, k):
    """bfloat16 in, bfloat16 out, values close to the float64 means."""
    torch.manual_seed(0)
    N, D = 3, 8
    f = torch.randn(P * N, D).bfloat16()
    out = fm.combine(f, P, k)
    assert out.dtype == torch.bfloat16 and out.shape == (math.comb(P, k) * N, D)
    f64 = f.double()
    for c, s in enumerate(itertools.combinations(range(P), k)):
        for i in range(N):
            expect = sum(f64[p * N + i] for p in s) / k
            torch.testing.assert_close(out[c * N + i].double(), expect, atol=3e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("tau", [1.0, 0.2, 0.07])
@pytest.mark.parametrize("R", [None, 1, 3])
def test_infonce_matches_formula(tau, R):
    """Single process (offset 0, M = N keys), q of shape (N, d) or (R, N, d); unnormalised inputs."""
    torch.manual_seed(0)
    N, d = 4, 6
    q = torch.randn(N, d) * 3 if R is None else torch.randn(R, N, d) * 3
    k = torch.randn(N, d) * 0.5
    got = fm.infonce(q, k, tau).item()
    assert got == pytest.approx(ref_infonce(q, k, tau), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("ws", [2, 3, 4])
@pytest.mark.parametrize("R", [None, 6])
def test_infonce_offset_with_gathered_keys(ws, R):
    """Keys gathered from ws processes (M = ws*N): on rank r the positive of local query i is key r*N + i."""
    torch.manual_seed(ws)
    N, d, tau = 3, 5, 0.5
    k = torch.randn(ws * N, d)
    for rank in range(ws):
        q = torch.randn(N, d) if R is None else torch.randn(R, N, d)
        got = fm.infonce(q, k, tau, offset=rank * N).item()
        assert got == pytest.approx(ref_infonce(q, k, tau, rank * N), rel=1e-5, abs=1e-6), rank
    # a wrong offset must give a different value (the test can tell positives apart)
    q = torch.randn(N, d)
    assert fm.infonce(q, k, tau, offset=N).item() != pytest.approx(ref_infonce(q, k, tau, 0), rel=1e-3)


@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_infonce_two_tau(tau):
    """two_tau=True is the plain loss times 2*tau (MoCo v3)."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 8), torch.randn(4, 8)
    got = fm.infonce(q, k, tau, two_tau=True).item()
    assert got == pytest.approx(2 * tau * ref_infonce(q, k, tau), rel=1e-5)
    assert fm.infonce(q, k, tau, two_tau=False).item() == pytest.approx(ref_infonce(q, k, tau), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.1])
def test_infonce_hand_computed_orthogonal(tau):
    """q = (3 e1, 2 e2), k = (e1, e2): each row has logits (1/tau, 0), so loss = log(1 + exp(-1/tau)).
    Swapping the keys makes every positive orthogonal: loss = log(1 + exp(1/tau))."""
    q = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # abs 1e-6: float32 log-sum-exp of logits of size 1/tau
    assert fm.infonce(q, k, tau).item() == pytest.approx(math.log(1 + math.exp(-1 / tau)), rel=1e-6, abs=1e-6)
    assert fm.infonce(q, k.flip(0), tau).item() == pytest.approx(math.log(1 + math.exp(1 / tau)), rel=1e-6)


@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_queue_loss_matches_formula(tau):
    """Logits [l_pos, l_neg(queue)] / tau, label 0; q and k unnormalised, queue of unit keys (as stored)."""
    torch.manual_seed(0)
    N, d, K = 4, 8, 10
    q, k = torch.randn(N, d) * 2, torch.randn(N, d) * 0.3
    queue = torch.nn.functional.normalize(torch.randn(K, d), dim=1)
    got = fm.queue_loss(q, k, queue, tau).item()
    assert got == pytest.approx(ref_queue_loss(q, k, queue, tau), rel=1e-5, abs=1e-6)


def test_queue_loss_hand_computed():
    """q = k = e1, queue = (e2, -e1): logits (1, 0, -1)/tau, loss = -log(e^{1/t} / (e^{1/t} + 1 + e^{-1/t}))."""
    t = 0.5
    q = k = torch.tensor([[2.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    expect = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1 + math.exp(-1 / t)))
    assert fm.queue_loss(q, k, queue, t).item() == pytest.approx(expect, rel=1e-6)


# ----------------------------------------------------------------------------- EMA and queue

def _pairs(seed=0):
    """(target, online): two modules with parameters of the same names, as ema_update takes them."""
    torch.manual_seed(seed)
    return tuple(nn.ParameterList([torch.randn(3, 4), torch.randn(5)]) for _ in range(2))


def test_ema_update_m0_copies_online():
    t, o = _pairs()
    fm.ema_update(t, o, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(t, o))


def test_ema_update_m1_keeps_target():
    t, o = _pairs()
    before = [a.clone() for a in t]
    fm.ema_update(t, o, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(t, before))


@pytest.mark.parametrize("m", [0.9, 0.99])
def test_ema_update_per_element(m):
    """target <- m*target + (1-m)*online, checked element by element with Python floats; online untouched."""
    t, o = _pairs()
    t0 = [a.clone() for a in t]
    o0 = [a.clone() for a in o]
    fm.ema_update(t, o, m)
    for a, a0, b in zip(t, t0, o):
        for x, x0, y in zip(a.flatten().tolist(), a0.flatten().tolist(), b.flatten().tolist()):
            assert x == pytest.approx(m * x0 + (1 - m) * y, rel=1e-6, abs=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(o, o0))


def test_ema_update_leaves_bn_buffers_alone():
    """The EMA averages parameters only, not BN running statistics: the target keeps its own buffers."""
    model = tiny_moco("mocov3")
    target = fm.target_encoder(model)
    model.backbone.bn1.running_mean.fill_(5.0)
    fm.ema_update(target, model, 0.0)
    assert torch.equal(target.backbone.bn1.running_mean, torch.zeros(64))


def test_ema_update_matches_parameters_by_name():
    """Each target parameter moves towards the online parameter of the same name, whatever the two modules' orders;
    the online predictor (no target counterpart) is left out. Reference: a loop over names on Python floats."""
    model = tiny_moco("mocov3")
    target = fm.target_encoder(model)
    shuffled = nn.Module()  # the same parameters registered in another order: projector first
    shuffled.projector, shuffled.predictor, shuffled.backbone = model.projector, model.predictor, model.backbone
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before, online = {n: p.clone() for n, p in target.named_parameters()}, dict(model.named_parameters())
    fm.ema_update(target, shuffled, 0.9)
    for n, p in target.named_parameters():
        for x, x0, y in list(zip(p.flatten().tolist(), before[n].flatten().tolist(),
                                 online[n].flatten().tolist()))[:50]:
            assert x == pytest.approx(0.9 * x0 + 0.1 * y, rel=1e-5, abs=1e-6), n
    assert not any(n.startswith("predictor") for n, _ in target.named_parameters())


def test_make_queue_unit_rows_same_draws():
    """(K, dim) unit rows, the draws of normalize(randn(K, dim)) (what checkpoints of earlier runs hold)."""
    torch.manual_seed(4)
    q = fm.make_queue(16, 8)
    torch.manual_seed(4)
    ref = torch.randn(16, 8)
    assert q.shape == (16, 8) and q.device.type == "cpu"
    for row, r in zip(q.tolist(), ref.tolist()):
        norm = math.sqrt(sum(v * v for v in r))
        assert row == pytest.approx([v / norm for v in r], abs=1e-6)


@pytest.mark.parametrize("method", fm.METHODS)
def test_module_docstring_example_runs(method):
    """The training step in fastmoco's docstring runs as written for every method: the online encoder moves, and the
    MoCo v1/v2 keys fill the queue."""
    code = textwrap.dedent(fm.__doc__.split("in seconds:\n\n")[1].split("\n\nWith several")[0])
    assert code.count("\n") >= 15 and code.startswith("import torch") and 'method, B, total = "fastmoco"' in code
    ns = {"fm": fm}  # the docstring's "this module imported as `fm`"
    exec(code.replace('"fastmoco"', repr(method), 1), ns)
    assert torch.isfinite(ns["loss"]) and ns["ptr"] == (ns["B"] if method in ("mocov1", "mocov2") else 0)
    assert all(p.grad is not None for p in ns["model"].parameters()) and ns["optimizer"].state  # backward, step
    # the EMA ran before the forward (target = online at init), then the step moved the online encoder, unless the
    # warmup starts at lr 0 (MoCo v3)
    moved = [not torch.equal(a, b) for a, b in zip(ns["model"].parameters(), ns["target"].parameters())]
    assert any(moved) == (ns["optimizer"].param_groups[0]["lr"] > 0)


def test_fastmoco_py_alone_runs_its_docstring_example(tmp_path):
    """Copy-pasteable, checked: fastmoco.py copied alone into an empty folder runs its docstring example in a fresh
    interpreter whose path holds nothing of this project (a stray project import would fail here)."""
    shutil.copy(ROOT / "fastmoco.py", tmp_path / "fastmoco.py")
    code = textwrap.dedent(fm.__doc__.split("in seconds:\n\n")[1].split("\n\nWith several")[0])
    check = "import importlib.util as u\nassert not any(u.find_spec(m) for m in ('data', 'runs', 'pretrain'))\n"
    (tmp_path / "example.py").write_text(check + "import fastmoco as fm\n" + code + "\nprint('loss', float(loss))\n")
    p = subprocess.run([sys.executable, "-E", "-s", "example.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)  # -E -s: no PYTHONPATH, no user site; the script's folder comes first
    assert p.returncode == 0, p.stderr[-2000:]
    assert math.isfinite(float(p.stdout.split("loss")[-1]))


@pytest.mark.parametrize("K,n", [(8, 2), (10, 3), (7, 7), (5, 4)])
def test_enqueue_fifo_matches_list_simulation(K, n):
    """Pointer advances by n mod K; the queue content equals a Python list ring buffer, across several wraps."""
    d = 3
    queue = torch.full((K, d), -1.0)
    sim, ptr, sim_ptr = [[-1.0] * d for _ in range(K)], 0, 0
    for step in range(7):
        keys = torch.arange(step * n * d, (step + 1) * n * d, dtype=torch.float32).reshape(n, d)
        ptr = fm.enqueue(queue, ptr, keys)
        for row in keys.tolist():
            sim[sim_ptr] = row
            sim_ptr = (sim_ptr + 1) % K
        assert ptr == sim_ptr == ((step + 1) * n) % K
        assert queue.tolist() == sim, step


def test_enqueue_casts_to_queue_dtype():
    queue = torch.zeros(4, 2, dtype=torch.bfloat16)
    ptr = fm.enqueue(queue, 3, torch.ones(2, 2, dtype=torch.float32))
    assert ptr == 1 and queue.dtype == torch.bfloat16
    assert queue.float().tolist() == [[1, 1], [0, 0], [0, 0], [1, 1]]


# ----------------------------------------------------------------------------- schedules

def test_lr_fastmoco_recipe_endpoints():
    """Fast-MoCo: base 0.1, 1 warmup epoch from 0.025 (warmup_from 0.25), then cosine to 0."""
    total, warmup = 1000, 100
    lr = lambda s: fm.lr_at(s, total, 0.1, warmup=warmup, warmup_from=0.25)  # noqa: E731
    assert lr(0) == pytest.approx(0.025, abs=1e-12)
    assert lr(50) == pytest.approx(0.025 + (0.1 - 0.025) * 0.5, abs=1e-12)  # linear halfway
    assert lr(warmup) == pytest.approx(0.1, abs=1e-12)
    assert lr(total - 1) < 1e-5 * 0.1 * 100  # ~0 at the last step
    assert lr(total) == pytest.approx(0.0, abs=1e-15)
    # cosine midpoint
    assert lr(warmup + (total - warmup) // 2) == pytest.approx(0.05, abs=1e-12)
    after = [lr(s) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(after, after[1:])) and after[0] > after[-1]
    during = [lr(s) for s in range(0, warmup + 1)]
    assert all(a < b for a, b in zip(during, during[1:]))


def test_lr_cosine_formula_no_warmup():
    for s in [0, 1, 37, 99, 100]:
        expect = 0.5 * 0.3 * (1 + math.cos(math.pi * s / 100))
        assert fm.lr_at(s, 100, 0.3) == pytest.approx(expect, abs=1e-12)


def test_lr_step_decay_milestones():
    """MoCo v1: lr 0.03 times 0.1 at 120 and 160 (of 200)."""
    ms = (120, 160)
    assert fm.lr_at(0, 200, 0.03, milestones=ms) == pytest.approx(0.03)
    assert fm.lr_at(119, 200, 0.03, milestones=ms) == pytest.approx(0.03)
    assert fm.lr_at(120, 200, 0.03, milestones=ms) == pytest.approx(0.003)
    assert fm.lr_at(159, 200, 0.03, milestones=ms) == pytest.approx(0.003)
    assert fm.lr_at(160, 200, 0.03, milestones=ms) == pytest.approx(0.0003)
    assert fm.lr_at(199, 200, 0.03, milestones=ms) == pytest.approx(0.0003)
    # with a warmup first
    assert fm.lr_at(0, 200, 0.03, warmup=10, milestones=ms) == pytest.approx(0.0)
    assert fm.lr_at(10, 200, 0.03, warmup=10, milestones=ms) == pytest.approx(0.03)


def test_momentum_constant_and_cosine():
    assert all(fm.momentum_at(s, 100, 0.99) == 0.99 for s in (0, 50, 100))
    m = 0.99
    assert fm.momentum_at(0, 100, m, cosine=True) == pytest.approx(m, abs=1e-12)
    assert fm.momentum_at(50, 100, m, cosine=True) == pytest.approx((1 + m) / 2, abs=1e-12)
    assert fm.momentum_at(100, 100, m, cosine=True) == pytest.approx(1.0, abs=1e-12)
    vals = [fm.momentum_at(s, 100, m, cosine=True) for s in range(101)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


# ----------------------------------------------------------------------------- LARS / optimizer

def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def test_lars_1d_params_equal_sgd_momentum():
    """1-D params (biases, BN) get neither weight decay nor trust scaling: LARS == SGD(momentum 0.9, wd 0)."""
    torch.manual_seed(0)
    shapes = [(7,), (3,)]
    init = [torch.randn(s) for s in shapes]
    pa = [nn.Parameter(t.clone()) for t in init]
    pb = [nn.Parameter(t.clone()) for t in init]
    lars = fm.LARS(pa, lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    sgd = torch.optim.SGD(pb, lr=0.1, momentum=0.9, weight_decay=0.0)
    for gs in _grads(shapes, 5):
        for p, q, g in zip(pa, pb, gs):
            p.grad, q.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
        for p, q in zip(pa, pb):
            torch.testing.assert_close(p.data, q.data, rtol=1e-6, atol=1e-7)


def test_lars_2d_explicit_formula_two_steps():
    """2-D param: d = g + wd*p, d *= tc*||p||/||d||, mu = 0.9*mu + d, p -= lr*mu; element-wise with floats."""
    torch.manual_seed(0)
    lr, wd, tc, mom = 0.2, 0.01, 0.001, 0.9
    p = nn.Parameter(torch.randn(4, 3))
    opt = fm.LARS([p], lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=tc)
    cur = p.detach().flatten().tolist()
    mu = [0.0] * len(cur)
    for g in _grads([(4, 3)], 2, seed=1):
        gl = g[0].flatten().tolist()
        d = [gi + wd * pi for gi, pi in zip(gl, cur)]
        ratio = tc * math.sqrt(sum(x * x for x in cur)) / math.sqrt(sum(x * x for x in d))
        mu = [mom * m + ratio * di for m, di in zip(mu, d)]
        cur = [pi - lr * m for pi, m in zip(cur, mu)]
        p.grad = g[0].clone()
        opt.step()
        for a, b in zip(p.detach().flatten().tolist(), cur):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_lars_2d_ratio_one_equals_sgd():
    """With tc = ||g + wd*p|| / ||p|| the trust ratio is 1: the first step equals SGD(momentum, wd)."""
    torch.manual_seed(0)
    lr, wd = 0.3, 0.05
    p0, g = torch.randn(5, 4), torch.randn(5, 4)
    tc = (torch.linalg.vector_norm(g + wd * p0) / torch.linalg.vector_norm(p0)).item()
    pa, pb = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    lars = fm.LARS([pa], lr=lr, weight_decay=wd, momentum=0.9, trust_coefficient=tc)
    sgd = torch.optim.SGD([pb], lr=lr, momentum=0.9, weight_decay=wd)
    pa.grad, pb.grad = g.clone(), g.clone()
    lars.step()
    sgd.step()
    torch.testing.assert_close(pa.data, pb.data, rtol=1e-5, atol=1e-6)
    assert not torch.equal(pa.data, p0)


def test_lars_zero_param_falls_back_to_ratio_one():
    """||p|| = 0 (e.g. a zero-initialised weight): no trust scaling (ratio 1), no NaN."""
    p = nn.Parameter(torch.zeros(2, 2))
    opt = fm.LARS([p], lr=0.5, weight_decay=0.1)
    p.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(p.data, torch.full((2, 2), -0.5))


class _Tiny(nn.Module):
    """Duck-typed stand-in for OnlineEncoder (backbone / projector / predictor) small enough for many optimizer steps."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.projector = nn.Linear(8, 4)
        self.predictor = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 4))

    def forward(self, x):
        return self.predictor(self.projector(self.backbone(x)))


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_make_optimizer_fixed_predictor_lr(name):
    """fix_predictor_lr: predictor params form their own group whose lr set_lr never changes."""
    torch.manual_seed(0)
    model = _Tiny()
    opt = fm.make_optimizer(model, name, lr=0.05, weight_decay=1e-4, fix_predictor_lr=True)
    assert len(opt.param_groups) == 2
    pred = {id(p) for p in model.predictor.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == pred
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()} - pred
    fm.set_lr(opt, 0.01)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[1]["lr"] == 0.05
    for g in opt.param_groups:
        assert g["weight_decay"] == 1e-4 and g["momentum"] == 0.9
    assert isinstance(opt, fm.LARS if name == "lars" else torch.optim.SGD)


def test_make_optimizer_single_group_and_unknown():
    model = _Tiny()
    opt = fm.make_optimizer(model, "sgd", lr=0.05, weight_decay=0.0)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    fm.set_lr(opt, 0.2)
    assert opt.param_groups[0]["lr"] == 0.2
    with pytest.raises(ValueError):
        fm.make_optimizer(model, "adam", lr=0.1, weight_decay=0.0)


# ----------------------------------------------------------------------------- backbone and heads

@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_state_dict_loads_into_torchvision(arch):
    """Torchvision key names minus fc.*: loads into torchvision.models.<arch>() with missing == fc.*, no unexpected."""
    torch.manual_seed(0)
    net = fm.resnet(arch)
    ref = getattr(torchvision.models, arch)()
    res = ref.load_state_dict(net.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"]
    assert res.unexpected_keys == []
    for key, v in net.state_dict().items():
        assert torch.equal(ref.state_dict()[key], v), key
    assert net.dim == (512 if arch == "resnet18" else 2048)
    net.eval()
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, net.dim)


def test_resnet_zero_init_residual():
    """Fast-MoCo / MoCo v3 build ResNets with zero_init_residual=True: last BN gamma of each block is 0."""
    net = fm.resnet("resnet18")
    for name, mod in net.named_modules():
        if isinstance(mod, torchvision.models.resnet.BasicBlock):
            assert torch.count_nonzero(mod.bn2.weight) == 0, name
    net50 = fm.resnet("resnet50")
    blocks = [m for m in net50.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 16 and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)


def test_resnet_small_stem():
    """small_stem: conv1 3x3 stride 1 pad 1 (no bias), no max-pool; 32 px in -> 512-d out."""
    net = fm.resnet("resnet18", small_stem=True)
    c = net.conv1
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) == (3, 64, (3, 3), (1, 1), (1, 1))
    assert c.bias is None
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    # the default stem is unchanged
    big = fm.resnet("resnet18")
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)


def test_resnet_unknown_arch():
    with pytest.raises(ValueError):
        fm.resnet("vgg16")


def _structure(seq):
    """('L', in, out, has_bias) / ('BN', features, affine) / ('R',) per layer."""
    out = []
    for m in seq:
        if isinstance(m, nn.Linear):
            out.append(("L", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("BN", m.num_features, m.affine))
        elif isinstance(m, nn.ReLU):
            out.append(("R",))
        else:
            out.append(type(m).__name__)
    return out


@pytest.mark.parametrize("dim", [512, 2048])
def test_heads_structure(dim):
    """Exact layers from REFERENCE.md (Fast-MoCo's last projector BN: affine, as the official code)."""
    proj, pred = fm.heads("fastmoco", dim)
    assert _structure(proj) == [("L", dim, 2048, True), ("BN", 2048, True), ("R",),
                                ("L", 2048, 2048, True), ("BN", 2048, True), ("R",),
                                ("L", 2048, 2048, True), ("BN", 2048, True)]
    assert _structure(pred) == [("L", 2048, 512, True), ("BN", 512, True), ("R",), ("L", 512, 2048, True)]

    proj, pred = fm.heads("mocov3", dim)
    assert _structure(proj) == [("L", dim, 4096, False), ("BN", 4096, True), ("R",),
                                ("L", 4096, 256, False), ("BN", 256, False)]
    assert _structure(pred) == [("L", 256, 4096, False), ("BN", 4096, True), ("R",), ("L", 4096, 256, False)]

    proj, pred = fm.heads("mocov2", dim)
    assert _structure(proj) == [("L", dim, 2048, True), ("R",), ("L", 2048, 128, True)]
    assert isinstance(pred, nn.Identity)

    proj, pred = fm.heads("mocov1", dim)
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (dim, 128)
    assert proj.bias is not None and isinstance(pred, nn.Identity)

    with pytest.raises(ValueError):
        fm.heads("simclr", dim)


# ----------------------------------------------------------------------------- MoCo forward / target

def test_moco_forward_shapes_fastmoco_grid2():
    """Grid 2, k 2: the backbone sees only 4N patches of 16 px in one call; 6N rows per view."""
    model = tiny_moco("fastmoco", grid=2, k=2)
    seen = []
    model.backbone.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    torch.manual_seed(1)
    N = 2
    (_, p1), (_, p2) = model(torch.randn(N, 3, 32, 32), torch.randn(N, 3, 32, 32))
    assert p1.shape == p2.shape == (6 * N, 2048)
    assert seen == [(4 * N, 3, 16, 16)] * 2


def test_moco_forward_shapes_fastmoco_grid3_and_k1():
    torch.manual_seed(1)
    N = 2
    ((_, p),) = tiny_moco("fastmoco", grid=3, k=2)(torch.randn(N, 3, 24, 24))
    assert p.shape == (math.comb(9, 2) * N, 2048)
    ((_, p),) = tiny_moco("fastmoco", grid=2, k=1)(torch.randn(N, 3, 32, 32))
    assert p.shape == (4 * N, 2048)


@pytest.mark.parametrize("method,d", [("mocov3", 256), ("mocov2", 128), ("mocov1", 128)])
def test_moco_forward_shapes_other(method, d):
    model = tiny_moco(method)
    seen = []
    model.backbone.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    torch.manual_seed(1)
    (_, q1), (_, q2) = model(torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32))
    assert q1.shape == q2.shape == (3, d)
    assert seen == [(3, 3, 32, 32)] * 2  # full views, no divide


def test_fastmoco_branch_is_combine_of_patch_features():
    """branch -> (z, p), p = predictor(projector(combine(backbone(divide(x))))), checked with a slow per-image patch
    loop."""
    model = tiny_moco("fastmoco").eval()  # eval: BN uses running stats, so per-patch calls are batch-independent
    torch.manual_seed(2)
    N = 2
    x = torch.randn(N, 3, 32, 32)
    with torch.no_grad():
        got = model.branch(x)[1]
        feats = {}
        for i in range(N):
            for r in range(2):
                for c in range(2):
                    feats[i, r * 2 + c] = model.backbone(x[i:i + 1, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16])[0]
        rows = []
        for s in itertools.combinations(range(4), 2):
            for i in range(N):
                rows.append((feats[i, s[0]] + feats[i, s[1]]) / 2)
        expect = model.predictor(model.projector(torch.stack(rows)))
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fastmoco", "mocov2"])
def test_independent_target_is_drawn_like_a_fresh_model(method):
    """--official-init: the target is not a copy but a draw of torchvision's ResNet init (kaiming fan-out convs,
    BN 1/0, zero-init residual for Fast-MoCo only) and torch's head init; uniform_bn draws head gammas ~ U(0, 1)."""
    torch.manual_seed(0)
    model = fm.OnlineEncoder(method, "resnet18")
    target = fm.target_encoder(model, independent=True)
    fresh = torchvision.models.resnet18(zero_init_residual=method == "fastmoco").state_dict()
    for k, v in target.backbone.state_dict().items():
        online = model.backbone.state_dict()[k]
        if "conv" in k or "downsample.0" in k:
            assert not torch.equal(v, online), k  # drawn, not copied
            assert abs(v.std() / fresh[k].std() - 1) < 0.1, k  # the same distribution as torchvision's
        else:
            assert torch.equal(v, fresh[k]), k  # BN weights / biases / running stats exactly torchvision's
    for t, o in zip(target.projector.modules(), model.projector.modules()):
        if isinstance(t, nn.Linear):
            assert not torch.equal(t.weight, o.weight) and t.weight.std() / o.weight.std() - 1 < 0.1
        if isinstance(t, nn.BatchNorm1d):
            assert torch.equal(t.weight, torch.ones_like(t.weight)) and torch.equal(t.bias, o.bias)
    if method != "fastmoco":
        return
    fm.uniform_bn(model.projector, target.projector)
    for h in (model.projector, target.projector):
        g = torch.cat([m.weight for m in h.modules() if isinstance(m, nn.BatchNorm1d)])
        assert 0 <= g.min() and g.max() < 1 and abs(g.mean() - 0.5) < 0.02 and abs(g.std() - 12 ** -0.5) < 0.02
    assert torch.equal(model.backbone.bn1.weight, torch.ones(64))  # the backbone keeps gamma = 1


def test_target_encoder():
    """Equal to backbone+projector at init (params and buffers), frozen, no predictor, an independent copy."""
    model = tiny_moco("fastmoco")
    target = fm.target_encoder(model)
    online = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    online.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    tsd = target.state_dict()
    assert set(tsd) == set(online)
    assert all(torch.equal(tsd[k], online[k]) for k in tsd)
    assert not any("predictor" in k for k in tsd)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in model.parameters())
    # every target parameter has an online one of the same name (what ema_update relies on), equal, not shared
    tp, op = dict(target.named_parameters()), dict(model.named_parameters())
    assert set(tp) <= set(op) and all(tp[n].shape == op[n].shape and torch.equal(tp[n], op[n]) for n in tp)
    assert all(tp[n].data_ptr() != op[n].data_ptr() for n in tp)
    # target sees full views: (N, 2048)
    assert target(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_shuffle_bn_forward_single_process():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6))
    x = torch.randn(5, 3, 2, 2)
    got = fm.shuffle_bn_forward(enc, x, torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, enc(x).detach(), rtol=1e-6, atol=1e-6)  # BN sums in the shuffled order
    assert fm.world() == (0, 1)
    t = torch.randn(3, 2)
    assert torch.equal(fm.gather(t), t)


# ----------------------------------------------------------------------------- per-method losses vs hand references

def _views(N=2, px=32, seed=3):
    torch.manual_seed(seed)
    return torch.randn(N, 3, px, px), torch.randn(N, 3, px, px)


def test_fastmoco_loss_matches_explicit_loop():
    """Mean over the 2*C*N rows: for each combination c and image i of view v, CE of the prediction against all
    targets of the other view, positive = same image."""
    model = tiny_moco("fastmoco")
    target = fm.target_encoder(model)
    with torch.no_grad():  # perturb the target so that online and target outputs differ
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x1, x2 = _views()
    N = x1.shape[0]
    got = fm.fastmoco_loss(model, target, x1, x2).item()
    with torch.no_grad():
        preds = {1: model.branch(x1)[1], 2: model.branch(x2)[1]}
        keys = {1: target(x1), 2: target(x2)}
    C = math.comb(4, 2)
    losses = []
    for v, other in ((1, 2), (2, 1)):
        kv = [_unit(keys[other][j]) for j in range(N)]
        for c in range(C):
            for i in range(N):
                q = _unit(preds[v][c * N + i])
                losses.append(_ce([_dot(q, kj) / 1.0 for kj in kv], i))
    assert len(losses) == 2 * C * N
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-5)


def test_mocov3_loss_matches_explicit_loop():
    """ctr(q1, k2) + ctr(q2, k1), each the mean CE over N rows times 2*tau."""
    model = tiny_moco("mocov3")
    target = fm.target_encoder(model)
    x1, x2 = _views(N=3)
    tau = 0.2
    got = fm.mocov3_loss(model, target, x1, x2, tau=tau).item()
    with torch.no_grad():
        q = {1: model.branch(x1)[1], 2: model.branch(x2)[1]}
        k = {1: target(x1), 2: target(x2)}
    total = 0.0
    for a, b in ((1, 2), (2, 1)):
        keys = [_unit(r) for r in k[b]]
        rows = [_ce([_dot(_unit(q[a][i]), kj) / tau for kj in keys], i) for i in range(3)]
        total += 2 * tau * sum(rows) / 3
    assert got == pytest.approx(total, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("method", ["mocov2", "mocov1"])
def test_moco_loss_matches_explicit_loop(method):
    """Query from view 1, key = normalised target(view 2), negatives from the queue; returns the keys."""
    model = tiny_moco(method)
    target = fm.target_encoder(model)
    x1, x2 = _views(N=3)
    torch.manual_seed(5)
    queue = torch.nn.functional.normalize(torch.randn(16, 128), dim=1)
    tau = 0.2
    loss, keys = fm.moco_loss(model, target, x1, x2, queue, tau, torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k = model.branch(x1)[1], target(x2)
    expect = []
    for i in range(3):
        qi, ki = _unit(q[i]), _unit(k[i])
        expect.append(_ce([_dot(qi, ki) / tau] + [_dot(qi, n.tolist()) / tau for n in queue], 0))
    assert loss.item() == pytest.approx(sum(expect) / 3, rel=1e-4, abs=1e-5)
    assert keys.shape == (3, 128)
    for i in range(3):
        assert keys[i].tolist() == pytest.approx(_unit(k[i]), abs=1e-5)


def _train(method, steps=15, lr=0.05, **loss_kw):
    model = tiny_moco(method)
    target = fm.target_encoder(model)
    x1, x2 = _views(N=4, px=16, seed=7)  # 16 px (8 px patches) keeps 15 CPU steps within a few seconds
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    fn = {"fastmoco": fm.fastmoco_loss, "mocov3": fm.mocov3_loss}.get(method)
    losses = []
    for _ in range(steps):
        if fn is None:
            loss, _ = fm.moco_loss(model, target, x1, x2, generator=torch.Generator().manual_seed(0), **loss_kw)
        else:
            loss = fn(model, target, x1, x2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fastmoco", "mocov3", "mocov2", "mocov1"])
def test_loss_decreases_on_fixed_batch(method):
    """A few SGD steps on one fixed tiny batch (fixed target) must lower the loss: gradients flow correctly."""
    kw = {}
    if method in ("mocov2", "mocov1"):
        torch.manual_seed(9)
        queue = torch.nn.functional.normalize(torch.randn(32, 128), dim=1)
        kw = dict(queue=queue, tau=0.2 if method == "mocov2" else 0.07)
    losses = _train(method, **kw)
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < losses[0] - 0.05 * abs(losses[0]), losses


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "backbone.conv1.weight": torch.randn(4, 3, 3, 3),
        "half": torch.randn(3, 2).bfloat16(),
        "ints": torch.arange(5),
        "mask": torch.tensor([True, False]),
        "transposed": torch.randn(3, 4).T,  # non-contiguous
        "grad": torch.randn(2, requires_grad=True),
    }
    meta = {"step": 123, "epoch": 4, "method": "fastmoco", "args": {"lr": 0.1, "nested": {"grid": 2, "ok": True}},
            "list": [1, "two", 3.5, None]}
    path = tmp_path / "ckpt.safetensors"
    ck.save_checkpoint(path, tensors, meta)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]  # no .tmp left behind
    got, got_meta = ck.load_checkpoint(path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.detach()), k
    assert got_meta == meta
    assert isinstance(got_meta["step"], int) and isinstance(got_meta["args"]["nested"]["grid"], int)
    # overwriting an existing checkpoint works and is atomic (still one file)
    ck.save_checkpoint(str(path), {"x": torch.ones(1)}, {"step": 124})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]
    assert ck.load_checkpoint(str(path))[1] == {"step": 124}


def test_load_checkpoint_rejects_non_safetensors(tmp_path):
    """Random bytes, a torch.save zip and a raw pickle all raise ValueError naming the file; nothing is unpickled."""
    files = {"random.safetensors": os.urandom(4096), "short.bin": b"abc", "empty.safetensors": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Boom()))
    for name in list(files) + ["model.pt", "evil.pkl"]:
        with pytest.raises(ValueError) as e:
            ck.load_checkpoint(tmp_path / name)
        assert name in str(e.value), name
    assert not (tmp_path / "PWNED").exists()


def test_load_checkpoint_plain_save_file(tmp_path):
    """A file from safetensors.torch.save_file without metadata loads, with empty metadata."""
    from safetensors.torch import save_file
    save_file({"w": torch.arange(3.0)}, str(tmp_path / "plain.safetensors"))
    tensors, meta = ck.load_checkpoint(tmp_path / "plain.safetensors")
    assert meta == {} and torch.equal(tensors["w"], torch.arange(3.0))


def test_load_checkpoint_non_json_metadata(tmp_path):
    """BUG (fastmoco.load_checkpoint): a valid safetensors file whose metadata values are plain strings -- e.g. the
    {"format": "pt"} that Hugging Face writes with safetensors.torch.save_file -- is rejected with ValueError, because
    every value goes through json.loads. The error text itself invites 'a file written by safetensors.torch.save_file'.
    Expected: tensors load; a value that is not JSON is kept as the raw string."""
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, str(tmp_path / "hf.safetensors"), metadata={"format": "pt"})
    tensors, meta = ck.load_checkpoint(tmp_path / "hf.safetensors")
    assert torch.equal(tensors["w"], torch.ones(2))
    assert meta == {"format": "pt"}


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "nope.safetensors")


def test_prefixed():
    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    t = {"backbone.conv1.weight": a, "target.backbone.conv1.weight": b, "projector.0.weight": c}
    assert ck.prefixed(t, "backbone.") == {"conv1.weight": a}
    assert ck.prefixed(t, "target.backbone.") == {"conv1.weight": b}
    assert ck.prefixed(t, "nothing.") == {}


def test_checkpoint_backbone_loads_into_torchvision(tmp_path):
    """The backbone.* entries of a checkpoint are a torchvision state dict (minus fc)."""
    torch.manual_seed(0)
    net = fm.resnet("resnet18")
    path = tmp_path / "c.safetensors"
    ck.save_checkpoint(path, {f"backbone.{k}": v for k, v in net.state_dict().items()}, {})
    tensors, _ = ck.load_checkpoint(path)
    ref = torchvision.models.resnet18()
    res = ref.load_state_dict(ck.prefixed(tensors, "backbone."), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    assert torch.equal(ref.conv1.weight, net.conv1.weight)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_optimizer_resume_bit_identical(tmp_path, name):
    """Train 3 steps, checkpoint (model + optimizer buffers), train 4 more; a fresh model/optimizer restored from the
    checkpoint and trained the same 4 steps ends bit-identical. SGD momentum_buffer and LARS mu both travel."""
    torch.manual_seed(0)
    data = [torch.randn(8, 6) for _ in range(7)]

    def step(model, opt, x, i):
        fm.set_lr(opt, 0.1 * (1 - i / 10))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    torch.manual_seed(1)
    a = _Tiny()
    opt_a = fm.make_optimizer(a, name, lr=0.1, weight_decay=1e-2, fix_predictor_lr=True)
    for i in range(3):
        step(a, opt_a, data[i], i)
    buf = "mu" if name == "lars" else "momentum_buffer"
    opt_t = ck.optimizer_tensors(opt_a)
    assert len(opt_t) == len(list(a.parameters())) and all(k.endswith("." + buf) for k in opt_t)
    path = tmp_path / "resume.safetensors"
    ck.save_checkpoint(path, {**{f"model.{k}": v for k, v in a.state_dict().items()}, **opt_t}, {"step": 3})
    for i in range(3, 7):
        step(a, opt_a, data[i], i)

    torch.manual_seed(2)  # different init, overwritten by the checkpoint
    b = _Tiny()
    opt_b = fm.make_optimizer(b, name, lr=0.1, weight_decay=1e-2, fix_predictor_lr=True)
    tensors, meta = ck.load_checkpoint(path)
    b.load_state_dict(ck.prefixed(tensors, "model."))
    ck.load_optimizer_tensors(opt_b, tensors)
    assert meta["step"] == 3
    assert opt_b.param_groups[1].get("fixed_lr") is True and opt_b.param_groups[1]["lr"] == 0.1
    for i in range(meta["step"], 7):
        step(b, opt_b, data[i], i)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka

    # control: without the optimizer buffers the continuation differs (so the test can fail)
    torch.manual_seed(2)
    c = _Tiny()
    opt_c = fm.make_optimizer(c, name, lr=0.1, weight_decay=1e-2, fix_predictor_lr=True)
    c.load_state_dict(ck.prefixed(tensors, "model."))
    for i in range(3, 7):
        step(c, opt_c, data[i], i)
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


# ----------------------------------------------------------------------------- two real processes (gloo)

_WORKER = textwrap.dedent("""
    import sys
    import torch, torch.nn as nn, torch.distributed as dist
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[4])
    import fastmoco as fm
    rank, ws, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=ws)
    out = {"world": torch.tensor(fm.world())}
    N = 2
    torch.manual_seed(0)
    X1, X2 = torch.randn(ws * N, 3, 32, 32), torch.randn(ws * N, 3, 32, 32)  # the global batch, same everywhere
    x1, x2 = X1[rank * N:(rank + 1) * N], X2[rank * N:(rank + 1) * N]
    out["gather"] = fm.gather(torch.full((2, 3), float(rank)))
    torch.manual_seed(1)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5), nn.BatchNorm1d(5))  # train-mode BN
    out["shuffled"] = fm.shuffle_bn_forward(enc, x1, torch.Generator().manual_seed(42))
    for method in ("fastmoco", "mocov3", "mocov2"):
        torch.manual_seed(0)
        model = fm.OnlineEncoder(method, "resnet18", small_stem=True).eval()  # eval: BN independent of the split
        target = fm.target_encoder(model)
        if method == "fastmoco":
            out[method] = fm.fastmoco_loss(model, target, x1, x2).detach()[None]
        elif method == "mocov3":
            out[method] = fm.mocov3_loss(model, target, x1, x2).detach()[None]
        else:
            queue = nn.functional.normalize(torch.randn(8, 128, generator=torch.Generator().manual_seed(3)), dim=1)
            loss, keys = fm.moco_loss(model, target, x1, x2, queue, 0.2, torch.Generator().manual_seed(7))
            out[method], out["keys"] = loss.detach()[None], keys
    save_file({k: v.contiguous() for k, v in out.items()}, f"{tmp}/out{rank}.safetensors")
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_process_gloo(tmp_path):
    """Real 2-process run: gather order, shuffle-BN un-shuffling, and the global-batch losses (eval-mode BN) whose
    rank average equals the single-process loss on the concatenated batch (checks the rank*N positive offset)."""
    ws, N = 2, 2
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(ws), str(tmp_path), str(ROOT)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for r in range(ws)]
    logs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    outs = [ck.load_checkpoint(tmp_path / f"out{r}.safetensors")[0] for r in range(ws)]

    torch.manual_seed(0)
    X1, X2 = torch.randn(ws * N, 3, 32, 32), torch.randn(ws * N, 3, 32, 32)
    for r, o in enumerate(outs):
        assert o["world"].tolist() == [r, ws]
        assert o["gather"].tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2

    # shuffle-BN: process c ran the encoder on images perm[c*N:(c+1)*N]; image g's key comes from that batch
    perm = torch.randperm(ws * N, generator=torch.Generator().manual_seed(42)).tolist()
    torch.manual_seed(1)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5), nn.BatchNorm1d(5))
    with torch.no_grad():
        chunk_out = [enc(X1[perm[c * N:(c + 1) * N]]) for c in range(ws)]
    for r, o in enumerate(outs):
        for i in range(N):
            j = perm.index(r * N + i)
            torch.testing.assert_close(o["shuffled"][i], chunk_out[j // N][j % N], rtol=1e-4, atol=1e-5)

    # losses: mean over ranks == one process on the whole batch (eval-mode BN makes the split irrelevant)
    queue = nn.functional.normalize(torch.randn(8, 128, generator=torch.Generator().manual_seed(3)), dim=1)
    for method in ("fastmoco", "mocov3", "mocov2"):
        torch.manual_seed(0)
        model = fm.OnlineEncoder(method, "resnet18", small_stem=True).eval()
        target = fm.target_encoder(model)
        with torch.no_grad():
            if method == "fastmoco":
                ref = fm.fastmoco_loss(model, target, X1, X2).item()
            elif method == "mocov3":
                ref = fm.mocov3_loss(model, target, X1, X2).item()
            else:
                ref, keys = fm.moco_loss(model, target, X1, X2, queue, 0.2, torch.Generator().manual_seed(7))
                ref = ref.item()
                for o in outs:
                    torch.testing.assert_close(o["keys"], keys, rtol=1e-4, atol=1e-5)
        got = sum(o[method].item() for o in outs) / ws
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-5), method
