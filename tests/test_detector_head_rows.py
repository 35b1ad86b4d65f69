"""A detector's head rows started from the source's classes, checked against torchvision's own
output layouts written out here by hand, and against what the initialised detector predicts.

torchvision's layouts (C classes, A anchors per location):
  Faster / Mask R-CNN  cls_score: C + 1 rows, background row 0, class i at row i + 1;
                       bbox_pred: 4 (C + 1) rows, class i at rows 4(i + 1) .. 4(i + 1) + 3;
                       mask_fcn_logits: C + 1 channels, as cls_score.
  RetinaNet, FCOS      cls_logits: A * C rows, anchor-major: anchor a, class i at row a * C + i.
  SSDlite              A * (C + 1) rows, anchor-major with the background as class 0 of each anchor.
"""

from __future__ import annotations

import pytest
import torch

from transferkit.config import DetectionConfig, HeadInitConfig
from transferkit.models.detection import create_detector
from transferkit.models.heads import detector_head_rows, has_background, init_detector_head_from_classes
from transferkit.patterns import first_match
from transferkit.training.checkpoint import save_weights
from transferkit.weights.transfer import transfer

FASTER_CLS = "roi_heads.box_predictor.cls_score.weight"
FASTER_BOX = "roi_heads.box_predictor.bbox_pred.bias"
MASK = "roi_heads.mask_predictor.mask_fcn_logits.weight"
RETINA = "head.classification_head.cls_logits.weight"
SSD = "head.classification_head.module_list.3.1.weight"


@pytest.mark.parametrize("name, rows, classes, index, expected", [
    (FASTER_CLS, 4, 3, 0, [1]),
    (FASTER_CLS, 4, 3, 2, [3]),
    (FASTER_CLS, 4, 3, -1, [0]),
    (FASTER_BOX, 16, 3, 0, [4, 5, 6, 7]),
    (FASTER_BOX, 16, 3, 2, [12, 13, 14, 15]),
    (FASTER_BOX, 16, 3, -1, [0, 1, 2, 3]),
    (MASK, 3, 2, 1, [2]),
    (MASK, 3, 2, -1, [0]),
    (RETINA, 6, 2, 0, [0, 2, 4]),           # 3 anchors, 2 classes
    (RETINA, 6, 2, 1, [1, 3, 5]),
    (RETINA, 9, 3, 2, [2, 5, 8]),
    ("head.classification_head.cls_logits.bias", 4, 4, 3, [3]),  # FCOS: one row per class
    (SSD, 9, 2, 0, [1, 4, 7]),              # 3 anchors x (2 classes + background)
    (SSD, 9, 2, 1, [2, 5, 8]),
    (SSD, 9, 2, -1, [0, 3, 6]),
    (SSD, 12, 3, 2, [3, 7, 11]),
])
def test_rows_follow_torchvisions_layouts(name, rows, classes, index, expected):
    assert detector_head_rows(name, rows, classes, index) == expected


@pytest.mark.parametrize("name, expected", [(FASTER_CLS, True), (FASTER_BOX, True), (MASK, True), (SSD, True),
                                            (RETINA, False), ("head.classification_head.cls_logits.bias", False)])
def test_which_tensors_have_a_background_row(name, expected):
    assert has_background(name) is expected


SMALL = DetectionConfig(min_size=[64], max_size=64, fpn_channels=64)  # FCOS: GroupNorm(32) on a 1x1 P7


def build(arch: str, classes: int):
    cfg = SMALL.model_copy(update={"torchvision_model": arch} if "_" in arch else {"arch": arch})
    torch.manual_seed(classes)
    return create_detector("test_efficientnet", classes, cfg)


def source_detector(arch: str, path):
    """A 3-class source whose class rows differ clearly: torchvision starts them all near one value
    (std 0.01, one prior bias), where a row taken from the wrong class would go unnoticed."""
    source, family = build(arch, 3)
    heads = [(n, p) for n, p in source.named_parameters() if first_match(family.head_patterns, n) is not None]
    assert heads
    with torch.no_grad():
        for i, (_, p) in enumerate(heads):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    save_weights(source, path)
    return source


def head_outputs(model, image, modules):
    """Raw outputs of the class-dependent modules for one image, before any softmax or NMS."""
    got, hooks = {}, []
    for name in modules:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: got.setdefault(name, o)))
    with torch.no_grad():
        model.eval()([image])
    for h in hooks:
        h.remove()
    return got


# arch: (module whose output is checked, {target column: source column} along the last axis,
# (tree's target column, car's source column)); target classes [pedestrian, tree] from source
# classes [car, person, dog], pedestrian <- person.
CASES = {
    "retinanet": ("head.classification_head", {0: 1}, (1, 0)),
    "fcos": ("head.classification_head", {0: 1}, (1, 0)),
    "ssdlite320_mobilenet_v3_large": ("head.classification_head", {1: 2, 0: 0}, (2, 1)),  # background carried
    "fasterrcnn": ("roi_heads.box_predictor", {1: 2, 0: 0}, (2, 1)),  # class scores; box deltas below
}


@pytest.mark.parametrize("arch", list(CASES))
def test_the_initialised_detector_predicts_the_carried_class_as_the_source(arch, tmp_path):
    """Everything but the head is restored, so both detectors see the same features: the target's
    output for pedestrian must be the source's output for person, wherever the layout puts it."""
    source = source_detector(arch, tmp_path / "det.safetensors")
    target, family = build(arch, 2)
    report = transfer(target, tmp_path / "det.safetensors", "all-but-head", family.head_patterns)
    init_detector_head_from_classes(target, report, ["pedestrian", "tree"], ["car", "person", "dog"],
                                    HeadInitConfig(from_classes={"pedestrian": "person"}).from_classes)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    module, columns, (tree, car) = CASES[arch]
    src, dst = head_outputs(source, image, [module])[module], head_outputs(target, image, [module])[module]
    if arch == "fasterrcnn":
        (src, s_box), (dst, d_box) = src, dst
        torch.testing.assert_close(d_box[:, 4:8], s_box[:, 8:12])  # 4 box deltas per class, after background's
        torch.testing.assert_close(d_box[:, 0:4], s_box[:, 0:4])
    assert src.shape[:-1] == dst.shape[:-1] and src.numel() > 0
    assert dst.shape[-1] == src.shape[-1] - 1
    for d, s in columns.items():
        torch.testing.assert_close(dst[..., d], src[..., s])
    assert not torch.allclose(dst[..., tree], src[..., car])  # tree has no source class: left as built


def test_mask_rcnn_mask_logits_for_the_carried_class(tmp_path):
    source = source_detector("maskrcnn", tmp_path / "det.safetensors")
    target, family = build("maskrcnn", 2)
    report = transfer(target, tmp_path / "det.safetensors", "all-but-head", family.head_patterns)
    init_detector_head_from_classes(target, report, ["pedestrian", "tree"], ["car", "person", "dog"],
                                    HeadInitConfig(from_classes={"pedestrian": "person"}).from_classes)
    features = torch.randn(2, 64, 14, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        src = source.roi_heads.mask_predictor(features)
        dst = target.roi_heads.mask_predictor(features)
    assert src.shape[1] == 4 and dst.shape[1] == 3
    torch.testing.assert_close(dst[:, 1], src[:, 2])
    torch.testing.assert_close(dst[:, 0], src[:, 0])
