"""safetensors files, memory-mapped rather than copied.

The 8-byte header length is checked against the file's size (and safetensors' own 100 MB header
limit) before anything is read: an absurd length would otherwise be handed to `read()` as a size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import SafetensorError, safe_open

from transferkit.errors import TransferKitError, one_line
from transferkit.weights.formats import WeightFile

MAX_HEADER = 100_000_000  # bytes; the limit the safetensors library itself enforces


def sniff(path: Path, head: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON object.
    return len(head) > 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < MAX_HEADER


def _header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise TransferKitError(f"{path}: {size} bytes, too short for a safetensors file; re-download or re-save it")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, MAX_HEADER):
            raise TransferKitError(
                f"{path}: damaged safetensors file (its header length {n:,} is larger than the "
                f"{size - 8:,} bytes that follow it); re-download or re-save it"
            )
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 and bad JSON
            raise TransferKitError(f"{path}: damaged safetensors header ({one_line(exc)}); "
                                   "re-download or re-save it") from None
    if not isinstance(header, dict):
        raise TransferKitError(f"{path}: damaged safetensors header (not a JSON object); re-download or re-save it")
    return header


def read(path: Path) -> WeightFile:
    header = _header(path)
    try:
        order = sorted(
            (k for k in header if k != "__metadata__"), key=lambda k: int(header[k]["data_offsets"][0])
        )
        with safe_open(path, framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in order}
            metadata = fh.metadata() or {}
    except (SafetensorError, KeyError, TypeError, IndexError, ValueError, OverflowError, OSError) as exc:
        what = one_line(exc)
        raise TransferKitError(f"{path}: damaged safetensors file ({what}); re-download or re-save it") from None
    return WeightFile(tensors, "safetensors", path, dict(metadata))
