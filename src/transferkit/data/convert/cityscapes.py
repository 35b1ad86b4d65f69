"""Cityscapes gtFine polygons to COCO.

By default only the instance classes (person, rider, car, truck, bus, train, motorcycle, bicycle)
are kept; `classes` changes the list. Group labels (`cargroup`, `persongroup`, ...) become
crowd regions (`iscrowd: 1`) of their class, as in COCO; every other label (road, sky, the
`out of roi` and `ego vehicle` ignore regions, ...) is skipped. Polygons reaching outside the
image are clipped to it. Images are leftImg8bit/<split>/<city>/<frame>_leftImg8bit.png.
"""

from __future__ import annotations

import json
from pathlib import Path

from transferkit.data.convert.coco import CocoDataset, stable_image_ids
from transferkit.errors import TransferKitError

INSTANCE_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


def convert_cityscapes(root: str | Path, split: str | None = None, classes: list[str] | None = None) -> CocoDataset:
    root = Path(root)
    gt = root / "gtFine"
    if not gt.is_dir():
        raise TransferKitError(f"{root} is not a Cityscapes root (no gtFine/)")
    pattern = f"{split}/*/*_gtFine_polygons.json" if split else "*/*/*_gtFine_polygons.json"
    files = sorted(gt.glob(pattern))
    if not files:
        raise TransferKitError(f"no *_gtFine_polygons.json under {gt / (split or '')}")
    out = CocoDataset(list(classes or INSTANCE_CLASSES), image_root=root)
    frames = {f: f.name.removesuffix("_gtFine_polygons.json") for f in files}
    image_names = {f: f"leftImg8bit/{f.parent.parent.name}/{f.parent.name}/{frames[f]}_leftImg8bit.png" for f in files}
    ids = stable_image_ids(list(image_names.values()))
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            width, height = int(data["imgWidth"]), int(data["imgHeight"])
            objects = data["objects"]
            if width <= 0 or height <= 0 or not isinstance(objects, list):
                raise ValueError("bad size or objects")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise TransferKitError(f"{path}: not a Cityscapes polygons file ({exc})") from None
        image_id = ids[image_names[path]]
        out.add_image(image_id, image_names[path], width, height)
        for n, obj in enumerate(objects, 1):
            where = f"{path} object {n}"
            if not isinstance(obj, dict):
                out.skip(where, "object", "not an object")
                continue
            label = "" if obj.get("label") is None else str(obj["label"])
            crowd = label.endswith("group") and label[: -len("group")] in out.categories
            name = label[: -len("group")] if crowd else label
            if not name:  # a broken annotation, not a class left out on purpose
                out.skip(where, "object", "no class: `label` is empty or missing")
                continue
            if name not in out.categories:
                out.skip(where, "object", f"{label!r} is not an instance class", "note")
                continue
            try:
                pts = [(min(max(float(x), 0.0), width), min(max(float(y), 0.0), height)) for x, y in obj["polygon"]]
                if len(pts) < 3:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                out.skip(where, "object", "`polygon` is not a list of 3 or more [x, y]")
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            seg = [[round(v, 2) for p in pts for v in p]]
            out.add_box(image_id, name, min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys), width, height,
                        where, iscrowd=int(crowd), segmentation=seg)
    return out
