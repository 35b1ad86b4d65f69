"""The task seam: what every task (classification, detection) gives the run, `eval`, `predict`
and the command line, and nothing more.

A task is chosen once, from the config (`task_for` in tasks/__init__.py); after that no code asks
which task it is. What differs between tasks lives behind these methods:

    build        data and model as the config builds them (pretrained restore, new head initialised)
    loaders      the training loader (one rank's share under torchrun) and the validation loader
    loss         a batch -> (loss, batch size)
    evaluate     a validation loader -> metrics (accuracy, or COCO mAP)
    create_model the architecture alone (`model params`, loading a finished run)
    load_run     a finished run's trained model, for predict
    predict      images -> one result per image; `describe` prints a result as one line
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.config import Config
from transferkit.models.family import Family
from transferkit.preprocessing import Preprocessing
from transferkit.weights.transfer import TransferReport

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]


@dataclass
class Built:
    """A task's data and model before the first step. `data` has classes, train, val (the splits,
    each with `bad`: undecodable images left out), train_set and val_set."""

    model: nn.Module
    family: Family
    report: TransferReport | None  # None: no pretrained source, or a resume (weights come from the state)
    data: Any
    channels_last: bool = False

    @property
    def classes(self) -> list[str]:
        return self.data.classes


@dataclass
class TrainedRun:
    """A finished run's model, ready to predict: in eval mode, with the run's class names and config."""

    model: nn.Module
    classes: list[str]
    cfg: Config
    preprocessing: Preprocessing


@dataclass
class PredictOptions:
    topk: int = 1  # classification: the classes shown per image
    score: float = 0.3  # detection: the lowest score shown
    draw_dir: Path | None = None  # detection: where the images with their boxes are written


class Task(Protocol):
    name: str
    cfg: Config

    def build(self, need_train: bool = True, restore: bool = True) -> Built: ...

    def loaders(self, data: Any, shard: tuple[int, int] | None = None) -> tuple[DataLoader | None, DataLoader]:
        """The training loader (with `shard` = (rank, world): this process's part of it) and the
        validation loader (whole: rank 0 evaluates it alone)."""
        ...

    def loss(self, device: torch.device) -> LossFn: ...

    def evaluate(self, model: nn.Module, data: Any, loader: DataLoader, device: torch.device,
                 results_path: str | Path | None = None) -> dict: ...

    def create_model(self, num_classes: int, name: str | None = None) -> tuple[nn.Module, Family]: ...

    def load_run(self, run_dir: str | Path, weights: str = "best") -> TrainedRun: ...

    def predict(self, run: TrainedRun, paths: list[Path], options: PredictOptions) -> list[dict]: ...

    def describe(self, result: dict) -> str: ...
