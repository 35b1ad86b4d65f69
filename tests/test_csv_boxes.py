"""CSV boxes to COCO (`data convert --from csv`): corners to x,y,w,h, sizes from the CSV or the image, classes,
images without boxes, header names, and the rows and files refused or skipped, each named by its line."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from transferkit.cli import main
from transferkit.data.convert.csv_boxes import convert_csv, parse_columns
from transferkit.errors import TransferKitError

HEADER = "filename,width,height,class,xmin,ymin,xmax,ymax"
FIELDS = "filename, width, height, class, xmin, ymin, xmax, ymax"


def write_csv(tmp_path, *lines: str, name: str = "boxes.csv"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_image(folder, name: str, width: int, height: int) -> None:
    Image.new("RGB", (width, height), (90, 120, 150)).save(folder / name)


def boxes(data) -> list[tuple]:
    """(image file, class, bbox, area) of each annotation, in order."""
    files = {i["id"]: i["file_name"] for i in data.images}
    return [(files[a["image_id"]], data.categories[a["category_id"] - 1], a["bbox"], a["area"])
            for a in data.annotations]


def sizes(data) -> dict[str, tuple[int, int]]:
    return {i["file_name"]: (i["width"], i["height"]) for i in data.images}


def test_pixel_corners_become_coco_boxes_with_the_csv_sizes(tmp_path):
    """x = xmin, y = ymin, w = xmax - xmin, h = ymax - ymin; the rows of one image need not be adjacent; the
    width and height columns are taken as written, so the images need not be there."""
    path = write_csv(tmp_path, HEADER,
                     "b.jpg,64,48,dog,10,20,30,44",
                     "a.jpg,40,30,cat,1,2,20,25",
                     "b.jpg,64,48,cat,0.5,1.25,63.5,47",
                     "a.jpg,40,30,cat,5,5,6,7")
    data = convert_csv(path, tmp_path / "photos")
    assert data.to_dict() == {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 2, "bbox": [10.0, 20.0, 20.0, 24.0], "area": 480.0,
             "iscrowd": 0, "segmentation": []},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0.5, 1.25, 63.0, 45.75], "area": 2882.25,
             "iscrowd": 0, "segmentation": []},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 19.0, 23.0], "area": 437.0,
             "iscrowd": 0, "segmentation": []},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 1.0, 2.0], "area": 2.0,
             "iscrowd": 0, "segmentation": []},
        ],
        "categories": [{"id": 1, "name": "cat", "supercategory": ""}, {"id": 2, "name": "dog", "supercategory": ""}],
    }
    assert data.skipped == []
    assert data.image_root == tmp_path / "photos"


def test_a_one_pixel_side_in_the_csv_is_a_size(tmp_path):
    """1 is a width or height like any other: it is not read from the image instead."""
    path = write_csv(tmp_path, HEADER, "dot.png,1,1,car,0,0,1,1", "tall.png,1,9,car,0,0,1,9",
                     "wide.png,9,1,car,0,0,9,1")
    data = convert_csv(path, tmp_path)
    assert sizes(data) == {"dot.png": (1, 1), "tall.png": (1, 9), "wide.png": (9, 1)}
    assert [b[2] for b in boxes(data)] == [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 9.0], [0.0, 0.0, 9.0, 1.0]]


def test_classes_are_sorted_unless_given_and_others_are_skipped_as_notes(tmp_path):
    """Without a class list the categories are the CSV's names sorted; with one, its order, and a row of another
    class is a note that leaves the image's later rows converted."""
    path = write_csv(tmp_path, HEADER,
                     "a.jpg,40,30,zebra,0,0,10,10",
                     "a.jpg,40,30,dog,1,1,5,5",
                     "a.jpg,40,30,car,2,2,12,12")
    found = convert_csv(path, tmp_path)
    assert found.categories == ["car", "dog", "zebra"]
    assert [(b[1], b[2]) for b in boxes(found)] == [("zebra", [0.0, 0.0, 10.0, 10.0]), ("dog", [1.0, 1.0, 4.0, 4.0]),
                                                    ("car", [2.0, 2.0, 10.0, 10.0])]
    assert found.skipped == []

    given = convert_csv(path, tmp_path, ["zebra", "car"])
    assert given.to_dict()["categories"] == [{"id": 1, "name": "zebra", "supercategory": ""},
                                             {"id": 2, "name": "car", "supercategory": ""}]
    assert [(a["category_id"], a["bbox"]) for a in given.annotations] == [(1, [0.0, 0.0, 10.0, 10.0]),
                                                                          (2, [2.0, 2.0, 10.0, 10.0])]
    assert given.skipped == [{"file": f"{path}:3", "what": "object", "reason": "class 'dog' is not in the class list",
                              "level": "note"}]


