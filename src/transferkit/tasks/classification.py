"""Classification: a timm classifier for the dataset's classes, class-folder (list, shard) data,
cross-entropy, top-1/top-5 accuracy, and the top classes of each image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.config import Config
from transferkit.data.classification import ClassificationData, dataset_classes, load_classification_data, make_loader
from transferkit.data.images import BadImage, load_rgb
from transferkit.data.transforms import eval_transform, resize_size
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier
from transferkit.models.family import Family
from transferkit.models.heads import init_head, init_head_from_classes
from transferkit.models.init import apply_init_rules
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
from transferkit.training.checkpoint import load_weights, saved_classes
from transferkit.training.evaluate import evaluate
from transferkit.training.rundir import checkpoint_path, run_classes
from transferkit.weights.transfer import TransferReport, restore_pretrained


def resolve_num_classes(cfg: Config, classes: list[str]) -> int:
    if cfg.model.num_classes == "auto":
        return len(classes)
    if cfg.model.num_classes != len(classes):
        raise TransferKitError(
            f"model.num_classes is {cfg.model.num_classes} but {cfg.data.root} has {len(classes)} classes; "
            "set model.num_classes=auto"
        )
    return cfg.model.num_classes


def build_model(cfg: Config, num_classes: int, restore: bool = True) -> tuple[nn.Module, Family, TransferReport | None]:
    """The model as the config builds it before any step: architecture, pretrained restore, head init."""
    torch.manual_seed(cfg.seed)  # the new head's initialisation is part of the run's seed
    model, family = create_classifier(cfg.model.name, num_classes, cfg.model.drop_rate)
    report = restore_pretrained(model, family, cfg.pretrained) if restore else None
    restored = report.restored() if report else []
    initialised = init_head(model, family.head_patterns, cfg.model.head_init, skip=restored)
    if report is not None:
        report.note_init(initialised, cfg.model.head_init)
    if cfg.model.init:
        apply_init_rules(model, cfg.model.init, report)
    return model, family, report


def build_classifier(cfg: Config, classes: list[str], restore: bool = True
                     ) -> tuple[nn.Module, Family, TransferReport | None]:
    """build_model for a dataset's classes, with head rows started from source classes when asked."""
    model, family, report = build_model(cfg, resolve_num_classes(cfg, classes), restore)
    if report is not None and cfg.pretrained.head_init is not None:
        init_head_from_classes(model, report, classes, cfg.pretrained.head_init.from_classes, cfg.model.head_init)
    return model, family, report


@torch.no_grad()
def predict_classes(model: nn.Module, classes: list[str], transform, paths: list[Path], topk: int = 1,
                    batch_size: int = 16) -> list[dict]:
    """The `topk` classes of each image with their probabilities, in the order of `paths`."""
    results: list[dict] = []
    k = min(topk, len(classes))
    for start in range(0, len(paths), batch_size):
        batch, ok = [], []
        for path in paths[start : start + batch_size]:
            try:
                batch.append(transform(load_rgb(path)))
                ok.append(path)
            except BadImage as exc:
                results.append({"path": str(path), "error": f"cannot decode: {exc}"})
        if not batch:
            continue
        probs = model(torch.stack(batch)).softmax(dim=1)
        top = probs.topk(k, dim=1)
        for path, values, indices in zip(ok, top.values, top.indices, strict=True):
            results.append({
                "path": str(path),
                "predictions": [
                    {"class": classes[int(i)], "index": int(i), "prob": float(v)}
                    for v, i in zip(values, indices, strict=True)
                ],
            })
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r["path"]])


# An exported classifier's logits may differ from PyTorch's by float rounding alone.
LOGIT_TOLERANCE = 1e-4


def compare_logits(expected: list[Outputs], got: list[Outputs]) -> Agreement:
    """Largest logit difference, and the images whose top-1 class is the same."""
    max_diff, agreed, images = 0.0, 0, 0
    for want, have in zip(expected, got, strict=True):
        want, have = want[0].float(), have[0].float()
        if want.shape != have.shape:
            return Agreement("logits", float("inf"), LOGIT_TOLERANCE, 0, len(want))
        max_diff = max(max_diff, float((want - have).abs().max()))
        agreed += int((want.argmax(1) == have.argmax(1)).sum())
        images += len(want)
    return Agreement("logits", max_diff, LOGIT_TOLERANCE, agreed, images)


