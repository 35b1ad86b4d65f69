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


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, channels_last: bool = False) -> dict:
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct1 = correct5 = 0
    n = 0
    num_classes = None
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        num_classes = logits.shape[1]
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").double().cpu()
        k = min(5, num_classes)
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        n += len(labels)
    out = {"val_loss": float(loss_sum) / max(n, 1), "val_acc": correct1 / max(n, 1)}
    if num_classes is not None and num_classes >= 5:
        out["val_top5"] = correct5 / max(n, 1)
    return out


def evaluate_config(cfg: Config, weights: str | Path | None = None) -> tuple[dict, TransferReport | None]:
    """Evaluate on the validation split: the model as the config builds it before any training step
    (pretrained restore plus head initialisation), or, with `weights`, a trained checkpoint."""
    device = select_device(cfg.device)
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
