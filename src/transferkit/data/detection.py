"""Detection datasets: COCO JSON, Pascal VOC, TFRecords or packed shards, boxes moved with the image by the transforms.

Each image becomes a record (path, size, boxes in xyxy pixels, 0-based class indices, crowd flags).
Crowd regions are left out of training targets, as torchvision's references do, and kept in the
evaluation ground truth, where detections on them are neither right nor wrong (COCO's rule).
Resizing is the detector's own (shorter side one of detection.min_size, drawn per image in training);
with data.cache the images are decoded once and kept at that size, boxes scaled with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from transferkit.config import DataConfig, DetectionConfig
from transferkit.data.coco import guess_image_folder, read_coco
from transferkit.data.convert.tfrecord import expand_files, read_tfrecord_dataset
from transferkit.data.convert.voc import convert_voc, voc_split_exists
from transferkit.data.images import BadImage, decoded_from, load_rgb
from transferkit.data.lists import seeded_val_ids
from transferkit.data.shards import ShardSample, read_index, read_sample
from transferkit.data.tfrecord import RecordSample, read_label_map, read_record_image
from transferkit.errors import TransferKitError
from transferkit.progress import track


@dataclass
class DetectionRecord:
    image_id: int
    path: Path | ShardSample | RecordSample
    width: int
    height: int
    boxes: torch.Tensor  # [N, 4] xyxy, pixels of the original image
    labels: torch.Tensor  # [N] 0-based class index
    crowd: torch.Tensor  # [N] bool
    polygons: list[list[list[float]]] = field(default_factory=list)  # per box: COCO polygons (flat x, y)


@dataclass
class DetectionSplit:
    name: str
    classes: list[str]
    records: list[DetectionRecord]
    bad: list[tuple[Path, str]] = field(default_factory=list)
    without_boxes: int = 0  # training images left out for holding no box (detection.skip_empty)

    def drop_images_without_boxes(self) -> None:
        """Leave out the images with no box to train on (none, or crowd regions only, which training
        ignores), as Detectron2 (FILTER_EMPTY_ANNOTATIONS) and torchvision's reference do: they add
        steps but no object. For training splits only: evaluation must see every image."""
        kept = [r for r in self.records if bool((~r.crowd).any())]
        self.without_boxes += len(self.records) - len(kept)
        self.records = kept

    def coco_ground_truth(self) -> dict:
        """The split as a COCO dict (category ids 1..C in class order), for evaluation."""
        images, anns = [], []
        for r in self.records:
            name = r.path.name if isinstance(r.path, Path) else r.path.key
            images.append({"id": r.image_id, "file_name": name, "width": r.width, "height": r.height})
            for k, (box, label, crowd) in enumerate(zip(r.boxes.tolist(), r.labels.tolist(), r.crowd.tolist(),
                                                        strict=True)):
                w, h = box[2] - box[0], box[3] - box[1]
                x0, y0, x1, y1 = box  # an object without polygons is scored by its box (mask evaluation)
                polygons = r.polygons[k] if k < len(r.polygons) and r.polygons[k] else [
                    [x0, y0, x1, y0, x1, y1, x0, y1]]
                anns.append({"id": len(anns) + 1, "image_id": r.image_id, "category_id": label + 1,
                             "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(crowd),
                             "segmentation": polygons})
        return {"images": images, "annotations": anns,
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.classes)]}


def _xyxy(anns: list[dict]) -> torch.Tensor:
    """COCO [x, y, w, h] boxes as an [N, 4] xyxy tensor."""
    return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                        dtype=torch.float32).reshape(-1, 4)


def _records_from_coco(images: list[dict], annotations: list[dict], category_names: dict[int, str],
                       classes: list[str], image_root: Path) -> list[DetectionRecord]:
    index = {name: i for i, name in enumerate(classes)}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in images}
    for ann in annotations:
        name = category_names[ann["category_id"]]
        if name in index:
            by_image[ann["image_id"]].append(ann)
    records = []
    for img in images:
        anns = by_image[img["id"]]
        boxes = _xyxy(anns)
        labels = torch.tensor([index[category_names[a["category_id"]]] for a in anns], dtype=torch.int64)
        crowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool)
        polygons = [_polygons(a.get("segmentation")) for a in anns]
        records.append(DetectionRecord(img["id"], image_root / img["file_name"], img["width"], img["height"],
                                       boxes, labels, crowd, polygons))
    return records


def _polygons(segmentation) -> list[list[float]]:
    """COCO polygon segmentation as lists of flat x, y; anything else (RLE, none) as no polygon."""
    if not isinstance(segmentation, list):
        return []
    return [[float(v) for v in poly] for poly in segmentation
            if isinstance(poly, list) and len(poly) >= 6 and all(isinstance(v, (int, float)) for v in poly)]


def rasterise(polygons: list[list[list[float]]], boxes: torch.Tensor, size: tuple[int, int],
              scale: float) -> torch.Tensor:
    """One mask per object at `size` (width, height): its polygons filled, or its box where it has none."""
    masks = torch.zeros((len(polygons), size[1], size[0]), dtype=torch.uint8)
    for i, polys in enumerate(polygons):
        canvas = Image.new("L", size, 0)
        draw = ImageDraw.Draw(canvas)
        if polys:
            for poly in polys:
                draw.polygon([v * scale for v in poly], fill=1)
        else:
            draw.rectangle((boxes[i] * scale).tolist(), fill=1)
        masks[i] = torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy())
    return masks


def _read_coco_split(ann: Path, images: Path | None, wanted: list[str] | None) -> tuple[list[str], list]:
    coco = read_coco(ann)
    errors = [p for p in coco.problems if p.error]
    if errors:
        first = errors[0]
        raise TransferKitError(f"{ann}: {first.kind}: {first.where}: {first.detail} "
                               f"({len(errors)} such problem(s); `transferkit data check` lists them)")
    names = {c["id"]: c["name"] for c in coco.categories}
    classes = _pick_classes(coco.category_names, wanted, ann)
    root = images or guess_image_folder(ann)
    return classes, _records_from_coco(coco.images, coco.annotations, names, classes, root)


def _pick_classes(available: list[str], wanted: list[str] | None, where: Path) -> list[str]:
    if not wanted:
        return list(available)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise TransferKitError(f"data.classes: {', '.join(unknown)} not among the categories of {where}")
    return list(wanted)


def _read_voc_split(cfg: DataConfig, split: str | None, wanted: list[str] | None,
                    images: Path | None) -> tuple[list[str], list]:
    dataset = convert_voc(cfg.root, split, wanted, images=images)
    missing = [s for s in dataset.skipped if s["what"] == "image"]
    if missing:
        raise TransferKitError(f"{missing[0]['file']}: {missing[0]['reason']} ({len(missing)} such file(s); "
                               "`transferkit data check` lists them)")
    names = {i + 1: n for i, n in enumerate(dataset.categories)}
    return dataset.categories, _records_from_coco(dataset.images, dataset.annotations, names, dataset.categories,
                                                  dataset.image_root)


def _read_tfrecord_split(cfg: DataConfig, files: list[str], wanted: list[str] | None) -> tuple[list[str], list]:
    """TFRecord files read in place: boxes from a scan of every record, images read back by byte offset."""
    label_map = read_label_map(cfg.label_map) if cfg.label_map else None
    dataset, located = read_tfrecord_dataset(expand_files(files, cfg.root), label_map=label_map)
    names = {i + 1: n for i, n in enumerate(dataset.categories)}
    classes = _pick_classes(dataset.categories, wanted, Path(files[0]))
    records = _records_from_coco(dataset.images, dataset.annotations, names, classes, Path())
    for r in records:
        r.path = located[r.image_id]
    return classes, records


def load_detection_splits(cfg: DataConfig, need_train: bool = True) -> tuple[list[str], DetectionSplit | None,
                                                                               DetectionSplit]:
    """The classes and the train and val splits the data section describes."""
    if cfg.format == "voc":
        # without the split (a list or a folder), the whole folder is split by val_fraction
        split = cfg.train_split if cfg.val_fraction is None or voc_split_exists(cfg.root, cfg.train_split) else None
        classes, train = _read_voc_split(cfg, split, cfg.classes, cfg.train_images)
        if cfg.val_fraction is None:
            _, val = _read_voc_split(cfg, cfg.val_split, classes, cfg.val_images or cfg.train_images)
        else:
            train, val = _split(train, cfg.val_fraction, cfg.split_seed)
    elif cfg.format == "tfrecord":
        if not cfg.train_records:
            raise TransferKitError("data.format=tfrecord needs data.train_records (TFRecord files or globs)")
        classes, train = _read_tfrecord_split(cfg, cfg.train_records, cfg.classes)
        if cfg.val_records:
            _, val = _read_tfrecord_split(cfg, cfg.val_records, classes)
        elif cfg.val_fraction is not None:
            train, val = _split(train, cfg.val_fraction, cfg.split_seed)
        else:
            raise TransferKitError("give data.val_records, or data.val_fraction to split the training records")
    elif cfg.format == "coco":
        if cfg.train_ann is None:
            raise TransferKitError("data.format=coco needs data.train_ann (a COCO instances JSON)")
        classes, train = _read_coco_split(cfg.train_ann, cfg.train_images, cfg.classes)
        if cfg.val_ann is not None:
            _, val = _read_coco_split(cfg.val_ann, cfg.val_images, classes)
        elif cfg.val_fraction is not None:
            train, val = _split(train, cfg.val_fraction, cfg.split_seed)
        else:
            raise TransferKitError("give data.val_ann, or data.val_fraction to split the training images")
    elif cfg.format == "shards":
        classes, train = _read_shard_split(cfg.root / "train", cfg.classes)
        _, val = _read_shard_split(cfg.root / "val", classes)
    else:
        raise TransferKitError(f"task detection reads data.format coco, voc, tfrecord or shards, not {cfg.format!r}")
    return classes, DetectionSplit("train", classes, train) if need_train else None, DetectionSplit(
        "val", classes, val)


def _read_shard_split(folder: Path, wanted: list[str] | None) -> tuple[list[str], list]:
    """A pack written by `transferkit data pack` from a COCO JSON: images read from the shards by offset."""
    index = read_index(folder)
    if index.task != "detection":
        raise TransferKitError(f"{folder} holds {index.task} shards; pack a COCO JSON for detection")
    classes = _pick_classes(index.classes, wanted, folder)
    keep = {index.classes.index(c): i for i, c in enumerate(classes)}
    records = []
    for n, (sample, rec) in enumerate(zip(index.samples, index.records, strict=True)):
        anns = [a for a in rec["annotations"] if a["label"] in keep]
        records.append(DetectionRecord(n + 1, sample, rec["width"], rec["height"], _xyxy(anns),
                                       torch.tensor([keep[a["label"]] for a in anns], dtype=torch.int64),
                                       torch.tensor([bool(a["iscrowd"]) for a in anns], dtype=torch.bool),
                                       [[] for _ in anns]))
    return classes, records


def _split(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split by image: the same seed and data give the same split on every machine."""
    val_ids = seeded_val_ids([r.image_id for r in records], fraction, seed)
    return [r for r in records if r.image_id not in val_ids], [r for r in records if r.image_id in val_ids]


