"""TensorBoard for a run (`logging.tensorboard: true`): each epoch's losses and metrics, the learning
rate of every parameter group and, where the task draws them, validation images, written through
torch.utils.tensorboard into RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from transferkit.errors import TransferKitError

MISSING = "logging.tensorboard needs the tensorboard package: pip install 'transferkit[tensorboard]'"
NOT_SCALARS = ("epoch", "phase")

DrawImages = Callable[[], list[torch.Tensor]]  # -> uint8 images [3, H, W], for this epoch


def scalars(row: dict) -> dict[str, float]:
    """The tags of an epoch's metrics row: each number under its own key, dicts (AP per class) as key/name."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in NOT_SCALARS:
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{name}": float(v) for name, v in value.items() if isinstance(v, int | float)})
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


def lr_tags(group_lrs: list[tuple[str, float]]) -> dict[str, float]:
    """lr/<group name>; groups that share a rule's name are told apart by their index."""
    names = [name for name, _ in group_lrs]
    return {f"lr/{name}" if names.count(name) == 1 else f"lr/{name}#{i}": lr
            for i, (name, lr) in enumerate(group_lrs)}


class Board:
    """One event file per run; a resumed run drops what it logged after its resumed epoch."""

    def __init__(self, log_dir: Path, first_epoch: int, draw: DrawImages | None = None):
        # Deferred on purpose: tensorboard is the optional `tensorboard` extra.
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TransferKitError(MISSING) from None
        self.writer = SummaryWriter(str(log_dir), purge_step=first_epoch if first_epoch > 1 else None)
        self.draw = draw

    def record(self, row: dict, group_lrs: list[tuple[str, float]]) -> None:
        epoch = row["epoch"]
        for tag, value in {**scalars(row), **lr_tags(group_lrs)}.items():
            self.writer.add_scalar(tag, value, epoch)
        for i, image in enumerate(self.draw() if self.draw else []):
            self.writer.add_image(f"val_images/{i}", image, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
