"""TensorBoard: a tiny run's event file, read back with tensorboard's own reader, holds every epoch's
losses, metrics and per-group learning rates (and, for detection, validation images)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from transferkit.config import load_config
from transferkit.data.synthetic import make_synthetic_detection
from transferkit.run import train
from transferkit.training.board import lr_tags, scalars


def read_events(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_classifier_run_logs_its_metrics_and_learning_rates(synth_root, tmp_path):
    overrides = tiny_overrides(synth_root, **{"schedule.epochs": 2, "logging.tensorboard": "true",
                                              "optim.head_lr_mult": 10})
    result = train(load_config(None, overrides), out=tmp_path / "run", quiet=True)
    events = read_events(tmp_path / "run")
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_loss", "val_acc", "lr/head", "lr/base"} <= tags, tags
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_loss", "val_acc"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [1, 2]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)
    # the head's learning rate is 10x the base's at every epoch end
    head, base = events.Scalars("lr/head"), events.Scalars("lr/base")
    assert [h.value for h in head] == pytest.approx([10 * b.value for b in base], rel=1e-6)
    assert base[-1].value == pytest.approx(rows[-1]["lr"], rel=1e-6)
    assert not events.Tags()["images"]
    assert result.best_epoch in (1, 2)


def test_no_tensorboard_unless_asked(synth_root, tmp_path):
    train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1})), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_detection_run_logs_map_and_validation_images(tmp_path):
    root = make_synthetic_detection(tmp_path / "shapes", 8, 3, 96, seed=0)
    values = {
        "task": "detection", "model.name": "test_efficientnet", "pretrained.source": "null",
        "data.root": str(root), "data.format": "coco",
        "data.train_ann": str(root / "annotations" / "train.json"), "data.train_images": str(root / "images" / "train"),
        "data.val_ann": str(root / "annotations" / "val.json"), "data.val_images": str(root / "images" / "val"),
        "data.batch_size": 4, "detection.arch": "fcos", "detection.min_size": "[96]", "detection.max_size": 96,
        "detection.fpn_channels": 64, "schedule.epochs": 1, "logging.tensorboard": "true",
        "logging.tensorboard_images": 2,
    }
    train(load_config(None, [f"{k}={v}" for k, v in values.items()]), out=tmp_path / "run", quiet=True)
    events = read_events(tmp_path / "run")
    assert {"val_map", "val_ap50", "val_ap_per_class/circle"} <= set(events.Tags()["scalars"])
    assert sorted(events.Tags()["images"]) == ["val_images/0", "val_images/1"]
    image = events.Images("val_images/0")[0]
    assert (image.width, image.height) == (96, 96) and image.step == 1


def test_tags_from_a_row():
    row = {"epoch": 3, "phase": "finetune", "train_loss": 0.5, "val_map": 0.25,
           "val_ap_per_class": {"cat": 0.5, "dog": 0.0}, "lr": 0.1}
    assert scalars(row) == {"train_loss": 0.5, "val_map": 0.25, "val_ap_per_class/cat": 0.5,
                            "val_ap_per_class/dog": 0.0, "lr": 0.1}
    assert lr_tags([("head", 0.1), ("base", 0.01), ("base", 0.001)]) == {
        "lr/head": 0.1, "lr/base#1": 0.01, "lr/base#2": 0.001}


def test_missing_tensorboard_is_named_in_one_line(synth_root, tmp_path, monkeypatch):
    import sys

    from transferkit.errors import TransferKitError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    overrides = tiny_overrides(synth_root, **{"schedule.epochs": 1, "logging.tensorboard": "true"})
    with pytest.raises(TransferKitError, match=r"pip install 'transferkit\[tensorboard\]'"):
        train(load_config(None, overrides), out=tmp_path / "run", quiet=True)


def test_a_resumed_board_drops_what_was_logged_after_its_epoch(tmp_path):
    from transferkit.training.board import Board

    first = Board(tmp_path / "tensorboard", 1)  # a task that draws no images
    for epoch in (1, 2, 3):
        first.record({"epoch": epoch, "train_loss": float(epoch)}, [])
    first.close()
    resumed = Board(tmp_path / "tensorboard", 2)  # stopped after epoch 1: epochs 2 and 3 run again
    for epoch in (2, 3):
        resumed.record({"epoch": epoch, "train_loss": 10.0 * epoch}, [])
    resumed.close()
    rows = [(e.step, e.value) for e in read_events(tmp_path).Scalars("train_loss")]
    assert rows == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_lp_ft_logs_the_heads_rate_through_both_phases(synth_root, tmp_path):
    """The probe trains the head alone: its rate is lr/head, the curve the fine-tuning's head goes on
    with; the body's (lr/base) starts with the fine-tuning."""
    overrides = tiny_overrides(synth_root, **{"strategy": "lp_ft", "probe.epochs": 2, "schedule.epochs": 2,
                                              "logging.tensorboard": "true", "optim.head_lr_mult": 10,
                                              "schedule.kind": "constant", "probe.lr": 0.05})
    train(load_config(None, overrides), out=tmp_path / "run", quiet=True)
    events = read_events(tmp_path / "run")
    assert sorted(t for t in events.Tags()["scalars"] if t.startswith("lr/")) == ["lr/base", "lr/head"]
    head, base = events.Scalars("lr/head"), events.Scalars("lr/base")
    assert [e.step for e in head] == [1, 2, 3, 4] and [e.step for e in base] == [3, 4]
    assert [e.value for e in head] == pytest.approx([0.05, 0.05, 0.1, 0.1])
    assert [e.value for e in base] == pytest.approx([0.01, 0.01])
