"""The default pretrained weights are really in use: ImageNet predictions on real ant and bee photos."""

import torch
from conftest import HYMENOPTERA, needs_shared
from timm.data import ImageNetInfo

from transferkit.config import load_config
from transferkit.data.images import load_rgb
from transferkit.data.transforms import eval_transform
from transferkit.tasks.classification import build_model

ANT, BEE = 310, 309
INSECTS = range(300, 327)  # ImageNet-1k classes 300-326: beetles, bees, ants, flies, butterflies...


@needs_shared
def test_pretrained_lite0_recognises_ants_and_bees():
    cfg = load_config(None, ["data.root=unused", "model.num_classes=1000", "pretrained.scope=full"])
    model, family, report = build_model(cfg, 1000)
    assert report.fraction_restored() == 1.0
    tf = eval_transform(224, family.preprocessing)
    files = {ANT: sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:8],
             BEE: sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:8]}
    model.eval()
    top1 = {}
    with torch.no_grad():
        for label, paths in files.items():
            x = torch.stack([tf(load_rgb(p)) for p in paths])
            top1[label] = model(x).argmax(1).tolist()
    names = ImageNetInfo()
    assert names.index_to_description(ANT).startswith("ant") and names.index_to_description(BEE) == "bee"
    predicted = top1[ANT] + top1[BEE]
    assert sum(p in INSECTS for p in predicted) >= 13, [names.index_to_description(p) for p in predicted]
    assert sum(p == ANT for p in top1[ANT]) >= 5, top1[ANT]
    assert sum(p == BEE for p in top1[BEE]) >= 5, top1[BEE]


def test_untrained_model_is_not_a_pretrained_one():
    """The same check must fail without the weights: a random lite0 does not know ants from bees."""
    cfg = load_config(None, ["data.root=unused", "model.num_classes=1000", "pretrained.source=null"])
    model, _, report = build_model(cfg, 1000)
    assert report is None
    ref = load_config(None, ["data.root=unused", "model.num_classes=1000", "pretrained.scope=full"])
    pretrained, _, _ = build_model(ref, 1000)
    assert not torch.equal(model.state_dict()["conv_stem.weight"], pretrained.state_dict()["conv_stem.weight"])
