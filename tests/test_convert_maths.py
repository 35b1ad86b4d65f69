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
    (voc / "ImageSets" / "Main" / "utf16.txt").write_text("000002\n", encoding="utf-16")
    with pytest.raises(TransferKitError) as err:
        convert_voc(voc, "utf16")
    listing = voc / "ImageSets" / "Main" / "utf16.txt"
    assert str(err.value) == f"split list {listing} is not UTF-8 text; save it as UTF-8"


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


def test_labelme_circles_are_32_point_polygons_of_the_rim_distance(tmp_path):
    shapes = [{"label": "ball", "shape_type": "circle", "points": [[20, 50], [20, 55]]}]  # radius 5, along y
    (tmp_path / "a.json").write_text(json.dumps({**LABELME, "shapes": shapes}))
    (ball,) = convert_labelme(tmp_path).annotations
    assert ball["bbox"] == [15.0, 45.0, 10.0, 10.0]
    seg = ball["segmentation"][0]
    assert len(seg) == 64 and seg[:4] == [25.0, 50.0, 24.9, 50.98]  # 32 points from angle 0, to 2 decimals:
    # the second at 20 + 5 cos(pi / 16) = 24.9039, 50 + 5 sin(pi / 16) = 50.9755
    assert ball["area"] == 78.04  # a regular 32-gon of radius 5: 32 / 2 x 25 x sin(2 pi / 32) = 78.0361


def test_labelme_skips_each_shape_it_cannot_use_with_the_reason(tmp_path):
    triangle = [[1, 1], [20, 2], [15, 25]]
    shapes = [
        "oops",
        {"label": "__ignore__", "points": triangle},
        {"label": "wire", "shape_type": "line", "points": [[0, 0], [5, 5]]},
        {"label": "cow", "points": triangle},
        {"label": "cat", "points": [[0, "x"], [1, 1], [2, 0]]},
        {"label": "cat", "shape_type": "rectangle", "points": triangle},
        {"label": "cat", "shape_type": "circle", "points": [[5, 5]]},
        {"label": "cat", "points": [[1, 1], [2, 2]]},
        {"label": "cat", "group_id": True, "points": triangle},
        {"label": "cat", "group_id": 1.5, "points": triangle},
        {"label": "dog", "points": [[300, 10], [320, 10], [310, 30]]},  # outside the 200 x 100 image
        {"label": "cat", "shape_type": None, "points": triangle},  # no type: a polygon
        {"label": "cat", "group_id": None, "points": triangle},  # ungrouped shapes are instances each
        {"label": "dog", "group_id": None, "points": triangle},
        {"points": triangle},  # no label: a broken shape, and no class "None"
        {"label": "", "points": triangle},
    ]
    (tmp_path / "a.json").write_text(json.dumps({**LABELME, "imagePath": "a.png", "shapes": shapes}))
    (tmp_path / ".transferkit-outputs.json").write_text("{}")  # an output manifest is not an annotation file
    coco = convert_labelme(tmp_path, ["cat", "dog"])
    assert coco.categories == ["cat", "dog"] and coco.image_root == tmp_path
    assert [name for _, name, _ in boxes(coco)] == ["cat", "cat", "dog"]
    where = f"{tmp_path / 'a.json'} shape"
    assert [(s["file"], s["what"], s["reason"], s["level"]) for s in coco.skipped] == [
        (f"{where} 1", "shape", "not an object", "error"),
        (f"{where} 2", "shape", "label __ignore__", "note"),
        (f"{where} 3", "shape", "shape type 'line' has no area", "warning"),
        (f"{where} 4", "shape", "class 'cow' is not in the class list", "note"),
        (f"{where} 5", "shape", "`points` must be a list of [x, y]", "error"),
        (f"{where} 6", "shape", "a rectangle needs 2 points, has 3", "error"),
        (f"{where} 7", "shape", "a circle needs 2 points, has 1", "error"),
        (f"{where} 8", "shape", "a polygon needs 3 or more points, has 2", "error"),
        (f"{where} 9", "shape", "group_id True is not a number", "error"),
        (f"{where} 10", "shape", "group_id 1.5 is not a number", "error"),
        (f"{where} 15", "shape", "no class: `label` is empty or missing", "error"),
        (f"{where} 16", "shape", "no class: `label` is empty or missing", "error"),
        (str(tmp_path / "a.json"), "dog box", "no area inside the 200x100 image (300.0, 10.0, 20.0, 20.0)", "error"),
    ]
    # without a class list: the labels of shapes with an area, but __ignore__
    assert convert_labelme(tmp_path).categories == ["cat", "cow", "dog"]


