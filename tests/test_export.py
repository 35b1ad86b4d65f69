"""Export: a tiny classifier and a tiny FCOS written as ONNX and TorchScript agree with PyTorch on
the runs' validation images (logits within 1e-4, the same boxes within 1e-3 px), carry their class
names and preprocessing, and `predict --model X.onnx` prints what `predict --run` prints."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch
from conftest import HYMENOPTERA, needs_shared, tiny_overrides
from PIL import Image

from transferkit.cli import main
from transferkit.config import load_config
from transferkit.data.synthetic import make_synthetic_detection
from transferkit.deploy import META_FILE, export, read_metadata
from transferkit.errors import TransferKitError
from transferkit.run import train
from transferkit.tasks.base import Agreement
from transferkit.tasks.classification import compare_logits
from transferkit.tasks.detection import box_difference


@pytest.fixture(scope="module")
def classifier_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "run"
    train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1})), out=out, quiet=True)
    return out


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory):
    root = make_synthetic_detection(tmp_path_factory.mktemp("shapes"), 8, 4, 96, seed=0)
    values = {
        "task": "detection", "model.name": "test_efficientnet", "pretrained.source": "null",
        "data.root": str(root), "data.format": "coco",
        "data.train_ann": str(root / "annotations" / "train.json"), "data.train_images": str(root / "images" / "train"),
        "data.val_ann": str(root / "annotations" / "val.json"), "data.val_images": str(root / "images" / "val"),
        "data.batch_size": 4, "optim.name": "adamw", "optim.lr": 0.001, "detection.arch": "fcos",
        "detection.min_size": "[96]", "detection.max_size": 96, "detection.fpn_channels": 64,
        # a one-epoch detector scores low: a threshold of 0.01 leaves boxes to compare
        "detection.score_threshold": 0.01, "detection.detections_per_image": 20, "schedule.epochs": 1,
    }
    out = root / "run"
    train(load_config(None, [f"{k}={v}" for k, v in values.items()]), out=out, quiet=True)
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_classifier_export_agrees_with_pytorch(classifier_run, tmp_path, fmt, capsys):
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--run", str(classifier_run), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agree on 4/4" in printed and "tolerance 0.0001" in printed, printed
    # the file reproduces the checkpoint's logits on an image it was not checked on
    from transferkit.tasks import task_for
    from transferkit.training.rundir import run_config
    task = task_for(run_config(classifier_run))
    run = task.load_run(classifier_run)
    x = torch.rand(1, 3, 32, 32)
    want = run.model(x)
    if fmt == "onnx":
        got = torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0])
        meta = read_metadata(out)
    else:
        extra = {META_FILE: ""}
        got = torch.jit.load(str(out), _extra_files=extra)(x)
        meta = json.loads(extra[META_FILE])
    assert (want - got).abs().max() < 1e-4
    assert json.loads(meta["classes"]) == ["circle", "cross", "square"]
    assert meta["task"] == "classification" and meta["image_size"] == "32"
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])


def test_dynamic_batch_onnx_takes_any_batch(classifier_run, tmp_path):
    result = export(classifier_run, "onnx", tmp_path / "m.onnx", dynamic_batch=True, check_images=5)
    assert result.agreement.inputs == 5 and result.agreement.ok
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    assert session.run(None, {"images": torch.rand(7, 3, 32, 32).numpy()})[0].shape == (7, 3)
    fixed = export(classifier_run, "onnx", tmp_path / "f.onnx")
    assert ort.InferenceSession(str(fixed.path)).get_inputs()[0].shape[0] == 1


def test_predict_with_onnx_equals_predict_with_run(classifier_run, synth_root, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    export(classifier_run, "onnx", out)
    images = synth_root / "val" / "cross"
    assert main(["predict", "--run", str(classifier_run), str(images), "--topk", "2", "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["predict", "--model", str(out), str(images), "--topk", "2", "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert len(from_run) == 10
    assert [[p["class"] for p in r["predictions"]] for r in from_onnx] == \
        [[p["class"] for p in r["predictions"]] for r in from_run]
    for a, b in zip(from_run, from_onnx, strict=True):
        assert [p["prob"] for p in a["predictions"]] == pytest.approx([p["prob"] for p in b["predictions"]], abs=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_detector_export_keeps_the_boxes(detector_run, tmp_path, fmt):
    result = export(detector_run, fmt, tmp_path / f"det.{fmt}")
    a = result.agreement
    assert a.ok and a.agreed == a.inputs == 4 and a.max_diff <= 1e-3, result.summary()


def test_detector_onnx_predicts_as_the_run(detector_run, tmp_path, capsys):
    out = tmp_path / "det.onnx"
    export(detector_run, "onnx", out)
    meta = read_metadata(out)
    assert json.loads(meta["classes"]) == ["circle", "square", "triangle"] and meta["label_offset"] == "0"
    # an image of another size than the validation images: the exported graph resizes it itself
    image = tmp_path / "wide.png"
    Image.open(detector_run.parent / "images" / "val" / "val_0000.png").resize((120, 90)).save(image)
    assert main(["predict", "--run", str(detector_run), str(image), "--score", "0.01", "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)[0]["detections"]
    assert main(["predict", "--model", str(out), str(image), "--score", "0.01", "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)[0]["detections"]
    assert from_run, "the tiny detector found nothing: the comparison would be empty"
    assert sorted(from_onnx, key=lambda d: d["box"]) == sorted(from_run, key=lambda d: d["box"])


def test_detector_refuses_dynamic_batch(detector_run, tmp_path):
    with pytest.raises(TransferKitError, match="--dynamic-batch is for classifiers"):
        export(detector_run, "onnx", tmp_path / "x.onnx", dynamic_batch=True)


def test_comparisons_catch_disagreement():
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert compare_logits([[logits]], [[logits + 5e-5]]).ok
    off = compare_logits([[logits]], [[logits + torch.tensor([[0.0, 0.0], [0.0, 3.5]])]])
    assert not off.ok and off.agreed == 1 and off.max_diff == pytest.approx(3.5)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    labels = torch.tensor([0, 1])
    swapped = [boxes.flip(0), labels.flip(0)]  # the same boxes in another order are the same boxes
    assert box_difference([boxes, labels], swapped) == 0.0
    assert box_difference([boxes, labels], [boxes + 2e-3, labels]) == pytest.approx(2e-3, abs=1e-5)
    assert box_difference([boxes, labels], [boxes, torch.tensor([1, 0])]) == 10.0  # each class now on the other box
    assert box_difference([boxes, labels], [boxes[:1], labels[:1]]) == float("inf")
    assert not Agreement("x", 0.0, 1e-3, 3, 4).ok


def test_missing_and_wrong_files_are_one_line_errors(classifier_run, tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "none.onnx"), str(tmp_path)]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "m.pt"), str(tmp_path)]) == 2
    assert "give an .onnx file" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path), "--format", "onnx"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_missing_onnx_packages_are_named_in_one_line(classifier_run, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the `export` extra were not installed
    assert main(["export", "--run", str(classifier_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: ONNX needs onnx and onnxruntime: pip install 'transferkit[export]'"
    assert not (tmp_path / "m.onnx").exists()


@needs_shared
def test_real_photos_export_and_predict_as_the_run(tmp_path, capsys):
    """Ants vs bees photos of every size: a one-epoch tiny classifier, exported, predicts all 70
    validation ants as the run does."""
    overrides = tiny_overrides(HYMENOPTERA, **{"schedule.epochs": 1, "data.eval_image_size": "null"})
    train(load_config(None, overrides), out=tmp_path / "run", quiet=True)
    result = export(tmp_path / "run", "onnx", tmp_path / "hym.onnx", check_images=8)
    assert result.agreement.ok and result.agreement.inputs == 8
    ants = str(HYMENOPTERA / "val" / "ants")
    assert main(["predict", "--run", str(tmp_path / "run"), ants, "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["predict", "--model", str(tmp_path / "hym.onnx"), ants, "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert len(from_run) == 70
    assert [r["predictions"][0]["class"] for r in from_onnx] == [r["predictions"][0]["class"] for r in from_run]
    assert [r["predictions"][0]["prob"] for r in from_onnx] == pytest.approx(
        [r["predictions"][0]["prob"] for r in from_run], abs=1e-5)


def test_export_replaces_its_own_file_but_not_the_users(classifier_run, tmp_path, capsys):
    assert main(["export", "--run", str(classifier_run), "--format", "onnx"]) == 0  # RUN_DIR/export/best.onnx
    assert main(["export", "--run", str(classifier_run), "--format", "onnx"]) == 0  # its own: replaced
    mine = tmp_path / "model.onnx"
    mine.write_text("the user's")
    capsys.readouterr()
    assert main(["export", "--run", str(classifier_run), "--format", "onnx", "--out", str(mine)]) == 2
    assert "did not write" in capsys.readouterr().err and mine.read_text() == "the user's"
    assert main(["export", "--run", str(classifier_run), "--format", "onnx", "--out", str(mine), "--force"]) == 0
    assert read_metadata(mine)["task"] == "classification"


@pytest.fixture(scope="module")
def classifier_onnx(classifier_run, tmp_path_factory):
    return export(classifier_run, "onnx", tmp_path_factory.mktemp("onnx") / "model.onnx").path


@pytest.mark.parametrize(("key", "value", "says"), [
    ("classes", '["circle", "cross"', "its metadata 'classes' is not JSON"),
    ("classes", '"circle"', "its metadata 'classes' is not a list of 3 class names"),
    ("classes", '["circle", "cross"]', "its metadata 'classes' is not a list of 3 class names"),
    ("classes", '["circle", "cross", null]', "its metadata 'classes' is not a list of 3 class names"),
    ("mean", "[0.5, 0.5]", "its metadata 'mean' is not three numbers (one per RGB channel)"),
    ("mean", '[0.5, 0.5, "x"]', "its metadata 'mean' is not three numbers (one per RGB channel)"),
    ("mean", "[true, 0.5, 0.5]", "its metadata 'mean' is not three numbers (one per RGB channel)"),
    ("std", "[0.2, 0.2, 0]", "its metadata 'std' is not three numbers above zero"),
    ("std", "[0.2, 0.2, NaN]", "its metadata 'std' is not three numbers above zero"),
    ("crop_pct", "1e-9", "its metadata 'crop_pct' is '1e-9', not a number from 0.25 to 1"),
    ("crop_pct", "0", "its metadata 'crop_pct' is '0', not a number from 0.25 to 1"),
    ("crop_pct", "1.5", "its metadata 'crop_pct' is '1.5', not a number from 0.25 to 1"),
    ("crop_pct", "abc", "its metadata 'crop_pct' is 'abc', not a number from 0.25 to 1"),
    ("interpolation", "lanczos", "its metadata 'interpolation' is 'lanczos', not one of bilinear, bicubic, nearest"),
], ids=["classes-not-json", "classes-a-string", "classes-too-few", "classes-not-names", "mean-two", "mean-text",
        "mean-bool", "std-zero", "std-nan", "crop-tiny", "crop-zero", "crop-above-one", "crop-text",
        "interpolation-unknown"])
def test_an_onnx_file_with_damaged_metadata_is_one_line(classifier_onnx, synth_root, tmp_path, capsys, key, value,
                                                        says):
    """The file given to `predict --model` may be anyone's: each of these was a traceback, names that
    labelled the outputs wrongly, or (a crop_pct near zero) each image resized to an unbounded size."""
    import onnx

    proto = onnx.load(str(classifier_onnx))
    next(p for p in proto.metadata_props if p.key == key).value = value
    damaged = tmp_path / "damaged.onnx"
    onnx.save(proto, str(damaged))
    image = next((synth_root / "val" / "circle").iterdir())
    assert main(["predict", "--model", str(damaged), str(image)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {damaged}: {says}")
    assert line.endswith("; write the file again with `transferkit export`")
