"""Initialisers with MMEngine init_cfg semantics, chosen by layer type and by module name.

A rule: {type, layer: [Conv2d, ...], override: PATTERN, bias: value, ...type's own arguments}.
It applies to modules whose class name is in `layer` and/or whose name matches `override`; later
rules win where they overlap. By default only tensors the transfer did not restore are touched
(`force: true` touches them too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from transferkit.config import InitRule
from transferkit.errors import TransferKitError
from transferkit.patterns import matches
from transferkit.weights.transfer import TransferReport, read_source_tensors


def _fill_weight(rule: InitRule, w: torch.Tensor) -> None:
    t = rule.type
    if t == "constant":
        nn.init.constant_(w, rule.val)
    elif t == "xavier":
        (nn.init.xavier_uniform_ if rule.distribution == "uniform" else nn.init.xavier_normal_)(w, gain=rule.gain)
    elif t == "normal":
        nn.init.normal_(w, rule.mean, rule.std)
    elif t == "trunc_normal":
        nn.init.trunc_normal_(w, rule.mean, rule.std, rule.arg("a"), rule.arg("b"))
    elif t == "uniform":
        nn.init.uniform_(w, rule.arg("a"), rule.arg("b"))
    elif t == "kaiming":
        fn = nn.init.kaiming_uniform_ if rule.distribution == "uniform" else nn.init.kaiming_normal_
        fn(w, a=rule.arg("a"), mode=rule.mode, nonlinearity=rule.nonlinearity)
    elif t == "caffe2_xavier":  # MMEngine: kaiming uniform, a=1, fan_in, leaky_relu
        nn.init.kaiming_uniform_(w, a=1, mode="fan_in", nonlinearity="leaky_relu")


def _selected(rule: InitRule, name: str, module: nn.Module) -> bool:
    """By class name (subclasses count: timm's BatchNormAct2d is a BatchNorm2d), or by module name."""
    classes = {c.__name__ for c in type(module).__mro__}
    return bool(classes & set(rule.layer)) or (rule.override is not None and matches(rule.override, name))


@torch.no_grad()
def apply_init_rules(model: nn.Module, rules: Sequence[InitRule], report: TransferReport | None = None,
                     read_source: Callable[[str], Mapping[str, torch.Tensor]] = read_source_tensors
                     ) -> dict[str, str]:
    """Apply `rules` in order; returns {tensor name: how it was initialised} for what was touched."""
    restored = set(report.restored()) if report else set()
    done: dict[str, str] = {}
    for i, rule in enumerate(rules):
        if not rule.layer and rule.override is None:
            raise TransferKitError(f"model.init[{i}] ({rule.type}) selects nothing: give layer: or override:")
        hit = False
        source = None
        for name, module in model.named_modules():
            if not _selected(rule, name, module):
                continue
            hit = True
            for pname, p in module.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if full in restored and not rule.force:
                    continue
                if rule.type == "pretrained":
                    if source is None:
                        if rule.checkpoint is None:
                            raise TransferKitError(f"model.init[{i}]: pretrained needs checkpoint:")
                        source = read_source(rule.checkpoint)
                    key = rule.prefix + full[len(name) + 1:] if name else rule.prefix + full
                    if key not in source or tuple(source[key].shape) != tuple(p.shape):
                        raise TransferKitError(
                            f"model.init[{i}]: {rule.checkpoint} has no tensor {key!r} of shape {tuple(p.shape)}")
                    p.copy_(source[key])
                elif pname == "bias":
                    nn.init.constant_(p, rule.bias)
                elif p.dim() < 2 and rule.type in ("xavier", "kaiming", "caffe2_xavier"):
                    continue  # fan-based initialisers need a weight matrix (norm weights keep theirs)
                else:
                    _fill_weight(rule, p)
                done[full] = rule.describe()
        if not hit:
            what = f"layer {rule.layer}" if rule.layer else f"override {rule.override!r}"
            raise TransferKitError(f"model.init[{i}] ({rule.type}) matches no module ({what}); "
                                   "see `transferkit model params` for names")
    if report is not None:
        for name, how in done.items():
            report.note_init([name], how)
    return done
