"""PyTorch zip files that pickle whole modules (YOLOv5's `.pt`: `models.yolo.Model` objects).

`torch.load(weights_only=True)` refuses them, and loading them for real would import and run the
file's classes (the YOLOv5 code would have to be installed, and a hostile file could run anything).
Here the pickle goes through restricted_pickle with stand-ins: every class the file names
(`models.yolo.Model`, `torch.nn.modules.conv.Conv2d`, ...) becomes an inert StandIn holding the
state the file gives it, tensors are rebuilt from the zip's storage records (sizes checked against
the records), and functions on the deny list (os.system, eval, exec, open, subprocess...) stop the
read. The module tree is then walked through the stand-ins' `_parameters`, `_buffers` (persistent
ones) and `_modules`, in the order `nn.Module.state_dict` uses, giving the names a real
`model.state_dict()` would (`model.0.conv.weight`...). The stand-in classes are listed in the
metadata as not run.

The PyTorch reader falls back to this one only when weights_only refuses a global that is not on
the deny list.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile
from transferkit.weights.formats.restricted_pickle import Damaged, Refused, StandIn, restricted_load
from transferkit.weights.formats.state_dict import find_state_dict
from transferkit.weights.formats.tf_layout import as_metadata

MODEL_KEYS = ("model", "ema", "module", "net", "network")
MAX_PICKLE = 512 << 20  # the pickle itself (tensors live in separate records)
MAX_MODULES = 100_000  # modules listed in one file


def read(path: Path) -> WeightFile:
    try:
        with zipfile.ZipFile(path) as zf:
            obj, unpickler, prefix = _load(zf, path)
    except Refused as exc:
        raise TransferKitError(f"{path}: refused, {exc}; re-save the state_dict only, "
                               "e.g. torch.save(model.state_dict(), path)") from None
    except Damaged as exc:
        raise _damaged(path, exc) from None
    except TransferKitError:
        raise
    except OSError as exc:
        raise TransferKitError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, struct.error, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError,
            KeyError, IndexError, RecursionError, OverflowError, UnicodeDecodeError, RuntimeError) as exc:
        raise TransferKitError(
            f"{path}: truncated or damaged PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:80]}); "
            "re-download or re-save it"
        ) from None
    module, where = _find_module(obj)
    if module is not None:
        tensors: dict[str, torch.Tensor] = {}
        try:
            _walk(module, "", tensors)
        except Damaged as exc:
            raise _damaged(path, exc) from None
    else:
        tensors, where = _plain_state_dict(obj)
    if not tensors:
        raise TransferKitError(f"{path}: no tensors found in the pickled objects")
    meta = {
        "source_format": "pytorch zip pickling whole modules (read with inert stand-ins)",
        "not_run": as_metadata(dict(sorted(unpickler.not_run.items()))),
        "dtype": ",".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})),
        "nested_key": where,
    }
    if module is not None:
        meta["module_class"] = module._tk_name
        config = (module.module_state() or {}).get("yaml")
        if isinstance(config, dict):
            try:
                meta["model_config"] = json.dumps(config, separators=(",", ":"))
            except (TypeError, ValueError):
                pass
    if isinstance(obj, Mapping):
        meta["checkpoint_keys"] = as_metadata([str(k) for k in obj])
    return WeightFile(tensors, "pytorch-pickled-module", path, {k: v for k, v in meta.items() if v})


def _load(zf: zipfile.ZipFile, path: Path):
    pickles = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pickles) != 1:
        raise Damaged(f"expected one <name>/data.pkl in the zip, found {len(pickles)}")
    info = pickles[0]
    size = path.stat().st_size
    if info.file_size > min(MAX_PICKLE, size * 100):
        raise Damaged(f"data.pkl declares {info.file_size} bytes")
    prefix = info.filename[: -len("data.pkl")]
    if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").strip() not in (b"little", b""):
        raise Damaged("its tensors are big-endian; re-save it on a little-endian machine")

    def record(key: str, nbytes: int) -> bytes:
        name = f"{prefix}data/{key}"
        try:
            rec = zf.getinfo(name)
        except KeyError:
            raise Damaged(f"storage record {name} is missing") from None
        if rec.file_size < nbytes:
            raise Damaged(f"storage record {name} holds {rec.file_size} bytes, the pickle needs {nbytes}")
        if rec.file_size > size and rec.compress_type == zipfile.ZIP_STORED:
            raise Damaged(f"storage record {name} declares {rec.file_size} bytes, more than the file")
        if rec.file_size > size * 100:  # a compressed record expanding beyond reason
            raise Damaged(f"storage record {name} declares {rec.file_size} bytes")
        return zf.read(name)

    obj, unpickler = restricted_load(zf.read(info), stand_ins=True, torch_records=record)
    return obj, unpickler, prefix


def _damaged(path: Path, exc: Damaged) -> TransferKitError:
    return TransferKitError(f"{path}: damaged PyTorch checkpoint ({exc}); re-download or re-save it")


def _find_module(obj) -> tuple[StandIn | None, str]:
    if isinstance(obj, StandIn) and obj.module_state() is not None:
        return obj, ""
    if isinstance(obj, Mapping):
        for key in MODEL_KEYS:
            value = obj.get(key)
            if isinstance(value, StandIn) and value.module_state() is not None:
                return value, key
    return None, ""


def _walk(module: StandIn, prefix: str, out: dict[str, torch.Tensor], ancestors: frozenset[int] = frozenset(),
          visits: list[int] | None = None) -> None:
    """The tensors under the names nn.Module.state_dict() gives them: a submodule held under two
    names (weight tying) is listed under each; a module inside itself is not followed. A crafted
    file can share one module 2**n ways in n levels, so the walk stops the read past MAX_MODULES."""
    visits = [0] if visits is None else visits
    if id(module) in ancestors:
        return
    visits[0] += 1
    if visits[0] > MAX_MODULES:
        raise Damaged(f"more than {MAX_MODULES:,} modules in the tree (one module shared under many names?)")
    ancestors = ancestors | {id(module)}
    state = module.module_state() or {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        items = state.get(group)
        if isinstance(items, Mapping):
            for name, value in items.items():
                if isinstance(value, torch.Tensor) and not (group == "_buffers" and name in skip):
                    out[f"{prefix}{name}"] = value
    children = state.get("_modules")
    if isinstance(children, Mapping):
        for name, child in children.items():
            if isinstance(child, StandIn):
                _walk(child, f"{prefix}{name}.", out, ancestors, visits)


def _plain_state_dict(obj) -> tuple[dict[str, torch.Tensor], str]:
    """A state_dict nested in a checkpoint whose other entries needed stand-ins (an argparse
    Namespace, a numpy scalar...)."""
    obj, trail = find_state_dict(obj)
    if not isinstance(obj, Mapping):
        return {}, ""
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}, trail
