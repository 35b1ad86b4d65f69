"""The training loop: epochs of steps over the training data, validation after each epoch, training
states saved for an exact resume, metrics and weights recorded.

Written once for every task: the task gives the loss of a batch and the validation metrics of a
loader (`Loop.loss_fn`, `Loop.eval_fn`); nothing here knows which task it trains.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.config import Config
from transferkit.fileio import write_text
from transferkit.progress import StepProgress
from transferkit.training.checkpoint import save_weights
from transferkit.training.distributed import Processes
from transferkit.training.ema import WeightAverage
from transferkit.training.finite import NonFiniteError, check_loss, require_finite
from transferkit.training.optim import (
    build_optimizer,
    build_scheduler,
    plan_params,
    plan_table,
    scale_lr,
    set_train_mode,
)
from transferkit.training.precision import MixedPrecision
from transferkit.training.resume import (
    STATES,
    ResumePoint,
    carry_optimizer_state,
    rank_state,
    rng_state,
    save_state,
    set_rng_state,
)
from transferkit.training.runlog import MetricsLog, read_metrics
from transferkit.training.strategies import stage_count, unfreeze_stages

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]  # (model, batch) -> (loss, batch size)
EvalFn = Callable[[nn.Module, DataLoader], dict]  # (model, validation loader) -> metrics
Say = Callable[..., None]


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the state was saved."""

    def __init__(self, signum: int, run_dir: Path, where: str):
        self.signum, self.run_dir, self.where = signum, run_dir, where
        super().__init__(where)


class StopSignals:
    """While active, SIGINT and SIGTERM set a flag that the loop checks after each step."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class EpochPosition:
    """Where an epoch stands: batches done and the running loss (for resuming inside an epoch)."""

    batches_done: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    epoch: int = 1  # of this phase; with batches_done, the step a non-finite loss is reported at


class EpochRecorder:
    """Logs each epoch to metrics.jsonl, writes last/best checkpoints, keeps the best."""

    def __init__(self, run_dir: Path, model: nn.Module, meta: dict, say: Say, best_metric: str = "val_acc",
                 resume: ResumePoint | None = None):
        """With `resume`, the epochs after the resumed state's (from an epoch that was cut short) are
        dropped from metrics.jsonl, so that each epoch appears there exactly once."""
        self.run_dir, self.model, self.meta, self.say = run_dir, model, meta, say
        self.best_metric = best_metric
        self.ema_model: nn.Module | None = None  # set by the loop when the run keeps an EMA
        # called with each row and the learning rate of each parameter group (TensorBoard)
        self.listeners: list[Callable[[dict, list[tuple[str, float]]], None]] = []
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.best, self.best_epoch = (-1.0, float("inf")), 0
        if resume is not None:
            self.best, self.best_epoch = tuple(resume.state["best"]), resume.state["best_epoch"]
            if self.log.path.exists():
                self.log.rows = [r for r in read_metrics(run_dir) if r["epoch"] <= resume.state["epoch"]]
                write_text(self.log.path, "".join(json.dumps(r) + "\n" for r in self.log.rows))

    def is_better(self, row: dict) -> bool:
        if self.best_metric not in row:  # an EMA metric in an epoch without an EMA (a probe phase)
            return False
        if self.best_metric == self.loss_key:
            return row[self.loss_key] < self.best[1]
        # ties go to the lower loss, where there is one (a detector has none: 0)
        return (row[self.best_metric], -row.get(self.loss_key, 0.0)) > (self.best[0], -self.best[1])

    @property
    def loss_key(self) -> str:
        """The loss beside the best metric: the EMA's for an EMA metric."""
        return "ema_val_loss" if self.best_metric.startswith("ema_") else "val_loss"

    @property
    def epoch(self) -> int:
        return len(self.log.rows)

    def record(self, phase: str, train_loss: float, metrics: dict, t0: float,
               group_lrs: list[tuple[str, float]]) -> None:
        """One epoch's row; its `lr` is the first group's (the body's, where a head has its own)."""
        require_finite(self.model, f"{self.run_dir}: the weights after epoch {self.epoch + 1}")
        if self.ema_model is not None:
            require_finite(self.ema_model, f"{self.run_dir}: the EMA weights after epoch {self.epoch + 1}")
        row = {"epoch": self.epoch + 1, "train_loss": train_loss, **metrics, "lr": group_lrs[0][1],
               "seconds": time.perf_counter() - t0, "phase": phase}
        self.log.append(row)
        for listen in self.listeners:
            listen(row, group_lrs)
        checkpoints = self.run_dir / "checkpoints"
        save_weights(self.model, checkpoints / "last.safetensors", {**self.meta, **row, "weights": "live"})
        if self.ema_model is not None:
            save_weights(self.ema_model, checkpoints / "ema.safetensors", {**self.meta, **row, "weights": "ema"})
        if self.is_better(row):
            on_ema = self.best_metric.startswith("ema_")
            self.best, self.best_epoch = (row[self.best_metric], row.get(self.loss_key, 0.0)), row["epoch"]
            weights = self.ema_model if on_ema else self.model
            save_weights(weights, checkpoints / "best.safetensors",
                         {**self.meta, **row, "weights": "ema" if on_ema else "live"})
        shown = "  ".join(f"{k} {row[k]:.4f}" for k in ("val_loss", "val_acc", "val_map", "val_ap50", "ema_val_acc",
                                                        "ema_val_map") if k in row)
        self.say(f"epoch {row['epoch']} ({phase}): train_loss {train_loss:.4f}  {shown}  ({row['seconds']:.1f}s)",
                 highlight=False)


