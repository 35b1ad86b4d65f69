"""The VOC XML reader (convert_voc) on small folders written here: which image each XML gets,
which <filename>s are refused, what is skipped and how it is reported, where sizes come from,
which folder file_names are relative to, and how splits choose the XMLs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import transferkit
from transferkit.data.convert.voc import convert_voc
from transferkit.errors import TransferKitError


def obj(name: str | None, box=(2, 3, 11, 13), difficult: int = 0) -> str:
    tag = f"<name>{name}</name>" if name is not None else ""
    corners = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
    return f"<object>{tag}<difficult>{difficult}</difficult><bndbox>{corners}</bndbox></object>"


def write_xml(path: Path, filename: str | None = None, size=(40, 30), objects=None) -> Path:
    """A VOC XML, one cat unless `objects` says; `filename` None leaves <filename> out, `size` None
    leaves <size> out."""
    objects = [obj("cat")] if objects is None else objects
    parts = ["<annotation>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    parts += [*objects, "</annotation>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_image(path: Path, size=(40, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path, format=fmt)
    return path


def names(coco) -> list[str]:
    return [im["file_name"] for im in coco.images]


# --- which image an XML gets ---------------------------------------------------------------------

def test_the_image_is_the_one_filename_names_not_the_xmls_namesake(tmp_path):
    """labelImg keeps the image's own name in <filename>; a file named like the XML is not it."""
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", "photo.jpg")
    write_image(labels / "images" / "photo.jpg")
    write_image(labels / "images" / "a.jpg")
    found = convert_voc(labels)
    assert names(found) == ["photo.jpg"] and not found.skipped


@pytest.mark.parametrize("filename", [None, "", "   "], ids=["absent", "empty", "blank"])
def test_an_xml_without_filename_gets_the_image_named_like_it(tmp_path, filename):
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", filename)
    write_image(labels / "a.png")
    found = convert_voc(labels)
    assert names(found) == ["a.png"] and not found.skipped


def test_a_filename_without_extension_names_the_file_itself_or_one_with_an_image_extension(tmp_path):
    """Some tools leave the extension out: `photo` finds photo.png; a file that really has no
    extension (`3f2a9c`) is used as it is."""
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", "photo")
    write_image(labels / "photo.png")
    write_xml(labels / "b.xml", "3f2a9c")
    write_image(labels / "3f2a9c", fmt="PNG")
    found = convert_voc(labels)
    assert names(found) == ["3f2a9c", "photo.png"] and not found.skipped


def test_extensions_in_capitals_are_found_too(tmp_path):
    """Cameras name their files IMG_0001.JPG: an XML without <filename>, or naming the image without
    its extension, finds the capitalised file."""
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", None)
    write_image(labels / "a.JPG", fmt="PNG")
    write_xml(labels / "b.xml", "IMG_0002")
    write_image(labels / "IMG_0002.JPEG", fmt="PNG")
    found = convert_voc(labels)
    assert names(found) == ["IMG_0002.JPEG", "a.JPG"] and not found.skipped


@pytest.mark.parametrize(("filename", "image"), [("2021.05.03", "2021.05.03.jpg"), ("cam1.v2", "cam1.v2.png"),
                                               ("photo.JPG", "photo.JPG")])
def test_a_filename_without_an_image_extension_may_hold_dots(tmp_path, filename, image):
    """Only an image extension counts as one: `2021.05.03` finds 2021.05.03.jpg."""
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", filename)
    write_image(labels / image, fmt="PNG")
    found = convert_voc(labels)
    assert names(found) == [image] and not found.skipped


@pytest.mark.parametrize("filename", ["../photo.jpg", "sub/../../photo.jpg", "ABSOLUTE", "."])
def test_a_filename_outside_its_folders_is_refused_in_one_line(tmp_path, filename):
    """A <filename> with `..`, an absolute path or `.` stops the conversion with the XML and the name,
    even where such a file exists."""
    labels = tmp_path / "labels"
    write_image(tmp_path / "photo.jpg")
    if filename == "ABSOLUTE":
        filename = str(write_image(tmp_path / "elsewhere" / "photo.jpg"))
    xml = write_xml(labels / "a.xml", filename)
    with pytest.raises(TransferKitError) as err:
        convert_voc(labels)
    assert str(err.value) == f"{xml}: <filename> {filename!r} must be a file name (no folders above it)"


