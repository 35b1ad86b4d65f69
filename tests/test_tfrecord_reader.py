"""TF OD API TFRecords converted to COCO: the file name each record's image is written as and the
folder it is written into, the record files and globs a conversion reads, image sizes and boxes in
pixels, PNG and float-list masks matched to their objects, class names from class/text, class/label,
--classes and a label map, difficult objects, where each record lies for reading in place, and the
messages that refuse bad input. The records are written in
the tf.train.Example wire format by the fixtures' own encoder (no TensorFlow)."""

from __future__ import annotations

import io
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from detection_fixtures import bytes_feature, example, float_feature, frame, int64_feature
from PIL import Image
from pycocotools import mask as mask_utils

from transferkit.cli import main
from transferkit.data.convert.tfrecord import convert_tfrecord, expand_files, read_tfrecord_dataset
from transferkit.data.tfrecord import RecordSample
from transferkit.errors import TransferKitError


@pytest.fixture(autouse=True)
def deadline():
    """Each test converts a few tiny records: well under a second. One that runs on for 10 s is stuck."""
    def stuck(signum, frame):
        raise TimeoutError("the conversion did not finish in 10 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, "PNG")
    return buf.getvalue()


def record(*, filename: str | None = None, source_id: str | None = None, fmt: str | None = None,
           size: tuple[int, int] | None = (20, 10), encoded: bytes | None = None,
           boxes: list[tuple[float, float, float, float]] = (), texts: list[str] | None = None,
           labels: list[int] | None = None, difficult: list[int] | None = None, masks: list[bytes] | None = None,
           extra: dict[str, bytes | None] | None = None) -> bytes:
    """One framed tf.train.Example with the TF OD API keys given (size is width, height); `extra` sets
    other features by key, or leaves a key out where its value is None."""
    feats = {"image/encoded": bytes_feature([encoded if encoded is not None else _png(np.zeros((10, 20), np.uint8))])}
    for key, value in (("filename", filename), ("source_id", source_id), ("format", fmt)):
        if value is not None:
            feats[f"image/{key}"] = bytes_feature([value.encode()])
    if size is not None:
        feats["image/width"], feats["image/height"] = int64_feature([size[0]]), int64_feature([size[1]])
    for i, key in enumerate(("xmin", "ymin", "xmax", "ymax")):
        feats[f"image/object/bbox/{key}"] = float_feature([b[i] for b in boxes])
    if texts is not None:
        feats["image/object/class/text"] = bytes_feature([t.encode() for t in texts])
    if labels is not None:
        feats["image/object/class/label"] = int64_feature(labels)
    if difficult is not None:
        feats["image/object/difficult"] = int64_feature(difficult)
    if masks is not None:
        feats["image/object/mask"] = bytes_feature(masks)
    for key, value in (extra or {}).items():
        if value is None:
            del feats[key]
        else:
            feats[key] = value
    return frame(example(feats))


def write(path: Path, *records: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(records))
    return path


BOX = (0.25, 0.2, 0.75, 0.8)  # 5, 2, 10 x 6 px in a 20 x 10 image


# --- the file each image is written as ---

def test_images_are_named_by_filename_then_source_id_then_record_number(tmp_path):
    """image/filename's last part (Windows or POSIX separators, never a way out of the folder), else
    image/source_id's, else record-N; the suffix of image/format (.jpg when there is none) is added
    to a name without an image suffix; a name taken already, in any case (one file on macOS and
    Windows), gets -2, -3."""
    pictures = [_png(np.full((10, 20, 3), 10 * i, np.uint8)) for i in range(10)]
    names = [
        dict(filename="C:\\data\\cats\\img_7.jpg", source_id="7", fmt="jpeg"),
        dict(filename="..", source_id="scans\\0042", fmt="png"),
        dict(source_id="..", fmt=None),
        dict(fmt="png"),
        dict(filename="img_7.jpg", fmt="jpeg"),
        dict(filename="../../outside.jpg"),
        dict(filename="notes.txt", fmt="PNG"),
        dict(filename="photo"),
        dict(filename="img_7.jpg", fmt="jpeg"),
        dict(filename="IMG_7.JPG", fmt="jpeg"),
    ]
    src = write(tmp_path / "a.tfrecord", *(record(**n, encoded=p, boxes=[BOX], texts=["cat"])
                                           for n, p in zip(names, pictures, strict=True)))
    out = tmp_path / "deep" / "images"
    dataset = convert_tfrecord([src], out)
    expected = ["img_7.jpg", "0042.png", "record-2.jpg", "record-3.png", "img_7-2.jpg", "outside.jpg",
                "notes.txt.png", "photo.jpg", "img_7-3.jpg", "IMG_7-4.JPG"]
    by_id = {i["id"]: i["file_name"] for i in dataset.images}
    assert [by_id[a["image_id"]] for a in dataset.annotations] == expected  # one box per record, in order
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, picture in zip(expected, pictures, strict=True):
        assert (out / name).read_bytes() == picture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tfrecord", "deep"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["images"]


# --- the record files read ---

def test_files_and_globs_are_read_in_the_order_given(tmp_path, monkeypatch):
    """A glob expands to its matches in sorted order, in the place it was given; a path relative to
    no root is taken from the working folder, an absolute one whatever the root."""
    for name in ("b.tfrecord", "a-2.tfrecord", "a-1.tfrecord", "c.tfrecord"):
        write(tmp_path / "records" / name, record(filename=f"{name}.png"))
    records = tmp_path / "records"
    assert expand_files(["b.tfrecord", "a-*.tfrecord", "c.tfrecord"], records) == [
        records / "b.tfrecord", records / "a-1.tfrecord", records / "a-2.tfrecord", records / "c.tfrecord"]
    assert expand_files([str(records / "c.tfrecord")], tmp_path / "elsewhere") == [records / "c.tfrecord"]
    monkeypatch.chdir(records)
    assert expand_files(["c.tfrecord", Path("a-?.tfrecord")]) == [
        Path("c.tfrecord"), Path("a-1.tfrecord"), Path("a-2.tfrecord")]
    dataset = convert_tfrecord(["a-*.tfrecord", "b.tfrecord"], tmp_path / "im")
    assert sorted(i["file_name"] for i in dataset.images) == ["a-1.tfrecord.png", "a-2.tfrecord.png",
                                                              "b.tfrecord.png"]


def test_a_file_named_twice_is_read_once_where_it_first_appears(tmp_path, monkeypatch):
    """By its name and by a pattern, or by two patterns, or by two spellings of one path: read twice,
    its images would be in the data twice, perhaps on both sides of a validation split."""
    for name in ("a-1.tfrecord", "a-2.tfrecord", "b.tfrecord"):
        write(tmp_path / "records" / name, record(filename=f"{name}.png"))
    records = tmp_path / "records"
    assert expand_files(["a-2.tfrecord", "*.tfrecord", "a-?.tfrecord", "./b.tfrecord"], records) == [
        records / "a-2.tfrecord", records / "a-1.tfrecord", records / "b.tfrecord"]
    dataset = convert_tfrecord([str(records / "b.tfrecord"), str(records / "*.tfrecord")], tmp_path / "im")
    assert sorted(i["file_name"] for i in dataset.images) == ["a-1.tfrecord.png", "a-2.tfrecord.png",
                                                              "b.tfrecord.png"]


def test_missing_files_and_empty_globs_are_refused_by_name(tmp_path, capsys):
    write(tmp_path / "a.tfrecord", record(filename="a.png"))
    with pytest.raises(TransferKitError, match=r"^TFRecord file not found: .*/Xtrain\.tfrecord$"):
        expand_files(["a.tfrecord", "Xtrain.tfrecord"], tmp_path)
    with pytest.raises(TransferKitError, match=r"^no TFRecord file matches .*/val-\*\.tfrecord$"):
        expand_files(["a.tfrecord", "val-*.tfrecord"], tmp_path)
    with pytest.raises(TransferKitError, match=r"^no TFRecord files given$"):
        expand_files([], tmp_path)
    assert main(["data", "convert", "--from", "tfrecord", str(tmp_path / "a.tfrecord"), str(tmp_path / "b.record"),
                 "--images", str(tmp_path / "im"), "--out", str(tmp_path / "a.json")]) == 2
    assert capsys.readouterr().err == f"error: TFRecord file not found: {tmp_path / 'b.record'}\n"
    assert not (tmp_path / "a.json").exists()


def test_converting_needs_a_folder_for_the_images(tmp_path, capsys):
    src = write(tmp_path / "a.tfrecord", record(filename="a.png"))
    assert main(["data", "convert", "--from", "tfrecord", str(src), "--out", str(tmp_path / "a.json")]) == 2
    assert capsys.readouterr().err == ("error: --from tfrecord needs --images DIR: the records' images are "
                                       "written there\n")


# --- masks ---

def test_png_masks_become_each_objects_rle_whatever_the_png_mode(tmp_path):
    """A mask's nonzero pixels are the object: grey, RGB or palette PNGs alike."""
    masks = []
    for k in range(3):
        m = np.zeros((10, 20), np.uint8)
        m[1 + k:4 + k, 2 + 3 * k:6 + 3 * k] = 1
        masks.append(m)
    colour = np.zeros((10, 20, 3), np.uint8)
    colour[masks[1] == 1] = (200, 0, 0)
    palette = Image.fromarray(masks[2], "L").convert("P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    pngs = [_png(masks[0] * 255), _png(colour), buf.getvalue()]
    assert [Image.open(io.BytesIO(p)).mode for p in pngs] == ["L", "RGB", "P"]
    src = write(tmp_path / "m.tfrecord", record(filename="m.png", boxes=[BOX] * 3, texts=["cat"] * 3, masks=pngs))
    dataset = convert_tfrecord([src], tmp_path / "im")
    assert len(dataset.annotations) == 3
    for ann, expected in zip(dataset.annotations, masks, strict=True):
        seg = ann["segmentation"]
        assert seg["size"] == [10, 20]
        assert (mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}) == expected).all()


