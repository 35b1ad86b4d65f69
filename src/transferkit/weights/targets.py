"""What `weights transfer` restores into, besides a timm model: a model built by the user's own
factory (`package.module:function`), or a template, the names and shapes of an existing checkpoint
when there is no model code at all.

Naming a factory imports that module and calls the function: this runs the user's own code, named
explicitly on the command line, exactly as `python -c` would. Nothing from a weights file is run.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from transferkit.errors import TransferKitError
from transferkit.patterns import first_match
from transferkit.weights.folding import DEFAULT_EPS
from transferkit.weights.formats import read_weights
from transferkit.weights.sources import resolve_source
from transferkit.weights.transfer import RESTORED, TransferReport


class Template(nn.Module):
    """A parameter-only stand-in for a model: its state dict is the reference checkpoint's names,
    shapes and dtypes, in the reference's order, filled as restoring goes."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], bn_eps: float = DEFAULT_EPS) -> None:
        super().__init__()
        self._tensors = {k: v.detach().clone() for k, v in tensors.items()}
        self.bn_eps = bn_eps  # the eps of the BatchNorms the checkpoint is loaded into (folding needs it)

    def state_dict(self, *args, keep_vars: bool = False, **kwargs) -> dict[str, torch.Tensor]:  # noqa: ARG002
        return dict(self._tensors)  # the same tensors, so restoring into it fills them in place


def from_factory(spec: str) -> nn.Module:
    """`package.module:function` -> the nn.Module that function returns when called without arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TransferKitError(f"--model {spec!r}: a factory is named as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TransferKitError(f"--model {spec!r}: cannot import {module_name} ({exc}); "
                               "is it on PYTHONPATH or installed?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TransferKitError(f"--model {spec!r}: {module_name} has no function {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TransferKitError(f"--model {spec!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


@dataclass
class Target:
    """What a transfer restores into, and what is known of its head."""

    model: nn.Module
    label: str  # for the written file's metadata
    head_patterns: Sequence[str] = ()
    backbone_patterns: Sequence[str] | None = None
    default_scope: str = "full"
    initial: str = "the model's initialisation"  # what a tensor that is not restored holds


def template_target(reference: str, bn_eps: float = DEFAULT_EPS) -> Target:
    """`--like REF`: the names and shapes of an existing checkpoint, every tensor restored by default."""
    return Target(Template(read_weights(resolve_source(reference)).tensors, bn_eps), f"like {reference}",
                  initial="the reference's values")


def factory_target(spec: str) -> Target:
    """`--model pkg.mod:function`: the user's own model; its head is not known, so scope full by default."""
    return Target(from_factory(spec), spec)


def unrestored(report: TransferReport) -> list[str]:
    """Tensors the source did not give, BatchNorm step counters aside (they carry nothing)."""
    return [e.target for e in report.entries
            if e.status not in RESTORED and not e.target.endswith("num_batches_tracked")]


def random_head(report: TransferReport, head_patterns: Sequence[str]) -> list[str]:
    """The head tensors that were not restored: a file written with them predicts at random."""
    return [e.target for e in report.entries
            if first_match(head_patterns, e.target) is not None and e.status not in RESTORED]
