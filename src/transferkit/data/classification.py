"""Class-per-folder datasets: ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from transferkit.data.images import IMAGE_SUFFIXES, BadImage, image_files, load_rgb, shrink_shorter_side
from transferkit.errors import TransferKitError
from transferkit.progress import track

log = logging.getLogger(__name__)


@dataclass
class FolderSplit:
    """A split's (image, label) pairs; an image is a file path, or a ShardSample read by `load`."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    bad: list[tuple[Path, str]] = field(default_factory=list)
    load: Callable = load_rgb


def list_classes(split_root: Path) -> list[str]:
    if not split_root.is_dir():
        raise TransferKitError(
            f"dataset folder not found: {split_root} (data.root must hold train/ and val/, "
            "each with one sub-folder per class)"
        )
    classes = sorted(p.name for p in split_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TransferKitError(f"{split_root} has no class sub-folders; put each class's images in its own folder")
    return classes


def scan_split(split_root: Path, classes: list[str]) -> FolderSplit:
    """List image files per class (sorted, so runs are repeatable); classes must exist in `classes`."""
    found = list_classes(split_root)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise TransferKitError(
            f"{split_root} has class folders that the training split lacks: {', '.join(unknown)}; "
            "rename or remove them so both splits use the same classes"
        )
    samples = []
    for label, name in enumerate(classes):
        folder = split_root / name
        if not folder.is_dir():
            continue
        samples += [(path, label) for path in image_files(folder)]
    if not samples:
        raise TransferKitError(f"{split_root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return FolderSplit(split_root, classes, samples)


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
