from __future__ import annotations

from pathlib import Path

import pytest

from transferkit.data.synthetic import make_synthetic_classification

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera_data"

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data not found at {SHARED_DATA} (../shared/data)"
)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic class-per-folder dataset (3 classes, 32 px)."""
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic_classification(
        root, train_per_class=24, val_per_class=10, size=32, classes=("circle", "square", "cross"), seed=1
    )


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
