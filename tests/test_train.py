import json

import pytest
import torch
from conftest import tiny_overrides

from transferkit.config import load_config
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier
from transferkit.train.build import build_model
from transferkit.train.checkpoint import load_weights, read_metadata
from transferkit.train.loop import read_metrics, train
from transferkit.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_tiny_run_learns_and_writes_run_dir(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 6}))
    result = train(cfg, out=tmp_path / "run", quiet=True)
    rows = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result.best_val_acc > 1 / 3 + 0.15  # 3 classes: chance is 1/3
    run = tmp_path / "run"
    for name in ("config.yaml", "classes.json", "metrics.jsonl", "curves.png", "summary.json",
                 "checkpoints/best.safetensors", "checkpoints/last.safetensors"):
        assert (run / name).is_file(), name
    assert json.loads((run / "classes.json").read_text()) == ["circle", "cross", "square"]
    assert "num_classes: 3" in (run / "config.yaml").read_text()
    meta = read_metadata(run / "checkpoints" / "best.safetensors")
    assert meta["epoch"] == result.best_epoch and meta["val_acc"] == result.best_val_acc
    model, _ = create_classifier("test_efficientnet", 3)
    load_weights(model, run / "checkpoints" / "last.safetensors")


def test_same_seed_same_run(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2}))
    a = train(cfg, out=tmp_path / "a", quiet=True)
    b = train(cfg, out=tmp_path / "b", quiet=True)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a.metrics]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b.metrics]


def test_existing_run_dir_is_not_overwritten(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1}))
    train(cfg, out=tmp_path / "r", quiet=True)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(TransferKitError, match="already holds a run"):
        train(cfg, out=tmp_path / "r", quiet=True)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_head_learning_rate_multiplier():
    cfg = load_config(None, ["data.root=x", "optim.lr=0.02", "optim.head_lr_mult=10"])
    model, family = create_classifier("test_efficientnet", 3)
    groups = param_groups(model, family.head_patterns, cfg.optim)
    head = next(g for g in groups if g["name"] == "head")
    assert head["lr"] == pytest.approx(0.2)
    assert {id(p) for p in head["params"]} == {id(model.classifier.weight), id(model.classifier.bias)}
    opt = build_optimizer(model, family.head_patterns, cfg.optim)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.2])


def test_schedules():
    cfg = load_config(None, ["data.root=x", "schedule.epochs=4", "schedule.warmup_epochs=1"]).schedule
    steps = [lr_factor(s, 40, 10, cfg) for s in range(40)]
    assert steps[0] == pytest.approx(0.1) and steps[9] == pytest.approx(1.0)  # linear warmup
    assert steps[10] == pytest.approx(1.0) and steps[-1] < 0.01  # cosine to ~0
    assert all(a >= b for a, b in zip(steps[10:], steps[11:], strict=False))
    step = load_config(None, ["data.root=x", "schedule.kind=step", "schedule.step_epochs=2",
                              "schedule.gamma=0.5"]).schedule
    assert [lr_factor(s * 10, 40, 10, step) for s in range(4)] == [1.0, 1.0, 0.5, 0.5]
    const = load_config(None, ["data.root=x", "schedule.kind=constant"]).schedule
    assert lr_factor(39, 40, 10, const) == 1.0
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, step, steps_per_epoch=10)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_frozen_batchnorm_keeps_statistics_and_weights(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1, "optim.freeze_bn": "true"}))
    result = train(cfg, out=tmp_path / "run", quiet=True)
    after, _ = create_classifier("test_efficientnet", 3)
    load_weights(after, result.run_dir / "checkpoints" / "last.safetensors")
    start, _, _ = build_model(cfg, 3)  # the untrained model, exactly as the run built it
    bn = [n for n, m in start.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    s0, s1 = start.state_dict(), after.state_dict()
    for name in bn:
        for key in ("running_mean", "running_var", "weight", "bias", "num_batches_tracked"):
            assert torch.equal(s0[f"{name}.{key}"], s1[f"{name}.{key}"]), f"{name}.{key}"
    assert not torch.equal(s0["conv_stem.weight"], s1["conv_stem.weight"])  # the rest did train
