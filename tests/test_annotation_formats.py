"""Detection data as users bring it: labelImg folders of VOC XMLs, CSV boxes, TF OD API TFRecords."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import SHARED_DATA, needs_shared
from detection_fixtures import (
    csv_from_voc,
    example,
    float_feature,
    frame,
    labelimg_from_voc,
    make_voc_year,
    tfrecord_from_voc,
    voc_objects,
)

from transferkit.checksums import masked_crc32c
from transferkit.cli import main
from transferkit.config import load_config
from transferkit.data.check import check_dataset
from transferkit.data.convert.voc import convert_voc
from transferkit.data.tfrecord import scan_records
from transferkit.errors import TransferKitError
from transferkit.run import train


@pytest.fixture(scope="module")
def year(tmp_path_factory):
    return make_voc_year(tmp_path_factory.mktemp("voc") / "VOC2007")


def _convert(tmp_path, *args) -> dict:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*.json')))}.json"
    assert main(["data", "convert", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def assert_same_coco(ours: dict, reference: dict) -> None:
    """Same images (ids, names, sizes), categories and boxes (within 0.5 px) as the reference."""
    assert ours["images"] == reference["images"]
    assert ours["categories"] == reference["categories"]

    def boxes(doc):
        return sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in doc["annotations"])

    mine, theirs = boxes(ours), boxes(reference)
    assert len(mine) == len(theirs) > 0
    for m, t in zip(mine, theirs, strict=True):
        assert m[:2] == t[:2] and max(abs(a - b) for a, b in zip(m[2:], t[2:], strict=True)) <= 0.5, (m, t)


def test_the_crc_is_castagnoli_and_masked_as_tensorflow_does():
    import crc32c

    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_labelimg_csv_and_tfrecord_convert_to_the_coco_of_their_voc_source(year, tmp_path):
    reference = convert_voc(year).to_dict()
    # the reference itself matches the XMLs: VOC's 1-based inclusive corners, difficult left out
    objects = voc_objects(year)
    first = objects["img_000.jpg"]["objects"][0]
    box = next(a["bbox"] for a in reference["annotations"] if a["image_id"] == 1)
    assert box == [first[1] - 1, first[2] - 1, first[3] - first[1] + 1, first[4] - first[2] + 1]
    assert len(reference["annotations"]) == sum(len(o["objects"]) for o in objects.values()) - 1
    # labelImg: flat XMLs + images/, and XMLs beside their images
    flat = labelimg_from_voc(year, tmp_path / "labelimg")
    assert_same_coco(_convert(tmp_path, "--from", "voc", str(flat)), reference)
    beside = labelimg_from_voc(year, tmp_path / "beside", beside=True)
    assert_same_coco(_convert(tmp_path, "--from", "voc", str(beside)), reference)
    # CSV, default and renamed headers
    csv_path = csv_from_voc(year, tmp_path / "boxes.csv")
    assert_same_coco(_convert(tmp_path, "--from", "csv", str(csv_path), "--images", str(year / "JPEGImages")),
                     reference)
    renamed = csv_from_voc(year, tmp_path / "renamed.csv", {"class": "label", "filename": "image"})
    assert_same_coco(_convert(tmp_path, "--from", "csv", str(renamed), "--images", str(year / "JPEGImages"),
                              "--columns", "class=label,filename=image"), reference)
    # TFRecord: boxes and the images themselves, byte for byte
    record = tfrecord_from_voc(year, tmp_path / "train.tfrecord")
    assert_same_coco(_convert(tmp_path, "--from", "tfrecord", str(record), "--images", str(tmp_path / "tf_images")),
                     reference)
    for img in reference["images"]:
        assert (tmp_path / "tf_images" / img["file_name"]).read_bytes() == \
            (year / "JPEGImages" / img["file_name"]).read_bytes()
    by_id = tfrecord_from_voc(year, tmp_path / "by_id.tfrecord", source_id_only=True)  # named by source_id
    assert_same_coco(_convert(tmp_path, "--from", "tfrecord", str(by_id), "--images", str(tmp_path / "by_id")),
                     reference)
    keep = _convert(tmp_path, "--from", "tfrecord", str(record), "--images", str(tmp_path / "keep"),
                    "--keep-difficult")
    assert len(keep["annotations"]) == len(reference["annotations"]) + 1


def test_voc_image_folders_backgrounds_and_splits(year, tmp_path):
    flat = labelimg_from_voc(year, tmp_path / "labelimg")
    (flat / "img_003.xml").unlink()  # now a background image, when the image folder is given
    without = convert_voc(flat)
    assert [i["file_name"] for i in without.images] == [f"img_{i:03d}.jpg" for i in range(8) if i != 3]
    withbg = convert_voc(flat, images=flat / "images")
    names = {i["id"]: i["file_name"] for i in withbg.images}
    assert sorted(names.values()) == [f"img_{i:03d}.jpg" for i in range(8)]
    assert not [a for a in withbg.annotations if names[a["image_id"]] == "img_003.jpg"]
    # a list file of stems
    (tmp_path / "val.txt").write_text("img_001\nimg_005\n")
    listed = convert_voc(flat, str(tmp_path / "val.txt"), images=flat / "images")
    assert [i["file_name"] for i in listed.images] == ["img_001.jpg", "img_005.jpg"]
    # a seeded fraction: train and val part the images, the same every time
    train = convert_voc(flat, "train", val_fraction=0.25, seed=3)
    val = convert_voc(flat, "val", val_fraction=0.25, seed=3)
    ids = {i["id"] for i in without.images}
    assert {i["id"] for i in train.images} | {i["id"] for i in val.images} == ids
    assert len(val.images) == 2 and not {i["id"] for i in train.images} & {i["id"] for i in val.images}
    assert convert_voc(flat, "val", val_fraction=0.25, seed=3).to_dict() == val.to_dict()
    assert convert_voc(flat, "val", val_fraction=0.25, seed=4).to_dict() != val.to_dict()
    # folders: annotations/<split>/ beside images/<split>/
    for split, stems in (("train", range(0, 5)), ("val", range(5, 8))):
        (tmp_path / "ds" / "annotations" / split).mkdir(parents=True)
        (tmp_path / "ds" / "images" / split).mkdir(parents=True)
        for i in stems:
            name = f"img_{i:03d}"
            (tmp_path / "ds" / "annotations" / split / f"{name}.xml").write_bytes(
                (year / "Annotations" / f"{name}.xml").read_bytes())
            (tmp_path / "ds" / "images" / split / f"{name}.jpg").write_bytes(
                (year / "JPEGImages" / f"{name}.jpg").read_bytes())
    nested = convert_voc(tmp_path / "ds" / "annotations", "val")
    assert [i["file_name"] for i in nested.images] == ["img_005.jpg", "img_006.jpg", "img_007.jpg"]
    assert nested.image_root == tmp_path / "ds" / "images" / "val"
    # an image nowhere to be found is named, with where it was looked for
    (flat / "images" / "img_000.jpg").unlink()
    skipped = convert_voc(flat).skipped
    assert skipped[0]["file"].endswith("img_000.xml") and "its image is not found" in skipped[0]["reason"]
    with pytest.raises(TransferKitError, match="neither a list file nor a folder"):
        convert_voc(flat, "nosuch")


def test_an_image_found_only_by_its_recorded_path(year, tmp_path):
    import xml.etree.ElementTree as ET

    (tmp_path / "xmls").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for i, xml in enumerate(sorted((year / "Annotations").glob("*.xml"))[:2]):
        root = ET.parse(xml).getroot()
        name = root.findtext("filename")
        (tmp_path / "elsewhere" / f"renamed_{i}.jpg").write_bytes((year / "JPEGImages" / name).read_bytes())
        ET.SubElement(root, "path").text = str(tmp_path / "elsewhere" / f"renamed_{i}.jpg")
        ET.ElementTree(root).write(tmp_path / "xmls" / xml.name)
    found = convert_voc(tmp_path / "xmls")
    assert found.image_root == tmp_path / "elsewhere" and not found.skipped
    assert [i["file_name"] for i in found.images] == ["renamed_0.jpg", "renamed_1.jpg"]
    with pytest.raises(TransferKitError, match="needs the part to keep: --split train or --split val"):
        convert_voc(tmp_path / "xmls", val_fraction=0.5)


def test_data_check_reads_the_new_layouts(year, tmp_path):
    flat = labelimg_from_voc(year, tmp_path / "labelimg")
    report = check_dataset(flat)
    assert report.fmt == "voc" and report.images == 8 and not report.errors
    assert [f.kind for f in report.findings] == ["difficult skipped"]
    record = tfrecord_from_voc(year, tmp_path / "a.tfrecord")
    report = check_dataset(record)
    assert report.fmt == "tfrecord" and report.images == 8 and not report.errors
    assert sum(report.class_counts.values()) == sum(len(o["objects"]) for o in voc_objects(year).values()) - 1
    report = check_dataset(csv_from_voc(year, tmp_path / "b.csv"), images=year / "JPEGImages")
    assert report.fmt == "csv" and report.images == 8 and not report.findings
    (flat / "images" / "img_004.jpg").write_bytes(b"not an image")
    assert [f.kind for f in check_dataset(flat).errors] == ["undecodable image"]


def test_damaged_tfrecords_are_named_by_record(year, tmp_path):
    good = tfrecord_from_voc(year, tmp_path / "good.tfrecord").read_bytes()
    assert len(list(scan_records(tmp_path / "good.tfrecord"))) == 8
    offsets = []
    pos = 0
    while pos < len(good):
        offsets.append(pos)
        pos += 16 + struct.unpack("<Q", good[pos:pos + 8])[0]
    damaged = bytearray(good)
    damaged[offsets[2] + 40] ^= 0xFF  # a byte inside record 2's data
    (tmp_path / "bad.tfrecord").write_bytes(bytes(damaged))
    with pytest.raises(TransferKitError, match=r"bad.tfrecord: record 2 .*damaged data \(CRC mismatch\)"):
        list(scan_records(tmp_path / "bad.tfrecord"))
    (tmp_path / "cut.tfrecord").write_bytes(good[:offsets[5] + 100])
    with pytest.raises(TransferKitError, match=r"record 5 .*declares \d+ bytes, but 84 are left"):
        list(scan_records(tmp_path / "cut.tfrecord"))
    huge = struct.pack("<Q", 1 << 40)  # a length that would exhaust memory, with a valid CRC
    (tmp_path / "huge.tfrecord").write_bytes(huge + struct.pack("<I", masked_crc32c(huge)) + b"\0" * 64)
    with pytest.raises(TransferKitError, match=r"record 0 \(byte 0\): declares 1099511627776 bytes"):
        list(scan_records(tmp_path / "huge.tfrecord"))
    damaged = bytearray(good)
    damaged[offsets[1] + 3] ^= 0x01  # the length of record 1
    (tmp_path / "len.tfrecord").write_bytes(bytes(damaged))
    with pytest.raises(TransferKitError, match=r"record 1 .*damaged length"):
        list(scan_records(tmp_path / "len.tfrecord"))
    # framing intact, but boxes of different lengths
    (tmp_path / "ragged.tfrecord").write_bytes(frame(example({
        "image/object/bbox/xmin": float_feature([0.1, 0.2]), "image/object/bbox/ymin": float_feature([0.1]),
        "image/object/bbox/xmax": float_feature([0.5, 0.6]), "image/object/bbox/ymax": float_feature([0.5, 0.6])})))
    assert main(["data", "convert", "--from", "tfrecord", str(tmp_path / "ragged.tfrecord"), "--images",
                 str(tmp_path / "r"), "--out", str(tmp_path / "r.json")]) == 2


def tiny_detection(root, **extra) -> list[str]:
    values = {"task": "detection", "model.name": "test_efficientnet", "pretrained.source": "null",
              "data.root": str(root), "data.batch_size": 4, "optim.name": "adamw", "optim.lr": 0.001,
              "optim.head_lr_mult": 1, "detection.arch": "fcos", "detection.min_size": "[64]",
              "detection.max_size": 96, "detection.fpn_channels": 32, "schedule.epochs": 1, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def test_training_reads_a_labelimg_folder_and_tfrecords_directly(year, tmp_path):
    flat = labelimg_from_voc(year, tmp_path / "labelimg")
    (tmp_path / "records").mkdir()
    tfrecord_from_voc(year, tmp_path / "records" / "all.tfrecord")
    runs = {}
    for name, extra in (
        ("voc", {"data.format": "voc", "data.val_fraction": 0.25}),
        ("tfrecord", {"data.format": "tfrecord", "data.root": str(tmp_path / "records"),
                      "data.train_records": "['*.tfrecord']", "data.val_fraction": 0.25}),
    ):
        cfg = load_config(None, tiny_detection(flat, **extra))
        result = train(cfg, out=tmp_path / name, quiet=True)
        runs[name] = [{k: v for k, v in m.items() if k != "seconds"} for m in result.metrics]
    # the same images, boxes and split from both: the same losses and mAP
    assert runs["voc"] == runs["tfrecord"] and runs["voc"][0]["train_loss"] > 0


def _png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_tfrecord_masks_labels_without_text_and_names(tmp_path):
    import numpy as np
    from detection_fixtures import bytes_feature, int64_feature
    from pycocotools import mask as mask_utils

    mask = np.zeros((10, 20), np.uint8)
    mask[2:5, 3:7] = 1
    records = [frame(example({  # no image/width or height: read from the image; no class text: the label map
        "image/encoded": bytes_feature([_png(np.full((10, 20, 3), 90, np.uint8))]),
        "image/format": bytes_feature([b"png"]), "image/source_id": bytes_feature([b"42"]),
        "image/object/bbox/xmin": float_feature([3 / 20]), "image/object/bbox/ymin": float_feature([0.2]),
        "image/object/bbox/xmax": float_feature([7 / 20]), "image/object/bbox/ymax": float_feature([0.5]),
        "image/object/class/label": int64_feature([2]), "image/object/mask": bytes_feature([_png(mask * 255)]),
    })) for _ in range(2)]
    (tmp_path / "m.tfrecord").write_bytes(b"".join(records))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    doc = _convert(tmp_path, "--from", "tfrecord", str(tmp_path / "m.tfrecord"), "--images", str(tmp_path / "im"),
                   "--classes", str(tmp_path / "classes.txt"))
    assert sorted(i["file_name"] for i in doc["images"]) == ["42-2.png", "42.png"]  # source_id, made unique
    assert doc["images"][0]["width"] == 20 and doc["images"][0]["height"] == 10
    ann = doc["annotations"][0]
    assert ann["category_id"] == 2 and ann["bbox"] == pytest.approx([3, 2, 4, 3], abs=1e-4)
    rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
    assert (mask_utils.decode(rle) == mask).all()


@needs_shared
@pytest.mark.parametrize("year_name", ["VOC2007", "VOC2012"])
def test_real_voc_files_in_labelimg_layout_convert_as_their_year_folder(year_name, tmp_path):
    """Pascal VOC's own XMLs and JPEGs, laid out as labelImg keeps them (annotations/ beside images/)."""
    import shutil

    year = SHARED_DATA / "voc_mini" / "VOCdevkit" / year_name
    shutil.copytree(year / "Annotations", tmp_path / "annotations")
    shutil.copytree(year / "JPEGImages", tmp_path / "images")
    flat = convert_voc(tmp_path / "annotations")
    assert flat.image_root == tmp_path / "images"
    assert_same_coco(flat.to_dict(), convert_voc(year).to_dict())
    assert [s["reason"] for s in flat.skipped] == [s["reason"] for s in convert_voc(year).skipped]


