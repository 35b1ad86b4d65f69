"""Detection: a torchvision detector for the dataset's object classes (a timm backbone with an FPN,
or one of torchvision's own builds), COCO/VOC/shard data with box-aware transforms, the sum of the
detector's losses, COCO mAP through pycocotools, and boxes found in images (drawn when asked)."""

from __future__ import annotations

from collections.abc import Callable
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
from transferkit.outputs import OutputFolder
from transferkit.tasks.base import (
    Agreement,
    Built,
    ExportSpec,
    LossFn,
    Outputs,
    PredictOptions,
    RunExported,
    TrainedRun,
)
from transferkit.training.checkpoint import load_weights
from transferkit.training.detection_metrics import evaluate_detection
from transferkit.training.rundir import checkpoint_path, run_classes
from transferkit.weights import zoo
from transferkit.weights.transfer import TransferReport, restore_pretrained


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
        restored = set(report.restored())
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
        categories = zoo.torchvision_weights(str(cfg.pretrained.source).removeprefix("torchvision:")).categories
        if categories:
            return zoo_source_classes(cfg.detection.kind, categories)
    if cfg.pretrained.source and (Path(str(cfg.pretrained.source)) / "classes.json").is_file():
        return run_classes(cfg.pretrained.source)
    raise TransferKitError("pretrained.head_init for a detector needs the source's class names: give "
                           "pretrained.head_init.source_classes, a run directory or a torchvision: name as "
                           "pretrained.source")


def load_detection_data(cfg: Config, need_train: bool = True) -> DetectionData:
    classes, train, val = load_detection_splits(cfg.data, need_train)
    offset = label_offset(cfg)
    masks = cfg.detection.kind == "maskrcnn"
    if train is not None and cfg.detection.skip_empty:
        train.drop_images_without_boxes()
        if not train.records:
            raise TransferKitError(f"detection.skip_empty: no training image holds a box of {classes}; "
                                   "check data.classes and the annotations")
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
        try:
            losses = model(images, targets)
        except ValueError as exc:
            # GroupNorm (FCOS's head) or BatchNorm left one value per channel: a small image's coarsest
            # level (stride 128) is one pixel; torch's message names neither the layer nor the cure.
            if "more than 1 value per channel" not in str(exc):
                raise
            sizes = ", ".join(f"{im.shape[-1]}x{im.shape[-2]}" for im in images)
            raise TransferKitError(
                f"detection: a normalisation layer got one value per channel on the coarsest feature level "
                f"(images {sizes} before resizing); raise detection.min_size above 128, or "
                "detection.fpn_channels to 64 or more") from exc
        return sum(losses.values()), len(images)
    return loss_fn


@torch.no_grad()
def predict_boxes(model: nn.Module, classes: list[str], offset: int, paths: list[Path], score: float = 0.3,
                  draw_dir: str | Path | None = None, force: bool = False) -> list[dict]:
    """Boxes [x0, y0, x1, y1] in image pixels with class and score, per image; with `draw_dir`, each
    image with its boxes drawn, as DIR/<name>.png (files there that transferkit did not write are
    not replaced unless `force`: DIR may be the folder holding the input images)."""
    drawn_files = None
    if draw_dir is not None:
        drawn_files = OutputFolder(draw_dir, force)
        drawn_files.claim([Path(draw_dir) / f"{path.stem}.png" for path in paths])
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
            drawn_files.wrote(target)
            entry["drawn"] = str(target)
        results.append(entry)
    if drawn_files is not None and drawn_files.dirty:
        drawn_files.save()
    return results


# Exported boxes are the same boxes when their corners agree to a thousandth of a pixel.
BOX_TOLERANCE = 1e-3


class ExportedDetector(nn.Module):
    """The detector as one exported graph: one image [3, H, W] (RGB, 0-1, any size) in; boxes [N, 4]
    (x0, y0, x1, y1 in that image's pixels), labels [N], scores [N] (and masks [N, 1, H, W] for
    Mask R-CNN) out, with torchvision's resizing, normalisation, score threshold and NMS inside."""

    def __init__(self, model: nn.Module, masks: bool):
        super().__init__()
        self.model, self.masks = model, masks

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model([image])[0]
        found = (out["boxes"], out["labels"], out["scores"])
        return (*found, out["masks"]) if self.masks else found


def box_difference(want: Outputs, have: Outputs) -> float:
    """Largest corner difference (px) after pairing each reference box with the closest exported box
    of the same class (equal scores may come out in either order); inf when the sets differ."""
    boxes, labels = want[0].float(), want[1]
    other, other_labels = have[0].float(), have[1]
    if len(boxes) != len(other):
        return float("inf")
    free = torch.ones(len(other), dtype=torch.bool)
    worst = 0.0
    for box, label in zip(boxes, labels, strict=True):
        gaps = (other - box).abs().amax(dim=1)
        gaps[~free | (other_labels != label)] = float("inf")
        best = int(gaps.argmin()) if len(gaps) else -1
        if best < 0 or not torch.isfinite(gaps[best]):
            return float("inf")
        free[best] = False
        worst = max(worst, float(gaps[best]))
    return worst


