"""compare: one config trained several ways under one parent folder, with a table and a plot."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides

from transferkit.cli import main
from transferkit.compare import compare, parse_arms
from transferkit.config import load_config
from transferkit.errors import TransferKitError
from transferkit.run import train


@pytest.fixture(scope="module")
def source_run(synth_root, tmp_path_factory):
    """A tiny trained run: the pretrained source the arms start from."""
    out = tmp_path_factory.mktemp("source") / "run"
    train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1})), out=out, quiet=True)
    return out


def test_compare_trains_each_arm_on_one_budget(synth_root, source_run, tmp_path, capsys):
    overrides = tiny_overrides(synth_root, **{"schedule.epochs": 2, "probe.epochs": 1,
                                              "pretrained.source": str(source_run)})
    args = ["compare", *sum((["-o", o] for o in overrides), []), "--arms", "finetune,scratch,linear_probe,lp_ft",
            "--out", str(tmp_path / "cmp")]
    # -c is required on the command line: a config file holding nothing but the defaults
    (tmp_path / "empty.yaml").write_text("{}\n")
    assert main(["compare", "-c", str(tmp_path / "empty.yaml"), *args[1:]]) == 0
    printed = capsys.readouterr().err  # the table goes where the progress goes
    assert "transfer bought" in printed and "lp_ft" in printed
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["metric"] == "val_acc" and list(report["arms"]) == ["finetune", "scratch", "linear_probe", "lp_ft"]
    rows = {arm: [json.loads(line) for line in (tmp_path / "cmp" / arm / "metrics.jsonl").read_text().splitlines()]
            for arm in report["arms"]}
    # the same budget: two epochs each; lp_ft probes one epoch first
    assert [len(r) for r in rows.values()] == [2, 2, 2, 3]
    assert [r["phase"] for r in rows["lp_ft"]] == ["probe", "finetune", "finetune"]
    for arm, r in report["arms"].items():
        assert r["val_acc"] == rows[arm][-1]["val_acc"]
        assert r["best_val_acc"] == max(row["val_acc"] for row in rows[arm])
    # only the scratch arm trained without the source
    assert (tmp_path / "cmp" / "finetune" / "transfer_report.json").is_file()
    assert not (tmp_path / "cmp" / "scratch" / "transfer_report.json").exists()
    assert (tmp_path / "cmp" / "report.png").stat().st_size > 1000
    # a second compare into the same folder is refused before anything trains
    with pytest.raises(TransferKitError, match="already holds a run"):
        compare(None, overrides, ["scratch"], tmp_path / "cmp", quiet=True)


def test_arms_are_checked_before_training(synth_root, tmp_path):
    assert parse_arms("scratch, finetune") == ["scratch", "finetune"]
    with pytest.raises(TransferKitError, match="frozen unknown"):
        parse_arms("finetune,frozen")
    with pytest.raises(TransferKitError, match="names an arm twice"):
        parse_arms("scratch,scratch")
    # a detection config has no probe arm: refused before any arm trains
    with pytest.raises(TransferKitError, match="strategy linear_probe is for classifiers"):
        compare(None, [*tiny_overrides(synth_root), "task=detection"], ["finetune", "linear_probe"],
                tmp_path / "det", quiet=True)
    assert not (tmp_path / "det" / "finetune").exists()


def test_compare_replaces_no_report_and_trains_into_no_folder_it_did_not_write(synth_root, tmp_path, capsys):
    """Refused before the first arm trains: a report.json of the user's in --out (unless --force), an
    arm's folder holding the user's files; both left as they were."""
    overrides = tiny_overrides(synth_root, **{"schedule.epochs": 1})
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "report.json").write_text("my notes")
    with pytest.raises(TransferKitError, match=rf"{out / 'report.json'}.*add --force to replace"):
        compare(None, overrides, ["scratch"], out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    mine = tmp_path / "mine"
    (mine / "finetune").mkdir(parents=True)
    (mine / "finetune" / "notes.txt").write_text("keep")
    with pytest.raises(TransferKitError, match=r"finetune is not empty and is not a transferkit run"):
        compare(None, overrides, ["scratch", "finetune"], mine, quiet=True)
    assert sorted(p.name for p in mine.rglob("*")) == ["finetune", "notes.txt"]  # scratch did not train
    with pytest.raises(TransferKitError, match=r"is a file; give compare a new folder"):
        compare(None, overrides, ["scratch"], mine / "finetune" / "notes.txt", quiet=True)
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = ["compare", "-c", str(tmp_path / "empty.yaml"), *sum((["-o", o] for o in overrides), []),
            "--arms", "scratch", "--out", str(out), "--force"]
    assert main(args) == 0
    assert list(json.loads((out / "report.json").read_text())["arms"]) == ["scratch"]


def test_detection_compares_a_pretrained_backbone_with_a_random_one(source_run, tmp_path):
    from transferkit.data.synthetic import make_synthetic_detection

    root = make_synthetic_detection(tmp_path / "shapes", 6, 3, 96, seed=0)
    values = {
        "task": "detection", "model.name": "test_efficientnet", "data.root": str(root), "data.format": "coco",
        "data.train_ann": str(root / "annotations" / "train.json"), "data.train_images": str(root / "images" / "train"),
        "data.val_ann": str(root / "annotations" / "val.json"), "data.val_images": str(root / "images" / "val"),
        "data.batch_size": 3, "detection.arch": "fcos", "detection.min_size": "[96]", "detection.max_size": 96,
        "detection.fpn_channels": 64, "schedule.epochs": 1,
        # the classifier run's network restored into the detector's backbone
        "pretrained.source": str(source_run), "pretrained.scope": "backbone",
    }
    report = compare(None, [f"{k}={v}" for k, v in values.items()], ["finetune", "scratch"], tmp_path / "cmp",
                     quiet=True)
    assert report["task"] == "detection" and report["metric"] == "val_map"
    restored = json.loads((tmp_path / "cmp" / "finetune" / "transfer_report.json").read_text())
    assert restored["counts"]["loaded"] > 0 and restored["scope"] == "backbone"
    assert not (tmp_path / "cmp" / "scratch" / "transfer_report.json").exists()
    assert set(report["arms"]) == {"finetune", "scratch"}