@needs_shared
def test_coco128_as_a_tfrecord_gives_back_the_official_boxes_and_images(tmp_path):
    from detection_fixtures import tfrecord_from_coco

    root = SHARED_DATA / "coco128"
    official = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    record = tfrecord_from_coco(official, root / "images" / "train2017", tmp_path / "coco128.tfrecord")
    doc = _convert(tmp_path, "--from", "tfrecord", str(record), "--images", str(tmp_path / "images"))
    assert {(i["id"], i["file_name"], i["width"], i["height"]) for i in doc["images"]} == {
        (i["id"], i["file_name"], i["width"], i["height"]) for i in official["images"]}
    names = {c["id"]: c["name"] for c in official["categories"]}
    ours = {c["id"]: c["name"] for c in doc["categories"]}
    expected = sorted((a["image_id"], names[a["category_id"]], *a["bbox"]) for a in official["annotations"]
                      if not a["iscrowd"])
    got = sorted((a["image_id"], ours[a["category_id"]], *a["bbox"]) for a in doc["annotations"])
    assert len(got) == len(expected) == 929
    for g, e in zip(got, expected, strict=True):
        assert g[:2] == e[:2] and max(abs(a - b) for a, b in zip(g[2:], e[2:], strict=True)) <= 0.5, (g, e)
    some = official["images"][7]["file_name"]
    assert (tmp_path / "images" / some).read_bytes() == (root / "images" / "train2017" / some).read_bytes()


