"""The training loop: train, evaluate, checkpoint and log, epoch by epoch, into a run directory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
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
from transferkit.train.checkpoint import save_weights
from transferkit.train.evaluate import classification_metrics, evaluate
from transferkit.train.optim import (
    build_optimizer,
    build_scheduler,
    freeze_batchnorm,
    plan_params,
    plan_table,
    set_train_mode,
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
    best_val_acc: float
    seconds: float


def default_run_dir(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def refuse_existing_run(run_dir: Path) -> Path:
    if (run_dir / "metrics.jsonl").exists():
        raise TransferKitError(f"{run_dir} already holds a run (metrics.jsonl); choose another --out")
    return run_dir


def train_one_epoch(model, loader, optimizer, scheduler, criterion, device, channels_last, progress, task,
                    freeze_bn: bool = False):
    """One pass over `loader`; returns the mean training loss."""
    set_train_mode(model, freeze_bn)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double() * len(labels)
        seen += len(labels)
        if progress is not None:
            progress.advance_and_draw(task, len(labels))
    return float(loss_sum) / max(seen, 1)


class EpochRecorder:
    """Logs each epoch to metrics.jsonl, writes last/best checkpoints, keeps the best."""

    def __init__(self, run_dir: Path, model: nn.Module, meta: dict, say):
        self.run_dir, self.model, self.meta, self.say = run_dir, model, meta, say
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.best, self.best_epoch = (-1.0, float("inf")), 0

    @property
    def epoch(self) -> int:
        return len(self.log.rows)

    def record(self, phase: str, train_loss: float, metrics: dict, lr: float, t0: float) -> None:
        row = {"epoch": self.epoch + 1, "train_loss": train_loss, **metrics, "lr": lr,
               "seconds": time.perf_counter() - t0, "phase": phase}
        self.log.append(row)
        checkpoints = self.run_dir / "checkpoints"
        save_weights(self.model, checkpoints / "last.safetensors", {**self.meta, **row})
        if (row["val_acc"], -row["val_loss"]) > (self.best[0], -self.best[1]):
            self.best, self.best_epoch = (row["val_acc"], row["val_loss"]), row["epoch"]
            save_weights(self.model, checkpoints / "best.safetensors", {**self.meta, **row})
        self.say(f"epoch {row['epoch']} ({phase}): train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
                 f"val_acc {row['val_acc']:.4f}  ({row['seconds']:.1f}s)", highlight=False)


def run_finetune(cfg: Config, model, family, data, device, criterion, recorder: EpochRecorder, progress, say):
    """Train through the images for schedule.epochs (gradual_unfreeze opens stages as it goes)."""
    optimizer = build_optimizer(model, family.head_patterns, cfg.optim)
    say(plan_table(plan_params(model, family.head_patterns, cfg.optim)))
    train_loader = make_loader(data.train_set, cfg.data.batch_size, True, cfg.data.num_workers, cfg.seed)
    val_loader = make_loader(data.val_set, cfg.data.batch_size, False, cfg.data.num_workers, cfg.seed)
    scheduler = build_scheduler(optimizer, cfg.schedule, len(train_loader))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    stages = stage_count(model) if cfg.strategy == "gradual_unfreeze" else 0
    for epoch in range(1, cfg.schedule.epochs + 1):
        phase = "finetune"
        if stages:
            open_stages = min(stages, (epoch - 1) // cfg.unfreeze.every)
            trainable = unfreeze_stages(model, family.head_patterns, open_stages, in_optimizer)
            phase = f"unfreeze {open_stages}/{stages} stages, {trainable} tensors"
        t0 = time.perf_counter()
        task = progress.add_task(f"epoch {recorder.epoch + 1}", total=len(data.train_set), info="")
        train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, criterion, device,
                                     cfg.model.channels_last, progress, task, cfg.optim.freeze_bn)
        progress.remove_task(task)
        metrics = evaluate(model, val_loader, device, cfg.model.channels_last)
        recorder.record(phase, train_loss, metrics, optimizer.param_groups[0]["lr"], t0)


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


def train(cfg: Config, out: str | Path | None = None, config_path: str | Path | None = None,
          quiet: bool = False) -> TrainResult:
    """Run the whole pass the config describes and write the run directory."""
    started = time.perf_counter()
    run_dir = refuse_existing_run(Path(out or cfg.out or default_run_dir(config_path)))
    device = select_device(cfg.device)
    seed_everything(cfg.seed)

    classes = dataset_classes(cfg.data)
    model, family, report = build_classifier(cfg, classes)
    num_classes = len(classes)
    data = load_classification_data(cfg.data, family.preprocessing, classes)

    # The run directory is made only once data and weights have been read without error.
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_copy(deep=True)
    resolved.model.num_classes = num_classes
    write_text(run_dir / "config.yaml", resolved.to_yaml())
    write_json(run_dir / "classes.json", classes)
    say = (lambda *a, **k: None) if quiet else console.print
    if report is not None:
        write_json(run_dir / "transfer_report.json", report.to_dict())
        say(report.table())
        for line in report.summary_lines()[1:]:
            say(line, highlight=False)
    else:
        say("no pretrained source: training from scratch")
    skipped = sum(len(s.bad) for s in (data.train, data.val) if s is not None)
    say(f"data: {len(data.train_set)} train / {len(data.val_set)} val images, {num_classes} classes"
        + (f", {skipped} undecodable skipped" if skipped else ""), highlight=False)

    place_model(model, device, cfg.model.channels_last)
    if cfg.optim.freeze_bn:
        freeze_batchnorm(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    recorder = EpochRecorder(run_dir, model, {"model": cfg.model.name, "classes": classes}, say)
    with make_progress(disable=quiet) as progress:
        if cfg.strategy in ("linear_probe", "lp_ft"):
            epochs = cfg.schedule.epochs if cfg.strategy == "linear_probe" else cfg.probe.epochs
            run_probe(cfg, model, family, data, device, criterion, epochs, recorder, progress, say)
        if cfg.strategy != "linear_probe":
            run_finetune(cfg, model, family, data, device, criterion, recorder, progress, say)
    log, best, best_epoch = recorder.log, recorder.best, recorder.best_epoch

    plot_curves(log.rows, run_dir / "curves.png", title=f"{cfg.model.name} on {cfg.data.root.name}")
    seconds = time.perf_counter() - started
    summary = {"best_epoch": best_epoch, "best_val_acc": best[0], "final": log.rows[-1], "seconds": seconds}
    write_json(run_dir / "summary.json", summary)
    if not quiet:
        console.print(summary_table(log.rows, best_epoch))
        console.print(f"best val_acc {best[0]:.4f} at epoch {best_epoch}; {seconds:.0f}s; run dir {run_dir}",
                      highlight=False)
    return TrainResult(run_dir, log.rows, best_epoch, best[0], seconds)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