def test_masks_that_do_not_fit_the_boxes_or_the_image_are_refused(tmp_path):
    one = _png(np.ones((10, 20), np.uint8))
    src = write(tmp_path / "few.tfrecord", record(filename="a.png", boxes=[BOX, BOX], texts=["cat", "dog"],
                                                  masks=[one]))
    with pytest.raises(TransferKitError, match=r"few\.tfrecord: record 0: 1 masks for 2 boxes$"):
        convert_tfrecord([src], tmp_path / "im1")
    small = _png(np.ones((4, 5), np.uint8))  # 5 wide, 4 high
    src = write(tmp_path / "size.tfrecord", record(filename="a.png"),
                record(filename="b.png", boxes=[BOX], texts=["cat"], masks=[small]))
    with pytest.raises(TransferKitError, match=r"size\.tfrecord: record 1: a mask is 5x4, the image 20x10$"):
        convert_tfrecord([src], tmp_path / "im2")


# --- classes ---

def test_records_with_labels_but_no_text_name_their_classes_by_number(tmp_path):
    src = write(tmp_path / "l.tfrecord", record(filename="a.png", boxes=[BOX, BOX], labels=[3, 1]),
                record(filename="b.png", boxes=[BOX], labels=[3]))
    doc = convert_tfrecord([src], tmp_path / "im").to_dict()
    assert [c["name"] for c in doc["categories"]] == ["1", "3"]
    assert [a["category_id"] for a in doc["annotations"]] == [2, 1, 2]


