"""COCO to YOLO (`data/convert/to_yolo.py`) on COCO files the tests write themselves: every label line
is worked out by hand in the comments (centre and size over the image's own width and height, six
decimals), then the choices around them: class order, crowd regions, boxes at the edge, images
without boxes, the data yaml's exact text, and reruns over the export's own files."""

from __future__ import annotations

import json
import os

import pytest

from transferkit.data.convert.to_yolo import export_yolo
from transferkit.errors import TransferKitError

# class ids are the order of the categories in the file, not their COCO ids nor their names
CATEGORIES = [{"id": 9, "name": "zebra"}, {"id": 1, "name": "ant"}, {"id": 4, "name": "bee"}]


def write_coco(tmp_path, images, annotations, categories=CATEGORIES, files=None):
    """The JSON and the image files it names (any bytes: the export never decodes an image)."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for img in images:
        if files is None or img["file_name"] in files:
            (tmp_path / "img" / img["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "img" / img["file_name"]).write_bytes(f"image {img['file_name']}".encode())
    for i, ann in enumerate(annotations):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", i + 1)
    (tmp_path / "in.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                  "categories": categories}))
    return tmp_path / "in.json"


def image(id_, name, width, height):
    return {"id": id_, "file_name": name, "width": width, "height": height}


def box(id_, image_id, category_id, bbox, iscrowd=0):
    return {"id": id_, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


@pytest.fixture
def export(tmp_path):
    images = [image(1, "a.png", 300, 150), image(2, "b.png", 20, 10), image(3, "d.png", 20, 0),
              image(4, "c.png", 20, 10)]
    annotations = [
        box(11, 1, 4, [30, 45, 60, 15]),              # bee, class 2: centre (60, 52.5) of 300 x 150
        box(12, 1, 9, [0, 0, 10, 10], iscrowd=1),     # a crowd region, before boxes of the same image
        box(13, 1, 9, [0.5, 0, 1, 1.5]),              # zebra, class 0: a box of 1 x 1.5 pixels
        box(14, 1, 1, [150, 50, 100, 50]),            # ant, class 1: thirds, rounded to six decimals
        box(15, 1, 9, [280, 140, 40, 20]),            # past the right and bottom edges: clipped to 20 x 10
        box(16, 1, 9, [400, 0, 10, 10]),              # wholly outside the image: set aside
        box(17, 2, 1, [0, 0, 20, 10]),                # the whole of b.png
        box(18, 3, 1, [0, 0, 5, 5]),                  # on an image without a height
    ]
    json_path = write_coco(tmp_path, images, annotations)
    return json_path, export_yolo(json_path, tmp_path / "img", tmp_path / "out")


def test_label_lines_are_centres_and_sizes_over_the_image_size(tmp_path, export):
    _, result = export
    labels = tmp_path / "out" / "labels" / "train"
    assert (labels / "a.txt").read_text() == (
        "2 0.200000 0.350000 0.200000 0.100000\n"   # cx (30 + 60/2)/300, cy (45 + 15/2)/150, w 60/300, h 15/150
        "0 0.003333 0.005000 0.003333 0.010000\n"   # cx (0.5 + 0.5)/300, cy 0.75/150, w 1/300, h 1.5/150
        "1 0.666667 0.500000 0.333333 0.333333\n"   # cx 200/300, cy 75/150, w 100/300, h 50/150
        "0 0.966667 0.966667 0.066667 0.066667\n")  # clipped to x 280..300, y 140..150: cx 290/300, cy 145/150
    assert (labels / "b.txt").read_text() == "1 0.500000 0.500000 1.000000 1.000000\n"
    assert sorted(p.name for p in labels.iterdir()) == ["a.txt", "b.txt"]  # c.png: no boxes, no label file
    assert (result.root, result.images, result.boxes) == (tmp_path / "out", 3, 5)
    assert result.summary() == "3 images, 5 boxes; skipped 3"
    placed = tmp_path / "out" / "images" / "train"
    assert sorted(p.name for p in placed.iterdir()) == ["a.png", "b.png", "c.png"]
    for name in ("a.png", "b.png", "c.png"):
        assert (placed / name).read_bytes() == f"image {name}".encode()


def test_what_yolo_cannot_hold_is_set_aside_with_its_reason(tmp_path, export):
    json_path, result = export
    assert result.skipped == [
        {"file": str(json_path), "what": "annotations[5]",
         "reason": "bbox [400, 0, 10, 10] reaches outside the 300x150 image a.png (clipped when read)"},
        {"file": "a.png", "what": "annotation 12", "reason": "crowd region (YOLO has no crowd form)"},
        {"file": str(tmp_path / "img" / "d.png"), "what": "image", "reason": "width/height missing in the JSON"},
    ]  # the box clipped to 20 x 10 (annotation 15) is a note of the reader, not set aside


def test_images_yolo_cannot_pair_by_stem_are_set_aside_and_the_next_one_still_placed(tmp_path):
    """Stems are compared without case too: X.png and x.png are one label file on macOS and Windows."""
    images = [image(1, "x.png", 20, 10), image(2, "sub/x.jpg", 20, 10), image(3, "gone.png", 20, 10),
              image(4, "y.png", 20, 10), image(5, "X.png", 20, 10)]
    json_path = write_coco(tmp_path, images, [box(1, 2, 1, [0, 0, 4, 4]), box(2, 4, 1, [0, 0, 4, 4])],
                           files=("x.png", "sub/x.jpg", "y.png", "X.png"))
    result = export_yolo(json_path, tmp_path / "img", tmp_path / "out")
    assert result.skipped == [
        {"file": str(tmp_path / "img" / "sub" / "x.jpg"), "what": "image", "reason": "another image is named x"},
        {"file": str(tmp_path / "img" / "gone.png"), "what": "image", "reason": "file not found"},
        {"file": str(tmp_path / "img" / "X.png"), "what": "image", "reason": "another image is named X"}]
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "train").iterdir()) == ["x.png", "y.png"]
    assert [p.name for p in (tmp_path / "out" / "labels" / "train").iterdir()] == ["y.txt"]
    assert (tmp_path / "out" / "labels" / "train" / "y.txt").read_text() == "1 0.100000 0.200000 0.200000 0.400000\n"


def test_the_data_yaml_is_written_in_this_order(tmp_path, export):
    assert (tmp_path / "out" / "data.yaml").read_text() == (
        "path: .\n"
        "train: images/train\n"
        "names:\n"
        "  0: zebra\n"
        "  1: ant\n"
        "  2: bee\n")


def test_another_split_names_its_folders_and_the_yaml_key(tmp_path):
    json_path = write_coco(tmp_path, [image(1, "sub/x.png", 40, 20)], [box(1, 1, 4, [10, 5, 20, 10])])
    result = export_yolo(json_path, tmp_path / "img", tmp_path / "out", split="val2017")
    assert (tmp_path / "out" / "labels" / "val2017" / "x.txt").read_text() == (
        "2 0.500000 0.500000 0.500000 0.500000\n")  # centre (20, 10) of 40 x 20, size 20 x 10
    assert (tmp_path / "out" / "images" / "val2017" / "x.png").read_bytes() == b"image sub/x.png"
    assert (tmp_path / "out" / "data.yaml").read_text() == (
        "path: .\nval2017: images/val2017\nnames:\n  0: zebra\n  1: ant\n  2: bee\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".transferkit-outputs.json", "data.yaml",
                                                                    "images", "labels"]
    assert (result.images, result.boxes) == (1, 1)


def test_a_dataset_without_boxes_still_gets_both_folders(tmp_path):
    json_path = write_coco(tmp_path, [image(1, "a.png", 20, 10)], [], [{"id": 1, "name": "cat"}])
    result = export_yolo(json_path, tmp_path / "img", tmp_path / "out")
    assert (result.images, result.boxes, result.skipped) == (1, 0, [])
    assert list((tmp_path / "out" / "labels" / "train").iterdir()) == []
    assert [p.name for p in (tmp_path / "out" / "images" / "train").iterdir()] == ["a.png"]
    assert (tmp_path / "out" / "data.yaml").read_text() == "path: .\ntrain: images/train\nnames:\n  0: cat\n"


def test_images_are_hard_links_even_over_a_leftover_temporary(tmp_path):
    json_path = write_coco(tmp_path, [image(1, "a.png", 20, 10)], [box(1, 1, 1, [0, 0, 10, 10])])
    folder = tmp_path / "out" / "images" / "train"
    folder.mkdir(parents=True)
    (folder / f".a.png.{os.getpid()}.tmp").write_bytes(b"left by a run that was killed")
    export_yolo(json_path, tmp_path / "img", tmp_path / "out")
    assert [p.name for p in folder.iterdir()] == ["a.png"]  # the temporary replaced, nothing left beside
    assert (folder / "a.png").stat().st_ino == (tmp_path / "img" / "a.png").stat().st_ino


def test_a_rerun_replaces_its_own_files_and_removes_its_stale_labels(tmp_path):
    images = [image(1, "a.png", 20, 10), image(2, "b.png", 20, 10)]
    json_path = write_coco(tmp_path, images, [box(1, 1, 1, [0, 0, 10, 10]), box(2, 2, 4, [10, 0, 10, 10])])
    out = tmp_path / "out"
    export_yolo(json_path, tmp_path / "img", out)
    labels = out / "labels" / "train"
    assert (labels / "a.txt").read_text() == "1 0.250000 0.500000 0.500000 1.000000\n"
    assert (labels / "b.txt").read_text() == "2 0.750000 0.500000 0.500000 1.000000\n"
    (tmp_path / "img" / "a.png").write_bytes(b"the source image edited since")  # the placed link sees it too
    json_path = write_coco(tmp_path, images, [box(1, 1, 9, [0, 0, 20, 5])], files=())
    result = export_yolo(json_path, tmp_path / "img", out)  # no force needed: every file is the export's own
    assert (result.images, result.boxes) == (2, 1)
    assert (labels / "a.txt").read_text() == "0 0.500000 0.250000 1.000000 0.500000\n"
    assert sorted(p.name for p in labels.iterdir()) == ["a.txt"]  # b.png has no box now: its label is gone
    assert (out / "images" / "train" / "a.png").read_bytes() == b"the source image edited since"
    manifest = json.loads((out / ".transferkit-outputs.json").read_text())["files"]
    assert sorted(manifest) == ["data.yaml", "images/train/a.png", "images/train/b.png", "labels/train/a.txt"]


def test_files_the_export_did_not_write_are_replaced_only_with_force(tmp_path):
    json_path = write_coco(tmp_path, [image(1, "a.png", 20, 10)], [box(1, 1, 1, [0, 0, 10, 10])])
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.yaml").write_text("# the user's own\n")
    with pytest.raises(TransferKitError) as err:
        export_yolo(json_path, tmp_path / "img", out)
    assert str(err.value) == (
        f"{out} holds files this command would replace and did not write ({out / 'data.yaml'}); nothing was "
        "changed: choose another --out, or add --force to replace them")
    assert sorted(p.name for p in out.iterdir()) == ["data.yaml"]
    export_yolo(json_path, tmp_path / "img", out, force=True)
    assert (out / "data.yaml").read_text() == "path: .\ntrain: images/train\nnames:\n  0: zebra\n  1: ant\n  2: bee\n"
    label = out / "labels" / "train" / "a.txt"
    label.write_text("0 0.1 0.1 0.1 0.1\n")  # edited by the user: theirs now
    with pytest.raises(TransferKitError, match="would replace and did not write"):
        export_yolo(json_path, tmp_path / "img", out)
    assert label.read_text() == "0 0.1 0.1 0.1 0.1\n"
    export_yolo(json_path, tmp_path / "img", out, force=True)
    assert label.read_text() == "1 0.250000 0.500000 0.500000 1.000000\n"


def test_an_image_folder_that_is_not_there_is_one_line(tmp_path):
    json_path = write_coco(tmp_path, [image(1, "a.png", 20, 10)], [])
    (tmp_path / "file").write_text("not a folder")
    for where in (tmp_path / "nowhere", tmp_path / "file"):
        with pytest.raises(TransferKitError) as err:
            export_yolo(json_path, where, tmp_path / "out")
        assert str(err.value) == f"image folder not found: {where} (give the folder the file_names are in)"
    assert not (tmp_path / "out").exists()