def keep_scale(width: int, height: int, cfg: DetectionConfig) -> float:
    """The factor the detector's resize would apply at the largest min_size (never above 1)."""
    return min(1.0, max(cfg.min_size) / min(width, height), cfg.max_size / max(width, height))


class DetectionDataset(Dataset):
    """(image tensor in [0, 1], target {boxes, labels, image_id, scale}) per record. Boxes are in
    the pixels of the image handed out; `scale` maps them back to the original image."""

    def __init__(self, split: DetectionSplit, det: DetectionConfig, train: bool, cache: bool, label_offset: int,
                 on_bad_image: str = "skip", masks: bool = False):
        self.split, self.label_offset, self.train, self.masks = split, label_offset, train, masks
        self.det = det
        steps: list = []
        if train and det.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(det.hflip))
        if train and det.color_jitter > 0:
            j = det.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
        self.transform = v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.cache: list[Image.Image] | None = None
        if cache:
            self.cache = []
            good = []
            for r in track(split.records, f"reading {split.name}"):
                try:
                    self.cache.append(self._load(r))
                except BadImage as exc:
                    if on_bad_image == "error":
                        raise TransferKitError(f"cannot decode image {r.path}: {exc}; remove or replace it, or set "
                                               "data.on_bad_image=skip") from None
                    split.bad.append((r.path, str(exc)))
                    continue
                good.append(r)
            split.records = good
        if not split.records:
            raise TransferKitError(f"the {split.name} split holds no readable images")

    def _load(self, r: DetectionRecord) -> Image.Image:
        s = keep_scale(r.width, r.height, self.det)
        draft = math.ceil(min(r.width, r.height) * s)
        if isinstance(r.path, RecordSample):
            im = read_record_image(r.path, draft)
        else:
            im = read_sample(r.path, draft) if isinstance(r.path, ShardSample) else load_rgb(r.path, draft=draft)
        if not decoded_from(im.size, r.width, r.height):  # large photos come drafted
            raise BadImage(f"the image is {im.size[0]}x{im.size[1]}, the annotations say {r.width}x{r.height}")
        if s < 1.0:
            im = im.resize((max(1, round(r.width * s)), max(1, round(r.height * s))), Image.BILINEAR)
        return im

    @property
    def groups(self) -> list[int]:
        """Aspect-ratio group of each image (0: landscape or square, 1: portrait), for batching."""
        return [int(r.height > r.width) for r in self.split.records]

    def __len__(self) -> int:
        return len(self.split.records)

    def __getitem__(self, index: int):
        r = self.split.records[index]
        if self.cache is not None:
            im = self.cache[index]
        else:
            try:
                im = self._load(r)
            except BadImage as exc:
                raise TransferKitError(f"cannot decode image {r.path}: {exc}") from None
        scale = im.size[0] / r.width
        keep = ~r.crowd if self.train else torch.ones_like(r.crowd)
        boxes = tv_tensors.BoundingBoxes(r.boxes[keep] * scale, format="XYXY", canvas_size=(im.size[1], im.size[0]))
        target = {"labels": r.labels[keep] + self.label_offset, "image_id": r.image_id, "scale": scale}
        if self.masks:
            kept = [p for p, k in zip(r.polygons, keep.tolist(), strict=True) if k]
            masks = tv_tensors.Mask(rasterise(kept, r.boxes[keep], im.size, scale))
            image, boxes, masks = self.transform(im, boxes, masks)
            target["masks"] = masks.as_subclass(torch.Tensor)
        else:
            image, boxes = self.transform(im, boxes)
        target["boxes"] = boxes.as_subclass(torch.Tensor)
        return image, target


