"""Converters to COCO on real VOC and YOLO samples, and on broken inputs."""

import json
import os

import pytest
from conftest import SHARED_DATA, needs_shared

from transferkit.cli import main
from transferkit.data.convert.labelme import convert_labelme
from transferkit.data.convert.voc import convert_voc
from transferkit.data.convert.yolo import convert_yolo
from transferkit.errors import TransferKitError

COCO128 = SHARED_DATA / "coco128"
VOC = SHARED_DATA / "voc_mini" / "VOCdevkit"


def iou(a, b):
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@needs_shared
def test_coco128_yolo_labels_reproduce_the_official_coco_boxes():
    ours = convert_yolo(COCO128).to_dict()
    official = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    our_cat = {c["id"]: c["name"] for c in ours["categories"]}
    off_cat = {c["id"]: c["name"] for c in official["categories"]}
    assert {i["id"]: (i["file_name"], i["width"], i["height"]) for i in ours["images"]} == {
        i["id"]: (i["file_name"], i["width"], i["height"]) for i in official["images"]}
    pool = {}
    for a in ours["annotations"]:
        pool.setdefault(a["image_id"], []).append(a)
    targets = [a for a in official["annotations"] if not a["iscrowd"]]
    assert len(targets) == len(ours["annotations"]) == 929
    for t in targets:
        candidates = [a for a in pool.get(t["image_id"], []) if our_cat[a["category_id"]] == off_cat[t["category_id"]]]
        best = max(candidates, key=lambda a: iou(a["bbox"], t["bbox"]))
        assert iou(best["bbox"], t["bbox"]) >= 0.99, (t, best)
        pool[t["image_id"]].remove(best)
    assert all(not left for left in pool.values())


@needs_shared
def test_coco128_background_images_and_orphan_labels():
    data = convert_yolo(COCO128)
    names = {i["file_name"]: i["id"] for i in data.images}
    for background in ("000000000250.jpg", "000000000508.jpg"):
        assert not [a for a in data.annotations if a["image_id"] == names[background]]
    orphans = sorted(s["file"].rsplit("/", 1)[-1] for s in data.skipped if s["what"] == "label file")
    assert orphans == ["000000000656.txt", "000000000659.txt"]


@needs_shared
def test_voc_samples_convert_and_load_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    for year in ("VOC2007", "VOC2012"):
        out = tmp_path / f"{year}.json"
        assert main(["data", "convert", "--from", "voc", str(VOC / year), "--out", str(out)]) == 0
        coco = COCO(str(out))
        assert len(coco.getImgIds()) == 5 and len(coco.getAnnIds()) > 0
    data = convert_voc(VOC / "VOC2007")
    first = next(a for a in data.annotations if a["image_id"] == 5)
    assert first["bbox"] == [262.0, 210.0, 62.0, 129.0]  # VOC (263, 211, 324, 339), 1-based inclusive
    assert [s["reason"] for s in data.skipped] == ["chair marked difficult"] * 2
    assert len(convert_voc(VOC / "VOC2007", keep_difficult=True).annotations) == len(data.annotations) + 2
    # 2007_000027 has one person with <part> sub-boxes (head, hands, feet): one box, not several.
    v12 = convert_voc(VOC / "VOC2012")
    assert len([a for a in v12.annotations if a["image_id"] == 1]) == 1
    trainval = convert_voc(VOC / "VOC2007", split="trainval")  # the list names all five
    assert trainval.to_dict() == data.to_dict()
    with pytest.raises(TransferKitError, match="split list not found: .*val.txt"):
        convert_voc(VOC / "VOC2007", split="val")


def test_broken_voc_xml_is_one_line(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text("<annotation><object><name>cat</name></annotation>")
    with pytest.raises(TransferKitError, match=r"a.xml: not valid VOC XML .*fix or remove the file") as err:
        convert_voc(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><size><width>10</width><height>10</height></size><object><name>cat</name>"
        "<bndbox><xmin>a</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    data = convert_voc(tmp_path)
    assert data.skipped[0]["reason"] == "<xmin> is 'a', not a finite number"
    (tmp_path / "Annotations" / "a.xml").write_text(
        '<!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><annotation>&b;</annotation>')
    with pytest.raises(TransferKitError, match="not valid VOC XML"):
        convert_voc(tmp_path)  # entity definitions are refused (defusedxml)


def test_yolo_bad_lines_are_skipped_with_reasons(tmp_path):
    from PIL import Image

    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "train" / "a.jpg")
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\nx y\n1 2 2 0.1 0.1\n")
    data = convert_yolo(tmp_path)
    assert [a["bbox"] for a in data.annotations] == [[40.0, 20.0, 20.0, 10.0]]
    reasons = [s["reason"] for s in data.skipped]
    assert reasons[0] == "class 7 is not in 0..1"
    assert reasons[1].startswith("not `class cx cy w h`")
    assert reasons[2].startswith("no area inside the 100x50 image")
    with pytest.raises(TransferKitError, match="is not a YOLO dataset root"):
        convert_yolo(tmp_path / "images")


def polygon_area(flat):
    pts = list(zip(flat[::2], flat[1::2], strict=True))
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True))) / 2


