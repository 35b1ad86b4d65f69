"""A finished run leaves the toolkit: its model written as ONNX or TorchScript, with the class names,
the preprocessing and the run's config inside the file, then run from that file on the run's own
validation images and compared with the PyTorch model. A file that does not agree is an error.

What differs between tasks (the module written, its inputs, how its outputs are compared and how
close they must be, and reading the file's outputs back for `predict --model`) comes from the task
(tasks/base.py). ONNX goes through torch's TorchScript-based exporter (it needs no extra package and
carries torchvision's detection post-processing); TorchScript is a trace of the same module.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from transferkit.config import validate
from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write
from transferkit.outputs import output_folder
from transferkit.preprocessing import INTERPOLATIONS, Preprocessing
from transferkit.tasks import task_for
from transferkit.tasks.base import Agreement, ExportSpec, RunExported, Task, TrainedRun
from transferkit.training.checkpoint import names_outputs
from transferkit.training.rundir import run_config
from transferkit.yamlsafe import load_yaml

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
META_FILE = "transferkit.json"  # TorchScript keeps the metadata as one JSON file among its _extra_files
MISSING_ONNX = "ONNX needs onnx and onnxruntime: pip install 'transferkit[export]'"


@dataclass
class ExportResult:
    path: Path
    format: str
    agreement: Agreement
    seconds: float

    def summary(self) -> str:
        a = self.agreement
        what = "top-1" if a.compared == "logits" else "boxes"
        return (f"wrote {self.path} ({self.format}); checked on {a.inputs} validation images: max {a.compared} "
                f"difference {a.max_diff:.2e} (tolerance {a.tolerance:g}), {what} agree on {a.agreed}/{a.inputs}")


def file_metadata(run: TrainedRun, weights: str) -> dict[str, str]:
    """What every exported file says about itself, whatever its task (strings, as ONNX stores them)."""
    pre = run.preprocessing
    return {"producer": f"transferkit {version('transferkit')}", "task": run.cfg.task, "model": run.cfg.model.name,
            "weights": weights, "classes": json.dumps(run.classes), "mean": json.dumps(list(pre.mean)),
            "std": json.dumps(list(pre.std)), "interpolation": pre.interpolation, "crop_pct": str(pre.crop_pct),
            "config": run.cfg.to_yaml()}


def validation_inputs(task: Task, count: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Real inputs for the check: the first `count` images of the run's validation split."""
    try:
        built = task.build(need_train=False, restore=False)
    except TransferKitError as exc:
        raise TransferKitError(f"export checks the file on the run's validation images, which could not be read: "
                               f"{exc}") from None
    return task.export_inputs(built.data, count, batch)


def _outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple | list) else [value]


def _import_onnx():
    # Deferred on purpose: onnx and onnxruntime are the optional `export` extra.
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise TransferKitError(MISSING_ONNX) from None
    return onnx, onnxruntime


def write_onnx(spec: ExportSpec, example: tuple[torch.Tensor, ...], path: Path, opset: int,
               metadata: dict[str, str]) -> None:
    onnx, _ = _import_onnx()
    buffer = io.BytesIO()
    torch.onnx.export(spec.module, example, buffer, dynamo=False, opset_version=opset,
                      input_names=spec.input_names, output_names=spec.output_names,
                      dynamic_axes=spec.dynamic_axes or None)
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))


def onnx_session(path: str | Path):
    _, ort = _import_onnx()
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes for unreadable and invalid files
        raise TransferKitError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None


def onnx_runner(session) -> RunExported:
    names = [i.name for i in session.get_inputs()]

    def run(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]
    return run


def write_torchscript(spec: ExportSpec, example: tuple[torch.Tensor, ...], path: Path,
                      metadata: dict[str, str]) -> None:
    traced = torch.jit.trace(spec.module, example, check_trace=False)
    extra = {META_FILE: json.dumps(metadata)}
    atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files=extra))


def torchscript_runner(path: Path) -> RunExported:
    module = torch.jit.load(str(path), map_location="cpu")  # a file this export has just written
    return lambda inputs: _outputs(module(*inputs))


def default_out(run_dir: Path, weights: str, fmt: str) -> Path:
    name = weights if weights in ("best", "last") else Path(weights).stem
    return run_dir / "export" / f"{name}{FORMATS[fmt]}"


