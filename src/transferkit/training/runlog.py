"""What a run writes for people: metrics.jsonl, a curves PNG and a closing summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write


class MetricsLog:
    """One JSON object per epoch, appended and flushed to disk as each epoch ends."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per finished epoch. A last line without its newline (the
    run was killed while writing it) is left out; other damage is one line naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise TransferKitError(f"{path}: not UTF-8 text; the run's metrics are damaged") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise TransferKitError(f"{path}:{number}: not an epoch's row of metrics (damaged); remove the line, "
                                   "or start the run again")
        rows.append(row)
    return rows


# The validation quality shown in the curves and the summary: accuracy for classifiers, mAP for detectors.
QUALITY = (("val_acc", "val top-1"), ("val_top5", "val top-5"), ("val_map", "val mAP"), ("val_ap50", "val AP50"))


def curves_figure(rows: list[dict], title: str = ""):
    """Loss (train, and val where the rows hold it) and the validation quality per epoch, side by side."""
    # Deferred on purpose: matplotlib takes about half a second to import, and only a run's end draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train")
    if "val_loss" in rows[0]:
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker="o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    for key, label in QUALITY:
        if key in rows[0]:
            ax_acc.plot(epochs, [r[key] for r in rows], marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1.02))
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> None:
    """curves_figure as a PNG at `path` (1000 x 400 pixels)."""
    fig = curves_figure(rows, title)  # first: it picks the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def summary_table(rows: list[dict], best_epoch: int | None, title: str = "training summary") -> Table:
    """A row per epoch: the losses and validation quality the rows hold, the lr and the seconds; the
    best epoch marked with a star."""
    table = Table(title=title)
    metrics = [k for k in ("train_loss", "val_loss", *(key for key, _ in QUALITY)) if k in rows[0]]
    for col in ("epoch", *metrics, "lr", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        mark = " *" if r["epoch"] == best_epoch else ""
        table.add_row(f"{r['epoch']}{mark}", *(f"{r[k]:.4f}" for k in metrics), f"{r['lr']:.2e}",
                      f"{r['seconds']:.1f}")
    return table
