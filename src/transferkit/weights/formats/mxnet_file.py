"""MXNet / Gluon ``.params`` files (the NDArray-list binary format), read with NumPy, no MXNet needed.

Written by hand because no maintained library reads this format without installing MXNet itself.
The layout (MXNet's src/ndarray/ndarray.cc, little-endian): a uint64 list magic 0x112, a reserved
uint64, a uint64 array count, the arrays, then a uint64 name count and (uint64 length, UTF-8 bytes)
per name. An array starts with a uint32 magic: V2/V3 (0xF993FAC9/A) carry a storage type, V1
(0xF993FAC8) does not, and anything else is a V0 array whose magic is its dimension count (then
uint32 dimensions rather than int64). Sparse arrays are skipped over and refused by name.

Names: symbolic checkpoints prefix ``arg:`` and ``aux:`` (stripped; the role is kept in the
metadata). Tensors are returned under PyTorch-style names where the suffix says what they are
(``mobilenet0_conv0_weight`` -> ``mobilenet0_conv0.weight``, ``_gamma``/``_beta`` -> ``.weight``/``.bias``,
``_moving_mean``/``_running_mean`` -> ``.running_mean``, likewise the variance), so that a
BatchNorm reads as one PyTorch BatchNorm; the name as stored is the ``source`` of each tensor's
record. With the ``-symbol.json`` beside the file, tensors follow the graph's order (weight, bias,
gamma, beta, mean, variance per layer), each tagged with its operator, and a BatchNorm with
``fix_gamma`` (MXNet ignores its stored gamma) gets weight 1.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile
from transferkit.weights.formats.origins import Origins, check_fits

LIST_MAGIC = struct.pack("<Q", 0x112)
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
MAX_NDIM = 32
# mshadow type flags; 12 is bfloat16, read as raw 16-bit words and reinterpreted by torch.
DTYPES = {0: "float32", 1: "float64", 2: "float16", 3: "uint8", 4: "int32", 5: "int8", 6: "int64", 7: "bool",
          8: "int16", 9: "uint16", 10: "uint32", 11: "uint64", 12: "bfloat16"}
SPARSE = {1: ("row_sparse", 1), 2: ("csr", 2)}  # storage type -> (name, auxiliary arrays)
SUFFIXES = (("_running_mean", ".running_mean"), ("_running_var", ".running_var"),
            ("_moving_mean", ".running_mean"), ("_moving_var", ".running_var"),
            ("_weight", ".weight"), ("_bias", ".bias"), ("_gamma", ".weight"), ("_beta", ".bias"))
BN_EPS_DEFAULT = 1e-3  # mx.sym.BatchNorm's default


def sniff(path: Path, head: bytes) -> bool:
    return head.startswith(LIST_MAGIC)


@dataclass
class _Array:
    offset: int
    shape: tuple[int, ...]
    dtype: str
    sparse: str = ""


class _Cursor:
    def __init__(self, buf, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> int:
        check_fits(self.path, n, len(self.buf) - self.pos, what)
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)

    def shape(self, what: str, legacy_ndim: int | None = None) -> tuple[int, ...] | None:
        ndim = legacy_ndim if legacy_ndim is not None else self.unpack("<i", what)[0]
        if ndim == -1:
            return None  # V3: unknown shape
        if not 0 <= ndim <= MAX_NDIM:
            raise TransferKitError(f"{self.path}: damaged .params file: {what} has {ndim} dimensions at byte "
                                   f"{self.pos}; re-download or re-save it")
        dims = self.unpack(f"<{ndim}{'I' if legacy_ndim is not None else 'q'}", what)
        if any(d < 0 for d in dims):
            raise TransferKitError(f"{self.path}: damaged .params file: {what} has shape {list(dims)}")
        return tuple(dims)

    def array(self, i: int) -> _Array | None:
        what = f"array {i}"
        (magic,) = self.unpack("<I", what)
        sparse, n_aux, storage = "", 0, None
        if magic in (V2_MAGIC, V3_MAGIC):
            (stype,) = self.unpack("<i", what)
            if stype in SPARSE:
                sparse, n_aux = SPARSE[stype]
                storage = self.shape(what)
            elif stype != 0:
                raise TransferKitError(f"{self.path}: damaged .params file: {what} has storage type {stype}")
            shape = self.shape(what)
        elif magic == V1_MAGIC:
            shape = self.shape(what)
        elif magic <= MAX_NDIM:  # V0: the magic is the dimension count
            shape = self.shape(what, legacy_ndim=magic)
        else:
            raise TransferKitError(f"{self.path}: damaged .params file: {what} has an unknown header "
                                   f"({magic:#x}); re-download or re-save it")
        if shape is None or (magic != V3_MAGIC and shape == ()):
            return None  # an empty NDArray: nothing more is stored
        self.unpack("<ii", what)  # device type and id
        (flag,) = self.unpack("<i", what)
        if flag not in DTYPES:
            raise TransferKitError(f"{self.path}: damaged .params file: {what} has unknown type flag {flag}")
        aux = [(self.unpack("<i", what)[0], self.shape(what)) for _ in range(n_aux)]
        count = int(np.prod(storage if sparse else shape, dtype=object))
        offset = self.take(count * _itemsize(DTYPES[flag]), what)
        for aux_flag, aux_shape in aux:
            if aux_flag not in DTYPES or aux_shape is None:
                raise TransferKitError(f"{self.path}: damaged .params file: {what} has a bad sparse index")
            self.take(int(np.prod(aux_shape, dtype=object)) * _itemsize(DTYPES[aux_flag]), what)
        return _Array(offset, shape, DTYPES[flag], sparse)


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _tensor(buf, arr: _Array) -> torch.Tensor:
    count = int(np.prod(arr.shape, dtype=object))
    if arr.dtype == "bfloat16":
        words = np.frombuffer(buf, np.int16, count, arr.offset).copy()
        return torch.from_numpy(words).view(torch.bfloat16).reshape(arr.shape)
    return torch.from_numpy(np.frombuffer(buf, arr.dtype, count, arr.offset).copy().reshape(arr.shape))


def parse(buf, path: Path) -> list[tuple[str, _Array | None]]:
    """The (name as stored, array) list of an NDArray-list buffer; empty arrays are None."""
    cur = _Cursor(buf, path)
    magic, _reserved, n = cur.unpack("<QQQ", "header")
    if struct.pack("<Q", magic) != LIST_MAGIC:
        raise TransferKitError(f"{path}: not an MXNet .params file (list magic {magic:#x}, expected 0x112)")
    check_fits(path, n * 4, len(buf) - cur.pos, f"the array count ({n:,})")
    arrays = [cur.array(i) for i in range(n)]
    (n_names,) = cur.unpack("<Q", "name count")
    if n_names not in (0, n):
        raise TransferKitError(f"{path}: damaged .params file: {n_names:,} names for {n:,} arrays")
    names = []
    for i in range(n_names):
        (length,) = cur.unpack("<Q", f"name {i}")
        start = cur.take(length, f"name {i}")
        try:
            names.append(bytes(buf[start:start + length]).decode("utf-8"))
        except UnicodeDecodeError:
            raise TransferKitError(f"{path}: damaged .params file: name {i} is not UTF-8") from None
    if not names:
        names = [f"#{i}" for i in range(n)]  # nd.save of a plain list
    return list(zip(names, arrays, strict=True))


def find_symbol(path: Path) -> Path | None:
    """`prefix-symbol.json` for `prefix-0000.params` (MXNet's checkpoint naming), or `stem-symbol.json`."""
    prefix = re.sub(r"-\d+$", "", path.stem)
    for candidate in (path.parent / f"{prefix}-symbol.json", path.parent / f"{path.stem}-symbol.json"):
        if candidate.is_file():
            return candidate
    return None


def _graph(symbol: Path) -> tuple[list[tuple[str, str, str]], dict[str, dict]]:
    """(parameter name, operator name, operator type) in graph order, and each operator's attributes."""
    try:
        nodes = json.loads(symbol.read_text(encoding="utf-8"))["nodes"]
        uses, attrs = [], {}
        for node in nodes:
            if node["op"] == "null":
                continue
            op_attrs = node.get("attrs") or node.get("attr") or node.get("param") or {}
            if not isinstance(op_attrs, dict):  # read with .get() for a BatchNorm's eps and fix_gamma
                raise TypeError(op_attrs)
            attrs[node["name"]] = op_attrs
            for entry in node["inputs"]:
                src = nodes[entry[0]]
                if src["op"] == "null":
                    uses.append((src["name"], node["name"], node["op"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransferKitError(f"{symbol}: not a readable MXNet symbol file ({exc})") from None
    except (KeyError, TypeError, IndexError, AttributeError):
        raise TransferKitError(f"{symbol}: not an MXNet symbol file (no well-formed 'nodes' list)") from None
    return uses, attrs


def torch_name(name: str) -> str:
    for old, new in SUFFIXES:
        if name.endswith(old) and len(name) > len(old):
            return name[: -len(old)] + new
    return name


def read(path: Path) -> WeightFile:
    size = path.stat().st_size
    if size < 24:
        raise TransferKitError(f"{path}: truncated .params file ({size} bytes); re-download it")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        entries = parse(buf, path)
        roles, stored = {}, {}
        for raw, arr in entries:
            role, _, bare = raw.partition(":") if raw[:4] in ("arg:", "aux:") else ("", "", raw)
            if arr is not None and arr.sparse:
                raise TransferKitError(f"{path}: array {raw!r} is {arr.sparse} (sparse); only dense arrays are "
                                       "read: save it dense (tostype('default')) first")
            if bare in stored:
                raise TransferKitError(f"{path}: damaged .params file: the name {bare!r} appears twice")
            roles[bare], stored[bare] = role, arr
        tensors_raw = {name: _tensor(buf, arr) for name, arr in stored.items() if arr is not None}
    empty = [name for name, arr in stored.items() if arr is None]

    symbol = find_symbol(path)
    uses, attrs = _graph(symbol) if symbol else ([], {})
    order, layer_of = [], {}
    for name, op_name, op in uses:
        if name in tensors_raw and name not in layer_of:
            order.append(name)
            layer_of[name] = (op_name, op)
    order += [name for name in tensors_raw if name not in layer_of]

    renamed = {name: torch_name(name) for name in order}
    clashes = {new for new, n in Counter(renamed.values()).items() if n > 1}
    origins = Origins("mxnet")
    tensors: dict[str, torch.Tensor] = {}
    for name in order:
        new = renamed[name] if renamed[name] not in clashes and renamed[name] not in tensors_raw else name
        op_name, op = layer_of.get(name, ("", ""))
        tensor, converted, extra = tensors_raw[name], "", {}
        if op == "BatchNorm":
            op_attrs = attrs.get(op_name, {})
            extra["eps"] = str(op_attrs.get("eps", BN_EPS_DEFAULT))
            fix_gamma = str(op_attrs.get("fix_gamma", "True")) in ("True", "true", "1")
            if fix_gamma and name.endswith("_gamma"):
                tensor, converted = torch.ones_like(tensor), "fix_gamma: weight 1 (MXNet ignores the stored gamma)"
        if roles[name]:
            extra["role"] = roles[name]
        tensors[new] = tensor
        origins.tensor(new, name, op_name, op, str(tensors_raw[name].dtype).replace("torch.", ""), converted,
                       **extra)
    if not tensors:
        raise TransferKitError(f"{path}: the .params file holds no arrays")
    extra_meta = {"symbol": symbol.name} if symbol else {}
    if empty:
        extra_meta["empty_arrays"] = json.dumps(empty)
    return WeightFile(tensors, "mxnet", path, origins.metadata(**extra_meta))
