"""Reading a COCO detection JSON: structure errors stop with the file and field; bad entries are set aside.

A wrong type where the format needs a list or a number is fatal (nothing sensible can be read), while
an annotation that points at an unknown image or category, or whose box is degenerate, is a problem
of that one entry: it is left out and recorded, so a converter, `data check` and training all see the
same list of what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.data.images import IMAGE_SUFFIXES
from transferkit.errors import TransferKitError


@dataclass
class CocoProblem:
    kind: str  # unknown category, unknown image, degenerate box, box outside image, ...
    where: str  # "annotation 17", "image 000000000009.jpg"
    detail: str
    error: bool = True


@dataclass
class CocoFile:
    path: Path
    images: list[dict]  # id, file_name, width, height
    annotations: list[dict]  # id, image_id, category_id, bbox [x, y, w, h], area, iscrowd, segmentation
    categories: list[dict]  # id, name
    problems: list[CocoProblem] = field(default_factory=list)

    @property
    def category_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def annotations_by_image(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {img["id"]: [] for img in self.images}
        for ann in self.annotations:
            out[ann["image_id"]].append(ann)
        return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false are not ids


def _number(value, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TransferKitError(f"{path}: {where} must be a finite number, not {value!r:.40}")
    return float(value)


def _entries(data: dict, key: str, path: Path) -> list[dict]:
    items = data.get(key, [] if key == "annotations" else None)
    if not isinstance(items, list):
        raise TransferKitError(f"{path}: `{key}` must be a list (is this a COCO instances JSON?)")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TransferKitError(f"{path}: {key}[{i}] must be an object, not {type(item).__name__}")
    return items


def _require(item: dict, keys: tuple[str, ...], where: str, path: Path) -> None:
    missing = [k for k in keys if k not in item]
    if missing:
        raise TransferKitError(f"{path}: {where} has no `{missing[0]}`")


def read_coco(path: str | Path) -> CocoFile:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TransferKitError(f"COCO JSON not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransferKitError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise TransferKitError(f"{path}: a COCO JSON is an object with images, annotations and categories")

    categories = []
    for i, cat in enumerate(_entries(data, "categories", path)):
        _require(cat, ("id", "name"), f"categories[{i}]", path)
        if not _is_int(cat["id"]) or not isinstance(cat["name"], str):
            raise TransferKitError(f"{path}: categories[{i}] needs an integer id and a string name")
        categories.append({"id": cat["id"], "name": cat["name"]})
    if len({c["id"] for c in categories}) != len(categories):
        raise TransferKitError(f"{path}: two categories share an id")

    images = []
    for i, img in enumerate(_entries(data, "images", path)):
        _require(img, ("id", "file_name"), f"images[{i}]", path)
        if not _is_int(img["id"]) or not isinstance(img["file_name"], str):
            raise TransferKitError(f"{path}: images[{i}] needs an integer id and a string file_name")
        name = img["file_name"]
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise TransferKitError(f"{path}: images[{i}].file_name {name!r} must be a path inside the image folder")
        size = []
        for key in ("width", "height"):
            value = img.get(key, 0)
            if not _is_int(value) or value < 0:
                raise TransferKitError(f"{path}: images[{i}].{key} must be a non-negative integer, not {value!r:.40}")
            size.append(value)
        images.append({"id": img["id"], "file_name": name, "width": size[0], "height": size[1]})
    if len({im["id"] for im in images}) != len(images):
        raise TransferKitError(f"{path}: two images share an id")

    out = CocoFile(path, images, [], categories)
    image_by_id = {im["id"]: im for im in images}
    category_ids = {c["id"] for c in categories}
    for i, ann in enumerate(_entries(data, "annotations", path)):
        where = f"annotations[{i}]"
        _require(ann, ("image_id", "category_id", "bbox"), where, path)
        for key in ("image_id", "category_id"):
            if not _is_int(ann[key]):
                raise TransferKitError(f"{path}: {where}.{key} must be an integer, not {ann[key]!r:.40}")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise TransferKitError(f"{path}: {where}.bbox must be a list [x, y, width, height]")
        x, y, w, h = (_number(v, f"{where}.bbox", path) for v in bbox)
        image = image_by_id.get(ann["image_id"])
        if image is None:
            out.problems.append(CocoProblem("unknown image", where, f"image_id {ann['image_id']!r} is not in images"))
            continue
        if ann["category_id"] not in category_ids:
            out.problems.append(CocoProblem("unknown category", where,
                                            f"category_id {ann['category_id']!r} is not in categories"))
            continue
        if w <= 0 or h <= 0:
            out.problems.append(CocoProblem("degenerate box", where, f"bbox {bbox} has no area"))
            continue
        width, height = image["width"], image["height"]
        if width and height and (x < -0.5 or y < -0.5 or x + w > width + 0.5 or y + h > height + 0.5):
            out.problems.append(CocoProblem("box outside image", where,
                                            f"bbox {bbox} reaches outside the {width}x{height} image "
                                            f"{image['file_name']} (clipped when read)", error=False))
            x0, y0 = max(0.0, x), max(0.0, y)
            x, y, w, h = x0, y0, min(float(width), x + w) - x0, min(float(height), y + h) - y0
            if w <= 0 or h <= 0:
                out.problems[-1].error = True
                continue
        iscrowd = ann.get("iscrowd", 0)
        out.annotations.append({
            "id": ann.get("id", i + 1), "image_id": image["id"], "category_id": ann["category_id"],
            "bbox": [x, y, w, h], "area": ann.get("area", w * h) if isinstance(ann.get("area"), (int, float))
            else w * h, "iscrowd": 1 if iscrowd in (1, True) else 0, "segmentation": ann.get("segmentation", []),
        })
    return out


def guess_image_folder(json_path: Path) -> Path:
    """COCO's own layout: annotations/instances_<split>.json beside images/<split>/ (or <split>/)."""
    split = json_path.stem.split("_", 1)[-1]
    for candidate in (json_path.parent.parent / "images" / split, json_path.parent.parent / split,
                      json_path.parent / "images", json_path.parent):
        if candidate.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in candidate.iterdir()):
            return candidate
    raise TransferKitError(f"cannot tell where the images of {json_path} are; give --images FOLDER")
