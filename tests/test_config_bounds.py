"""Config inputs that are hostile or cannot work: refused at load time, in one line naming the key or file."""

import math
from pathlib import Path

import pytest
from measure import one_line_error, run_cli

from transferkit.config import load_config
from transferkit.errors import TransferKitError


def alias_bomb(levels: int = 8, fan: int = 9) -> str:
    """`levels` anchors each naming the previous one `fan` times: fan**levels values from ~1 KB."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * fan) + "]")
    lines.append(f"seed: *a{levels}")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast_small_and_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert bomb.stat().st_size < 1200
    result = run_cli("train", "-c", bomb, "--out", tmp_path / "run", timeout=60)
    line = one_line_error(result, str(bomb), "aliases")
    assert len(result.stderr.encode()) < 4096
    assert result.seconds < 10
    assert result.peak_rss < 1.5 * 2**30
    assert len(line) < 400
    assert not (tmp_path / "run").exists()


def test_alias_bomb_in_an_override_and_deep_nesting(tmp_path):
    values = "&a [" + ",".join(["1"] * 50) + "]"
    with pytest.raises(TransferKitError, match="^override 'seed': refused, the value .*more than .* values"):
        load_config(None, ["data.root=x", f"seed=[{values}, " + ", ".join(["*a"] * 5000) + "]"])
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(TransferKitError, match=r"deep\.yaml: .*nested deeper than 64"):
        load_config(deep)
    # aliases that are used a few times, as configs use them, still load
    ok = tmp_path / "ok.yaml"
    ok.write_text("data: &d {root: x, batch_size: 8}\nmodel: {drop_rate: 0.1}\nx_extra: *d\n")
    with pytest.raises(TransferKitError, match="key 'x_extra': unknown key"):
        load_config(ok)


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("data: &d {root: x, more: *d}\n")
    with pytest.raises(TransferKitError, match="recursive"):
        load_config(path)


def test_echoed_values_are_cut(tmp_path):
    long = "x" * 100_000
    with pytest.raises(TransferKitError) as err:
        load_config(None, ["data.root=x", f"seed={long}"])
    msg = str(err.value)
    assert "key 'seed'" in msg and "more characters" in msg and len(msg) < 600
    with pytest.raises(TransferKitError) as err:
        load_config(None, ["data.root=x", f"{long}=1"])
    assert len(str(err.value)) < 600


def test_config_not_in_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  root: caf\u00e9\n".encode("latin-1"))
    result = run_cli("train", "-c", path, "--out", tmp_path / "run", timeout=60)
    line = one_line_error(result, str(path), "UTF-8")
    assert "0xe9" in line


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=1e30", "optim.lr"),
    ("optim.head_lr_mult=.inf", "optim.head_lr_mult"),
    ("optim.head_lr_mult=1e9", "optim.head_lr_mult"),
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("optim.param_groups=[{match: 'x*', lr_mult: .inf}]", "optim.param_groups.0.lr_mult"),
    ("probe.lr=.inf", "probe.lr"),
    ("schedule.warmup_epochs=.inf", "schedule.warmup_epochs"),
    ("checkpoint.every_minutes=.inf", "checkpoint.every_minutes"),
    ("model.init=[{type: normal, std: .nan}]", "model.init.0.std"),
    ("data.crop_scale=[0.5,0.1]", "data.crop_scale"),
    ("data.crop_scale=[0.0,1.0]", "data.crop_scale.0"),
    ("data.crop_scale=[0.5,1.5]", "data.crop_scale.1"),
    ("data.crop_scale=[.nan,1.0]", "data.crop_scale.0"),
    ("data.image_size=20000", "data.image_size"),
    ("data.eval_image_size=20000", "data.eval_image_size"),
    ("data.batch_size=10000000", "data.batch_size"),
    ("seed=-1", "seed"),
    ("seed=18446744073709551616", "seed"),
    ("data.split_seed=-3", "data.split_seed"),
    ("detection.min_size=[]", "detection.min_size"),
    ("detection.max_size=100000", "detection.max_size"),
    ("pretrained.require={backbone: 2}", "pretrained.require.backbone"),
])
def test_values_that_cannot_work_are_refused_naming_the_key(override, key):
    with pytest.raises(TransferKitError) as err:
        load_config(None, ["data.root=x", override])
    msg = str(err.value)
    assert f"key '{key}'" in msg and "\n" not in msg, msg


def test_bounds_keep_working_values():
    cfg = load_config(None, ["data.root=x", "optim.lr=10", "data.crop_scale=[1.0,1.0]", "data.image_size=2048",
                             "seed=4294967295", "optim.head_lr_mult=1000", "detection.min_size=[480,512]"])
    assert cfg.optim.lr == 10 and cfg.data.crop_scale == (1.0, 1.0) and cfg.seed == 2**32 - 1
    assert math.isfinite(cfg.optim.lr * cfg.optim.head_lr_mult)


def test_shipped_configs_are_inside_the_bounds():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")):
        load_config(path, ["data.root=x"])


@pytest.mark.parametrize("override, words", [
    ("data.crop_scale=[0.5,0.1]", ("data.crop_scale", "swap")),
    ("optim.lr=.inf", ("optim.lr", "(got inf)")),
    ("optim.lr=1e30", ("optim.lr", "less than or equal to 10")),
    ("data.image_size=20000", ("data.image_size", "less than or equal to 2048")),
])
def test_values_that_cannot_work_stop_train_at_once_in_one_line(tmp_path, override, words):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    result = run_cli("train", "-o", f"data.root={tmp_path / 'data'}", "-o", override, "--out", tmp_path / "r",
                     timeout=60)
    one_line_error(result, *words)
    assert not (tmp_path / "r").exists()