def test_a_label_named_two_ways_is_refused_with_both_names(tmp_path):
    src = write(tmp_path / "c.tfrecord", record(filename="a.png", boxes=[BOX], texts=["cat"], labels=[1]),
                record(filename="b.png", boxes=[BOX], texts=["dog"], labels=[1]))
    message = f"{src}: record 1 names class/label 1 'dog', {src} record 0 named it 'cat'; give --classes"
    with pytest.raises(TransferKitError, match=f"^{re.escape(message)}$"):
        convert_tfrecord([src], tmp_path / "im")


def test_difficult_objects_are_left_out_unless_kept(tmp_path):
    src = write(tmp_path / "d.tfrecord", record(filename="a.png", boxes=[BOX, (0, 0, 0.5, 0.5)],
                                                texts=["cat", "dog"], difficult=[0, 1]))
    dataset = convert_tfrecord([src], tmp_path / "im")
    assert [(a["category_id"], a["bbox"]) for a in dataset.annotations] == [(1, [5.0, 2.0, 10.0, 6.0])]
    assert dataset.skipped == [{"file": f"{src} record 0 object 2", "what": "difficult",
                                "reason": "dog marked difficult", "level": "note"}]
    kept = convert_tfrecord([src], tmp_path / "kept", keep_difficult=True)
    assert [(a["category_id"], a["bbox"]) for a in kept.annotations] == [(1, [5.0, 2.0, 10.0, 6.0]),
                                                                         (2, [0.0, 0.0, 10.0, 5.0])]
    assert kept.skipped == []


