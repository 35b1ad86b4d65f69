"""Classification metrics: loss, top-1 and (with 5+ classes) top-5 accuracy."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.config import Config
from transferkit.errors import TransferKitError
from transferkit.train.build import (
    build_classifier,
    dataset_classes,
    load_classification_data,
    make_loader,
    place_model,
    select_device,
)
from transferkit.train.checkpoint import load_weights
from transferkit.weights.transfer import TransferReport


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """val_loss, val_acc and, with 5+ classes, val_top5 of a set of logits."""
    n = max(len(labels), 1)
    out = {"val_loss": float(nn.functional.cross_entropy(logits.double(), labels, reduction="sum")) / n}
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    out["val_acc"] = int(hit[:, 0].sum()) / n
    if logits.shape[1] >= 5:
        out["val_top5"] = int(hit.any(dim=1).sum()) / n
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, channels_last: bool = False) -> dict:
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        all_logits.append(model(images).float().cpu())
        all_labels.append(labels)
    return classification_metrics(torch.cat(all_logits), torch.cat(all_labels))


def evaluate_config(cfg: Config, weights: str | Path | None = None) -> tuple[dict, TransferReport | None]:
    """Evaluate on the validation split: the model as the config builds it before any training step
    (pretrained restore plus head initialisation), or, with `weights`, a trained checkpoint."""
    device = select_device(cfg.device)
    if cfg.task == "detection":
        return evaluate_detector_config(cfg, device, weights)
    classes = dataset_classes(cfg.data, need_train=False)
    model, family, report = build_classifier(cfg, classes, restore=weights is None)
    if weights:
        meta = load_weights(model, weights)
        if meta.get("classes") and meta["classes"] != classes:
            raise TransferKitError(
                f"{weights} was trained on classes {meta['classes']} but {cfg.data.root} has {classes}"
            )
    data = load_classification_data(cfg.data, family.preprocessing, classes, need_train=False)
    place_model(model, device, cfg.model.channels_last)
    loader = make_loader(data.val_set, cfg.data.batch_size, False, cfg.data.num_workers, cfg.seed)
    metrics = {**evaluate(model, loader, device, cfg.model.channels_last), "images": len(data.val_set)}
    return metrics, report


def evaluate_detector_config(cfg: Config, device, weights: str | Path | None = None,
                             results_path: str | Path | None = None) -> tuple[dict, TransferReport | None]:
    """COCO mAP of a detector on the validation split; with `results_path`, its detections as a COCO
    results JSON."""
    from transferkit.fileio import write_json
    from transferkit.train.detection import build_detector, detection_loaders, label_offset, load_detection_data
    from transferkit.train.detection_metrics import evaluate_detection

    data = load_detection_data(cfg, need_train=False)
    model, _, report = build_detector(cfg, data.classes, restore=weights is None)
    if weights:
        meta = load_weights(model, weights)
        if meta.get("classes") and meta["classes"] != data.classes:
            raise TransferKitError(f"{weights} was trained on classes {meta['classes']}, the data has {data.classes}")
    model.to(device)
    _, loader = detection_loaders(cfg, data)
    metrics, results = evaluate_detection(model, loader, data.val, device, label_offset(cfg))
    if results_path:
        write_json(results_path, results)
    return {**metrics, "images": len(data.val_set)}, report
