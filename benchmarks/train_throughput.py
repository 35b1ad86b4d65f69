"""transferkit's training loop vs a plain hand-written PyTorch loop: same model, data, batch size.

Both loops get the same DataLoader (hymenoptera train images when ../shared/data is present,
else the synthetic set), a copy of the same pretrained model in the same memory format, and SGD.
Epochs alternate between the two loops so that machine drift hits both alike; the median epoch
rate of each is printed with the ratio (target: >= 0.97).

    python benchmarks/train_throughput.py [--epochs 3] [--image-size 224] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from transferkit.config import load_config
from transferkit.data.synthetic import make_synthetic_classification
from transferkit.progress import make_progress
from transferkit.train.build import (
    build_model,
    dataset_classes,
    load_classification_data,
    make_loader,
    place_model,
)
from transferkit.train.loop import train_one_epoch
from transferkit.train.optim import build_optimizer, build_scheduler

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


def plain_epoch(model, loader, optimizer, criterion, channels_last):
    model.train()
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    root = HYMENOPTERA if HYMENOPTERA.is_dir() else make_synthetic_classification(tempfile.mkdtemp(), 60, 10)
    cfg = load_config(None, [f"data.root={root}", f"data.image_size={args.image_size}",
                             f"data.batch_size={args.batch_size}", f"schedule.epochs={args.epochs}"])
    classes = dataset_classes(cfg.data)
    model, family, _ = build_model(cfg, len(classes))
    data = load_classification_data(cfg.data, family.preprocessing, classes)
    loader = make_loader(data.train_set, cfg.data.batch_size, True, cfg.data.num_workers, cfg.seed)
    device = torch.device("cpu")
    cl = cfg.model.channels_last
    criterion = nn.CrossEntropyLoss()

    plain = place_model(copy.deepcopy(model), device, cl)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    ours = place_model(copy.deepcopy(model), device, cl)
    ours_opt = build_optimizer(ours, family.head_patterns, cfg.optim)
    sched = build_scheduler(ours_opt, cfg.schedule, len(loader))

    images = len(data.train_set)
    rates: dict[str, list[float]] = {"plain": [], "transferkit": []}
    with make_progress() as progress:
        for epoch in range(args.epochs + 1):  # epoch 0 warms both up and is not counted
            for name in ("plain", "transferkit") if epoch % 2 else ("transferkit", "plain"):
                t0 = time.perf_counter()
                if name == "plain":
                    plain_epoch(plain, loader, plain_opt, criterion, cl)
                else:
                    task = progress.add_task(f"epoch {epoch}", total=images, info="")
                    train_one_epoch(ours, loader, ours_opt, sched, criterion, device, cl, progress, task)
                    progress.remove_task(task)
                if epoch:
                    rates[name].append(images / (time.perf_counter() - t0))
    p, t = statistics.median(rates["plain"]), statistics.median(rates["transferkit"])
    print(f"data {root.name}: {images} images, {args.image_size}px, batch {args.batch_size}, "
          f"{args.epochs} timed epochs each, {torch.get_num_threads()} threads")
    print(f"plain loop        {p:7.2f} images/s  (epochs: {', '.join(f'{r:.2f}' for r in rates['plain'])})")
    print(f"transferkit loop  {t:7.2f} images/s  (epochs: {', '.join(f'{r:.2f}' for r in rates['transferkit'])})")
    print(f"ratio transferkit/plain = {t / p:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
