"""Parameter groups (rules, head multiplier, freezing, layer decay), optimisers, per-step schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.table import Table
from torch import nn

from transferkit.config import MAX_LR, OptimConfig, ScheduleConfig
from transferkit.errors import TransferKitError
from transferkit.models.family import layer_ids
from transferkit.patterns import first_match, matches


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


@dataclass
class ParamPlan:
    """What the optimiser does with one parameter, and which rule decided it."""

    name: str
    shape: tuple[int, ...]
    rule: str
    lr: float
    weight_decay: float
    frozen: bool


def _layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay (BEiT, timm): the top layer gets 1, each one below x decay.
    Layers come from the model's timm group_matcher."""
    layer_of = layer_ids(model, coarse=False)
    top = max(layer_of.values())
    return {name: decay ** (top - layer) for name, layer in layer_of.items()}


def _frozen_until(model: nn.Module, block: str) -> set[str]:
    """Every parameter up to and including the last one of `block` (a module name such as blocks.3)."""
    names = [n for n, _ in model.named_parameters()]
    inside = [i for i, n in enumerate(names) if n == block or n.startswith(block + ".")]
    if not inside:
        raise TransferKitError(
            f"optim.freeze_until {block!r} names no module of the model; list them with `transferkit model params`"
        )
    return set(names[: inside[-1] + 1])


def plan_params(model: nn.Module, head_patterns: Sequence[str], cfg: OptimConfig) -> list[ParamPlan]:
    """Each parameter's rule, learning rate, weight decay and frozen flag. First matching rule of
    optim.param_groups wins; then the head (head_lr_mult); the rest is the base. A rule that
    matches nothing is an error (a typo, most often)."""
    named = list(model.named_parameters())
    rules = cfg.param_groups
    used = [False] * len(rules)
    frozen_early = _frozen_until(model, cfg.freeze_until) if cfg.freeze_until else set()
    scales = _layer_scales(model, cfg.layer_decay) if cfg.layer_decay else {}
    plans = []
    for name, p in named:
        index = next((i for i, r in enumerate(rules) if matches(r.match, name)), None)
        lr_mult, decay_mult, frozen = 1.0, 1.0, False
        if index is not None:
            used[index] = True
            rule = rules[index]
            label, lr_mult, decay_mult, frozen = f"param_groups[{index}] {rule.match}", rule.lr_mult, \
                rule.decay_mult, rule.freeze
        elif first_match(head_patterns, name) is not None:
            label, lr_mult = "head", cfg.head_lr_mult
        else:
            label = "base"
        if name in frozen_early and index is None:
            label, frozen = f"freeze_until {cfg.freeze_until}", True
        if not p.requires_grad:  # frozen BatchNorm, or frozen by the caller
            label, frozen = label if frozen else "frozen (requires_grad off)", True
        wd = cfg.weight_decay * decay_mult
        if cfg.no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias")):
            wd = 0.0
        lr = cfg.lr * lr_mult * scales.get(name, 1.0)
        plans.append(ParamPlan(name, tuple(p.shape), label, lr, wd, frozen))
    for i, ok in enumerate(used):
        if not ok:
            raise TransferKitError(
                f"optim.param_groups[{i}].match {rules[i].match!r} matches no parameter of {type(model).__name__}; "
                "list the names with `transferkit model params`"
            )
    return plans


def param_groups(model: nn.Module, head_patterns: Sequence[str], cfg: OptimConfig,
                 plans: list[ParamPlan] | None = None) -> list[dict]:
    """Optimiser groups: parameters with the same rule, learning rate and decay together; frozen
    parameters get requires_grad=False and are left out."""
    params = dict(model.named_parameters())
    groups: dict[tuple, dict] = {}
    for plan in plans if plans is not None else plan_params(model, head_patterns, cfg):
        if plan.frozen:
            params[plan.name].requires_grad_(False)
            continue
        key = (plan.rule, plan.lr, plan.weight_decay)
        group = groups.setdefault(key, {"name": plan.rule, "params": [], "lr": plan.lr,
                                        "weight_decay": plan.weight_decay})
        group["params"].append(params[plan.name])
    return list(groups.values())


def plan_table(plans: list[ParamPlan]) -> Table:
    """Per rule: tensors and values matched, learning rate (range under layer decay), decay, frozen."""
    table = Table(title="parameter groups")
    for col in ("rule", "tensors", "values", "lr", "weight decay", "frozen"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    by_rule: dict[str, list[ParamPlan]] = {}
    for plan in plans:
        by_rule.setdefault(plan.rule, []).append(plan)
    for rule, items in by_rule.items():
        lrs = sorted({p.lr for p in items})
        wds = sorted({p.weight_decay for p in items})
        lr = f"{lrs[0]:.2e}" if len(lrs) == 1 else f"{lrs[0]:.2e}..{lrs[-1]:.2e}"
        wd = f"{wds[0]:g}" if len(wds) == 1 else f"{wds[0]:g}..{wds[-1]:g}"
        frozen = items[0].frozen
        table.add_row(rule, str(len(items)), f"{sum(math.prod(p.shape) for p in items):,}",
                      "-" if frozen else lr, "-" if frozen else wd, "yes" if frozen else "no")
    return table


@dataclass(frozen=True)
class LrScaling:
    """optim.lr_scaling applied to one run: the base learning rate it gives and how."""

    lr: float  # the base learning rate the parameter groups start from
    line: str  # the rule and the result, printed with the effective batch

    def apply(self, cfg: OptimConfig) -> OptimConfig:
        """`cfg` with the scaled base learning rate (every multiplier applies on top of it)."""
        return cfg if self.lr == cfg.lr else cfg.model_copy(update={"lr": self.lr})


def scale_lr(cfg: OptimConfig, effective_batch: int, batch_size: int) -> LrScaling:
    """linear: optim.lr x effective batch / optim.lr_reference_batch (default data.batch_size, so
    the factor is processes x accumulate); none: optim.lr as configured."""
    if cfg.lr_scaling == "none":
        return LrScaling(cfg.lr, f"learning rate: optim.lr {cfg.lr:g} as configured (optim.lr_scaling none)")
    reference = cfg.lr_reference_batch or batch_size
    lr = cfg.lr * effective_batch / reference
    if lr > MAX_LR:  # the config's own bound on optim.lr, for the same reason
        raise TransferKitError(f"optim.lr_scaling linear makes the learning rate {cfg.lr:g} x {effective_batch} / "
                               f"{reference} = {lr:g}, above {MAX_LR:g}; lower optim.lr or raise "
                               "optim.lr_reference_batch")
    return LrScaling(lr, f"learning rate: optim.lr {cfg.lr:g} x {effective_batch} / {reference} = {lr:g} "
                         f"(optim.lr_scaling linear, reference batch {reference})")


def build_optimizer(model: nn.Module, head_patterns: Sequence[str], cfg: OptimConfig,
                    plans: list[ParamPlan] | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, head_patterns, cfg, plans)
    if not groups:
        raise TransferKitError("every parameter is frozen: nothing to train; loosen freeze rules")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg: ScheduleConfig) -> float:
    """Multiplier on each group's base learning rate at optimiser step `step` (0-based).

    Warmup rises linearly to 1 over warmup_epochs; then cosine decays towards min_lr_ratio, which
    it reaches at step total_steps (one past the last, as timm's and torchvision's cosine do); step
    multiplies by gamma every step_epochs epochs; constant stays at 1.
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
