"""The class-per-folder layout: SPLIT/<class>/*.jpg, its classes and its (image, label) pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.data.images import IMAGE_SUFFIXES, image_files, load_rgb
from transferkit.errors import TransferKitError


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