class GroupedBatchSampler(Sampler):
    """Batches of images from one aspect-ratio group (less padding), in an order drawn from `generator`.
    With `shard` (rank, world), every rank draws the same order of world x batch_size batches, the
    images of one step over every rank, as one process of that batch size would, and takes its
    share of each: a step sees the images it would in one process. A last, shorter batch of a group
    is shared as evenly as it goes, its first images taken again where some rank would get none."""

    def __init__(self, groups: list[int], batch_size: int, shuffle: bool, generator: torch.Generator,
                 shard: tuple[int, int] | None = None):
        self.groups, self.batch_size, self.shuffle, self.generator = groups, batch_size, shuffle, generator
        self.shard = shard

    def _mine(self, batches: list[list[int]]) -> list[list[int]]:
        if self.shard is None:
            return batches
        rank, world = self.shard
        mine = []
        for batch in batches:
            per_rank = -(-len(batch) // world)
            padded = (batch * world)[: per_rank * world]
            mine.append(padded[rank * per_rank:(rank + 1) * per_rank])
        return mine

    def _batches(self, draw: bool) -> list[list[int]]:
        n = len(self.groups)
        size = self.batch_size * (self.shard[1] if self.shard else 1)  # one step's images over every rank
        order = torch.randperm(n, generator=self.generator).tolist() if draw else list(range(n))
        batches = []
        for g in sorted(set(self.groups)):
            members = [i for i in order if self.groups[i] == g]
            batches += [members[i:i + size] for i in range(0, len(members), size)]
        if draw:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        return batches

    def __iter__(self):
        return iter(self._mine(self._batches(self.shuffle)))

    def __len__(self) -> int:
        return len(self._mine(self._batches(False)))

    def images(self) -> int:
        """The images of one pass (this rank's share of them), without drawing an order."""
        return sum(map(len, self._mine(self._batches(False))))


def collate(batch):
    return tuple(zip(*batch, strict=True))


def make_detection_loader(dataset: DetectionDataset, batch_size: int, shuffle: bool, num_workers: int,
                          seed: int, shard: tuple[int, int] | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = GroupedBatchSampler(dataset.groups, batch_size, shuffle, generator, shard)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      generator=generator, persistent_workers=False)  # as data/classification.make_loader
