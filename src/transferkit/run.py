"""A run, top to bottom: open the run directory (new, or resumed), let the task build its data and
model, report what the pretrained weights restored, train, and finish with the summary. And
`evaluate`: a config's model (as built, or with trained weights) on its validation split.

The task is chosen here once (`task_for`); everything below it is the same for every task.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from transferkit.config import Config
from transferkit.errors import TransferKitError
from transferkit.fileio import write_json
from transferkit.progress import console, make_progress
from transferkit.tasks import task_for
from transferkit.tasks.base import Built, Task
from transferkit.training.board import Board
from transferkit.training.checkpoint import load_weights
from transferkit.training.device import compile_model, place_model, seed_everything, select_device
from transferkit.training.distributed import Processes, from_environment
from transferkit.training.loop import EpochRecorder, Loop, Say, run_finetune
from transferkit.training.optim import freeze_batchnorm
from transferkit.training.resume import ResumePoint
from transferkit.training.rundir import follow_run, new_run_dir, open_run, write_run_start
from transferkit.training.runlog import plot_curves, summary_table
from transferkit.training.strategies import run_probe
from transferkit.weights.transfer import TransferReport


@dataclass
class TrainResult:
    """What `train` returns: the run directory, one metrics row per epoch, and the best epoch.

        result = transferkit.train(cfg, out="runs/mine")
        print(f"{result.best_metric} {result.best_value:.3f} at epoch {result.best_epoch}")
    """

    run_dir: Path
    metrics: list[dict]
    best_epoch: int
    best_metric: str  # val_acc, val_loss or val_map
    best_value: float
    seconds: float


def train(cfg: Config, out: str | Path | None = None, config_path: str | Path | None = None,
          quiet: bool = False, resume: str | Path | None = None, allow_config_change: Sequence[str] = ()
          ) -> TrainResult:
    """Run the whole pass the config describes and write the run directory. With `resume` (a run
    directory), continue that run from its newest intact training state."""
    started = time.perf_counter()
    processes = from_environment(select_device(cfg.device), cfg.strategy, cfg.model.sync_bn)  # torchrun's ranks
    quiet = quiet or not processes.main  # rank 0 alone prints
    say: Say = (lambda *a, **k: None) if quiet else console.print
    # Rank 0 holds the run directory (marked and locked) until the run ends, however it ends; the
    # other ranks only read it.
    opener = open_run if processes.main else follow_run
    try:
        # A new run's folder (a resume ignores it), rank 0's on every rank: one named by the clock differs
        # where ranks straddle a second.
        new_dir = Path(processes.gather(str(new_run_dir(out, cfg, config_path)))[0])
        claim, resumed = opener(cfg, new_dir, resume, allow_config_change, say)
        with claim as run_dir:
            return train_in(cfg, run_dir, resumed, processes, quiet, started)
    finally:
        processes.close()


def train_in(cfg: Config, run_dir: Path, resumed: ResumePoint | None, processes: Processes, quiet: bool,
             started: float) -> TrainResult:
    """The run in a directory this process holds: build, report, train, finish. Under torchrun,
    rank 0 writes the run directory and the other ranks only train."""
    say: Say = (lambda *a, **k: None) if quiet else console.print
    device = processes.device(select_device(cfg.device))
    seed_everything(cfg.seed)
    task = task_for(cfg)
    built = task.build(restore=resumed is None)
    if processes.rank:  # the same model on every rank, but each its own augmentations and dropout
        seed_everything(cfg.seed + processes.rank)
    if processes.main:
        write_run_start(run_dir, cfg, built.classes, built.report)
    announce(built, resumed, run_dir, say)

    place_model(built.model, device, built.channels_last)
    if cfg.optim.freeze_bn:
        freeze_batchnorm(built.model)
    if cfg.model.sync_bn and processes.world == 1:
        say("model.sync_bn: one process, nothing to synchronise; BatchNorm left as it is", highlight=False)
    built.model = processes.sync_batchnorm(built.model, cfg.model.sync_bn)
    wrapped = processes.wrap(built.model, device)
    if cfg.model.compile:
        wrapped = compile_model(wrapped, device, say)
    meta = {"model": cfg.model.name, "classes": built.classes, "task": cfg.task}
    recorder = EpochRecorder(run_dir, built.model, meta, say, cfg.best_metric, resumed if processes.main else None)
    board = attach_board(cfg, task, built, recorder, device) if processes.main else None
    with make_progress(disable=quiet) as progress:
        if cfg.strategy in ("linear_probe", "lp_ft"):
            run_probe(cfg, built.model, built.data, device, recorder, progress)
        if cfg.strategy != "linear_probe":
            train_loader, val_loader = task.loaders(built.data, processes.shard)
            loop = Loop(cfg, built.model, built.family.head_patterns, train_loader, val_loader, task.loss(device),
                        lambda model, loader: task.evaluate(model, built.data, loader, device),
                        recorder, progress, device, None if wrapped is built.model else wrapped, processes)
            run_finetune(loop, resumed)
    if board is not None:
        board.close()
    if not processes.main:
        return TrainResult(run_dir, [], 0, cfg.best_metric, float("nan"), time.perf_counter() - started)
    return finish(cfg, recorder, time.perf_counter() - started, quiet)


def attach_board(cfg: Config, task: Task, built: Built, recorder: EpochRecorder,
                 device: torch.device) -> Board | None:
    """With logging.tensorboard, every epoch the recorder logs also goes to TensorBoard, with the
    validation images the task draws (detection: predicted boxes)."""
    if not cfg.logging.tensorboard:
        return None
    count = cfg.logging.tensorboard_images
    draw = (lambda: task.board_images(built.model, built.data, device, count)) if count else None
    board = Board(recorder.run_dir / "tensorboard", recorder.epoch + 1, draw)
    recorder.listeners.append(board.record)
    return board


def announce(built: Built, resumed: ResumePoint | None, run_dir: Path, say: Say) -> None:
    """Where the weights came from (the transfer report, or the resumed state), and the data."""
    if resumed is not None:
        load_weights(built.model, resumed.dir / "model.safetensors")
        say(f"resuming {run_dir} from {resumed.dir.name}: epoch {resumed.state['epoch'] + 1}, "
            f"batch {resumed.state['batches_done'] + 1}", highlight=False)
    elif built.report is not None:
        say(built.report.table())
        for line in built.report.summary_lines()[1:]:
            say(line, highlight=False)
    else:
        say("no pretrained source: training from scratch")
    data = built.data
    skipped = sum(len(s.bad) for s in (data.train, data.val) if s is not None)
    empty = getattr(data.train, "without_boxes", 0)  # detection.skip_empty
    say(f"data: {len(data.train_set)} train / {len(data.val_set)} val images, {len(built.classes)} classes"
        + (f", {skipped} undecodable skipped" if skipped else "")
        + (f", {empty} training images without boxes left out (detection.skip_empty)" if empty else ""),
        highlight=False)


def finish(cfg: Config, recorder: EpochRecorder, seconds: float, quiet: bool) -> TrainResult:
    """The curves, summary.json and the closing table."""
    run_dir, rows, best_metric = recorder.run_dir, recorder.log.rows, recorder.best_metric
    best, best_epoch = recorder.best, recorder.best_epoch
    plot_curves(rows, run_dir / "curves.png", title=f"{cfg.model.name} on {cfg.data.root.name}")
    summary = {"best_epoch": best_epoch, f"best_{best_metric}": best[0], "final": rows[-1], "seconds": seconds}
    write_json(run_dir / "summary.json", summary)
    if not quiet:
        console.print(summary_table(rows, best_epoch))
        console.print(f"best {best_metric} {best[0]:.4f} at epoch {best_epoch}; {seconds:.0f}s; run dir {run_dir}",
                      highlight=False)
    return TrainResult(run_dir, rows, best_epoch, best_metric, best[0], seconds)


def evaluate(cfg: Config, weights: str | Path | None = None, results_path: str | Path | None = None
             ) -> tuple[dict, TransferReport | None]:
    """Evaluate on the validation split: the model as the config builds it before any training step
    (pretrained restore plus head initialisation), or, with `weights`, a trained checkpoint. With
    `results_path` (detection), the detections are written as a COCO results JSON."""
    device = select_device(cfg.device)
    task = task_for(cfg)
    built = task.build(need_train=False, restore=weights is None)
    if weights:
        meta = load_weights(built.model, weights)
        if meta.get("classes") and meta["classes"] != built.classes:
            raise TransferKitError(f"{weights} was trained on classes {meta['classes']}, the data has {built.classes}")
    place_model(built.model, device, built.channels_last)
    _, loader = task.loaders(built.data)
    metrics = task.evaluate(built.model, built.data, loader, device, results_path)
    return {**metrics, "images": len(built.data.val_set)}, built.report
