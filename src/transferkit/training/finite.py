"""Non-finite values stop a run. The first NaN or inf loss ends it at that step, as Detectron2 and
MMEngine's CheckInvalidLossHook do, with the step and the likely cause; and no weights or training
state holding a non-finite value is ever saved, so the newest saved state stays the last good one.

Skipping such a step is not enough: the forward pass that produced the loss has already updated
BatchNorm's running statistics with it, and a loss that left the finite range once comes back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from transferkit.errors import TransferKitError


class NonFiniteError(TransferKitError):
    """The loss, or a tensor about to be saved, is NaN or inf."""


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch or an optimiser state, however nested (tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


def all_finite(tensors: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors_in(tensors) if t.is_floating_point())


def first_nonfinite(named: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an inf, or None."""
    for name, tensor in named.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def likely_cause(model: nn.Module, batch: Any, steps_taken: int, lr: float) -> str:
    """What most likely made the loss non-finite, told from what is still finite."""
    if not all_finite(batch):
        return "the batch holds NaN or inf values: check the data and its transforms"
    if first_nonfinite(dict(model.named_parameters())) is not None:
        return f"the weights left the finite range in the last update: lower optim.lr (now {lr:g})"
    if steps_taken == 0:
        return "before any update, so the data or labels of this batch are the likely cause"
    return (f"on finite data and weights: the learning rate is the likely cause (lower optim.lr, now {lr:g}), "
            "or this batch's labels")


def check_loss(loss: torch.Tensor, model: nn.Module, batch: Any, steps_taken: int, lr: float) -> None:
    """Raise NonFiniteError (without the where, which the loop adds) when `loss` is NaN or inf."""
    if bool(torch.isfinite(loss)):
        return
    value = "NaN" if bool(torch.isnan(loss)) else "inf"
    raise NonFiniteError(f"the loss is {value}; {likely_cause(model, batch, steps_taken, lr)}")


def require_finite(model: nn.Module, what: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Before anything is saved: every weight and buffer (and the optimiser's state) must be finite."""
    name = first_nonfinite(model.state_dict())
    if name is None and optimizer is not None and not all_finite(optimizer.state_dict()["state"]):
        name = "the optimiser's state"
    if name is not None:
        raise NonFiniteError(f"{what}: {name} holds NaN or inf values, so it was not saved; lower optim.lr, "
                             "or check the data")
