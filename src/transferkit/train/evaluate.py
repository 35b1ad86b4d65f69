"""Classification metrics: loss, top-1 and (with 5+ classes) top-5 accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


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
