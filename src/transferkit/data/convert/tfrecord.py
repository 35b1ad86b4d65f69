"""TF Object Detection API TFRecords to COCO: the boxes as a COCO JSON, the encoded images as files.

Boxes are stored normalised (image/object/bbox/{xmin,ymin,xmax,ymax} in 0..1) and become pixels of
image/width x image/height (read from the image header when missing). Class names come from
image/object/class/text, ordered by image/object/class/label when there are labels (a label
without text is named by its number). `difficult` objects are left out unless kept, as for VOC.
Masks (image/object/mask: one PNG per object, or the older flat float list) become COCO RLE.
Each image is written as image/filename, else image/source_id, else `record-N`, with the suffix
of image/format, made unique with `-N` when two records share a name.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from transferkit.data.convert.coco import CocoDataset, stable_image_ids
from transferkit.data.images import IMAGE_SUFFIXES
from transferkit.data.tfrecord import DetectionExample, RecordSample, read_examples, read_label_map
from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write

FORMAT_SUFFIX = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png", "bmp": ".bmp", "gif": ".gif", "webp": ".webp"}


def expand_files(files: Iterable[str | Path], root: Path | None = None) -> list[Path]:
    """TFRecord paths, with glob patterns (train-*.tfrecord) expanded in sorted order. A file named
    twice (by two patterns, or by a pattern and its own name) is read once, where it first appears:
    read twice, its images would be in the data twice, perhaps on both sides of a validation split."""
    out: list[Path] = []
    for item in files:
        path = Path(item) if root is None or Path(item).is_absolute() else root / item
        if any(c in str(path.name) for c in "*?["):
            matches = sorted(path.parent.glob(path.name))
            if not matches:
                raise TransferKitError(f"no TFRecord file matches {path}")
            out += matches
        elif not path.is_file():
            raise TransferKitError(f"TFRecord file not found: {path}")
        else:
            out.append(path)
    if not out:
        raise TransferKitError("no TFRecord files given")
    first: dict[Path, Path] = {}  # each file by its resolved path, as first named
    for path in out:
        first.setdefault(path.resolve(), path)
    return list(first.values())


def _label_names(examples: list[tuple[Path, DetectionExample]]) -> dict[int, str]:
    """class/label -> its class/text (or the number, where a record gives no text)."""
    by_label: dict[int, str] = {}
    first: dict[int, str] = {}  # where each label was first named, for the error
    for path, ex in examples:
        for k, label in enumerate(ex.labels):
            text = ex.texts[k] if ex.texts else str(label)
            first.setdefault(label, f"{path} record {ex.index}")
            if by_label.setdefault(label, text) != text:
                raise TransferKitError(f"{path}: record {ex.index} names class/label {label} {text!r}, "
                                       f"{first[label]} named it {by_label[label]!r}; give --classes")
    return by_label


def _image_name(ex: DetectionExample, taken: set[str]) -> str:
    suffix = FORMAT_SUFFIX.get(ex.fmt, "")
    name = Path(ex.filename.replace("\\", "/")).name if ex.filename else ""
    if name in ("", ".."):  # Path(...).name is never "."
        stem = Path(ex.source_id.replace("\\", "/")).name if ex.source_id else ""
        name = stem if stem not in ("", "..") else f"record-{ex.index}"
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        name += suffix or ".jpg"
    # Compared without case: on macOS and Windows file systems A.png and a.png are one file.
    unique, k = name, 1
    while unique.casefold() in taken:
        k += 1
        unique = f"{Path(name).stem}-{k}{Path(name).suffix}"
    taken.add(unique.casefold())
    return unique


def _masks(ex: DetectionExample, height: int, width: int, where: str) -> list[dict | None]:
    """One COCO RLE per object from the record's masks (none when the record has no masks)."""
    n = len(ex.boxes)
    if not ex.masks:
        return [None] * n
    if isinstance(ex.masks[0], bytes):
        if len(ex.masks) != n:
            raise TransferKitError(f"{where}: {len(ex.masks)} masks for {n} boxes")
        arrays = []
        for m in ex.masks:
            try:
                with Image.open(io.BytesIO(m)) as im:
                    if im.size != (width, height):
                        raise TransferKitError(f"{where}: a mask is {im.size[0]}x{im.size[1]}, the image "
                                               f"{width}x{height}")
                    arrays.append(np.asarray(im.convert("L")) > 0)
            except (OSError, SyntaxError, ValueError) as exc:
                raise TransferKitError(f"{where}: undecodable mask ({exc})") from None
    else:
        if len(ex.masks) != n * height * width:
            raise TransferKitError(f"{where}: image/object/mask holds {len(ex.masks)} values, not "
                                   f"{n} x {height} x {width}")
        arrays = list(np.asarray(ex.masks, dtype=np.float32).reshape(n, height, width) > 0.5)
    out = []
    for a in arrays:
        rle = mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
        out.append({"size": [height, width], "counts": rle["counts"].decode("ascii")})
    return out


