"""Fine-tuning strategies beyond plain fine-tuning.

linear_probe      the backbone is frozen; its features are computed once and cached in memory, and
                  only the head trains on them (one backbone pass in all, instead of one per epoch).
lp_ft             a linear probe (probe.epochs), then a full fine-tune (Kumar et al. 2022).
gradual_unfreeze  the head first, then one more stage from the top every unfreeze.every epochs
                  (fastai style); stages are the timm model's coarse layer groups.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from transferkit.config import Config
from transferkit.data.classification import ClassificationData, ImageDataset, make_loader
from transferkit.fileio import atomic_write
from transferkit.models.family import layer_ids
from transferkit.patterns import first_match
from transferkit.progress import StepProgress
from transferkit.training.evaluate import classification_metrics
from transferkit.training.optim import build_optimizer, build_scheduler


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, cfg: Config, device: torch.device, views: int = 1,
                     progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features of every image, `views` times (each pass draws new augmentations
    when the dataset's transform is random). Returns (views, N, D) features and N labels."""
    model.eval()
    out, labels = [], None
    for view in range(views):
        loader = make_loader(dataset, cfg.data.batch_size, False, cfg.data.num_workers, cfg.seed + view)
        task = progress.add_task(f"features {view + 1}/{views}", total=len(dataset)) if progress else None
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


def train_probe_epoch(feats: torch.Tensor, labels: torch.Tensor, step: Callable[[torch.Tensor, torch.Tensor], float],
                      batch_size: int, generator: torch.Generator) -> float:
    """One epoch of the head on cached features: a random view per image, shuffled batches;
    `step(features, labels)` trains on one batch and returns its loss."""
    n = labels.shape[0]
    view = torch.randint(feats.shape[0], (n,), generator=generator)
    order = torch.randperm(n, generator=generator)
    x_all = feats[view, torch.arange(n)]
    loss_sum, seen = 0.0, 0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        loss_sum += step(x_all[idx], labels[idx]) * len(idx)
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


def run_probe(cfg: Config, model: nn.Module, data: ClassificationData, device: torch.device, recorder,
              progress: StepProgress) -> None:
    """Linear probe: backbone features computed once, the head trained on them; each epoch goes to
    `recorder` (training/loop.py's EpochRecorder) as phase `probe`."""
    t0 = time.perf_counter()
    epochs = cfg.schedule.epochs if cfg.strategy == "linear_probe" else cfg.probe.epochs
    if cfg.probe.augment:
        train_feats, train_labels = extract_features(model, data.train_set, cfg, device, cfg.probe.views, progress)
    else:
        plain = ImageDataset(data.train_set.split, data.val_set.transform, data.train_set.cache)
        train_feats, train_labels = extract_features(model, plain, cfg, device, 1, progress)
    val_feats, val_labels = extract_features(model, data.val_set, cfg, device, 1, progress)
    if cfg.probe.cache == "disk":
        path = recorder.run_dir / "probe_features.pt"
        atomic_write(path, lambda tmp: torch.save({"train": train_feats.cpu(), "val": val_feats.cpu()}, tmp))
        cached = torch.load(path, weights_only=True, mmap=True)
        train_feats, val_feats = cached["train"], cached["val"]
    recorder.say(f"probe: features of {train_labels.shape[0]} train x {train_feats.shape[0]} view(s) and "
                 f"{val_labels.shape[0]} val images cached ({cfg.probe.cache}, {time.perf_counter() - t0:.1f}s)",
                 highlight=False)
    head = probe_head(model)
    lr = cfg.probe.lr or cfg.optim.lr * cfg.optim.head_lr_mult
    probe_optim = cfg.optim.model_copy(update={"lr": lr, "head_lr_mult": 1.0, "param_groups": [],
                                               "freeze_until": None, "layer_decay": None})
    optimizer = build_optimizer(head, (), probe_optim)
    steps = -(-train_labels.shape[0] // cfg.data.batch_size)
    scheduler = build_scheduler(optimizer, cfg.schedule.model_copy(update={"epochs": epochs}), steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    drop_rate = cfg.model.drop_rate

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        x = nn.functional.dropout(x, drop_rate, training=True) if drop_rate else x
        loss = criterion(head(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return float(loss.detach())

    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epochs):
        t_epoch = time.perf_counter() if recorder.epoch else t0  # the first epoch pays for the features
        head.train()  # probe_logits leaves it in eval mode
        loss = train_probe_epoch(train_feats, train_labels, step, cfg.data.batch_size, generator)
        metrics = classification_metrics(probe_logits(model, val_feats), val_labels.cpu())
        recorder.record("probe", loss, metrics, t_epoch,
                        [("head", optimizer.param_groups[0]["lr"])])  # the probe trains the head alone
    head.train()
