"""Every section of the config refuses keys it does not know, however deep it sits: in list
items (optim.param_groups, model.init), optional sections (pretrained.head_init) and dict values."""

from __future__ import annotations

import types
import typing

import pytest
from pydantic import BaseModel, ValidationError

from transferkit.cli import main
from transferkit.config import Config

UNKNOWN = "zz_not_a_key"


def _inner(annotation) -> list[tuple[object, typing.Any]]:
    """(path step, type) for the models an annotation can hold: `None` steps into a plain
    field, 0 into a list or tuple item, 'k' into a dict value; unions are followed into each arm."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return [found for arm in args for found in _inner(arm)]
    if origin in (list, tuple, set, frozenset):
        return [(0, arm) for arg in args if arg is not Ellipsis for _, arm in _inner(arg)]
    if origin is dict:
        return [("k", arm) for _, arm in _inner(args[1])]
    if origin is typing.Literal:
        return []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(None, annotation)]
    return []


def reachable(model=Config, path=()) -> list[tuple[tuple, type[BaseModel]]]:
    """Every pydantic model reachable from `model`, with a path to it as data would spell it."""
    out = [(path, model)]
    for name, field in model.model_fields.items():
        for step, inner in _inner(field.annotation):
            out += reachable(inner, (*path, name) if step is None else (*path, name, step))
    return out


def test_the_walk_reaches_list_items_and_optional_sections():
    found = {".".join(map(str, p)): m.__name__ for p, m in reachable()}
    assert found == {
        "": "Config", "model": "ModelConfig", "model.init.0": "InitRule", "pretrained": "PretrainedConfig",
        "pretrained.head_init": "HeadInitConfig", "data": "DataConfig", "optim": "OptimConfig",
        "optim.param_groups.0": "ParamRule", "schedule": "ScheduleConfig", "probe": "ProbeConfig",
        "unfreeze": "UnfreezeConfig", "checkpoint": "CheckpointConfig", "detection": "DetectionConfig",
        "optim.ema": "EmaConfig", "logging": "LoggingConfig"}


def nest(path: tuple, leaf: dict) -> dict:
    for step in reversed(path):
        leaf = [leaf] if step == 0 else {step: leaf}
    return leaf


@pytest.mark.parametrize("path, model", reachable(), ids=lambda x: ".".join(map(str, x)) if isinstance(x, tuple)
                         else x.__name__)
def test_every_reachable_section_refuses_unknown_keys(path, model):
    assert model.model_config.get("extra") == "forbid", model.__name__
    data = nest(path, {UNKNOWN: 1})
    if "data" not in data:
        data["data"] = {"root": "x"}
    with pytest.raises(ValidationError) as err:
        Config.model_validate(data)
    locs = [(e["type"], e["loc"]) for e in err.value.errors()]
    assert ("extra_forbidden", (*path, UNKNOWN)) in locs, locs


def test_dict_values_are_walked_too():
    class Leaf(BaseModel):
        x: int = 0

    class Holder(BaseModel):
        by_name: dict[str, Leaf] = {}
        maybe: Leaf | None = None
        pairs: tuple[Leaf, ...] = ()

    assert [(p, m.__name__) for p, m in reachable(Holder)] == [
        ((), "Holder"), (("by_name", "k"), "Leaf"), (("maybe",), "Leaf"), (("pairs", 0), "Leaf")]


def test_a_misspelt_key_in_a_list_item_is_one_line_naming_it(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  root: x\noptim:\n  param_groups:\n    - match: 'classifier.*'\n      lr_mul: 0.1\n")
    assert main(["train", "-c", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: config error in {cfg}: key 'optim.param_groups.0.lr_mul': unknown key "
                   "(check the spelling; see docs/CONFIG.md)\n")
    assert not (tmp_path / "run").exists()
