"""PyTorch checkpoints (.pth/.pt/.bin, zip and legacy formats), loaded with weights_only=True."""

from __future__ import annotations

import pickle
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from transferkit.errors import TransferKitError, one_line
from transferkit.weights.formats import WeightFile, pickled_module, zip_names
from transferkit.weights.formats.restricted_pickle import DENIED_MODULES
from transferkit.weights.formats.state_dict import find_state_dict

# torch words a refused global "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module ...".
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand \d+")
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def sniff(path: Path, head: bytes) -> bool:
    # torch.save's zip format holds ARCHIVE/data.pkl; the legacy format starts with a fixed pickle.
    return head.startswith(LEGACY_MAGIC) or any(n.endswith("/data.pkl") or n == "data.pkl"
                                                 for n in zip_names(path, head))


def _unwrap(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    obj, trail = find_state_dict(obj)
    if not isinstance(obj, Mapping):
        raise TransferKitError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TransferKitError(f"{path}: no tensors found (top-level keys: {list(obj)[:8]})")
    return tensors, trail


def read(path: Path) -> WeightFile:
    try:
        # Zip-format files are memory-mapped: tensors are read from the page cache, not copied.
        with warnings.catch_warnings():  # a damaged pickle's odd protocol number is reported below, once
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        operand = _OPERAND.search(str(exc))
        if operand:  # stopped before any global (a refused global is worded otherwise): not torch.save's
            raise TransferKitError(
                f"{path}: not a PyTorch checkpoint torch.load reads safely ({_what_it_is(path, operand.group(0))}); "
                "re-download it, or re-save the state_dict with torch.save(model.state_dict(), path)"
            ) from None
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            if _fallback_to_stand_ins(exc, path):  # a pickled whole module (YOLOv5): read inertly
                return pickled_module.read(path)
            raise TransferKitError(
                f"{path}: refused, unpickling it would run code outside plain tensors ({refused_global(exc)}); "
                "re-save the state_dict only, e.g. torch.save(model.state_dict(), path)"
            ) from None
        raise TransferKitError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError, TypeError,
            AttributeError, struct.error, OverflowError, MemoryError, RecursionError, zlib.error,
            UnicodeDecodeError) as exc:
        # torch's restricted unpickler runs no code, but on damaged bytes it fails in many ways.
        msg = one_line(exc)
        raise TransferKitError(
            f"{path}: truncated or damaged PyTorch checkpoint ({msg}); re-download or re-save it"
        ) from None
    tensors, nested = _unwrap(obj, path)
    meta = {"nested_key": nested} if nested else {}
    return WeightFile(tensors, "pytorch", path, meta)


def _what_it_is(path: Path, stopped: str) -> str:
    """What a file torch's safe unpickler stopped on at once looks like: a page of text (an HTML error
    page saved by a failed download, most often), a pickle of a protocol torch.save never writes, or
    neither."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head[:1] == b"\x80" and head[1:2] > b"\x02":
        return f"a pickle of protocol {head[1]}, as pickle.dump writes; torch.save writes protocol 2"
    for cut in range(4):  # the head may end inside a character of several bytes
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip() and all(c.isprintable() or c.isspace() for c in text):
            words = " ".join(text.split())
            page = ": an HTML page, a failed download?" if words.startswith("<") else ""
            return f"it is text, starting {words[:40]!r}{page}"
        break
    return f"the unpickler stopped at once: {stopped}"


def _fallback_to_stand_ins(exc: Exception, path: Path) -> bool:
    """Only a zip file refused for a global that is not a denied function goes to the stand-in reader."""
    found = _GLOBAL.search(str(exc))
    if found is None or not zipfile.is_zipfile(path):
        return False
    return found.group(1).split(".")[0] not in DENIED_MODULES


def refused_global(exc: Exception) -> str:
    """What torch's weights_only unpickler refused, from its message: `needs module.name`."""
    found = _GLOBAL.search(str(exc))
    return f"needs {found.group(1)}" if found else "not allowed by weights_only"