def test_a_label_map_names_the_classes(year, tmp_path):
    from transferkit.data.tfrecord import read_label_map

    (tmp_path / "label_map.pbtxt").write_text(
        "item {\n  id: 2\n  name: 'dog'\n  display_name: 'Dog'\n  frequency: FREQUENT\n}\n"
        "item {\n  name: \"cat\"\n  id: 1\n}\nitem { id: 7 name: 'bird' }\n")
    assert read_label_map(tmp_path / "label_map.pbtxt") == {1: "cat", 2: "dog", 7: "bird"}
    record = tfrecord_from_voc(year, tmp_path / "a.tfrecord")  # class/label 1 cat, 2 dog
    doc = _convert(tmp_path, "--from", "tfrecord", str(record), "--images", str(tmp_path / "im"),
                   "--label-map", str(tmp_path / "label_map.pbtxt"))
    assert [c["name"] for c in doc["categories"]] == ["cat", "dog", "bird"]
    reference = convert_voc(year).to_dict()
    reference["categories"].append({"id": 3, "name": "bird", "supercategory": ""})
    assert_same_coco(doc, reference)
    # class/label is what the TF OD API trains on: where the map and class/text disagree, the map names it
    (tmp_path / "renamed.pbtxt").write_text("item { id: 1 name: 'kitty' }\nitem { id: 2 name: 'doggo' }\n")
    doc = _convert(tmp_path, "--from", "tfrecord", str(record), "--images", str(tmp_path / "im2"),
                   "--label-map", str(tmp_path / "renamed.pbtxt"))
    assert [c["name"] for c in doc["categories"]] == ["kitty", "doggo"]
    assert len(doc["annotations"]) == len(reference["annotations"])
    (tmp_path / "bad.pbtxt").write_text("item { id: 1 name: 'cat' }\nitem { id: 1 name: 'dog' }\n")
    with pytest.raises(TransferKitError, match="bad.pbtxt: id 1 is both 'cat' and 'dog'"):
        read_label_map(tmp_path / "bad.pbtxt")
    (tmp_path / "bad.pbtxt").write_text("item { id: 'x' }")
    with pytest.raises(TransferKitError, match="bad.pbtxt: not a TF OD API label map"):
        read_label_map(tmp_path / "bad.pbtxt")


