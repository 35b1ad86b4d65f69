"""List files, as MXNet's im2rec writes them: `index<TAB>label<TAB>relative/path` per line.

`make_lists` walks a class-per-folder tree, leaves out files that cannot be decoded (and lists
them), shuffles with a seed, and splits into train/val/test, per class when stratified.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.data.images import BadImage, image_files, load_rgb
from transferkit.errors import TransferKitError
from transferkit.fileio import write_text
from transferkit.outputs import OutputFolder, output_folder
from transferkit.progress import track

SPLITS = ("train", "val", "test")


@dataclass
class ListResult:
    classes: list[str]
    splits: dict[str, list[tuple[int, str]]]  # split -> [(label, relative path)]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise TransferKitError(f"--split {text!r} must be fractions such as 0.8,0.1,0.1") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise TransferKitError(f"--split {text!r}: give 1 to 3 non-negative fractions that add up to 1")
    return parts + (0.0,) * (3 - len(parts))


def _cut(items: list, fractions: tuple[float, ...]) -> list[list]:
    n = len(items)
    a = round(n * fractions[0])
    b = a + round(n * fractions[1])
    return [items[:a], items[a:b], items[b:]]


def seeded_val_ids(ids: list[int], fraction: float, seed: int) -> set[int]:
    """The image ids of a seeded validation split: the same seed and ids give the same split anywhere."""
    if not 0 < fraction < 1:
        raise TransferKitError(f"the validation fraction {fraction} must be between 0 and 1")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return set(order[:max(1, round(len(order) * fraction))])


def make_lists(root: str | Path, prefix: str | Path, fractions=(0.8, 0.1, 0.1), seed: int = 0,
               stratify: bool = False, check: bool = True, force: bool = False) -> ListResult:
    """PREFIX_{train,val,test}.lst and PREFIX_classes.txt; list files there that transferkit did not
    write are not replaced unless `force` (outputs.py)."""
    root = Path(root)
    outputs = [Path(f"{prefix}_{split}.lst") for split in SPLITS] + [Path(f"{prefix}_classes.txt")]
    OutputFolder(Path(prefix).parent, force).claim(outputs)  # before the (slow) decoding pass
    if not root.is_dir():
        raise TransferKitError(f"not a folder: {root} (give a folder with one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TransferKitError(f"{root} has no class sub-folders")
    items: list[tuple[int, str]] = []
    unreadable = []
    for label, name in enumerate(classes):
        files = image_files(root / name)
        for path in track(files, f"checking {name}") if check else files:
            rel = path.relative_to(root).as_posix()
            if check:
                try:
                    load_rgb(path)
                except BadImage as exc:
                    unreadable.append((rel, str(exc)))
                    continue
            items.append((label, rel))
    rng = random.Random(seed)
    splits: dict[str, list] = {s: [] for s in SPLITS}
    groups = [[it for it in items if it[0] == c] for c in range(len(classes))] if stratify else [items]
    for group in groups:
        group = list(group)
        rng.shuffle(group)
        for split, part in zip(SPLITS, _cut(group, fractions), strict=True):
            splits[split] += part
    result = ListResult(classes, splits, unreadable)
    with output_folder(Path(prefix).parent, force) as folder:
        folder.claim(outputs)  # again: the decoding pass may have taken a while
        for split, part in splits.items():
            if stratify:
                rng.shuffle(part)
            path = Path(f"{prefix}_{split}.lst")
            write_text(path, "".join(f"{i}\t{label}\t{rel}\n" for i, (label, rel) in enumerate(part)))
            folder.wrote(path)
            result.files[split] = path
        write_text(outputs[-1], "".join(c + "\n" for c in classes))
        folder.wrote(outputs[-1])
    return result


def read_classes(path: str | Path) -> list[str]:
    """A classes file: one name a line (blank lines and # comments ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TransferKitError(f"classes file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise TransferKitError(f"cannot read classes file {path}: {exc.strerror}") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise TransferKitError(f"classes file {path} names no class")
    return names


def classes_file_of(list_path: str | Path) -> Path:
    """PREFIX_classes.txt beside PREFIX_<split>.lst, as make_lists writes them."""
    list_path = Path(list_path)
    return list_path.with_name(list_path.name.rsplit("_", 1)[0] + "_classes.txt")


def read_labelled_list(path: str | Path, root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The classes (from the classes file beside the list) and the (image path, label) pairs of a list."""
    classes_file = classes_file_of(path)
    if not classes_file.is_file():
        raise TransferKitError(f"no classes file {classes_file} beside {path}")
    classes = read_classes(classes_file)
    return classes, read_list(path, root, len(classes))


def read_list(path: str | Path, root: str | Path, num_classes: int | None = None) -> list[tuple[Path, int]]:
    """(image path, label) pairs of a list file; paths are relative to `root`."""
    path, root = Path(path), Path(root)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TransferKitError(f"list file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise TransferKitError(f"cannot read list file {path}: {exc.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            label = int(float(parts[1]))
            rel = parts[-1].strip()
            if len(parts) < 3 or not rel or "\0" in rel:
                raise ValueError
        except (ValueError, IndexError, OverflowError):  # OverflowError: a label of inf
            raise TransferKitError(f"{path}:{n}: expected `index<TAB>label<TAB>path`, got {line[:60]!r}") from None
        target = (root / rel).resolve()
        if not target.is_relative_to(root.resolve()):
            raise TransferKitError(f"{path}:{n}: path {rel!r} leaves the data root {root}")
        if num_classes is not None and not 0 <= label < num_classes:
            raise TransferKitError(f"{path}:{n}: label {label} is not in 0..{num_classes - 1}")
        out.append((root / rel, label))
    if not out:
        raise TransferKitError(f"list file {path} has no entries")
    return out
