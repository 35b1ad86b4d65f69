"""Where each tensor of a foreign checkpoint came from, and what was done to it on the way in.

Readers of other frameworks' files (Caffe, MXNet, ONNX, TFLite) record, for every tensor they
return, the source's own name, the layer it belongs to and that layer's type, the dtype it was
stored in and the conversion applied (a transposed layout, a dequantisation, a BatchNorm rescaled).
WeightFile.metadata holds strings only (it is what a safetensors file can carry), so the records
are JSON text under fixed keys:

- ``source_format``: the framework the file came from;
- ``layers``: ``[[name, type], ...]`` of the layers that hold tensors, in graph order;
- ``tensors``: ``{name: {"source", "layer", "type", "dtype", "converted"?, ...}}``;
- ``converted``: one line counting each conversion applied (``"none"`` when nothing was changed);
- ``inputs`` (where the reader knows the graph): ``{layer: [layer, ...]}``, for each layer that holds
  tensors, the layers holding tensors whose outputs reach its input, through any layers that hold
  none (activations, pooling, concatenation, an element-wise sum). With ``layers`` it gives the
  order the source runs its layers in and which of them may run in another order
  (`LayerGraph`, used by `weights/matching.py` to pair a source whose order parts from a model's).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import TransferKitError


class Origins:
    """Collects the per-tensor records of one file, in the order the tensors are returned."""

    def __init__(self, source_format: str) -> None:
        self.source_format = source_format
        self.layers: list[tuple[str, str]] = []
        self.tensors: dict[str, dict[str, str]] = {}
        self.conversions: Counter[str] = Counter()
        self.graph: dict[str, list[str]] = {}

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

    def inputs(self, layer: str, upstream: list[str]) -> None:
        """The layers holding tensors whose outputs `layer` reads (the reader resolves layers that hold none)."""
        self.graph[layer] = upstream

    def metadata(self, **extra: str) -> dict[str, str]:
        converted = "; ".join(f"{what}: {n}" for what, n in self.conversions.items()) or "none"
        graph = {"inputs": json.dumps(self.graph)} if self.graph else {}
        return {
            "source_format": self.source_format,
            "layers": json.dumps([list(pair) for pair in self.layers]),
            "tensors": json.dumps(self.tensors),
            "converted": converted,
            **graph,
            **extra,
        }


@dataclass(frozen=True)
class LayerGraph:
    """A source's layers read back from its record: which layer holds each tensor, each layer's type,
    the layers in the order the source runs them, and the layers each one reads from."""

    layer_of: dict[str, str]  # tensor name -> layer
    kinds: dict[str, str]  # layer -> its type (Convolution, CONV_2D, MUL, ...)
    order: list[str]  # the layers the reader wired (those holding tensors), as the source runs them
    inputs: dict[str, list[str]]  # layer -> the layers it reads from

    def readers(self, layer: str) -> list[str]:
        """The layers that read `layer`'s output, in the order the source runs them."""
        return [other for other in self.order if layer in self.inputs.get(other, ())]

    def tensors(self, layer: str) -> list[str]:
        """The tensors `layer` holds, in the file's order."""
        return [name for name, held_by in self.layer_of.items() if held_by == layer]


def layer_graph(metadata: Mapping[str, str]) -> LayerGraph | None:
    """The graph a reader recorded (``tensors``, ``layers``, ``inputs``), or None where it recorded none."""
    try:
        records = json.loads(metadata["tensors"])
        layers = json.loads(metadata["layers"])
        inputs = json.loads(metadata["inputs"])
        layer_of = {name: str(record["layer"]) for name, record in records.items()}
        kinds = {str(name): str(kind) for name, kind in layers}
        inputs = {str(k): [str(u) for u in v] for k, v in inputs.items()}
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):  # not recorded, or not as a reader does
        return None
    return LayerGraph(layer_of, kinds, [name for name in kinds if name in inputs], inputs)


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
