"""Pascal VOC to COCO.

VOC boxes count pixels from 1 and include both end pixels; COCO boxes are continuous, from 0:
x = xmin - 1, width = xmax - xmin + 1 (the same for y), as the VOC devkit and Detectron do.
`difficult` objects are left out by default (they are ignored in VOC evaluation), `truncated`
ones kept; `<part>` sub-boxes are ignored. Image sizes come from `<size>`, or from the image when
that is missing or zero.
"""

from __future__ import annotations

import math
from pathlib import Path

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from transferkit.data.convert.coco import CocoDataset, image_size, stable_image_ids
from transferkit.errors import TransferKitError


def _num(node, tag: str, where: str) -> float:
    text = node.findtext(tag)
    try:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ValueError(f"{where}: <{tag}> is {text!r}, not a finite number") from None


def convert_voc(root: str | Path, split: str | None = None, classes: list[str] | None = None,
                keep_difficult: bool = False) -> CocoDataset:
    """`root` is a VOC year folder (Annotations/, JPEGImages/, ImageSets/Main/)."""
    root = Path(root)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise TransferKitError(f"{root} is not a VOC folder (no Annotations/); give e.g. VOCdevkit/VOC2007")
    if split:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise TransferKitError(f"split list not found: {listing}")
        stems = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
        files = [ann_dir / f"{s}.xml" for s in stems]
    else:
        files = sorted(ann_dir.glob("*.xml"))
    parsed = []
    names: list[str] = list(classes or [])
    for xml in files:
        try:
            tree = ElementTree.parse(xml)
        except FileNotFoundError:
            raise TransferKitError(f"{xml} is listed in the split but does not exist") from None
        except (ElementTree.ParseError, DefusedXmlException) as exc:
            raise TransferKitError(f"{xml}: not valid VOC XML ({exc}); fix or remove the file") from None
        parsed.append((xml, tree.getroot()))
        if classes is None:
            for obj in tree.getroot().iter("object"):
                name = (obj.findtext("name") or "").strip()
                if name and name not in names:
                    names.append(name)
    out = CocoDataset(names if classes else sorted(names), image_root=root / "JPEGImages")
    file_names = {xml: (node.findtext("filename") or f"{xml.stem}.jpg").strip() for xml, node in parsed}
    for xml, name in file_names.items():
        if not name or Path(name).name != name or name in (".", ".."):
            raise TransferKitError(f"{xml}: <filename> {name!r} must be a file name inside JPEGImages/")
    if len(set(file_names.values())) != len(file_names):
        twice = sorted({n for n in file_names.values() if list(file_names.values()).count(n) > 1})
        raise TransferKitError(f"{root}: several annotation files name the image {twice[0]!r} in <filename>")
    ids = stable_image_ids(list(file_names.values()))
    for xml, node in parsed:
        file_name = file_names[xml]
        image_id = ids[file_name]
        size = node.find("size")
        try:
            width = int(_num(size, "width", str(xml))) if size is not None else 0
            height = int(_num(size, "height", str(xml))) if size is not None else 0
        except ValueError:
            width = height = 0
        if width <= 0 or height <= 0:
            width, height = image_size(root / "JPEGImages" / file_name)
        out.add_image(image_id, file_name, width, height)
        for n, obj in enumerate(node.findall("object"), 1):  # direct children: <part> boxes are not objects
            name = (obj.findtext("name") or "").strip()
            where = f"{xml} object {n}"
            if name not in out.categories:
                out.skip(where, "object", f"class {name!r} is not in the class list", "note")
                continue
            if (obj.findtext("difficult") or "0").strip() == "1" and not keep_difficult:
                out.skip(where, "difficult", f"{name} marked difficult", "note")
                continue
            box = obj.find("bndbox")
            try:
                if box is None:
                    raise ValueError(f"{where}: no <bndbox>")
                xmin, ymin, xmax, ymax = (_num(box, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError as exc:
                out.skip(where, "object", str(exc))
                continue
            out.add_box(image_id, name, xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1, width, height, where)
    return out