def export(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None, weights: str = "best",
           dynamic_batch: bool = False, opset: int = 17, check_images: int = 4, force: bool = False) -> ExportResult:
    """Write a finished run's model as ONNX or TorchScript (default RUN_DIR/export/best.onnx), then
    run the file on `check_images` validation images and compare it with the PyTorch model; a
    difference over the task's tolerance is a TransferKitError. A file there that transferkit did
    not write is replaced only with `force`.

        >>> result = export("runs/mine", format="onnx")  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
    """
    if format not in FORMATS:
        raise TransferKitError(f"--format {format!r}: give one of {', '.join(FORMATS)}")
    started, run_dir = time.perf_counter(), Path(run_dir)
    task = task_for(run_config(run_dir))
    run = task.load_run(run_dir, weights)
    spec = task.export_spec(run, dynamic_batch)
    # dynamic batches are checked at two batch sizes (3 and the rest), fixed ones image by image
    inputs = validation_inputs(task, check_images, 3 if dynamic_batch else 1)
    path = Path(out) if out else default_out(run_dir, weights, format)
    metadata = {**file_metadata(run, weights), **spec.metadata}
    with output_folder(path.parent, force) as folder, torch.no_grad(), warnings.catch_warnings():
        folder.claim([path])
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python, checked below instead
        if format == "onnx":
            write_onnx(spec, inputs[0], path, opset, metadata)
            run_exported = onnx_runner(onnx_session(path))
        else:
            write_torchscript(spec, inputs[0], path, metadata)
            run_exported = torchscript_runner(path)
        folder.wrote(path)
        expected = [_outputs(spec.module(*x)) for x in inputs]
        got = [run_exported(x) for x in inputs]
        agreement = task.compare_outputs(expected, got)
        if not agreement.ok:
            path.unlink(missing_ok=True)
            folder.forget(path)
    result = ExportResult(path, format, agreement, time.perf_counter() - started)
    if not agreement.ok:
        raise TransferKitError(f"{path} was removed: it does not agree with the PyTorch model ({result.summary()}); "
                               "try another --opset or --format torchscript")
    return result


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a file `export` wrote (ONNX metadata_props)."""
    return dict(onnx_session(path).get_modelmeta().custom_metadata_map)


def load_exported(path: str | Path) -> tuple[Task, TrainedRun]:
    """An exported ONNX file, ready for the task's `predict`: its outputs are read back into the
    form the PyTorch model gives, and its metadata gives the classes, preprocessing and config."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise TransferKitError(f"--model {path}: give an .onnx file written by `transferkit export` (a TorchScript "
                               "file is for torch.jit.load in your own code)")
    if not path.is_file():
        raise TransferKitError(f"--model {path}: file not found")
    session = onnx_session(path)
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in ("config", "classes", "mean", "std") if k not in meta]
    if missing:
        raise TransferKitError(f"{path} lacks transferkit metadata ({', '.join(missing)}); write it with "
                               "`transferkit export`")
    cfg = validate(load_yaml(meta["config"]), f"{path} (its config metadata)")  # bounded: the file may be anyone's
    task = task_for(cfg)
    shape: Sequence = session.get_inputs()[0].shape
    model = task.exported_model(onnx_runner(session), [d if isinstance(d, int) else None for d in shape])
    return task, TrainedRun(model, _exported_classes(meta, cfg.model.num_classes, path), cfg,
                            _exported_preprocessing(meta, path))


def _meta_json(meta: dict[str, str], key: str, path: Path) -> object:
    try:
        return json.loads(meta[key])
    except ValueError:
        raise TransferKitError(f"{path}: its metadata {key!r} is not JSON; write the file again with "
                               "`transferkit export`") from None


def _exported_classes(meta: dict[str, str], count: object, path: Path) -> list[str]:
    """The class names, one per class the config gives (the file may be anyone's: names that would
    label the outputs wrongly are refused)."""
    classes = _meta_json(meta, "classes", path)
    if not names_outputs(classes, count):
        raise TransferKitError(f"{path}: its metadata 'classes' is not a list of {count} class names (its config's "
                               "model.num_classes); write the file again with `transferkit export`")
    return classes


def _exported_preprocessing(meta: dict[str, str], path: Path) -> Preprocessing:
    """Mean and std as three numbers each (std above zero), crop_pct in [0.25, 1] (near zero, each image
    would be resized to an unbounded size before its centre crop), a resampling filter the transforms know."""
    mean, std = _meta_json(meta, "mean", path), _meta_json(meta, "std", path)
    for key, values in (("mean", mean), ("std", std)):
        if not (isinstance(values, list) and len(values) == 3 and all(_is_number(v) for v in values)
                and (key == "mean" or min(values) > 0)):
            raise TransferKitError(f"{path}: its metadata {key!r} is not three numbers{' above zero' * (key == 'std')} "
                                   "(one per RGB channel); write the file again with `transferkit export`")
    try:
        crop_pct = float(meta.get("crop_pct", "0.875"))
    except ValueError:
        crop_pct = float("nan")
    if not 0.25 <= crop_pct <= 1:
        raise TransferKitError(f"{path}: its metadata 'crop_pct' is {meta['crop_pct']!r}, not a number from 0.25 to 1; "
                               "write the file again with `transferkit export`")
    interpolation = meta.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:  # else the transforms would resample another way, silently
        raise TransferKitError(f"{path}: its metadata 'interpolation' is {interpolation!r}, not one of "
                               f"{', '.join(INTERPOLATIONS)}; write the file again with `transferkit export`")
    return Preprocessing(tuple(mean), tuple(std), interpolation, crop_pct)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
