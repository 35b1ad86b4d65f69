"""Linear probe on cached features vs training the head behind a frozen backbone, same data and epochs.

Both start from the same pretrained EfficientNet-Lite0 with the same new head and optimiser
settings, on hymenoptera (../shared/data) or, without it, the synthetic set:
  frozen backbone: every epoch pushes every training image through the (frozen) backbone and
                   trains the head; evaluation pushes the validation images through it too.
  cached (transferkit strategy=linear_probe): the backbone runs once over both splits; every
                   epoch trains the head on the cached features.
Prints both times (total and per epoch after the first), the ratio, and both final accuracies.

    python benchmarks/linear_probe.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from transferkit.config import load_config
from transferkit.data.classification import dataset_classes, load_classification_data, make_loader
from transferkit.data.synthetic import make_synthetic_classification
from transferkit.run import train
from transferkit.tasks.classification import build_classifier
from transferkit.training.device import place_model
from transferkit.training.evaluate import evaluate
from transferkit.training.optim import build_optimizer, build_scheduler
from transferkit.training.runlog import read_metrics

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


def frozen_backbone_run(cfg) -> tuple[list[float], float]:
    """The baseline: head-only training, images through the frozen backbone every epoch."""
    torch.manual_seed(cfg.seed)
    classes = dataset_classes(cfg.data)
    model, family, _ = build_classifier(cfg, classes)
    data = load_classification_data(cfg.data, family.preprocessing, classes)
    place_model(model, torch.device("cpu"), cfg.model.channels_last)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    head_cfg = cfg.optim.model_copy(update={"lr": cfg.optim.lr * cfg.optim.head_lr_mult, "head_lr_mult": 1.0})
    optimizer = build_optimizer(model.get_classifier(), (), head_cfg)
    loader = make_loader(data.train_set, cfg.data.batch_size, True, 0, cfg.seed)
    val_loader = make_loader(data.val_set, cfg.data.batch_size, False, 0, cfg.seed)
    scheduler = build_scheduler(optimizer, cfg.schedule, len(loader))
    criterion = nn.CrossEntropyLoss()
    seconds = []
    for _ in range(cfg.schedule.epochs):
        t0 = time.perf_counter()
        model.eval()  # frozen backbone: BatchNorm statistics stay, dropout off
        for images, labels in loader:
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                feats = model.forward_head(model.forward_features(images), pre_logits=True)
            loss = criterion(model.get_classifier()(feats), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        acc = evaluate(model, val_loader, torch.device("cpu"), cfg.model.channels_last)["val_acc"]
        seconds.append(time.perf_counter() - t0)
    return seconds, acc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    root = HYMENOPTERA if HYMENOPTERA.is_dir() else make_synthetic_classification(tempfile.mkdtemp(), 40, 20)
    overrides = [f"data.root={root}", f"schedule.epochs={args.epochs}", "optim.lr=0.01", "optim.head_lr_mult=1",
                 "model.drop_rate=0", "data.image_size=224"]
    cfg = load_config(None, overrides)
    base_seconds, base_acc = frozen_backbone_run(cfg)

    out = Path(tempfile.mkdtemp()) / "probe"
    train(load_config(None, [*overrides, "strategy=linear_probe"]), out=out, quiet=True)
    rows = read_metrics(out)
    ours = [r["seconds"] for r in rows]
    per_base = sum(base_seconds[1:]) / (len(base_seconds) - 1)
    per_ours = sum(ours[1:]) / (len(ours) - 1)
    print(f"data {root.name}, {args.epochs} epochs, head-only training, {torch.get_num_threads()} threads")
    print(f"frozen backbone, images every epoch: {sum(base_seconds):7.2f}s total, {per_base:.3f}s per later epoch, "
          f"final val_acc {base_acc:.4f}")
    print(f"cached features (linear_probe):      {sum(ours):7.2f}s total, {per_ours:.4f}s per later epoch, "
          f"final val_acc {rows[-1]['val_acc']:.4f} (first epoch includes the one feature pass: {ours[0]:.2f}s)")
    print(f"speed-up: {sum(base_seconds) / sum(ours):.1f}x in total, {per_base / per_ours:.0f}x per later epoch "
          f"(target >= 10x for {args.epochs} epochs)")


if __name__ == "__main__":
    main()
