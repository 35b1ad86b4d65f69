"""Mixed precision against float32 at the demo's budget: the demo's fine-tune arm (pretrained
EfficientNet-Lite0 on the demo's synthetic set, same seed and config) trained twice, once with
`optim.amp=none` and once with `optim.amp=bf16` (or fp16), on this machine's CPU or GPU; prints
both final accuracies and their difference (target: within 0.02).

    python benchmarks/amp_accuracy.py [--amp bf16] [--epochs 8] [--out runs/amp-accuracy]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from transferkit.config import DEFAULT_SOURCE, load_config
from transferkit.data.synthetic import make_synthetic_classification
from transferkit.demo import DEMO_OVERRIDES
from transferkit.run import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--amp", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/amp-accuracy")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    root = make_synthetic_classification(out / "data", 50, 25, 96, seed=args.seed)  # the demo's set
    results = {}
    for amp in ("none", args.amp):
        cfg = load_config(None, [*DEMO_OVERRIDES, f"data.root={root}", f"schedule.epochs={args.epochs}",
                                 f"seed={args.seed}", f"pretrained.source={DEFAULT_SOURCE}", f"optim.amp={amp}"])
        result = train(cfg, out=out / amp, quiet=True)
        results[amp] = (result.metrics[-1]["val_acc"], result.seconds)
    for amp, (acc, seconds) in results.items():
        print(f"optim.amp={amp:<5} final val_acc {acc:.4f}  ({seconds:.0f}s)")
    diff = results[args.amp][0] - results["none"][0]
    print(f"{args.amp} - fp32 = {diff:+.4f}  (target: within 0.02)")


if __name__ == "__main__":
    main()