def test_rows_without_a_box_are_images_without_boxes(tmp_path):
    """A row with the class and box cells empty (or left off) lists its image with no box and no skip, and does not
    stop the image's other rows; the empty class is no category."""
    path = write_csv(tmp_path, HEADER,
                     "a.jpg,40,30,,,,,",
                     "a.jpg,40,30,car,1,2,11,12",
                     "b.jpg,20,10,,,,,",
                     "c.jpg,20,10",
                     "d.jpg,20,10, , , , , ")
    data = convert_csv(path, tmp_path)
    assert sizes(data) == {"a.jpg": (40, 30), "b.jpg": (20, 10), "c.jpg": (20, 10), "d.jpg": (20, 10)}
    assert data.categories == ["car"]
    assert boxes(data) == [("a.jpg", "car", [1.0, 2.0, 10.0, 10.0], 100.0)]
    assert data.skipped == []


def test_half_filled_rows_are_skipped_naming_the_row(tmp_path):
    """A box without a class, or a class without a box (or a row cut short), is skipped with its line; the rows
    after it still count."""
    path = write_csv(tmp_path, HEADER,
                     "a.jpg,40,30,,1,2,11,12",
                     "a.jpg,40,30,car,,,,",
                     "a.jpg,40,30,car,1,2,11",
                     "a.jpg,40,30,car,3,4,13,14")
    data = convert_csv(path, tmp_path)
    no_class, *bad = data.skipped
    assert no_class == {"file": f"{path}:2", "what": "object", "reason": "no class: the class cell is empty",
                        "level": "error"}
    assert bad == [
        {"file": f"{path}:3", "what": "object", "reason": "xmin is '', not a finite number",
         "level": "error"},
        {"file": f"{path}:4", "what": "object", "reason": "ymax is '', not a finite number",
         "level": "error"},
    ]
    assert boxes(data) == [("a.jpg", "car", [3.0, 4.0, 10.0, 10.0], 100.0)]
    renamed = write_csv(tmp_path, HEADER.replace("class", "label"), "a.jpg,40,30, ,1,2,11,12", name="renamed.csv")
    assert [s["reason"] for s in convert_csv(renamed, tmp_path, columns={"class": "label"}).skipped] == [
        "no class: the label cell is empty"]


def test_coordinates_that_are_not_finite_numbers_are_errors_naming_row_and_column(tmp_path):
    """Text, nan and infinities in a box are skipped as errors; spaces around a number are fine."""
    path = write_csv(tmp_path, HEADER,
                     "a.jpg,40,30,car,abc,2,11,12",
                     "a.jpg,40,30,car,1,nan,11,12",
                     "a.jpg,40,30,car,1,2,inf,12",
                     "a.jpg,40,30,car,1,2,11,-Infinity",
                     "a.jpg,40,30,car, 3 ,4 ,13, 14")
    data = convert_csv(path, tmp_path)
    assert data.skipped == [
        {"file": f"{path}:{n}", "what": "object", "reason": f"{column} is {text!r}, not a finite number",
         "level": "error"}
        for n, column, text in [(2, "xmin", "abc"), (3, "ymin", "nan"), (4, "xmax", "inf"), (5, "ymax", "-Infinity")]
    ]
    assert boxes(data) == [("a.jpg", "car", [3.0, 4.0, 10.0, 10.0], 100.0)]


