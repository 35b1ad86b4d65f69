"""The demo experiment: `compare` on a synthetic dataset made on the spot (no data, no network):
pretrained EfficientNet-Lite0 fine-tuned vs trained from scratch, same budget. With task detection:
FCOS on an FPN over EfficientNet-Lite0, its backbone restored from ImageNet vs random, on synthetic
shapes with boxes."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transferkit.compare import DEFAULT_ARMS, REPORT_FILES, compare
from transferkit.config import DEFAULT_SOURCE
from transferkit.data.synthetic import SYNTHETIC
from transferkit.errors import TransferKitError
from transferkit.fileio import write_json
from transferkit.outputs import MANIFEST, output_folder

# One budget for both arms; only pretrained.source differs.
DEMO_OVERRIDES = [
    "data.image_size=96",
    "data.batch_size=32",
    "data.crop_scale=[0.5,1.0]",
    "optim.name=adamw",
    "optim.lr=0.001",
    "optim.weight_decay=0.01",
    "optim.head_lr_mult=1",
    "schedule.kind=cosine",
    "schedule.warmup_epochs=1",
]
DETECTION_OVERRIDES = [
    "task=detection",
    "data.format=coco",
    "data.batch_size=8",
    "pretrained.scope=backbone",
    "detection.arch=fcos",
    "detection.min_size=[128]",
    "detection.max_size=128",
    "detection.fpn_channels=64",
    "optim.name=adamw",
    "optim.lr=0.0005",
    "optim.head_lr_mult=1",
    "schedule.warmup_epochs=1",
]
ARMS = DEFAULT_ARMS  # finetune (from DEFAULT_SOURCE) and scratch
DEMO_MARK = ".transferkit-demo"  # in a folder the demo made: only such a folder is emptied by a rerun
DEMO_ENTRIES = {DEMO_MARK, MANIFEST, "data", *ARMS, *REPORT_FILES}


def claim_demo_folder(out: Path) -> None:
    """Make `out` the demo's: new, empty, or a folder the demo made before (it holds the demo's mark
    and the demo's files only), which a rerun empties. Any other folder is refused, untouched: a
    `data/` of the user's own has the name the demo uses."""
    if out.exists() and not out.is_dir():
        raise TransferKitError(f"--out {out} is a file; give the demo a new or empty folder")
    entries = {p.name for p in out.iterdir()} if out.exists() else set()
    theirs = sorted(entries - DEMO_ENTRIES if DEMO_MARK in entries else entries)
    if theirs:
        raise TransferKitError(f"{out} holds files the demo did not write ({', '.join(theirs[:3])}); "
                               "give the demo an empty or new --out")
    for name in sorted(entries - {DEMO_MARK}):  # the mark stays: a crash part way leaves a folder a rerun takes
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text('{"format": 1}\n', encoding="utf-8")


def _detection_overrides(data_root: Path) -> list[str]:
    files = [f"data.{split}_{what}={data_root / folder / name}"
             for split in ("train", "val")
             for what, folder, name in (("ann", "annotations", f"{split}.json"), ("images", "images", split))]
    return [*DETECTION_OVERRIDES, f"data.root={data_root}", *files]


@dataclass(frozen=True)
class DemoSetup:
    image_size: int  # of the synthetic images
    overrides: Callable[[Path], list[str]]  # the synthetic set's root -> the demo's config


DEMOS = {
    "classification": DemoSetup(96, lambda root: [*DEMO_OVERRIDES, f"data.root={root}"]),
    "detection": DemoSetup(128, _detection_overrides),
}


def run_demo(out: str | Path = "runs/demo", epochs: int = 8, train_per_class: int = 50,
             val_per_class: int = 25, seed: int = 0, quiet: bool = False, task: str = "classification") -> dict:
    """`compare` (finetune vs scratch) on a synthetic set written into OUT/data. Detection: 3 shape
    classes, so per-class counts x 3 images."""
    out = Path(out)
    claim_demo_folder(out)
    started = time.perf_counter()
    setup, (write, _) = DEMOS[task], SYNTHETIC[task]
    data_root = write(out / "data", train_per_class, val_per_class, setup.image_size, seed=seed)
    overrides = [*setup.overrides(data_root), f"schedule.epochs={epochs}", f"seed={seed}",
                 f"pretrained.source={DEFAULT_SOURCE}"]
    report = compare(None, overrides, ARMS, out, quiet, title="fine-tune vs scratch")
    report["seconds"] = time.perf_counter() - started  # the synthetic set's drawing included
    with output_folder(out) as folder:  # compare's report.json, with the drawing's time added
        write_json(out / "report.json", report)
        folder.wrote(out / "report.json")
    return report
