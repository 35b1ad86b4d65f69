"""TensorFlow checkpoints (`.index` + `.data-NNNNN-of-NNNNN` bundles), read without TensorFlow.

The `.index` file is a LevelDB-style table (SSTable) mapping each variable name to a
BundleEntryProto (dtype, shape, shard, offset, size, masked crc32c) that points into a data shard.
No Python package reads this table format without pulling in TensorFlow, so it is parsed here (the
blocks, their prefix-compressed entries and CRCs are simple); the protobuf messages are declared in
code through protobuf's descriptor API, so no `protoc` and no TensorFlow is needed.

A source may be the checkpoint prefix (`model.ckpt-1000`), its `.index` file, a SavedModel's
`variables/` folder or the SavedModel folder itself (see `checkpoint_index`). TF2 object-based
names (`layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE`) keep their path, dotted, with
the variable renamed to PyTorch's (`layer_with_weights-0.weight`); the original key, the
variable's own name from the object graph (`conv1/kernel`), the layer type and the layout
conversion are recorded per tensor in the metadata. Optimizer slots, save counters and the
object graph are left out and counted. Tensors come in the model's order (the object graph's,
else the names' natural order) so that structure matching can pair them.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from transferkit.checksums import masked_crc32c
from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile, tensor_from_numpy
from transferkit.weights.formats.tf_layout import TF_BATCHNORM_EPS, as_metadata, convert, leaf_rank

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER = 5  # compression type byte + masked crc32c
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# TF DataType enum -> numpy dtype (little-endian); others (strings, resources, quantized) are not weights.
DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 14: "<u2", 17: "<u2",
          19: "<f2", 22: "<u4", 23: "<u8"}
DT_STRING, DT_BFLOAT16 = 7, 14  # bfloat16 is read as its 16-bit pattern and viewed as torch.bfloat16
# TF1 optimizer slot variables: `<var>/Adam`, `<var>/Momentum`, ...
TF1_SLOTS = re.compile(r"/(Adam(_\d+)?|Momentum|RMSProp(_\d+)?|Adagrad|Ftrl(_\d+)?|AdamW(_\d+)?)$")
DATA_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")
LEFT_OUT_NAMES = ("save_counter", "global_step", "optimizer", "_CHECKPOINTABLE_OBJECT_GRAPH")


def _messages() -> dict[str, type]:
    """BundleHeaderProto, BundleEntryProto and TrackableObjectGraph (the fields this reader uses),
    declared with the descriptor API under their TensorFlow field numbers. Built per read (a fraction of
    a millisecond)."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="transferkit_tf_bundle.proto", package="transferkit_tf",
                                             syntax="proto3")

    def message(name, fields, parent=None):
        msg = (parent.nested_type if parent else fdp.message_type).add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
        return msg

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("VersionDef", [("producer", 1, F.TYPE_INT32, opt, ""), ("min_consumer", 2, F.TYPE_INT32, opt, ""),
                           ("bad_consumers", 3, F.TYPE_INT32, rep, "")])
    message("BundleHeaderProto", [("num_shards", 1, F.TYPE_INT32, opt, ""), ("endianness", 2, F.TYPE_INT32, opt, ""),
                                  ("version", 3, F.TYPE_MESSAGE, opt, ".transferkit_tf.VersionDef")])
    shape = message("TensorShapeProto", [("dim", 2, F.TYPE_MESSAGE, rep, ".transferkit_tf.TensorShapeProto.Dim"),
                                         ("unknown_rank", 3, F.TYPE_BOOL, opt, "")])
    message("Dim", [("size", 1, F.TYPE_INT64, opt, ""), ("name", 2, F.TYPE_STRING, opt, "")], parent=shape)
    message("TensorSliceProto", [("extent", 1, F.TYPE_BYTES, rep, "")])
    message("BundleEntryProto", [
        ("dtype", 1, F.TYPE_INT32, opt, ""), ("shape", 2, F.TYPE_MESSAGE, opt, ".transferkit_tf.TensorShapeProto"),
        ("shard_id", 3, F.TYPE_INT32, opt, ""), ("offset", 4, F.TYPE_INT64, opt, ""),
        ("size", 5, F.TYPE_INT64, opt, ""), ("crc32c", 6, F.TYPE_FIXED32, opt, ""),
        ("slices", 7, F.TYPE_MESSAGE, rep, ".transferkit_tf.TensorSliceProto")])
    graph = message("TrackableObjectGraph", [
        ("nodes", 1, F.TYPE_MESSAGE, rep, ".transferkit_tf.TrackableObjectGraph.TrackableObject")])
    obj = message("TrackableObject", [
        ("children", 1, F.TYPE_MESSAGE, rep, ".transferkit_tf.TrackableObjectGraph.TrackableObject.ObjectReference"),
        ("attributes", 2, F.TYPE_MESSAGE, rep,
         ".transferkit_tf.TrackableObjectGraph.TrackableObject.SerializedTensor")], parent=graph)
    message("ObjectReference", [("node_id", 1, F.TYPE_INT32, opt, ""), ("local_name", 2, F.TYPE_STRING, opt, "")],
            parent=obj)
    message("SerializedTensor", [("name", 1, F.TYPE_STRING, opt, ""), ("full_name", 2, F.TYPE_STRING, opt, ""),
                                 ("checkpoint_key", 3, F.TYPE_STRING, opt, "")], parent=obj)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"transferkit_tf.{name}"))
            for name in ("BundleHeaderProto", "BundleEntryProto", "TrackableObjectGraph")}