def read_tfrecord_dataset(files: list[Path], classes: list[str] | None = None, keep_difficult: bool = False,
                          images_out: Path | None = None, label_map: dict[int, str] | None = None
                          ) -> tuple[CocoDataset, dict[int, RecordSample]]:
    """The records of `files` as a COCO dataset, and where each image's record is (by image id). With
    `images_out`, the encoded images are written there (it must be new or empty); with `label_map`
    ({id: name}, read_label_map), class/label names the class and the categories follow the map."""
    if images_out is not None:
        if images_out.exists() and (not images_out.is_dir() or any(images_out.iterdir())):
            raise TransferKitError(f"--images {images_out} is not empty; the images of the records are written into "
                                   "a new or empty folder")
        images_out.mkdir(parents=True, exist_ok=True)
    examples, samples, taken = [], [], set()
    for path, ex, offset, length in read_examples(files):
        name = _image_name(ex, taken)
        if images_out is not None:
            if not ex.encoded:
                raise TransferKitError(f"{path}: record {ex.index} has no image/encoded")
            encoded = ex.encoded
            atomic_write(images_out / name, lambda tmp, data=encoded: tmp.write_bytes(data))
        if not ex.width or not ex.height:
            try:
                with Image.open(io.BytesIO(ex.encoded)) as im:
                    ex.width, ex.height = im.size
            except (OSError, SyntaxError, ValueError) as exc:
                raise TransferKitError(f"{path}: record {ex.index}: no image/width and height, and the image "
                                       f"does not decode ({exc})") from None
        ex.masks = _masks(ex, ex.height, ex.width, f"{path}: record {ex.index}")
        ex.encoded = b""  # only the boxes are kept in memory
        examples.append((path, ex, name))
        samples.append(RecordSample(path, offset, length, ex.index, name))
    if label_map:
        by_label = dict(label_map)
        names = list(classes) if classes else [label_map[k] for k in sorted(label_map)]
    else:
        by_label = _label_names([(path, ex) for path, ex, _ in examples])
        if classes and not any(ex.texts for _, ex, _ in examples):  # labels only: ids count from 1
            by_label = {lb: classes[lb - 1] if 1 <= lb <= len(classes) else str(lb) for lb in by_label}
        names = list(classes) if classes else ([by_label[k] for k in sorted(by_label)] if by_label else
                                               sorted({t for _, ex, _ in examples for t in ex.texts}))
    out = CocoDataset(names, image_root=images_out)
    ids = stable_image_ids([name for _, _, name in examples])
    located = {}
    for (path, ex, name), sample in zip(examples, samples, strict=True):
        image_id = ids[name]
        located[image_id] = sample
        out.add_image(image_id, name, ex.width, ex.height)
        for k, (x0, y0, x1, y1) in enumerate(ex.boxes):
            if ex.labels and (label_map or not ex.texts):
                cls = by_label.get(ex.labels[k], f"label {ex.labels[k]}")
            else:
                cls = ex.texts[k]
            obj = f"{path} record {ex.index} object {k + 1}"
            if cls not in out.categories:
                out.skip(obj, "object", f"class {cls!r} is not in the class list", "note")
                continue
            if ex.difficult and ex.difficult[k] and not keep_difficult:
                out.skip(obj, "difficult", f"{cls} marked difficult", "note")
                continue
            w, h = ex.width, ex.height
            # is_crowd becomes COCO's iscrowd: evaluation ignores detections on the region, training leaves it out
            out.add_box(image_id, cls, x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h, w, h, obj,
                        iscrowd=1 if ex.crowd and ex.crowd[k] else 0, segmentation=ex.masks[k])
    return out, located


def convert_tfrecord(files: Iterable[str | Path], images: str | Path | None, classes: list[str] | None = None,
                     keep_difficult: bool = False, label_map: str | Path | None = None) -> CocoDataset:
    """`data convert --from tfrecord FILE... --images DIR`: the COCO dataset, images written into DIR."""
    if images is None:
        raise TransferKitError("--from tfrecord needs --images DIR: the records' images are written there")
    names = read_label_map(label_map) if label_map else None
    dataset, _ = read_tfrecord_dataset(expand_files(files), classes, keep_difficult, Path(images), names)
    return dataset
