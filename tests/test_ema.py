"""optim.ema: timm's ModelEmaV3 of the weights, evaluated each epoch, saved, and used by eval/predict."""

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from transferkit.config import EmaConfig, load_config
from transferkit.errors import TransferKitError
from transferkit.prediction import predict
from transferkit.run import evaluate, train
from transferkit.tasks.base import PredictOptions
from transferkit.training.checkpoint import read_metadata
from transferkit.training.ema import WeightAverage
from transferkit.training.runlog import read_metrics


def test_the_average_follows_the_decay_rule():
    model = torch.nn.Linear(2, 1, bias=False)
    average = WeightAverage(model, EmaConfig(decay=0.9, warmup=False))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        average.update(model)  # the first update takes the weights as they are
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
        average.update(model)
    # 0.9 x [1, 2] + 0.1 x [3, -2]
    assert torch.allclose(average.module.weight, torch.tensor([[1.2, 1.6]]))
    assert average.updates == 2
    restored = WeightAverage(torch.nn.Linear(2, 1, bias=False), EmaConfig(decay=0.9, warmup=False))
    restored.load_state_dict(average.state_dict())
    assert torch.equal(restored.module.weight, average.module.weight) and restored.updates == 2


@pytest.mark.parametrize("decay", [0.9, 0.4])
def test_the_warm_up_lets_the_first_updates_count(decay):
    # The decay at update n is 1 - n^(-2/3), capped at the decay asked: 0, 0.370, 0.519, ...
    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, EmaConfig(decay=decay, warmup=True))
    expected = 0.0
    for n, value in enumerate([4.0, -2.0, 10.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
        d = min(1 - n ** (-2 / 3), decay)
        expected = d * expected + (1 - d) * value
        assert average.module.weight.item() == pytest.approx(expected, rel=1e-6), n


@pytest.fixture(scope="module")
def ema_run(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("ema") / "run"
    cfg = load_config(None, tiny_overrides(synth_root, **{"optim.ema": "{decay: 0.9}", "schedule.epochs": 3}))
    return cfg, train(cfg, out=run, quiet=True)


def test_ema_is_evaluated_each_epoch_and_saved(ema_run):
    cfg, result = ema_run
    run = result.run_dir
    rows = read_metrics(run)
    assert all({"ema_val_loss", "ema_val_acc"} <= set(r) for r in rows)
    assert [r["ema_val_loss"] for r in rows] != [r["val_loss"] for r in rows]  # two sets of weights
    assert result.best_metric == "ema_val_acc"
    ema = load_file(str(run / "checkpoints/ema.safetensors"))
    last = load_file(str(run / "checkpoints/last.safetensors"))
    assert ema.keys() == last.keys()
    assert not all(torch.equal(ema[k], last[k]) for k in ema)
    best = read_metadata(run / "checkpoints/best.safetensors")
    assert best["weights"] == "ema" and best["epoch"] == result.best_epoch
    assert read_metadata(run / "checkpoints/last.safetensors")["weights"] == "live"


def test_eval_and_predict_use_the_ema_weights(ema_run, synth_root):
    cfg, result = ema_run
    run = result.run_dir
    best_row = read_metrics(run)[result.best_epoch - 1]
    metrics, _ = evaluate(cfg, weights=run / "checkpoints/best.safetensors")
    assert metrics["val_loss"] == pytest.approx(best_row["ema_val_loss"], rel=1e-6)
    assert metrics["val_loss"] != pytest.approx(best_row["val_loss"], rel=1e-6)
    image = sorted((synth_root / "val" / "cross").iterdir())[0]
    by_default, _ = predict(run, [image], options=PredictOptions(topk=3))
    by_ema, _ = predict(run, [image], weights="ema", options=PredictOptions(topk=3))
    live, _ = predict(run, [image], weights="last", options=PredictOptions(topk=3))
    assert result.best_epoch == 3  # (this seed's run) so best.safetensors and ema.safetensors are one epoch's EMA
    assert by_default == by_ema
    assert by_default[0]["predictions"] != live[0]["predictions"]


def test_best_on_live_weights_with_an_ema(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"optim.ema": "{}", "checkpoint.best_metric": "val_acc",
                                                          "schedule.epochs": 1}))
    train(cfg, out=tmp_path / "run", quiet=True)
    assert read_metadata(tmp_path / "run/checkpoints/best.safetensors")["weights"] == "live"
    assert (tmp_path / "run/checkpoints/ema.safetensors").is_file()


def test_ema_metric_without_an_ema_is_refused():
    with pytest.raises(TransferKitError, match="best_metric ema_val_acc needs an EMA: set optim.ema"):
        load_config(None, ["data.root=x", "checkpoint.best_metric=ema_val_acc"])
    with pytest.raises(TransferKitError, match="linear_probe has none"):
        load_config(None, ["data.root=x", "optim.ema={}", "strategy=linear_probe"])


def test_a_detector_trains_with_ema_bf16_and_accumulation(tmp_path):
    """The same machinery behind detection's seam: COCO mAP of the EMA beside the live weights."""
    from conftest import det_overrides

    from transferkit.data.synthetic import make_synthetic_detection

    shapes = make_synthetic_detection(tmp_path / "shapes", 16, 8, 96, seed=0)
    cfg = load_config(None, det_overrides(shapes, **{"schedule.epochs": 1, "optim.ema": "{decay: 0.9}",
                                                     "optim.amp": "bf16", "optim.accumulate": 2}))
    result = train(cfg, out=tmp_path / "run", quiet=True)
    assert result.best_metric == "ema_val_map"
    assert all({"val_map", "ema_val_map"} <= set(r) for r in result.metrics)
    assert read_metadata(tmp_path / "run/checkpoints/best.safetensors")["weights"] == "ema"
