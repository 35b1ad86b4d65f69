"""Building a COCO detection JSON: stable ids, categories, and a record of what was skipped and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transferkit.data.images import BadImage, open_image
from transferkit.errors import TransferKitError
from transferkit.fileio import write_json


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with open_image(path) as im:
            return im.size
    except (BadImage, OSError, SyntaxError, ValueError) as exc:
        raise TransferKitError(f"cannot read the size of image {path}: {exc}") from None


def stable_image_ids(names: list[str]) -> dict[str, int]:
    """Numeric file stems become the ids (COCO's own scheme); otherwise 1.. in sorted name order."""
    stems = [Path(n).stem for n in names]
    # "1" and "01" are one number: the ids must stay unique, not only the names.
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {n: int(Path(n).stem) for n in names}
    return {n: i + 1 for i, n in enumerate(sorted(names))}


@dataclass
class CocoDataset:
    categories: list[str]
    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    # {"file", "what", "reason", "level"}: error (broken input), warning (worth a look), note (skipped by design)
    skipped: list[dict] = field(default_factory=list)
    image_root: Path | None = None  # image_root / file_name is each image's path

    def category_id(self, name: str) -> int:
        return self.categories.index(name) + 1

    def add_image(self, image_id: int, file_name: str, width: int, height: int) -> None:
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})

    def add_box(self, image_id: int, category: str, x: float, y: float, w: float, h: float,
                width: int, height: int, source: str, iscrowd: int = 0, segmentation=None) -> bool:
        """Clip to the image; a box with no area left is skipped with a reason."""
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(width), x + w), min(float(height), y + h)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            self.skip(source, f"{category} box", f"no area inside the {width}x{height} image ({x}, {y}, {w}, {h})")
            return False
        bbox = [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)]
        self.annotations.append({
            "id": len(self.annotations) + 1, "image_id": image_id, "category_id": self.category_id(category),
            "bbox": bbox, "area": round(bbox[2] * bbox[3], 3), "iscrowd": iscrowd,
            "segmentation": segmentation if segmentation is not None else [],
        })
        return True

    def skip(self, file: str, what: str, reason: str, level: str = "error") -> None:
        self.skipped.append({"file": file, "what": what, "reason": reason, "level": level})

    def to_dict(self) -> dict:
        return {
            "images": sorted(self.images, key=lambda i: i["id"]),
            "annotations": self.annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(self.categories)],
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for s in self.skipped:
            kinds[s["what"]] = kinds.get(s["what"], 0) + 1
        skipped = ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())) or "nothing"
        return (f"{len(self.images)} images, {len(self.annotations)} boxes, {len(self.categories)} categories; "
                f"skipped: {skipped}")