def test_which_splits_exist_in_each_voc_layout(tmp_path):
    """data.train_split names an ImageSets/Main list in a year folder, a sub-folder of a labelImg
    folder, or a list file anywhere; a split that is none of these is drawn by val_fraction."""
    from transferkit.data.convert.voc import voc_split_exists

    year = tmp_path / "VOC2007"
    (year / "Annotations").mkdir(parents=True)
    (year / "ImageSets" / "Main").mkdir(parents=True)
    (year / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    (year / "val").mkdir()  # a folder is no split in a year folder: its splits are lists
    listed = tmp_path / "mine.txt"
    listed.write_text("a\n")
    assert voc_split_exists(year, "train")
    assert not voc_split_exists(year, "val") and not voc_split_exists(year, "test")
    assert voc_split_exists(year, str(listed))

    flat = tmp_path / "labelimg"
    (flat / "train").mkdir(parents=True)
    (flat / "ImageSets" / "Main").mkdir(parents=True)
    (flat / "ImageSets" / "Main" / "val.txt").write_text("a\n")  # lists count in year folders only
    assert voc_split_exists(flat, "train") and voc_split_exists(flat, str(listed))
    assert not voc_split_exists(flat, "val")


def test_images_are_looked_for_under_images_then_up_to_the_root_and_no_further(year, tmp_path):
    """--images DIR: an XML's image is DIR/<filename> or DIR/<the XML's folder under the root>/<filename>;
    without it, a sibling images/ of the XML's folder or of a folder above it, up to the root's own
    sibling and not beyond."""
    import shutil

    from transferkit.data.convert.voc import convert_voc

    a, b, c = sorted((year / "Annotations").glob("*.xml"))[:3]
    root = tmp_path / "work" / "ann"
    (root / "sub").mkdir(parents=True)
    shutil.copy(a, root / a.name)
    shutil.copy(b, root / "sub" / b.name)
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    shutil.copy(year / "JPEGImages" / f"{a.stem}.jpg", pics)
    shutil.copy(year / "JPEGImages" / f"{b.stem}.jpg", pics / "sub")
    found = convert_voc(root, images=pics)
    assert sorted(im["file_name"] for im in found.images) == sorted([f"{a.stem}.jpg", f"sub/{b.stem}.jpg"])
    assert found.image_root == pics and not found.skipped

    # Without --images: work/images/ (the root's sibling) is looked in; images/ above work/ is not.
    shutil.rmtree(pics)
    shutil.copy(c, root / c.name)
    (tmp_path / "work" / "images" / "sub").mkdir(parents=True)
    shutil.copy(year / "JPEGImages" / f"{a.stem}.jpg", tmp_path / "work" / "images")
    shutil.copy(year / "JPEGImages" / f"{b.stem}.jpg", tmp_path / "work" / "images" / "sub")
    (tmp_path / "images" / "ann").mkdir(parents=True)
    shutil.copy(year / "JPEGImages" / f"{c.stem}.jpg", tmp_path / "images" / "ann")
    found = convert_voc(root)
    assert sorted(Path(im["file_name"]).name for im in found.images) == sorted([f"{a.stem}.jpg", f"{b.stem}.jpg"])
    assert [s["file"] for s in found.skipped] == [str(root / c.name)]