def test_labelme_image_sizes_from_the_file_the_embedded_image_or_the_image(tmp_path):
    import base64
    import io

    def convert(name: str, **fields):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}.json").write_text(json.dumps({"shapes": [], **fields}))
        return folder, convert_labelme(folder)

    png = io.BytesIO()
    Image.new("RGB", (40, 20)).save(png, "PNG")
    embedded = base64.b64encode(png.getvalue()).decode()
    sizes = {}
    for name, fields in {
        "tiny": {"imageWidth": 1, "imageHeight": 1},
        "zero_width": {"imageWidth": 0, "imageHeight": 30, "imageData": embedded},
        "zero_height": {"imageWidth": 30, "imageHeight": 0, "imageData": embedded},
        "text_height": {"imageWidth": 30, "imageHeight": "30", "imageData": embedded},
    }.items():
        _, coco = convert(name, **fields)
        (image,) = coco.images
        sizes[name] = (image["file_name"], image["width"], image["height"])
    folder = tmp_path / "beside"
    folder.mkdir()
    Image.new("RGB", (50, 60)).save(folder / "p.png")
    (folder / "p.json").write_text(json.dumps({"shapes": [], "imagePath": "p.png", "imageData": None}))
    (image,) = convert_labelme(folder).images
    sizes["beside"] = (image["file_name"], image["width"], image["height"])
    assert sizes == {"tiny": ("tiny.jpg", 1, 1), "zero_width": ("zero_width.jpg", 40, 20),
                     "zero_height": ("zero_height.jpg", 40, 20), "text_height": ("text_height.jpg", 40, 20),
                     "beside": ("p.png", 50, 60)}  # without imagePath the image is the file's stem + .jpg

    for name, fields, message in [
        ("nothing", {"imagePath": ""}, "no imageWidth/imageHeight, imageData or imagePath to size the image by"),
        ("bad_data", {"imageData": "bm90IGFuIGltYWdl"}, "imageData is not a readable image ("),
        ("no_image", {"imagePath": "nope.png"}, "imagePath 'nope.png': cannot read the size of image "),
    ]:
        with pytest.raises(TransferKitError) as err:
            convert(name, **fields)
        assert str(err.value).startswith(f"{tmp_path / name / name}.json: {message}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransferKitError) as err:
        convert_labelme(tmp_path / "empty")
    assert str(err.value) == f"{tmp_path / 'empty'} holds no labelme .json files"


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


def test_yolo_splits_class_maps_and_what_is_skipped(tmp_path):
    (tmp_path / "data.yaml").write_text("names: {1: dog, 0: cat}\n")  # a mapping, in any order
    for split, size in (("train", (200, 100)), ("val", (50, 40))):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        Image.new("RGB", size).save(tmp_path / "images" / split / ("a.png" if split == "train" else "b.PNG"))
    (tmp_path / "images" / "val" / "notes.txt").write_text("not an image")
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "train" / "0.png")  # no label file: a background image
    (tmp_path / "labels" / "val" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    label = tmp_path / "labels" / "train" / "a.txt"
    label.write_bytes(b"\n"
                      b"0 0.5 0.5 0.2\n"                # line 2: four values
                      b"0 nan 0.5 0.1 0.1 " + b"7" * 60 + b"\n"  # line 3
                      b"-1 0.5 0.5 0.1 0.1\n"           # line 4
                      b"1 0.5 0.5 0.2 0.4 0.9\n"        # line 5: a column past the box is left alone
                      b"caf\xe9\n"                      # line 6: not UTF-8
                      b"0 " + b"9" * 100 + b"\n"         # line 7: echoed up to 60 characters
                      b"0 0.5 0.5 0 0.1\n")             # line 8: no width
    coco = convert_yolo(tmp_path)
    assert coco.categories == ["cat", "dog"] and coco.image_root == tmp_path / "images"
    # two splits: file names relative to images/, so they stay unique
    assert [(i["file_name"], i["width"], i["height"]) for i in coco.to_dict()["images"]] == [
        ("train/0.png", 10, 10), ("train/a.png", 200, 100), ("val/b.PNG", 50, 40)]
    assert boxes(coco) == [(2, "dog", [80.0, 30.0, 40.0, 40.0])]
    assert [(s["file"], s["what"], s["reason"], s["level"]) for s in coco.skipped] == [
        (f"{label}:2", "line", "not `class cx cy w h`: '0 0.5 0.5 0.2'", "error"),
        (f"{label}:3", "line", "cx cy w h must be finite numbers: '0 nan 0.5 0.1 0.1 " + "7" * 42 + "'", "error"),
        (f"{label}:4", "line", "class -1 is not in 0..1", "error"),
        (f"{label}:6", "line", "not `class cx cy w h`: 'caf\ufffd'", "error"),
        (f"{label}:7", "line", "not `class cx cy w h`: '0 " + "9" * 58 + "'", "error"),
        (f"{label}:8", "cat box", "no area inside the 200x100 image (100.0, 45.0, 0.0, 10.0)", "error"),
        (str(tmp_path / "labels" / "val" / "orphan.txt"), "label file", "no image with this name", "warning"),
    ]
    # one split: COCO's own bare file names, under that split's folder
    val = convert_yolo(tmp_path, "val", ["x", "y"])
    assert val.categories == ["x", "y"] and val.image_root == tmp_path / "images" / "val"
    assert [i["file_name"] for i in val.images] == ["b.PNG"]
    with pytest.raises(TransferKitError) as err:
        convert_yolo(tmp_path, "test")
    assert str(err.value) == f"split 'test' not found: {tmp_path / 'images' / 'test'}"


@pytest.mark.parametrize("name, text, message", [
    (None, None, "{root} has no data yaml naming the classes; give --classes FILE"),
    ("data.yaml", "names: {a: cat}\n", "{root}/data.yaml: `names` keys must be class indices"),
    ("data.yml", "nc: 2\n", "{root}/data.yml: no `names` list or mapping of classes"),
    ("data.yaml", "names: []\n", "{root}/data.yaml: no `names` list or mapping of classes"),
    ("data.yaml", b"names: [caf\xe9]\n", "{root}/data.yaml: not UTF-8 text; save the data yaml as UTF-8"),
    ("data.yaml", "names: [a, &x [*x]]\n", "{root}/data.yaml: refused, the YAML "),
    ("data.yaml", "names: [cat,\n", "{root}/data.yaml:2: "),
])
def test_yolo_class_names_are_read_or_refused_in_one_line(tmp_path, name, text, message):
    (tmp_path / "images" / "train").mkdir(parents=True)
    if name:
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TransferKitError) as err:
        convert_yolo(tmp_path)
    assert str(err.value).startswith(message.format(root=tmp_path))
    # the yaml is not needed when the classes are given
    assert convert_yolo(tmp_path, classes=["cat"]).categories == ["cat"]


