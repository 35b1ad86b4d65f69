"""safetensors files, memory-mapped rather than copied."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import SafetensorError, safe_open

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile


def sniff(path: Path, head: bytes) -> bool:
    if path.suffix == ".safetensors":
        return True
    # 8-byte little-endian header length followed by a JSON object.
    return len(head) > 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000


def read(path: Path) -> WeightFile:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        order = sorted(
            (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
        )
        with safe_open(path, framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in order}
            metadata = fh.metadata() or {}
    except (SafetensorError, struct.error, json.JSONDecodeError, KeyError, TypeError, OSError) as exc:
        raise TransferKitError(f"{path}: damaged safetensors file ({exc}); re-download or re-save it") from None
    return WeightFile(tensors, "safetensors", path, dict(metadata))
