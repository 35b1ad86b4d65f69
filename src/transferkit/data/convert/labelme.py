"""labelme JSON (versions 3-5) to COCO.

polygon and rectangle shapes become instances with a segmentation polygon and its bounding box;
circle (centre + a point on the rim) becomes a 32-point polygon; shapes with the same label and
`group_id` in one file are merged into one instance (several polygons). point, line, linestrip,
mask and other types are skipped with the reason; so is the label `__ignore__`. Image sizes are
`imageHeight`/`imageWidth`, or read from the image (or from the embedded base64 `imageData`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from pathlib import Path

from transferkit.data.convert.coco import CocoDataset, image_size, stable_image_ids
from transferkit.data.images import BadImage, open_image
from transferkit.errors import TransferKitError

POLYGON_TYPES = ("polygon", "rectangle", "circle")


def _label(shape: dict) -> str:
    label = shape.get("label")
    return "" if label is None else str(label)


def _polygon(shape: dict) -> list[tuple[float, float]]:
    try:
        pts = [(float(x), float(y)) for x, y in shape["points"]]
        if not all(math.isfinite(v) for pt in pts for v in pt):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ValueError("`points` must be a list of [x, y]") from None
    kind = shape.get("shape_type") or "polygon"
    if kind == "rectangle":
        if len(pts) != 2:
            raise ValueError(f"a rectangle needs 2 points, has {len(pts)}")
        (x0, y0), (x1, y1) = pts
        x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind == "circle":
        if len(pts) != 2:
            raise ValueError(f"a circle needs 2 points, has {len(pts)}")
        (cx, cy), (px, py) = pts
        r = math.hypot(px - cx, py - cy)
        return [(cx + r * math.cos(2 * math.pi * k / 32), cy + r * math.sin(2 * math.pi * k / 32)) for k in range(32)]
    if len(pts) < 3:
        raise ValueError(f"a polygon needs 3 or more points, has {len(pts)}")
    return pts


def _area(poly: list[tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1], strict=True))) / 2


def _size(data: dict, json_path: Path) -> tuple[int, int]:
    w, h = data.get("imageWidth"), data.get("imageHeight")
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        return w, h
    if data.get("imageData"):
        try:
            with open_image(io.BytesIO(base64.b64decode(data["imageData"]))) as im:
                return im.size
        except (BadImage, binascii.Error, OSError, ValueError, TypeError) as exc:
            raise TransferKitError(f"{json_path}: imageData is not a readable image ({exc})") from None
    image_path = data.get("imagePath")
    if not isinstance(image_path, str) or not image_path:
        raise TransferKitError(f"{json_path}: no imageWidth/imageHeight, imageData or imagePath to size the image by")
    try:
        return image_size(json_path.parent / image_path)
    except TransferKitError as exc:
        raise TransferKitError(f"{json_path}: imagePath {image_path!r}: {exc}") from None


def convert_labelme(folder: str | Path, classes: list[str] | None = None) -> CocoDataset:
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))  # not the output manifest
    if not files:
        raise TransferKitError(f"{folder} holds no labelme .json files")
    loaded = []
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise TransferKitError(f"{path}: not valid JSON ({exc}); fix or remove the file") from None
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            raise TransferKitError(f"{path}: not a labelme file (no `shapes` list)")
        loaded.append((path, data))
    names = list(classes) if classes else sorted({
        _label(s) for _, d in loaded for s in d["shapes"] if isinstance(s, dict)
        and _label(s) not in ("", "__ignore__") and (s.get("shape_type") or "polygon") in POLYGON_TYPES})
    out = CocoDataset(names, image_root=folder)
    file_names = {p: str(d.get("imagePath") or p.with_suffix(".jpg").name) for p, d in loaded}
    ids = stable_image_ids([p.name for p, _ in loaded])
    for path, data in loaded:
        image_id = ids[path.name]
        width, height = _size(data, path)
        out.add_image(image_id, file_names[path], width, height)
        instances: dict[tuple, list] = {}
        for n, shape in enumerate(data["shapes"], 1):
            where = f"{path} shape {n}"
            if not isinstance(shape, dict):
                out.skip(where, "shape", "not an object")
                continue
            label, kind = _label(shape), shape.get("shape_type") or "polygon"
            if label == "__ignore__":
                out.skip(where, "shape", "label __ignore__", "note")
                continue
            if kind not in POLYGON_TYPES:
                out.skip(where, "shape", f"shape type {kind!r} has no area", "warning")
                continue
            if not label:  # a broken annotation, not a class left out on purpose
                out.skip(where, "shape", "no class: `label` is empty or missing")
                continue
            if label not in out.categories:
                out.skip(where, "shape", f"class {label!r} is not in the class list", "note")
                continue
            try:
                poly = _polygon(shape)
            except ValueError as exc:
                out.skip(where, "shape", str(exc))
                continue
            group = shape.get("group_id")
            if group is not None and (isinstance(group, bool) or not isinstance(group, (int, str))):
                out.skip(where, "shape", f"group_id {group!r:.30} is not a number")
                continue
            key = (label, group) if group is not None else (label, f"shape-{n}")
            instances.setdefault(key, []).append(poly)
        for (label, _), polys in instances.items():
            xs = [x for poly in polys for x, _ in poly]
            ys = [y for poly in polys for _, y in poly]
            seg = [[round(v, 2) for pt in poly for v in pt] for poly in polys]
            if out.add_box(image_id, label, min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys), width, height,
                           str(path), segmentation=seg):
                out.annotations[-1]["area"] = round(sum(_area(p) for p in polys), 2)
    return out