def test_an_xml_whose_image_is_nowhere_is_skipped_with_the_folders_looked_in(tmp_path):
    """The skip is an error (training stops on it) naming the XML and the first four folders looked in;
    the XMLs after it are still read."""
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", "photo.jpg")
    write_xml(labels / "b.xml", "b.jpg")
    write_image(labels / "b.jpg")
    found = convert_voc(labels)
    assert names(found) == ["b.jpg"]
    looked = f"{labels}, {labels / 'images'}, {labels / 'JPEGImages'}, {tmp_path / 'images'}"
    reason = f"its image is not found (looked in {looked}); give --images (data.train_images) for the image folder"
    assert found.skipped == [{"file": str(labels / "a.xml"), "what": "image", "reason": reason, "level": "error"}]
    # With --images for XMLs at the root: images/photo.jpg is looked at once, and its folder named once.
    (tmp_path / "pictures").mkdir()
    found = convert_voc(labels, images=tmp_path / "pictures")
    looked = f"{tmp_path / 'pictures'}, {labels}, {labels / 'images'}, {labels / 'JPEGImages'}"
    assert found.skipped[0]["reason"] == (f"its image is not found (looked in {looked}); give --images "
                                          "(data.train_images) for the image folder")


def test_when_no_xml_finds_its_image_the_dataset_is_empty_and_every_xml_is_skipped(tmp_path):
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", "a.jpg")
    write_xml(labels / "b.xml", "b.jpg")
    found = convert_voc(labels)
    assert found.images == [] and found.annotations == []
    assert [(s["file"], s["what"]) for s in found.skipped] == [(str(labels / "a.xml"), "image"),
                                                              (str(labels / "b.xml"), "image")]
    empty = tmp_path / "pics"
    empty.mkdir()
    found = convert_voc(labels, images=empty)
    assert found.images == [] and len(found.skipped) == 2 and found.image_root == empty


def test_two_xmls_naming_one_image_are_refused(tmp_path):
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", "photo.jpg")
    write_xml(labels / "b.xml", "photo.jpg")
    write_xml(labels / "c.xml", "c.jpg")
    write_image(labels / "photo.jpg")
    write_image(labels / "c.jpg")
    with pytest.raises(TransferKitError) as err:
        convert_voc(labels)
    assert str(err.value) == f"{labels}: several annotation files name the image {str(labels / 'photo.jpg')!r}"


# --- objects -------------------------------------------------------------------------------------

def test_objects_left_out_by_design_are_notes_naming_the_object(tmp_path):
    """Difficult objects, and classes outside --classes, are skipped as notes that name the XML and
    the object's number (from 1); the objects after them are kept. An object with no <name> is
    never a class: it is an error (a broken annotation, not a class left out)."""
    labels = tmp_path / "labels"
    xml = write_xml(labels / "a.xml", "a.jpg", objects=[
        obj("cat", (2, 3, 11, 13)), obj("dog", (5, 5, 20, 20)), obj("dog", (1, 1, 9, 9), difficult=1),
        obj(None, (3, 3, 8, 8)), obj("cat", (1, 1, 4, 4))])
    write_image(labels / "a.jpg")
    found = convert_voc(labels)
    assert found.categories == ["cat", "dog"]
    # VOC corners (2, 3)-(11, 13) -> x 1, y 2, w 10, h 11; (5, 5)-(20, 20) -> 4, 4, 16, 16; (1, 1)-(4, 4) -> 0, 0, 4, 4
    assert [(a["category_id"], a["bbox"]) for a in found.annotations] == [
        (1, [1, 2, 10, 11]), (2, [4, 4, 16, 16]), (1, [0, 0, 4, 4])]  # the one after the broken object kept
    assert found.skipped[0] == {"file": f"{xml} object 3", "what": "difficult", "reason": "dog marked difficult",
                                "level": "note"}
    assert [(s["file"], s["what"], s["reason"], s["level"]) for s in found.skipped[1:]] == [
        (f"{xml} object 4", "object", "no class: <name> is empty or missing", "error")]

    only_dog = convert_voc(labels, classes=["dog"], keep_difficult=True)
    assert only_dog.categories == ["dog"]
    assert [(a["category_id"], a["bbox"]) for a in only_dog.annotations] == [(1, [4, 4, 16, 16]), (1, [0, 0, 9, 9])]
    assert only_dog.skipped[0] == {"file": f"{xml} object 1", "what": "object",
                                   "reason": "class 'cat' is not in the class list", "level": "note"}


# --- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [None, ("0", "0"), ("0", "99"), ("99", "0"), ("abc", "99"), ("nan", "99"),
                                  ("-5", "99")])
def test_the_size_is_read_from_the_image_when_size_is_missing_zero_or_not_a_number(tmp_path, size):
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", "a.png", size=size)
    write_image(labels / "a.png", (37, 23))
    found = convert_voc(labels)
    assert [(im["width"], im["height"]) for im in found.images] == [(37, 23)]


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (640, 480)])
def test_a_positive_size_is_taken_from_the_xml_without_opening_the_image(tmp_path, size):
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", "a.jpg", size=size, objects=())
    (labels / "a.jpg").write_bytes(b"not an image")
    found = convert_voc(labels)
    assert [(im["width"], im["height"]) for im in found.images] == [size]


