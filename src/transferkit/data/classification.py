"""Classification data: the splits of a dataset (class folders, list files or packed shards), decoded
once, as datasets and loaders.

ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg; or list files (data.format: list); or shards
packed by `transferkit data pack` (data.format: shards).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from transferkit.config import DataConfig
from transferkit.data.check import startup_check
from transferkit.data.folders import FolderSplit, list_classes, scan_split
from transferkit.data.images import BadImage, shrink_shorter_side
from transferkit.data.lists import classes_file_of, read_classes, read_list
from transferkit.data.shards import read_index, read_sample
from transferkit.data.transforms import eval_transform, pil_resample, resize_size, train_transform
from transferkit.errors import TransferKitError
from transferkit.preprocessing import Preprocessing
from transferkit.progress import track

log = logging.getLogger(__name__)


def decode_all(
    split: FolderSplit,
    on_bad_image: str,
    keep_size: int | None,
    resample: int,
) -> list[Image.Image | None]:
    """Decode every image once: bad files are found now rather than at epoch 3. With `keep_size`,
    keep the decoded images in memory with the shorter side at most `keep_size`."""
    cache: list[Image.Image | None] = []
    good: list[tuple[Path, int]] = []
    for path, label in track(split.samples, f"reading {split.root.name}"):
        try:
            im = split.load(path)
        except BadImage as exc:
            if on_bad_image == "error":
                raise TransferKitError(
                    f"cannot decode image {path}: {exc}; remove or replace it, or set data.on_bad_image=skip"
                ) from None
            split.bad.append((path, str(exc)))
            log.warning("skipping undecodable image %s: %s", path, exc)
            continue
        good.append((path, label))
        cache.append(shrink_shorter_side(im, keep_size, resample) if keep_size else None)
    split.samples = good
    if not good:
        raise TransferKitError(f"{split.root}: none of the images could be decoded")
    return cache


class ImageDataset(Dataset):
    """(image tensor, label) pairs from a FolderSplit, decoded from memory or from disk."""

    def __init__(self, split: FolderSplit, transform: Callable, cache: list[Image.Image | None] | None = None):
        self.split = split
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, index: int):
        path, label = self.split.samples[index]
        im = self.cache[index] if self.cache is not None and self.cache[index] is not None else None
        if im is None:
            try:
                im = self.split.load(path)
            except BadImage as exc:  # changed on disk since it was read
                raise TransferKitError(f"cannot decode image {path}: {exc}") from None
        return self.transform(im), label


@dataclass
class ClassificationData:
    classes: list[str]
    train: FolderSplit | None
    val: FolderSplit
    train_set: ImageDataset | None
    val_set: ImageDataset


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                shard: tuple[int, int] | None = None) -> DataLoader:
    """A loader whose order comes from its own generator (seeded), so a resume can restore it. With
    `shard` (rank, world: several processes), this rank's part of the order that a DistributedSampler
    draws from the seed and the epoch (`loader.sampler.set_epoch`)."""
    sampler = None
    if shard is not None:
        sampler = DistributedSampler(dataset, num_replicas=shard[1], rank=shard[0], shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=_seed_worker if num_workers else None,
        generator=torch.Generator().manual_seed(seed),
        # Workers start afresh each epoch, seeded (their augmentations) from the loader's generator as
        # the epoch begins, the state a resume restores; persistent workers would carry their random
        # state over from earlier epochs, which a resume cannot rebuild.
        persistent_workers=False,
        drop_last=False,
    )


def _list_file(cfg: DataConfig, split: str) -> Path:
    path = cfg.train_list if split == "train" else cfg.val_list
    if path is None:
        raise TransferKitError(f"data.format=list needs data.{split}_list (a file written by `transferkit data list`)")
    return path


def dataset_classes(cfg: DataConfig, need_train: bool = True) -> list[str]:
    """Class names: the training split's folders (the validation split's when only evaluating), or
    for list files the classes file."""
    root = cfg.root
    if not root.is_dir():
        raise TransferKitError(f"data.root not found: {root} (a folder holding train/ and val/)")
    if cfg.format == "list":
        path = cfg.classes_file or classes_file_of(_list_file(cfg, "train"))
        if not path.is_file():
            raise TransferKitError(f"classes file not found: {path}; set data.classes_file")
        return read_classes(path)
    if cfg.format == "shards":
        index = read_index(root / ("train" if need_train or (root / "train").is_dir() else "val"))
        if index.task != "classification":
            raise TransferKitError(f"{index.root} holds {index.task} shards; this run trains a classifier")
        return index.classes
    if need_train or (root / "train").is_dir():
        return list_classes(root / "train")
    return list_classes(root / "val")


def load_classification_data(
    cfg: DataConfig, pre: Preprocessing, classes: list[str], need_train: bool = True
) -> ClassificationData:
    train_root, val_root = cfg.root / "train", cfg.root / "val"
    eval_size = cfg.eval_image_size or cfg.image_size
    keep = resize_size(max(cfg.image_size, eval_size), pre) if cfg.cache else None
    resample = pil_resample(pre)

    def split_of(name: str, folder: Path) -> FolderSplit:
        if cfg.format == "shards":
            index = read_index(folder)
            if index.classes != classes:
                raise TransferKitError(f"{folder} was packed with classes {index.classes}, the run has {classes}")
            # Packed images are checked when packed: without the cache, nothing is decoded up front.
            load = partial(read_sample, draft=resize_size(max(cfg.image_size, eval_size), pre))
            return FolderSplit(folder, classes, list(zip(index.samples, index.labels(), strict=True)), load=load)
        if cfg.format == "list":
            return FolderSplit(cfg.root, classes, read_list(_list_file(cfg, name), cfg.root, len(classes)))
        return scan_split(folder, classes)

    train = train_set = None
    if need_train:
        train = split_of("train", train_root)
        cache = decode_all(train, cfg.on_bad_image, keep, resample) if cfg.cache or cfg.format != "shards" else None
        for warning in startup_check(str(train.root), classes, [label for _, label in train.samples]):
            log.warning("%s: %s", train.root, warning)
        tf = train_transform(cfg.image_size, pre, cfg.crop_scale, cfg.hflip)
        train_set = ImageDataset(train, tf, cache if cfg.cache else None)
    val = split_of("val", val_root)
    cache = decode_all(val, cfg.on_bad_image, keep, resample) if cfg.cache or cfg.format != "shards" else None
    val_set = ImageDataset(val, eval_transform(eval_size, pre), cache if cfg.cache else None)
    for split in (train, val):
        if split is not None and split.bad:
            log.warning("%s: skipped %d undecodable image(s)", split.root, len(split.bad))
    return ClassificationData(classes, train, val, train_set, val_set)
