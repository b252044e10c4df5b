"""variants.py: each distinctive computation against a slow reference (loops, explicit formulas), then a few real
pretrain.py steps per method / ablation whose checkpoint loads strictly into torchvision."""

import itertools
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoints as ck
import fastmoco as fm  # noqa: E402
import variants as vr  # noqa: E402
from data import small_crops  # noqa: E402
from test_pretrain import read_log, run  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def encoder(method="fastmoco", patches=True, grid=2, k=2, **ablation):
    torch.manual_seed(0)
    return vr.Encoder(method, "resnet18", True, grid, k, vr.Ablation(patches, **ablation))


def views(N=3, px=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, px, px, generator=g), torch.randn(N, 3, px, px, generator=g)


# ----------------------------------------------------------------------------- combine operators and subsets

def test_weighted_half_equals_mean_and_core_combine():
    f = torch.randn(4 * 5, 7)
    subsets = list(itertools.combinations(range(4), 2))
    mean = vr.combine_with(f, 4, subsets, "mean")
    assert torch.allclose(vr.combine_with(f, 4, subsets, "weighted", lam=0.5), mean, atol=1e-6)
    assert torch.allclose(mean, fm.combine(f, 4, 2), atol=1e-6)


@pytest.mark.parametrize("P, k", [(4, 2), (9, 3)])
def test_max_and_weighted_match_loops(P, k):
    N, D, lam = 3, 5, 0.3
    f = torch.randn(P * N, D)
    subsets = list(itertools.combinations(range(P), k))[:7]
    got_max = vr.combine_with(f, P, subsets, "max")
    got_w = vr.combine_with(f, P, subsets, "weighted", lam=lam)
    for c, s in enumerate(subsets):
        for i in range(N):
            for d in range(D):
                vals = [float(f[p * N + i, d]) for p in s]
                assert float(got_max[c * N + i, d]) == max(vals)
                ref = lam * vals[0] + sum(vals[1:]) * (1 - lam) / (k - 1)
                assert float(got_w[c * N + i, d]) == pytest.approx(ref, abs=1e-5)


def test_beta_weights_are_a_random_convex_pair_per_row():
    """k = 2: each combined row is l*a + (1-l)*b with one l in [0, 1] for all its coordinates; l varies by row."""
    N, D = 4, 6
    torch.manual_seed(0)
    f = torch.randn(4 * N, D, dtype=torch.float64)
    subsets = list(itertools.combinations(range(4), 2))
    got = vr.combine_with(f, 4, subsets, "beta", alpha=1.0)
    lams = []
    for c, (a, b) in enumerate(subsets):
        for i in range(N):
            fa, fb, row = f[a * N + i], f[b * N + i], got[c * N + i]
            lam = float((row - fb) @ (fa - fb) / ((fa - fb) @ (fa - fb)))  # least squares over the coordinates
            # the weights are float32 Dirichlet draws: they sum to 1 up to float32 rounding
            assert 0.0 <= lam <= 1.0 and torch.allclose(row, lam * fa + (1 - lam) * fb, atol=1e-6)
            lams.append(lam)
    assert len({round(x, 6) for x in lams}) == len(lams)


