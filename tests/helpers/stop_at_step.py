"""Runs transferkit's command line with a hook that stops the run at a known point, right after
optimiser step STEP, instead of a signal sent from outside after a sleep (which races the run):

    python tests/helpers/stop_at_step.py SIGNAL STEP -- train -o ... --out RUN
    torchrun --nproc-per-node 2 tests/helpers/stop_at_step.py SIGNAL STEP -- train -o ... --out RUN

The step's training state is not written yet when the hook runs: the newest state on disk is the
last one saved before STEP. Under torchrun, rank 0 acts:

- SIGKILL: rank 0 kills its own process group (torchrun starts each rank in a session of its own,
  so the group is rank 0 and any data-loader workers it started), as an out-of-memory killer
  would; torchrun then ends the other ranks. Without torchrun, this process alone.
- SIGINT, SIGTERM: sent to torchrun, which passes it on to every rank; the hook waits until it
  has reached this process, so the loop sees it at this step's check. Without torchrun, this
  process signals itself.
"""

import os
import signal
import sys
import time

from torch.optim.optimizer import register_optimizer_step_post_hook

from transferkit.cli import main

WAIT_SECONDS = 60  # for torchrun to pass a signal back


def stop(sig: int) -> None:
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if sig == signal.SIGKILL:
        if torchrun and os.getpgid(0) == os.getpid():  # the leader of a group of our own, not the test's
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if not torchrun:
        os.kill(os.getpid(), sig)  # the handler runs before the next line
        return
    handler, arrived = signal.getsignal(sig), []
    if not callable(handler):
        raise SystemExit(f"stop_at_step: nothing in the run handles signal {sig} at this step")

    def relay(signum, frame):  # note the arrival, then do what the run's own handler does
        arrived.append(signum)
        handler(signum, frame)

    signal.signal(sig, relay)
    os.kill(os.getppid(), sig)  # torchrun, which started this process
    deadline = time.monotonic() + WAIT_SECONDS
    while not arrived:
        if time.monotonic() > deadline:
            raise SystemExit(f"stop_at_step: torchrun did not pass signal {sig} on within {WAIT_SECONDS} s")
        time.sleep(0.01)
    signal.signal(sig, handler)


def run(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: stop_at_step.py SIGNAL STEP -- TRANSFERKIT_ARGS...")
    sig, at, steps = int(argv[0]), int(argv[1]), [0]

    def hook(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == at and os.environ.get("RANK", "0") == "0":
            stop(sig)

    register_optimizer_step_post_hook(hook)
    return main(argv[3:])


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
