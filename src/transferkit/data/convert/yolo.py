"""YOLO (Ultralytics layout) to COCO: images/<split>/, labels/<split>/, a data yaml naming the classes.

Label lines are `class cx cy w h`, normalised to the image size. An image without a label file is a
background image (kept, no boxes); a label file without an image is reported.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from transferkit.data.convert.coco import CocoDataset, image_size, stable_image_ids
from transferkit.data.images import IMAGE_SUFFIXES
from transferkit.errors import TransferKitError, yaml_error
from transferkit.yamlsafe import YamlTooLarge, load_yaml


def yolo_classes(root: Path) -> list[str]:
    yamls = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    if not yamls:
        raise TransferKitError(f"{root} has no data yaml naming the classes; give --classes FILE")
    try:
        data = load_yaml(yamls[0].read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TransferKitError(f"{yamls[0]}: not UTF-8 text; save the data yaml as UTF-8") from None
    except YamlTooLarge as exc:
        raise TransferKitError(f"{yamls[0]}: refused, the YAML {exc}") from None
    except yaml.YAMLError as exc:
        raise yaml_error(yamls[0], exc) from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            raise TransferKitError(f"{yamls[0]}: `names` keys must be class indices") from None
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise TransferKitError(f"{yamls[0]}: no `names` list or mapping of classes")


def convert_yolo(root: str | Path, split: str | None = None, classes: list[str] | None = None) -> CocoDataset:
    root = Path(root)
    images_root = root / "images"
    if not images_root.is_dir():
        raise TransferKitError(f"{root} is not a YOLO dataset root (no images/ folder)")
    splits = [split] if split else sorted(p.name for p in images_root.iterdir() if p.is_dir())
    if not splits:
        raise TransferKitError(f"{images_root} has no split folders (such as train2017/)")
    names = classes or yolo_classes(root)
    out = CocoDataset(list(names), image_root=images_root / splits[0] if len(splits) == 1 else images_root)
    files = []
    for sp in splits:
        folder = images_root / sp
        if not folder.is_dir():
            raise TransferKitError(f"split {sp!r} not found: {folder}")
        files += sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    # One split: file names as they are (COCO's own); several: relative to images/ to stay unique.
    file_names = {f: f.name if len(splits) == 1 else str(f.relative_to(images_root)) for f in files}
    ids = stable_image_ids(list(file_names.values()))
    for f in files:
        image_id = ids[file_names[f]]
        width, height = image_size(f)
        out.add_image(image_id, file_names[f], width, height)
        label = root / "labels" / f.parent.name / (f.stem + ".txt")
        if not label.exists():
            continue  # a background image
        for n, line in enumerate(label.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            where = f"{label}:{n}"
            parts = line.split()
            if not parts:
                continue
            try:
                cls = int(parts[0])
                cx, cy, w, h = (float(v) for v in parts[1:5])
                if len(parts) < 5:
                    raise ValueError
            except ValueError:
                out.skip(where, "line", f"not `class cx cy w h`: {line.strip()[:60]!r}")
                continue
            if not all(math.isfinite(v) for v in (cx, cy, w, h)):
                out.skip(where, "line", f"cx cy w h must be finite numbers: {line.strip()[:60]!r}")
                continue
            if not 0 <= cls < len(names):
                out.skip(where, "line", f"class {cls} is not in 0..{len(names) - 1}")
                continue
            out.add_box(image_id, names[cls], (cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height,
                        width, height, where)
    for sp in splits:
        stems = {f.stem for f in files if f.parent.name == sp}
        for label in sorted((root / "labels" / sp).glob("*.txt")):
            if label.stem not in stems:
                out.skip(str(label), "label file", "no image with this name", "warning")
    return out
