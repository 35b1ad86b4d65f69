"""Initialisers: each produces the documented statistics; selection by layer and by name."""

import math

import pytest
import torch
from torch import nn

from transferkit.config import DEFAULT_SOURCE, InitRule, load_config
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier
from transferkit.models.init import apply_init_rules
from transferkit.tasks.classification import build_model
from transferkit.weights.transfer import transfer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 128, 3)  # fan_in 576, fan_out 1152
        self.bn = nn.BatchNorm2d(128)
        self.fc = nn.Linear(512, 256)


def stats(rule: dict, target="conv"):
    torch.manual_seed(0)
    net = Net()
    apply_init_rules(net, [InitRule(**rule)])
    w = getattr(net, target).weight.detach()
    return net, w, w.mean().item(), w.std().item()


def test_each_initialiser_has_its_statistics():
    fan_in, fan_out = 64 * 9, 128 * 9
    _, w, mean, std = stats({"type": "constant", "layer": ["Conv2d"], "val": 0.5, "bias": 0.1})
    assert torch.all(w == 0.5)
    _, w, mean, std = stats({"type": "normal", "layer": ["Conv2d"], "mean": 0.2, "std": 0.05})
    assert mean == pytest.approx(0.2, abs=0.002) and std == pytest.approx(0.05, rel=0.02)
    _, w, mean, std = stats({"type": "trunc_normal", "layer": ["Conv2d"], "std": 1.0})
    assert w.min() >= -2 and w.max() <= 2 and std == pytest.approx(0.88, rel=0.03)  # N(0,1) cut at +-2
    _, w, mean, std = stats({"type": "uniform", "layer": ["Conv2d"], "a": -0.3, "b": 0.3})
    assert w.min() >= -0.3 and w.max() <= 0.3 and std == pytest.approx(0.6 / math.sqrt(12), rel=0.02)
    _, w, mean, std = stats({"type": "xavier", "layer": ["Conv2d"], "distribution": "uniform", "gain": 2.0})
    assert std == pytest.approx(2.0 * math.sqrt(2 / (fan_in + fan_out)), rel=0.02)
    _, w, mean, std = stats({"type": "xavier", "layer": ["Conv2d"]})
    assert std == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.02)
    _, w, mean, std = stats({"type": "kaiming", "layer": ["Conv2d"]})  # fan_out, relu, normal
    assert std == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    _, w, mean, std = stats({"type": "kaiming", "layer": ["Conv2d"], "mode": "fan_in", "distribution": "uniform"})
    assert std == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    _, w, mean, std = stats({"type": "caffe2_xavier", "layer": ["Conv2d"]})  # kaiming uniform a=1, fan_in
    assert std == pytest.approx(math.sqrt(1 / fan_in), rel=0.02)


def test_distribution_and_arguments_reach_the_initialiser():
    fan_in, fan_out = 64 * 9, 128 * 9
    # uniform and normal draws of one variance told apart by range: a uniform draw of std s stays
    # within sqrt(3) s; a normal one of 73,728 values passes it about 6,000 times
    for kind, std in (("xavier", math.sqrt(2 / (fan_in + fan_out))), ("kaiming", math.sqrt(2 / fan_out))):
        _, w, mean, got = stats({"type": kind, "layer": ["Conv2d"], "distribution": "uniform"})
        assert got == pytest.approx(std, rel=0.02) and w.abs().max() <= math.sqrt(3) * std * 1.0001
        _, w, mean, got = stats({"type": kind, "layer": ["Conv2d"], "distribution": "normal"})
        assert got == pytest.approx(std, rel=0.02) and (w.abs() > math.sqrt(3) * std).sum() > 3000
    # kaiming's gain: sqrt(2 / (1 + a^2)) for leaky_relu, 1 for linear
    _, w, mean, std = stats({"type": "kaiming", "layer": ["Conv2d"], "nonlinearity": "leaky_relu", "a": 1.0})
    assert std == pytest.approx(math.sqrt(1 / fan_out), rel=0.02)
    _, w, mean, std = stats({"type": "kaiming", "layer": ["Conv2d"], "nonlinearity": "linear"})
    assert std == pytest.approx(math.sqrt(1 / fan_out), rel=0.02)
    # trunc_normal's cut points
    _, w, mean, std = stats({"type": "trunc_normal", "layer": ["Conv2d"], "a": -0.5, "b": 1.0})
    assert -0.5 <= w.min() < -0.49 and 0.99 < w.max() <= 1.0


