"""The public Python API, re-exported by `import transferkit`: a small, stable surface over the
modules that do the work, so that those modules can move without breaking users' code. Each
function says what it does and shows a short example.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from transferkit.config import Config
from transferkit.config import load_config as _load_config
from transferkit.deploy import ExportResult
from transferkit.deploy import export as _export
from transferkit.models.family import Family
from transferkit.prediction import predict as _predict
from transferkit.prediction import predict_exported
from transferkit.run import TrainResult
from transferkit.run import evaluate as _evaluate
from transferkit.run import train as _train
from transferkit.tasks import task_for
from transferkit.tasks.base import PredictOptions, TrainedRun
from transferkit.training.rundir import run_config
from transferkit.weights.transfer import TransferReport
from transferkit.weights.transfer import transfer as _transfer

__all__ = ["load_config", "train", "evaluate", "predict", "transfer", "create_model", "load_run", "export",
           "TransferReport", "TrainResult"]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """A validated run config: a YAML file (with its `_base_` files) and `key.sub=value` overrides,
    as `-o` takes them on the command line. `path=None` starts from the defaults.

        cfg = transferkit.load_config("configs/classification/hymenoptera_efficientnet_lite0.yaml",
                                      ["data.root=mydata", "schedule.epochs=3"])
    """
    return _load_config(path, list(overrides))


def train(cfg: Config, out: str | Path | None = None, quiet: bool = False,
          resume: str | Path | None = None) -> TrainResult:
    """Train as the config says and write the run directory (`out`, else the config's `out`, else
    runs/run-<time>); with `resume` (a run directory), continue that run exactly where it stopped.

        result = transferkit.train(cfg, out="runs/mine")
        print(result.best_metric, result.best_value, result.run_dir)
    """
    return _train(cfg, out=out, quiet=quiet, resume=resume)


def evaluate(cfg: Config, weights: str | Path | None = None) -> dict:
    """Metrics on the config's validation split (val_loss, val_acc, ...; val_map for detection):
    of the model as the config builds it before training, or of a trained checkpoint.

        metrics = transferkit.evaluate(cfg, weights="runs/mine/checkpoints/best.safetensors")
    """
    return _evaluate(cfg, weights)[0]


def predict(run: str | Path, images: Sequence[str | Path], weights: str = "best", topk: int = 1,
            score: float = 0.3) -> list[dict]:
    """One result per image (files or folders) with a finished run (a run directory) or an ONNX
    file written by `export`: the `topk` classes with probabilities, or the boxes scoring `score`
    or more. An image that cannot be decoded gets an `error` instead.

        for r in transferkit.prediction("runs/mine", ["photo.jpg"], topk=2):
            print(r["path"], r["predictions"])
    """
    options = PredictOptions(topk=topk, score=score)
    if Path(run).suffix == ".onnx":
        return predict_exported(run, list(images), options)[0]
    return _predict(run, list(images), weights, options)[0]


def transfer(model: nn.Module, source: str | Path, scope: str = "all-but-head", head_patterns: Sequence[str] = (),
             **options) -> TransferReport:
    """Restore any weights source (a file of any supported format, an archive, a URL, `package:NAME`,
    `torchvision:NAME`, a run directory) into any `nn.Module`, and report every tensor. `options`:
    exclude, include, rename, require, on_shape_mismatch, sha256, dry_run.

        model, family = transferkit.create_model("resnet18", num_classes=5)
        report = transferkit.transfer(model, "resnet18.pth", head_patterns=family.head_patterns)
        print(report.table())
    """
    return _transfer(model, source, scope=scope, head_patterns=head_patterns, **options)


def create_model(name: str = "tf_efficientnet_lite0", num_classes: int = 1000, task: str = "classification",
                 overrides: Sequence[str] = ()) -> tuple[nn.Module, Family]:
    """A randomly initialised model and its family (head patterns, preprocessing): a timm classifier,
    or for `task="detection"` a detector around that backbone (`overrides` such as
    `detection.arch=fcos` choose it).

        model, family = transferkit.create_model("tf_efficientnet_lite0", num_classes=2)
    """
    cfg = _load_config(None, ["data.root=.", f"task={task}", f"model.name={name}", *overrides])
    return task_for(cfg).create_model(num_classes)


def load_run(run_dir: str | Path, weights: str = "best") -> TrainedRun:
    """A finished run's trained model (in eval mode), its class names, config and preprocessing.

        run = transferkit.load_run("runs/mine")
        print(run.classes, run.preprocessing.mean)
    """
    return task_for(run_config(run_dir)).load_run(run_dir, weights)


def export(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None, weights: str = "best",
           dynamic_batch: bool = False, opset: int = 17, force: bool = False) -> ExportResult:
    """Write a run's model as ONNX or TorchScript (default RUN_DIR/export/best.onnx) with its class
    names and preprocessing as metadata, then check the file against PyTorch on validation images;
    a disagreement over tolerance raises TransferKitError. A file at `out` that transferkit did not
    write is replaced only with `force`.

        result = transferkit.export("runs/mine", format="onnx")
        print(result.summary())
    """
    return _export(run_dir, format, out, weights, dynamic_batch, opset, force=force)