@needs_shared
def test_labelme_instances_agree_with_labelmes_own_coco_export(tmp_path):
    root = SHARED_DATA / "labelme_examples" / "instance_segmentation"
    out = tmp_path / "lm.json"
    assert main(["data", "convert", "--from", "labelme", str(root / "data_annotated"), "--out", str(out)]) == 0
    ours = json.loads(out.read_text())
    theirs = json.loads((root / "data_dataset_coco" / "annotations.json").read_text())
    def by_image(d):
        names = {c["id"]: c["name"] for c in d["categories"]}
        files = {i["id"]: i["file_name"].rsplit("/", 1)[-1].rsplit(".", 1)[0] for i in d["images"]}
        grouped = {}
        for a in d["annotations"]:
            grouped.setdefault(files[a["image_id"]], []).append((names[a["category_id"]], a))
        return grouped
    mine, ref = by_image(ours), by_image(theirs)
    assert sorted(mine) == sorted(ref) and sum(map(len, ref.values())) == 12
    for image, expected in ref.items():
        got = list(mine[image])
        assert sorted(n for n, _ in got) == sorted(n for n, _ in expected), image
        for name, t in expected:
            match = max((a for n, a in got if n == name), key=lambda a: iou(a["bbox"], t["bbox"]))
            # labelme's boxes come from the rasterised mask (whole pixels): every edge within one pixel.
            edges = lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])  # noqa: E731
            assert all(abs(a - b) <= 1.0 for a, b in zip(edges(match["bbox"]), edges(t["bbox"]), strict=True))
            their_area = sum(polygon_area(p) for p in t["segmentation"])
            assert match["area"] == pytest.approx(their_area, rel=0.01), (image, name)
            got.remove((name, match))


@needs_shared
def test_labelme_rectangles_agree_with_labelmes_own_voc_export():
    """labelme writes its rectangle corners into the VOC XML as they are (no 1-based shift), so our
    COCO boxes must have exactly those corners; the XML read as true VOC sits one pixel left and up."""
    import defusedxml.ElementTree as ET

    root = SHARED_DATA / "labelme_examples" / "bbox_detection"
    ours = convert_labelme(root / "data_annotated").to_dict()
    names = {c["id"]: c["name"] for c in ours["categories"]}
    files = {i["id"]: i["file_name"].rsplit(".", 1)[0] for i in ours["images"]}
    mine = {}
    for a in ours["annotations"]:
        x, y, w, h = a["bbox"]
        mine.setdefault(files[a["image_id"]], []).append((names[a["category_id"]], x, y, x + w, y + h))
    xmls = sorted((root / "data_dataset_voc" / "Annotations").glob("*.xml"))
    assert sorted(mine) == [x.stem for x in xmls] and len(xmls) == 3
    total = 0
    for xml in xmls:
        theirs = [(o.findtext("name"), *(float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
                  for o in ET.parse(xml).getroot().iter("object")]
        got = sorted(mine[xml.stem])
        assert [g[0] for g in got] == sorted(t[0] for t in theirs), xml.name
        for g, t in zip(got, sorted(theirs), strict=True):
            assert max(abs(a - b) for a, b in zip(g[1:], t[1:], strict=True)) < 2e-3, (xml.name, g, t)
        total += len(theirs)
    assert total == sum(map(len, mine.values())) > 0
    as_voc = convert_voc(root / "data_dataset_voc")
    first = min(as_voc.annotations, key=lambda a: (a["image_id"], a["bbox"]))
    assert first["bbox"][0] == pytest.approx(min(m[1] for m in mine["2011_000003"]) - 1, abs=2e-3)


@needs_shared
def test_labelme_shape_types_and_embedded_image():
    from transferkit.data.convert.labelme import convert_labelme

    prim = convert_labelme(SHARED_DATA / "labelme_examples" / "primitives")
    assert sorted(s["reason"] for s in prim.skipped) == [f"shape type {t!r} has no area"
                                                        for t in ("line", "linestrip", "mask", "point")]
    embedded = convert_labelme(SHARED_DATA / "labelme_examples" / "tutorial")
    assert embedded.images[0]["width"] > 0 and embedded.annotations


def test_broken_labelme_json(tmp_path):
    from transferkit.data.convert.labelme import convert_labelme

    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(TransferKitError, match=r"a.json: not valid JSON"):
        convert_labelme(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"shapes": [{"label": "cat", "points": [[1, 2]]}],
                                                 "imageWidth": 10, "imageHeight": 10, "imagePath": "a.jpg"}))
    data = convert_labelme(tmp_path)
    assert data.skipped[0]["reason"] == "a polygon needs 3 or more points, has 1"
    # JSON that is not a labelme file: a list, or a mapping without a `shapes` list
    for other in ([{"shapes": []}], {"shapes": "none"}, {"version": "5.2"}):
        (tmp_path / "a.json").write_text(json.dumps(other))
        with pytest.raises(TransferKitError) as caught:
            convert_labelme(tmp_path)
        assert str(caught.value) == f"{tmp_path / 'a.json'}: not a labelme file (no `shapes` list)", other


