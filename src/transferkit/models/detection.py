"""torchvision detectors around a timm backbone with an FPN, sized for the user's classes.

Tensor names: `backbone.body.*` (the timm network, named as in its classifier, without the head),
`backbone.fpn.*`, then the detector's own (`rpn.*`, `roi_heads.*` for Faster and Mask R-CNN; `head.*` for
RetinaNet and FCOS). HEAD_PATTERNS is the table of class-dependent tensors, the way
PaddleDetection's transfer table lists them: `scope: all-but-head` restores everything else from a
detector trained on other classes; `scope: backbone` restores `backbone.body` from an ImageNet
classifier checkpoint (docs/DETECTION.md).
"""

from __future__ import annotations

from collections import OrderedDict

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.models import detection
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from transferkit.config import DetectionConfig
from transferkit.errors import TransferKitError
from transferkit.models.family import Family, timm_family
from transferkit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# Class-dependent tensors of each detector: their shape follows the number of classes.
HEAD_PATTERNS = {
    "fasterrcnn": ("roi_heads.box_predictor.cls_score.*", "roi_heads.box_predictor.bbox_pred.*"),
    "maskrcnn": ("roi_heads.box_predictor.cls_score.*", "roi_heads.box_predictor.bbox_pred.*",
                 "roi_heads.mask_predictor.mask_fcn_logits.*"),
    "retinanet": ("head.classification_head.cls_logits.*",),
    "fcos": ("head.classification_head.cls_logits.*",),
    # the last 1x1 convolution of each level (module_list.N.0 is a depthwise block with its own BatchNorm)
    "ssdlite": (r"re:head\.classification_head\.module_list\.\d+\.1\.(weight|bias)",),
}
BACKBONE_PREFIX = "backbone.body."
# Torchvision counts a background class in the classifier of two-stage detectors.
WITH_BACKGROUND = {"fasterrcnn": True, "maskrcnn": True, "retinanet": False, "fcos": False, "ssdlite": True}
TWO_STAGE = ("fasterrcnn", "maskrcnn")


def zoo_source_classes(kind: str, categories: list[str]) -> list[str]:
    """The class names of a torchvision zoo detector in the order of its class rows, for head_init.
    torchvision lists `__background__` first: Faster/Mask R-CNN and SSDlite keep it as their
    background row, which head_init carries apart; RetinaNet and FCOS have a row for it like any class."""
    return list(categories[1:]) if WITH_BACKGROUND[kind] else list(categories)