def test_arguments_left_out_take_the_documented_defaults():
    fan_out = 128 * 9
    # uniform: a=0, b=1
    net, w, mean, std = stats({"type": "uniform", "layer": ["Conv2d"]})
    assert w.min() >= 0 and w.max() <= 1 and std == pytest.approx(1 / math.sqrt(12), rel=0.02)
    # kaiming: negative slope a=0, which only leaky_relu reads (gain sqrt(2 / (1 + a^2)))
    _, w, mean, std = stats({"type": "kaiming", "layer": ["Conv2d"], "nonlinearity": "leaky_relu"})
    assert std == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    # what the report says was done names every argument, defaults included
    done = apply_init_rules(net, [InitRule(type="uniform", layer=["Conv2d"]),
                                  InitRule(type="trunc_normal", override="fc", std=0.5, bias=0.1)])
    assert done["conv.weight"] == "uniform(a=0.0, b=1.0), bias=0.0"
    assert done["fc.weight"] == "trunc_normal(mean=0.0, std=0.5, a=-2.0, b=2.0), bias=0.1"


def test_layer_and_override_selection_and_bias():
    torch.manual_seed(0)
    net = Net()
    done = apply_init_rules(net, [InitRule(type="constant", layer=["Conv2d", "Linear"], val=1.0, bias=0.5),
                                  InitRule(type="constant", override="fc", val=2.0)])  # later rule wins
    assert torch.all(net.conv.weight == 1.0) and torch.all(net.conv.bias == 0.5)
    assert torch.all(net.fc.weight == 2.0) and torch.all(net.fc.bias == 0.0)
    assert done["fc.weight"] == "constant(val=2.0), bias=0.0"
    assert "bn.weight" not in done
    with pytest.raises(TransferKitError, match=r"model.init\[0\] \(normal\) matches no module \(override 'hed'\)"):
        apply_init_rules(net, [InitRule(type="normal", override="hed")])


def test_only_unrestored_tensors_unless_forced():
    model, family = create_classifier("tf_efficientnet_lite0", 2)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns)
    stem = model.conv_stem.weight.detach().clone()
    done = apply_init_rules(model, [InitRule(type="constant", layer=["Conv2d", "Linear"], val=0.0)], report)
    assert set(done) == {"classifier.weight", "classifier.bias"}  # the restored convs were left alone
    assert torch.equal(model.conv_stem.weight, stem)
    entry = next(e for e in report.entries if e.target == "classifier.weight")
    assert entry.init == "constant(val=0.0), bias=0.0"
    apply_init_rules(model, [InitRule(type="constant", override="conv_stem", val=0.0, force=True)], report)
    assert torch.count_nonzero(model.conv_stem.weight) == 0


def test_pretrained_initialiser_from_a_prefix(tmp_path):
    src = {"teacher.fc.weight": torch.full((256, 512), 3.0), "teacher.fc.bias": torch.ones(256)}
    torch.save(src, tmp_path / "t.pth")
    net = Net()
    from transferkit.weights.formats import read_weights

    done = apply_init_rules(net, [InitRule(type="pretrained", override="fc", checkpoint=str(tmp_path / "t.pth"),
                                           prefix="teacher.fc.")], read_source=lambda p: read_weights(p).tensors)
    assert torch.all(net.fc.weight == 3.0) and torch.all(net.fc.bias == 1.0)
    # copied tensors have no bias value to report
    assert done["fc.bias"] == f"pretrained(checkpoint={tmp_path / 't.pth'}, prefix=teacher.fc.)"


def test_init_rules_from_config():
    cfg = load_config(None, ["data.root=x", "model.name=test_efficientnet", "pretrained.source=null",
                             'model.init=[{type: constant, override: "classifier", val: 0.25}]'])
    model, _, _ = build_model(cfg, 3)
    assert torch.all(model.classifier.weight == 0.25)
