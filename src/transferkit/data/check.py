"""Dataset checks: what would break or skew training, found before training starts.

Errors (the run would fail or silently learn from less): undecodable or truncated images, missing
files, annotations naming unknown categories or images, degenerate boxes, classes with no images.
Warnings (worth a look): duplicate images (same bytes), boxes reaching outside the image, class
imbalance, images in modes converted at load time. `check_dataset` runs every check (decoding and
hashing every image); training runs the cheap structural ones through the same messages.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.data.coco import guess_image_folder, read_coco
from transferkit.data.convert import CONVERTERS
from transferkit.data.convert.tfrecord import read_tfrecord_dataset
from transferkit.data.images import BadImage, image_files, load_rgb, open_image
from transferkit.data.lists import read_labelled_list
from transferkit.data.shards import read_index, sample_bytes
from transferkit.data.tfrecord import read_record_image
from transferkit.errors import TransferKitError
from transferkit.progress import track

FORMATS = ("folder", "list", "coco", "voc", "yolo", "labelme", "cityscapes", "shards", "csv", "tfrecord")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".record", ".tfrec")
IMBALANCE_RATIO = 10.0  # most / fewest examples per class above which training is likely skewed
PLAIN_MODES = {"RGB", "L"}


LEVELS = ("error", "warning", "note")  # only errors make a dataset fail the check


@dataclass
class Finding:
    kind: str
    where: str
    detail: str
    level: str = "error"

    def line(self) -> str:
        return f"{self.kind}: {self.where}: {self.detail}"


@dataclass
class CheckReport:
    source: str
    fmt: str
    images: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)  # images (classification) or boxes (detection)
    findings: list[Finding] = field(default_factory=list)

    def add(self, kind: str, where: str, detail: str, level: str = "error") -> None:
        self.findings.append(Finding(kind, where, detail, level))

    def at(self, level: str) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    @property
    def errors(self) -> list[Finding]:
        return self.at("error")

    def by_kind(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for f in self.findings:
            out.setdefault(f.kind, []).append(f)
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.fmt, "images": self.images, "class_counts": self.class_counts,
                **{f"{level}s": len(self.at(level)) for level in LEVELS},
                "findings": [vars(f) for f in self.findings]}

    def render(self, examples: int = 3) -> list[str]:
        lines = [f"{self.source} ({self.fmt}): {self.images} images, {len(self.class_counts)} classes"]
        kinds = sorted(self.by_kind().items(), key=lambda kv: LEVELS.index(kv[1][0].level))
        for kind, items in kinds:
            lines.append(f"{items[0].level}: {kind} x {len(items)}")
            lines += [f"    {f.where}: {f.detail}" for f in items[:examples]]
            if len(items) > examples:
                lines.append(f"    ... {len(items) - examples} more")
        counts = ", ".join(f"{len(self.at(level))} {level}(s)" for level in LEVELS)
        lines.append(counts if self.findings else "no problems found")
        return lines


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".lst":
            return "list"
        if path.suffix == ".json":
            return "coco"
        if path.suffix == ".csv":
            return "csv"
        if path.suffix in TFRECORD_SUFFIXES:
            return "tfrecord"
        raise TransferKitError(f"{path}: give a dataset folder, a .lst list file or a COCO .json (or --format)")
    if not path.is_dir():
        raise TransferKitError(f"dataset not found: {path}")
    if (path / "index.json").is_file():
        return "shards"
    if (path / "Annotations").is_dir():
        return "voc"
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "yolo"
    if (path / "gtFine").is_dir():
        return "cityscapes"
    if any(not p.name.startswith(".") for p in path.glob("*.json")):  # hidden: the toolkit's output manifest
        return "labelme"
    if next(path.rglob("*.xml"), None) is not None:  # VOC XMLs as annotation tools write them
        return "voc"
    return "folder"


def check_balance(report: CheckReport, empty_level: str = "error") -> None:
    counts = report.class_counts
    for name, n in counts.items():
        if n == 0:
            report.add("empty class", name, "no examples; remove the class or add examples", empty_level)
    used = [n for n in counts.values() if n > 0]
    if len(used) > 1 and max(used) > IMBALANCE_RATIO * min(used):
        most = max(counts, key=counts.get)
        fewest = min((c for c in counts if counts[c] > 0), key=counts.get)
        report.add("class imbalance", f"{most} vs {fewest}",
                   f"{counts[most]} vs {counts[fewest]} examples (over {IMBALANCE_RATIO:g}x); consider "
                   "resampling or class weights", "warning")


def check_images(report: CheckReport, paths: list[Path], decode: bool = True) -> set[Path]:
    """Missing, undecodable (truncated included) and duplicate files; returns the bad ones."""
    bad: set[Path] = set()
    seen: dict[str, Path] = {}
    for path in track(paths, "checking images") if decode else paths:
        if not path.is_file():
            report.add("missing file", str(path), "listed but not found")
            bad.add(path)
            continue
        if not decode:
            continue
        try:
            with open_image(path) as im:
                mode = im.mode
            load_rgb(path)
        except (BadImage, OSError, SyntaxError, ValueError) as exc:
            report.add("undecodable image", str(path), f"{exc}; remove or replace it")
            bad.add(path)
            continue
        if mode not in PLAIN_MODES:
            report.add("converted mode", str(path), f"mode {mode}, converted to RGB when read", "note")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            report.add("duplicate image", str(path), f"same bytes as {seen[digest]}", "warning")
        else:
            seen[digest] = path
    return bad


def _check_classification(report: CheckReport, splits: dict[str, list[tuple[Path, int]]], classes: list[str],
                          decode: bool) -> None:
    for split, samples in splits.items():
        bad = check_images(report, [p for p, _ in samples], decode)
        report.images += len(samples)
        if split == "train" or len(splits) == 1:
            counts = dict.fromkeys(classes, 0)
            for path, label in samples:
                if path not in bad:
                    counts[classes[label]] += 1
            report.class_counts = counts
    check_balance(report)


def _folder_splits(root: Path) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    parts = [root / s for s in ("train", "val") if (root / s).is_dir()] or [root]
    classes = sorted({p.name for part in parts for p in part.iterdir() if p.is_dir() and not p.name.startswith(".")})
    if not classes:
        raise TransferKitError(f"{root} has no class sub-folders (or train/ and val/ holding them)")
    splits = {}
    for part in parts:
        splits[part.name] = [(f, label) for label, name in enumerate(classes) if (part / name).is_dir()
                             for f in image_files(part / name)]
    return splits, classes


def check_coco_like(report: CheckReport, images: list[dict], box_classes: list[str], categories: list[str],
                    image_root: Path, decode: bool) -> None:
    """Images of a detection dataset (paths image_root / file_name) and the class of every box."""
    bad = check_images(report, [image_root / img["file_name"] for img in images], decode)
    report.images = len(images)
    report.class_counts = dict.fromkeys(categories, 0)
    for name in box_classes:
        report.class_counts[name] += 1
    for img in images:
        path = image_root / img["file_name"]
        if decode and path not in bad and img.get("width"):
            with open_image(path) as im:  # decoded once already: a bad image is in `bad`
                size = im.size
            if size != (img["width"], img["height"]):
                report.add("size mismatch", str(path), f"the file is {size[0]}x{size[1]}, the annotations say "
                           f"{img['width']}x{img['height']}; boxes may be misplaced")
    check_balance(report, "warning")  # detection sets often hold categories they do not use


def check_shards(report: CheckReport, folder: Path, decode: bool) -> None:
    """`data check` on a pack: every image decodes from its shard, labels and classes agree."""
    index = read_index(folder)
    report.images = len(index.samples)
    report.class_counts = dict.fromkeys(index.classes, 0)
    seen: dict[str, str] = {}
    for sample, record in zip(track(index.samples, "checking shards") if decode else index.samples, index.records,
                              strict=True):
        labels = [record["label"]] if index.task == "classification" else [
            a["label"] for a in record.get("annotations", [])]
        for label in labels:
            if not 0 <= label < len(index.classes):
                report.add("unknown category", str(sample), f"label {label} is not in 0..{len(index.classes) - 1}")
            else:
                report.class_counts[index.classes[label]] += 1
        if not decode:
            continue
        try:
            data = sample_bytes(sample)
            load_rgb(io.BytesIO(data))
        except BadImage as exc:
            report.add("undecodable image", str(sample), f"{exc}; pack again")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            report.add("duplicate image", str(sample), f"same bytes as {seen[digest]}", "warning")
        seen.setdefault(digest, str(sample))
    check_balance(report, "error" if index.task == "classification" else "warning")


def check_dataset(path: str | Path, fmt: str | None = None, images: str | Path | None = None,
                  root: str | Path | None = None, split: str | None = None, decode: bool = True) -> CheckReport:
    path = Path(path)
    fmt = fmt or detect_format(path)
    report = CheckReport(str(path), fmt)
    if fmt == "folder":
        splits, classes = _folder_splits(path)
        _check_classification(report, splits, classes, decode)
    elif fmt == "list":
        classes, pairs = read_labelled_list(path, Path(root) if root else path.parent)
        _check_classification(report, {"list": pairs}, classes, decode)
    elif fmt == "coco":
        coco = read_coco(path)
        image_root = Path(images) if images else guess_image_folder(path)
        for p in coco.problems:
            report.add(p.kind, f"{path.name} {p.where}", p.detail, "error" if p.error else "warning")
        by_id = {c["id"]: c["name"] for c in coco.categories}
        check_coco_like(report, coco.images, [by_id[a["category_id"]] for a in coco.annotations],
                        coco.category_names, image_root, decode)
    elif fmt == "shards":
        check_shards(report, path, decode)
    elif fmt == "tfrecord":
        _check_tfrecord(report, path, decode)
    else:
        dataset = CONVERTERS[fmt](path, split, **({"images": images} if fmt in ("voc", "csv") else {}))
        for s in dataset.skipped:
            report.add(f"{s['what']} skipped", s["file"], s["reason"], s["level"])
        check_coco_like(report, dataset.images, [dataset.categories[a["category_id"] - 1] for a in dataset.annotations],
                        dataset.categories, dataset.image_root, decode)
    return report


def _check_tfrecord(report: CheckReport, path: Path, decode: bool) -> None:
    """Every record's framing and Example (a damaged one stops with its index), then every image decoded."""
    dataset, located = read_tfrecord_dataset([path])
    for s in dataset.skipped:
        report.add(f"{s['what']} skipped", s["file"], s["reason"], s["level"])
    report.images = len(dataset.images)
    report.class_counts = dict.fromkeys(dataset.categories, 0)
    for a in dataset.annotations:
        report.class_counts[dataset.categories[a["category_id"] - 1]] += 1
    for img in track(dataset.images, "checking images") if decode else ():
        sample = located[img["id"]]
        try:
            size = read_record_image(sample).size
        except BadImage as exc:
            report.add("undecodable image", str(sample), f"{exc}; write the record again")
            continue
        if size != (img["width"], img["height"]):
            report.add("size mismatch", str(sample), f"the image is {size[0]}x{size[1]}, image/width and height say "
                       f"{img['width']}x{img['height']}; boxes may be misplaced")
    check_balance(report, "warning")


def startup_check(source: str, classes: list[str], labels: list[int], empty_level: str = "error") -> list[str]:
    """The cheap checks training runs on its training split: an error stops the run with the same message
    as `data check`; warnings are returned for the log."""
    report = CheckReport(source, "training split", len(labels), dict.fromkeys(classes, 0))
    for label in labels:
        report.class_counts[classes[label]] += 1
    check_balance(report, empty_level)
    if report.errors:
        first = report.errors[0]
        raise TransferKitError(f"{source}: {first.line()} (`transferkit data check` lists every problem)")
    return [f.line() for f in report.at("warning")]
