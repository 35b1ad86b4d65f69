"""What two ranks exchange, each giving something of its own, run by torchrun:

    torchrun --nproc-per-node 2 tests/helpers/rank_exchange.py OUT

Rank 1 alone got a stop signal (then both ranks), finds a state due, and has a non-finite loss;
every rank must see the same. Each rank writes what it got back to OUT/rank-N.json (lines printed
by two processes would interleave).
"""

import json
import sys
from pathlib import Path

import torch

from transferkit.training.distributed import from_environment

processes = from_environment(torch.device("cpu"))
rank = processes.rank
signum, due = processes.agree_stop(15 if rank == 1 else None, due=rank == 1)
both = processes.agree_stop(15)  # torchrun passes a SIGTERM to every rank: still SIGTERM
loss = processes.agree_finite(torch.tensor(float("inf") if rank == 1 else 2.0))
parts = processes.gather({"rank": rank, "seen": torch.tensor([8 + rank], dtype=torch.uint32)})
summed = processes.sum(torch.tensor([1.0 + rank, 10.0]))
got = {"rank": rank, "signum": signum, "due": due, "both": list(both), "loss": str(loss.item()),
       "parts": [[p["rank"], p["seen"].tolist()] for p in parts], "sum": summed.tolist()}
(Path(sys.argv[1]) / f"rank-{rank}.json").write_text(json.dumps(got))
processes.close()
