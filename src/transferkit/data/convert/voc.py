"""Pascal VOC to COCO: VOC year folders, and folders of VOC XMLs as annotation tools write them.

VOC boxes count pixels from 1 and include both end pixels; COCO boxes are continuous, from 0:
x = xmin - 1, width = xmax - xmin + 1 (the same for y), as the VOC devkit and Detectron do.
`difficult` objects are left out by default (they are ignored in VOC evaluation), `truncated`
ones kept; `<part>` sub-boxes are ignored. Image sizes come from `<size>`, or from the image when
that is missing or zero.

Layouts: a VOC year folder (Annotations/, JPEGImages/, ImageSets/Main/), or any folder holding VOC
XMLs at any depth, as labelImg, CVAT and Roboflow write them. Each XML's image is looked for under
`images` (when given), beside the XML, in a sibling `images/` or `JPEGImages/` folder (mirroring
sub-folders), and last at the XML's `<path>`. With `images`, its image files that no XML names are
background images (no boxes).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from transferkit.data.convert.coco import CocoDataset, image_size, stable_image_ids
from transferkit.data.images import IMAGE_SUFFIXES, image_files
from transferkit.data.lists import seeded_val_ids
from transferkit.errors import TransferKitError

IMAGE_FOLDERS = ("images", "JPEGImages")


def _num(node, tag: str) -> float:
    text = node.findtext(tag)
    try:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ValueError(f"<{tag}> is {text!r}, not a finite number") from None


def is_year_folder(root: Path) -> bool:
    return (root / "Annotations").is_dir()


@dataclass
class _Entry:
    xml: Path | None  # None: a background image (no XML)
    node: object | None
    image: Path


def _parse(xml: Path):
    try:
        return ElementTree.parse(xml).getroot()
    except FileNotFoundError:
        raise TransferKitError(f"{xml} is listed in the split but does not exist") from None
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        raise TransferKitError(f"{xml}: not valid VOC XML ({exc}); fix or remove the file") from None


def _candidates(xml: Path, root: Path, name: str, images: Path | None) -> list[Path]:
    """Where the image `name` of annotation `xml` may be, in the order looked at."""
    out = []
    rel_dir = xml.parent.relative_to(root) if xml.parent.is_relative_to(root) else Path()
    if images is not None:
        out += [images / name, images / rel_dir / name]
    out += [xml.parent / name, *(xml.parent / sub / name for sub in IMAGE_FOLDERS)]
    # a sibling images/ or JPEGImages/ of the XML's folder or of any folder above it, up to the root
    # (annotations/train/a.xml -> images/train/a.jpg)
    folder = xml.parent
    while True:
        out += [folder.parent / sub / xml.parent.relative_to(folder) / name for sub in IMAGE_FOLDERS]
        if folder == root or folder.parent == folder or not folder.is_relative_to(root):
            break
        folder = folder.parent
    return out


def _find_image(xml: Path, node, root: Path, images: Path | None) -> tuple[Path | None, list[Path]]:
    name = (node.findtext("filename") or "").strip()
    if name and (Path(name).is_absolute() or ".." in Path(name).parts or name in (".",)):
        raise TransferKitError(f"{xml}: <filename> {name!r} must be a file name (no folders above it)")
    # some tools leave the extension out; cameras write it in capitals (IMG_0001.JPG)
    suffixes = sorted(IMAGE_SUFFIXES) + sorted(s.upper() for s in IMAGE_SUFFIXES)
    names = [name] if name else [xml.stem + s for s in suffixes]
    if name and Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        names += [name + s for s in suffixes]
    looked = []
    for n in names:
        for cand in _candidates(xml, root, n, images):
            looked.append(cand)
            if cand.is_file():
                return cand, looked
    recorded = (node.findtext("path") or "").strip()
    if recorded and Path(recorded).is_file():
        return Path(recorded), looked
    return None, looked


def _listed(path: Path) -> set[str]:
    """Stems (or file names) of a split list: the first word of each line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TransferKitError(f"split list {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise TransferKitError(f"cannot read split list {path}: {exc.strerror}") from None
    return {Path(ln.split()[0]).stem for ln in text.splitlines() if ln.strip()}


def _image_root(paths: list[Path], images: Path | None, default: Path | None) -> Path:
    """The folder every image's file_name is relative to: --images, JPEGImages/, else their common folder."""
    for folder in (images, default):
        if folder is not None and all(p.is_relative_to(os.path.abspath(folder)) for p in paths):
            return folder
    if paths:
        return Path(os.path.commonpath([str(p.parent) for p in paths]))
    return images or default or Path(".")


def convert_voc(root: str | Path, split: str | None = None, classes: list[str] | None = None,
                keep_difficult: bool = False, images: str | Path | None = None, val_fraction: float | None = None,
                seed: int = 0) -> CocoDataset:
    """`root` is a VOC year folder or a folder of VOC XMLs. `split`: a VOC year folder's
    ImageSets/Main/<split>.txt, a list file of image stems, or a sub-folder of `root`; with
    `val_fraction`, `train` or `val` of a seeded split of the images (by image id)."""
    root = Path(root)
    images = Path(images) if images else None
    if not root.is_dir():
        raise TransferKitError(f"VOC annotations not found: {root} (give a VOC year folder or a folder of XMLs)")
    if images is not None and not images.is_dir():
        raise TransferKitError(f"the image folder {images} (--images, data.train_images) is not a folder")
    year = is_year_folder(root)
    if val_fraction is not None and split not in ("train", "val"):
        raise TransferKitError(f"a split by fraction ({val_fraction}) needs the part to keep: --split train or "
                               f"--split val, not {split!r}")
    keep: set[str] | None = None  # stems kept by a list file
    scan = root / "Annotations" if year else root
    if split and val_fraction is None:
        listing = root / "ImageSets" / "Main" / f"{split}.txt" if year else Path(split)
        if year and not listing.is_file() and Path(split).is_file():
            listing = Path(split)
        if listing.is_file():
            keep = _listed(listing)
        elif not year and (root / split).is_dir():
            scan = root / split
            if images is not None and (images / split).is_dir():
                images = images / split
        elif year:
            raise TransferKitError(f"split list not found: {listing}")
        else:
            raise TransferKitError(f"split {split!r} is neither a list file nor a folder under {root}; give one, "
                                   "or a validation fraction")
    if year and keep is not None:
        files = [scan / f"{s}.xml" for s in sorted(keep)]
    else:
        files = sorted(scan.rglob("*.xml"))
    if not files and images is None:
        raise TransferKitError(f"{root} holds no VOC XML files; give a VOC year folder or a folder of XMLs")

    entries: list[_Entry] = []
    out_skips: list[tuple[str, str, str]] = []
    for xml in files:
        node = _parse(xml)
        image, looked = _find_image(xml, node, root, images)
        if image is None:
            if year:  # VOC's own layout: the image belongs in JPEGImages/ (`data check` reports it missing)
                name = (node.findtext("filename") or f"{xml.stem}.jpg").strip()
                image = root / "JPEGImages" / name
            else:
                shown = ", ".join(list(dict.fromkeys(str(p.parent) for p in looked))[:4])  # 4 folders, each once
                out_skips.append((str(xml), "image", f"its image is not found (looked in {shown}); "
                                  "give --images (data.train_images) for the image folder"))
                continue
        entries.append(_Entry(xml, node, image))
    if keep is not None and not year:
        entries = [e for e in entries if e.image.stem in keep or e.xml.stem in keep]
    annotated = {e.image.resolve() for e in entries}
    if images is not None:  # images no XML names: backgrounds
        for path in image_files(images):
            if path.resolve() not in annotated and (keep is None or path.stem in keep):
                entries.append(_Entry(None, None, path))

    full = {e.image: Path(os.path.abspath(e.image)) for e in entries}
    counts = Counter(full[e.image] for e in entries)
    twice = sorted(str(p) for p, n in counts.items() if n > 1)
    if twice:
        raise TransferKitError(f"{root}: several annotation files name the image {twice[0]!r}")
    image_root = _image_root(list(full.values()), images, root / "JPEGImages" if year else None)
    base = Path(os.path.abspath(image_root))
    file_names = {e.image: full[e.image].relative_to(base).as_posix() for e in entries}
    ids = stable_image_ids(list(file_names.values()))
    if val_fraction is not None:
        val_ids = seeded_val_ids(list(ids.values()), val_fraction, seed)
        entries = [e for e in entries if (ids[file_names[e.image]] in val_ids) == (split == "val")]

    names: list[str] = list(classes or [])
    if classes is None:
        for e in entries:
            for obj in e.node.iter("object") if e.node is not None else ():
                name = (obj.findtext("name") or "").strip()
                if name and name not in names:
                    names.append(name)
    out = CocoDataset(names if classes else sorted(names), image_root=image_root)
    for file, what, reason in out_skips:
        out.skip(file, what, reason)
    for e in sorted(entries, key=lambda e: ids[file_names[e.image]]):
        _add_entry(out, e, ids[file_names[e.image]], file_names[e.image], keep_difficult)
    return out


def _add_entry(out: CocoDataset, e: _Entry, image_id: int, file_name: str, keep_difficult: bool) -> None:
    xml, node = e.xml, e.node
    size = node.find("size") if node is not None else None
    try:
        width = int(_num(size, "width")) if size is not None else 0
        height = int(_num(size, "height")) if size is not None else 0
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        width, height = image_size(e.image)
    out.add_image(image_id, file_name, width, height)
    if node is None:
        return
    for n, obj in enumerate(node.findall("object"), 1):  # direct children: <part> boxes are not objects
        name = (obj.findtext("name") or "").strip()
        where = f"{xml} object {n}"
        if not name:  # a broken annotation, not a class left out on purpose
            out.skip(where, "object", "no class: <name> is empty or missing")
            continue
        if name not in out.categories:
            out.skip(where, "object", f"class {name!r} is not in the class list", "note")
            continue
        if (obj.findtext("difficult") or "0").strip() == "1" and not keep_difficult:
            out.skip(where, "difficult", f"{name} marked difficult", "note")
            continue
        box = obj.find("bndbox")
        try:
            if box is None:
                raise ValueError("no <bndbox>")
            xmin, ymin, xmax, ymax = (_num(box, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            out.skip(where, "object", str(exc))
            continue
        out.add_box(image_id, name, xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1, width, height, where)


def voc_split_exists(root: Path, split: str) -> bool:
    """Whether `split` names a list or a folder of the VOC data at `root` (else: split by fraction)."""
    if is_year_folder(root):
        return (root / "ImageSets" / "Main" / f"{split}.txt").is_file() or Path(split).is_file()
    return Path(split).is_file() or (root / split).is_dir()
