"""PaddlePaddle `.pdparams` (a `paddle.save` pickle of a dict of numpy arrays), read without Paddle.

The pickle goes through restricted_pickle with no stand-ins: numpy arrays (rebuilt by that
module from the file's bytes) and plain containers are all it may hold; any other global stops
the read. The `StructuredToParameterName@@` bookkeeping entry (`1.weight` -> `linear_0.w_0`) goes
into the metadata, not among the tensors.

Layout: Paddle's Linear stores its weight as [in, out], the transpose of PyTorch's. A 2-D
`.weight` is transposed when its Paddle parameter name says it is a Linear (`linear_N.w_0`,
Paddle 1.x `fc_N.w_0`); without the bookkeeping entry, every 2-D `.weight` is taken for a Linear
unless its name says embedding (`emb`). Convolution weights are already [out, in, kh, kw] and
embeddings [num, dim], as in PyTorch. BatchNorm's `_mean`/`_variance` become
`running_mean`/`running_var`. Each tensor's conversion is recorded in the metadata.
"""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path

import numpy as np

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile, tensor_from_numpy
from transferkit.weights.formats.restricted_pickle import Damaged, Refused, restricted_load
from transferkit.weights.formats.tf_layout import as_metadata

STRUCTURED_KEY = "StructuredToParameterName@@"
LINEAR_PARAM = re.compile(r"^(linear|fc)_\d+\.w_\d+$")
RENAMES = {"_mean": "running_mean", "_variance": "running_var"}


def sniff(path: Path, head: bytes) -> bool:
    # By content (the .pdparams/.pdopt suffixes are the registry's fallback): a pickle (protocol
    # 2-5) whose first global is numpy's, as paddle.save writes
    return len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and b"numpy" in head


def read(path: Path) -> WeightFile:
    try:
        obj, _ = restricted_load(path.read_bytes(), stand_ins=False)
    except Refused as exc:
        raise TransferKitError(f"{path}: refused, {exc}; a .pdparams file holds only arrays") from None
    except Damaged as exc:
        raise TransferKitError(f"{path}: damaged Paddle parameters file ({exc}); re-download or re-save it") from None
    except OSError as exc:
        raise TransferKitError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, struct.error, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            RecursionError, OverflowError, UnicodeDecodeError) as exc:
        raise TransferKitError(
            f"{path}: truncated or damaged Paddle parameters file ({type(exc).__name__}: {str(exc)[:80]}); "
            "re-download or re-save it"
        ) from None
    if not isinstance(obj, dict):
        raise TransferKitError(f"{path}: holds a {type(obj).__name__}, not a dictionary of parameters")
    structured = obj.get(STRUCTURED_KEY)
    structured = {str(k): str(v) for k, v in structured.items()} if isinstance(structured, dict) else {}

    tensors, converted, left_out = {}, {}, []
    for key, value in obj.items():
        if key == STRUCTURED_KEY:
            continue
        if not isinstance(value, np.ndarray) or not isinstance(key, str):
            left_out.append(str(key))
            continue
        name, array, how = _convert(key, value, structured.get(key))
        tensors[name] = tensor_from_numpy(array)
        converted[name] = how
    if not tensors:
        raise TransferKitError(f"{path}: no arrays found (keys: {list(obj)[:8]})")
    meta = {
        "source_format": "paddle pdparams",
        "dtype": ",".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})),
        "converted": as_metadata(converted),
    }
    if structured:
        meta["parameter_names"] = as_metadata(structured)
    if left_out:
        meta["left_out"] = as_metadata(left_out)
    return WeightFile(tensors, "paddle", path, meta)


def _convert(key: str, array: np.ndarray, param_name: str | None) -> tuple[str, np.ndarray, str]:
    prefix, _, leaf = key.rpartition(".")
    if leaf in RENAMES:
        return f"{prefix}.{RENAMES[leaf]}" if prefix else RENAMES[leaf], array, f"{leaf} -> {RENAMES[leaf]}"
    if leaf == "weight" and array.ndim == 2:
        linear = bool(LINEAR_PARAM.match(param_name)) if param_name else "emb" not in key.lower()
        if linear:
            return key, array.T, f"linear [in,out] -> [out,in] ({param_name or 'by shape and name'})"
    return key, array, "unchanged"
