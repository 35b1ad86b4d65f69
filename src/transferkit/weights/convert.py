"""A source converted to safetensors as it is (`weights convert`).

Converting keeps the source's own names, in PyTorch layout, and carries the reader's record of
where each tensor came from (formats/origins.py) in the safetensors metadata.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from transferkit.fileio import atomic_write
from transferkit.weights.formats import WeightFile, read_weights
from transferkit.weights.sources import resolve_source


def convert(source: str | Path, out: str | Path, sha256: str | None = None) -> WeightFile:
    """Every tensor of `source` under its own name, in PyTorch layout, with the origin record as
    safetensors metadata (string values, as the format requires)."""
    weights = read_weights(resolve_source(source, sha256))
    tensors = _distinct(weights.tensors)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in weights.metadata.items()}
    meta.update({"format": weights.format, "source": str(source)})
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return weights


def conversion_summary(metadata: dict[str, str]) -> str:
    """One line: each conversion and how many tensors had it. Readers record it either as that line
    already (origins.py) or as JSON of tensor -> conversion (the TensorFlow and Keras readers)."""
    converted = metadata.get("converted", "none")
    try:
        per_tensor = json.loads(converted)
    except json.JSONDecodeError:
        return converted
    if not isinstance(per_tensor, dict):
        return converted
    counts = Counter(v for v in per_tensor.values() if v != "unchanged")
    return "; ".join(f"{what}: {n}" for what, n in counts.items()) or "none"


def _distinct(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights, views of one buffer): one copy each
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
