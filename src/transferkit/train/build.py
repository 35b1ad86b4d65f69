"""Everything a run needs before its first step: device, seeds, data, model with pretrained weights."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.config import Config, DataConfig
from transferkit.data.check import startup_check
from transferkit.data.classification import FolderSplit, ImageDataset, decode_all, list_classes, scan_split
from transferkit.data.lists import classes_file_of, read_classes, read_list
from transferkit.data.shards import read_index, read_sample
from transferkit.data.transforms import eval_transform, pil_resample, resize_size, train_transform
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier, restore_pretrained
from transferkit.models.heads import init_head, init_head_from_classes
from transferkit.models.init import apply_init_rules
from transferkit.models.registry import Family, Preprocessing
from transferkit.weights.formats import read_weights
from transferkit.weights.sources import resolve_source
from transferkit.weights.transfer import TransferReport

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TransferKitError("device=cuda was asked for but no CUDA GPU is available; use device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        worker_init_fn=_seed_worker if num_workers else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        drop_last=False,
    )


@dataclass
class ClassificationData:
    classes: list[str]
    train: FolderSplit | None
    val: FolderSplit
    train_set: ImageDataset | None
    val_set: ImageDataset


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


def resolve_num_classes(cfg: Config, classes: list[str]) -> int:
    if cfg.model.num_classes == "auto":
        return len(classes)
    if cfg.model.num_classes != len(classes):
        raise TransferKitError(
            f"model.num_classes is {cfg.model.num_classes} but {cfg.data.root} has {len(classes)} classes; "
            "set model.num_classes=auto"
        )
    return cfg.model.num_classes


def build_model(cfg: Config, num_classes: int, restore: bool = True) -> tuple[nn.Module, Family, TransferReport | None]:
    """The model as the config builds it before any step: architecture, pretrained restore, head init."""
    torch.manual_seed(cfg.seed)  # the new head's initialisation is part of the run's seed
    model, family = create_classifier(cfg.model.name, num_classes, cfg.model.drop_rate)
    report = restore_pretrained(model, family, cfg.pretrained) if restore else None
    restored = [e.target for e in report.by_status("loaded")] if report else []
    initialised = init_head(model, family.head_patterns, cfg.model.head_init, skip=restored)
    if report is not None:
        report.note_init(initialised, cfg.model.head_init)
    if cfg.model.init:
        apply_init_rules(model, cfg.model.init, report, lambda src: read_weights(resolve_source(src)).tensors)
    return model, family, report


def build_classifier(cfg: Config, classes: list[str], restore: bool = True
                     ) -> tuple[nn.Module, Family, TransferReport | None]:
    """build_model for a dataset's classes, with head rows started from source classes when asked."""
    model, family, report = build_model(cfg, resolve_num_classes(cfg, classes), restore)
    if report is not None and cfg.pretrained.head_init is not None:
        init_head_from_classes(model, report, classes, cfg.pretrained.head_init.from_classes, cfg.model.head_init)
    return model, family, report

