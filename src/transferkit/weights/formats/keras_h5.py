"""Keras HDF5 weights (.h5/.hdf5), read through h5py: legacy Keras 2 files and Keras 3 `.weights.h5`.

Legacy files list their layers in the `layer_names` attribute and each layer's variables in
`weight_names` (long lists are split by Keras into `layer_names0`, `layer_names1`, ...), either at
the root (weights only) or under `model_weights` (a whole model, with its `model_config` JSON).
Keras 3 writes `layers/<name>/vars/0, 1, ...`: variables by position, no names, so the leaf
(kernel, bias, gamma, ...) is inferred from the position, the shapes and the layer name.

Tensors come out as `<layer>.weight`, `<layer>.bias`, `<layer>.running_mean`, ... in PyTorch
layout (see tf_layout); a SeparableConv2D becomes `<layer>.depthwise.weight`,
`<layer>.pointwise.weight` and `<layer>.pointwise.bias`, the two convolutions PyTorch needs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import h5py
import numpy as np
import torch

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile, contiguous_array
from transferkit.weights.formats.tf_layout import TF_BATCHNORM_EPS, as_metadata, convert

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MODEL_CLASSES = ("Model", "Functional", "Sequential")
SKIPPED_ROOTS = ("optimizer", "optimizer_weights", "metrics")


def sniff(path: Path, head: bytes) -> bool:
    return head.startswith(HDF5_MAGIC)  # the .h5/.hdf5 suffixes are the registry's fallback


def read(path: Path) -> WeightFile:
    if not h5py.is_hdf5(path):
        raise TransferKitError(f"{path}: not an HDF5 file (bad signature); give a Keras .h5/.hdf5 weights file")
    try:
        with h5py.File(path, "r") as f:
            return _read_open(f, path)
    except TransferKitError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, UnicodeDecodeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TransferKitError(f"{path}: damaged Keras HDF5 file ({msg}); re-download or re-save it") from None


def _read_open(f, path: Path) -> WeightFile:
    size = path.stat().st_size
    if "model_weights" in f or _has_attr_list(f, "layer_names"):
        group = f["model_weights"] if "model_weights" in f else f
        layers = _layer_configs(_json_attr(f, "model_config", path))
        entries = _legacy_entries(group, layers, path, size)
        layout = "keras-legacy" + (" model" if "model_weights" in f else " weights")
        left_out = len(_attr_list(f["optimizer_weights"], "weight_names")) if "optimizer_weights" in f else 0
    elif "layers" in f:
        layers = {}
        entries, left_out = _keras3_entries(f, path, size)
        layout = "keras3 .weights.h5"
    else:
        raise TransferKitError(
            f"{path}: an HDF5 file without Keras weights (no layer_names attribute, model_weights or layers group); "
            "give a file written by Keras model.save or save_weights"
        )
    if not entries:
        raise TransferKitError(f"{path}: the Keras file holds no weights")

    tensors: dict[str, torch.Tensor] = {}
    sources, converted, types = {}, {}, {}
    for name, source, array, conversion, layer_type in entries:
        if name in tensors:
            name = f"{name}.{len(tensors)}"  # never drop a tensor on a name clash
        tensors[name] = torch.from_numpy(array)
        sources[name], converted[name], types[name] = source, conversion, layer_type
    dtypes = sorted({str(a.dtype) for _, _, a, _, _ in entries})
    meta = {
        "source_format": layout,
        "keras_version": _text_attr(f, "keras_version") or _text_attr(f.get("model_weights", f), "keras_version"),
        "dtype": ",".join(dtypes),
        "source_names": as_metadata(sources),
        "layer_types": as_metadata(types),
        "converted": as_metadata(converted),
    }
    if left_out:
        meta["left_out"] = as_metadata({"optimizer variables": left_out})
    meta.update(_batchnorm_and_padding_notes(layers, types))
    return WeightFile(tensors, "keras-h5", path, {k: v for k, v in meta.items() if v})


def _has_attr_list(group, name: str) -> bool:
    return name in group.attrs or f"{name}0" in group.attrs


def _attr_list(group, name: str) -> list[str]:
    """An attribute holding a list of names, joined from Keras's `name0`, `name1`, ... chunks."""
    if name in group.attrs:
        values = list(np.atleast_1d(group.attrs[name]))
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(np.atleast_1d(group.attrs[f"{name}{chunk}"]))
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _text_attr(group, name: str) -> str:
    value = group.attrs.get(name) if group is not None else None
    return value.decode("utf8") if isinstance(value, bytes) else (str(value) if value is not None else "")


