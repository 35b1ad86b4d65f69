from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera_data"


def pytest_collection_modifyitems(config, items) -> None:
    """Under a mutation run only (mutmut names the mutant in MUTANT_UNDER_TEST; its working folder
    holds the statistics): each file's tests together, the cheapest files first
    (tests/helpers/mutation_order.py says why)."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    from helpers.mutation_order import mutation_order, recorded_durations

    items[:] = mutation_order(items, recorded_durations(Path("mutmut-stats.json")))


needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data not found at {SHARED_DATA} (../shared/data)"
)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small class-per-folder dataset a tiny network learns in a few steps: the class sets the
    dominant colour channel of noisy 32 px images (circle: red, cross: green, square: blue)."""
    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(1)
    for split, count in (("train", 24), ("val", 10)):
        for channel, name in enumerate(("circle", "cross", "square")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                arr = rng.uniform(0, 140, (32, 32, 3))
                arr[..., channel] += 110
                Image.fromarray(arr.astype(np.uint8)).save(folder / f"{name}_{i:04d}.png")
    return root


def tiny_overrides(root: Path, **extra) -> list[str]:
    """A run small enough for the test suite: timm's 100k-parameter test network, from scratch."""
    values = {
        "data.root": str(root),
        "model.name": "test_efficientnet",
        "pretrained.source": "null",
        "data.image_size": 32,
        "data.batch_size": 16,
        "optim.name": "adamw",
        "optim.lr": 0.01,
        "optim.head_lr_mult": 1,
        "schedule.epochs": 3,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def det_overrides(root: Path, **extra) -> list[str]:
    """A tiny detector (FCOS on timm's test network, 96 px) on make_synthetic_detection's COCO set at `root`."""
    values = {
        "task": "detection", "model.name": "test_efficientnet", "pretrained.source": "null",
        "data.root": str(root), "data.format": "coco",
        "data.train_ann": str(root / "annotations" / "train.json"), "data.train_images": str(root / "images" / "train"),
        "data.val_ann": str(root / "annotations" / "val.json"), "data.val_images": str(root / "images" / "val"),
        "data.batch_size": 8, "optim.name": "adamw", "optim.lr": 0.001, "optim.head_lr_mult": 1,
        "detection.arch": "fcos", "detection.min_size": "[96]", "detection.max_size": 96,
        "detection.fpn_channels": 64, "schedule.epochs": 6, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def inspect_json(source: Path, capsys) -> dict:
    """What `transferkit weights inspect --json` says of `source`."""
    from transferkit.cli import main

    capsys.readouterr()
    assert main(["weights", "inspect", "--json", str(source)]) == 0
    return json.loads(capsys.readouterr().out)


class RunsCode:
    """Unpickled, it runs a shell command that creates `marker`: what a reader must never do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
