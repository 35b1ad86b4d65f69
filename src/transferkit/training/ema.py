"""An exponential moving average of a model's weights: timm's ModelEmaV3, with the count of its
updates (the warm-up's decay depends on it), both carried in the training state for exact resumes."""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from transferkit.config import EmaConfig
from transferkit.training.checkpoint import unwrap


class WeightAverage:
    """The EMA of `model`'s parameters and buffers, updated after every optimiser step."""

    def __init__(self, model: nn.Module, cfg: EmaConfig):
        # Built from the plain module (not a compile or DDP wrapper), so its names are the model's own.
        self.ema = ModelEmaV3(unwrap(model), decay=cfg.decay, use_warmup=cfg.warmup)
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, model: nn.Module) -> None:
        self.updates += 1
        self.ema.update(unwrap(model), step=self.updates)

    def state_dict(self) -> dict:
        weights = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return {"weights": weights, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
