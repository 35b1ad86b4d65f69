"""The demo experiment: fine-tune pretrained EfficientNet-Lite0 vs train it from scratch, same budget,
on a synthetic dataset made on the spot (no data, no network). With task detection: FCOS on an FPN over
EfficientNet-Lite0, its backbone restored from ImageNet vs random, on synthetic shapes with boxes."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from transferkit.config import DEFAULT_SOURCE, load_config
from transferkit.data.synthetic import SYNTHETIC
from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write, write_json
from transferkit.progress import console
from transferkit.run import train

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
ARMS = {"finetune": DEFAULT_SOURCE, "scratch": None}
DEMO_ENTRIES = {"data", *ARMS, "report.json", "report.png"}


def clear_previous_demo(out: Path) -> None:
    """A demo folder is the demo's own: a rerun replaces it. A folder holding anything else is refused."""
    if not out.exists():
        return
    entries = {p.name for p in out.iterdir()}
    if entries - DEMO_ENTRIES:
        raise TransferKitError(
            f"{out} holds files the demo did not write ({', '.join(sorted(entries - DEMO_ENTRIES)[:3])}); "
            "give the demo an empty or new --out"
        )
    for name in entries:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


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
    """Both arms on one synthetic set. Detection: 3 shape classes, so per-class counts x 3 images."""
    out = Path(out)
    clear_previous_demo(out)
    started = time.perf_counter()
    setup, (write, _) = DEMOS[task], SYNTHETIC[task]
    data_root = write(out / "data", train_per_class, val_per_class, setup.image_size, seed=seed)
    results = {}
    for arm, source in ARMS.items():
        if not quiet:
            console.rule(f"{arm}: {'pretrained ' + source if source else 'random initialisation'}")
        cfg = load_config(None, [*setup.overrides(data_root), f"schedule.epochs={epochs}", f"seed={seed}",
                                 f"pretrained.source={source or 'null'}"])
        results[arm] = train(cfg, out=out / arm, quiet=quiet)
    metric = cfg.best_metric
    report = {
        "task": task,
        "metric": metric,
        "arms": {
            arm: {metric: r.metrics[-1][metric], f"best_{metric}": r.best_value,
                  "seconds": r.seconds, "run_dir": str(r.run_dir)}
            for arm, r in results.items()
        },
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "report.json", report)
    _plot(results, metric, out / "report.png")
    if not quiet:
        console.print(_table(report))
    return report


def _table(report: dict) -> Table:
    metric = report["metric"]
    table = Table(title="fine-tune vs scratch, same budget")
    for col in ("arm", f"final {metric}", f"best {metric}", "seconds"):
        table.add_column(col, justify="right")
    for arm, r in report["arms"].items():
        table.add_row(arm, f"{r[metric]:.3f}", f"{r['best_' + metric]:.3f}", f"{r['seconds']:.0f}")
    gain = report["arms"]["finetune"][metric] - report["arms"]["scratch"][metric]
    table.caption = f"transfer bought {gain:+.3f} {metric}; total {report['seconds']:.0f}s"
    return table


def _plot(results: dict, metric: str, path: Path) -> None:
    # Deferred on purpose: matplotlib takes about half a second to import, and only the end draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in results.items():
        ax.plot([m["epoch"] for m in r.metrics], [m[metric] for m in r.metrics], marker="o", label=arm)
    ax.set(xlabel="epoch", ylabel=metric, ylim=(0, 1.02), title="fine-tune vs scratch")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