@dataclass
class Loop:
    """What the loop works on: the model and its data, how a batch and an epoch are scored, and
    where the results go."""

    cfg: Config
    model: nn.Module
    head_patterns: tuple[str, ...]
    train_loader: DataLoader
    val_loader: DataLoader
    loss_fn: LossFn
    eval_fn: EvalFn
    recorder: EpochRecorder
    progress: StepProgress
    device: torch.device
    # What the training steps call: `model` in DistributedDataParallel and/or torch.compile (None: model).
    wrapped: nn.Module | None = None
    processes: Processes = field(default_factory=Processes)  # torchrun's ranks; one process by default

    @property
    def say(self) -> Say:
        return self.recorder.say


@dataclass
class Optimisation:
    """What changes the weights, step by step: the optimiser, its schedule, the precision of the
    forward pass, the batches summed into one step, and the EMA of the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: MixedPrecision = field(default_factory=lambda: MixedPrecision("none", torch.device("cpu")))
    accumulate: int = 1
    ema: WeightAverage | None = None

    def extra_state(self) -> dict:
        """What the training state holds besides the optimiser and schedule: scaler, EMA."""
        ema = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        return {**self.precision.state_dict(), **ema}

    def load_extra_state(self, state: dict) -> None:
        self.precision.load_state_dict(state)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])


def images_per_epoch(loader: DataLoader) -> int:
    """The images this process gets in one pass of `loader` (its share under torchrun). A batch
    sampler of the loader's own (detection's grouped one) counts them itself; drawing the batches to
    count them would move the loader's random state."""
    batches = loader.batch_sampler
    return batches.images() if hasattr(batches, "images") else len(batches.sampler)


def optimiser_steps(batches: int, accumulate: int) -> int:
    """Optimiser steps in `batches` batches (a last, shorter window still makes a step)."""
    return math.ceil(batches / accumulate)


