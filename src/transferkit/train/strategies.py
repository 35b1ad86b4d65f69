"""Fine-tuning strategies beyond plain fine-tuning.

linear_probe      the backbone is frozen; its features are computed once and cached in memory, and
                  only the head trains on them (one backbone pass in all, instead of one per epoch).
lp_ft             a linear probe (probe.epochs), then a full fine-tune (Kumar et al. 2022).
gradual_unfreeze  the head first, then one more stage from the top every unfreeze.every epochs
                  (fastai style); stages are the timm model's coarse layer groups.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from transferkit.config import Config
from transferkit.models.registry import layer_ids
from transferkit.patterns import first_match
from transferkit.train.build import make_loader


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, cfg: Config, device: torch.device, views: int = 1,
                     progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features of every image, `views` times (each pass draws new augmentations
    when the dataset's transform is random). Returns (views, N, D) features and N labels."""
    model.eval()
    out, labels = [], None
    for view in range(views):
        loader = make_loader(dataset, cfg.data.batch_size, False, cfg.data.num_workers, cfg.seed + view)
        task = progress.add_task(f"features {view + 1}/{views}", total=len(dataset), info="") if progress else None
        feats, labs = [], []
        for images, y in loader:
            images = images.to(device)
            if cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            feats.append(model.forward_head(model.forward_features(images), pre_logits=True).float())
            labs.append(y.to(device))
            if progress is not None:
                progress.advance_and_draw(task, len(y))
        if progress is not None:
            progress.remove_task(task)
        out.append(torch.cat(feats))
        labels = torch.cat(labs)
    return torch.stack(out), labels


def probe_head(model: nn.Module) -> nn.Module:
    """The module that maps pooled features to logits."""
    return model.get_classifier()


def train_probe_epoch(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, optimizer, scheduler,
                      criterion, batch_size: int, generator: torch.Generator, drop_rate: float) -> float:
    """One epoch of the head on cached features: a random view per image, shuffled batches."""
    head = probe_head(model)
    head.train()
    n = labels.shape[0]
    view = torch.randint(feats.shape[0], (n,), generator=generator)
    order = torch.randperm(n, generator=generator)
    x_all = feats[view, torch.arange(n)]
    loss_sum, seen = 0.0, 0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        x = nn.functional.dropout(x_all[idx], drop_rate, training=True) if drop_rate else x_all[idx]
        loss = criterion(head(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(idx)
        seen += len(idx)
    return loss_sum / max(seen, 1)


@torch.no_grad()
def probe_logits(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    head = probe_head(model)
    head.eval()
    return head(feats[0]).float().cpu()


def unfreeze_stages(model: nn.Module, head_patterns, stages_open: int, trainable: set[int]) -> int:
    """Let the head and the top `stages_open` coarse stages train; freeze the rest. Only parameters
    in `trainable` (those in the optimiser) are touched. Returns how many tensors train."""
    layer_of = layer_ids(model, coarse=True)
    top = max(layer_of.values())
    count = 0
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            continue
        on = first_match(head_patterns, name) is not None or layer_of.get(name, top) >= top - stages_open
        p.requires_grad_(on)
        count += on
    return count


def stage_count(model: nn.Module) -> int:
    """How many coarse stages (timm group_matcher) the model has below its head."""
    return max(layer_ids(model, coarse=True).values())
