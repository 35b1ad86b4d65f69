"""Model weights as safetensors under canonical names, whatever wrapper the model is in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel / DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise TransferKitError(f"cannot read checkpoint {path}: {exc}") from None
    return {k: _metadata_value(v) for k, v in raw.items()}


def _metadata_value(text: str) -> object:
    """save_weights writes each value as JSON; another tool's file may hold plain text ({"format": "pt"}
    in the Hub's safetensors), which is kept as it is."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def names_outputs(classes: object, count: object) -> bool:
    """Whether `classes` (read from a file: any JSON) is a list of `count` class names."""
    return isinstance(classes, list) and len(classes) == count and all(isinstance(c, str) for c in classes)


def saved_classes(meta: dict, path: str | Path, count: int) -> list[str] | None:
    """The class names a checkpoint was saved with (its metadata's `classes`), or None where it has
    none. Names that are not `count` strings are refused: they would label the outputs wrongly."""
    classes = meta.get("classes")
    if classes is None:
        return None
    if not names_outputs(classes, count):
        raise TransferKitError(f"checkpoint {path}: its metadata's classes are not a list of {count} class names "
                               "(one per output of the model); save it again with transferkit, or remove that key")
    return classes


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a checkpoint written by save_weights; every tensor must fit. Returns its metadata."""
    path = Path(path)
    if not path.is_file():
        raise TransferKitError(f"checkpoint not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise TransferKitError(f"cannot read checkpoint {path}: {exc}") from None
    target = unwrap(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise TransferKitError(
            f"checkpoint {path} does not fit model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} wrong-shape tensors (first: {first}); was it written for another model or class set?"
        )
    with torch.no_grad():
        target.load_state_dict(state)
    return read_metadata(path)
