"""linear_probe, lp_ft and gradual_unfreeze."""

import re
import time

import pytest
import torch
from conftest import tiny_overrides

from transferkit.config import load_config
from transferkit.models.classification import create_classifier
from transferkit.progress import console
from transferkit.run import train
from transferkit.tasks.classification import build_model
from transferkit.training import strategies
from transferkit.training.checkpoint import load_weights


def run(root, tmp_path, quiet=True, **extra):
    cfg = load_config(None, tiny_overrides(root, **extra))
    result = train(cfg, out=tmp_path / "run", quiet=quiet)
    start, _, _ = build_model(cfg, 3)
    after, _ = create_classifier("test_efficientnet", 3)
    load_weights(after, result.run_dir / "checkpoints" / "last.safetensors")
    return result, start.state_dict(), after.state_dict()


def test_linear_probe_trains_only_the_head(synth_root, tmp_path):
    result, s0, s1 = run(synth_root, tmp_path, strategy="linear_probe", **{"schedule.epochs": 8, "optim.lr": 0.05})
    assert [r["phase"] for r in result.metrics] == ["probe"] * 8
    body = [k for k in s0 if not k.startswith("classifier.")]
    assert all(torch.equal(s0[k], s1[k]) for k in body)  # running statistics included
    assert not torch.equal(s0["classifier.weight"], s1["classifier.weight"])
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    assert result.best_value > 1 / 3 + 0.15


def test_linear_probe_with_augmented_views(synth_root, tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(console, "print", lambda *a, **k: said.append(str(a[0]) if a else ""))
    real = strategies.extract_features

    def slow(*args, **kwargs):  # the features take 0.6 s at least (train and val), however fast the machine
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "extract_features", slow)
    result, s0, s1 = run(synth_root, tmp_path, quiet=False, strategy="linear_probe",
                         **{"schedule.epochs": 2, "probe.augment": "true", "probe.views": 2, "probe.cache": "disk"})
    assert len(result.metrics) == 2
    line = next(s for s in said if s.startswith("probe:"))
    found = re.fullmatch(r"probe: features of 72 train x 2 view\(s\) and 30 val images cached \(disk, (\d+\.\d)s\)",
                         line)
    assert found, line
    # The first epoch's time includes the features' (printed to 0.1 s), the second's does not.
    assert 0.6 <= float(found[1]) <= result.metrics[0]["seconds"] + 0.05, (found[1], result.metrics)
    assert result.metrics[1]["seconds"] < result.metrics[0]["seconds"] - 0.4, result.metrics
    saved = torch.load(result.run_dir / "probe_features.pt", weights_only=True)
    assert saved["train"].shape[:2] == (2, 72) and saved["val"].shape[:2] == (1, 30)
    # Each view is its own augmented pass: the two differ for every image; probing leaves the backbone as built.
    differs = (saved["train"][0] - saved["train"][1]).abs().amax(dim=1) > 1e-4
    assert differs.all(), f"{int((~differs).sum())} of 72 images got the same features in both views"
    assert all(torch.equal(s0[k], s1[k]) for k in s0 if not k.startswith("classifier."))


def test_lp_ft_probes_then_fine_tunes(synth_root, tmp_path):
    result, s0, s1 = run(synth_root, tmp_path, strategy="lp_ft", **{"probe.epochs": 2, "schedule.epochs": 2})
    assert [r["phase"] for r in result.metrics] == ["probe", "probe", "finetune", "finetune"]
    assert [r["epoch"] for r in result.metrics] == [1, 2, 3, 4]
    assert not torch.equal(s0["conv_stem.weight"], s1["conv_stem.weight"])


