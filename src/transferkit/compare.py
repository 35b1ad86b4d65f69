"""The transfer experiment on the user's own data: the same config and budget trained several ways
(fine-tuned from the pretrained source, from scratch, a linear probe on frozen features, probe then
fine-tune, the head started from the source's classes), one run directory per arm under one parent,
then a table (final and best metric, seconds) and one plot of the curves.

Only what makes an arm differs between arms; everything else (data, model, schedule, seed) is the
config's. lp_ft probes for probe.epochs on cached features before its schedule.epochs of
fine-tuning: the probe's epochs come on top (they are cheap; the seconds column shows the cost).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from rich.table import Table

from transferkit.config import load_config
from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write, write_json
from transferkit.outputs import OutputFolder, output_folder
from transferkit.progress import console
from transferkit.run import TrainResult, train
from transferkit.training.runguard import has_started, refuse_unusable_out

ARMS = {
    "finetune": ["strategy=finetune"],
    "scratch": ["strategy=finetune", "pretrained.source=null"],
    "linear_probe": ["strategy=linear_probe"],
    "lp_ft": ["strategy=lp_ft"],
    "head_from_classes": ["strategy=finetune", "pretrained.head_init={from_classes: auto}"],
}
DEFAULT_ARMS = ("finetune", "scratch")
REPORT_FILES = ("report.json", "report.png")


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise TransferKitError(f"--arms {text!r}: {', '.join(unknown) or 'no arm'} unknown; choose from "
                               f"{', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise TransferKitError(f"--arms {text!r} names an arm twice")
    return arms


def default_out(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "config"
    return Path("runs") / f"compare-{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def compare(config_path: str | Path | None, overrides: Sequence[str] = (), arms: Sequence[str] = DEFAULT_ARMS,
            out: str | Path | None = None, quiet: bool = False, title: str = "same config, same budget",
            force: bool = False) -> dict:
    """Train each arm of the config into OUT/<arm>/, then write OUT/report.json (the final and best
    metric and seconds per arm) and OUT/report.png (the metric per epoch, one line per arm). Report
    files in OUT that transferkit did not write are replaced only with `force` (outputs.py)."""
    out = Path(out) if out else default_out(config_path)
    # Everything that would stop a later arm is refused before the first trains: its folder, the reports.
    if out.exists() and not out.is_dir():
        raise TransferKitError(f"--out {out} is a file; give compare a new folder")
    for arm in arms:
        refuse_unusable_out(out / arm)
        if has_started(out / arm):
            raise TransferKitError(f"{out / arm} already holds a run; give compare a new --out")
    report_json, report_png = reports = [out / name for name in REPORT_FILES]
    OutputFolder(out, force).claim(reports)
    # every arm's config is read before the first trains, so that a bad arm stops nothing half done
    configs = {arm: load_config(config_path, [*overrides, *ARMS[arm]]) for arm in arms}
    started = time.perf_counter()
    results: dict[str, TrainResult] = {}
    for arm, cfg in configs.items():
        if not quiet:
            console.rule(f"{arm}: {_describe(cfg)}")
        results[arm] = train(cfg, out=out / arm, quiet=quiet)
    metric = next(iter(configs.values())).best_metric
    report = {
        "task": next(iter(configs.values())).task,
        "metric": metric,
        "arms": {arm: {metric: r.metrics[-1][metric], f"best_{metric}": r.best_value, "seconds": r.seconds,
                       "run_dir": str(r.run_dir)} for arm, r in results.items()},
        "seconds": time.perf_counter() - started,
    }
    with output_folder(out, force) as folder:
        folder.claim(reports)  # again: hours may have passed
        write_json(report_json, report)
        plot_arms(results, metric, report_png, title)
        for path in reports:
            folder.wrote(path)
    if not quiet:
        console.print(arms_table(report, title))
    return report


def _describe(cfg) -> str:
    source = cfg.pretrained.source
    return f"strategy {cfg.strategy}, " + (f"pretrained {source}" if source else "random initialisation")


def arms_table(report: dict, title: str) -> Table:
    metric = report["metric"]
    table = Table(title=title)
    for col in ("arm", f"final {metric}", f"best {metric}", "seconds"):
        table.add_column(col, justify="right")
    for arm, r in report["arms"].items():
        table.add_row(arm, f"{r[metric]:.3f}", f"{r['best_' + metric]:.3f}", f"{r['seconds']:.0f}")
    arms = report["arms"]
    if "finetune" in arms and "scratch" in arms:
        gain = arms["finetune"][metric] - arms["scratch"][metric]
        table.caption = f"transfer bought {gain:+.3f} {metric}; total {report['seconds']:.0f}s"
    return table


def plot_arms(results: dict[str, TrainResult], metric: str, path: Path, title: str) -> None:
    # Deferred on purpose: matplotlib takes about half a second to import, and only the end draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in results.items():
        ax.plot([m["epoch"] for m in r.metrics], [m[metric] for m in r.metrics], marker="o", label=arm)
    ax.set(xlabel="epoch", ylabel=metric, title=title)
    if metric != "val_loss":
        ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