def build_optimisation(loop: Loop) -> Optimisation:
    """Parameter groups (printed as a table), optimiser and per-step schedule for the loop's model,
    from the learning rate optim.lr_scaling gives the effective batch (printed with it)."""
    cfg, k = loop.cfg, loop.cfg.optim.accumulate
    batch = cfg.data.batch_size
    scaling = scale_lr(cfg.optim, loop.processes.effective_batch(batch, k), batch)
    loop.say(loop.processes.describe_batch(batch, k, scaling.line), highlight=False)
    optim = scaling.apply(cfg.optim)
    plan = plan_params(loop.model, loop.head_patterns, optim)
    optimizer = build_optimizer(loop.model, loop.head_patterns, optim, plan)
    loop.say(plan_table(plan))
    scheduler = build_scheduler(optimizer, cfg.schedule, optimiser_steps(len(loop.train_loader), k))
    ema = WeightAverage(loop.model, cfg.optim.ema) if cfg.optim.ema is not None else None
    loop.recorder.ema_model = ema.module if ema is not None else None
    optimizer.zero_grad(set_to_none=True)  # gradients left by a probe phase are not this phase's
    return Optimisation(optimizer, scheduler, MixedPrecision(cfg.optim.amp, loop.device), k, ema)


class StateSaver:
    """Writes training states: at each epoch's end, and after any step where one is due (every K
    steps, every M minutes) or a stop signal came; after a signal the run stops (Interrupted).
    Called only after optimiser steps, so with optim.accumulate a state never holds half a window."""

    def __init__(self, loop: Loop, opt: Optimisation, stop: StopSignals):
        self.loop, self.opt, self.stop = loop, opt, stop
        self.last_saved = time.monotonic()
        self.epoch, self.loader_state = 0, None

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader_state = self.loop.train_loader.generator.get_state()  # this epoch's data order comes from here
        if hasattr(self.loop.train_loader.sampler, "set_epoch"):  # DistributedSampler: the order of seed + epoch
            self.loop.train_loader.sampler.set_epoch(epoch)

    def after_step(self, pos: EpochPosition) -> None:
        every, minutes = self.loop.cfg.checkpoint.every_steps, self.loop.cfg.checkpoint.every_minutes
        steps, k = len(self.loop.train_loader), self.opt.accumulate
        step = (self.epoch - 1) * optimiser_steps(steps, k) + optimiser_steps(pos.batches_done, k)
        due = bool(every) and step % every == 0
        due |= bool(minutes) and time.monotonic() - self.last_saved >= minutes * 60
        # every rank stops, and saves, after the same step (saving gathers every rank's position)
        signum, due = self.loop.processes.agree_stop(self.stop.signum, due)
        if signum is not None or (due and pos.batches_done < steps):
            self.save(self.epoch - 1, pos, self.loader_state)
        if signum is not None:
            where = f"epoch {self.epoch}, batch {pos.batches_done}"
            raise Interrupted(signum, self.loop.recorder.run_dir, where)

    def end_epoch(self) -> None:
        self.save(self.epoch, EpochPosition(), self.loop.train_loader.generator.get_state())

    def save(self, epochs_done: int, pos: EpochPosition, loader_state: torch.Tensor) -> None:
        """Every rank calls it: each one's random state and share of the epoch's loss go into the
        state that rank 0 alone writes."""
        ranks = self.loop.processes.gather({"rng": rng_state(), "loss_sum": pos.loss_sum, "seen": pos.seen})
        self.last_saved = time.monotonic()
        if not self.loop.processes.main:  # rank 0 writes the run's one state
            return
        recorder, steps = self.loop.recorder, len(self.loop.train_loader)
        step = epochs_done * steps + pos.batches_done
        require_finite(self.loop.model, f"{recorder.run_dir}: the training state at step {step}", self.opt.optimizer)
        counters = {"epoch": epochs_done, "batches_done": pos.batches_done, "global_step": step,
                    "loader_generator": loader_state, "best": list(recorder.best), "best_epoch": recorder.best_epoch,
                    "processes": self.loop.processes.world, "ranks": ranks, **self.opt.extra_state()}
        save_state(recorder.run_dir, self.loop.model, self.opt.optimizer, self.opt.scheduler, counters,
                   self.loop.cfg.checkpoint.keep_last)


