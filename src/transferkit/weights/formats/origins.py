"""Where each tensor of a foreign checkpoint came from, and what was done to it on the way in.

Readers of other frameworks' files (Caffe, MXNet, ONNX, TFLite) record, for every tensor they
return, the source's own name, the layer it belongs to and that layer's type, the dtype it was
stored in and the conversion applied (a transposed layout, a dequantisation, a BatchNorm rescaled).
WeightFile.metadata holds strings only (it is what a safetensors file can carry), so the records
are JSON text under fixed keys:

- ``source_format``: the framework the file came from;
- ``layers``: ``[[name, type], ...]`` of the layers that hold tensors, in graph order;
- ``tensors``: ``{name: {"source", "layer", "type", "dtype", "converted"?, ...}}``;
- ``converted``: one line counting each conversion applied (``"none"`` when nothing was changed).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transferkit.errors import TransferKitError


class Origins:
    """Collects the per-tensor records of one file, in the order the tensors are returned."""

    def __init__(self, source_format: str) -> None:
        self.source_format = source_format
        self.layers: list[tuple[str, str]] = []
        self.tensors: dict[str, dict[str, str]] = {}
        self.conversions: Counter[str] = Counter()

    def layer(self, name: str, kind: str) -> None:
        if (name, kind) not in self.layers:
            self.layers.append((name, kind))

    def tensor(self, name: str, source: str, layer: str, kind: str, dtype: str, converted: str = "",
               **extra: str) -> None:
        self.layer(layer, kind)
        record = {"source": source, "layer": layer, "type": kind, "dtype": dtype}
        if converted:
            record["converted"] = converted
            self.conversions[converted] += 1
        record.update(extra)
        self.tensors[name] = record

    def metadata(self, **extra: str) -> dict[str, str]:
        converted = "; ".join(f"{what}: {n}" for what, n in self.conversions.items()) or "none"
        return {
            "source_format": self.source_format,
            "layers": json.dumps([list(pair) for pair in self.layers]),
            "tensors": json.dumps(self.tensors),
            "converted": converted,
            **extra,
        }


def text(value: str | bytes) -> str:
    """A protobuf string field whose bytes are not UTF-8 comes back as bytes: shown with replacements."""
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")


def check_fits(path: Path, need: int, available: int, what: str) -> None:
    """Stop before allocating when a size read from the file asks for more bytes than it holds."""
    if need < 0 or need > available:
        raise TransferKitError(
            f"{path}: damaged or truncated file: {what} declares {need:,} bytes but only {available:,} remain; "
            "re-download or re-export it"
        )
