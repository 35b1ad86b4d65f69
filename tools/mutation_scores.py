"""Per-module counts and score of the last mutation run (read from mutmut's `mutants/**/*.py.meta`).

    .venv/bin/python tools/mutation_scores.py [--markdown] [PATH-PART ...]    e.g. weights/ models/heads.py

The score is killed / (killed + survived); timeouts (a looping mutant, or a slow machine), mutants
without a test and those not checked yet are counted apart. `--markdown` prints the rows of the table
in docs/TESTING.md. mutmut writes no per-module summary of its own, hence this reader.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

COLUMNS = ("killed", "survived", "timeout", "no tests", "not checked")


def counts(root: Path, parts: list[str]) -> dict[str, Counter]:
    """Module path (under src/) -> how many of its mutants ended in each status."""
    out = {}
    for meta in sorted(root.rglob("*.py.meta")):
        name = str(meta.relative_to(root))[: -len(".meta")]
        if parts and not any(p in name for p in parts):
            continue
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        if codes:
            out[name] = Counter(status_by_exit_code[c] for c in codes.values())
    return out


def score(c: Counter) -> str:
    decided = c["killed"] + c["survived"]
    return f"{c['killed'] / decided:.1%}" if decided else "-"


def lines(table: dict[str, Counter]) -> list[str]:
    return [f"{name:<48} {c.total():5} mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            + f"; score {score(c)}" for name, c in table.items()]


def markdown(table: dict[str, Counter]) -> list[str]:
    return [f"| `{name.removeprefix('transferkit/')}` | {c.total()} | " + " | ".join(str(c[k]) for k in COLUMNS)
            + f" | {score(c)} |" for name, c in table.items()]


if __name__ == "__main__":
    args = sys.argv[1:]
    as_markdown = "--markdown" in args
    table = counts(Path("mutants") / "src", [a for a in args if a != "--markdown"])
    print("\n".join((markdown if as_markdown else lines)(table)) or "no mutation results under mutants/")