def train_one_epoch(loop: Loop, opt: Optimisation, task: int, position: EpochPosition | None = None,
                    rng_at_position: dict | None = None, after_step: Callable[[EpochPosition], None] | None = None
                    ) -> float:
    """One pass over the training loader; returns the mean training loss. With `position`, the
    batches already done are passed over and the random-number state at that point is restored
    (`rng_at_position`); `after_step(position)` runs after every step (signal checks, states).
    `task`: the progress bar that counts the images."""
    set_train_mode(loop.model, loop.cfg.optim.freeze_bn)
    pos = position or EpochPosition()
    loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64, device=loop.device)
    skip = pos.batches_done
    # The random state must be back before the loader draws the first batch still to do (its
    # augmentations use it), so it is restored before iterating, or after the last skipped batch.
    if skip == 0 and rng_at_position is not None:
        set_rng_state(rng_at_position)
    for index, batch in enumerate(loop.train_loader):
        if index < skip:
            if index == skip - 1 and rng_at_position is not None:
                set_rng_state(rng_at_position)
            continue
        ends_window = (index + 1) % opt.accumulate == 0 or index + 1 == len(loop.train_loader)
        with loop.processes.no_sync(loop.wrapped, ends_window):  # ranks sum gradients once a window
            with opt.precision.autocast():
                loss, n = loop.loss_fn(loop.model if loop.wrapped is None else loop.wrapped, batch)
            pos.batches_done = index + 1
            stop_on_nonfinite(loop, loop.processes.agree_finite(loss.detach()), batch, pos)
            # the mean over the window's batches: K batches give the gradient of one K-times batch
            opt.precision.backward(loss / window_size(index, len(loop.train_loader), opt.accumulate))
        loss_sum += loss.detach().double() * n
        pos.seen += n
        loop.progress.advance_and_draw(task, n * loop.processes.world)  # every process has a batch as big
        if not ends_window:
            continue  # the window goes on
        optimiser_step(loop.model, opt)
        if after_step is not None:
            pos.loss_sum = float(loss_sum)
            after_step(pos)
    totals = loop.processes.sum(torch.tensor([float(loss_sum), pos.seen], dtype=torch.float64))
    return float(totals[0]) / max(float(totals[1]), 1)  # over every rank's images


def stop_on_nonfinite(loop: Loop, loss: torch.Tensor, batch: Any, pos: EpochPosition) -> None:
    """A NaN or inf loss ends the run here, before it can reach the weights or any saved file (under
    torchrun, every rank stops at the same step: `loss` is NaN on all when it is on one)."""
    steps, k = len(loop.train_loader), loop.cfg.optim.accumulate
    step = (pos.epoch - 1) * steps + pos.batches_done
    updates = (pos.epoch - 1) * optimiser_steps(steps, k) + (pos.batches_done - 1) // k  # before this batch
    try:
        check_loss(loss, loop.model, batch, updates, loop.cfg.optim.lr)
    except NonFiniteError as exc:
        run_dir = loop.recorder.run_dir
        states = sorted(p.name for p in (run_dir / STATES).glob("step-*") if p.is_dir())
        kept = f"the newest training state is {states[-1]}, from before it" if states else "no state was saved yet"
        raise NonFiniteError(f"{run_dir}: stopped at epoch {pos.epoch}, step {step} (batch {pos.batches_done} of "
                             f"{steps}): {exc}; {kept}") from None


def window_size(index: int, batches: int, accumulate: int) -> int:
    """Batches in the accumulation window of batch `index` (0-based): K, or fewer for the last one."""
    start = index - index % accumulate
    return min(accumulate, batches - start)