def test_boxes_are_clipped_to_the_image_and_empty_ones_skipped(tmp_path):
    """A box reaching outside the image is cut at its edges; one outside it, or with xmax <= xmin, is an error
    naming its line and the box as x, y, w, h."""
    path = write_csv(tmp_path, HEADER,
                     "a.jpg,40,30,car,-5,-3,10,12",
                     "a.jpg,40,30,car,35,25,50,40",
                     "a.jpg,40,30,car,50,2,60,7",
                     "a.jpg,40,30,car,20,5,20,9",
                     "a.jpg,40,30,car,20,9,10,5")
    data = convert_csv(path, tmp_path)
    assert boxes(data) == [("a.jpg", "car", [0.0, 0.0, 10.0, 12.0], 120.0),
                           ("a.jpg", "car", [35.0, 25.0, 5.0, 5.0], 25.0)]
    assert data.skipped == [
        {"file": f"{path}:{n}", "what": "car box", "reason": f"no area inside the 40x30 image {box}", "level": "error"}
        for n, box in [(4, "(50.0, 2.0, 10.0, 5.0)"), (5, "(20.0, 5.0, 0.0, 4.0)"), (6, "(20.0, 9.0, -10.0, -4.0)")]
    ]


def test_a_size_missing_empty_or_not_positive_is_read_from_the_image(tmp_path):
    """Without both a positive width and height in the CSV, the image file's own size is used (and clips)."""
    for name in ("empty.png", "w0.png", "h0.png", "negative.png", "text.png", "written.png"):
        write_image(tmp_path, name, 41, 31)
    path = write_csv(tmp_path, HEADER,
                     "empty.png,,,car,1,2,50,12",
                     "w0.png,0,99,car,1,2,11,12",
                     "h0.png,99,0,car,1,2,11,12",
                     "negative.png,-4,99,car,1,2,11,12",
                     "text.png,wide,high,car,1,2,11,12",
                     "written.png,99,77,car,1,2,50,12")
    data = convert_csv(path, tmp_path)
    assert sizes(data) == {"empty.png": (41, 31), "w0.png": (41, 31), "h0.png": (41, 31), "negative.png": (41, 31),
                           "text.png": (41, 31), "written.png": (99, 77)}
    by_file = {b[0]: b[2] for b in boxes(data)}
    assert by_file["empty.png"] == [1.0, 2.0, 40.0, 10.0]
    assert by_file["written.png"] == [1.0, 2.0, 49.0, 10.0]
    assert data.skipped == []

    columnless = write_csv(tmp_path, "filename,class,xmin,ymin,xmax,ymax", "empty.png,car,1,2,11,12",
                           name="no_size.csv")
    assert sizes(convert_csv(columnless, tmp_path)) == {"empty.png": (41, 31)}