@needs_shared
def test_cityscapes_instances_groups_and_clipping(tmp_path):
    from pycocotools.coco import COCO

    from transferkit.data.convert.cityscapes import convert_cityscapes

    root = SHARED_DATA / "cityscapes_mini"
    out = tmp_path / "cs.json"
    assert main(["data", "convert", "--from", "cityscapes", str(root), "--out", str(out)]) == 0
    coco = COCO(str(out))
    data = json.loads(out.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    counts = {}
    for a in data["annotations"]:
        key = (names[a["category_id"]], a["iscrowd"])
        counts[key] = counts.get(key, 0) + 1
    # The polygons files hold 92 car, 8 person, 4 bicycle, 1 rider, 1 truck and 4 cargroup objects.
    assert counts == {("car", 0): 92, ("person", 0): 8, ("bicycle", 0): 4, ("rider", 0): 1, ("truck", 0): 1,
                      ("car", 1): 4}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 2048 and y + h <= 1024
    assert len(coco.getImgIds()) == 8
    assert all((root / i["file_name"]).is_file() for i in data["images"])
    only_cars = convert_cityscapes(root, classes=["car"])
    assert {a["category_id"] for a in only_cars.annotations} == {1} and len(only_cars.annotations) == 96


@needs_shared
def test_coco_to_yolo_reproduces_the_shipped_ultralytics_labels(tmp_path):
    out = tmp_path / "yolo"
    assert main(["data", "convert", "--from", "coco", str(COCO128 / "annotations" / "instances_train2017.json"),
                 "--to", "yolo", "--images", str(COCO128 / "images" / "train2017"), "--out", str(out),
                 "--split", "train2017"]) == 0
    official = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    yolo_index = {c["name"]: i for i, c in enumerate(official["categories"])}
    shipped_names = __import__("yaml").safe_load((COCO128 / "coco128.yaml").read_text())["names"]
    compared = 0
    for label in sorted((COCO128 / "labels" / "train2017").glob("*.txt")):
        if not (COCO128 / "images" / "train2017" / f"{label.stem}.jpg").exists():
            continue  # the two upstream orphans
        ours = sorted(tuple(map(float, ln.split())) for ln in (out / "labels" / "train2017" / label.name).read_text()
                      .splitlines())
        theirs = sorted((float(yolo_index[shipped_names[int(ln.split()[0])]]), *map(float, ln.split()[1:]))
                        for ln in label.read_text().splitlines() if ln.strip())
        assert len(ours) == len(theirs), label.name
        for a, b in zip(ours, theirs, strict=True):
            assert a[0] == b[0] and max(abs(x - y) for x, y in zip(a[1:], b[1:], strict=True)) < 2e-3, (label, a, b)
        compared += len(ours)
    assert compared == 929
    # background images get no label file but keep their image; crowd regions are reported
    assert not (out / "labels" / "train2017" / "000000000250.txt").exists()
    assert (out / "images" / "train2017" / "000000000250.jpg").exists()
    # and back: our YOLO output converts to the same boxes again
    back = convert_yolo(out, "train2017").to_dict()
    assert len(back["annotations"]) == 929 and len(back["images"]) == 128


def test_coco_json_structure_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "a.json"
    cases = {
        "[]": "is an object",
        '{"images": {}, "categories": []}': "`images` must be a list",
        '{"images": [{"id": 1}], "categories": []}': "images[0] has no `file_name`",
        '{"images": [{"id": 1, "file_name": "../x.jpg"}], "categories": []}': "inside the image folder",
        '{"images": [{"id": 1, "file_name": "x.jpg", "width": -3}], "categories": []}': "images[0].width",
        '{"images": [], "categories": [], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2]}]}':
            "annotations[0].bbox",
        '{"images": [], "categories": [], "annotations": [{"image_id": 1, "category_id": 1, '
        '"bbox": [1, 2, "a", 4]}]}': "finite number",
    }
    (tmp_path / "img").mkdir()
    for text, expected in cases.items():
        bad.write_text(text)
        assert main(["data", "convert", "--from", "coco", str(bad), "--to", "yolo", "--images",
                     str(tmp_path / "img"), "--out", str(tmp_path / "y")]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and str(bad) in err and "\n" not in err, err


# Every text file a user hands over is read as UTF-8 whatever the locale (Windows' cp1252, a C locale
# in a container): run under an ASCII locale with Python's UTF-8 mode and locale coercion off, a
# reader that left the encoding to the locale fails to decode these non-ASCII names. (File names
# stay ASCII: under an ASCII locale Python cannot name any other file.)
ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}

READ_UNDER_ASCII = """
import json, sys
from pathlib import Path
from transferkit.config import load_config
from transferkit.data.convert import convert_cityscapes, convert_labelme, convert_voc, convert_yolo
from transferkit.data.convert.csv_boxes import convert_csv
from transferkit.data.lists import read_classes, read_list
from transferkit.data.tfrecord import read_label_map

root = Path(sys.argv[1])
cats = lambda coco: coco.categories
print(json.dumps({
    "labelme": cats(convert_labelme(root / "labelme")),
    "cityscapes": [s["reason"] for s in convert_cityscapes(root / "cityscapes", "val").skipped],
    "yolo": cats(convert_yolo(root / "yolo")),
    "csv": cats(convert_csv(root / "boxes.csv", root)),
    "voc": [i["file_name"] for i in convert_voc(root / "voc", "train").images],
    "classes": read_classes(root / "classes.txt"),
    "list": [str(p.relative_to(root)) for p, _ in read_list(root / "train.txt", root)],
    "label_map": read_label_map(root / "label_map.pbtxt"),
    "config": str(load_config(root / "run.yaml").data.root),
}))
"""


def test_text_files_are_read_as_utf8_whatever_the_locale(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    def write(rel: str, text: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")

    write("labelme/a.json", json.dumps({"imagePath": "a.jpg", "imageHeight": 10, "imageWidth": 10, "shapes": [
        {"label": "café", "shape_type": "rectangle", "points": [[1, 1], [5, 5]]}]}, ensure_ascii=False))
    write("cityscapes/gtFine/val/koln/koln_000001_000019_gtFine_polygons.json", json.dumps(
        {"imgWidth": 10, "imgHeight": 10, "objects": [{"label": "straße", "polygon": [[0, 0], [5, 0], [5, 5]]}]},
        ensure_ascii=False))
    write("yolo/data.yaml", "names: [café, thé]\n")
    write("yolo/labels/train/a.txt", "1 0.5 0.5 0.2 0.2\n")  # numbers only: no encoding to get wrong
    Image.new("RGB", (10, 10)).save((tmp_path / "yolo/images/train").mkdir(parents=True) or
                                    tmp_path / "yolo/images/train/a.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "e.png")
    write("boxes.csv", "filename,width,height,class,xmin,ymin,xmax,ymax\ne.png,10,10,thé,1,1,5,5\n")
    write("voc/Annotations/b.xml", "<annotation><filename>b.jpg</filename><size><width>10</width>"
                                  "<height>10</height></size></annotation>")
    write("voc/ImageSets/Main/train.txt", "b  # sélection\n")
    write("classes.txt", "café\nthé\n")
    write("train.txt", "0\t1\te.png\n")  # a non-ASCII path cannot be resolved under this locale
    write("label_map.pbtxt", "item { id: 1 name: 'café' }\n")
    write("run.yaml", "data:\n  root: données\n")
    script = tmp_path / "read.py"
    script.write_text(READ_UNDER_ASCII, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         encoding="utf-8", env={**os.environ, **ASCII_LOCALE}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == {
        "labelme": ["café"], "cityscapes": ["'straße' is not an instance class"], "yolo": ["café", "thé"],
        "csv": ["thé"], "voc": ["b.jpg"], "classes": ["café", "thé"], "list": ["e.png"],
        "label_map": {"1": "café"}, "config": "données"}
