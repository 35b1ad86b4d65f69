"""Parameter groups (head learning-rate multiplier), optimisers and per-step schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from transferkit.config import OptimConfig, ScheduleConfig
from transferkit.patterns import first_match


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def freeze_batchnorm(model: nn.Module) -> int:
    """Stop BatchNorm affine weights from training; returns how many layers. Their running
    statistics are kept by `set_train_mode`."""
    layers = [m for m in model.modules() if is_norm(m)]
    for m in layers:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return len(layers)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """model.train(), except that frozen BatchNorm layers stay in eval mode (no statistics update)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if is_norm(m):
                m.eval()


def param_groups(model: nn.Module, head_patterns: Sequence[str], cfg: OptimConfig) -> list[dict]:
    """Two groups: the new head at lr x head_lr_mult, and everything else at lr."""
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if first_match(head_patterns, name) is not None else body).append(p)
    groups = [
        {"name": "body", "params": body, "lr": cfg.lr, "lr_mult": 1.0},
        {"name": "head", "params": head, "lr": cfg.lr * cfg.head_lr_mult, "lr_mult": cfg.head_lr_mult},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, head_patterns: Sequence[str], cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, head_patterns, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg: ScheduleConfig) -> float:
    """Multiplier on each group's base learning rate at optimiser step `step` (0-based).

    Warmup rises linearly to 1 over warmup_epochs; then cosine decays to min_lr_ratio at the
    last step, step multiplies by gamma every step_epochs epochs, constant stays at 1.
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, steps_per_epoch, cfg)
    )
