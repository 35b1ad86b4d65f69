"""Where a run computes, and its seeds: the device, the model placed on it, the random generators."""

from __future__ import annotations

import os
import random
import shutil
import sys
from collections.abc import Callable

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


def compile_support(device: torch.device) -> str | None:
    """None where torch.compile can work here, else why it cannot."""
    if not torch._dynamo.is_dynamo_supported():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return f"torch.compile does not support Python {version} on this platform"
    if device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        return "torch.compile on CPU needs a C++ compiler (g++ or $CXX), and none was found"
    return None


def compile_model(model: nn.Module, device: torch.device, say: Callable[..., None]) -> nn.Module:
    """model.compile: the model through torch.compile, or, where that is not supported, the model as
    it is with one line saying why. Checkpoints keep the plain names (train/checkpoint.py unwraps)."""
    reason = compile_support(device)
    if reason is not None:
        say(f"model.compile: {reason}; training without it", highlight=False)
        return model
    return torch.compile(model)
