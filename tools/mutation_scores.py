"""Per-module counts and score of the last mutation run (read from mutmut's `mutants/**/*.py.meta`).

    .venv/bin/python tools/mutation_scores.py [PATH-PART ...]    e.g. weights/ models/heads.py

The score is killed / (killed + survived); timeouts (a looping mutant, or a slow machine), mutants
without a test and those not checked yet are counted apart. mutmut writes no per-module summary of
its own, hence this reader.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code


def scores(root: Path, parts: list[str]) -> list[str]:
    lines = []
    for meta in sorted(root.rglob("*.py.meta")):
        name = str(meta.relative_to(root))[: -len(".meta")]
        if parts and not any(p in name for p in parts):
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        counts = Counter(status_by_exit_code[c] for c in codes.values())
        killed = counts["killed"]
        decided = killed + counts["survived"]
        score = f"{killed / decided:.1%}" if decided else "-"
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"{name:<48} {len(codes):5} mutants: {detail}; score {score}")
    return lines


if __name__ == "__main__":
    print("\n".join(scores(Path("mutants") / "src", sys.argv[1:])) or "no mutation results under mutants/")