def test_yolo_roots_without_images_or_splits_are_one_line(tmp_path):
    with pytest.raises(TransferKitError) as err:
        convert_yolo(tmp_path)
    assert str(err.value) == f"{tmp_path} is not a YOLO dataset root (no images/ folder)"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("a file, not a split folder")
    with pytest.raises(TransferKitError) as err:
        convert_yolo(tmp_path)
    assert str(err.value) == f"{tmp_path / 'images'} has no split folders (such as train2017/)"


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


def test_cityscapes_splits_class_lists_and_odd_objects(tmp_path):
    gt = tmp_path / "gtFine"
    for split, city in (("train", "aachen"), ("val", "bonn")):
        (gt / split / city).mkdir(parents=True)
    train = gt / "train" / "aachen" / "aachen_000000_000019_gtFine_polygons.json"
    train.write_text(json.dumps({"imgWidth": 100, "imgHeight": 50, "objects": [
        {"label": "car", "polygon": [[10.123, 5], [30, 5], [30, 25.456]]},
        {"label": "persongroup", "polygon": [[0, 0], [9, 0], [9, 9]]},   # person is not in the class list
        "a string",
        {"polygon": [[0, 0], [9, 0], [9, 9]]},
        {"label": "car park", "polygon": [[0, 0], [9, 0], [9, 9]]},      # not a car crowd
        {"label": "car", "polygon": [[1, 1], [2, "x"], [3, 3]]},
        {"label": "car", "polygon": [[5, 5], [5, 10], [5, 20]]},         # no width
        {"label": "car", "polygon": [[-5, -5], [10, -5], [10, 10]]},     # clipped at 0
    ]}))
    (gt / "val" / "bonn" / "bonn_000001_000019_gtFine_polygons.json").write_text(
        json.dumps({"imgWidth": 1, "imgHeight": 1, "objects": []}))
    coco = convert_cityscapes(tmp_path, classes=["car"])  # every split
    assert coco.categories == ["car"] and coco.image_root == tmp_path
    assert sorted(i["file_name"] for i in coco.images) == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png"]
    car, clipped = coco.annotations
    assert car["segmentation"] == [[10.12, 5.0, 30.0, 5.0, 30.0, 25.46]] and car["iscrowd"] == 0
    assert clipped["bbox"] == [0.0, 0.0, 10.0, 10.0]
    assert [(s["file"], s["what"], s["reason"], s["level"]) for s in coco.skipped] == [
        (f"{train} object 2", "object", "'persongroup' is not an instance class", "note"),
        (f"{train} object 3", "object", "not an object", "error"),
        (f"{train} object 4", "object", "no class: `label` is empty or missing", "error"),
        (f"{train} object 5", "object", "'car park' is not an instance class", "note"),
        (f"{train} object 6", "object", "`polygon` is not a list of 3 or more [x, y]", "error"),
        (f"{train} object 7", "car box", "no area inside the 100x50 image (5.0, 5.0, 0.0, 15.0)", "error"),
    ]
    # one split
    assert [i["width"] for i in convert_cityscapes(tmp_path, "val").images] == [1]


