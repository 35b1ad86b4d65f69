"""Caffe ``.caffemodel`` files (NetParameter with the current ``layer`` or the V1 ``layers`` list).

No Caffe install and no ``protoc`` are needed: the few messages read here are declared in code with
protobuf's descriptor API (field numbers from Caffe's caffe.proto), in a private descriptor pool.
The packed float blobs are declared as ``bytes`` (the same wire type) so that NumPy reads each blob
as one buffer rather than protobuf building a Python float per value.

A ``.prototxt`` beside the file (same stem, else ``deploy.prototxt``, else the only one in the
folder) gives the layer order, types and BatchNorm eps when present. Tensors come out under PyTorch
names: ``<layer>.weight`` / ``<layer>.bias``; a BatchNorm's mean and variance are divided by its
scale-factor blob, and the Scale layer that follows it becomes that BatchNorm's weight and bias.
The layers' bottoms and tops are kept in the metadata as ``inputs`` (origins.py): which layers each
layer holding tensors reads from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile
from transferkit.weights.formats.origins import Origins, text

_F = descriptor_pb2.FieldDescriptorProto
# Caffe's V1LayerParameter.LayerType, needed to read V1 prototxt files (`type: CONVOLUTION`).
V1_TYPES = {
    "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "ARGMAX": 30, "BNLL": 2, "CONCAT": 3, "CONTRASTIVE_LOSS": 37,
    "CONVOLUTION": 4, "DATA": 5, "DECONVOLUTION": 39, "DROPOUT": 6, "DUMMY_DATA": 32, "EUCLIDEAN_LOSS": 7,
    "ELTWISE": 25, "EXP": 38, "FLATTEN": 8, "HDF5_DATA": 9, "HDF5_OUTPUT": 10, "HINGE_LOSS": 28, "IM2COL": 11,
    "IMAGE_DATA": 12, "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15, "MEMORY_DATA": 29,
    "MULTINOMIAL_LOGISTIC_LOSS": 16, "MVN": 34, "POOLING": 17, "POWER": 26, "RELU": 18, "SIGMOID": 19,
    "SIGMOID_CROSS_ENTROPY_LOSS": 27, "SILENCE": 36, "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "SPLIT": 22, "SLICE": 33,
    "TANH": 23, "WINDOW_DATA": 24, "THRESHOLD": 31,
}
BN_EPS_DEFAULT = 1e-5


def _schema() -> type:
    """The NetParameter message class, with the fields this reader uses. Built per read (a fifth of a
    millisecond; importing transferkit builds no protobuf pool)."""
    def fld(name, number, kind, label=_F.LABEL_OPTIONAL, type_name=None, default=None):
        f = _F(name=name, number=number, type=kind, label=label)
        if type_name:
            f.type_name = type_name
        if default is not None:
            f.default_value = default
        return f

    rep = _F.LABEL_REPEATED
    msg = _F.TYPE_MESSAGE
    fdp = descriptor_pb2.FileDescriptorProto(name="transferkit_caffe.proto", package="tkcaffe", syntax="proto2")
    layouts = {
        "BlobShape": [fld("dim", 1, _F.TYPE_INT64, rep)],
        "BlobProto": [
            fld("num", 1, _F.TYPE_INT32), fld("channels", 2, _F.TYPE_INT32), fld("height", 3, _F.TYPE_INT32),
            fld("width", 4, _F.TYPE_INT32), fld("data", 5, _F.TYPE_BYTES, rep),
            fld("shape", 7, msg, type_name=".tkcaffe.BlobShape"), fld("double_data", 8, _F.TYPE_BYTES, rep),
        ],
        "BatchNormParameter": [fld("eps", 3, _F.TYPE_FLOAT, default=str(BN_EPS_DEFAULT))],
        "InnerProductParameter": [fld("transpose", 6, _F.TYPE_BOOL)],
        "LayerParameter": [
            fld("name", 1, _F.TYPE_STRING), fld("type", 2, _F.TYPE_STRING), fld("bottom", 3, _F.TYPE_STRING, rep),
            fld("top", 4, _F.TYPE_STRING, rep), fld("blobs", 7, msg, rep, ".tkcaffe.BlobProto"),
            fld("inner_product_param", 117, msg, type_name=".tkcaffe.InnerProductParameter"),
            fld("batch_norm_param", 139, msg, type_name=".tkcaffe.BatchNormParameter"),
        ],
        "V1LayerParameter": [
            fld("v0_layer", 1, _F.TYPE_BYTES), fld("bottom", 2, _F.TYPE_STRING, rep),
            fld("top", 3, _F.TYPE_STRING, rep), fld("name", 4, _F.TYPE_STRING),
            fld("type", 5, _F.TYPE_ENUM, type_name=".tkcaffe.V1LayerType"),
            fld("blobs", 6, msg, rep, ".tkcaffe.BlobProto"),
            fld("inner_product_param", 17, msg, type_name=".tkcaffe.InnerProductParameter"),
        ],
        "NetParameter": [
            fld("name", 1, _F.TYPE_STRING), fld("layers", 2, msg, rep, ".tkcaffe.V1LayerParameter"),
            fld("layer", 100, msg, rep, ".tkcaffe.LayerParameter"),
        ],
    }
    enum = fdp.enum_type.add(name="V1LayerType")
    for name, number in V1_TYPES.items():
        enum.value.add(name=name, number=number)
    for name, fields in layouts.items():
        fdp.message_type.add(name=name).field.extend(fields)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tkcaffe.NetParameter"))


_NET_TAGS = (b"\x12", b"\x1a", b"\xa2\x06")  # layers (V1), input, layer: what follows a net's name


def sniff(path: Path, head: bytes) -> bool:
    # By content only (the .caffemodel suffix is the registry's fallback). A NetParameter starts
    # with its name (field 1) or directly with its layers.
    if head.startswith(b"\xa2\x06") or head[:1] == b"\x12" and len(head) > 2 and head[2:3] == b"\x0a":
        return True
    if head[:1] == b"\x0a" and len(head) > 2 and head[1] < 0x40:
        name, rest = head[2:2 + head[1]], head[2 + head[1]:]
        return name.isascii() and name.decode("ascii").isprintable() and rest[:2].startswith(_NET_TAGS)
    return False


@dataclass
class _Layer:
    name: str
    kind: str
    bottom: list[str]
    top: list[str]
    blobs: list = field(default_factory=list)
    eps: float | None = None
    transpose: bool = False


def _layers(net, path: Path) -> list[_Layer]:
    if net.layer:
        return [_Layer(text(lp.name), text(lp.type), [text(b) for b in lp.bottom], [text(t) for t in lp.top],
                       list(lp.blobs),
                       lp.batch_norm_param.eps if lp.HasField("batch_norm_param") else None,
                       lp.inner_product_param.transpose) for lp in net.layer]
    out = []
    for lp in net.layers:
        if lp.HasField("v0_layer"):
            raise TransferKitError(f"{path}: a V0 (pre-2014) Caffe net; upgrade it with Caffe's "
                                   "upgrade_net_proto_binary tool first")
        # an unknown type number reads as NONE (proto2); the V1 names of the layers holding weights, title-cased
        # without underscores, are the current types: CONVOLUTION, DECONVOLUTION, INNER_PRODUCT -> InnerProduct
        kind = lp.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[lp.type].name
        out.append(_Layer(text(lp.name), kind.title().replace("_", ""),
                          [text(b) for b in lp.bottom], [text(t) for t in lp.top], list(lp.blobs),
                          transpose=lp.inner_product_param.transpose))
    return out


def find_prototxt(path: Path) -> Path | None:
    """The net definition beside a .caffemodel: same stem, else deploy.prototxt, else the only one."""
    for candidate in (path.with_suffix(".prototxt"), path.parent / "deploy.prototxt"):
        if candidate.is_file():
            return candidate
    found = sorted(path.parent.glob("*.prototxt"))
    return found[0] if len(found) == 1 else None


def _read_prototxt(proto: Path, net_class: type) -> list[_Layer]:
    net = net_class()
    try:
        text_format.Parse(proto.read_text(encoding="utf-8"), net, allow_unknown_field=True)
    except (text_format.ParseError, UnicodeDecodeError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TransferKitError(f"{proto}: not a readable Caffe prototxt ({msg}); fix it or move it away "
                               "to read the .caffemodel alone") from None
    return _layers(net, proto)


def _blob_array(blob, path: Path, where: str) -> np.ndarray:
    if blob.double_data:
        raw, dtype = b"".join(blob.double_data), np.float64
    else:
        raw, dtype = b"".join(blob.data), np.float32
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:  # legacy 4-d blob
        shape = tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))
    itemsize = np.dtype(dtype).itemsize
    if any(d < 0 for d in shape) or len(raw) % itemsize or int(np.prod(shape, dtype=object)) != len(raw) // itemsize:
        raise TransferKitError(f"{path}: damaged blob in layer {where}: shape {list(shape)} does not match its "
                               f"{len(raw) // itemsize:,} values; re-download or re-export the model")
    return np.frombuffer(raw, dtype).reshape(shape)


def _weight(arr: np.ndarray, layer: _Layer) -> np.ndarray:
    """Legacy blobs are 4-d (1, 1, out, in) for an InnerProduct (some converters write (out, in, 1, 1)):
    back to (out, in)."""
    if layer.kind == "InnerProduct":
        if arr.ndim == 4 and arr.shape[:2] == (1, 1):
            arr = arr.reshape(arr.shape[2:])
        elif arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr.reshape(arr.shape[:2])
        return arr.T if layer.transpose and arr.ndim == 2 else arr
    return arr


def read(path: Path) -> WeightFile:
    try:
        data = path.read_bytes()
        net_class = _schema()
        net = net_class.FromString(data)
    except DecodeError as exc:
        raise TransferKitError(f"{path}: truncated or damaged .caffemodel ({exc}); "
                               "re-download it") from None
    except OSError as exc:
        raise TransferKitError(f"{path}: cannot read ({exc.strerror})") from None
    if net.layer and net.layers:
        raise TransferKitError(f"{path}: holds both V1 'layers' and current 'layer' lists; upgrade it with "
                               "Caffe's upgrade_net_proto_binary tool")
    stored = _layers(net, path)
    with_blobs = {lay.name: lay for lay in stored if lay.blobs}
    if not with_blobs:
        raise TransferKitError(f"{path}: no layer holds any weights (a prototxt saved as .caffemodel?)")
    proto = find_prototxt(path)
    order = stored
    extra = {}
    if proto is not None:
        defined = _read_prototxt(proto, net_class)
        known = {lay.name for lay in defined}
        order = defined + [lay for lay in stored if lay.name not in known]
        extra["prototxt"] = proto.name
    scale_of: dict[str, _Layer] = {}  # BatchNorm name -> the stored Scale layer that follows it
    for i, lay in enumerate(order):
        if (lay.kind or with_blobs.get(lay.name, lay).kind) == "BatchNorm" and lay.name in with_blobs and lay.top:
            nxt = next((n for n in order[i + 1:] if lay.top[0] in n.bottom), None)
            if nxt is not None and nxt.kind == "Scale" and nxt.name in with_blobs and len(nxt.bottom) == 1:
                scale_of[lay.name] = with_blobs[nxt.name]
    merged = {sc.name for sc in scale_of.values()}

    origins = Origins("caffe")
    tensors: dict[str, torch.Tensor] = {}
    for lay in order:
        stored_lay = with_blobs.get(lay.name)
        if stored_lay is None or lay.name in merged:
            continue
        kind = lay.kind or stored_lay.kind
        stored_lay.kind = kind
        arrays = [_blob_array(b, path, lay.name) for b in stored_lay.blobs]
        dtype = str(arrays[0].dtype)

        def put(name, arr, source, converted, *, layer=lay.name, layer_kind=kind, dtype=dtype, **more):
            tensors[name] = torch.from_numpy(np.array(arr))  # a copy: the protobuf buffer is read-only
            origins.tensor(name, source, layer, layer_kind, dtype, converted, **more)

        if kind == "BatchNorm":
            origins.layer(lay.name, kind)  # listed before the Scale layer merged into it
            _batchnorm(lay, stored_lay, arrays, scale_of.get(lay.name), put, path)
            continue
        for j, arr in enumerate(arrays):
            suffix = ("weight", "bias")[j] if j < 2 else f"blobs.{j}"
            arr = _weight(arr, stored_lay) if j == 0 else (arr.reshape(-1) if j == 1 else arr)
            converted = "InnerProduct weight transposed" if j == 0 and stored_lay.transpose else ""
            put(f"{lay.name}.{suffix}", arr, f"{lay.name}/blob{j}", converted)
    _record_inputs(order, origins)
    return WeightFile(tensors, "caffe", path, origins.metadata(net_name=text(net.name), **extra))


def _record_inputs(order: list[_Layer], origins: Origins) -> None:
    """Which layers holding tensors each such layer reads from, following bottoms and tops in layer
    order (so an in-place layer, top == bottom, passes its input on). Left out when a layer holding
    tensors names no bottom: the file then does not say how its layers connect."""
    held = {record["layer"] for record in origins.tensors.values()}
    if any(lay.name in held and not lay.bottom for lay in order):
        return
    carried: dict[str, list[str]] = {}  # blob -> the layers holding tensors whose outputs it carries
    for lay in order:
        upstream = list(dict.fromkeys(u for b in lay.bottom for u in carried.get(b, [])))
        if lay.name in held:
            origins.inputs(lay.name, upstream)
            upstream = [lay.name]
        for top in lay.top:
            carried[top] = upstream


def _batchnorm(lay: _Layer, stored: _Layer, arrays: list[np.ndarray], scale: _Layer | None, put,
               path: Path) -> None:
    if len(arrays) < 3:
        raise TransferKitError(f"{path}: BatchNorm layer {lay.name} has {len(arrays)} blobs, expected 3 "
                               "(mean, variance, scale factor); re-export the model")
    mean, var, factor = (a.reshape(-1) for a in arrays[:3])
    if mean.shape != var.shape:
        raise TransferKitError(f"{path}: BatchNorm layer {lay.name} has {mean.size} means but {var.size} variances; "
                               "re-export the model")
    s = float(factor[0]) if factor.size else 0.0
    inv = 0.0 if s == 0 else 1.0 / s  # Caffe's own rule for a zero factor
    eps = lay.eps if lay.eps is not None else stored.eps if stored.eps is not None else BN_EPS_DEFAULT
    extra = {"eps": f"{eps:g}"}
    if scale is not None:
        sblobs = [_blob_array(b, path, scale.name).reshape(-1) for b in scale.blobs]
        if sblobs[0].shape != mean.shape:
            raise TransferKitError(f"{path}: Scale layer {scale.name} has {sblobs[0].size} values for BatchNorm "
                                   f"{lay.name} of {mean.size} channels; re-export the model")
        with_bias = len(sblobs) > 1
        put(f"{lay.name}.weight", sblobs[0], f"{scale.name}/blob0", "Scale merged into BatchNorm",
            layer=scale.name, layer_kind="Scale", **extra)
        put(f"{lay.name}.bias", sblobs[1] if with_bias else np.zeros_like(mean),
            f"{scale.name}/blob1" if with_bias else "",
            "Scale merged into BatchNorm" if with_bias else "BatchNorm bias 0 (Scale without bias)",
            layer=scale.name, layer_kind="Scale", **extra)
    else:
        put(f"{lay.name}.weight", np.ones_like(mean), "", "BatchNorm weight 1 (no Scale layer follows)", **extra)
        put(f"{lay.name}.bias", np.zeros_like(mean), "", "BatchNorm bias 0 (no Scale layer follows)", **extra)
    put(f"{lay.name}.running_mean", mean * inv, f"{lay.name}/blob0", "divided by the scale factor", **extra)
    put(f"{lay.name}.running_var", var * inv, f"{lay.name}/blob1", "divided by the scale factor", **extra)

