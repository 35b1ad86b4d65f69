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
    board_images validation images drawn for TensorBoard (detection: the predicted boxes)
    export_spec, export_inputs, compare_outputs, exported_model
                 leaving the toolkit (export.py): the module to write, real inputs to check it
                 on, how close its outputs must be, and the file's outputs back in the shape
                 `predict` reads
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    model: nn.Module  # or, read from an exported file, a callable giving the same outputs
    classes: list[str]
    cfg: Config
    preprocessing: Preprocessing


@dataclass
class PredictOptions:
    topk: int = 1  # classification: the classes shown per image
    score: float = 0.3  # detection: the lowest score shown
    draw_dir: Path | None = None  # detection: where the images with their boxes are written
    force: bool = False  # detection: replace files in draw_dir that transferkit did not write


@dataclass
class ExportSpec:
    """What a task writes to a deployment file: the module to trace, the names of its inputs and
    outputs, their dynamic axes, and the metadata the file carries (all strings)."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    metadata: dict[str, str]


@dataclass
class Agreement:
    """How an exported model's outputs compare with the PyTorch model's on the same inputs."""

    compared: str  # what max_diff measures: "logits", "box corners (px)"
    max_diff: float
    tolerance: float
    agreed: int  # inputs whose top-1 (or set of boxes) is the same
    inputs: int

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance and self.agreed == self.inputs


Outputs = Sequence[torch.Tensor]  # a traced module's outputs, in ExportSpec.output_names order
RunExported = Callable[[tuple[torch.Tensor, ...]], list[torch.Tensor]]  # an exported file, run on inputs


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

    def board_images(self, model: nn.Module, data: Any, device: torch.device, count: int) -> list[torch.Tensor]: ...

    def export_spec(self, run: TrainedRun, dynamic_batch: bool) -> ExportSpec: ...

    def export_inputs(self, data: Any, count: int, batch: int) -> list[tuple[torch.Tensor, ...]]: ...

    def compare_outputs(self, expected: list[Outputs], got: list[Outputs]) -> Agreement: ...

    def exported_model(self, run_exported: RunExported, input_shape: list[int | None]) -> Callable: ...
