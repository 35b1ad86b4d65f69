import json
from pathlib import Path

import pytest
import yaml

from transferkit.config import Config, load_config, parse_override
from transferkit.errors import TransferKitError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
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


def test_base_errors_name_the_file_and_the_loop(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(TransferKitError) as err:
        load_config(tmp_path / "a.yaml")
    a, b = (tmp_path / "a.yaml").resolve(), (tmp_path / "b.yaml").resolve()
    assert str(err.value) == f"{a}: _base_ inheritance loops: {a} -> {b} -> {a}"
    for bases in ("5", "[base.yaml, 3]", "{x: 1}"):
        path = write(tmp_path / "child.yaml", f"_base_: {bases}\n")
        with pytest.raises(TransferKitError) as err:
            load_config(path)
        assert str(err.value) == f"{path.resolve()}: _base_ must be a path or a list of paths"


def test_unreadable_or_non_mapping_files_are_one_line_naming_the_file(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("data:\n  root: caf\u00e9\n".encode("latin-1"))  # the accented e is byte 17
    with pytest.raises(TransferKitError) as err:
        load_config(latin1)
    assert str(err.value) == f"{latin1}: not UTF-8 text (byte 0xe9 at offset 17); save the config as UTF-8"
    with pytest.raises(TransferKitError) as err:
        load_config(tmp_path)  # a folder
    assert str(err.value).startswith(f"cannot read config file {tmp_path}: ")
    with pytest.raises(TransferKitError) as err:
        load_config(write(tmp_path / "list.yaml", "- data\n- root\n"))
    assert str(err.value) == f"{tmp_path / 'list.yaml'}: a config must be a mapping of keys, got list"
    # an empty file is an empty mapping
    assert load_config(write(tmp_path / "empty.yaml", ""), ["data.root=x"]).data.root == Path("x")


def test_override_errors_quote_the_override():
    with pytest.raises(TransferKitError, match=r"^override 'novalue' must look like key.sub=value$"):
        parse_override("novalue")
    for text in ("a..b=1", ".a=1", "a.=1", "=1"):
        with pytest.raises(TransferKitError, match="must look like key.sub=value"):
            parse_override(text)
    with pytest.raises(TransferKitError, match=r"^override 'seed=\[1,': the value is not valid YAML$"):
        parse_override("seed=[1,")
    with pytest.raises(TransferKitError, match=r"^override 'seed.sub=1': 'seed' is a value, not a section"):
        load_config(None, ["data.root=x", "seed=1", "seed.sub=1"])
    # the value is everything after the first `=`
    assert parse_override("pretrained.exclude=[a=b]") == (["pretrained", "exclude"], ["a=b"])


def test_schema_errors_show_the_value_and_count_the_rest():
    with pytest.raises(TransferKitError) as err:
        load_config(None, ["data.root=x", "optim.lr=-1"])
    assert str(err.value) == ("config error in the command line (with -o overrides): key 'optim.lr': "
                              "Input should be greater than 0 (got -1)")
    with pytest.raises(TransferKitError) as err:
        load_config(None, ["data.root=x", "optim.lr=-1", "seed=-1"])
    assert str(err.value).endswith(" (and 1 more)")
    with pytest.raises(TransferKitError) as err:
        load_config(None, ["data.root=x", "optim.lr=-1", "seed=-1", "data.batch_size=0"])
    assert str(err.value).endswith(" (and 2 more)")


def test_a_detector_from_the_zoo_names_its_builder_and_the_config():
    cfg = load_config(None, ["data.root=x", "task=detection",
                             "pretrained.source=torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"])
    assert cfg.detection.torchvision_model == "retinanet_resnet50_fpn"
    with pytest.raises(TransferKitError) as err:
        load_config(None, ["data.root=x", "task=detection", "detection.torchvision_model=fcos_resnet50_fpn",
                           "pretrained.source=torchvision:retinanet_resnet50_fpn.DEFAULT"])
    assert str(err.value).startswith("config error in the command line (with -o overrides): pretrained.source "
                                     "torchvision:retinanet_resnet50_fpn.DEFAULT holds retinanet_resnet50_fpn")
    # the detection section is read by detection only
    cfg = load_config(None, ["data.root=x", "detection.torchvision_model=fcos_resnet50_fpn",
                             "pretrained.source=torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"])
    assert cfg.detection.torchvision_model == "fcos_resnet50_fpn"
    # a detector without pretrained weights is left to model.name
    assert load_config(None, ["data.root=x", "task=detection", "pretrained.source=null"]
                       ).detection.torchvision_model is None


def test_the_written_config_reads_back_the_same(tmp_path):
    cfg = load_config(None, ["data.root=some/where", "out=runs/x", "task=detection", "optim.ema={}",
                             "model.init=[{type: normal, override: head}]"])
    text = cfg.to_yaml()
    assert list(yaml.safe_load(text)) == list(Config.model_fields)  # in the schema's order, as documented
    assert load_config(write(tmp_path / "config.yaml", text)) == cfg
    assert json.loads(json.dumps(cfg.to_dict()))["data"]["root"] == "some/where"