def _json_attr(f, name: str, path: Path) -> dict:
    text = _text_attr(f, name)
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TransferKitError(f"{path}: the {name} attribute is not valid JSON ({exc.msg})") from None


def _layer_configs(config: dict) -> dict[str, tuple[str, dict]]:
    """Layer name -> (class name, config), nested models included."""
    found: dict[str, tuple[str, dict]] = {}

    def walk(node):
        if not isinstance(node, dict):
            return
        inner = node.get("config")
        layers = inner.get("layers") if isinstance(inner, dict) else inner if isinstance(inner, list) else None
        for layer in layers or []:
            if isinstance(layer, dict) and isinstance(layer.get("config"), dict):
                name = layer["config"].get("name") or layer.get("name")
                found[str(name)] = (str(layer.get("class_name")), layer["config"])
                if layer.get("class_name") in MODEL_CLASSES:
                    walk(layer)

    walk(config)
    return found


def _member(group, key: str, path: Path):
    """group[key], refusing soft and external links: a weights file has no need of them, and they could
    loop or read other files."""
    link = group.get(key, getlink=True)
    if link is None:
        raise TransferKitError(f"{path}: {group.name}/{key} is listed but missing; the file is damaged")
    if not isinstance(link, h5py.HardLink):
        kind = type(link).__name__
        raise TransferKitError(f"{path}: {group.name}/{key} is a {kind}; refusing links in a weights file")
    return group[key]


def _dataset(group, key: str, path: Path, size: int) -> np.ndarray:
    ds = _member(group, key, path)
    if not hasattr(ds, "shape") or ds.dtype.kind not in "fiub":
        raise TransferKitError(f"{path}: {ds.name} is not a numeric array; the file is damaged or not Keras weights")
    if ds.is_virtual or ds.external:
        raise TransferKitError(f"{path}: {ds.name} keeps its data in other files; refusing to read them")
    nbytes = math.prod(ds.shape) * ds.dtype.itemsize
    limit = size if ds.compression is None else size * 1000  # compressed data may expand, within reason
    if nbytes > limit:
        raise TransferKitError(
            f"{path}: {ds.name} declares {nbytes} bytes, more than the file can hold ({size}); the file is damaged"
        )
    return contiguous_array(ds[()])


def _torch_name(layer: str, leaf: str, pt_leaf: str, layer_type: str, inner: str) -> str:
    base = f"{layer}.{inner}" if inner else layer
    if layer_type == "SeparableConv2D" or leaf in ("depthwise_kernel", "pointwise_kernel") and "separable" in layer:
        if leaf == "depthwise_kernel":
            return f"{base}.depthwise.weight"
        if leaf in ("pointwise_kernel", "bias"):
            return f"{base}.pointwise.{pt_leaf}"
    return f"{base}.{pt_leaf}"


def _legacy_entries(group, layers: dict, path: Path, size: int) -> list:
    entries = []
    for layer in _attr_list(group, "layer_names"):
        if layer not in group:
            raise TransferKitError(f"{path}: layer {layer!r} is listed in layer_names but has no group")
        lgroup = _member(group, layer, path)
        layer_class, _ = layers.get(layer, ("", {}))
        for weight in _attr_list(lgroup, "weight_names"):
            parts = weight.split(":")[0].split("/")
            leaf = parts[-1]
            inner = parts[-2] if layer_class in MODEL_CLASSES and len(parts) > 1 else ""
            inner_class = layers.get(inner, (layer_class, {}))[0] if inner else layer_class
            array = _dataset(lgroup, weight, path, size)
            layer_type = inner_class or _guess_class(layer)  # the guess names a SeparableConv2D's bias too
            pt_leaf, array, conversion, kind = convert(leaf, array, layer_type)
            name = _torch_name(layer, leaf, pt_leaf, layer_type or "", inner)
            entries.append((name, f"{layer}/{weight}", array, conversion, kind))
    return entries


