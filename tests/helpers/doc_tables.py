"""The figures a doc page prints beside a command, read back so that a test can re-run the command
and compare: the first Markdown table after the command (a shell line, continuation lines joined)."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def table_after(page: str, command: str) -> dict[str, list[str]]:
    """Rows of the first table after the shell line `command` in docs/`page`, keyed by their first
    cell (the other cells in order); fails naming the page when the command or its table is missing."""
    lines = (DOCS / page).read_text().splitlines()
    start = None
    for i, line in enumerate(lines):
        end, joined = i, line
        while joined.endswith("\\") and end + 1 < len(lines):
            end += 1
            joined = joined[:-1] + " " + lines[end]
        if " ".join(joined.split()) == command:
            start = end
            break
    assert start is not None, f"docs/{page} no longer shows {command!r}"
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):  # not the separator row
                rows[cells[0]] = cells[1:]
        elif rows:
            break
        elif line.startswith("## "):
            break
    assert rows, f"docs/{page}: no table follows {command!r}"
    return rows


def demo_rows(page: str, command: str, arms: dict[str, dict], metric: str) -> tuple[dict, dict]:
    """(documented, printed): each arm's final and best `metric` as the table after `command` gives
    them (rows named `<arm> (...)`) and as `arms` (a compare/demo report's arms) has them, both to 3
    decimals, for an equality assert."""
    doc = table_after(page, command)
    printed = {arm: [f"{arms[arm][metric]:.3f}", f"{arms[arm]['best_' + metric]:.3f}"] for arm in arms}
    documented = {arm: cells[:2] for row, cells in doc.items() for arm in arms if row.startswith(arm + " ")}
    return documented, printed
