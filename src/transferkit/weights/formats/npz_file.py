"""NumPy .npz archives of named arrays (read without pickle)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile


def sniff(path: Path, head: bytes) -> bool:
    return path.suffix == ".npz"


def read(path: Path) -> WeightFile:
    try:
        with np.load(path, allow_pickle=False) as npz:
            tensors = {name: torch.from_numpy(np.ascontiguousarray(npz[name])) for name in npz.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise TransferKitError(f"{path}: refused, an array needs pickle to load ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise TransferKitError(f"{path}: truncated or damaged .npz file ({exc}); re-download or re-save it") from None
    if not tensors:
        raise TransferKitError(f"{path}: the .npz file holds no arrays")
    return WeightFile(tensors, "npz", path)
