"""`data check` on real samples and on datasets broken on purpose; training's start-up checks."""

import json
import shutil

from conftest import SHARED_DATA, needs_shared, tiny_overrides

from transferkit.cli import main
from transferkit.data.check import check_dataset

VOC = SHARED_DATA / "voc_mini" / "VOCdevkit"


@needs_shared
def test_truncated_voc_images_are_caught(capsys):
    for year, truncated in (("VOC2007", "000001.jpg"), ("VOC2012", "2007_000027.jpg")):
        assert main(["data", "check", str(VOC / year)]) == 1
        out = capsys.readouterr().out
        assert "error: undecodable image x 1" in out and truncated in out and "truncated" in out
    report = check_dataset(VOC / "VOC2007")
    assert [f.kind for f in report.errors] == ["undecodable image"]
    assert {f.kind for f in report.at("note")} == {"difficult skipped"}


@needs_shared
def test_clean_real_datasets_pass(capsys):
    assert main(["data", "check", str(SHARED_DATA / "labelme_examples" / "bbox_detection" / "data_annotated")]) == 0
    assert "no problems found" in capsys.readouterr().out
    report = check_dataset(SHARED_DATA / "coco128" / "annotations" / "instances_train2017.json")
    assert report.images == 128 and not report.errors
    assert sum(report.class_counts.values()) == 939 and report.class_counts["person"] == 259


def test_broken_folder_dataset(synth_root, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(synth_root, root)
    good = root / "train" / "cross" / "cross_0000.png"
    (root / "train" / "cross" / "trunc.png").write_bytes(good.read_bytes()[:200])
    shutil.copy(good, root / "train" / "cross" / "copy.png")
    (root / "train" / "empty").mkdir()
    for i in range(24):
        if i > 1:
            (root / "train" / "square" / f"square_{i:04d}.png").unlink()
    assert main(["data", "check", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    kinds = {(f["kind"], f["level"]) for f in report["findings"]}
    assert kinds == {("undecodable image", "error"), ("duplicate image", "warning"), ("empty class", "error"),
                     ("class imbalance", "warning")}
    found = {f["kind"]: f for f in report["findings"]}
    assert found["undecodable image"]["where"].endswith("trunc.png")
    assert found["duplicate image"]["where"].endswith("cross_0000.png") or found["duplicate image"]["where"].endswith(
        "copy.png")
    assert found["empty class"]["where"] == "empty"
    assert report["class_counts"] == {"circle": 24, "cross": 25, "empty": 0, "square": 2}
    assert report["errors"] == 2 and report["warnings"] == 2


def test_broken_coco_dataset(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "img" / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "gone.png", "width": 40, "height": 30}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 3]},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20]},
            {"id": 5, "image_id": 9, "category_id": 1, "bbox": [1, 1, 2, 2]},
        ],
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco))
    report = check_dataset(path, images=tmp_path / "img")
    levels = {f.kind: f.level for f in report.findings}
    assert levels == {"unknown category": "error", "degenerate box": "error", "box outside image": "warning",
                      "unknown image": "error", "missing file": "error", "empty class": "warning"}
    assert report.class_counts == {"cat": 2, "dog": 0}
    assert main(["data", "check", str(path)]) == 2  # images folder not given and not guessable
    assert "--images" in capsys.readouterr().err


def test_training_stops_at_start_on_an_empty_class(synth_root, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(synth_root, root)
    (root / "train" / "nothing").mkdir()
    code = main(["train", "--out", str(tmp_path / "run"), *sum((["-o", o] for o in tiny_overrides(root)), [])])
    err = capsys.readouterr().err
    assert code == 2
    assert "empty class: nothing: no examples" in err and "data check" in err
