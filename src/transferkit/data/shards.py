"""Packed shards: images (optionally shrunk and re-encoded) in WebDataset-compatible tar files.

What im2rec's record files do for MXNet, in a format other tools read: each sample is a run of tar
members sharing a key (`<key>.jpg` plus `<key>.cls` with the class index, or `<key>.json` with the
boxes), so `webdataset` and `tar` read the shards as they are. Beside them, `index.json` records
where every image's bytes sit in which shard; training reads samples by index with one seek, so
any sampler works (shuffling over the whole set, DataLoader workers, DistributedSampler) and resume
stays exact. The index is written last: a folder without one is not a finished pack.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from transferkit.data.coco import read_coco
from transferkit.data.folders import list_classes
from transferkit.data.images import BadImage, image_files, load_rgb, open_image, shrink_shorter_side
from transferkit.data.lists import read_labelled_list
from transferkit.errors import TransferKitError, one_line
from transferkit.fileio import write_json
from transferkit.outputs import OutputFolder, output_folder
from transferkit.progress import track

INDEX = "index.json"
INDEX_FORMAT = "transferkit-shards/1"


@dataclass(frozen=True)
class ShardSample:
    """Where one image's bytes are: a shard file, an offset and a length."""

    shard: Path
    offset: int
    size: int
    key: str

    def __str__(self) -> str:  # how a bad sample is named in messages
        return f"{self.shard}:{self.key}"


def sample_bytes(sample: ShardSample) -> bytes:
    with open(sample.shard, "rb") as fh:  # a handle per read: safe in forked DataLoader workers
        available = os.fstat(fh.fileno()).st_size - sample.offset
        if sample.size > available:  # checked first: a read allocates the size it is asked for
            raise BadImage(f"shard ends early ({max(available, 0)} of {sample.size} bytes)")
        fh.seek(sample.offset)
        data = fh.read(sample.size)
    if len(data) != sample.size:
        raise BadImage(f"shard ends early ({len(data)} of {sample.size} bytes)")
    return data


def read_sample(sample: ShardSample, draft: int | None = None) -> Image.Image:
    return load_rgb(io.BytesIO(sample_bytes(sample)), draft)


@dataclass
class PackResult:
    out: Path
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    left_out: list[tuple[str, str]] = field(default_factory=list)