# --- year folders --------------------------------------------------------------------------------

def test_a_year_folder_keeps_an_xml_whose_image_is_missing_under_its_filename(tmp_path):
    """In a VOC year folder the image belongs in JPEGImages/: a missing one is kept (data check
    reports it), named by <filename>, else by the XML's name with .jpg."""
    year = tmp_path / "VOC2007"
    write_xml(year / "Annotations" / "a.xml", "photo.jpg", size=(40, 30))
    write_xml(year / "Annotations" / "b.xml", None, size=(20, 10))
    (year / "JPEGImages").mkdir()
    found = convert_voc(year)
    assert [(im["file_name"], im["width"], im["height"]) for im in found.images] == [("b.jpg", 20, 10),
                                                                                      ("photo.jpg", 40, 30)]
    assert not found.skipped and found.image_root == year / "JPEGImages"


def test_a_year_folders_file_names_are_relative_to_jpegimages(tmp_path):
    """Also when every <filename> names a sub-folder of JPEGImages/."""
    year = tmp_path / "VOC2007"
    for stem in ("a", "b"):
        write_xml(year / "Annotations" / f"{stem}.xml", f"2008/{stem}.jpg")
        write_image(year / "JPEGImages" / "2008" / f"{stem}.jpg")
    found = convert_voc(year)
    assert names(found) == ["2008/a.jpg", "2008/b.jpg"] and found.image_root == year / "JPEGImages"


def test_a_year_folder_takes_a_list_file_from_anywhere(tmp_path):
    year = tmp_path / "VOC2007"
    for stem in ("a", "b"):
        write_xml(year / "Annotations" / f"{stem}.xml", f"{stem}.jpg")
        write_image(year / "JPEGImages" / f"{stem}.jpg")
    (year / "ImageSets" / "Main").mkdir(parents=True)
    (year / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    mine = tmp_path / "mine.txt"
    mine.write_text("b\n")
    assert names(convert_voc(year, str(mine))) == ["b.jpg"]
    assert names(convert_voc(year, "train")) == ["a.jpg", "b.jpg"]


# --- splits and image folders --------------------------------------------------------------------

def test_a_split_folder_takes_its_images_and_backgrounds_from_the_same_split_under_images(tmp_path):
    """--split train --images pics: labels/train/*.xml, images and backgrounds from pics/train/,
    file_names relative to it."""
    labels, pics = tmp_path / "labels", tmp_path / "pics"
    write_xml(labels / "train" / "a.xml", "a.jpg")
    write_xml(labels / "val" / "b.xml", "b.jpg")
    for name in ("train/a.jpg", "train/c.jpg", "val/b.jpg", "val/d.jpg"):
        write_image(pics / name)
    train = convert_voc(labels, "train", images=pics)
    assert names(train) == ["a.jpg", "c.jpg"] and train.image_root == pics / "train" and not train.skipped
    assert [a["image_id"] for a in train.annotations] == [1]  # c.jpg is a background image
    val = convert_voc(labels, "val", images=pics)
    assert names(val) == ["b.jpg", "d.jpg"] and val.image_root == pics / "val"


def test_with_images_file_names_are_relative_to_images(tmp_path):
    """Also when every image sits in one sub-folder of it (labels/2021/a.xml -> pics/2021/a.jpg)."""
    labels, pics = tmp_path / "labels", tmp_path / "pics"
    for stem in ("a", "b"):
        write_xml(labels / "2021" / f"{stem}.xml", f"{stem}.jpg")
        write_image(pics / "2021" / f"{stem}.jpg")
    found = convert_voc(labels, images=pics)
    assert names(found) == ["2021/a.jpg", "2021/b.jpg"] and found.image_root == pics and not found.skipped


def test_without_images_file_names_are_relative_to_the_images_common_folder(tmp_path):
    """A folder of XMLs holding JPEGImages/ (but no Annotations/) is no year folder: its images'
    common folder is their root."""
    ds = tmp_path / "ds"
    write_xml(ds / "labels" / "train" / "a.xml", "a.jpg")
    write_xml(ds / "labels" / "val" / "b.xml", "b.jpg")
    write_image(ds / "JPEGImages" / "train" / "a.jpg")
    write_image(ds / "JPEGImages" / "val" / "b.jpg")
    both = convert_voc(ds)
    assert names(both) == ["train/a.jpg", "val/b.jpg"] and both.image_root == ds / "JPEGImages"
    listed = tmp_path / "val.txt"
    listed.write_text("b\n")
    val = convert_voc(ds, str(listed))
    assert names(val) == ["b.jpg"] and val.image_root == ds / "JPEGImages" / "val"


def test_a_list_file_keeps_an_xml_by_its_own_name_or_its_images(tmp_path):
    labels = tmp_path / "labels"
    for stem, image in (("a", "photo.jpg"), ("b", "pic_b.jpg"), ("c", "c.jpg")):
        write_xml(labels / f"{stem}.xml", image)
        write_image(labels / image)
    listed = tmp_path / "keep.txt"
    listed.write_text("photo\nb\n")
    assert names(convert_voc(labels, str(listed))) == ["photo.jpg", "pic_b.jpg"]


def test_a_split_by_fraction_is_seeded_with_0_unless_told(tmp_path):
    labels = tmp_path / "labels"
    for i in range(6):
        write_xml(labels / f"img_{i}.xml", f"img_{i}.jpg")
        write_image(labels / f"img_{i}.jpg")
    val = names(convert_voc(labels, "val", val_fraction=0.5))
    assert val == names(convert_voc(labels, "val", val_fraction=0.5, seed=0))
    assert val != names(convert_voc(labels, "val", val_fraction=0.5, seed=1))
    train = names(convert_voc(labels, "train", val_fraction=0.5))
    assert len(val) == 3 and sorted(train + val) == [f"img_{i}.jpg" for i in range(6)]


def test_missing_folders_and_unknown_splits_are_refused_in_one_line(tmp_path):
    labels = tmp_path / "labels"
    write_xml(labels / "a.xml", "a.jpg")
    write_image(labels / "a.jpg")
    nowhere = tmp_path / "nowhere"
    with pytest.raises(TransferKitError) as err:
        convert_voc(nowhere)
    assert str(err.value) == f"VOC annotations not found: {nowhere} (give a VOC year folder or a folder of XMLs)"
    with pytest.raises(TransferKitError) as err:
        convert_voc(labels, images=nowhere)
    assert str(err.value) == f"the image folder {nowhere} (--images, data.train_images) is not a folder"
    with pytest.raises(TransferKitError) as err:
        convert_voc(labels, "nosuch")
    assert str(err.value) == (f"split 'nosuch' is neither a list file nor a folder under {labels}; give one, "
                              "or a validation fraction")


def test_split_lists_are_read_as_utf8_whatever_the_locale(tmp_path):
    """A list file with non-ASCII names reads the same under an ASCII locale (Windows code pages, C)."""
    labels = tmp_path / "labels"
    for stem in ("a", "b"):
        write_xml(labels / f"{stem}.xml", f"{stem}.jpg")
        write_image(labels / f"{stem}.jpg")
    listed = tmp_path / "keep.txt"
    listed.write_bytes("a\ncaf\u00e9\n".encode())
    assert names(convert_voc(labels, str(listed))) == ["a.jpg"]
    script = ("import sys; from transferkit.data.convert.voc import convert_voc; "
              "print([i['file_name'] for i in convert_voc(sys.argv[1], sys.argv[2]).images])")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(transferkit.__file__).parents[1]), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script, str(labels), str(listed)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['a.jpg']"