@pytest.mark.parametrize("P, k, m", [(4, 2, 2), (4, 2, 4), (4, 2, 6), (9, 2, 9), (9, 3, 6), (16, 3, 16)])
def test_balanced_subsets_use_each_patch_equally(P, k, m):
    s = vr.balanced_subsets(P, k, m)
    assert len(s) == m == len(set(s)) and all(len(x) == k for x in s)
    assert set(Counter(p for x in s for p in x).values()) == {m * k // P} and len(Counter(p for x in s for p in x)) == P


def test_balanced_subsets_refuses_unbalanced_count():
    with pytest.raises(ValueError, match="equally often"):
        vr.balanced_subsets(4, 2, 3)


def test_encoder_draws_balanced_subsets_each_step():
    model = encoder(combinations=2)
    seen = set()
    for _ in range(30):
        s = model.chosen()
        assert sorted(p for x in s for p in x) == [0, 1, 2, 3]  # two disjoint pairs
        seen.update(s)
    assert len(seen) == 6  # over steps every pair is used
    x1, _ = views()
    (z, p), = model(x1)
    assert p.shape == (2 * 3, 2048)


# ----------------------------------------------------------------------------- input-side constructions

def test_random_crops_are_windows_of_their_own_image():
    x = torch.randn(3, 2, 8, 8)
    crops = vr.random_crops(x, 2, 4)  # (4*3, 2, 4, 4)
    assert crops.shape == (12, 2, 4, 4)
    for r in range(12):
        i = r % 3
        assert any(torch.equal(crops[r], x[i, :, t:t + 4, u:u + 4]) for t in range(5) for u in range(5))


def test_undivide_inverts_divide():
    x = torch.randn(3, 2, 12, 12)
    assert torch.equal(vr.undivide(fm.divide(x, 3), 3), x)


@pytest.mark.parametrize("pipeline", ["sample-encode-combine", "sample-combine-encode", "encode-only"])
def test_random_pipelines_are_a_function_of_the_step_seed(pipeline):
    """The crops are drawn from the generator variant_loss seeds: same seed, same loss; another seed, another loss."""
    x1, x2 = views()
    model = encoder(pipeline=pipeline, combine="beta" if pipeline == "sample-encode-combine" else "mean")
    target = fm.target_encoder(model)
    a, b, c = (vr.variant_loss("fastmoco", model, target, [x1, x2], seed=s)[0].item() for s in (5, 5, 6))
    assert a == b != c


@pytest.mark.parametrize("n", [2, 3])
def test_divide_combine_encode_canvas_is_patches_at_their_positions(n):
    N, h = 2, 3
    x = torch.randn(N, 3, n * h, n * h)
    subsets = list(itertools.combinations(range(n * n), 2))[:5]
    got = vr.paste(fm.divide(x, n), n, subsets)
    for c, s in enumerate(subsets):
        for i in range(N):
            ref = torch.zeros(3, n * h, n * h)
            for p in s:
                r, col = divmod(p, n)
                ref[:, r * h:(r + 1) * h, col * h:(col + 1) * h] = x[i, :, r * h:(r + 1) * h, col * h:(col + 1) * h]
            assert torch.equal(got[c * N + i], ref)


def test_divide_combine_encode_encodes_the_canvases():
    model = encoder(pipeline="divide-combine-encode")
    x1, _ = views(px=16)
    got = model.features(x1)
    ref = model.backbone(vr.paste(fm.divide(x1, 2), 2, list(itertools.combinations(range(4), 2))))
    assert got.shape == (6 * 3, 512) and torch.allclose(got, ref, atol=1e-5)


def test_montage_divides_back_to_each_patch_features():
    """A per-pixel encoder (1x1 conv + ReLU) commutes with cutting: each montage cell's pooled feature must equal
    the feature of that patch encoded alone, for every image and patch after un-shifting."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU())
    x = torch.randn(4, 3, 8, 8)
    got = vr.montage_features(x, 2, conv)  # (4*4, 5)
    for p in range(4):
        r, c = divmod(p, 2)
        for i in range(4):
            ref = conv(x[i:i + 1, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]).mean((2, 3))[0]
            assert torch.allclose(got[p * 4 + i], ref, atol=1e-6)


def test_montage_mixes_images_and_resnet_feature_map_pools_to_backbone():
    """Montage i holds patch p of image (i + p) % N in cell p (the encoder sees the montage, not the images);
    feature_map + global mean = the torchvision backbone's output."""
    x = torch.randn(3, 3, 8, 8)
    seen = []
    vr.montage_features(x, 2, lambda m: seen.append(m) or torch.zeros(3, 1, 2, 2))
    for i in range(3):
        for p in range(4):
            r, c = divmod(p, 2)
            cell = (slice(None), slice(r * 4, r * 4 + 4), slice(c * 4, c * 4 + 4))
            assert torch.equal(seen[0][i][cell], x[(i + p) % 3][cell])
    net = fm.resnet("resnet18", small_stem=True).eval()
    y = torch.randn(2, 3, 16, 16)
    assert torch.allclose(vr.feature_map(net, y).mean((2, 3)), net(y), atol=1e-5)
    model = encoder(pipeline="montage-encode-divide-combine")  # 16 px small stem: 2x2 map, no resize
    assert model.features(y).shape == (6 * 2, 512)


# ----------------------------------------------------------------------------- losses of the other frameworks

def test_byol_loss_is_two_minus_two_cos():
    p, z = torch.randn(5, 8), torch.randn(5, 8)
    ref = 0.0
    for i in range(5):
        a = [float(v) / math.sqrt(sum(float(u) ** 2 for u in p[i])) for v in p[i]]
        b = [float(v) / math.sqrt(sum(float(u) ** 2 for u in z[i])) for v in z[i]]
        ref += sum((u - v) ** 2 for u, v in zip(a, b)) / 5
    assert vr.byol_loss(p, z).item() == pytest.approx(ref, rel=1e-5)


def test_nearest_matches_brute_force():
    z, support = torch.randn(6, 4), F.normalize(torch.randn(20, 4), dim=1)
    got = vr.nearest(z, support)
    for i in range(6):
        u = z[i] / z[i].norm()
        d = [float(((u - support[j]) ** 2).sum()) for j in range(20)]
        assert torch.equal(got[i], support[d.index(min(d))])


def test_simsiam_stop_grad_no_gradient_through_the_target_side():
    """Plain SimSiam: gradients equal those of -cos(p, c)/2 - cos(p', c')/2 with the projections replaced by
    constants; without the stop-grad they would differ."""
    x1, x2 = views()
    model = encoder("simsiam", patches=False)
    loss, _ = vr.variant_loss("simsiam", model, None, [x1, x2], ablation=vr.Ablation(patches=False))
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (z1, p1), (z2, p2) = model(x1, x2)
    c1, c2 = z1.detach().clone(), z2.detach().clone()
    ref = -(F.cosine_similarity(p1, c2).mean() + F.cosine_similarity(p2, c1).mean()) / 2
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    ref.backward()
    assert all(torch.allclose(a, b.grad, atol=1e-6) for a, b in zip(got, model.parameters()))
    model.zero_grad()
    (z1, p1), (z2, p2) = model(x1, x2)
    (-(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2).backward()
    assert not all(torch.allclose(a, b.grad, atol=1e-6) for a, b in zip(got, model.parameters()))


def test_simsiam_with_patches_forwards_the_whole_view_again():
    """With patches the online branch sees only patches; the stop-grad target is the whole view through the same
    weights (a target copy refreshed with m = 0)."""
    x1, x2 = views()
    model = encoder("simsiam")
    target = fm.target_encoder(model)
    fm.ema_update(target, model, 0.0)
    loss, _ = vr.variant_loss("simsiam", model, target, [x1, x2])
    (_, p1), (_, p2) = model(x1, x2)
    with torch.no_grad():
        t1, t2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
    ref = -(F.cosine_similarity(p1.reshape(6, 3, -1), t2[None], dim=-1).mean()
            + F.cosine_similarity(p2.reshape(6, 3, -1), t1[None], dim=-1).mean()) / 2
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_nnclr_positive_is_the_support_neighbour_of_the_other_view():
    x1, x2 = views()
    model = encoder("nnclr", patches=False)
    queue = F.normalize(torch.randn(16, 256), dim=1)
    loss, keys = vr.variant_loss("nnclr", model, None, [x1, x2], queue, 0.1, vr.Ablation(patches=False))
    with torch.no_grad():
        (z1, p1), (z2, p2) = model(x1, x2)

    def nn_loop(z):
        u = F.normalize(z, dim=1)
        return torch.stack([queue[max(range(16), key=lambda j: float(u[i] @ queue[j]))] for i in range(len(z))])

    ref = (fm.infonce(p1, nn_loop(z2), 0.1) + fm.infonce(p2, nn_loop(z1), 0.1)) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(keys, F.normalize(z1, dim=1), atol=1e-6)


# ----------------------------------------------------------------------------- defaults, same view, multi-crop

def test_defaults_compute_exactly_the_core_methods():
    """Encoder with the defaults = fastmoco.OnlineEncoder; variant_loss = fastmoco_loss / mocov3_loss."""
    x1, x2 = views()
    for method, patches, core in (("fastmoco", True, fm.fastmoco_loss), ("mocov3", False, fm.mocov3_loss)):
        model = encoder(method, patches)
        torch.manual_seed(0)
        ref_model = fm.OnlineEncoder(method, "resnet18", True)
        assert model.state_dict().keys() == ref_model.state_dict().keys()
        ref_model.load_state_dict(model.state_dict())
        target = fm.target_encoder(model)
        got, _ = vr.variant_loss(method, model, target, [x1, x2], ablation=vr.Ablation(patches))
        assert got.item() == pytest.approx(core(ref_model, target, x1, x2).item(), abs=1e-6)


def test_same_view_pairs_each_view_with_itself_only():
    """--same-view: loss(x1, x2) = (loss(x1, x1) + loss(x2, x2)) / 2 of the normal pairing, so view 2 never
    supplies view 1's positive."""
    x1, x2 = views()
    model = encoder()
    target = fm.target_encoder(model)
    got, _ = vr.variant_loss("fastmoco", model, target, [x1, x2], ablation=vr.Ablation(same_view=True))
    a, _ = vr.variant_loss("fastmoco", model, target, [x1, x1])
    b, _ = vr.variant_loss("fastmoco", model, target, [x2, x2])
    assert got.item() == pytest.approx((a.item() + b.item()) / 2, abs=1e-6)
    other, _ = vr.variant_loss("fastmoco", model, target, [x1, x2])
    assert abs(other.item() - got.item()) > 1e-4


def test_multi_crop_views_are_queries_against_both_targets():
    x1, x2 = views()
    small = [torch.randn(3, 3, 8, 8)]
    model = encoder("mocov3", patches=False)
    target = fm.target_encoder(model)
    got, _ = vr.variant_loss("mocov3", model, target, [x1, x2, *small], ablation=vr.Ablation(patches=False))
    with torch.no_grad():
        (_, q1), (_, q2), (_, qs) = model(x1, x2, *small)
        k1, k2 = target(x1), target(x2)
    terms = [fm.infonce(q, k, two_tau=True) for q, k in ((q1, k2), (q2, k1), (qs, k1), (qs, k2))]
    assert got.item() == pytest.approx(2 * sum(t.item() for t in terms) / 4, abs=1e-5)
    t = small_crops("mocov3", 16, 2)
    assert len(t) == 2 and t[0].transforms[0].size == (16, 16) and t[0].transforms[0].scale == (0.05, 0.14)


def test_loader_yields_the_multi_crop_views():
    """The stage scripts' loader with small_crops appended: each batch is (x1, x2, small_1, ..., small_N)."""
    from data import augmentations, demo_dataset, loader_for

    ds = demo_dataset("test").select(range(8))
    loader = loader_for(ds, 8, False, "image", augmentations("fastmoco", 32) + small_crops("fastmoco", 16, 2), 4, 0,
                        1, 0, 0, 1, 0)
    batch = next(iter(loader))
    assert [tuple(x.shape) for x in batch[:-1]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2  # + info
    assert not torch.equal(batch[2], batch[3])  # independent crops


@pytest.mark.parametrize("kw, words", [
    (dict(method="mocov2"), "has no variants"),
    (dict(method="simsiam", momentum=0.9), "no momentum encoder"),
    (dict(patches=False, combine="max"), "add --patches"),
    (dict(k=1, combine="beta"), "--combine-k 2 or more"),
    (dict(pipeline="divide-combine-encode", combine="max"), "--combine does not apply"),
    (dict(combinations=3), "equally often"),
    (dict(same_view=True, multi_crop=1), "does not combine"),
])
def test_check_refuses_impossible_combinations(kw, words):
    def check(method="fastmoco", grid=2, k=2, momentum=None, **ablation):
        return vr.check(method, vr.Ablation(**ablation), grid, k, momentum)

    assert words in check(**kw)
    assert check() is None


# ----------------------------------------------------------------------------- pretrain.py end to end

def _check_run(d, method, steps=(1, 2)):
    rows = read_log(d)
    assert [r["step"] for r in rows] == list(steps) and all(math.isfinite(r["loss"]) for r in rows)
    tensors, meta = ck.load_checkpoint(d / "ckpt.safetensors")
    assert meta["method"] == method
    missing, unexpected = torchvision.models.resnet18().load_state_dict(ck.prefixed(tensors, "backbone."),
                                                                         strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    return tensors, meta


@pytest.mark.slow
@pytest.mark.parametrize("args", [  # several flags per run: each run costs ~10 s of process start and data
    ["--method", "byol", "--patches", "--combine", "max", "--multi-crop", 1, "--multi-crop-size", 16],
    ["--method", "simsiam", "--patches", "--same-view", "--pipeline", "divide-combine-encode"],
    ["--method", "mocov3", "--patches", "--pipeline", "sample-combine-encode"],
    ["--pipeline", "montage-encode-divide-combine", "--combine", "weighted", "--combine-lambda", 0.3, "--grid", 4,
     "--combinations", 8],
    ["--pipeline", "encode-only"],
    ["--no-patches", "--multi-crop", 1, "--multi-crop-size", 16],  # Table 4b: MoCo v3 (Fast-MoCo recipe) + multi-crop
], ids=lambda a: " ".join(map(str, a)))
def test_variant_runs_and_checkpoint_loads_into_torchvision(parquet, tmp_path, args):
    run("--data", parquet, "--max-steps", 2, "--output-dir", tmp_path, *args)
    method = args[args.index("--method") + 1] if "--method" in args else "fastmoco"
    tensors, meta = _check_run(tmp_path, method)
    assert meta["args"]["pipeline"] == (args[args.index("--pipeline") + 1] if "--pipeline" in args else
                                        vr.PIPELINES[0])
    assert any(k.startswith("target.") for k in tensors)
    assert tensors["queue"].shape == (16, 256) if method == "nnclr" else "queue" not in tensors


@pytest.mark.slow
def test_nnclr_sampled_pipeline_resumes_exactly(parquet, tmp_path):
    """Support set, ptr and the CPU generator (random crops, Beta weights) are saved: a resumed run repeats an
    uninterrupted one bit for bit."""
    common = ["--data", parquet, "--method", "nnclr", "--patches", "--pipeline", "sample-encode-combine",
              "--combine", "beta", "--combinations", 2, "--queue-size", 16, "--epochs", 2]
    run(*common, "--max-steps", 3, "--output-dir", tmp_path / "full")
    run(*common, "--max-steps", 2, "--output-dir", tmp_path / "part")
    run(*common, "--max-steps", 3, "--output-dir", tmp_path / "part", "--resume", tmp_path / "part/ckpt.safetensors")
    assert [r["loss"] for r in read_log(tmp_path / "part")] == [r["loss"] for r in read_log(tmp_path / "full")]
    a, _ = ck.load_checkpoint(tmp_path / "full/ckpt.safetensors")
    b, _ = _check_run(tmp_path / "part", "nnclr", steps=[1, 2, 3])
    assert b["queue"].shape == (16, 256) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng.")), "resumed weights differ"


@pytest.mark.slow
def test_variant_bad_option_one_line_error(parquet, tmp_path):
    p = run("--data", parquet, "--method", "simsiam", "--momentum", 0.9, "--output-dir", tmp_path, check=False)
    assert p.returncode == 1 and "no momentum encoder" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_is_variant_only_for_options_beyond_the_core_methods():
    """The four core methods with their defaults run fastmoco.py's code; every option variants.py adds, another
    framework, or patches switched against the method's default, runs variants.py's."""
    for method in fm.METHODS:
        assert not vr.is_variant(method, vr.Ablation(patches=method == "fastmoco")), method
    for method in vr.METHODS:
        assert vr.is_variant(method, vr.Ablation(patches=False)), method
    assert vr.is_variant("fastmoco", vr.Ablation(patches=False)) and vr.is_variant("mocov3", vr.Ablation())
    for change in (dict(pipeline="encode-only"), dict(combine="max"), dict(combinations=2), dict(same_view=True),
                   dict(multi_crop=1)):
        assert vr.is_variant("fastmoco", vr.Ablation(**change)), change
