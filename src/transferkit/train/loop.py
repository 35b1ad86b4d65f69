"""The training loop: train, evaluate, checkpoint and log, epoch by epoch, into a run directory."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml
from torch import nn

from transferkit.config import Config
from transferkit.data.classification import ImageDataset
from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write, write_json, write_text
from transferkit.progress import console, make_progress
from transferkit.train.build import (
    build_classifier,
    dataset_classes,
    load_classification_data,
    make_loader,
    place_model,
    seed_everything,
    select_device,
)
from transferkit.train.checkpoint import load_weights, save_weights
from transferkit.train.evaluate import classification_metrics, evaluate
from transferkit.train.optim import (
    build_optimizer,
    build_scheduler,
    freeze_batchnorm,
    plan_params,
    plan_table,
    set_train_mode,
)
from transferkit.train.resume import (
    SAFE_TO_CHANGE,
    config_changes,
    find_state,
    load_state,
    save_state,
    set_rng_state,
)
from transferkit.train.runlog import MetricsLog, plot_curves, summary_table
from transferkit.train.strategies import (
    extract_features,
    probe_head,
    probe_logits,
    stage_count,
    train_probe_epoch,
    unfreeze_stages,
)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]
    best_epoch: int
    best_metric: str  # val_acc, val_loss or val_map
    best_value: float
    seconds: float


def default_run_dir(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def refuse_existing_run(run_dir: Path) -> Path:
    if (run_dir / "metrics.jsonl").exists():
        raise TransferKitError(f"{run_dir} already holds a run (metrics.jsonl); choose another --out")
    return run_dir


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

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class NonFiniteGuard:
    """Skips steps whose loss is NaN or inf; too many in a row stops the run."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def ok(self, loss: torch.Tensor, where: str) -> bool:
        if torch.isfinite(loss):
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            raise TransferKitError(
                f"the loss was not finite (NaN or inf) for {self.in_row} steps in a row, last at {where}; "
                "lower optim.lr, or check the data and labels"
            )
        return False


@dataclass
class EpochPosition:
    """Where an epoch stands: batches done and the running loss (for resuming inside an epoch)."""

    batches_done: int = 0
    loss_sum: float = 0.0
    seen: int = 0


