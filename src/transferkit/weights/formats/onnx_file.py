"""ONNX models: the graph's initializers, through the ``onnx`` package (the ``onnx`` extra).

Names are kept as stored (PyTorch's exporter writes the state_dict names, unless it folded a
BatchNorm into a convolution, in which case the folded tensors get names like ``onnx::Conv_123``);
each tensor's record names the first node that uses it and that node's operator, which is what
tells a folded convolution from a plain one. Tensors follow the order the graph first uses them,
and initializers no node uses come last. External data is read only from files inside the model's
own folder, and only after its declared offset and length are checked against the file's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import DecodeError

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile
from transferkit.weights.formats.origins import Origins, check_fits, text

# A ModelProto starts with ir_version (field 1, varint) followed by one of its other fields.
_NEXT_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x4A, 0x52, 0x72, 0x7A}
SUB_BYTE = {21, 22, 23}  # UINT4, INT4, FLOAT4E2M1: two values a byte


def sniff(path: Path, head: bytes) -> bool:
    # By content only (the .onnx suffix is the registry's fallback): ir_version, then a known field.
    return len(head) > 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _NEXT_TAGS


def _onnx():
    try:  # deferred on purpose: an optional dependency (the `onnx` extra), needed only for these files
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise TransferKitError("reading ONNX files needs the onnx package: pip install 'transferkit[onnx]'") from None
    return onnx, numpy_helper


def _load_external(tensor, path: Path, onnx, need: int) -> None:
    """Read an initializer's external data (`need` bytes) into it, from inside the model's folder only."""
    info = {text(e.key): text(e.value) for e in tensor.external_data}
    location = info.get("location", "")
    base = path.parent.resolve()
    target = (base / location).resolve()
    if not location or Path(location).is_absolute() or not target.is_relative_to(base) or not target.is_file():
        raise TransferKitError(f"{path}: initializer {tensor.name!r} points to external data {location!r}, which "
                               "is not a file inside the model's folder; put the data file beside the model")
    try:  # a negative offset would make the seek below fail
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
        if offset < 0:
            raise ValueError(offset)
    except ValueError:
        raise TransferKitError(f"{path}: initializer {tensor.name!r} has a malformed external data offset "
                               "or length") from None
    if length is not None and length != need:
        raise TransferKitError(f"{path}: initializer {tensor.name!r} declares {length:,} bytes of external "
                               f"data for shape {list(tensor.dims)} ({need:,} bytes)")
    size = target.stat().st_size
    check_fits(path, need, max(size - offset, 0), f"initializer {tensor.name!r} in {location} at offset {offset}")
    with open(target, "rb") as fh:
        fh.seek(offset)
        tensor.raw_data = fh.read(need)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def _array(tensor, path: Path, onnx, numpy_helper) -> np.ndarray:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError):
        raise TransferKitError(f"{path}: initializer {tensor.name!r} has unknown data type "
                               f"{tensor.data_type}") from None
    count = int(np.prod(tensor.dims, dtype=object))
    nbytes = (count + 1) // 2 if tensor.data_type in SUB_BYTE else count * dtype.itemsize  # 4-bit: two a byte
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        _load_external(tensor, path, onnx, nbytes)
    if tensor.HasField("raw_data") and tensor.data_type not in SUB_BYTE:
        if len(tensor.raw_data) != nbytes:
            raise TransferKitError(f"{path}: initializer {tensor.name!r} holds {len(tensor.raw_data):,} bytes for "
                                   f"shape {list(tensor.dims)}; the file is damaged, re-export it")
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as exc:
        raise TransferKitError(f"{path}: initializer {tensor.name!r} cannot be read ({exc}); the file is "
                               "damaged, re-export it") from None


def read(path: Path) -> WeightFile:
    onnx, numpy_helper = _onnx()
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TransferKitError(f"{path}: truncated or damaged ONNX file ({first}); re-export it") from None
    except OSError as exc:
        raise TransferKitError(f"{path}: cannot read ({exc.strerror})") from None
    graph = model.graph
    if graph.sparse_initializer:
        raise TransferKitError(f"{path}: sparse initializer {graph.sparse_initializer[0].values.name!r} is not "
                               "read; export the model with dense weights")
    inits = {}
    for tensor in graph.initializer:
        name = text(tensor.name)
        if name in inits:
            raise TransferKitError(f"{path}: the initializer name {name!r} appears twice")
        inits[name] = tensor
    if not inits:
        raise TransferKitError(f"{path}: the ONNX graph has no initializers (no stored weights)")
    user: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(graph.node):
        for name in map(text, node.input):
            if name in inits and name not in user:
                op_type = text(node.op_type)
                user[name] = (text(node.name) or f"{op_type}_{i}", op_type)
    order = list(user) + [name for name in inits if name not in user]

    origins = Origins("onnx")
    tensors: dict[str, torch.Tensor] = {}
    skipped = []
    for name in order:
        arr = _array(inits[name], path, onnx, numpy_helper)
        stored_dtype = onnx.helper.tensor_dtype_to_string(inits[name].data_type).removeprefix("TensorProto.")
        converted = ""
        if arr.dtype.kind in "OSU":
            skipped.append(name)  # string tensors are not weights
            continue
        try:
            tensor = torch.from_numpy(np.array(arr))
        except TypeError:  # bfloat16, float8, int4 come as ml_dtypes arrays torch cannot take directly
            tensor, converted = torch.from_numpy(arr.astype(np.float32)), f"{stored_dtype} to float32"
        layer, kind = user.get(name, ("", "unused"))
        tensors[name] = tensor
        origins.tensor(name, name, layer, kind, stored_dtype, converted)
    extra = {"opset": ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import),
             "producer": f"{model.producer_name} {model.producer_version}".strip()}
    if skipped:
        extra["skipped"] = ", ".join(skipped)
    return WeightFile(tensors, "onnx", path, origins.metadata(**extra))
