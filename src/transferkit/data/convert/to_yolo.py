"""COCO to YOLO (Ultralytics layout): labels/<split>/<stem>.txt with `class cx cy w h` normalised,
images/<split>/ (hard links where the file system allows, else copies), and a data yaml.

YOLO class ids are 0.. in the order of the COCO categories; crowd regions have no YOLO form and are
left out with a reason. An image with no boxes gets no label file (a YOLO background image).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from transferkit.data.coco import read_coco
from transferkit.errors import TransferKitError
from transferkit.fileio import write_text


@dataclass
class YoloExport:
    root: Path
    images: int = 0
    boxes: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"file", "what", "reason"}

    def summary(self) -> str:
        return f"{self.images} images, {self.boxes} boxes; skipped {len(self.skipped)}"


def _place_image(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def export_yolo(coco_json: str | Path, images_dir: str | Path, out: str | Path, split: str = "train") -> YoloExport:
    coco = read_coco(coco_json)
    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise TransferKitError(f"image folder not found: {images_dir} (give the folder the file_names are in)")
    result = YoloExport(out)
    for problem in coco.problems:
        if problem.error:
            result.skipped.append({"file": str(coco.path), "what": problem.where, "reason": problem.detail})
    index = {c["id"]: i for i, c in enumerate(coco.categories)}
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    by_image = coco.annotations_by_image()
    stems: set[str] = set()
    for img in coco.images:
        src = images_dir / img["file_name"]
        stem = Path(img["file_name"]).stem
        if not src.is_file():
            result.skipped.append({"file": str(src), "what": "image", "reason": "file not found"})
            continue
        if stem in stems:  # YOLO pairs images and labels by stem, within a flat folder
            result.skipped.append({"file": str(src), "what": "image", "reason": f"another image is named {stem}"})
            continue
        if not img["width"] or not img["height"]:
            result.skipped.append({"file": str(src), "what": "image", "reason": "width/height missing in the JSON"})
            continue
        stems.add(stem)
        _place_image(src, out / "images" / split / Path(img["file_name"]).name)
        result.images += 1
        lines = []
        for ann in by_image[img["id"]]:
            if ann["iscrowd"]:
                result.skipped.append({"file": img["file_name"], "what": f"annotation {ann['id']}",
                                       "reason": "crowd region (YOLO has no crowd form)"})
                continue
            x, y, w, h = ann["bbox"]
            W, H = img["width"], img["height"]
            lines.append(f"{index[ann['category_id']]} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} "
                         f"{w / W:.6f} {h / H:.6f}")
        if lines:
            write_text(out / "labels" / split / f"{stem}.txt", "\n".join(lines) + "\n")
            result.boxes += len(lines)
    names = {i: c["name"] for i, c in enumerate(coco.categories)}
    write_text(out / "data.yaml", yaml.safe_dump({"path": ".", split: f"images/{split}", "names": names},
                                                 sort_keys=False))
    return result
