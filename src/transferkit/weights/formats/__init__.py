"""Readers: one per file format, each returning a WeightFile (ordered name -> tensor, metadata).

A reader is a function `read(path) -> WeightFile` registered with a content test and the file-name
suffixes it usually has, so readers for other frameworks plug in beside these. The format is decided
by content first (magic bytes, a zip's member names), and by suffix only when no content test
recognises the file: a `.pth` that is really a tar is an archive, an `.npz` saved under another name
is still an array archive.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transferkit.errors import TransferKitError
from transferkit.weights.archives import archive_kind


@dataclass
class WeightFile:
    tensors: dict[str, torch.Tensor]  # ordered as stored in the file
    format: str
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # as torch names it, without `torch.`: float32, int64, ...


def contiguous_array(array: np.ndarray) -> np.ndarray:
    """The array C-contiguous, in its own shape. `np.ascontiguousarray` alone turns a 0-d array
    (a step counter, BatchNorm's num_batches_tracked) into shape (1,), which no longer fits the
    model's 0-d tensor."""
    return np.ascontiguousarray(array).reshape(np.shape(array))


def tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor of the array's own shape, contiguous (contiguous_array)."""
    return torch.from_numpy(contiguous_array(array))


Reader = Callable[[Path], WeightFile]
Describer = Callable[[Path], list[TensorInfo]]
Sniffer = Callable[[Path, bytes], bool]  # (path, first HEAD_BYTES bytes) -> is it this format, by content
_READERS: list[tuple[str, Sniffer, Reader, tuple[str, ...]]] = []
_DESCRIBERS: dict[str, Describer] = {}
HEAD_BYTES = 512


def register(name: str, sniff: Sniffer, read: Reader, suffixes: tuple[str, ...] = (),
             describe: Describer | None = None) -> None:
    """`describe`, where a format has one, lists names, shapes and dtypes from the file's headers alone."""
    _READERS.append((name, sniff, read, suffixes))
    if describe is not None:
        _DESCRIBERS[name] = describe


def zip_names(path: Path, head: bytes) -> list[str]:
    """Member names of a zip file (its central directory only), or [] for anything else."""
    if not head.startswith(b"PK\x03\x04"):
        return []
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()[:10_000]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return []


def detect_format(path: Path) -> str | None:
    """The registered format of `path` by content, else by suffix; None when neither tells."""
    head = b""  # a directory (a TensorFlow SavedModel or variables/ folder) is told by what it holds
    if not path.is_dir():
        try:
            with open(path, "rb") as fh:
                head = fh.read(HEAD_BYTES)
        except OSError as exc:
            raise TransferKitError(f"cannot read weights file {path}: {exc.strerror}") from None
    if head and archive_kind(path, head):
        raise TransferKitError(f"{path}: a tar or zip archive, not a weights file; give it as the source "
                               "(archives are unpacked) or name the file inside with SOURCE#path/inside")
    for name, sniff, _read, _suffixes in _READERS:
        if sniff(path, head):
            return name
    for name, _sniff, _read, suffixes in _READERS:
        if path.suffix.lower() in suffixes:
            return name
    return None


def _unsupported(path: Path) -> TransferKitError:
    return TransferKitError(
        f"{path}: not a weights file in a supported format "
        f"({', '.join(r[0] for r in _READERS)}); convert it or give another file"
    )


def read_weights(path: str | Path) -> WeightFile:
    path = Path(path)
    name = detect_format(path)
    for reader_name, _sniff, read, _suffixes in _READERS:
        if reader_name == name:
            return read(path)
    raise _unsupported(path)


def describe_weights(path: str | Path) -> tuple[str, list[TensorInfo], dict[str, str]]:
    """(format, tensors, metadata) without loading tensor data where the format allows (npz, safetensors):
    what `weights inspect` prints, at the cost of the headers."""
    path = Path(path)
    name = detect_format(path)
    if name in _DESCRIBERS:
        return name, _DESCRIBERS[name](path), {}
    if name is None:
        raise _unsupported(path)
    wf = read_weights(path)
    infos = [TensorInfo(k, tuple(t.shape), str(t.dtype).replace("torch.", "")) for k, t in wf.tensors.items()]
    return wf.format, infos, wf.metadata


from transferkit.weights.formats import (  # noqa: E402
    caffe_file,
    keras_h5,
    mxnet_file,
    npz_file,
    onnx_file,
    paddle_file,
    safetensors_file,
    tf_checkpoint,
    tflite_file,
    torch_file,
)

# Content tests run in this order: fixed magic numbers first, the loosest heuristics (protobuf field
# tags of ONNX and Caffe) last.
register("safetensors", safetensors_file.sniff, safetensors_file.read, (".safetensors",))
register("npz", npz_file.sniff, npz_file.read, (".npz", ".npy"), npz_file.describe)
register("pytorch", torch_file.sniff, torch_file.read, (".pth", ".pt", ".bin", ".ckpt"))
register("tflite", tflite_file.sniff, tflite_file.read, (".tflite",))
register("mxnet", mxnet_file.sniff, mxnet_file.read, (".params",))
register("keras-h5", keras_h5.sniff, keras_h5.read, (".h5", ".hdf5"))
register("tensorflow", tf_checkpoint.sniff, tf_checkpoint.read, (".index",))
register("paddle", paddle_file.sniff, paddle_file.read, (".pdparams", ".pdopt"))
register("onnx", onnx_file.sniff, onnx_file.read, (".onnx",))
register("caffe", caffe_file.sniff, caffe_file.read, (".caffemodel",))