def test_a_box_without_area_is_skipped_naming_its_record_and_object(tmp_path):
    src = write(tmp_path / "z.tfrecord", record(filename="a.png", boxes=[BOX, (0.5, 0.5, 0.5, 0.9)],
                                                texts=["cat", "cat"]))
    dataset = convert_tfrecord([src], tmp_path / "im")
    assert dataset.image_root == tmp_path / "im"  # where the images were written: what the COCO file names
    assert len(dataset.annotations) == 1
    assert [(s["file"], s["what"]) for s in dataset.skipped] == [(f"{src} record 0 object 2", "cat box")]


def test_crowd_regions_stay_crowd_regions(tmp_path):
    """image/object/is_crowd (written by the TF OD API's create_coco_tf_record.py) becomes COCO's
    iscrowd, which evaluation ignores and training leaves out; a count that does not fit the boxes
    is refused."""
    src = write(tmp_path / "c.tfrecord", record(filename="a.png", boxes=[BOX, (0, 0, 0.5, 0.5)], texts=["cat", "cat"],
                                                extra={"image/object/is_crowd": int64_feature([0, 1])}))
    dataset = convert_tfrecord([src], tmp_path / "im")
    assert [(a["bbox"], a["iscrowd"]) for a in dataset.annotations] == [([5.0, 2.0, 10.0, 6.0], 0),
                                                                         ([0.0, 0.0, 10.0, 5.0], 1)]
    bad = write(tmp_path / "b.tfrecord", record(filename="a.png", boxes=[BOX], texts=["cat"],
                                                extra={"image/object/is_crowd": int64_feature([0, 1])}))
    with pytest.raises(TransferKitError, match=r"b\.tfrecord: record 0: image/object/is_crowd has 2 values for 1 box"):
        convert_tfrecord([bad], tmp_path / "im2")


# --- the folder the images are written into ---