def checkpoint_index(path: Path) -> Path | None:
    """The `.index` file a TF source names: a prefix, the index itself, `variables/`, a SavedModel."""
    if path.is_file():
        if DATA_SHARD.search(path.name):  # a data shard names its index
            index = path.with_name(path.name.rsplit(".data-", 1)[0] + ".index")
            return index if index.is_file() else None
        return path if path.suffix == ".index" else None
    if path.with_name(path.name + ".index").is_file():
        return path.with_name(path.name + ".index")
    if path.is_dir():
        for candidate in (path / "variables" / "variables.index", path / "variables.index"):
            if candidate.is_file():
                return candidate
        found = sorted(path.glob("*.index"))
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(p.name for p in found[:6])
            raise TransferKitError(f"{path} holds several TensorFlow checkpoints ({names}); give one prefix or .index")
    return None


def sniff(path: Path, head: bytes) -> bool:
    if path.is_dir() or DATA_SHARD.search(path.name):
        return checkpoint_index(path) is not None
    try:  # content: the table footer's magic number in the last 8 bytes
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            if fh.tell() < FOOTER_SIZE:
                return False
            fh.seek(-8, 2)
            return struct.unpack("<Q", fh.read(8))[0] == TABLE_MAGIC
    except OSError:
        return False



def _varint(buf, pos: int, end: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Damaged(f"bad varint in {where}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


class _Damaged(Exception):
    """A structural problem inside the file; turned into one TransferKitError line naming the file."""


def _block(data: bytes, offset: int, size: int, what: str) -> bytes:
    if offset < 0 or size < 4 or offset + size + BLOCK_TRAILER > len(data):
        raise _Damaged(f"{what} block at {offset}+{size} lies outside the {len(data)}-byte file")
    block = data[offset: offset + size]
    kind = data[offset + size]
    (stored,) = struct.unpack("<I", data[offset + size + 1: offset + size + 5])
    if masked_crc32c(data[offset: offset + size + 1]) != stored:
        raise _Damaged(f"{what} block at {offset} fails its CRC check")
    if kind != 0:
        raise _Damaged(f"{what} block at {offset} is compressed (type {kind}); only uncompressed tables are read")
    return block


def _block_entries(block: bytes, what: str):
    (restarts,) = struct.unpack("<I", block[-4:])
    end = len(block) - 4 - 4 * restarts
    if restarts < 1 or end < 0:
        raise _Damaged(f"{what} block has a bad restart count ({restarts})")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos, end, what)
        unshared, pos = _varint(block, pos, end, what)
        length, pos = _varint(block, pos, end, what)
        if shared > len(key) or pos + unshared + length > end:
            raise _Damaged(f"{what} block has an entry running past its end")
        key = key[:shared] + block[pos: pos + unshared]
        pos += unshared
        yield key, block[pos: pos + length]
        pos += length


def _table(data: bytes) -> list[tuple[bytes, bytes]]:
    if len(data) < FOOTER_SIZE or struct.unpack("<Q", data[-8:])[0] != TABLE_MAGIC:
        raise _Damaged("no table footer (magic number missing): not a TensorFlow .index file, or truncated")
    footer = data[-FOOTER_SIZE:]
    _meta_off, pos = _varint(footer, 0, 40, "footer")
    _meta_size, pos = _varint(footer, pos, 40, "footer")
    index_off, pos = _varint(footer, pos, 40, "footer")
    index_size, pos = _varint(footer, pos, 40, "footer")
    entries = []
    for _sep, handle in _block_entries(_block(data, index_off, index_size, "index"), "index"):
        off, p = _varint(handle, 0, len(handle), "block handle")
        size, _ = _varint(handle, p, len(handle), "block handle")
        entries.extend(_block_entries(_block(data, off, size, "data"), "data"))
    return entries


class _Shards:
    """The data files, memory-mapped and opened once each."""

    def __init__(self, prefix: Path, count: int):
        self.prefix, self.count, self.maps = prefix, count, {}

    def read(self, key: str, shard: int, offset: int, size: int) -> memoryview:
        if not 0 <= shard < self.count:
            raise _Damaged(f"{key!r} names data shard {shard}, but the header says {self.count}")
        if shard not in self.maps:
            path = self.prefix.with_name(f"{self.prefix.name}.data-{shard:05d}-of-{self.count:05d}")
            if not path.is_file():
                raise TransferKitError(f"{path}: data shard missing; the checkpoint needs every .data-* file "
                                       "beside its .index")
            with open(path, "rb") as fh:
                self.maps[shard] = (path, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                                    if path.stat().st_size else b"")
        path, mapped = self.maps[shard]
        if offset < 0 or size < 0 or offset + size > len(mapped):
            raise TransferKitError(f"{path}: {key!r} is declared at bytes {offset}..{offset + size}, past the "
                                   f"file's {len(mapped)} bytes; the checkpoint is truncated or damaged")
        return memoryview(mapped)[offset: offset + size]


def read(path: Path) -> WeightFile:
    index = checkpoint_index(path) or path
    try:
        return _read(index)
    except _Damaged as exc:
        raise TransferKitError(f"{index}: damaged TensorFlow checkpoint index ({exc}); re-export the checkpoint") \
            from None
    except OSError as exc:
        raise TransferKitError(f"cannot read TensorFlow checkpoint {index}: {exc.strerror or exc}") from None


def _read(index: Path) -> WeightFile:
    msgs = _messages()
    data = index.read_bytes()
    prefix = index.with_suffix("")
    table = _table(data)
    if not table or table[0][0] != b"":
        raise _Damaged("the bundle header entry is missing")
    entries = {}
    try:
        header = msgs["BundleHeaderProto"].FromString(table[0][1])
        for key, value in table[1:]:
            entries[key.decode("utf8", "replace")] = msgs["BundleEntryProto"].FromString(value)
    except DecodeError as exc:
        raise _Damaged(f"an entry is not a valid protobuf message ({exc})") from None
    if header.endianness != 0:
        raise TransferKitError(f"{index}: a big-endian checkpoint; re-save it on a little-endian machine")
    shards = _Shards(prefix, header.num_shards)

    full_names, order = {}, []
    if OBJECT_GRAPH_KEY in entries:
        full_names, order = _object_graph(entries[OBJECT_GRAPH_KEY], shards, msgs)
    keys = list(entries)
    kept = [k for k in keys if _left_out(k) is None]
    rank = {k: i for i, k in enumerate(order)}
    kept.sort(key=lambda k: (rank.get(k, len(rank)), _natural_key(k)))

    groups: dict[str, set[str]] = {}
    for key in kept:
        parent, _, leaf = _strip(key).rpartition("/")
        groups.setdefault(parent, set()).add(leaf)

    tensors, sources, converted, types, dtypes = {}, {}, {}, {}, set()
    skipped_dtypes = {}
    for key in kept:
        entry = entries[key]
        if entry.dtype not in DTYPES:
            skipped_dtypes[key] = entry.dtype
            continue
        array = _tensor(key, entry, shards)
        dtypes.add("bfloat16" if entry.dtype == DT_BFLOAT16 else str(array.dtype))
        parent, _, leaf = _strip(key).rpartition("/")
        pt_leaf, array, conversion, kind = convert(leaf, array)
        parts = [p for p in parent.split("/") if p]
        if {"depthwise_kernel", "pointwise_kernel"} <= groups.get(parent, set()):  # SeparableConv2D
            parts.append("depthwise" if leaf == "depthwise_kernel" else "pointwise")
            kind = "SeparableConv2D"
        name = ".".join(parts + [pt_leaf])
        if name in tensors:
            name = ".".join(parts + [leaf])
        tensor = tensor_from_numpy(array)
        tensors[name] = tensor.view(torch.bfloat16) if entry.dtype == DT_BFLOAT16 else tensor
        sources[name], converted[name], types[name] = key, conversion, kind
    if not tensors:
        raise TransferKitError(f"{index}: the checkpoint holds no numeric variables")
    left_out: dict[str, int] = {}
    for key in keys:
        reason = _left_out(key)
        if reason:
            left_out[reason] = left_out.get(reason, 0) + 1
    if skipped_dtypes:
        left_out["non-numeric variables"] = len(skipped_dtypes)
    meta = {
        "source_format": "tensorflow-bundle",
        "dtype": ",".join(sorted(dtypes)),
        "source_names": as_metadata(sources),
        "layer_types": as_metadata(types),
        "converted": as_metadata(converted),
        "left_out": as_metadata(left_out),
    }
    if full_names:
        meta["variable_names"] = as_metadata({n: full_names[k] for n, k in sources.items() if k in full_names})
    if "BatchNorm" in types.values():
        meta["batchnorm_eps"] = f"{TF_BATCHNORM_EPS:g}"
        meta["batchnorm_eps_source"] = "TF/Keras default (a checkpoint does not record it)"
        meta["batchnorm_fix"] = (f"set eps={TF_BATCHNORM_EPS:g} on the PyTorch BatchNorm modules unless the model "
                                 "was built with another (PyTorch's default is 1e-5)")
    meta["padding_note"] = ("a checkpoint does not record padding: TF 'SAME' with stride > 1 pads bottom/right "
                            "more than PyTorch; use timm's tf_ variants (Conv2dSame) or pad explicitly")
    return WeightFile(tensors, "tensorflow", index, meta)


def _strip(key: str) -> str:
    return key[: -len(VALUE_SUFFIX)] if key.endswith(VALUE_SUFFIX) else key


def _left_out(key: str) -> str | None:
    """Why a variable is not a weight of the model, or None when it is."""
    if ".OPTIMIZER_SLOT" in key or TF1_SLOTS.search(key):
        return "optimizer slots"
    if key.endswith("/ExponentialMovingAverage"):  # TF1 shadow copies; the live variables are kept
        return "moving-average shadows"
    if key.split("/")[0] in LEFT_OUT_NAMES or key.startswith("_"):
        return "object graph, counters and optimizer state"
    return None


def _natural_key(key: str) -> list:
    parent, _, leaf = _strip(key).rpartition("/")
    parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", parent)]
    return [parts, leaf_rank(leaf), leaf]


def _tensor(key: str, entry, shards: _Shards) -> np.ndarray:
    if entry.slices:
        raise TransferKitError(f"{shards.prefix}: variable {key!r} is partitioned into slices; re-save the "
                               "checkpoint without partitioned variables")
    dims = [d.size for d in entry.shape.dim]
    if entry.shape.unknown_rank or any(d < 0 for d in dims):
        raise TransferKitError(f"{shards.prefix}: variable {key!r} has an unknown or negative shape {dims}")
    dtype = np.dtype(DTYPES[entry.dtype])
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    if expected != entry.size:
        raise TransferKitError(f"{shards.prefix}: variable {key!r} declares {entry.size} bytes but shape {dims} "
                               f"needs {expected}; the checkpoint is damaged")
    raw = shards.read(key, entry.shard_id, entry.offset, entry.size)
    if masked_crc32c(raw) != entry.crc32c:
        raise TransferKitError(f"{shards.prefix}: variable {key!r} fails its CRC check; the data file is damaged")
    return np.frombuffer(raw, dtype=dtype).reshape(dims).copy()


def _object_graph(entry, shards: _Shards, msgs) -> tuple[dict[str, str], list[str]]:
    """Checkpoint key -> the variable's own name, and the keys in depth-first model order."""
    if entry.dtype != DT_STRING:
        return {}, []
    raw = bytes(shards.read(OBJECT_GRAPH_KEY, entry.shard_id, entry.offset, entry.size))
    # A scalar string tensor: varint length, masked crc32c of the length, the bytes. The entry's CRC
    # covers the length as a little-endian uint32, that checksum and the bytes.
    length, pos = _varint(raw, 0, len(raw), "object graph")
    if pos + 4 + length > len(raw):
        raise _Damaged("the object graph is shorter than its declared length")
    if masked_crc32c(struct.pack("<I", length & 0xFFFFFFFF) + raw[pos:]) != entry.crc32c:
        raise TransferKitError(f"{shards.prefix}: the object graph fails its CRC check; the data file is damaged")
    try:
        graph = msgs["TrackableObjectGraph"].FromString(raw[pos + 4: pos + 4 + length])
    except DecodeError as exc:
        raise _Damaged(f"the object graph is not a valid protobuf message ({exc})") from None
    full_names, order, seen = {}, [], set()
    stack = [0] if graph.nodes else []
    while stack:  # iterative depth-first walk, children in their listed order
        node_id = stack.pop()
        if node_id in seen or not 0 <= node_id < len(graph.nodes):
            continue
        seen.add(node_id)
        node = graph.nodes[node_id]
        for attr in node.attributes:
            full_names[attr.checkpoint_key] = attr.full_name
            order.append(attr.checkpoint_key)
        stack.extend(child.node_id for child in reversed(node.children))
    return full_names, order
