"""CSV boxes to COCO: one row per box, `filename,width,height,class,xmin,ymin,xmax,ymax`.

The layout of the TF Object Detection API tutorials (xml_to_csv.py, generate_tfrecord.py): a header
row, then one row per box. Coordinates are pixel corners read as the tutorials' generate_tfrecord.py
reads them (xmin / width is the normalised edge), so a box is x = xmin, w = xmax - xmin. Header names
are configurable (`columns={"class": "label"}`); width and height may be left out (read from the
image header then). A row with the box fields empty is an image without boxes.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from transferkit.data.convert.coco import CocoDataset, image_size, stable_image_ids
from transferkit.errors import TransferKitError

COLUMNS = ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")
BOX = ("xmin", "ymin", "xmax", "ymax")


def parse_columns(text: str | None) -> dict[str, str]:
    """`class=label,filename=image` -> {"class": "label", "filename": "image"}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, header = part.partition("=")
        key, header = key.strip(), header.strip()
        if not sep or key not in COLUMNS or not header:
            raise TransferKitError(f"--columns {part!r}: give FIELD=HEADER with FIELD one of {', '.join(COLUMNS)}")
        out[key] = header
    return out


def _number(row: dict, header: str) -> float:
    text = (row.get(header) or "").strip()
    try:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value
    except ValueError:
        raise ValueError(f"{header} is {text!r}, not a finite number") from None


def convert_csv(path: str | Path, images: str | Path | None, classes: list[str] | None = None,
                columns: dict[str, str] | None = None) -> CocoDataset:
    path = Path(path)
    if images is None:
        raise TransferKitError("--from csv needs --images DIR: the folder the filename column is relative to")
    images = Path(images)
    names = {c: c for c in COLUMNS} | (columns or {})
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            missing = [names[c] for c in ("filename", "class", *BOX) if names[c] not in header]
            if missing:
                raise TransferKitError(f"{path}: no column {missing[0]!r} in the header ({', '.join(header)}); "
                                       "name the columns with --columns FIELD=HEADER")
            rows, start = [], reader.line_num + 1
            for cells in reader:  # a row is named by the line it starts on: blank lines and quoted line breaks count
                # A row of blank cells is a blank line; a short row's missing cells read as empty, extra
                # cells are ignored.
                if any(c.strip() for c in cells):
                    rows.append((start, dict(zip(header, cells, strict=False))))
                start = reader.line_num + 1
    except FileNotFoundError:
        raise TransferKitError(f"CSV file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TransferKitError(f"{path}: not a readable CSV file ({exc})") from None
    files: dict[str, list[tuple[int, dict]]] = {}
    for n, row in rows:
        name = (row.get(names["filename"]) or "").strip()
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise TransferKitError(f"{path}:{n}: filename {name!r} must be a path inside --images")
        files.setdefault(name, []).append((n, row))
    found = sorted({(row.get(names["class"]) or "").strip() for _, row in rows} - {""})
    out = CocoDataset(list(classes) if classes else found, image_root=images)
    ids = stable_image_ids(list(files))
    for name, file_rows in files.items():
        image_id = ids[name]
        first_n, first = file_rows[0]
        try:
            width = int(_number(first, names["width"]))
            height = int(_number(first, names["height"]))
        except ValueError:
            width = height = 0
        if width <= 0 or height <= 0:
            try:
                width, height = image_size(images / name)
            except TransferKitError:
                raise TransferKitError(f"{path}:{first_n}: no width and height, and the image {name!r} cannot be "
                                       f"read under {images}; fill in the columns or fix the image") from None
        out.add_image(image_id, name, width, height)
        for n, row in file_rows:
            where = f"{path}:{n}"
            cls = (row.get(names["class"]) or "").strip()
            if not cls and not any((row.get(names[k]) or "").strip() for k in BOX):
                continue  # an image without boxes
            if not cls:  # a box without a class is a broken row, not a class left out on purpose
                out.skip(where, "object", f"no class: the {names['class']} cell is empty")
                continue
            if cls not in out.categories:
                out.skip(where, "object", f"class {cls!r} is not in the class list", "note")
                continue
            try:
                x0, y0, x1, y1 = (_number(row, names[k]) for k in BOX)
            except ValueError as exc:
                out.skip(where, "object", str(exc))
                continue
            out.add_box(image_id, cls, x0, y0, x1 - x0, y1 - y0, width, height, where)
    return out
