"""Mixed precision against float32 at the demo's budget: the demo's fine-tune arm (pretrained
EfficientNet-Lite0 on the demo's synthetic set, same config) trained twice per seed, once with
`optim.amp=none` and once with `optim.amp=bf16` (or fp16), on this machine's CPU or GPU; prints
both final accuracies per seed, their difference, and the means over the seeds (target: within
0.02). One seed says little: the set's 150 validation images make a run's final accuracy move by
several images from one seed to the next, whatever the precision.

    python benchmarks/amp_accuracy.py [--amp bf16] [--seeds 0 1 2] [--epochs 8] [--out runs/amp-accuracy]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from transferkit.config import DEFAULT_SOURCE, load_config
from transferkit.data.synthetic import make_synthetic_classification
from transferkit.demo import DEMO_OVERRIDES
from transferkit.run import train


def final_accuracy(root: Path, amp: str, seed: int, epochs: int, out: Path) -> tuple[float, float]:
    cfg = load_config(None, [*DEMO_OVERRIDES, f"data.root={root}", f"schedule.epochs={epochs}",
                             f"seed={seed}", f"pretrained.source={DEFAULT_SOURCE}", f"optim.amp={amp}"])
    result = train(cfg, out=out, quiet=True)
    return result.metrics[-1]["val_acc"], result.seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--amp", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/amp-accuracy")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    accs: dict[str, list[float]] = {"none": [], args.amp: []}
    for seed in args.seeds:
        # the seed draws the synthetic set (the demo's at seed 0) and the run's initialisation and order
        root = make_synthetic_classification(out / f"seed{seed}" / "data", 50, 25, 96, seed=seed)
        row = []
        for amp in accs:
            acc, seconds = final_accuracy(root, amp, seed, args.epochs, out / f"seed{seed}" / amp)
            accs[amp].append(acc)
            row.append(f"optim.amp={amp} {acc:.4f} ({seconds:.0f}s)")
        print(f"seed {seed}: " + "  ".join(row) + f"  difference {accs[args.amp][-1] - accs['none'][-1]:+.4f}")
    means = {amp: statistics.mean(values) for amp, values in accs.items()}
    for amp, values in accs.items():
        print(f"optim.amp={amp:<5} mean final val_acc {means[amp]:.4f} (min {min(values):.4f}, max {max(values):.4f})")
    print(f"{args.amp} - fp32, means over {len(args.seeds)} seeds = {means[args.amp] - means['none']:+.4f}"
          "  (target: within 0.02)")


if __name__ == "__main__":
    main()