def _guess_class(layer_name: str) -> str | None:
    """Without a model config, the Keras default layer names tell depthwise from ordinary convs."""
    lowered = layer_name.lower()
    if "separable" in lowered:
        return "SeparableConv2D"
    if "depthwise" in lowered or re.search(r"(^|[_/])dw($|[_/])", lowered):
        return "DepthwiseConv2D"
    return None


def _keras3_entries(f, path: Path, size: int) -> tuple[list, int]:
    """`layers/<name>/vars/<i>` groups, nested models' `layers/` included, in natural name order."""
    found: list[tuple[str, object]] = []
    left_out = 0

    def walk(group, prefix: str):
        for key in group:
            item = _member(group, key, path)
            if not hasattr(item, "keys"):
                continue
            if key == "vars" and prefix:
                found.append((prefix, item))
            elif key == "layers":
                walk(item, prefix)
            else:
                walk(item, f"{prefix}.{key}" if prefix else key)

    walk(f["layers"], "")
    for key in SKIPPED_ROOTS:  # beside layers/ at the root (a layer may be named "optimizer")
        if key in f:
            left_out += _count_datasets(f[key])
    found.sort(key=lambda item: _natural(item[0]))
    entries = []
    for layer, vars_group in found:
        keys = sorted((k for k in vars_group if k.isdigit()), key=int)
        arrays = [_dataset(vars_group, k, path, size) for k in keys]
        for key, leaf, array in zip(keys, _keras3_leaves(layer, arrays), arrays, strict=False):
            layer_class = _guess_class(layer) or ""
            pt_leaf, out, conversion, kind = convert(leaf, array, layer_class or None)
            name = _torch_name(layer, leaf, pt_leaf, layer_class, "")
            entries.append((name, f"layers/{layer}/vars/{key}", out, conversion + " (leaf from position)", kind))
    return entries, left_out


def _keras3_leaves(layer: str, arrays: list[np.ndarray]) -> list[str]:
    n = len(arrays)
    if "separable" in layer.lower():
        return ["depthwise_kernel", "pointwise_kernel", "bias"][:n]
    if n in (2, 4) and all(a.ndim == 1 for a in arrays) and len({a.shape for a in arrays}) == 1:
        return ["gamma", "beta", "moving_mean", "moving_variance"][:n]
    if n >= 1 and arrays[0].ndim >= 2:
        return ["kernel", "bias"] + [str(i) for i in range(2, n)]
    return [str(i) for i in range(n)]


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _count_datasets(group) -> int:
    count = 0

    def visit(_name, obj):
        nonlocal count
        count += not hasattr(obj, "keys")

    group.visititems(visit)
    return count


def _batchnorm_and_padding_notes(layers: dict, types: dict[str, str]) -> dict[str, str]:
    notes: dict[str, str] = {}
    if any(kind == "BatchNorm" for kind in types.values()):
        eps = {name: float(cfg.get("epsilon", TF_BATCHNORM_EPS)) for name, (cls, cfg) in layers.items()
               if cls == "BatchNormalization"}
        values = sorted(set(eps.values())) or [TF_BATCHNORM_EPS]
        notes["batchnorm_eps"] = ",".join(f"{v:g}" for v in values)
        notes["batchnorm_eps_source"] = "model_config" if eps else "Keras default (no model config in the file)"
        notes["batchnorm_fix"] = (
            f"set eps={values[0]:g} on the PyTorch BatchNorm modules (PyTorch's default is 1e-5)"
        )
    same = []
    for name, (cls, cfg) in layers.items():
        strides = cfg.get("strides") or (cfg.get("pool_size") if cls.endswith("Pooling2D") else None)
        if str(cfg.get("padding", "")).lower() == "same" and strides and any(int(s) > 1 for s in strides):
            same.append(name)
    if same:
        notes["same_padding"] = as_metadata(same)
        notes["same_padding_fix"] = (
            "TF 'same' padding with stride > 1 pads the bottom/right more than PyTorch's symmetric padding: "
            "use timm's tf_ model variants (Conv2dSame), or F.pad(x, (0, 1, 0, 1)) before the layer "
            "(value=-inf for max pooling) with padding=0"
        )
    return notes
