"""Predictions from a finished run on image files or folders, whatever its task."""

from __future__ import annotations

from pathlib import Path

from transferkit.data.images import image_files
from transferkit.deploy import load_exported
from transferkit.errors import TransferKitError
from transferkit.tasks import task_for
from transferkit.tasks.base import PredictOptions, Task
from transferkit.training.rundir import run_config


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += image_files(p)
        elif p.exists():
            paths.append(p)
        else:
            raise TransferKitError(f"not found: {p} (give image files or folders)")
    if not paths:
        raise TransferKitError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def predict(run_dir: str | Path, inputs: list[str | Path], weights: str = "best",
            options: PredictOptions | None = None) -> tuple[list[dict], Task]:
    """One result per image (classes with probabilities, or boxes), with the run's task, which can
    `describe` each result as one line. Unreadable images get an `error` instead."""
    task = task_for(run_config(run_dir))
    run = task.load_run(run_dir, weights)
    return task.predict(run, expand_inputs(inputs), options or PredictOptions()), task


def predict_exported(model_path: str | Path, inputs: list[str | Path], options: PredictOptions | None = None
                     ) -> tuple[list[dict], Task]:
    """As `predict`, with an ONNX file written by `export` (run by onnxruntime) instead of a run."""
    task, run = load_exported(model_path)
    return task.predict(run, expand_inputs(inputs), options or PredictOptions()), task
