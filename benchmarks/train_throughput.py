"""transferkit's training loop vs a plain hand-written PyTorch loop: same model, data, batch size.

Both loops get the same DataLoader (hymenoptera train images when ../shared/data is present,
else the synthetic set), a copy of the same pretrained model in the same memory format, and SGD.
Epochs alternate between the two loops so that machine drift hits both alike. Each full batch's
step time (data, forward, backward, update, bookkeeping) is recorded by a wrapper around the
loader; the rate printed is batch size / median step time, which a burst of other work on the
machine does not move, then the ratio (target: >= 0.97).

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
from transferkit.data.classification import dataset_classes, load_classification_data, make_loader
from transferkit.data.synthetic import make_synthetic_classification
from transferkit.progress import make_progress
from transferkit.tasks.classification import ClassificationTask, build_model
from transferkit.training.device import place_model
from transferkit.training.loop import Loop, Optimisation, train_one_epoch
from transferkit.training.optim import build_optimizer, build_scheduler

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


class TimedLoader:
    """Iterates a loader and records the time between consecutive full batches."""

    def __init__(self, loader, batch_size: int):
        self.loader, self.batch_size, self.steps = loader, batch_size, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        last = None
        for images, labels in self.loader:
            now = time.perf_counter()
            if last is not None and last[1] == self.batch_size:
                self.steps.append(now - last[0])
            last = (now, len(labels))
            yield images, labels
        if last is not None and last[1] == self.batch_size:
            self.steps.append(time.perf_counter() - last[0])


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
    loss_fn = ClassificationTask(cfg).loss(device)

    plain = place_model(copy.deepcopy(model), device, cl)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    ours = place_model(copy.deepcopy(model), device, cl)
    ours_opt = build_optimizer(ours, family.head_patterns, cfg.optim)
    sched = build_scheduler(ours_opt, cfg.schedule, len(loader))
    opt = Optimisation(ours_opt, sched)

    images = len(data.train_set)
    bs = cfg.data.batch_size
    timed = {"plain": TimedLoader(loader, bs), "transferkit": TimedLoader(loader, bs)}
    epoch_rates: dict[str, list[float]] = {"plain": [], "transferkit": []}
    with make_progress() as progress:
        for epoch in range(args.epochs + 1):  # epoch 0 warms both up and is not counted
            for name in ("plain", "transferkit") if epoch % 2 else ("transferkit", "plain"):
                if epoch == 1:
                    timed[name].steps.clear()
                t0 = time.perf_counter()
                if name == "plain":
                    plain_epoch(plain, timed[name], plain_opt, criterion, cl)
                else:
                    task = progress.add_task(f"epoch {epoch}", total=images, info="")
                    # the loop's own epoch; validation and recording are not timed (None)
                    loop = Loop(cfg, ours, family.head_patterns, timed[name], None, loss_fn, None, None, progress,
                                device)
                    train_one_epoch(loop, opt, task)
                    progress.remove_task(task)
                if epoch:
                    epoch_rates[name].append(images / (time.perf_counter() - t0))
    rate = {name: bs / statistics.median(t.steps) for name, t in timed.items()}
    print(f"data {root.name}: {images} images, {args.image_size}px, batch {bs}, "
          f"{args.epochs} timed epochs each ({len(timed['plain'].steps)} full batches), "
          f"{torch.get_num_threads()} threads")
    for name in ("plain", "transferkit"):
        per_epoch = ", ".join(f"{r:.2f}" for r in epoch_rates[name])
        print(f"{name + ' loop':<17} {rate[name]:7.2f} images/s by median step  (whole epochs: {per_epoch})")
    print(f"ratio transferkit/plain = {rate['transferkit'] / rate['plain']:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