def test_the_images_are_written_into_a_new_or_empty_folder_only(tmp_path):
    """An existing empty folder is used as it is; a folder holding anything, or a file, is refused
    before any image is written, and what is there is left alone."""
    picture = _png(np.full((10, 20), 7, np.uint8))
    src = write(tmp_path / "a.tfrecord", record(filename="a.png", encoded=picture, boxes=[BOX], texts=["cat"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [a["bbox"] for a in convert_tfrecord([src], empty).annotations] == [[5.0, 2.0, 10.0, 6.0]]
    assert [p.name for p in empty.iterdir()] == ["a.png"]
    assert (empty / "a.png").read_bytes() == picture
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    (tmp_path / "file.png").write_bytes(b"mine")
    for taken in (full, tmp_path / "file.png"):
        with pytest.raises(TransferKitError, match=rf"^--images {re.escape(str(taken))} is not empty; the images of "
                                                   r"the records are written into a new or empty folder$"):
            convert_tfrecord([src], taken)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert (full / "keep.txt").read_text() == "mine"
    assert (tmp_path / "file.png").read_bytes() == b"mine"


def test_a_record_without_an_image_is_refused_when_images_are_written(tmp_path):
    src = write(tmp_path / "n.tfrecord", record(filename="a.png", boxes=[BOX], texts=["cat"]),
                record(filename="b.png", boxes=[BOX], texts=["cat"], extra={"image/encoded": None}))
    with pytest.raises(TransferKitError, match=rf"^{re.escape(str(src))}: record 1 has no image/encoded$"):
        convert_tfrecord([src], tmp_path / "im")


# --- image sizes and boxes ---

def test_boxes_become_pixels_of_the_records_size_else_the_encoded_images(tmp_path):
    """image/width and image/height as the record gives them, even where the encoded image differs
    (data check reports that); both read from the image when either is missing. A record without
    boxes is an image without annotations."""
    box = (0.125, 0.25, 0.625, 1.0)
    src = write(tmp_path / "s.tfrecord",
                record(filename="declared.png", size=(40, 20), boxes=[box], texts=["cat"]),  # the image is 20x10
                record(filename="none.png", size=None, boxes=[box], texts=["cat"]),
                record(filename="width.png", size=None, boxes=[box], texts=["cat"],
                       extra={"image/width": int64_feature([40])}),
                record(filename="height.png", size=None, boxes=[box], texts=["cat"],
                       extra={"image/height": int64_feature([20])}),
                record(filename="empty.png", size=(40, 20)))
    dataset = convert_tfrecord([src], tmp_path / "im")
    assert [(i["file_name"], i["width"], i["height"]) for i in dataset.images] == [
        ("declared.png", 40, 20), ("none.png", 20, 10), ("width.png", 20, 10), ("height.png", 20, 10),
        ("empty.png", 40, 20)]
    by_id = {i["id"]: i["file_name"] for i in dataset.images}
    assert [(by_id[a["image_id"]], a["bbox"], a["area"], a["iscrowd"]) for a in dataset.annotations] == [
        ("declared.png", [5.0, 5.0, 20.0, 15.0], 300.0, 0),
        ("none.png", [2.5, 2.5, 10.0, 7.5], 75.0, 0),
        ("width.png", [2.5, 2.5, 10.0, 7.5], 75.0, 0),
        ("height.png", [2.5, 2.5, 10.0, 7.5], 75.0, 0)]
    assert dataset.skipped == []


def test_a_record_without_its_size_whose_image_does_not_decode_is_refused(tmp_path):
    src = write(tmp_path / "u.tfrecord", record(filename="a.png"),
                record(filename="b.png", size=None, encoded=b"not an image"))
    with pytest.raises(TransferKitError, match=rf"^{re.escape(str(src))}: record 1: no image/width and height, "
                                               r"and the image does not decode \(.+\)$"):
        convert_tfrecord([src], tmp_path / "im")


# --- masks, continued ---

def _decoded(ann: dict) -> np.ndarray:
    seg = ann["segmentation"]
    assert seg["size"] == [10, 20]
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})


def test_each_mask_stays_with_its_object_when_objects_are_left_out(tmp_path):
    """PNG masks of 0 and 1, as create_coco_tf_record.py writes them; a class left out by --classes
    and a difficult object take their own masks with them."""
    masks = []
    for k in range(4):
        m = np.zeros((10, 20), np.uint8)
        m[k:k + 2, 4 * k:4 * k + 3] = 1
        masks.append(m)
    src = write(tmp_path / "m.tfrecord", record(filename="m.png", boxes=[BOX] * 4, texts=["cat", "bird", "dog", "dog"],
                                                difficult=[0, 0, 1, 0], masks=[_png(m) for m in masks]))
    dataset = convert_tfrecord([src], tmp_path / "im", classes=["dog", "cat"])
    assert dataset.categories == ["dog", "cat"]
    assert [a["category_id"] for a in dataset.annotations] == [2, 1]
    assert (_decoded(dataset.annotations[0]) == masks[0]).all()
    assert (_decoded(dataset.annotations[1]) == masks[3]).all()
    assert dataset.skipped == [
        {"file": f"{src} record 0 object 2", "what": "object", "reason": "class 'bird' is not in the class list",
         "level": "note"},
        {"file": f"{src} record 0 object 3", "what": "difficult", "reason": "dog marked difficult", "level": "note"}]


def test_a_flat_float_mask_list_is_one_mask_per_object_above_one_half(tmp_path):
    """The older layout: image/object/mask as one float_list of objects x height x width, row by row."""
    first, second = np.zeros((10, 20), np.float32), np.zeros((10, 20), np.float32)
    first[1:4, 2:6] = 1.0
    first[5:7, 10:15] = 0.75
    first[8, :] = 0.5  # not more than one half: background
    second[2:9, 12:18] = 1.0
    second[0, 0:3] = 0.25
    values = [float(v) for v in np.concatenate([first.ravel(), second.ravel()])]
    src = write(tmp_path / "f.tfrecord", record(filename="f.png", boxes=[BOX, BOX], texts=["cat", "dog"],
                                                extra={"image/object/mask": float_feature(values)}))
    dataset = convert_tfrecord([src], tmp_path / "im")
    expected_first, expected_second = np.zeros((10, 20), np.uint8), np.zeros((10, 20), np.uint8)
    expected_first[1:4, 2:6] = 1
    expected_first[5:7, 10:15] = 1
    expected_second[2:9, 12:18] = 1
    assert [a["category_id"] for a in dataset.annotations] == [1, 2]
    assert (_decoded(dataset.annotations[0]) == expected_first).all()
    assert (_decoded(dataset.annotations[1]) == expected_second).all()
    short = write(tmp_path / "short.tfrecord", record(filename="f.png", boxes=[BOX, BOX], texts=["cat", "dog"],
                                                      extra={"image/object/mask": float_feature(values[:-1])}))
    with pytest.raises(TransferKitError, match=rf"^{re.escape(str(short))}: record 0: image/object/mask holds 399 "
                                               r"values, not 2 x 10 x 20$"):
        convert_tfrecord([short], tmp_path / "im2")


def test_a_damaged_mask_png_is_refused_naming_its_record(tmp_path):
    noise = np.random.default_rng(0).integers(0, 2, (10, 20), dtype=np.uint8)
    good = _png(noise)
    for k, damaged in enumerate((good[:len(good) // 2], b"\x89PNG\r\n\x1a\nrubbish")):
        src = write(tmp_path / f"d{k}.tfrecord", record(filename="a.png", boxes=[BOX], texts=["cat"], masks=[good]),
                    record(filename="b.png", boxes=[BOX], texts=["cat"], masks=[damaged]))
        with pytest.raises(TransferKitError, match=rf"^{re.escape(str(src))}: record 1: undecodable mask \(.+\)$"):
            convert_tfrecord([src], tmp_path / f"im{k}")


# --- classes, continued ---

def test_a_label_map_names_the_classes_by_label_whatever_the_text(tmp_path):
    (tmp_path / "map.pbtxt").write_text("item { id: 1 name: 'cat' }\nitem { id: 2 name: 'dog' }\n"
                                        "item { id: 4 name: 'bird' }\n")
    src = write(tmp_path / "l.tfrecord", record(filename="a.png", boxes=[BOX, BOX, BOX],
                                                texts=["hound", "kitty", "x"], labels=[2, 1, 3]))
    dataset = convert_tfrecord([src], tmp_path / "im", label_map=tmp_path / "map.pbtxt")
    assert dataset.categories == ["cat", "dog", "bird"]
    assert [a["category_id"] for a in dataset.annotations] == [2, 1]
    assert dataset.skipped == [{"file": f"{src} record 0 object 3", "what": "object",
                                "reason": "class 'label 3' is not in the class list", "level": "note"}]


def test_classes_with_a_label_map_choose_and_order_the_categories(tmp_path):
    """The map names each label; --classes says which of those names are kept, in its order."""
    (tmp_path / "map.pbtxt").write_text("item { id: 1 name: 'cat' }\nitem { id: 2 name: 'dog' }\n"
                                        "item { id: 4 name: 'bird' }\n", encoding="utf-8")
    src = write(tmp_path / "l.tfrecord", record(filename="a.png", boxes=[BOX, BOX, BOX], labels=[2, 1, 4]))
    dataset = convert_tfrecord([src], tmp_path / "im", classes=["dog", "bird"], label_map=tmp_path / "map.pbtxt")
    assert dataset.categories == ["dog", "bird"]
    assert [a["category_id"] for a in dataset.annotations] == [1, 2]
    assert [s["reason"] for s in dataset.skipped] == ["class 'cat' is not in the class list"]


def test_a_label_map_leaves_records_without_labels_named_by_their_text(tmp_path):
    (tmp_path / "map.pbtxt").write_text("item { id: 1 name: 'cat' }\n", encoding="utf-8")
    src = write(tmp_path / "t.tfrecord", record(filename="a.png", boxes=[BOX], texts=["cat"]))
    dataset = convert_tfrecord([src], tmp_path / "im", label_map=tmp_path / "map.pbtxt")
    assert [(a["category_id"], a["bbox"]) for a in dataset.annotations] == [(1, [5.0, 2.0, 10.0, 6.0])]
    assert dataset.skipped == []


def test_classes_name_the_labels_of_records_without_text_from_one(tmp_path):
    src = write(tmp_path / "l.tfrecord", record(filename="a.png", boxes=[BOX, BOX, BOX], labels=[2, 1, 7]))
    dataset = convert_tfrecord([src], tmp_path / "im", classes=["cat", "dog"])
    assert dataset.categories == ["cat", "dog"]
    assert [a["category_id"] for a in dataset.annotations] == [2, 1]
    assert dataset.skipped == [{"file": f"{src} record 0 object 3", "what": "object",
                                "reason": "class '7' is not in the class list", "level": "note"}]


def test_a_label_named_two_ways_across_files_names_both_records(tmp_path):
    """The error names the file and record that named the label otherwise, and where it was named first."""
    files = [write(tmp_path / f"{k}.tfrecord", record(filename=f"{k}.png", boxes=[BOX], labels=[1],
                                                      texts=["dog" if k == 4 else "cat"])) for k in range(1, 6)]
    message = f"{files[3]}: record 0 names class/label 1 'dog', {files[0]} record 0 named it 'cat'; give --classes"
    with pytest.raises(TransferKitError, match=f"^{re.escape(message)}$"):
        convert_tfrecord(files, tmp_path / "im")


# --- where each image's record is, for reading in place ---

def test_each_image_is_located_by_file_offset_length_and_record_index(tmp_path):
    """Training and data check read each image back by offset: the data of record k starts 12 bytes
    (length and its CRC) after the records before it, and is its framed size less 16 bytes long."""
    a = [record(filename="a0.png", boxes=[BOX], texts=["cat"]),
         record(filename="a1.png", encoded=_png(np.ones((10, 20), np.uint8)))]
    b = [record(filename="b0.png", boxes=[BOX, BOX], texts=["cat", "dog"])]
    fa, fb = write(tmp_path / "a.tfrecord", *a), write(tmp_path / "b.tfrecord", *b)
    dataset, located = read_tfrecord_dataset([fa, fb])
    assert dataset.image_root is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tfrecord", "b.tfrecord"]  # no image written
    assert {i["file_name"]: located[i["id"]] for i in dataset.images} == {
        "a0.png": RecordSample(fa, 12, len(a[0]) - 16, 0, "a0.png"),
        "a1.png": RecordSample(fa, len(a[0]) + 12, len(a[1]) - 16, 1, "a1.png"),
        "b0.png": RecordSample(fb, 12, len(b[0]) - 16, 0, "b0.png")}
    assert fa.read_bytes()[len(a[0]) + 12:len(a[0]) + len(a[1]) - 4] == a[1][12:-4]
