"""Detection: a torchvision detector for the dataset's object classes (a timm backbone with an FPN,
or one of torchvision's own builds), COCO/VOC/shard data with box-aware transforms, the sum of the
detector's losses, COCO mAP through pycocotools, and boxes found in images (drawn when asked)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor, to_tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from transferkit.config import Config
from transferkit.data.check import startup_check
from transferkit.data.detection import DetectionDataset, DetectionSplit, load_detection_splits, make_detection_loader
from transferkit.data.images import BadImage, load_rgb
from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write, write_json
from transferkit.models.detection import WITH_BACKGROUND, create_detector, zoo_source_classes
from transferkit.models.family import Family
from transferkit.models.heads import init_detector_head_from_classes
from transferkit.models.init import apply_init_rules
from transferkit.tasks.base import Built, LossFn, PredictOptions, TrainedRun
from transferkit.train.checkpoint import load_weights
from transferkit.train.detection_metrics import evaluate_detection
from transferkit.train.rundir import checkpoint_path
from transferkit.weights.transfer import TransferReport, restore_pretrained
from transferkit.weights.zoo import torchvision_weights


@dataclass
class DetectionData:
    classes: list[str]
    train: DetectionSplit | None
    val: DetectionSplit
    train_set: DetectionDataset | None
    val_set: DetectionDataset


def label_offset(cfg: Config) -> int:
    """1 where the detector keeps label 0 for the background (Faster/Mask R-CNN, SSDlite), else 0."""
    return 1 if WITH_BACKGROUND[cfg.detection.kind] else 0


def build_detector(cfg: Config, classes: list[str], restore: bool = True
                   ) -> tuple[nn.Module, Family, TransferReport | None]:
    """The detector before any step: architecture, pretrained restore, new class-dependent tensors."""
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
        apply_init_rules(model, cfg.model.init, report)
    return model, family, report


def source_classes(cfg: Config) -> list[str]:
    """The class names of the source detector, for head_init.from_classes."""
    if cfg.pretrained.head_init.source_classes:
        return cfg.pretrained.head_init.source_classes
    if str(cfg.pretrained.source).startswith("torchvision:"):  # the zoo's own class names (COCO)
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
        labels = [int(label) for r in train.records for label in r.labels[~r.crowd]]
        startup_check("training split", classes, labels, empty_level="warning")
    return DetectionData(classes, train, val, train_set, val_set)


def detection_loaders(cfg: Config, data: DetectionData, shard: tuple[int, int] | None = None
                      ) -> tuple[DataLoader | None, DataLoader]:
    bs, workers = cfg.data.batch_size, cfg.data.num_workers
    train = make_detection_loader(data.train_set, bs, True, workers, cfg.seed, shard) if data.train_set else None
    return train, make_detection_loader(data.val_set, bs, False, workers, cfg.seed)


def detection_loss(device: torch.device) -> LossFn:
    """batch -> (sum of the detector's losses, batch size)."""
    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, targets = batch
        images = [im.to(device) for im in images]
        targets = [{k: t[k].to(device) for k in ("boxes", "labels", "masks") if k in t} for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), len(images)
    return loss_fn


@torch.no_grad()
def predict_boxes(model: nn.Module, classes: list[str], offset: int, paths: list[Path], score: float = 0.3,
                  draw_dir: str | Path | None = None) -> list[dict]:
    """Boxes [x0, y0, x1, y1] in image pixels with class and score, per image; with `draw_dir`, each
    image with its boxes drawn, as DIR/<name>.png."""
    results = []
    for path in paths:
        try:
            im = load_rgb(path)
        except BadImage as exc:
            results.append({"path": str(path), "error": f"cannot decode: {exc}"})
            continue
        out = model([to_tensor(im)])[0]
        keep = out["scores"] >= score
        boxes, labels, scores = out["boxes"][keep], out["labels"][keep] - offset, out["scores"][keep]
        dets = [{"box": [round(v, 1) for v in b], "class": classes[int(c)], "score": round(float(s), 4)}
                for b, c, s in zip(boxes.tolist(), labels.tolist(), scores.tolist(), strict=True)]
        entry = {"path": str(path), "detections": dets}
        if draw_dir is not None:
            names = [f"{d['class']} {d['score']:.2f}" for d in dets]
            canvas = pil_to_tensor(im)
            if "masks" in out:  # Mask R-CNN: the objects' masks under their boxes
                canvas = draw_segmentation_masks(canvas, out["masks"][keep][:, 0] >= 0.5, alpha=0.4, colors="red")
            drawn = draw_bounding_boxes(canvas, boxes, labels=names, colors="red", width=max(2, min(im.size) // 200))
            target = Path(draw_dir) / f"{path.stem}.png"
            atomic_write(target, lambda tmp, d=drawn: Image.fromarray(d.permute(1, 2, 0).numpy()).save(tmp, "PNG"))
            entry["drawn"] = str(target)
        results.append(entry)
    return results


class DetectionTask:
    name = "detection"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build(self, need_train: bool = True, restore: bool = True) -> Built:
        data = load_detection_data(self.cfg, need_train)
        model, family, report = build_detector(self.cfg, data.classes, restore)
        # channels_last stays off: torchvision's detection transform batches the images itself
        return Built(model, family, report, data, channels_last=False)

    def loaders(self, data: DetectionData, shard: tuple[int, int] | None = None
                ) -> tuple[DataLoader | None, DataLoader]:
        return detection_loaders(self.cfg, data, shard)

    def loss(self, device: torch.device) -> LossFn:
        return detection_loss(device)

    def evaluate(self, model: nn.Module, data: DetectionData, loader: DataLoader, device: torch.device,
                 results_path: str | Path | None = None) -> dict:
        """COCO mAP on the validation split; with `results_path`, the detections as a COCO results JSON."""
        metrics, results = evaluate_detection(model, loader, data.val, device, label_offset(self.cfg))
        if results_path is not None:
            write_json(results_path, results)
        return metrics

    def create_model(self, num_classes: int, name: str | None = None) -> tuple[nn.Module, Family]:
        return create_detector(name or self.cfg.model.name, num_classes, self.cfg.detection)

    def load_run(self, run_dir: str | Path, weights: str = "best") -> TrainedRun:
        classes = json.loads((Path(run_dir) / "classes.json").read_text())
        model, family = create_detector(self.cfg.model.name, len(classes), self.cfg.detection)
        load_weights(model, checkpoint_path(run_dir, weights))
        model.eval()
        return TrainedRun(model, classes, self.cfg, family.preprocessing)

    def predict(self, run: TrainedRun, paths: list[Path], options: PredictOptions) -> list[dict]:
        return predict_boxes(run.model, run.classes, label_offset(run.cfg), paths, options.score, options.draw_dir)

    def describe(self, result: dict) -> str:
        if "error" in result:
            return f"{result['path']}: error: {result['error']}"
        found = ", ".join(f"{d['class']} {d['score']:.2f} at {d['box']}" for d in result["detections"])
        return f"{result['path']}: {found or 'nothing found'}"
