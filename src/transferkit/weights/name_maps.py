"""Name maps: a JSON file saying which source tensor goes to which target tensor, for sources whose
order parts from the model's (TensorFlow's Keras layer order, an export in execution order).

Two forms are read:

- an object ``{"source name": "target name", ...}``;
- a layer table ``[{"name": LAYER, "weight": [TARGET, ...]}, ...]`` (the form conversion scripts
  write), whose LAYER is a source layer: the source tensors of that layer, in order, go to the
  listed targets. A TensorFlow checkpoint's tensors belong to the layer of their variable name
  (metadata ``variable_names``, e.g. ``basenet.0.0_conv/kernel``); other sources' to their name
  without its last part.

The map becomes exact rename rules, so it goes through the same matcher as `--rename`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile

MAX_MAP_BYTES = 16 << 20  # a name map is text; anything larger is not one


def read_name_map(path: str | Path, weights: WeightFile) -> dict[str, str]:
    """source name -> target name, from a map file in either form."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_MAP_BYTES:
            raise TransferKitError(f"{path}: over {MAX_MAP_BYTES >> 20} MiB, not a name map")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TransferKitError(f"cannot read name map {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TransferKitError(f"{path}: not a JSON name map ({exc}); give an object or a layer table") from None
    if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return dict(data)
    if isinstance(data, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                      and isinstance(e.get("weight"), list) for e in data):
        return _from_layer_table(path, data, weights)
    raise TransferKitError(f"{path}: a name map is an object of source -> target names, or a list of "
                           '{"name": LAYER, "weight": [TARGET, ...]} entries')


def _from_layer_table(path: Path, table: list[dict], weights: WeightFile) -> dict[str, str]:
    layers: dict[str, list[str]] = {}
    for name, layer in _layer_of(weights).items():
        layers.setdefault(layer, []).append(name)
    out = {}
    for entry in table:
        sources = layers.get(entry["name"], [])
        if len(sources) != len(entry["weight"]):
            raise TransferKitError(
                f"{path}: layer {entry['name']!r} lists {len(entry['weight'])} tensors but the source has "
                f"{len(sources)} in that layer; is the map for this file?")
        out.update(zip(sources, (str(t) for t in entry["weight"]), strict=True))
    return out


def _layer_of(weights: WeightFile) -> dict[str, str]:
    variables = weights.metadata.get("variable_names")
    if variables:
        try:
            names = json.loads(variables)
        except ValueError:
            names = None
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise TransferKitError(f"{weights.path}: its metadata variable_names is not a JSON object of tensor -> "
                                   "variable names; convert the checkpoint again, or give an object name map")
        return {name: var.rsplit("/", 1)[0] for name, var in names.items()}
    return {name: name.rsplit(".", 1)[0] for name in weights.tensors}


def as_rename_rules(name_map: Mapping[str, str]) -> list[tuple[str, str]]:
    """Exact rename rules (whole names, nothing else touched)."""
    return [(f"^{re.escape(src)}$", dst.replace("\\", "\\\\")) for src, dst in name_map.items()]
