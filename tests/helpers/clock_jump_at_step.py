"""Runs transferkit's command line with one rank's clock an hour ahead from optimiser step STEP on,
so that `checkpoint.every_minutes` finds a state due on that rank alone:

    torchrun --nproc-per-node 2 tests/helpers/clock_jump_at_step.py RANK STEP -- train -o ... --out RUN

The other ranks' clocks are left alone; the ranks must agree to save after the same step.
"""

import os
import sys
import time

from torch.optim.optimizer import register_optimizer_step_post_hook

from transferkit.cli import main

HOUR = 3600.0


def run(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: clock_jump_at_step.py RANK STEP -- TRANSFERKIT_ARGS...")
    rank, at, steps = argv[0], int(argv[1]), [0]
    real = time.monotonic

    def hook(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == at and os.environ.get("RANK", "0") == rank:
            time.monotonic = lambda: real() + HOUR

    register_optimizer_step_post_hook(hook)
    return main(argv[3:])


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
