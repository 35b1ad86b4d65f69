"""transferkit's training loop vs a plain PyTorch loop, both with mixed precision and channels_last,
on the same model, data and batch size, in one run: images/s of each and their ratio (target >= 0.97).

The data is a fixed set of random images already in memory (pinned), so that neither loop waits on
JPEG decoding and the figure is the loop's own. Epochs alternate between the two loops so that
drift (clocks, other work) hits both alike; the first epoch of each warms up and is not counted.
Meant for a GPU (`--device cuda`); `--device cpu` at a tiny size only shows that it runs.

    python benchmarks/gpu_throughput.py --model resnet50 --image-size 224 --batch-size 128 --amp bf16
    python benchmarks/gpu_throughput.py --device cpu --model test_efficientnet --image-size 32 --batch-size 8 \\
        --images 64 --epochs 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferkit.config import load_config
from transferkit.progress import make_progress
from transferkit.tasks.classification import ClassificationTask
from transferkit.training.device import place_model, select_device
from transferkit.training.loop import Loop, Optimisation, train_one_epoch
from transferkit.training.optim import build_optimizer, build_scheduler
from transferkit.training.precision import DTYPES, MixedPrecision


def plain_epoch(model, loader, optimizer, criterion, device, amp) -> None:
    """The loop a PyTorch user writes: autocast, a GradScaler for fp16, channels_last batches."""
    model.train()
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=DTYPES[amp]):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--images", type=int, default=4096, help="images an epoch")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs of each loop")
    ap.add_argument("--amp", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    device = select_device(args.device)
    cfg = load_config(None, ["data.root=.", f"model.name={args.model}", "pretrained.source=null",
                             f"data.batch_size={args.batch_size}", f"optim.amp={args.amp}", "optim.head_lr_mult=1",
                             f"schedule.epochs={args.epochs + 1}", "model.drop_rate=0.0"])
    task = ClassificationTask(cfg)
    model, family = task.create_model(1000)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, 1000, (args.images,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda", generator=generator)

    plain = place_model(copy.deepcopy(model), device, True)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    ours = place_model(copy.deepcopy(model), device, True)
    ours_opt = build_optimizer(ours, family.head_patterns, cfg.optim)
    opt = Optimisation(ours_opt, build_scheduler(ours_opt, cfg.schedule, len(loader)), MixedPrecision(args.amp, device))
    criterion = nn.CrossEntropyLoss()
    n = len(loader) * args.batch_size
    rates: dict[str, list[float]] = {"plain": [], "transferkit": []}
    with make_progress() as progress:
        for epoch in range(args.epochs + 1):  # epoch 0 warms both up and is not counted
            for name in ("plain", "transferkit") if epoch % 2 else ("transferkit", "plain"):
                synchronize(device)
                t0 = time.perf_counter()
                if name == "plain":
                    plain_epoch(plain, loader, plain_opt, criterion, device, args.amp)
                else:
                    bar = progress.add_task(f"epoch {epoch}", total=n, info="")
                    loop = Loop(cfg, ours, family.head_patterns, loader, None, task.loss(device), None, None,
                                progress, device)
                    train_one_epoch(loop, opt, bar)
                    progress.remove_task(bar)
                synchronize(device)
                if epoch:
                    rates[name].append(n / (time.perf_counter() - t0))
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, {args.image_size}px, batch {args.batch_size}, {args.amp}, channels_last, "
          f"{args.epochs} timed epochs of {n} images each, on {name_of}")
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name in ("plain", "transferkit"):
        per_epoch = ", ".join(f"{r:.1f}" for r in rates[name])
        print(f"{name + ' loop':<17} {median[name]:9.1f} images/s  (epochs: {per_epoch})")
    print(f"ratio transferkit/plain = {median['transferkit'] / median['plain']:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
