"""Runs transferkit's command line with one rank's wall clock an hour ahead from the start, so that
a name the ranks take from their own clocks differs between them:

    torchrun --nproc-per-node 2 tests/helpers/rank_clock_ahead.py RANK -- train -o ...

The other ranks' clocks are left alone.
"""

import os
import sys
from datetime import datetime, timedelta

from transferkit.cli import main
from transferkit.training import rundir


class HourAhead(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + timedelta(hours=1)


def run(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: rank_clock_ahead.py RANK -- TRANSFERKIT_ARGS...")
    if os.environ.get("RANK", "0") == argv[0]:
        rundir.datetime = HourAhead
    return main(argv[2:])


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
