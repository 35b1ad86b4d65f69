"""Initialiser rules on a real timm network: its layers are subclasses (BatchNormAct2d is a
BatchNorm2d) and its names nest, where the toy network of test_init.py has neither."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from transferkit.config import InitRule
from transferkit.errors import TransferKitError
from transferkit.models.init import apply_init_rules
from transferkit.training.checkpoint import save_weights
from transferkit.weights.transfer import transfer

# timm's test_efficientnet, by hand: 13 BatchNormAct2d layers, 17 convolutions (2 of them, in the
# squeeze-excite blocks, with a bias), one Linear classifier.
NORMS = ["bn1", "blocks.0.0.bn1", "blocks.1.0.bn1", "blocks.1.0.bn2", "blocks.2.0.bn1", "blocks.2.0.bn2",
         "blocks.3.0.bn1", "blocks.3.0.bn2", "blocks.3.0.bn3", "blocks.4.0.bn1", "blocks.4.0.bn2",
         "blocks.4.0.bn3", "bn2"]
SE_CONVS = ["blocks.3.0.se.conv_reduce", "blocks.3.0.se.conv_expand", "blocks.4.0.se.conv_reduce",
            "blocks.4.0.se.conv_expand"]


def net(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=classes)


def test_the_hand_written_lists_are_the_network():
    model = net()
    assert type(model.bn1).__name__ == "BatchNormAct2d" and type(model.bn1) is not nn.BatchNorm2d
    assert [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)] == NORMS
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 17
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None] == SE_CONVS


def test_batchnorm2d_selects_timms_batchnormact2d():
    model = net()
    done = apply_init_rules(model, [InitRule(type="constant", layer=["BatchNorm2d"], val=0.5, bias=0.25)])
    assert set(done) == {f"{n}.{p}" for n in NORMS for p in ("weight", "bias")}
    for name in NORMS:
        bn = model.get_submodule(name)
        assert torch.all(bn.weight == 0.5) and torch.all(bn.bias == 0.25), name
    assert not torch.all(model.conv_stem.weight == 0.5)


def test_the_subclass_name_selects_too_and_unknown_names_match_nothing():
    model = net()
    done = apply_init_rules(model, [InitRule(type="constant", layer=["BatchNormAct2d"], val=2.0)])
    assert len(done) == 26
    with pytest.raises(TransferKitError, match=r"init\[0\] \(constant\) matches no module \(layer \['BatchNorm'\]\)"):
        apply_init_rules(net(), [InitRule(type="constant", layer=["BatchNorm"], val=2.0)])


def test_fan_based_initialisers_leave_norm_weights_and_set_biases():
    model = net()
    apply_init_rules(model, [InitRule(type="kaiming", layer=["Conv2d", "BatchNorm2d"], bias=0.125)])
    assert torch.all(model.bn1.weight == 1.0) and torch.all(model.bn1.bias == 0.125)  # 1-d: kept
    for name in SE_CONVS:
        assert torch.all(model.get_submodule(name).bias == 0.125), name
    # kaiming's defaults here: normal, fan_out, relu, so std sqrt(2 / fan_out).
    w = model.conv_head.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert w.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)


def test_override_by_nested_name_and_later_rules_win():
    model = net()
    done = apply_init_rules(model, [InitRule(type="constant", layer=["Conv2d"], val=1.0),
                                    InitRule(type="constant", override="blocks.3.0.se.*", val=3.0, bias=0.5)])
    assert torch.all(model.blocks[3][0].se.conv_reduce.weight == 3.0)
    assert torch.all(model.blocks[3][0].se.conv_expand.bias == 0.5)
    assert torch.all(model.blocks[4][0].se.conv_reduce.weight == 1.0)
    assert torch.all(model.conv_stem.weight == 1.0)
    assert done["blocks.3.0.se.conv_reduce.weight"] == "constant(val=3.0), bias=0.5"
    assert done["blocks.4.0.se.conv_reduce.weight"] == "constant(val=1.0), bias=0.0"


def test_restored_tensors_are_kept_unless_forced(tmp_path):
    source = net(5)
    save_weights(source, tmp_path / "src.safetensors")
    model = net(3)
    report = transfer(model, tmp_path / "src.safetensors", "all-but-head", ("classifier.*",))
    done = apply_init_rules(model, [InitRule(type="constant", layer=["BatchNorm2d", "Linear", "Conv2d"], val=0.0)],
                            report)
    assert set(done) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(model.bn2.weight, source.bn2.weight)
    assert next(e for e in report.entries if e.target == "classifier.weight").init == "constant(val=0.0), bias=0.0"
    done = apply_init_rules(model, [InitRule(type="constant", layer=["BatchNorm2d"], val=0.0, force=True)], report)
    assert len(done) == 26 and torch.count_nonzero(model.bn2.weight) == 0