def test_a_broken_object_is_skipped_naming_it_and_the_next_objects_are_kept(tmp_path):
    """An object without <bndbox>, with a corner that is not a number, or with no area inside the
    image is an error entry naming the XML and the object's number; the XML's other objects stay."""
    labels = tmp_path / "labels"
    xml = write_xml(labels / "a.xml", "a.png", objects=[
        "<object><name>cat</name></object>", obj("cat", box=(2, "abc", 11, 13)), obj("cat", box=(50, 3, 60, 13)),
        obj("cat")])
    write_image(labels / "a.png")
    found = convert_voc(labels)
    assert [a["bbox"] for a in found.annotations] == [[1.0, 2.0, 10.0, 11.0]]
    assert found.skipped == [
        {"file": f"{xml} object 1", "what": "object", "reason": "no <bndbox>", "level": "error"},
        {"file": f"{xml} object 2", "what": "object",
         "reason": "<ymin> is 'abc', not a finite number", "level": "error"},
        {"file": f"{xml} object 3", "what": "cat box",
         "reason": "no area inside the 40x30 image (49.0, 2.0, 11.0, 11.0)", "level": "error"}]


def test_a_filename_with_an_image_extension_is_taken_as_it_is(tmp_path):
    """<filename>photo.jpg</filename> names photo.jpg: a photo.jpg.png beside it is another file."""
    labels = tmp_path / "labels"
    xml = write_xml(labels / "a.xml", "photo.jpg")
    write_image(labels / "photo.jpg.png")
    found = convert_voc(labels)
    assert names(found) == [] and [s["file"] for s in found.skipped] == [str(xml)]
