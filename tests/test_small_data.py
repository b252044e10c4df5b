"""--recipe small and what came with it: the small-data recipes, MoCo's one-process shuffle-BN stand-in
(SplitBatchNorm), the linear probe's normalised classifier, the kNN plot, the recipes' caps on warm-up and queue."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import checkpoints as ck
import fastmoco as fm
import linear_probe
import plot
import pretrain
import variants as vr


def test_demo_data_is_light_shapes_on_dark_grey():
    """The demo's class is its shape alone: every image is grey, exactly two levels (a light shape on a dark
    background), balanced classes; the same images on every call, other ones in the test split."""
    from data import DEMO_CLASSES, demo_dataset
    train, test = demo_dataset("train"), demo_dataset("test")
    assert (len(train), len(test)) == (2560, 1000) and train.features["label"].names == list(DEMO_CLASSES)
    assert np.bincount(train["label"]).tolist() == [256] * 10
    for ex in train.select(range(100)):
        a = np.asarray(ex["image"])
        assert a.shape == (32, 32, 3) and (a == a[..., :1]).all()  # grey
        levels, counts = np.unique(a[..., 0], return_counts=True)
        assert levels.tolist() == [40, 215] and 60 < counts[1] < 32 * 32 - 60, counts  # a shape, not all background
    assert np.array_equal(np.asarray(demo_dataset("train")[7]["image"]), np.asarray(train[7]["image"]))
    assert not np.array_equal(np.asarray(test[7]["image"]), np.asarray(train[7]["image"]))


def test_every_method_has_a_small_recipe_with_the_imagenet_keys():
    for method, r in pretrain.RECIPES["imagenet"].items():
        s = pretrain.RECIPES["small"][method]
        assert set(r) <= set(s), method
        assert s["small_stem"] and s["image_size"] == 32 and s["queue_size"] <= 4096 and s["warmup_epochs"] == 0
        assert s["aug"].startswith("small")
    assert pretrain.RECIPES["small"]["mocov3"]["tau"] == 0.2 and pretrain.RECIPES["small"]["mocov2"]["tau"] == 0.1
    assert vr.SMALL_RECIPES["simsiam"]["momentum"] == 0.0  # no momentum encoder, as in the ImageNet recipe


def test_small_recipe_builds_a_resnet18_unless_told_otherwise():
    """--recipe small without --arch trains the ResNet-18 of MoCo's CIFAR demo, lightly and solo-learn. It used to
    keep the ImageNet recipe's ResNet-50, on which MoCo v1 at 32 px falls below its random init, the demo's
    algorithm as well as ours: a user comparing the two compared architectures (docs/small-data.md)."""
    for method in pretrain.RECIPES["small"]:
        assert pretrain.resolve_recipe("small", method, {})["arch"] == "resnet18", method
        assert pretrain.resolve_recipe("imagenet", method, {})["arch"] == "resnet50", method
        assert pretrain.resolve_recipe("small", method, {"arch": "resnet50"})["arch"] == "resnet50", method


def test_moco_step_equals_the_cifar_demo_step_written_out():
    """fastmoco's MoCo v1 step (split BN, one-process shuffle, queue) against MoCo's CIFAR demo step, transcribed
    separately: torchvision's ResNet built with a split BN of its own, fc -> 128, EMA by zip, queue as (dim, K).
    Parameters are copied across before every step, so float noise cannot grow: each step's loss and gradients
    must agree, on both stems, with the queue holding earlier keys."""
    import functools

    class DemoSplitBN(nn.BatchNorm2d):
        def __init__(self, c, splits):
            super().__init__(c)
            self.splits = splits

        def forward(self, x):
            N, C, H, W = x.shape
            return nn.functional.batch_norm(
                x.view(-1, C * self.splits, H, W), self.running_mean.repeat(self.splits),
                self.running_var.repeat(self.splits), self.weight.repeat(self.splits),
                self.bias.repeat(self.splits), True).view(N, C, H, W)

    B, K, tau, m = 16, 64, 0.1, 0.99
    for small_stem, size in ((False, 32), (True, 16)):
        torch.manual_seed(0)
        model = fm.OnlineEncoder("mocov1", "resnet18", small_stem=small_stem)
        fm.split_bn(model.backbone, 4)
        target = fm.target_encoder(model)
        demo_q, demo_k = (torchvision_resnet18(128, functools.partial(DemoSplitBN, splits=4), small_stem)
                          for _ in range(2))
        queue, ptr = fm.make_queue(K, 128), 0
        for step in range(3):
            with torch.no_grad():  # same weights: ours -> the demo's (its fc is our projector)
                for ours, demo in ((model, demo_q), (target, demo_k)):
                    w = dict(ck.prefixed(ours.state_dict(), "backbone."),
                             **{"fc." + k: v for k, v in ck.prefixed(ours.state_dict(), "projector.").items()})
                    demo.load_state_dict(w)
            demo_queue = queue.T.clone()
            x1, x2 = torch.randn(B, 3, size, size), torch.randn(B, 3, size, size)
            fm.ema_update(target, model, m)
            model.zero_grad(), demo_q.zero_grad()
            loss, keys = fm.step_loss("mocov1", model, target, x1, x2, tau, queue, torch.Generator().manual_seed(step))
            loss.backward()
            with torch.no_grad():
                for pq, pk in zip(demo_q.parameters(), demo_k.parameters()):
                    pk.data = pk.data * m + pq.data * (1 - m)
                perm = torch.randperm(B, generator=torch.Generator().manual_seed(step))
                k = nn.functional.normalize(demo_k(x2[perm]), dim=1)[torch.argsort(perm)]
            q = nn.functional.normalize(demo_q(x1), dim=1)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ demo_queue], 1) / tau
            demo_loss = nn.functional.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
            demo_loss.backward()
            torch.testing.assert_close(loss, demo_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(keys, k, rtol=1e-4, atol=1e-5)
            ours = [p.grad for p in [*model.backbone.parameters(), *model.projector.parameters()]]
            for g, d in zip(ours, [p.grad for p in demo_q.parameters()]):
                assert (g - d).norm() <= 1e-4 * d.norm() + 1e-7
            ptr = fm.enqueue(queue, ptr, keys)
            with torch.no_grad():
                for p, g in zip([*model.backbone.parameters(), *model.projector.parameters()], ours):
                    p -= 0.5 * g  # a large step: the next one sees other weights and a queue with real keys


def torchvision_resnet18(dim, norm_layer, small_stem):
    import torchvision

    net = torchvision.models.resnet18(num_classes=dim, norm_layer=norm_layer)
    if small_stem:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return net


def test_small_augmentations_have_no_blur_and_solarize_only_view_2():
    from data import augmentations

    for name in ("small", "small-asymmetric"):
        t1, t2 = augmentations(name, 32)
        names = [[type(t).__name__ for t in v.transforms] for v in (t1, t2)]
        assert not any("Blur" in n for v in names for n in v) and "RandomResizedCrop" in names[0]
        assert t1.transforms[0].scale == (0.08, 1.0)
        assert ("RandomSolarize" in names[1]) == (name == "small-asymmetric") and "RandomSolarize" not in names[0]


def test_recipe_warmup_never_exceeds_a_tenth_of_the_run():
    r = pretrain.resolve_recipe("imagenet", "mocov3", dict(epochs=5))  # MoCo v3: 10 warm-up epochs
    assert r["warmup_epochs"] == 0.5 and r["epochs"] == 5
    lrs = [pretrain.schedules(s, 50, 10, 1.0, r)[0] for s in range(50)]  # 10 steps per epoch
    assert lrs[4] < lrs[5] == max(lrs) and math.isclose(lrs[5], 1.0)  # warm-up of 5 steps, not 100
    assert pretrain.resolve_recipe("imagenet", "mocov3", dict(epochs=100))["warmup_epochs"] == 10  # the paper's
    assert pretrain.resolve_recipe("imagenet", "mocov3", dict(epochs=5, warmup_epochs=3))["warmup_epochs"] == 3


def split_bn_reference(x, bn, splits):
    """Slow reference: normalise samples i, i + splits, ... as one batch each (biased variance), in a loop."""
    y = torch.empty_like(x)
    for g in range(splits):
        xs = x[g::splits]
        mean, var = xs.mean((0, 2, 3), keepdim=True), xs.var((0, 2, 3), unbiased=False, keepdim=True)
        y[g::splits] = (xs - mean) / (var + bn.eps).sqrt() * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return y


def test_split_batchnorm_against_a_loop():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4) * 2 + 1
    bn = fm.SplitBatchNorm(3, splits=4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    torch.testing.assert_close(bn(x), split_bn_reference(x, bn, 4), rtol=1e-5, atol=1e-5)
    groups = [x[g::4] for g in range(4)]  # running stats: the mean of the groups' (unbiased variance, momentum 0.1)
    mean = torch.stack([g.mean((0, 2, 3)) for g in groups]).mean(0)
    var = torch.stack([g.var((0, 2, 3)) for g in groups]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(bn(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
    bn.eval()  # evaluation: plain BN with the running statistics
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                                bn.bias, False), rtol=0, atol=0)


def test_split_batchnorm_keeps_channels_last():
    """A channels_last input (pretrain.py's default on GPUs) leaves in channels_last, with the same values: the layers
    after every split BN would otherwise run on NCHW copies."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4)
    bn = fm.SplitBatchNorm(3, splits=4)
    y = bn(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, split_bn_reference(x, bn, 4), rtol=1e-5, atol=1e-5)
    assert bn(x).is_contiguous()


def test_split_bn_keeps_torchvision_keys_and_one_process_shuffle_changes_the_groups():
    torch.manual_seed(0)
    net = fm.resnet("resnet18", small_stem=True)
    keys = set(net.state_dict())
    fm.split_bn(net, 4)
    assert set(net.state_dict()) == keys and isinstance(net.bn1, fm.SplitBatchNorm)
    x = torch.randn(16, 3, 16, 16)
    g = torch.Generator().manual_seed(3)
    got = fm.shuffle_bn_forward(net, x, g)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = net(x[perm])[torch.argsort(perm)]  # keys in the original order, BN groups drawn from the shuffle
        plain = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # other images share each key's BN statistics


def test_moco_v1_v2_backbones_are_not_zero_initialised():
    for method, zero in (("mocov1", False), ("mocov2", False), ("mocov3", True), ("fastmoco", True)):
        torch.manual_seed(0)
        bn = fm.OnlineEncoder(method, "resnet18", small_stem=True).backbone.layer1[0].bn2
        assert bool((bn.weight == 0).all()) == zero, method


def test_linear_probe_classifier_folds_its_normalisation_into_fc():
    torch.manual_seed(0)
    clf = linear_probe.classifier(8, 3, normalize=True)
    for _ in range(5):  # running statistics of a few batches
        clf(torch.randn(32, 8) * 3 + 2)
    clf.eval()
    sd = linear_probe.linear_weights(clf)
    f = torch.randn(10, 8) * 3 + 2
    torch.testing.assert_close(f @ sd["fc.weight"].T + sd["fc.bias"], clf(f), rtol=1e-5, atol=1e-5)
    plain = linear_probe.classifier(8, 3, normalize=False)
    assert linear_probe.linear_weights(plain)["fc.weight"].equal(plain[0].weight)


def test_plot_groups_seeds_and_draws_both_panels(tmp_path):
    for name, shift in (("fastmoco-s0", 0), ("fastmoco-s1", 2), ("mocov3-s0", -5)):
        d = tmp_path / name
        d.mkdir()
        rows = [dict(step=10 * e, epoch=e, knn_top1=20 + 5 * e + shift, train_seconds=30.0 * e) for e in range(4)]
        rows.insert(1, dict(step=5, epoch=0.5, loss=3.0))  # loss rows are ignored
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.label_of(tmp_path / "fastmoco-s1") == "fastmoco" == plot.label_of(tmp_path / "fastmoco-s0/log.jsonl")
    out = plot.draw({"fastmoco": [tmp_path / "fastmoco-s0", tmp_path / "fastmoco-s1"],
                     "mocov3": [tmp_path / "mocov3-s0"]}, tmp_path / "knn.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text(json.dumps(dict(step=1, loss=2.0)) + "\n")
    with pytest.raises(ValueError, match="--knn-every"):
        plot.knn_rows(tmp_path / "empty")


@pytest.mark.slow
def test_small_recipe_run_logs_knn_and_training_time_and_says_where_it_went(parquet, tmp_path):
    from conftest import stage

    out = tmp_path / "run"
    args = ("--data", parquet, "--recipe", "small", "--method", "mocov2", "--batch-size", 16,  # no --arch: ResNet-18
            "--epochs", 2, "--knn-every", 1, "--workers", 0, "--no-tensorboard", "--output-dir", out)
    p = stage("pretrain.py", *args)
    assert "--queue-size lowered to 48" in p.stdout  # 4096 > the 48 images of the data
    assert "kNN top-1" in p.stdout and "at the start ->" in p.stdout and str(out / "ckpt.safetensors") in p.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [0, 1, 2] and knn[0]["train_seconds"] == 0
    assert 0 < knn[1]["train_seconds"] < knn[2]["train_seconds"]
    _, meta = ck.load_checkpoint(out / "ckpt.safetensors")
    assert meta["args"]["recipe"] == "small" and meta["small_stem"] and meta["image_size"] == 32
    assert meta["arch"] == meta["args"]["arch"] == "resnet18" and "backbone.layer1.0.conv2.weight" in _
    assert meta["recipe"]["lr"] == 0.12 and meta["train_seconds"] > 0
    again = stage("pretrain.py", *args)  # the same command continues the (finished) run: same resolved settings
    assert "resuming from" in again.stderr and "step 6/6" in again.stdout
    other = stage("pretrain.py", *args[:-2], "--output-dir", out, "--recipe", "imagenet", check=False)
    assert other.returncode == 1 and "mocov2/resnet18 checkpoint; this run is mocov2/resnet50" in other.stderr
    other = stage("pretrain.py", *args[:-2], "--output-dir", out, "--recipe", "imagenet", "--arch", "resnet18",
                  check=False)
    assert other.returncode == 1 and "other settings (recipe" in other.stderr
    q = stage("plot.py", out, "-o", tmp_path / "knn.png")
    assert (tmp_path / "knn.png").is_file() and "wrote" in q.stdout
    r = stage("linear_probe.py", out / "ckpt.safetensors", "--data", parquet, "--cached-features", "--epochs", 2,
              "--batch-size", 16, "--output-dir", tmp_path / "lin")
    assert json.loads((tmp_path / "lin" / "results.json").read_text())["recipe"] == "small"


def test_small_data_bench_table_from_logs(tmp_path):
    from bench import small_data

    def run(name, curve, seconds=60.0):
        d = tmp_path / name
        d.mkdir()
        rows = [dict(step=10 * e, epoch=e, knn_top1=k, train_seconds=seconds * e) for e, k in enumerate(curve)]
        rows.insert(1, dict(step=5, epoch=0.5, loss=3.0, img_per_s=40.0))
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    table = small_data.summary({"fastmoco": [run("f0", [20, 30, 40]), run("f1", [20, 32, 44])],
                                "mocov3": [run("m0", [20, 25, 30, 42, 45])],
                                "mocov2": [run("v0", [20, 21, 22])]})
    rows = {r["run"]: r for r in table}
    assert rows["fastmoco"]["kNN@end"] == "42.0" and rows["fastmoco"]["std"] == "2.8"
    assert rows["fastmoco"]["gain"] == "+22.0" and rows["fastmoco"]["train_min"] == "2.0"
    assert rows["mocov3"]["epoch reaching fastmoco@end"] == "3"  # the first epoch at >= 42.0
    assert rows["mocov2"]["epoch reaching fastmoco@end"] == "not reached" and rows["mocov2"]["img/s"] == "40"
    md = small_data.markdown(table).splitlines()
    assert md[0].startswith("| run | seeds |") and len(md) == 5


def test_small_data_bench_skips_without_data(tmp_path):
    from bench import small_data

    result = CliRunner().invoke(small_data.app, ["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "skip:" in result.output and not (tmp_path / "out").exists()


def test_small_data_bench_groups(tmp_path):
    from bench import small_data

    assert all(n in small_data.RUNS for g in small_data.GROUPS.values() for n in g)
    assert "fastmoco-official-init" not in small_data.GROUPS["all"] and len(small_data.GROUPS["all"]) == 8
    (tmp_path / "train-00000-of-00001.parquet").touch()
    result = CliRunner().invoke(small_data.app, ["--data", str(tmp_path), "--runs", "fastmoco,mocov9"])
    assert result.exit_code == 1 and "unknown run mocov9" in result.output


def test_small_data_bench_passes_flags_after_dashes_to_every_run(tmp_path, monkeypatch):
    from bench import small_data

    (tmp_path / "train-00000-of-00001.parquet").touch()
    monkeypatch.setattr(small_data, "subset", lambda *a: None)
    cmds = []

    def fake_run(cmd, **kw):  # a finished pretrain.py run: its log and checkpoint
        cmds.append(cmd)
        run = Path(cmd[cmd.index("--output-dir") + 1])
        run.mkdir(parents=True)
        (run / "ckpt.safetensors").touch()
        rows = [dict(step=0, epoch=0, knn_top1=20.0, train_seconds=0),
                dict(step=9, epoch=1, knn_top1=30.0, train_seconds=9.0)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr(small_data.subprocess, "run", fake_run)
    args = ["--data", str(tmp_path), "--runs", "claim,byol", "--seeds", "0", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(small_data.app, [*args, "--", "--no-small-stem", "--lr", "0.5"])
    assert result.exit_code == 0, result.output
    assert [Path(c[c.index("--output-dir") + 1]).name for c in cmds] == [
        "fastmoco-s0", "fastmoco-no-patches-s0", "mocov3-s0", "byol-s0"]  # a group and a name, in order
    assert all(c[-3:] == ["--no-small-stem", "--lr", "0.5"] for c in cmds)
    assert "| mocov3 | 1 | 1 | 20.0 | 30.0 |" in result.output and (tmp_path / "out" / "knn.png").is_file()

    cmds.clear()
    result = CliRunner().invoke(small_data.app, [*args[:2], "--runs", "budget", "--seeds", "0", "--epochs", "3",
                                                 "--out", str(tmp_path / "budget")])
    assert result.exit_code == 0, result.output  # Fast-MoCo at E epochs, MoCo v3 at E, 2E, 4E
    assert [(c[c.index("--method") + 1], c[c.index("--epochs") + 1]) for c in cmds] == [
        ("fastmoco", "3"), ("mocov3", "3"), ("mocov3", "6"), ("mocov3", "12")]


def test_small_data_bench_runs_the_independent_reference_on_the_same_setting(tmp_path, monkeypatch):
    from bench import small_data

    (tmp_path / "train-00000-of-00001.parquet").touch()
    monkeypatch.setattr(small_data, "subset", lambda *a: None)
    cmds, real_run = [], small_data.subprocess.run

    def fake_run(cmd, **kw):  # a finished run of either script: its log and its end marker
        if "--data" not in cmd:  # not ours (matplotlib asks fc-list for fonts)
            return real_run(cmd, **kw)
        cmds.append(cmd)
        ref = "--out" in cmd
        run = Path(cmd[cmd.index("--out" if ref else "--output-dir") + 1])
        run.mkdir(parents=True)
        (run / ("done" if ref else "ckpt.safetensors")).touch()
        (run / "log.jsonl").write_text(json.dumps(dict(step=0, epoch=0, knn_top1=20.0, train_seconds=0)) + "\n")

    monkeypatch.setattr(small_data.subprocess, "run", fake_run)
    args = ["--data", str(tmp_path), "--runs", "parity", "--seeds", "0", "--epochs", "3", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(small_data.app, [*args, "--", "--no-small-stem", "--lr", "0.5"])
    assert result.exit_code == 0, result.output
    ref = [c for c in cmds if c[1].endswith("moco_reference.py")]
    assert len(cmds) == 4 and len(ref) == 2 and "--v2" in ref[1] and "--v2" not in ref[0]
    for c in ref:  # the setting is shared, the recipe is the demo's own: only the stem flag is passed on
        assert c[c.index("--epochs") + 1] == "3" and c[-1] == "--no-small-stem" and "--lr" not in c
    assert CliRunner().invoke(small_data.app, [*args, "--", "--no-small-stem"]).exit_code == 0 and len(cmds) == 4


def test_reference_script_imports_nothing_of_the_project():
    text = (Path(__file__).resolve().parents[1] / "bench" / "moco_reference.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"io", "json", "math", "time", "functools", "pathlib", "typing", "torch",
                       "torchvision", "typer", "PIL", "pyarrow"}, imports


def test_reference_script_runs_and_logs_as_pretrain_does(parquet, tmp_path):
    """bench/moco_reference.py end to end on 48 images (MoCo v2's head): loss rows every step, kNN every epoch."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "bench" / "moco_reference.py"), "--data", str(parquet), "--out",
                    str(tmp_path), "--epochs", "2", "--batch-size", "16", "--queue-size", "32", "--knn-every", "1",
                    "--log-every", "1", "--no-small-stem", "--v2", "--workers", "0"], check=True, capture_output=True)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1" in r] == [0, 3, 6] and (tmp_path / "done").is_file()
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_bn_splits_flag():
    model = fm.OnlineEncoder("mocov2", "resnet18", small_stem=True)
    pretrain.split_bn(model, "mocov2", None, 32, 1)  # default on one process: 4 groups of 8 for a batch of 32
    assert model.backbone.bn1.splits == 4
    model = fm.OnlineEncoder("mocov1", "resnet18", small_stem=True)
    pretrain.split_bn(model, "mocov1", 2, 32, 2)
    assert model.backbone.layer1[0].bn1.splits == 2
    pretrain.split_bn(model := fm.OnlineEncoder("mocov2", "resnet18"), "mocov2", None, 32, 2)  # several processes
    assert model.backbone.bn1.splits == 1
    with pytest.raises(SystemExit, match="does not divide the batch of 16"):
        pretrain.split_bn(fm.OnlineEncoder("mocov2", "resnet18"), "mocov2", 3, 32, 2)
    with pytest.raises(SystemExit, match="--method mocov3 has none"):
        pretrain.split_bn(fm.OnlineEncoder("mocov3", "resnet18"), "mocov3", 8, 32, 1)


def test_sweep_bench_table(tmp_path, capsys):
    from bench import sweep

    for lr, tau, end in ((0.5, 0.1, 40.0), (0.5, 0.2, 45.5), (1.0, 0.1, 50.25), (1.0, 0.2, 30.0)):
        run = tmp_path / f"lr{lr:g}-tau{tau:g}"  # finished runs: the sweep reads them, runs nothing
        run.mkdir()
        (run / "ckpt.safetensors").touch()
        rows = [dict(step=0, knn_top1=20.0), dict(step=5, loss=3.0), dict(step=10, knn_top1=end)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(sweep.app, ["--lr", "0.5,1", "--tau", "0.1,0.2", "--out", str(tmp_path), "--",
                                            "--epochs", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "--epochs 2" in lines[0] and "at initialisation: 20.0" in lines[0]
    assert lines[2:] == ["| lr \\ tau | 0.1 | 0.2 |", "|---|---|---|", "| 0.5 | 40.0 | 45.5 |", "| 1 | 50.2 | 30.0 |"]


def test_warm_queue_fills_the_queue_with_real_keys_before_the_first_update(parquet, tmp_path):
    """--warm-queue (the small recipe's default): the first K/B steps only enqueue keys of the initial encoders.
    Seen against --no-warm-queue at step 2: the first batch's keys are the same, the second's come from the
    unchanged encoders, and no weight has moved (the target still equals the online encoder)."""
    from conftest import stage

    def run(name, *flags):
        stage("pretrain.py", "--data", parquet, "--recipe", "small", "--method", "mocov2", "--arch", "resnet18",
              "--no-small-stem", "--batch-size", 8, "--queue-size", 16, "--max-steps", 2, "--workers", 0,
              "--no-tensorboard", "--output-dir", tmp_path / name, *flags)
        tensors, meta = ck.load_checkpoint(tmp_path / name / "ckpt.safetensors")
        moved = max((tensors[k] - tensors["target." + k]).abs().max().item() for k in tensors
                    if k.startswith("backbone.") and "running" not in k and "num_batches" not in k)
        return tensors["queue"], moved, meta["recipe"]["warm_queue"]

    warm, warm_moved, on = run("warm")
    cold, cold_moved, off = run("cold", "--no-warm-queue")
    assert on and not off
    assert torch.allclose(warm[:8], cold[:8], atol=1e-6) and not torch.allclose(warm[8:], cold[8:], atol=1e-3)
    assert warm_moved == 0 and cold_moved > 0
    p = stage("pretrain.py", "--data", parquet, "--method", "mocov3", "--warm-queue", "--output-dir", tmp_path / "x",
              check=False)
    assert p.returncode == 1 and "--method mocov3 has none" in p.stderr