def compare_boxes(expected: list[Outputs], got: list[Outputs]) -> Agreement:
    diffs = [box_difference(want, have) for want, have in zip(expected, got, strict=True)]
    agreed = sum(d <= BOX_TOLERANCE for d in diffs)
    return Agreement("box corners (px)", max(diffs, default=0.0), BOX_TOLERANCE, agreed, len(diffs))


BOARD_SCORE = 0.3  # the boxes drawn for TensorBoard: predict's default lowest score


@torch.no_grad()
def draw_validation(model: nn.Module, dataset: DetectionDataset, classes: list[str], offset: int,
                    device: torch.device, count: int) -> list[torch.Tensor]:
    """The first `count` validation images, uint8 [3, H, W], with the true boxes in green and the
    predicted ones scoring BOARD_SCORE or more in red."""
    model.eval()
    drawn = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        out = model([image.to(device)])[0]
        keep = out["scores"] >= BOARD_SCORE
        canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
        canvas = draw_bounding_boxes(canvas, target["boxes"], colors="green")
        names = [f"{classes[int(c) - offset]} {float(s):.2f}" for c, s in zip(out["labels"][keep], out["scores"][keep],
                                                                              strict=True)]
        drawn.append(draw_bounding_boxes(canvas, out["boxes"][keep].cpu(), labels=names, colors="red"))
    return drawn


class DetectionTask:
    name = "detection"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build(self, need_train: bool = True, restore: bool = True) -> Built:
        data = load_detection_data(self.cfg, need_train)
        model, family, report = build_detector(self.cfg, data.classes, restore)
        # channels_last weights: torchvision's transform batches the images in NCHW, and a convolution
        # with channels_last weights answers in channels_last, so the whole network runs in it.
        return Built(model, family, report, data, channels_last=self.cfg.model.channels_last)

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
        classes = run_classes(run_dir)
        model, family = create_detector(self.cfg.model.name, len(classes), self.cfg.detection)
        load_weights(model, checkpoint_path(run_dir, weights))
        model.eval()
        return TrainedRun(model, classes, self.cfg, family.preprocessing)

    def predict(self, run: TrainedRun, paths: list[Path], options: PredictOptions) -> list[dict]:
        return predict_boxes(run.model, run.classes, label_offset(run.cfg), paths, options.score, options.draw_dir,
                             options.force)

    def describe(self, result: dict) -> str:
        if "error" in result:
            return f"{result['path']}: error: {result['error']}"
        found = ", ".join(f"{d['class']} {d['score']:.2f} at {d['box']}" for d in result["detections"])
        return f"{result['path']}: {found or 'nothing found'}"

    def board_images(self, model: nn.Module, data: DetectionData, device: torch.device,
                     count: int) -> list[torch.Tensor]:
        return draw_validation(model, data.val_set, data.classes, label_offset(self.cfg), device, count)

    def export_spec(self, run: TrainedRun, dynamic_batch: bool) -> ExportSpec:
        if dynamic_batch:
            raise TransferKitError("--dynamic-batch is for classifiers: an exported detector takes one image of any "
                                   "size per call; leave the flag out")
        masks = run.cfg.detection.kind == "maskrcnn"
        outputs = ["boxes", "labels", "scores", *(["masks"] if masks else [])]
        axes = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in outputs}}
        offset = label_offset(run.cfg)
        metadata = {
            "input": "float32 [3, H, W]: one RGB image, 0-1, any size (resized and normalised inside)",
            "output": "boxes [N, 4] x0 y0 x1 y1 in input pixels, labels [N] (class index + label_offset), scores [N]"
                      + (", masks [N, 1, H, W]" if masks else ""),
            "label_offset": str(offset),
            "score_threshold": str(run.cfg.detection.score_threshold),
        }
        return ExportSpec(ExportedDetector(run.model, masks).eval(), ["image"], outputs, axes, metadata)

    def export_inputs(self, data: DetectionData, count: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        return [(data.val_set[i][0],) for i in range(min(count, len(data.val_set)))]

    def compare_outputs(self, expected: list[Outputs], got: list[Outputs]) -> Agreement:
        return compare_boxes(expected, got)

    def exported_model(self, run_exported: RunExported, input_shape: list[int | None]) -> Callable:
        def detect(images: list[torch.Tensor]) -> list[dict]:
            found = []
            for image in images:
                boxes, labels, scores, *masks = run_exported((image,))
                out = {"boxes": boxes, "labels": labels, "scores": scores}
                found.append({**out, "masks": masks[0]} if masks else out)
            return found
        return detect
