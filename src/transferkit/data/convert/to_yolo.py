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
from transferkit.outputs import output_folder


@dataclass
class YoloExport:
    root: Path
    images: int = 0
    boxes: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"file", "what", "reason"}

    def summary(self) -> str:
        return f"{self.images} images, {self.boxes} boxes; skipped {len(self.skipped)}"


def _place_image(src: Path, dst: Path) -> None:
    """A hard link to `src` at `dst` (a copy where links are not allowed), replacing `dst` atomically."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def export_yolo(coco_json: str | Path, images_dir: str | Path, out: str | Path, split: str = "train",
                force: bool = False) -> YoloExport:
    """Write the YOLO layout under `out`. Files there that the toolkit did not write are not replaced
    unless `force` (outputs.py); label files of ours that this export no longer writes are removed."""
    coco = read_coco(coco_json)
    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise TransferKitError(f"image folder not found: {images_dir} (give the folder the file_names are in)")
    result = YoloExport(out)
    for problem in coco.problems:
        if problem.error:
            result.skipped.append({"file": str(coco.path), "what": problem.where, "reason": problem.detail})
    index = {c["id"]: i for i, c in enumerate(coco.categories)}
    by_image = coco.annotations_by_image()
    stems: set[str] = set()
    placed: list[tuple[Path, Path]] = []  # (source image, destination)
    labels: dict[Path, str] = {}
    for img in coco.images:
        src = images_dir / img["file_name"]
        stem = Path(img["file_name"]).stem
        if not src.is_file():
            result.skipped.append({"file": str(src), "what": "image", "reason": "file not found"})
            continue
        # YOLO pairs images and labels by stem, within a flat folder; stems are compared without case, as
        # macOS and Windows file systems compare names.
        if stem.casefold() in stems:
            result.skipped.append({"file": str(src), "what": "image", "reason": f"another image is named {stem}"})
            continue
        if not img["width"] or not img["height"]:
            result.skipped.append({"file": str(src), "what": "image", "reason": "width/height missing in the JSON"})
            continue
        stems.add(stem.casefold())
        placed.append((src, out / "images" / split / Path(img["file_name"]).name))
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
            labels[out / "labels" / split / f"{stem}.txt"] = "\n".join(lines) + "\n"
    names = {i: c["name"] for i, c in enumerate(coco.categories)}
    data_yaml = yaml.safe_dump({"path": ".", split: f"images/{split}", "names": names}, sort_keys=False)
    with output_folder(out, force) as folder:
        # Every file this export writes is claimed before the first is written; an image that is
        # already a link to its source is not a replacement.
        folder.claim([dst for src, dst in placed if not (dst.exists() and os.path.samefile(src, dst))]
                     + list(labels) + [out / "data.yaml"])
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for src, dst in placed:
            _place_image(src, dst)
            folder.wrote(dst)
            result.images += 1
        for path, text in labels.items():
            write_text(path, text)
            folder.wrote(path)
            result.boxes += text.count("\n")
        for path in folder.stale(out / "labels" / split, "*.txt", set(labels)):
            path.unlink()  # ours from an earlier export, and no longer true of this data
            folder.forget(path)
        write_text(out / "data.yaml", data_yaml)
        folder.wrote(out / "data.yaml")
    return result
