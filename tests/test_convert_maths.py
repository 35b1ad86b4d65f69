"""Converter arithmetic on small annotation files the tests write themselves, so it is checked in
any clone: VOC's 1-based inclusive pixels, labelme's grouped instances and shapes, YOLO's
normalised centres, and back. Every expected box is worked out by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from transferkit.data.convert import convert_cityscapes, convert_labelme, convert_voc, convert_yolo
from transferkit.data.convert.to_yolo import export_yolo
from transferkit.errors import TransferKitError


def boxes(coco) -> list[tuple[int, str, list[float]]]:
    names = coco.categories
    return [(a["image_id"], names[a["category_id"] - 1], a["bbox"]) for a in coco.annotations]


# --- Pascal VOC ------------------------------------------------------------------------------

VOC_1 = """<annotation><filename>000001.jpg</filename>
<size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
<object><name>cat</name><difficult>1</difficult><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>8</xmax><ymax>9</ymax></bndbox></object>
<object><name>person</name>
  <part><name>head</name><bndbox><xmin>20</xmin><ymin>21</ymin><xmax>30</xmax><ymax>31</ymax></bndbox></part>
  <bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>80</ymax></bndbox></object>
<object><name>dog</name><bndbox><xmin>90</xmin><ymin>70</ymin><xmax>120</xmax><ymax>90</ymax></bndbox></object>
</annotation>"""

VOC_2 = """<annotation><filename>000002.jpg</filename>
<object><name>person</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>2</xmax><ymax>3</ymax></bndbox></object>
<object><name>person</name><bndbox><xmin>nan</xmin><ymin>3</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
</annotation>"""


@pytest.fixture
def voc(tmp_path) -> Path:
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "Annotations" / "000001.xml").write_text(VOC_1)
    (root / "Annotations" / "000002.xml").write_text(VOC_2)  # no <size>: read from the image
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "000002.jpg")
    return root


def test_voc_boxes_are_one_based_and_inclusive(voc):
    coco = convert_voc(voc)
    assert coco.categories == ["cat", "dog", "person"]  # sorted; cat named though only difficult
    assert [(i["id"], i["width"], i["height"]) for i in coco.to_dict()["images"]] == [(1, 100, 80), (2, 64, 48)]
    assert boxes(coco) == [
        (1, "dog", [0.0, 0.0, 10.0, 20.0]),       # pixels 1..10 and 1..20: x 0, w 10, h 20
        (1, "person", [10.0, 20.0, 40.0, 60.0]),  # 11..50 -> x 10 w 40; 21..80 -> y 20 h 60; <part> ignored
        (1, "dog", [89.0, 69.0, 11.0, 11.0]),     # 90..120 x 70..90 clipped to the 100x80 image
        (2, "person", [1.0, 2.0, 1.0, 1.0]),      # a single pixel is 1x1
    ]
    assert [a["area"] for a in coco.annotations] == [200.0, 2400.0, 121.0, 1.0]
    skipped = {(s["what"], s["level"]) for s in coco.skipped}
    assert skipped == {("difficult", "note"), ("object", "error")}
    assert any("<xmin> is 'nan', not a finite number" in s["reason"] for s in coco.skipped)


def test_voc_difficult_kept_on_request(voc):
    coco = convert_voc(voc, keep_difficult=True)
    assert (1, "cat", [4.0, 4.0, 4.0, 5.0]) in boxes(coco)  # 5..8 -> w 4; 5..9 -> h 5


def test_voc_split_lists_choose_the_files(voc, tmp_path):
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "val.txt").write_text("000002\n\n")
    (voc / "ImageSets" / "Main" / "bad.txt").write_text("000003\n")
    coco = convert_voc(voc, "val", classes=["person", "dog"])
    assert coco.categories == ["person", "dog"] and [i["id"] for i in coco.images] == [2]
    assert boxes(coco) == [(2, "person", [1.0, 2.0, 1.0, 1.0])]
    with pytest.raises(TransferKitError, match=r"split list not found: .*ImageSets/Main/test\.txt"):
        convert_voc(voc, "test")
    with pytest.raises(TransferKitError, match=r"000003\.xml is listed in the split but does not exist"):
        convert_voc(voc, "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransferKitError, match=r"empty holds no VOC XML files; give a VOC year folder or a folder"):
        convert_voc(tmp_path / "empty")


# --- labelme ---------------------------------------------------------------------------------

LABELME = {
    "version": "5.2.1", "imagePath": "street.jpg", "imageWidth": 200, "imageHeight": 100, "imageData": None,
    "shapes": [
        {"label": "car", "group_id": 1, "shape_type": "polygon", "points": [[10, 10], [30, 10], [30, 20]]},
        {"label": "car", "group_id": 2, "shape_type": "polygon", "points": [[100, 10], [120, 10], [120, 30]]},
        {"label": "car", "group_id": 1, "shape_type": "polygon",
         "points": [[50, 40], [60, 40], [60, 60], [50, 60]]},
        {"label": "person", "group_id": 1, "shape_type": "rectangle", "points": [[150, 90], [140, 50]]},
        {"label": "person", "group_id": None, "shape_type": "rectangle", "points": [[190, 0], [210, 30]]},
        {"label": "ball", "group_id": None, "shape_type": "circle", "points": [[20, 80], [25, 80]]},
        {"label": "tip", "group_id": None, "shape_type": "point", "points": [[5, 5]]},
    ],
}


def test_labelme_grouped_instances_rectangles_and_circles(tmp_path):
    (tmp_path / "street.json").write_text(json.dumps(LABELME))
    coco = convert_labelme(tmp_path)
    assert coco.categories == ["ball", "car", "person"]  # the point's label has no area: not a class
    assert coco.images == [{"id": 1, "file_name": "street.jpg", "width": 200, "height": 100}]
    got = {(name, tuple(bbox)) for _, name, bbox in boxes(coco)}
    assert got == {
        ("car", (10.0, 10.0, 50.0, 50.0)),        # group 1: two polygons, x 10..60, y 10..60
        ("car", (100.0, 10.0, 20.0, 20.0)),       # group 2 alone
        ("person", (140.0, 50.0, 10.0, 40.0)),    # same group_id as a car, other label: its own instance
        ("person", (190.0, 0.0, 10.0, 30.0)),     # 190..210 clipped to the 200 px width
        ("ball", (15.0, 75.0, 10.0, 10.0)),       # centre (20, 80), radius 5
    }
    assert len(coco.annotations) == 5
    group = next(a for a in coco.annotations if a["bbox"] == [10.0, 10.0, 50.0, 50.0])
    assert group["segmentation"] == [[10, 10, 30, 10, 30, 20], [50, 40, 60, 40, 60, 60, 50, 60]]
    assert group["area"] == 300.0                 # triangle 20 x 10 / 2 + square 10 x 20
    rectangle = next(a for a in coco.annotations if a["bbox"] == [140.0, 50.0, 10.0, 40.0])
    assert rectangle["segmentation"] == [[140, 50, 150, 50, 150, 90, 140, 90]]  # corners from top left, clockwise
    assert rectangle["area"] == 400.0
    assert [(s["what"], s["level"]) for s in coco.skipped] == [("shape", "warning")]
    assert "shape type 'point' has no area" in coco.skipped[0]["reason"]


# --- YOLO ------------------------------------------------------------------------------------

def test_yolo_centres_are_denormalised_and_clipped(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "train" / "a.png")
    Image.new("RGB", (50, 40)).save(tmp_path / "images" / "train" / "b.png")  # no labels: background
    (tmp_path / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n"      # cx 100, cy 50, w 40, h 40 -> x 80, y 30
        "1 0.05 0.1 0.2 0.2\n"     # cx 10, w 40 -> x -10..30 clipped to 0..30; y 0..20
        "2 0.5 0.5 0.1 0.1\n")     # class 2 of 2 classes
    coco = convert_yolo(tmp_path)
    assert [(i["file_name"], i["width"], i["height"]) for i in coco.to_dict()["images"]] == [
        ("a.png", 200, 100), ("b.png", 50, 40)]
    assert boxes(coco) == [(1, "cat", [80.0, 30.0, 40.0, 40.0]), (1, "dog", [0.0, 0.0, 30.0, 20.0])]
    assert [s["reason"] for s in coco.skipped] == ["class 2 is not in 0..1"]


def test_coco_to_yolo_normalises_centres(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "img" / "a.png")
    (tmp_path / "in.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [80, 30, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1}]}))
    result = export_yolo(tmp_path / "in.json", tmp_path / "img", tmp_path / "out")
    assert (result.images, result.boxes) == (1, 2)
    assert result.summary() == "1 images, 2 boxes; skipped 1"
    placed = tmp_path / "out" / "images" / "train" / "a.png"
    assert placed.read_bytes() == (tmp_path / "img" / "a.png").read_bytes()
    assert placed.stat().st_ino == (tmp_path / "img" / "a.png").stat().st_ino  # a hard link, not a copy
    assert yaml.safe_load((tmp_path / "out" / "data.yaml").read_text()) == {
        "path": ".", "train": "images/train", "names": {0: "cat", 1: "dog"}}
    assert (tmp_path / "out" / "labels" / "train" / "a.txt").read_text() == (
        "1 0.500000 0.500000 0.200000 0.400000\n"   # dog is the second category: class 1
        "0 0.075000 0.100000 0.150000 0.200000\n")  # centre (15, 10) of 200 x 100
    assert [s["reason"] for s in result.skipped] == ["crowd region (YOLO has no crowd form)"]


# --- Cityscapes ------------------------------------------------------------------------------

def test_cityscapes_instances_groups_clipping_and_skips(tmp_path):
    frame = tmp_path / "gtFine" / "val" / "bonn"
    frame.mkdir(parents=True)
    (frame / "bonn_000001_000019_gtFine_polygons.json").write_text(json.dumps({
        "imgWidth": 100, "imgHeight": 50, "objects": [
            {"label": "car", "polygon": [[10, 5], [30, 5], [30, 25], [10, 25]]},
            {"label": "cargroup", "polygon": [[40, 10], [60, 10], [50, 40]]},   # a crowd region of cars
            {"label": "person", "polygon": [[90, 40], [120, 40], [120, 70]]},   # reaches outside: clipped
            {"label": "road", "polygon": [[0, 0], [5, 0], [5, 5]]},
            {"label": "bicycle", "polygon": [[1, 1], [2, 2]]},
        ]}))
    coco = convert_cityscapes(tmp_path, "val")
    assert coco.categories[:3] == ["person", "rider", "car"]
    assert coco.images == [{"id": 1, "file_name": "leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png",
                            "width": 100, "height": 50}]
    assert [(n, b, a["iscrowd"]) for (_, n, b), a in zip(boxes(coco), coco.annotations, strict=True)] == [
        ("car", [10.0, 5.0, 20.0, 20.0], 0),
        ("car", [40.0, 10.0, 20.0, 30.0], 1),
        ("person", [90.0, 40.0, 10.0, 10.0], 0),   # x 90..120 and y 40..70 clipped to 100 x 50
    ]
    assert coco.annotations[2]["segmentation"] == [[90, 40, 100, 40, 100, 50]]
    assert [(s["level"], s["reason"]) for s in coco.skipped] == [
        ("note", "'road' is not an instance class"), ("error", "`polygon` is not a list of 3 or more [x, y]")]


# --- the COCO file the converters write --------------------------------------------------------

def test_the_written_coco_json(tmp_path, voc):
    coco = convert_voc(voc)
    coco.save(tmp_path / "out" / "voc.json")
    written = json.loads((tmp_path / "out" / "voc.json").read_text())
    assert written["categories"] == [{"id": 1, "name": "cat", "supercategory": ""},
                                     {"id": 2, "name": "dog", "supercategory": ""},
                                     {"id": 3, "name": "person", "supercategory": ""}]
    assert [i["file_name"] for i in written["images"]] == ["000001.jpg", "000002.jpg"]
    assert written["annotations"][0] == {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 10.0, 20.0],
                                         "area": 200.0, "iscrowd": 0, "segmentation": []}
    assert [a["id"] for a in written["annotations"]] == [1, 2, 3, 4]
    assert coco.summary() == "2 images, 4 boxes, 3 categories; skipped: 1 x difficult, 1 x object"


def test_images_are_listed_by_id_whatever_order_they_came_in():
    from transferkit.data.convert.coco import CocoDataset, stable_image_ids

    coco = CocoDataset(["a"])
    coco.add_image(7, "b.jpg", 10, 10)
    coco.add_image(3, "a.jpg", 10, 10)
    assert [i["id"] for i in coco.to_dict()["images"]] == [3, 7]
    assert stable_image_ids(["000012.jpg", "7.png"]) == {"000012.jpg": 12, "7.png": 7}
    assert stable_image_ids(["b.jpg", "a.jpg", "12.jpg"]) == {"12.jpg": 1, "a.jpg": 2, "b.jpg": 3}
    assert stable_image_ids(["1.jpg", "01.png"]) == {"01.png": 1, "1.jpg": 2}  # the same number twice


def test_coco_to_yolo_skips_what_yolo_cannot_hold(tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    for name, size in (("a.png", (200, 100)), ("sub/a.png", (20, 10)), ("b.png", (20, 10)), ("c.png", (20, 10))):
        Image.new("RGB", size).save(tmp_path / "img" / name)
    (tmp_path / "in.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                   {"id": 2, "file_name": "sub/a.png", "width": 20, "height": 10},
                   {"id": 3, "file_name": "missing.png", "width": 20, "height": 10},
                   {"id": 4, "file_name": "b.png", "width": 0, "height": 10},
                   {"id": 5, "file_name": "c.png", "width": 20, "height": 10}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 20], "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0}]}))
    out = tmp_path / "out"
    result = export_yolo(tmp_path / "in.json", tmp_path / "img", out, split="val")
    assert (result.root, result.images, result.boxes) == (out, 2, 1)
    assert result.skipped == [
        {"file": str(tmp_path / "in.json"), "what": "annotations[1]", "reason": "image_id 9 is not in images"},
        {"file": str(tmp_path / "img" / "sub" / "a.png"), "what": "image", "reason": "another image is named a"},
        {"file": str(tmp_path / "img" / "missing.png"), "what": "image", "reason": "file not found"},
        {"file": str(tmp_path / "img" / "b.png"), "what": "image", "reason": "width/height missing in the JSON"}]
    assert sorted(p.name for p in (out / "images" / "val").iterdir()) == ["a.png", "c.png"]
    assert [p.name for p in (out / "labels" / "val").iterdir()] == ["a.txt"]  # c.png: a background image
    assert (out / "labels" / "val" / "a.txt").read_text() == "0 0.125000 0.100000 0.250000 0.200000\n"
    assert yaml.safe_load((out / "data.yaml").read_text()) == {"path": ".", "val": "images/val", "names": {0: "cat"}}
    with pytest.raises(TransferKitError, match=r"image folder not found: .*nowhere \(give the folder the file_names"):
        export_yolo(tmp_path / "in.json", tmp_path / "nowhere", out)


def test_coco_to_yolo_copies_where_it_cannot_link(tmp_path, monkeypatch):
    import transferkit.data.convert.to_yolo as to_yolo

    def no_links(src, dst):
        raise OSError("links not allowed here")

    monkeypatch.setattr(to_yolo.os, "link", no_links)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "img" / "a.png")
    (tmp_path / "in.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}],
        "categories": [{"id": 1, "name": "cat"}], "annotations": []}))
    export_yolo(tmp_path / "in.json", tmp_path / "img", tmp_path / "out")
    placed = tmp_path / "out" / "images" / "train" / "a.png"
    assert placed.read_bytes() == (tmp_path / "img" / "a.png").read_bytes()
    assert placed.stat().st_ino != (tmp_path / "img" / "a.png").stat().st_ino
    placed.write_bytes(b"kept")  # changed since the export wrote it: the user's now, not replaced
    with pytest.raises(TransferKitError, match=r"would replace and did not write .*a\.png"):
        export_yolo(tmp_path / "in.json", tmp_path / "img", tmp_path / "out")
    assert placed.read_bytes() == b"kept"
