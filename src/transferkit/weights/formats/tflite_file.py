"""TensorFlow Lite ``.tflite`` flatbuffers: the constant tensors of the first subgraph, in PyTorch layout.

Read with the ``tflite`` package's generated flatbuffers accessors (the ``tflite`` extra); no
TensorFlow is needed. Every vector length and buffer range read from the file is checked against
the file's size before it is walked or copied.

Layouts follow the operator that uses a tensor: a CONV_2D filter is OHWI and becomes OIHW, a
DEPTHWISE_CONV_2D filter is 1HWO and becomes O1HW, a TRANSPOSE_CONV filter (OHWI) becomes PyTorch's
(in, out, H, W), a CONV_3D filter (DHWIO) becomes OIDHW; FULLY_CONNECTED weights are already
(out, in). A tensor that reaches its operator through a DEQUANTIZE (float16 or int8 weights) is
laid out for that operator. int8/uint8/int16/int32 tensors with a scale and zero point are
dequantized to float32 (per channel along their quantized dimension); an int8/uint8 weight
without them is refused. Integer constants with no scale (shapes, paddings, axes) are not weights
and are left out (counted in the metadata). Names are the tensor names as stored; each tensor's
layer is the operator that uses it (``op<index>``), and the metadata's ``inputs`` say which of
those operators each one reads from (origins.py).
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile, tensor_from_numpy
from transferkit.weights.formats.origins import Origins, check_fits

# TFLite TensorType -> NumPy dtype (BFLOAT16 handled apart, INT4/STRING/RESOURCE/VARIANT not weights).
DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8",
          10: "float64", 12: "uint64", 15: "uint32", 16: "uint16", 18: "bfloat16"}
QUANTIZED = {"int8", "uint8", "int16", "int32"}
# operator -> (input position of its weight, permutation to PyTorch layout, what it is)
WEIGHT_INPUT = {
    "CONV_2D": (1, (0, 3, 1, 2), "OHWI to OIHW"),
    "DEPTHWISE_CONV_2D": (1, (3, 0, 1, 2), "1HWO to O1HW"),
    "TRANSPOSE_CONV": (1, (3, 0, 1, 2), "OHWI to IOHW"),
    "CONV_3D": (1, (4, 3, 0, 1, 2), "DHWIO to OIDHW"),
    "FULLY_CONNECTED": (1, None, ""),
}


def sniff(path: Path, head: bytes) -> bool:
    return head[4:8] == b"TFL3"


def _tflite():
    try:  # deferred on purpose: an optional dependency (the `tflite` extra), needed only for these files
        import tflite
    except ImportError:
        raise TransferKitError("reading TFLite files needs the tflite package: "
                               "pip install 'transferkit[tflite]'") from None
    return tflite


def _length(n: int, size: int, path: Path, what: str) -> int:
    check_fits(path, n * 4, size, f"the {what} list ({n:,} entries)")  # every entry takes 4 bytes at least
    return n


def read(path: Path) -> WeightFile:
    tflite = _tflite()
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise TransferKitError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return _read(buf, path, tflite)
    except (IndexError, ValueError, TypeError, OverflowError, UnicodeDecodeError, struct.error) as exc:
        raise TransferKitError(f"{path}: truncated or damaged TFLite file ({type(exc).__name__}: {exc}); "
                               "re-export it") from None


def _read(buf: bytes, path: Path, tflite) -> WeightFile:
    size = len(buf)
    if size < 8 or buf[4:8] != b"TFL3":
        raise TransferKitError(f"{path}: not a TFLite file (no TFL3 identifier)")
    model = tflite.Model.GetRootAsModel(buf, 0)
    if _length(model.SubgraphsLength(), size, path, "subgraph") == 0:
        raise TransferKitError(f"{path}: the TFLite model has no subgraph")
    op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for i in range(_length(model.OperatorCodesLength(), size, path, "operator code")):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if code == 32:  # CUSTOM (a name in op_names too): named by its custom code
            codes.append(f"CUSTOM:{(oc.CustomCode() or b'').decode('utf-8', 'replace')}")
        else:
            codes.append(op_names.get(code, str(code)))
    graph = model.Subgraphs(0)
    n_tensors = _length(graph.TensorsLength(), size, path, "tensor")
    n_buffers = _length(model.BuffersLength(), size, path, "buffer")

    # Who uses each tensor, in execution order; DEQUANTIZE passes its input on to its output's user.
    uses: dict[int, list[tuple[int, str, int]]] = {}
    dequantized_to: dict[int, int] = {}
    wiring: list[tuple[list[int], list[int]]] = []  # each operator's input and output tensors
    for i in range(_length(graph.OperatorsLength(), size, path, "operator")):
        op = graph.Operators(i)
        if not 0 <= op.OpcodeIndex() < len(codes):
            raise TransferKitError(f"{path}: damaged TFLite file: operator {i} has opcode index {op.OpcodeIndex()}")
        kind = codes[op.OpcodeIndex()]
        inputs = [int(t) for t in op.InputsAsNumpy()] if op.InputsLength() else []
        wiring.append((inputs, [int(t) for t in op.OutputsAsNumpy()] if op.OutputsLength() else []))
        if kind == "DEQUANTIZE" and inputs and op.OutputsLength():
            dequantized_to[inputs[0]] = int(op.Outputs(0))
        for pos, t in enumerate(inputs):
            uses.setdefault(t, []).append((i, kind, pos))

    def weight_use(t: int) -> tuple[int, str, int] | None:
        for target in (t, dequantized_to.get(t)):
            for use in uses.get(target, []) if target is not None else []:
                if use[1] in WEIGHT_INPUT:
                    return use
        return None

    def first_use(t: int) -> tuple[int, int]:
        use = weight_use(t) or min(uses.get(t, []), default=None)
        return (use[0], use[2]) if use else (1 << 40, t)

    order = sorted(range(n_tensors), key=first_use)
    origins = Origins("tflite")
    tensors: dict[str, torch.Tensor] = {}
    left_out: Counter[str] = Counter()
    for t in order:
        tensor = graph.Tensors(t)
        b = tensor.Buffer()
        if not 0 <= b < n_buffers:
            raise TransferKitError(f"{path}: damaged TFLite file: tensor {t} points to buffer {b} of {n_buffers}")
        raw = _buffer_bytes(model.Buffers(b), buf, path, t)
        if raw is None:
            continue  # an activation, not a constant
        name = tensor.Name().decode("utf-8", "replace") or f"tensor_{t}"
        if tensor.Sparsity() is not None:
            raise TransferKitError(f"{path}: tensor {name!r} is stored sparse; densify the model before reading it")
        dtype = DTYPES.get(tensor.Type())
        if dtype is None:
            left_out[f"type {tensor.Type()}"] += 1
            continue
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        count = int(np.prod(shape, dtype=object))
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if any(d < 0 for d in shape) or count * itemsize != len(raw):
            raise TransferKitError(f"{path}: damaged TFLite file: tensor {name!r} of shape {list(shape)} {dtype} "
                                   f"has {len(raw):,} bytes of data")
        use = weight_use(t)
        quant = tensor.Quantization()
        scales = quant.ScaleAsNumpy() if quant is not None and quant.ScaleLength() else None
        if dtype in QUANTIZED and scales is None:
            if use is not None and dtype in ("int8", "uint8"):
                raise TransferKitError(f"{path}: tensor {name!r} is {dtype} without a scale and zero point, so it "
                                       "cannot be dequantized; export the model with float weights")
            left_out["integer constants (shapes, paddings, axes)"] += 1
            continue
        if dtype == "bfloat16":
            arr = torch.from_numpy(np.frombuffer(raw, np.int16).copy()).view(torch.bfloat16).float().numpy()
        else:
            arr = np.frombuffer(raw, dtype).copy()
        arr = arr.reshape(shape)
        notes = []
        if scales is not None and dtype in QUANTIZED:
            arr = _dequantize(arr, quant, scales, path, name)
            notes.append(f"{dtype} dequantized" + (" per channel" if scales.size > 1 else ""))
        elif dtype in ("float16", "bfloat16"):
            arr = arr.astype(np.float32)
            notes.append(f"{dtype} to float32")
        kind, layer, pos = "", "", -1
        if use is not None:
            op_index, kind, pos = use
            wpos, perm, what = WEIGHT_INPUT[kind]
            if pos == wpos and perm is not None and arr.ndim == len(perm):
                arr = arr.transpose(perm)
                notes.append(what)
        elif uses.get(t):
            op_index, kind, pos = uses[t][0]
        if kind:
            layer = f"op{op_index}"
        unique = name if name not in tensors else f"{name}#{t}"
        tensors[unique] = tensor_from_numpy(arr)
        origins.tensor(unique, name, layer, kind or "unused", dtype, ", ".join(notes), tensor_index=str(t),
                       input=str(pos))
    if not tensors:
        raise TransferKitError(f"{path}: the TFLite model holds no weight tensors")
    _record_inputs(wiring, origins)
    extra = {"left_out": "; ".join(f"{n} {what}" for what, n in left_out.items())} if left_out else {}
    return WeightFile(tensors, "tflite", path, origins.metadata(version=str(model.Version()), **extra))


def _record_inputs(wiring: list[tuple[list[int], list[int]]], origins: Origins) -> None:
    """Which operators holding tensors each such operator reads from, following tensors from operator
    to operator in execution order (operators without tensors of their own pass their inputs on)."""
    held = {record["layer"] for record in origins.tensors.values()}
    carried: dict[int, list[str]] = {}  # tensor index -> the operators holding tensors whose outputs it carries
    for i, (inputs, outputs) in enumerate(wiring):
        upstream = list(dict.fromkeys(u for t in inputs for u in carried.get(t, [])))
        if f"op{i}" in held:
            origins.inputs(f"op{i}", upstream)
            upstream = [f"op{i}"]
        for t in outputs:
            carried[t] = upstream


def _buffer_bytes(buffer, buf: bytes, path: Path, t: int) -> bytes | None:
    """A buffer's bytes: inline in the flatbuffer, or (models over 2 GB) at an offset after it."""
    if buffer.DataLength():
        data = buffer.DataAsNumpy()
        if data.size != buffer.DataLength():
            raise TransferKitError(f"{path}: damaged TFLite file: the buffer of tensor {t} runs past the end")
        return data.tobytes()
    offset, length = buffer.Offset(), buffer.Size()
    if offset > 1 and length:
        check_fits(path, offset + length, len(buf), f"the buffer of tensor {t}")
        return buf[offset:offset + length]
    return None


def _dequantize(arr: np.ndarray, quant, scales: np.ndarray, path: Path, name: str) -> np.ndarray:
    zeros = quant.ZeroPointAsNumpy() if quant.ZeroPointLength() else np.zeros(1, np.int64)
    axis = quant.QuantizedDimension()
    if scales.size > 1 or zeros.size > 1:
        if not 0 <= axis < arr.ndim or scales.size != arr.shape[axis] or zeros.size not in (1, scales.size):
            raise TransferKitError(f"{path}: tensor {name!r} has {scales.size} scales for shape {list(arr.shape)} "
                                   f"along dimension {axis}; the file is damaged, re-export it")
        view = [1] * arr.ndim
        view[axis] = -1
        scales, zeros = scales.reshape(view), zeros.reshape(view if zeros.size > 1 else [1] * arr.ndim)
    return ((arr.astype(np.float64) - zeros) * scales).astype(np.float32)
