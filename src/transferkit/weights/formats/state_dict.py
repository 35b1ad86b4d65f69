"""Where training scripts nest the weights inside a checkpoint dictionary, and finding them."""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Keys under which training scripts nest the weights, most specific first.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= len(obj) / 2


def find_state_dict(obj: object) -> tuple[object, str]:
    """Follow NESTED_KEYS down to the mapping that holds the tensors; returns it (or whatever was
    found instead) and the dotted trail of keys taken."""
    trail = []
    while isinstance(obj, Mapping) and not is_state_dict(obj):
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        trail.append(key)
        obj = obj[key]
    return obj, ".".join(trail)
