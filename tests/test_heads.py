"""New heads: initialisers, and head rows started from the source's own classes."""

import pytest
import torch
from conftest import HYMENOPTERA, REPO, needs_shared

from transferkit.config import DEFAULT_SOURCE, load_config
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier
from transferkit.models.heads import init_head, init_head_from_classes
from transferkit.models.labels import LabelSet, Term, auto_match, resolve_spec
from transferkit.run import evaluate
from transferkit.weights.sources import resolve_source
from transferkit.weights.transfer import transfer

HOTDOG = 934


@pytest.fixture(scope="module")
def imagenet():
    return LabelSet.imagenet()


def test_resolve_specs(imagenet):
    assert resolve_spec("hotdog", imagenet, 1000, "x") == [Term(HOTDOG, 1.0)]
    assert resolve_spec("Hot-Dog", imagenet, 1000, "x") == [Term(HOTDOG, 1.0)]
    assert resolve_spec("n07697537", imagenet, 1000, "x") == [Term(HOTDOG, 1.0)]
    assert resolve_spec("-hotdog", imagenet, 1000, "x") == [Term(HOTDOG, -1.0)]
    assert resolve_spec(713, imagenet, 1000, "x") == [Term(713, 1.0)]
    assert resolve_spec(["ant", "-bee"], imagenet, 1000, "x") == [Term(310, 1.0), Term(309, -1.0)]
    with pytest.raises(TransferKitError, match="no source class named 'hotdgo'"):
        resolve_spec("hotdgo", imagenet, 1000, "x")
    with pytest.raises(TransferKitError, match="'crane' is ambiguous .*give the index"):
        resolve_spec("crane", imagenet, 1000, "x")
    with pytest.raises(TransferKitError, match="index 1000 for class 'x' is outside 0..999"):
        resolve_spec(1000, imagenet, 1000, "x")


def test_auto_match_is_case_separator_and_plural_insensitive(imagenet):
    assert auto_match("ants", imagenet) == 310
    assert auto_match("bees", imagenet) == 309
    assert auto_match("hot_dog", imagenet) == HOTDOG
    assert auto_match("Golden Retriever", imagenet) == 207
    assert auto_match("zzz_not_a_class", imagenet) is None


def test_hotdog_head_from_a_class_and_its_negative():
    src = torch.load(resolve_source(DEFAULT_SOURCE), weights_only=True)
    model, family = create_classifier("tf_efficientnet_lite0", 2)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns)
    rows = init_head_from_classes(model, report, ["hotdog", "not_hotdog"],
                                  {"hotdog": "hotdog", "not_hotdog": "-hotdog"}, "xavier")
    w, b = model.classifier.weight, model.classifier.bias
    assert torch.equal(w[0], src["_fc.weight"][HOTDOG]) and torch.equal(w[1], -src["_fc.weight"][HOTDOG])
    assert torch.equal(b[0], src["_fc.bias"][HOTDOG]) and torch.equal(b[1], -src["_fc.bias"][HOTDOG])
    assert rows[1] == {"row": 1, "class": "not_hotdog", "from": ["-hotdog (934)"], "how": "mapped"}
    assert report.to_dict()["head_rows"] == rows
    assert {e.init for e in report.entries if e.target.startswith("classifier.")} == {"from source classes"}


def test_mean_of_classes_and_unmatched_rows_keep_initialiser():
    src = torch.load(resolve_source(DEFAULT_SOURCE), weights_only=True)["_fc.weight"]
    model, family = create_classifier("tf_efficientnet_lite0", 2)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns)
    init_head(model, family.head_patterns, "zeros")
    rows = init_head_from_classes(model, report, ["insect", "other"], {"insect": ["ant", "bee"]}, "zeros")
    assert torch.allclose(model.classifier.weight[0], (src[310] + src[309]) / 2)
    assert torch.count_nonzero(model.classifier.weight[1]) == 0
    assert rows[1]["from"] is None and rows[1]["init"] == "zeros"


def test_head_init_errors():
    model, family = create_classifier("tf_efficientnet_lite0", 2)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns)
    with pytest.raises(TransferKitError, match="names classes the dataset lacks: ant"):
        init_head_from_classes(model, report, ["ants", "bees"], {"ant": "ant"}, "xavier")
    report.head_sources.clear()
    with pytest.raises(TransferKitError, match="needs the source's own head"):
        init_head_from_classes(model, report, ["ants", "bees"], "auto", "xavier")


@needs_shared
def test_ants_and_bees_head_from_imagenet_before_any_step():
    cfg = load_config(REPO / "configs/classification/hymenoptera_efficientnet_lite0.yaml",
                      [f"data.root={HYMENOPTERA}", "pretrained.head_init.from_classes=auto"])
    metrics, report = evaluate(cfg)
    assert [r["from"] for r in report.head_rows] == [["ant (310)"], ["bee (309)"]]
    assert metrics["val_acc"] >= 0.95, metrics