def test_cityscapes_roots_and_files_that_are_not_cityscapes_are_one_line(tmp_path):
    with pytest.raises(TransferKitError) as err:
        convert_cityscapes(tmp_path)
    assert str(err.value) == f"{tmp_path} is not a Cityscapes root (no gtFine/)"
    (tmp_path / "gtFine" / "val" / "bonn").mkdir(parents=True)
    with pytest.raises(TransferKitError) as err:
        convert_cityscapes(tmp_path, "val")
    assert str(err.value) == f"no *_gtFine_polygons.json under {tmp_path / 'gtFine' / 'val'}"
    with pytest.raises(TransferKitError) as err:
        convert_cityscapes(tmp_path)
    assert str(err.value) == f"no *_gtFine_polygons.json under {tmp_path / 'gtFine'}"
    path = tmp_path / "gtFine" / "val" / "bonn" / "bonn_000001_000019_gtFine_polygons.json"
    for data, reason in [({"imgWidth": 0, "imgHeight": 50, "objects": []}, "bad size or objects"),
                         ({"imgWidth": 10, "imgHeight": 0, "objects": []}, "bad size or objects"),
                         ({"imgWidth": 10, "imgHeight": 10, "objects": {}}, "bad size or objects"),
                         ({"imgWidth": 10, "imgHeight": 10}, "'objects'")]:
        path.write_text(json.dumps(data))
        with pytest.raises(TransferKitError) as err:
            convert_cityscapes(tmp_path, "val")
        assert str(err.value) == f"{path}: not a Cityscapes polygons file ({reason})"


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


def test_boxes_keep_3_decimals_and_the_summary_counts_each_kind_of_skip():
    from transferkit.data.convert.coco import CocoDataset

    coco = CocoDataset(["cat"])
    coco.add_image(1, "a.png", 100, 100)
    assert coco.summary() == "1 images, 0 boxes, 1 categories; skipped: nothing"
    assert coco.add_box(1, "cat", 1.23456, 2.34567, 3.45678, 4.56789, 100, 100, "a.xml")
    # 3.457 x 4.568 = 15.791576
    assert (coco.annotations[0]["bbox"], coco.annotations[0]["area"]) == ([1.235, 2.346, 3.457, 4.568], 15.792)
    assert not coco.add_box(1, "cat", 10, 20, 5, 0, 100, 100, "a.xml")     # no height
    assert not coco.add_box(1, "cat", 10, 150, 5, 10, 100, 100, "a.xml")   # below the image
    assert coco.summary() == "1 images, 1 boxes, 1 categories; skipped: 2 x cat box"


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
