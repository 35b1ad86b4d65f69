"""Readers: one per file format, each returning a WeightFile (ordered name -> tensor, metadata).

A reader is a function `read(path) -> WeightFile` registered with a sniffing test, so readers for
other frameworks plug in beside these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transferkit.errors import TransferKitError


@dataclass
class WeightFile:
    tensors: dict[str, torch.Tensor]  # ordered as stored in the file
    format: str
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


Reader = Callable[[Path], WeightFile]
Sniffer = Callable[[Path, bytes], bool]
_READERS: list[tuple[str, Sniffer, Reader]] = []


def register(name: str, sniff: Sniffer, read: Reader) -> None:
    _READERS.append((name, sniff, read))


def read_weights(path: str | Path) -> WeightFile:
    path = Path(path)
    try:
        head = b""  # a directory (a TensorFlow SavedModel) is sniffed by its contents
        if not path.is_dir():
            with open(path, "rb") as fh:
                head = fh.read(64)
    except OSError as exc:
        raise TransferKitError(f"cannot read weights file {path}: {exc.strerror}") from None
    for _name, sniff, read in _READERS:
        if sniff(path, head):
            return read(path)
    raise TransferKitError(
        f"{path}: not a weights file in a supported format "
        f"({', '.join(n for n, _, _ in _READERS)}); convert it or give another file"
    )


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

register("tflite", tflite_file.sniff, tflite_file.read)
register("mxnet", mxnet_file.sniff, mxnet_file.read)
register("safetensors", safetensors_file.sniff, safetensors_file.read)
register("npz", npz_file.sniff, npz_file.read)
register("keras-h5", keras_h5.sniff, keras_h5.read)
register("tensorflow", tf_checkpoint.sniff, tf_checkpoint.read)
register("paddle", paddle_file.sniff, paddle_file.read)
register("pytorch", torch_file.sniff, torch_file.read)
register("onnx", onnx_file.sniff, onnx_file.read)
register("caffe", caffe_file.sniff, caffe_file.read)
