"""PyTorch checkpoints (.pth/.pt/.bin, zip and legacy formats), loaded with weights_only=True."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile

# Keys under which training scripts nest the weights, most specific first.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def sniff(path: Path, head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or head.startswith(LEGACY_MAGIC) or path.suffix in (
        ".pth", ".pt", ".bin", ".ckpt")


def _unwrap(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    trail = []
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        trail.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise TransferKitError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TransferKitError(f"{path}: no tensors found (top-level keys: {list(obj)[:8]})")
    return tensors, ".".join(trail)


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= len(obj) / 2


def read(path: Path) -> WeightFile:
    try:
        # Zip-format files are memory-mapped: tensors are read from the page cache, not copied.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise TransferKitError(
                f"{path}: refused, unpickling it would run code outside plain tensors ({_global_name(exc)}); "
                "re-save the state_dict only, e.g. torch.save(model.state_dict(), path)"
            ) from None
        raise TransferKitError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TransferKitError(
            f"{path}: truncated or damaged PyTorch checkpoint ({msg}); re-download or re-save it"
        ) from None
    tensors, nested = _unwrap(obj, path)
    meta = {"nested_key": nested} if nested else {}
    return WeightFile(tensors, "pytorch", path, meta)


def _global_name(exc: Exception) -> str:
    # torch words it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module ...".
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"needs {found.group(1)}" if found else "not allowed by weights_only"