class ClassificationTask:
    name = "classification"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build(self, need_train: bool = True, restore: bool = True) -> Built:
        cfg = self.cfg
        classes = dataset_classes(cfg.data, need_train)
        model, family, report = build_classifier(cfg, classes, restore)
        data = load_classification_data(cfg.data, family.preprocessing, classes, need_train)
        return Built(model, family, report, data, cfg.model.channels_last)

    def loaders(self, data: ClassificationData, shard: tuple[int, int] | None = None
                ) -> tuple[DataLoader | None, DataLoader]:
        bs, workers, seed = self.cfg.data.batch_size, self.cfg.data.num_workers, self.cfg.seed
        train = make_loader(data.train_set, bs, True, workers, seed, shard) if data.train_set is not None else None
        return train, make_loader(data.val_set, bs, False, workers, seed)

    def loss(self, device: torch.device) -> LossFn:
        criterion = nn.CrossEntropyLoss(label_smoothing=self.cfg.optim.label_smoothing)
        channels_last = self.cfg.model.channels_last

        def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
            images, labels = batch
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            return criterion(model(images), labels), len(labels)
        return loss_fn

    def evaluate(self, model: nn.Module, data: ClassificationData, loader: DataLoader, device: torch.device,
                 results_path: str | Path | None = None) -> dict:
        if results_path is not None:
            raise TransferKitError("--results is for detection configs (COCO results JSON)")
        return evaluate(model, loader, device, self.cfg.model.channels_last)

    def create_model(self, num_classes: int, name: str | None = None) -> tuple[nn.Module, Family]:
        return create_classifier(name or self.cfg.model.name, num_classes)

    def load_run(self, run_dir: str | Path, weights: str = "best") -> TrainedRun:
        cfg = self.cfg
        num_classes = cfg.model.num_classes if cfg.model.num_classes != "auto" else 0
        model, family = create_classifier(cfg.model.name, num_classes)
        ckpt = checkpoint_path(run_dir, weights)
        classes = saved_classes(load_weights(model, ckpt), ckpt, num_classes) or run_classes(run_dir)
        if len(classes) != num_classes:
            raise TransferKitError(f"{Path(run_dir) / 'classes.json'} names {len(classes)} classes, the model has "
                                   f"{num_classes} outputs; the run's class names are damaged")
        model.eval()
        return TrainedRun(model, classes, cfg, family.preprocessing)

    def predict(self, run: TrainedRun, paths: list[Path], options: PredictOptions) -> list[dict]:
        if options.topk < 1:
            raise TransferKitError("--topk must be at least 1")
        transform = eval_transform(run.cfg.data.eval_image_size or run.cfg.data.image_size, run.preprocessing)
        return predict_classes(run.model, run.classes, transform, paths, options.topk)

    def describe(self, result: dict) -> str:
        if "error" in result:
            return f"{result['path']}: error: {result['error']}"
        return f"{result['path']}: " + ", ".join(f"{p['class']} {p['prob']:.3f}" for p in result["predictions"])

    def board_images(self, model: nn.Module, data: ClassificationData, device: torch.device,
                     count: int) -> list[torch.Tensor]:
        return []  # a class name per image says nothing the accuracy curve does not

    def export_spec(self, run: TrainedRun, dynamic_batch: bool) -> ExportSpec:
        size = run.cfg.data.eval_image_size or run.cfg.data.image_size
        axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else {}
        batch = "N" if dynamic_batch else "1"
        about = (f"float32 [{batch}, 3, {size}, {size}]: RGB 0-1, shorter side resized to "
                 f"{resize_size(size, run.preprocessing)} ({run.preprocessing.interpolation}), centre-cropped to "
                 f"{size}, minus mean, divided by std")
        metadata = {"image_size": str(size), "resize": str(resize_size(size, run.preprocessing)), "input": about,
                    "output": "logits [batch, classes]; softmax gives the class probabilities"}
        return ExportSpec(run.model, ["images"], ["logits"], axes, metadata)

    def export_inputs(self, data: ClassificationData, count: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        images = [data.val_set[i][0] for i in range(min(count, len(data.val_set)))]
        return [(torch.stack(images[i : i + batch]),) for i in range(0, len(images), batch)]

    def compare_outputs(self, expected: list[Outputs], got: list[Outputs]) -> Agreement:
        return compare_logits(expected, got)

    def exported_model(self, run_exported: RunExported, input_shape: list[int | None]) -> Callable:
        fixed = input_shape[0]  # None: the file takes any batch size

        def logits(images: torch.Tensor) -> torch.Tensor:
            chunks = images.split(fixed) if fixed else (images,)
            return torch.cat([run_exported((chunk,))[0] for chunk in chunks])
        return logits