def optimiser_step(model: nn.Module, opt: Optimisation) -> None:
    """The end of a window: the optimiser's step (fp16's scaler passes over one with inf gradients),
    the schedule's either way, and the EMA follows the new weights. (A non-finite loss never gets
    here: it stops the run.)"""
    opt.precision.step(opt.optimizer)
    opt.optimizer.zero_grad(set_to_none=True)
    if opt.ema is not None:
        opt.ema.update(model)
    with opt.precision.quiet_schedule():
        opt.scheduler.step()


def open_stages(loop: Loop, epoch: int, stages: int, in_optimizer: set[int]) -> str:
    """gradual_unfreeze: the head and one more stage from the top every unfreeze.every epochs."""
    n = min(stages, (epoch - 1) // loop.cfg.unfreeze.every)
    trainable = unfreeze_stages(loop.model, loop.head_patterns, n, in_optimizer)
    return f"unfreeze {n}/{stages} stages, {trainable} tensors"


def run_finetune(loop: Loop, resume: ResumePoint | None = None) -> None:
    """Train through the images for schedule.epochs (gradual_unfreeze opens stages as it goes).
    Saves the training state at every epoch end, and mid-epoch on SIGINT/SIGTERM; with `resume`,
    continues exactly where that state was taken."""
    cfg = loop.cfg
    opt = build_optimisation(loop)
    in_optimizer = {id(p) for g in opt.optimizer.param_groups for p in g["params"]}
    stages = stage_count(loop.model) if cfg.strategy == "gradual_unfreeze" else 0
    first_epoch, position, rng = 1, None, None  # epochs of this phase
    if resume is not None:
        state = resume.state
        loop.processes.check_resume(state.get("processes", 1), resume.dir)
        opt.optimizer.load_state_dict(state["optimizer"])
        opt.scheduler.load_state_dict(state["scheduler"])  # the step count; the rule is this run's
        loop.train_loader.generator.set_state(state["loader_generator"])
        opt.load_extra_state(state)
        mine = rank_state(state, loop.processes.rank)  # this rank's random state and share of the epoch
        first_epoch, rng = state["epoch"] + 1, mine["rng"]
        position = EpochPosition(state["batches_done"], mine["loss_sum"], mine["seen"])
    elif cfg.pretrained.with_optimizer:
        carry_optimizer_state(cfg.pretrained.source, opt.optimizer, loop.say)

    with StopSignals() as stop:
        states = StateSaver(loop, opt, stop)
        for epoch in range(first_epoch, cfg.schedule.epochs + 1):
            phase = open_stages(loop, epoch, stages, in_optimizer) if stages else "finetune"
            t0 = time.perf_counter()
            states.start_epoch(epoch)
            position = position or EpochPosition()
            position.epoch = epoch
            # The bar counts every process's images (each process gets as many), from those a resumed
            # epoch has done.
            world = loop.processes.world
            task = loop.progress.add_task(f"epoch {epoch}", total=world * images_per_epoch(loop.train_loader),
                                          completed=world * position.seen)
            train_loss = train_one_epoch(loop, opt, task, position, rng, states.after_step)
            loop.progress.remove_task(task)
            position, rng = None, None
            if loop.processes.main:  # the whole validation set, scored once
                record_epoch(loop, opt, phase, train_loss, t0)
            states.end_epoch()


def record_epoch(loop: Loop, opt: Optimisation, phase: str, train_loss: float, t0: float) -> None:
    """Score the epoch's weights (and the EMA's) on the validation set and record them."""
    metrics = loop.eval_fn(loop.model, loop.val_loader)
    if opt.ema is not None:  # the EMA's weights, scored the same way
        metrics.update({f"ema_{k}": v for k, v in loop.eval_fn(opt.ema.module, loop.val_loader).items()})
    groups = opt.optimizer.param_groups
    loop.recorder.record(phase, train_loss, metrics, t0,
                         [(g["name"], g["lr"]) for g in groups])  # each group is named by its rule (optim.py)
