from pathlib import Path

import pytest

from transferkit.config import load_config, parse_override
from transferkit.errors import TransferKitError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "seed: 3\ndata:\n  root: a\n  batch_size: 8\noptim:\n  lr: 0.5\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\ndata:\n  batch_size: 16\n")
    cfg = load_config(child, ["optim.lr=0.02", "data.crop_scale=[0.3, 1.0]", "schedule.epochs=7"])
    assert cfg.seed == 3
    assert cfg.data.root == Path("a")
    assert cfg.data.batch_size == 16  # child wins over base
    assert cfg.optim.lr == 0.02  # override wins over both
    assert cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.schedule.epochs == 7


def test_required_names_exist_as_documented(tmp_path):
    cfg = load_config(None, ["data.root=x", "data.image_size=160", "data.batch_size=4", "schedule.epochs=2",
                             "optim.lr=0.1", "seed=9"])
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.schedule.epochs, cfg.optim.lr, cfg.seed) == (
        160, 4, 2, 0.1, 9)


def test_scope_aliases_from_tf_object_detection():
    assert load_config(None, ["data.root=x", "pretrained.scope=detection"]).pretrained.scope == "all-but-head"
    assert load_config(None, ["data.root=x", "pretrained.scope=classification"]).pretrained.scope == "backbone"


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("data:\n  root: x\n  batchsize: 3\n", [], "key 'data.batchsize': unknown key"),
        ("data:\n  root: x\n  batch_size: many\n", [], "key 'data.batch_size': Input should be a valid integer"),
        ("seed: 1\n", [], "key 'data': missing required value"),
        ("data:\n  root: x\n", ["optim.lr=-1"], "key 'optim.lr': Input should be greater than 0"),
        ("data:\n  root: x\n", ["optim.nmae=sgd"], "key 'optim.nmae': unknown key"),
    ],
)
def test_schema_errors_name_key_and_file(tmp_path, text, overrides, expected):
    path = write(tmp_path / "run.yaml", text)
    with pytest.raises(TransferKitError) as err:
        load_config(path, overrides)
    msg = str(err.value)
    assert expected in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "data:\n  root: x\n  batch_size: [1,\n")
    with pytest.raises(TransferKitError, match=r"bad\.yaml:\d+: .*fix the YAML syntax"):
        load_config(path)


def test_missing_file_and_base_loop(tmp_path):
    with pytest.raises(TransferKitError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(TransferKitError, match="_base_ inheritance loops"):
        load_config(tmp_path / "a.yaml")


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("x=null") == (["x"], None)
    # YAML reads 1e-3 as a string; the schema still takes it as a float.
    assert load_config(None, ["data.root=x", "optim.lr=1e-3"]).optim.lr == 0.001
    with pytest.raises(TransferKitError, match="must look like key.sub=value"):
        parse_override("novalue")
    with pytest.raises(TransferKitError, match="is a value, not a section"):
        load_config(None, ["data.root=x", "seed=1", "seed.sub=1"])


def test_every_config_key_is_documented():
    from types import UnionType
    from typing import get_args

    from conftest import REPO
    from pydantic import BaseModel

    from transferkit.config import Config

    doc = (REPO / "docs" / "CONFIG.md").read_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            # a section, or an optional one (`EmaConfig | None`): its own key and each of its keys
            options = get_args(field.annotation) if isinstance(field.annotation, UnionType) else ()
            sections = [t for t in (field.annotation, *options) if isinstance(t, type) and issubclass(t, BaseModel)]
            if sections and sections[0] is not field.annotation:
                yield prefix + name
            if sections:
                yield from keys(sections[0], f"{prefix}{name}.")
            else:
                yield prefix + name

    missing = [k for k in keys(Config) if f"`{k}`" not in doc]
    assert not missing, f"keys missing from docs/CONFIG.md: {missing}"
    assert len(list(keys(Config))) > 30
