"""What detection adds to the shared training loop: the detector as the config builds it, its data,
its loss (the sum of the detector's losses) and its validation metrics (COCO mAP)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transferkit.config import Config
from transferkit.data.detection import DetectionDataset, DetectionSplit, load_detection_splits, make_detection_loader
from transferkit.errors import TransferKitError
from transferkit.models.detection import WITH_BACKGROUND, create_detector
from transferkit.models.heads import init_detector_head_from_classes
from transferkit.models.registry import Family
from transferkit.train.detection_metrics import evaluate_detection
from transferkit.weights.transfer import TransferReport


@dataclass
class DetectionData:
    classes: list[str]
    train: DetectionSplit | None
    val: DetectionSplit
    train_set: DetectionDataset | None
    val_set: DetectionDataset


def label_offset(cfg: Config) -> int:
    return 1 if WITH_BACKGROUND[cfg.detection.kind] else 0


def build_detector(cfg: Config, classes: list[str], restore: bool = True
                   ) -> tuple[nn.Module, Family, TransferReport | None]:
    """The detector before any step: architecture, pretrained restore, new class-dependent tensors."""
    from transferkit.models.classification import restore_pretrained
    from transferkit.models.init import apply_init_rules
    from transferkit.weights.formats import read_weights
    from transferkit.weights.sources import resolve_source

    torch.manual_seed(cfg.seed)
    model, family = create_detector(cfg.model.name, len(classes), cfg.detection)
    report = restore_pretrained(model, family, cfg.pretrained) if restore else None
    if report is not None:
        # torchvision's own initialisation of the heads (normal std 0.01, prior-probability bias
        # for RetinaNet and FCOS) is what they are tuned with, so the new tensors keep it.
        restored = {e.target for e in report.by_status("loaded")}
        report.note_init([e.target for e in report.entries if e.target not in restored], "torchvision default")
        if cfg.pretrained.head_init is not None:
            init_detector_head_from_classes(model, report, classes, source_classes(cfg),
                                            cfg.pretrained.head_init.from_classes)
    if cfg.model.init:
        apply_init_rules(model, cfg.model.init, report, lambda src: read_weights(resolve_source(src)).tensors)
    return model, family, report


def source_classes(cfg: Config) -> list[str]:
    """The class names of the source detector, for head_init.from_classes."""
    if cfg.pretrained.head_init.source_classes:
        return cfg.pretrained.head_init.source_classes
    if str(cfg.pretrained.source).startswith("torchvision:"):  # the zoo's own class names (COCO)
        from transferkit.models.detection import zoo_source_classes
        from transferkit.weights.zoo import torchvision_weights

        categories = torchvision_weights(str(cfg.pretrained.source).removeprefix("torchvision:")).categories
        if categories:
            return zoo_source_classes(cfg.detection.kind, categories)
    listed = Path(str(cfg.pretrained.source)) / "classes.json"
    if listed.is_file():
        return json.loads(listed.read_text())
    raise TransferKitError("pretrained.head_init for a detector needs the source's class names: give "
                           "pretrained.head_init.source_classes, a run directory or a torchvision: name as "
                           "pretrained.source")


def load_detection_data(cfg: Config, need_train: bool = True) -> DetectionData:
    classes, train, val = load_detection_splits(cfg.data, need_train)
    offset = label_offset(cfg)
    masks = cfg.detection.kind == "maskrcnn"
    train_set = DetectionDataset(train, cfg.detection, True, cfg.data.cache, offset, cfg.data.on_bad_image,
                                 masks) if train is not None else None
    val_set = DetectionDataset(val, cfg.detection, False, cfg.data.cache, offset, cfg.data.on_bad_image)
    if train is not None:
        from transferkit.data.check import startup_check

        labels = [int(label) for r in train.records for label in r.labels[~r.crowd]]
        startup_check("training split", classes, labels, empty_level="warning")
    return DetectionData(classes, train, val, train_set, val_set)


def detection_loaders(cfg: Config, data: DetectionData):
    bs, workers = cfg.data.batch_size, cfg.data.num_workers
    train = make_detection_loader(data.train_set, bs, True, workers, cfg.seed) if data.train_set else None
    return train, make_detection_loader(data.val_set, bs, False, workers, cfg.seed)


def detection_loss(device):
    """batch -> (sum of the detector's losses, batch size)."""
    def loss_fn(model, batch):
        images, targets = batch
        images = [im.to(device) for im in images]
        targets = [{k: t[k].to(device) for k in ("boxes", "labels", "masks") if k in t} for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), len(images)
    return loss_fn


def detection_eval(cfg: Config, data: DetectionData, device):
    def eval_fn(model, loader):
        metrics, _ = evaluate_detection(model, loader, data.val, device, label_offset(cfg))
        return metrics
    return eval_fn