def classification_loss(criterion, device, channels_last: bool):
    """batch -> (loss, batch size) for a classifier."""
    def loss_fn(model, batch):
        images, labels = batch
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        return criterion(model(images), labels), len(labels)
    return loss_fn


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, device, progress, task,
                    freeze_bn: bool = False, position: EpochPosition | None = None, guard=None,
                    after_step=None, rng_at_position: dict | None = None) -> float:
    """One pass over `loader`; returns the mean training loss. `loss_fn(model, batch)` gives the
    batch's loss and size (classification_loss, or the detector's summed losses). With `position`,
    the batches already done are passed over and the random-number state at that point is restored
    (`rng_at_position`); `after_step(position)` runs after every step (signal checks, checkpoints)."""
    set_train_mode(model, freeze_bn)
    pos = position or EpochPosition()
    loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64, device=device)
    skip = pos.batches_done
    # The random state must be back before the loader draws the first batch still to do (its
    # augmentations use it), so it is restored before iterating, or after the last skipped batch.
    if skip == 0 and rng_at_position is not None:
        set_rng_state(rng_at_position)
    for index, batch in enumerate(loader):
        if index < skip:
            if index == skip - 1 and rng_at_position is not None:
                set_rng_state(rng_at_position)
            continue
        loss, n = loss_fn(model, batch)
        pos.batches_done = index + 1
        if guard is None or guard.ok(loss.detach(), f"batch {index + 1}"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * n
            pos.seen += n
        scheduler.step()
        if progress is not None:
            progress.advance_and_draw(task, n)
        if after_step is not None:
            pos.loss_sum = float(loss_sum)
            after_step(pos)
    return float(loss_sum) / max(pos.seen, 1)


class EpochRecorder:
    """Logs each epoch to metrics.jsonl, writes last/best checkpoints, keeps the best."""

    def __init__(self, run_dir: Path, model: nn.Module, meta: dict, say, keep_epochs: int | None = None,
                 best_metric: str = "val_acc"):
        """`keep_epochs`: on a resume, the epochs already done; later rows (from an epoch that was
        cut short) are dropped, so that each epoch appears in metrics.jsonl exactly once."""
        self.run_dir, self.model, self.meta, self.say = run_dir, model, meta, say
        self.best_metric = best_metric
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        if keep_epochs is not None and self.log.path.exists():
            self.log.rows = [r for r in read_metrics(run_dir) if r["epoch"] <= keep_epochs]
            write_text(self.log.path, "".join(json.dumps(r) + "\n" for r in self.log.rows))
        self.best, self.best_epoch = (-1.0, float("inf")), 0

    def is_better(self, row: dict) -> bool:
        if self.best_metric == "val_loss":
            return row["val_loss"] < self.best[1]
        loss = row.get("val_loss", 0.0)  # ties go to the lower loss, where there is one
        return (row[self.best_metric], -loss) > (self.best[0], -self.best[1])

    @property
    def epoch(self) -> int:
        return len(self.log.rows)

    def record(self, phase: str, train_loss: float, metrics: dict, lr: float, t0: float) -> None:
        row = {"epoch": self.epoch + 1, "train_loss": train_loss, **metrics, "lr": lr,
               "seconds": time.perf_counter() - t0, "phase": phase}
        self.log.append(row)
        checkpoints = self.run_dir / "checkpoints"
        save_weights(self.model, checkpoints / "last.safetensors", {**self.meta, **row})
        if self.is_better(row):
            value = row["val_loss"] if self.best_metric == "val_loss" else row[self.best_metric]
            self.best, self.best_epoch = (value, row.get("val_loss", 0.0)), row["epoch"]
            save_weights(self.model, checkpoints / "best.safetensors", {**self.meta, **row})
        shown = "  ".join(f"{k} {row[k]:.4f}" for k in ("val_loss", "val_acc", "val_map", "val_ap50") if k in row)
        self.say(f"epoch {row['epoch']} ({phase}): train_loss {train_loss:.4f}  {shown}  ({row['seconds']:.1f}s)",
                 highlight=False)


def run_finetune(cfg: Config, model, family, loaders, device, loss_fn, eval_fn, recorder: EpochRecorder, progress,
                 say, resume_state: dict | None = None):
    """Train through the images for schedule.epochs (gradual_unfreeze opens stages as it goes).
    `loaders`: (train, val); `eval_fn(model, val_loader)` gives the epoch's validation metrics.
    Saves the training state at every epoch end, and mid-epoch on SIGINT/SIGTERM; with
    `resume_state`, continues exactly where that state was taken."""
    plan = plan_params(model, family.head_patterns, cfg.optim)
    optimizer = build_optimizer(model, family.head_patterns, cfg.optim, plan)
    say(plan_table(plan))
    train_loader, val_loader = loaders
    scheduler = build_scheduler(optimizer, cfg.schedule, len(train_loader))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    stages = stage_count(model) if cfg.strategy == "gradual_unfreeze" else 0
    guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps)
    first_epoch, position, rng = 1, None, None  # epochs of this phase
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])  # the step count; the rule is this run's
        first_epoch = resume_state["epoch"] + 1
        position = EpochPosition(resume_state["batches_done"], resume_state["loss_sum"], resume_state["seen"])
        train_loader.generator.set_state(resume_state["loader_generator"])
        rng = resume_state["rng"]
        guard.total = resume_state.get("nonfinite_total", 0)
    elif cfg.pretrained.with_optimizer:
        carry_optimizer_state(cfg, optimizer, say)

    def counters(epoch_done: int, pos: EpochPosition, loader_state: torch.Tensor) -> dict:
        return {"epoch": epoch_done, "batches_done": pos.batches_done, "loss_sum": pos.loss_sum,
                "seen": pos.seen, "global_step": epoch_done * len(train_loader) + pos.batches_done,
                "loader_generator": loader_state, "best": list(recorder.best), "best_epoch": recorder.best_epoch,
                "nonfinite_total": guard.total}

    last_saved = [time.monotonic()]
    with StopSignals() as stop:
        for epoch in range(first_epoch, cfg.schedule.epochs + 1):
            phase = "finetune"
            if stages:
                open_stages = min(stages, (epoch - 1) // cfg.unfreeze.every)
                trainable = unfreeze_stages(model, family.head_patterns, open_stages, in_optimizer)
                phase = f"unfreeze {open_stages}/{stages} stages, {trainable} tensors"
            t0 = time.perf_counter()
            loader_state = train_loader.generator.get_state()  # this epoch's data order comes from here

            def after_step(pos: EpochPosition, epoch=epoch, loader_state=loader_state) -> None:
                every, minutes = cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes
                due = bool(every) and ((epoch - 1) * len(train_loader) + pos.batches_done) % every == 0
                due |= bool(minutes) and time.monotonic() - last_saved[0] >= minutes * 60
                if stop.signum is not None or (due and pos.batches_done < len(train_loader)):
                    save_state(recorder.run_dir, model, optimizer, scheduler,
                               counters(epoch - 1, pos, loader_state), cfg.checkpoint.keep_last)
                    last_saved[0] = time.monotonic()
                if stop.signum is not None:
                    raise Interrupted(stop.signum, recorder.run_dir, f"epoch {epoch}, batch {pos.batches_done}")

            task = progress.add_task(f"epoch {epoch}", total=len(train_loader.dataset), info="")
            train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, device, progress, task,
                                         cfg.optim.freeze_bn, position, guard, after_step, rng if position else None)
            progress.remove_task(task)
            position, rng = None, None
            metrics = eval_fn(model, val_loader)
            if guard.total:
                metrics["nonfinite_steps"] = guard.total
            recorder.record(phase, train_loss, metrics, optimizer.param_groups[0]["lr"], t0)
            save_state(recorder.run_dir, model, optimizer, scheduler,
                       counters(epoch, EpochPosition(), train_loader.generator.get_state()),
                       cfg.checkpoint.keep_last)
            last_saved[0] = time.monotonic()