class TimmFPN(nn.Module):
    """Five feature maps from a timm network through an FPN, as torchvision's detectors expect them:
    for Faster R-CNN strides 4-32 plus a max-pooled 64 (P2-P6); for RetinaNet and FCOS strides 8-32
    plus two strided convolutions on P5 (P3-P7), as in their papers."""

    def __init__(self, name: str, fpn_channels: int, single_stage: bool):
        super().__init__()
        if not timm.is_model(name):
            raise TransferKitError(f"unknown backbone model.name {name!r}; see timm.list_models()")
        levels = (2, 3, 4) if single_stage else (1, 2, 3, 4)
        try:
            self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=levels)
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise TransferKitError(f"model.name {name!r} cannot give feature maps for an FPN ({exc})") from None
        extra = LastLevelP6P7(fpn_channels, fpn_channels) if single_stage else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), fpn_channels, extra_blocks=extra)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def backbone_stages(body: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone in five stages, bottom first, as torchvision counts them for
    trainable_backbone_layers: the stem, then the layers ending at each of the feature levels 1-4
    (whichever levels the FPN reads)."""
    names = [n for n, _ in body.named_parameters()]

    def last_of(module: str) -> int:
        for form in (module, module.replace("_", ".")):
            hits = [i for i, n in enumerate(names) if n.startswith(form + ".")]
            if hits:
                return hits[-1] + 1
        raise TransferKitError(f"cannot place feature level {module!r} among the backbone's parameters")

    ends = [level["module"] for level in body.feature_info.info][1:5]
    top = ends[0].replace("_", ".").split(".")[0]
    start = next((i for i, n in enumerate(names) if n.split(".")[0] == top), 0)
    cuts = [0, start, *(last_of(e) for e in ends)]
    cuts[-1] = len(names)  # anything after the last level trains with it
    return [names[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def freeze_stages(model: nn.Module, trainable: int) -> list[str]:
    """Freeze all but the top `trainable` of the backbone's five stages; returns the frozen names."""
    stages = backbone_stages(model.backbone.body)
    frozen = [n for stage in stages[: max(0, len(stages) - trainable)] for n in stage]
    params = dict(model.backbone.body.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return [BACKBONE_PREFIX + n for n in frozen]


def resnet_stages(body: nn.Module) -> list[list[str]]:
    """torchvision's ResNet body in the five stages torchvision counts: conv1+bn1, layer1..layer4."""
    names = [n for n, _ in body.named_parameters()]
    stem = [n for n in names if not n.startswith("layer")]
    return [stem] + [[n for n in names if n.startswith(f"layer{i}.")] for i in range(1, 5)]


def create_torchvision_detector(cfg: DetectionConfig, num_classes: int) -> tuple[nn.Module, Family]:
    """One of torchvision's detector builders, randomly initialised, for `num_classes` classes."""
    kind = cfg.kind
    kwargs: dict = {"weights": None, "weights_backbone": None,
                    "num_classes": num_classes + (1 if WITH_BACKGROUND[kind] else 0)}
    if kind in TWO_STAGE:
        kwargs.update(box_score_thresh=cfg.score_threshold, box_detections_per_img=cfg.detections_per_image)
    else:
        kwargs.update(score_thresh=cfg.score_threshold, detections_per_img=cfg.detections_per_image)
    if kind != "ssdlite":  # SSDlite works at its fixed 320x320
        kwargs.update(min_size=tuple(cfg.min_size), max_size=cfg.max_size)
    model = getattr(detection, cfg.torchvision_model)(**kwargs)
    body = model.backbone.body if hasattr(model.backbone, "body") else model.backbone
    if cfg.frozen_bn:
        frozen = freeze_batch_norm_2d(body)  # same tensor names as torchvision's FrozenBatchNorm2d
        if hasattr(model.backbone, "body"):
            model.backbone.body = frozen
        else:
            model.backbone = frozen
    if hasattr(model.backbone, "body") and hasattr(model.backbone.body, "layer4"):
        stages = resnet_stages(model.backbone.body)
        params = dict(model.backbone.body.named_parameters())
        for stage in stages[: 5 - cfg.trainable_backbone_layers]:
            for name in stage:
                params[name].requires_grad_(False)
    prefix = BACKBONE_PREFIX if hasattr(model.backbone, "body") else "backbone."
    pre = Preprocessing(IMAGENET_MEAN, IMAGENET_STD)  # torchvision's detectors normalise with these
    return model, Family(HEAD_PATTERNS[kind], (prefix + "*",), pre, backbone_prefix=prefix)


def create_detector(name: str, num_classes: int, cfg: DetectionConfig) -> tuple[nn.Module, Family]:
    """A randomly initialised detector for `num_classes` object classes (no background)."""
    if cfg.torchvision_model:
        return create_torchvision_detector(cfg, num_classes)
    if cfg.arch == "fcos" and cfg.fpn_channels % 32:
        raise TransferKitError(f"detection.fpn_channels {cfg.fpn_channels}: FCOS's head normalises in 32 groups, "
                               "so use a multiple of 32")
    backbone = TimmFPN(name, cfg.fpn_channels, single_stage=cfg.arch not in TWO_STAGE)
    pre = timm_family(timm.create_model(name, pretrained=False, num_classes=0)).preprocessing
    common = dict(min_size=tuple(cfg.min_size), max_size=cfg.max_size, image_mean=list(pre.mean),
                  image_std=list(pre.std))
    # torchvision's anchors (32-512 px on P2-P6 or P3-P7) are for images resized to 800 px; scale
    # them with the images (FCOS's per-level sizes follow the strides and stay).
    scale = min(1.0, max(cfg.min_size) / 800)
    sizes = [max(4, round(s * scale)) for s in (32, 64, 128, 256, 512)]
    if cfg.arch in TWO_STAGE:
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
        classes: dict = {"num_classes": num_classes + 1}
        if cfg.arch == "maskrcnn":  # mask head as wide as the FPN (torchvision's: 256, its FPN width)
            width = cfg.fpn_channels
            # torchvision takes either num_classes or both predictors
            classes = {"box_predictor": FastRCNNPredictor(1024, num_classes + 1),
                       "mask_head": MaskRCNNHeads(width, (width,) * 4, 1),
                       "mask_predictor": MaskRCNNPredictor(width, width, num_classes + 1)}
        build = MaskRCNN if cfg.arch == "maskrcnn" else FasterRCNN
        model = build(backbone, rpn_anchor_generator=anchors, box_score_thresh=cfg.score_threshold,
                      box_detections_per_img=cfg.detections_per_image, **classes, **common)
    elif cfg.arch == "retinanet":
        anchors = AnchorGenerator(tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in sizes),
                                  ((0.5, 1.0, 2.0),) * 5)
        model = RetinaNet(backbone, num_classes=num_classes, anchor_generator=anchors,
                          score_thresh=cfg.score_threshold, detections_per_img=cfg.detections_per_image, **common)
    else:
        model = FCOS(backbone, num_classes=num_classes, score_thresh=cfg.score_threshold,
                     detections_per_img=cfg.detections_per_image, **common)
    if cfg.frozen_bn:
        model.backbone.body = freeze_batch_norm_2d(model.backbone.body)
    freeze_stages(model, cfg.trainable_backbone_layers)
    family = Family(HEAD_PATTERNS[cfg.arch], (BACKBONE_PREFIX + "*",), pre, backbone_prefix=BACKBONE_PREFIX)
    return model, family
