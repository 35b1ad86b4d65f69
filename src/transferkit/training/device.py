"""Where a run computes, and its seeds: the device, the model placed on it, the random generators."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from transferkit.errors import TransferKitError


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TransferKitError("device=cuda was asked for but no CUDA GPU is available; use device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