def _upright_size(path: Path) -> tuple[int, int]:
    """The size after the EXIF orientation is applied, as load_rgb returns it, read from the header."""
    with open_image(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _encode(path: Path, resize: int | None, quality: int) -> tuple[bytes, str, tuple[int, int], float]:
    """Image bytes to store, their suffix, the (upright) stored size, and the scale applied to boxes."""
    im = load_rgb(path, draft=resize)  # also refuses what would not decode later
    if resize is None:
        return path.read_bytes(), path.suffix.lower().lstrip(".") or "jpg", im.size, 1.0
    small = shrink_shorter_side(im, resize, Image.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), "jpg", small.size, small.size[0] / _upright_size(path)[0]


class _ShardWriter:
    """Shards of about `shard_bytes` each, written as NAME.part and renamed when complete."""

    def __init__(self, out: Path, shard_bytes: int, on_close=None):
        self.out, self.shard_bytes, self.on_close = out, shard_bytes, on_close
        self.files: list[dict] = []
        self.tar: tarfile.TarFile | None = None

    def add(self, key: str, members: list[tuple[str, bytes]]) -> tuple[int, int]:
        """Write one sample's members; returns (shard number, offset of the first member's bytes)."""
        if self.tar is None or self.tar.offset >= self.shard_bytes:
            self.close()
            name = f"shard-{len(self.files):06d}.tar"
            self.out.mkdir(parents=True, exist_ok=True)
            self.tar = tarfile.open(self.out / f"{name}.part", "w", format=tarfile.USTAR_FORMAT)
            self.files.append({"file": name, "samples": 0})
        offset = None
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: same input, same bytes
            start = self.tar.offset
            self.tar.addfile(info, io.BytesIO(data))
            if offset is None:
                offset = start + len(info.tobuf(tarfile.USTAR_FORMAT))
        self.files[-1]["samples"] += 1
        return len(self.files) - 1, offset

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            name = self.files[-1]["file"]
            os.replace(self.out / f"{name}.part", self.out / name)
            self.tar = None
            if self.on_close:
                self.on_close(self.out / name)


def _samples_of(source: Path, root: Path | None, images: Path | None) -> tuple[str, list[str], list[dict]]:
    """(task, classes, [{"path", "label"} or {"path", "image"(coco entry), "annotations"}])."""
    if source.suffix == ".json":
        coco = read_coco(source)
        if images is None:
            raise TransferKitError(f"packing {source} needs --images FOLDER (where its file_names are)")
        by_image = coco.annotations_by_image()
        index = {c["id"]: i for i, c in enumerate(coco.categories)}
        items = [{"path": images / img["file_name"], "image": img,
                  "annotations": [{"bbox": a["bbox"], "label": index[a["category_id"]], "iscrowd": a["iscrowd"]}
                                  for a in by_image[img["id"]]]} for img in coco.images]
        return "detection", coco.category_names, items
    if source.suffix == ".lst":
        classes, pairs = read_labelled_list(source, root or source.parent)
        return "classification", classes, [{"path": p, "label": label} for p, label in pairs]
    if source.is_dir():
        classes = list_classes(source)
        items = [{"path": f, "label": label} for label, name in enumerate(classes) for f in image_files(source / name)]
        return "classification", classes, items
    raise TransferKitError(f"cannot pack {source}: give a class folder, a .lst list file or a COCO .json")


def pack(source: str | Path, out: str | Path, resize: int | None = None, quality: int = 90,
         shard_mb: float = 256.0, root: str | Path | None = None, images: str | Path | None = None,
         force: bool = False) -> PackResult:
    """Shards and index.json into `out`. An existing pack there, or shard files transferkit did not
    write, are not replaced unless `force` (outputs.py)."""
    source, out = Path(source), Path(out)
    if not 1 <= quality <= 100:
        raise TransferKitError(f"--quality {quality} must be 1..100")
    if resize is not None and resize < 8:
        raise TransferKitError(f"--resize {resize} is too small (the shorter side in pixels)")
    task, classes, items = _samples_of(source, Path(root) if root else None, Path(images) if images else None)
    if (out / INDEX).exists() and not force:
        raise TransferKitError(f"{out} already holds a pack; choose another --out, or add --force to replace it")
    with output_folder(out, force) as folder:
        folder.claim([out / INDEX, *sorted(out.glob("shard-*.tar"))])
        return _pack_into(folder, source, out, task, classes, items, resize, quality, shard_mb)


def _pack_into(folder: OutputFolder, source: Path, out: Path, task: str, classes: list[str], items: list[dict],
               resize: int | None, quality: int, shard_mb: float) -> PackResult:
    start = time.perf_counter()
    result = PackResult(out)
    writer = _ShardWriter(out, int(shard_mb * 1024 * 1024), on_close=folder.wrote)
    records = []
    for n, item in enumerate(track(items, f"packing {source.name}")):
        try:
            data, suffix, size, scale = _encode(item["path"], resize, quality)
        except BadImage as exc:
            result.left_out.append((str(item["path"]), str(exc)))
            continue
        key = f"{n:08d}"
        record = {"key": key, "source": str(item["path"].name)}
        if task == "classification":
            meta = ("cls", str(item["label"]).encode())
            record["label"] = item["label"]
        else:
            anns = [{**a, "bbox": [round(v * scale, 3) for v in a["bbox"]]} for a in item["annotations"]]
            record.update(width=size[0], height=size[1], annotations=anns)
            meta = ("json", json.dumps({"width": size[0], "height": size[1], "annotations": anns}).encode())
        shard, offset = writer.add(key, [(suffix, data), meta])
        record.update(shard=shard, offset=offset, size=len(data))
        records.append(record)
        result.bytes += len(data)
    writer.close()
    if not records:
        raise TransferKitError(f"nothing to pack from {source}: no image could be read")
    for stale in folder.stale(out, "shard-*.tar", {out / f["file"] for f in writer.files}):
        stale.unlink()  # ours, from a larger pack this one replaces
        folder.forget(stale)
    write_json(out / INDEX, {"format": INDEX_FORMAT, "task": task, "classes": classes, "resize": resize,
                             "shards": writer.files, "samples": records})
    folder.wrote(out / INDEX)
    result.samples, result.shards, result.seconds = len(records), len(writer.files), time.perf_counter() - start
    return result


@dataclass
class ShardIndex:
    root: Path
    task: str
    classes: list[str]
    samples: list[ShardSample]
    records: list[dict]

    def labels(self) -> list[int]:
        return [r["label"] for r in self.records]


def read_index(folder: str | Path) -> ShardIndex:
    folder = Path(folder)
    path = folder / INDEX
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TransferKitError(f"{folder} is not a finished pack (no {INDEX}); run `transferkit data pack`") from None
    except (OSError, ValueError) as exc:
        raise TransferKitError(f"{path}: unreadable ({exc}); pack again") from None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise TransferKitError(f"{path}: not a transferkit shard index ({INDEX_FORMAT})")
    try:
        files = [folder / s["file"] for s in data["shards"]]
        for f in files:
            if Path(f.name) != Path(f.relative_to(folder)) or not f.is_file():
                raise TransferKitError(f"{path}: shard {f.name} is missing; pack again")
        samples = []
        for r in data["samples"]:
            shard, offset, size = int(r["shard"]), int(r["offset"]), int(r["size"])
            if not (0 <= shard < len(files) and offset >= 0 and size >= 0):  # a negative shard would index from the end
                raise ValueError(f"sample {str(r.get('key'))[:40]!r} names no place in a shard")
            samples.append(ShardSample(files[shard], offset, size, str(r["key"])))
        return ShardIndex(folder, data["task"], [str(c) for c in data["classes"]], samples, data["samples"])
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as exc:
        raise TransferKitError(f"{path}: damaged index ({type(exc).__name__}: {one_line(exc)}); pack again") from None