def test_no_size_and_no_readable_image_is_refused_naming_the_row(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for name in ("absent.png", "broken.png"):
        path = write_csv(tmp_path, HEADER, "ok.png,40,30,car,1,2,11,12", f"{name},,,car,1,2,11,12")
        with pytest.raises(TransferKitError) as err:
            convert_csv(path, tmp_path)
        assert str(err.value) == (f"{path}:3: no width and height, and the image {name!r} cannot be read under "
                                  f"{tmp_path}; fill in the columns or fix the image")


def test_parse_columns_maps_fields_to_header_names():
    """FIELD=HEADER pairs, spaces and empty parts ignored; the header is all after the first '='."""
    assert parse_columns(None) == {}
    assert parse_columns("") == {}
    assert parse_columns(",class = label,, filename=image ,") == {"class": "label", "filename": "image"}
    assert parse_columns("class=kind=2") == {"class": "kind=2"}


@pytest.mark.parametrize(("text", "part"), [
    ("colour=red", "colour=red"),
    ("class=label,size=big", "size=big"),
    ("class=", "class="),
    ("class", "class"),
    ("=label", "=label"),
    ("class=label, xmin ", " xmin "),
])
def test_parse_columns_refuses_what_is_not_field_equals_header(text, part):
    with pytest.raises(TransferKitError) as err:
        parse_columns(text)
    assert str(err.value) == f"--columns {part!r}: give FIELD=HEADER with FIELD one of {FIELDS}"


def test_configured_header_names_in_any_order(tmp_path):
    """Renamed columns, in another order and with extra columns, read as the tutorial's."""
    path = write_csv(tmp_path, "image,label,x1,y1,x2,y2,w,h,notes", "a.jpg,car,1,2,11,12,40,30,first")
    columns = parse_columns("filename=image,class=label,xmin=x1,ymin=y1,xmax=x2,ymax=y2,width=w,height=h")
    data = convert_csv(path, tmp_path, columns=columns)
    assert sizes(data) == {"a.jpg": (40, 30)}
    assert boxes(data) == [("a.jpg", "car", [1.0, 2.0, 10.0, 10.0], 100.0)]


@pytest.mark.parametrize(("header", "columns", "missing"), [
    ("filename,width,height,label,xmin,ymin,xmax,ymax", None, "class"),
    (HEADER, {"class": "kind"}, "kind"),
    ("file,class,x0,y0,x1,y1", None, "filename"),
])
def test_a_missing_column_is_refused_naming_it_and_the_header(tmp_path, header, columns, missing):
    path = write_csv(tmp_path, header, "a.jpg,40,30,car,1,2,11,12")
    with pytest.raises(TransferKitError) as err:
        convert_csv(path, tmp_path, columns=columns)
    listed = ", ".join(header.split(","))
    assert str(err.value) == (f"{path}: no column {missing!r} in the header ({listed}); "
                              "name the columns with --columns FIELD=HEADER")


def test_an_empty_file_has_no_columns(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(TransferKitError) as err:
        convert_csv(path, tmp_path)
    assert str(err.value) == (f"{path}: no column 'filename' in the header (); "
                              "name the columns with --columns FIELD=HEADER")


@pytest.mark.parametrize("name", ["", "   ", "../a.jpg", "sub/../../a.jpg", "/abs/a.jpg"])
def test_a_filename_outside_the_images_folder_is_refused_naming_the_row(tmp_path, name):
    path = write_csv(tmp_path, HEADER, "ok.jpg,40,30,car,1,2,11,12", f"{name},40,30,car,1,2,11,12")
    with pytest.raises(TransferKitError) as err:
        convert_csv(path, tmp_path)
    assert str(err.value) == f"{path}:3: filename {name.strip()!r} must be a path inside --images"


def test_the_images_folder_is_required(tmp_path):
    path = write_csv(tmp_path, HEADER, "a.jpg,40,30,car,1,2,11,12")
    with pytest.raises(TransferKitError) as err:
        convert_csv(path, None)
    assert str(err.value) == "--from csv needs --images DIR: the folder the filename column is relative to"


def test_a_missing_or_unreadable_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(TransferKitError) as err:
        convert_csv(tmp_path / "nope.csv", tmp_path)
    assert str(err.value) == f"CSV file not found: {tmp_path / 'nope.csv'}"

    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"{HEADER}\ncaf\xe9.jpg,40,30,car,1,2,11,12\n".encode("latin-1"))
    with pytest.raises(TransferKitError) as err:
        convert_csv(latin1, tmp_path)
    assert str(err.value).startswith(f"{latin1}: not a readable CSV file ('utf-8' codec can't decode byte 0xe9")

    with pytest.raises(TransferKitError) as err:
        convert_csv(tmp_path, tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: not a readable CSV file ([Errno 21] Is a directory")


def test_utf8_with_a_byte_order_mark_and_windows_line_ends(tmp_path):
    """Excel's 'CSV UTF-8' (a BOM, CRLF): the first header is `filename`, not-ASCII names kept."""
    path = tmp_path / "excel.csv"
    path.write_bytes(("\ufeff" + HEADER + "\r\nstraße.jpg,40,30,café,1,2,11,12\r\n").encode("utf-8"))
    data = convert_csv(path, tmp_path)
    assert boxes(data) == [("straße.jpg", "café", [1.0, 2.0, 10.0, 10.0], 100.0)]


def test_quoted_fields_are_read_as_written(tmp_path):
    """A quoted cell keeps its commas and its line break (CRLF included) as the file has them."""
    path = tmp_path / "quoted.csv"
    path.write_bytes(f'{HEADER}\r\n"a, b.jpg",40,30,"traffic\r\nlight",1,2,11,12\r\n'.encode())
    data = convert_csv(path, tmp_path)
    assert boxes(data) == [("a, b.jpg", "traffic\r\nlight", [1.0, 2.0, 10.0, 10.0], 100.0)]


def test_rows_are_named_by_the_line_they_start_on(tmp_path):
    """Blank lines and line breaks inside quoted cells count: a skipped row names the line a text editor shows."""
    path = write_csv(tmp_path, HEADER,
                     "",
                     'a.jpg,40,30,"big',
                     'car",x,2,11,12',
                     "",
                     "a.jpg,40,30,car,abc,2,11,12",
                     "a.jpg,40,30,bus,1,2,11,12")
    data = convert_csv(path, tmp_path, ["car", "big\ncar"])
    assert [(s["file"], s["reason"]) for s in data.skipped] == [
        (f"{path}:3", "xmin is 'x', not a finite number"),
        (f"{path}:6", "xmin is 'abc', not a finite number"),
        (f"{path}:7", "class 'bus' is not in the class list"),
    ]


def test_a_row_of_blank_cells_is_a_blank_line(tmp_path):
    """A line of spaces or of empty cells (a spreadsheet's trailing rows) is passed over like a blank line,
    not taken for a row with no filename, which stops the conversion."""
    path = write_csv(tmp_path, HEADER,
                     "a.jpg,40,30,car,1,2,11,12",
                     "   ",
                     ",,,,,,,",
                     " , ,\t, ,,,,",
                     "b.jpg,40,30,car,3,4,13,14",
                     "b.jpg,40,30,car,abc,4,13,14")
    data = convert_csv(path, tmp_path)
    assert boxes(data) == [("a.jpg", "car", [1.0, 2.0, 10.0, 10.0], 100.0),
                           ("b.jpg", "car", [3.0, 4.0, 10.0, 10.0], 100.0)]
    assert [(s["file"], s["reason"]) for s in data.skipped] == [(f"{path}:7", "xmin is 'abc', not a finite number")]
    path = write_csv(tmp_path, HEADER, "a.jpg,40,30,car,1,2,11,12", " ,40,30,car,1,2,11,12")
    message = rf"^{re.escape(str(path))}:3: filename '' must be a path inside --images$"
    with pytest.raises(TransferKitError, match=message):
        convert_csv(path, tmp_path)


def test_cli_converts_with_renamed_columns_and_a_classes_file(tmp_path):
    """`data convert --from csv --images --columns --classes --out` writes the COCO JSON."""
    path = write_csv(tmp_path, "filename,width,height,label,xmin,ymin,xmax,ymax",
                     "a.jpg,40,30,dog,1,2,11,12", "a.jpg,40,30,cat,0,0,4,4", "a.jpg,40,30,bird,0,0,4,4")
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    out = tmp_path / "out.json"
    assert main(["data", "convert", "--from", "csv", str(path), "--images", str(tmp_path / "img"),
                 "--columns", "class=label", "--classes", str(tmp_path / "classes.txt"), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0,
             "segmentation": []},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 4.0, 4.0], "area": 16.0, "iscrowd": 0,
             "segmentation": []},
        ],
        "categories": [{"id": 1, "name": "dog", "supercategory": ""}, {"id": 2, "name": "cat", "supercategory": ""}],
    }
    assert main(["data", "convert", "--from", "csv", str(path), "--out", str(out)]) == 2
