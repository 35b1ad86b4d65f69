"""Which epoch's weights become best.safetensors (EpochRecorder): the higher score, ties to the lower
loss; the lower loss where the loss is the metric; the EMA's weights where the metric is the EMA's;
and the line each epoch prints."""

import re
import time

import pytest
import torch
from safetensors.torch import load_file

from transferkit.training.checkpoint import read_metadata
from transferkit.training.loop import EpochRecorder


def recorder_for(tmp_path, best_metric, ema=False):
    model = torch.nn.Linear(2, 1)
    (tmp_path / "checkpoints").mkdir()
    said = []
    recorder = EpochRecorder(tmp_path, model, {"classes": ["a"]}, lambda *a, **k: said.append(a[0]),
                             best_metric=best_metric)
    if ema:
        recorder.ema_model = torch.nn.Linear(2, 1)
    return recorder, said


def record_epochs(recorder, rows):
    """Each row recorded with the weights set to its epoch number, so that a checkpoint names its epoch."""
    bests = []
    for epoch, metrics in enumerate(rows, 1):
        with torch.no_grad():
            recorder.model.bias.fill_(epoch)
            if recorder.ema_model is not None:
                recorder.ema_model.bias.fill_(-epoch)
        recorder.record("finetune", 1.0, metrics, 0.01, time.perf_counter())
        bests.append(recorder.best_epoch)
    return bests


@pytest.mark.parametrize("best_metric, rows, expected", [
    # higher accuracy wins; a tie goes to the lower loss, an exact tie keeps the earlier epoch
    ("val_acc", [(0.5, 0.9), (0.7, 0.8), (0.7, 0.6), (0.7, 0.7), (0.7, 0.6), (0.6, 0.1)], [1, 2, 3, 3, 3, 3]),
    # the loss as the metric: lower wins, a tie keeps the earlier epoch
    ("val_loss", [(0.9, 1.0), (0.1, 0.8), (0.9, 0.8), (0.9, 0.9), (0.2, 0.5)], [1, 2, 2, 2, 5]),
])
def test_the_best_epoch_is_the_higher_score_and_ties_go_to_the_lower_loss(tmp_path, best_metric, rows, expected):
    recorder, _ = recorder_for(tmp_path, best_metric)
    bests = record_epochs(recorder, [{"val_loss": loss, "val_acc": acc} for acc, loss in rows])
    assert bests == expected
    best = tmp_path / "checkpoints" / "best.safetensors"
    assert read_metadata(best)["epoch"] == expected[-1] and read_metadata(best)["weights"] == "live"
    assert load_file(str(best))["bias"].item() == expected[-1]  # that epoch's weights
    assert load_file(str(tmp_path / "checkpoints" / "last.safetensors"))["bias"].item() == len(rows)


def test_a_detector_without_a_validation_loss_keeps_the_first_of_equal_maps(tmp_path):
    recorder, _ = recorder_for(tmp_path, "val_map")
    assert record_epochs(recorder, [{"val_map": m} for m in (0.2, 0.3, 0.3, 0.1)]) == [1, 2, 2, 2]


def test_the_ema_metric_picks_the_ema_weights_and_a_phase_without_an_ema_is_never_best(tmp_path):
    recorder, _ = recorder_for(tmp_path, "ema_val_acc", ema=True)
    rows = [{"val_acc": 0.9, "val_loss": 0.1},  # a probe phase: no EMA metric, whatever its own score
            {"val_acc": 0.1, "val_loss": 0.9, "ema_val_acc": 0.5, "ema_val_loss": 0.8},
            {"val_acc": 0.1, "val_loss": 0.1, "ema_val_acc": 0.5, "ema_val_loss": 0.6},  # the tie: lower EMA loss
            {"val_acc": 0.1, "val_loss": 0.05, "ema_val_acc": 0.5, "ema_val_loss": 0.7}]
    assert record_epochs(recorder, rows) == [0, 2, 3, 3]
    best = tmp_path / "checkpoints" / "best.safetensors"
    assert read_metadata(best)["weights"] == "ema" and read_metadata(best)["epoch"] == 3
    assert load_file(str(best))["bias"].item() == -3  # the EMA's weights of epoch 3
    assert load_file(str(tmp_path / "checkpoints" / "ema.safetensors"))["bias"].item() == -4
    assert read_metadata(tmp_path / "checkpoints" / "ema.safetensors")["weights"] == "ema"


def test_the_ema_loss_as_the_metric_lower_wins(tmp_path):
    recorder, _ = recorder_for(tmp_path, "ema_val_loss", ema=True)
    rows = [{"val_loss": 0.1, "ema_val_loss": 0.5}, {"val_loss": 0.9, "ema_val_loss": 0.4},
            {"val_loss": 0.0, "ema_val_loss": 0.45}]
    assert record_epochs(recorder, rows) == [1, 2, 2]


def test_each_epoch_prints_its_losses_and_scores(tmp_path):
    recorder, said = recorder_for(tmp_path, "val_acc")
    recorder.record("probe", 0.123456, {"val_loss": 0.5, "val_acc": 0.25, "val_top5": 0.75}, 0.01, time.perf_counter())
    assert re.fullmatch(r"epoch 1 \(probe\): train_loss 0\.1235  val_loss 0\.5000  val_acc 0\.2500  \(\d+\.\ds\)",
                        said[-1]), said[-1]
    recorder.record("finetune", 2.0, {"val_map": 0.125, "val_ap50": 0.5}, 0.01, time.perf_counter())
    assert re.fullmatch(r"epoch 2 \(finetune\): train_loss 2\.0000  val_map 0\.1250  val_ap50 0\.5000  \(\d+\.\ds\)",
                        said[-1]), said[-1]