def carry_optimizer_state(cfg: Config, optimizer, say) -> None:
    """pretrained.with_optimizer: the source run's optimiser state (momentum, moments), with this
    run's own learning rates."""
    source = Path(str(cfg.pretrained.source or ""))
    if not (source / "config.yaml").is_file():
        raise TransferKitError("pretrained.with_optimizer needs pretrained.source to be a run directory")
    state_dir = find_state(source, say)
    lrs = [(g["lr"], g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(load_state(state_dir)["optimizer"])
    except ValueError as exc:
        raise TransferKitError(
            f"the optimiser state of {state_dir} does not fit this run ({exc}); keep the same optim "
            "settings, or set pretrained.with_optimizer=false"
        ) from None
    for group, (lr, initial) in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"], group["initial_lr"] = lr, initial
    say(f"optimiser state carried from {state_dir}", highlight=False)


def run_probe(cfg: Config, model, family, data, device, criterion, epochs: int, recorder: EpochRecorder,
              progress, say):
    """Linear probe: backbone features computed once, the head trained on them."""
    t0 = time.perf_counter()
    if cfg.probe.augment:
        train_feats, train_labels = extract_features(model, data.train_set, cfg, device, cfg.probe.views, progress)
    else:
        plain = ImageDataset(data.train_set.split, data.val_set.transform, data.train_set.cache)
        train_feats, train_labels = extract_features(model, plain, cfg, device, 1, progress)
    val_feats, val_labels = extract_features(model, data.val_set, cfg, device, 1, progress)
    if cfg.probe.cache == "disk":
        path = recorder.run_dir / "probe_features.pt"
        atomic_write(path, lambda tmp: torch.save({"train": train_feats.cpu(), "val": val_feats.cpu()}, tmp))
        cached = torch.load(path, weights_only=True, mmap=True)
        train_feats, val_feats = cached["train"], cached["val"]
    say(f"probe: features of {train_labels.shape[0]} train x {train_feats.shape[0]} view(s) and "
        f"{val_labels.shape[0]} val images cached ({cfg.probe.cache}, {time.perf_counter() - t0:.1f}s)",
        highlight=False)
    head = probe_head(model)
    lr = cfg.probe.lr or cfg.optim.lr * cfg.optim.head_lr_mult
    probe_optim = cfg.optim.model_copy(update={"lr": lr, "head_lr_mult": 1.0, "param_groups": [],
                                               "freeze_until": None, "layer_decay": None})
    optimizer = build_optimizer(head, (), probe_optim)
    steps = -(-train_labels.shape[0] // cfg.data.batch_size)
    scheduler = build_scheduler(optimizer, cfg.schedule.model_copy(update={"epochs": epochs}), steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epochs):
        t_epoch = time.perf_counter() if recorder.epoch else t0  # the first epoch pays for the features
        loss = train_probe_epoch(model, train_feats, train_labels, optimizer, scheduler, criterion,
                                 cfg.data.batch_size, generator, cfg.model.drop_rate)
        metrics = classification_metrics(probe_logits(model, val_feats), val_labels.cpu())
        recorder.record("probe", loss, metrics, optimizer.param_groups[0]["lr"], t_epoch)
    head.train()


def prepare_resume(run_dir: Path, cfg: Config, allow: list[str], say) -> tuple[Path, dict]:
    """Check that `cfg` may continue the run in `run_dir`; returns the state to continue from."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise TransferKitError(f"{run_dir} is not a run directory (no config.yaml); give the --out of a train run")
    if cfg.strategy in ("linear_probe", "lp_ft"):
        raise TransferKitError(f"resuming strategy {cfg.strategy} is not supported; start the run again")
    saved = yaml.safe_load(saved_path.read_text())
    new = cfg.to_dict()
    new["model"]["num_classes"] = saved["model"]["num_classes"]
    changes = {k: v for k, v in config_changes(saved, new).items() if k != "out"}
    refused = {k: v for k, v in changes.items() if k not in allow}
    if refused:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise TransferKitError(
            f"the config differs from the run's ({diff}); resume with the run's own config, or allow "
            f"keys with --allow-config-change (only {', '.join(SAFE_TO_CHANGE)})"
        )
    unsafe = sorted(set(allow) - set(SAFE_TO_CHANGE))
    if unsafe:
        raise TransferKitError(f"--allow-config-change: {', '.join(unsafe)} cannot change in a resumed run")
    state_dir = find_state(run_dir, say)
    return state_dir, load_state(state_dir)


def train(cfg: Config, out: str | Path | None = None, config_path: str | Path | None = None,
          quiet: bool = False, resume: str | Path | None = None, allow_config_change: list[str] = ()
          ) -> TrainResult:
    """Run the whole pass the config describes and write the run directory. With `resume` (a run
    directory), continue that run from its newest intact training state."""
    started = time.perf_counter()
    say = (lambda *a, **k: None) if quiet else console.print
    if resume is not None:
        run_dir = Path(resume)
        state_dir, state = prepare_resume(run_dir, cfg, list(allow_config_change), say)
    else:
        run_dir = refuse_existing_run(Path(out or cfg.out or default_run_dir(config_path)))
        state_dir = state = None
    device = select_device(cfg.device)
    seed_everything(cfg.seed)

    if cfg.task == "detection":
        from transferkit.train.detection import (
            build_detector,
            detection_eval,
            detection_loaders,
            detection_loss,
            load_detection_data,
        )

        if cfg.strategy != "finetune":
            raise TransferKitError(f"strategy {cfg.strategy} is for classifiers; detection fine-tunes (finetune)")
        data = load_detection_data(cfg)
        classes = data.classes
        model, family, report = build_detector(cfg, classes, restore=state is None)
        loaders = detection_loaders(cfg, data)
        loss_fn, eval_fn = detection_loss(device), detection_eval(cfg, data, device)
        channels_last = False  # torchvision's detection transform batches the images itself
    else:
        classes = dataset_classes(cfg.data)
        model, family, report = build_classifier(cfg, classes, restore=state is None)
        data = load_classification_data(cfg.data, family.preprocessing, classes)
        loaders = None  # made in run_finetune's place below, after the probe
        channels_last = cfg.model.channels_last
        loss_fn = classification_loss(nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), device,
                                      channels_last)
        eval_fn = lambda model, loader: evaluate(model, loader, device, channels_last)  # noqa: E731
    num_classes = len(classes)

    # The run directory is made only once data and weights have been read without error.
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_copy(deep=True)
    resolved.model.num_classes = num_classes
    write_text(run_dir / "config.yaml", resolved.to_yaml())
    write_json(run_dir / "classes.json", classes)
    if state is not None:
        load_weights(model, state_dir / "model.safetensors")
        say(f"resuming {run_dir} from {state_dir.name}: epoch {state['epoch'] + 1}, "
            f"batch {state['batches_done'] + 1}", highlight=False)
    elif report is not None:
        write_json(run_dir / "transfer_report.json", report.to_dict())
        say(report.table())
        for line in report.summary_lines()[1:]:
            say(line, highlight=False)
    else:
        say("no pretrained source: training from scratch")
    skipped = sum(len(s.bad) for s in (data.train, data.val) if s is not None)
    say(f"data: {len(data.train_set)} train / {len(data.val_set)} val images, {num_classes} classes"
        + (f", {skipped} undecodable skipped" if skipped else ""), highlight=False)

    place_model(model, device, channels_last)
    if cfg.optim.freeze_bn:
        freeze_batchnorm(model)
    best_metric = cfg.best_metric
    recorder = EpochRecorder(run_dir, model, {"model": cfg.model.name, "classes": classes, "task": cfg.task}, say,
                             keep_epochs=state["epoch"] if state is not None else None, best_metric=best_metric)
    if state is not None:
        recorder.best, recorder.best_epoch = tuple(state["best"]), state["best_epoch"]
    with make_progress(disable=quiet) as progress:
        if cfg.strategy in ("linear_probe", "lp_ft"):
            epochs = cfg.schedule.epochs if cfg.strategy == "linear_probe" else cfg.probe.epochs
            criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
            run_probe(cfg, model, family, data, device, criterion, epochs, recorder, progress, say)
        if cfg.strategy != "linear_probe":
            if loaders is None:
                loaders = (make_loader(data.train_set, cfg.data.batch_size, True, cfg.data.num_workers, cfg.seed),
                           make_loader(data.val_set, cfg.data.batch_size, False, cfg.data.num_workers, cfg.seed))
            run_finetune(cfg, model, family, loaders, device, loss_fn, eval_fn, recorder, progress, say, state)
    log, best, best_epoch = recorder.log, recorder.best, recorder.best_epoch

    plot_curves(log.rows, run_dir / "curves.png", title=f"{cfg.model.name} on {cfg.data.root.name}")
    seconds = time.perf_counter() - started
    summary = {"best_epoch": best_epoch, f"best_{best_metric}": best[0], "final": log.rows[-1], "seconds": seconds}
    write_json(run_dir / "summary.json", summary)
    if not quiet:
        console.print(summary_table(log.rows, best_epoch))
        console.print(f"best {best_metric} {best[0]:.4f} at epoch {best_epoch}; {seconds:.0f}s; run dir {run_dir}",
                      highlight=False)
    return TrainResult(run_dir, log.rows, best_epoch, best_metric, best[0], seconds)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