def test_gradual_unfreeze_opens_from_the_top(synth_root, tmp_path):
    result, s0, s1 = run(synth_root, tmp_path, strategy="gradual_unfreeze", **{"schedule.epochs": 1})
    assert result.metrics[0]["phase"].startswith("unfreeze 0/")
    trainable = [k for k in s0 if "running" not in k and "num_batches" not in k]
    changed = {k for k in trainable if not torch.equal(s0[k], s1[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    result2, s0, s1 = run(synth_root, tmp_path / "two", strategy="gradual_unfreeze",
                          **{"schedule.epochs": 3, "unfreeze.every": 1})
    assert [r["phase"].split(",")[0] for r in result2.metrics][:3] == [
        "unfreeze 0/6 stages", "unfreeze 1/6 stages", "unfreeze 2/6 stages"]
    assert torch.equal(s0["conv_stem.weight"], s1["conv_stem.weight"])  # the bottom stage never opened
    assert not torch.equal(s0["conv_head.weight"], s1["conv_head.weight"])  # the top stage did


def test_unfreeze_stages_opens_timms_coarse_stages_from_the_top():
    import timm

    from transferkit.training.strategies import stage_count, unfreeze_stages

    # ConvNeXt: a stem, four stages of one to four blocks, and the head (its norm and the classifier).
    model = timm.create_model("test_convnext", num_classes=3)

    def stage(name):
        return ".".join(name.split(".")[:2]) if name.startswith("stages.") else name.split(".")[0]

    everything = {id(p) for p in model.parameters()}
    assert stage_count(model) == 5  # a stage is a whole `stages.N`, not one of its blocks
    opened = {}
    for stages in range(4):
        count = unfreeze_stages(model, ["head.fc.*"], stages, everything)
        training = [n for n, p in model.named_parameters() if p.requires_grad]
        assert count == len(training)
        opened[stages] = sorted({stage(n) for n in training})
    assert opened == {0: ["head"], 1: ["head", "stages.3"], 2: ["head", "stages.2", "stages.3"],
                      3: ["head", "stages.1", "stages.2", "stages.3"]}
    # Parameters outside the optimiser (frozen by a rule) are left as they are; the others all open.
    model.requires_grad_(False)
    kept = model.stages[1].downsample[1].weight
    assert unfreeze_stages(model, ["head.fc.*"], 5, everything - {id(kept)}) == len(everything) - 1
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["stages.1.downsample.1.weight"]


def test_a_probe_epoch_sees_each_image_once_in_one_of_its_views_and_averages_per_image():
    from transferkit.training.strategies import train_probe_epoch

    views, n = 3, 7
    # feature = 100 x view + image index, so a batch tells which view of which image it got
    feats = torch.tensor([[[100.0 * v + i] for i in range(n)] for v in range(views)])
    labels = torch.arange(n)
    batches = []

    def step(x, y):
        batches.append((x[:, 0].tolist(), y.tolist()))
        return float(len(y))  # a batch's mean loss: its size, so the per-image average is weighted

    loss = train_probe_epoch(feats, labels, step, 3, torch.Generator().manual_seed(0))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    seen = [i for _, y in batches for i in y]
    assert sorted(seen) == list(range(n)) and seen != list(range(n))  # each image once, shuffled
    for x, y in batches:
        assert [int(f) % 100 for f in x] == y and all(0 <= f // 100 < views for f in x)
    assert {int(f) // 100 for x, _ in batches for f in x} != {0}  # views drawn, not always the first
    assert loss == pytest.approx((3 * 3 + 3 * 3 + 1 * 1) / 7)
    # The same generator state, the same epoch.
    again = []
    train_probe_epoch(feats, labels, lambda x, y: again.append(x[:, 0].tolist()) or 0.0, 3,
                      torch.Generator().manual_seed(0))
    assert again == [x for x, _ in batches]
    one = train_probe_epoch(feats[:, :1], labels[:1], lambda x, y: 0.25, 3, torch.Generator().manual_seed(0))
    assert one == 0.25  # a one-image epoch


def test_the_probe_trains_at_the_head_rate_or_its_own_whatever_the_rules(synth_root, tmp_path):
    rules = {"schedule.epochs": 1, "schedule.kind": "constant", "optim.lr": 0.01, "optim.head_lr_mult": 10,
             "optim.param_groups": "[{match: 'classifier.*', lr_mult: 0.5}]"}  # rules of the fine-tuning
    result, _, _ = run(synth_root, tmp_path / "head", strategy="linear_probe", **rules)
    assert result.metrics[0]["lr"] == pytest.approx(0.1)  # optim.lr x head_lr_mult
    result, _, _ = run(synth_root, tmp_path / "own", strategy="linear_probe", **rules, **{"probe.lr": 0.02})
    assert result.metrics[0]["lr"] == pytest.approx(0.02)


def test_the_probe_of_lp_ft_has_a_schedule_of_its_own_epochs(synth_root, tmp_path):
    result, _, _ = run(synth_root, tmp_path, strategy="lp_ft", **{"probe.epochs": 2, "schedule.epochs": 3,
                                                                  "schedule.kind": "cosine"})
    probe = [r for r in result.metrics if r["phase"] == "probe"]
    # Cosine over the probe's 2 epochs, by optimiser step: half way after the first, at zero after the second.
    assert [r["lr"] for r in probe] == pytest.approx([0.005, 0.0], abs=1e-9)


def test_the_probe_drops_features_at_the_models_rate_and_ignores_the_fine_tuning_freeze(synth_root, tmp_path):
    base = {"schedule.epochs": 1, "schedule.kind": "constant", "optim.freeze_until": "blocks.1",
            "optim.layer_decay": 0.5}  # fine-tuning settings that would change the head's rate or freeze it
    plain, _, _ = run(synth_root, tmp_path / "plain", strategy="linear_probe", **base)
    dropped, _, _ = run(synth_root, tmp_path / "dropped", strategy="linear_probe", **base, **{"model.drop_rate": 0.5})
    assert plain.metrics[0]["lr"] == dropped.metrics[0]["lr"] == pytest.approx(0.01)
    assert plain.metrics[0]["train_loss"] != dropped.metrics[0]["train_loss"]
