"""Classification metrics: loss, top-1 and (with 5+ classes) top-5 accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


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

