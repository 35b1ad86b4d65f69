"""The order a mutation run's tests go in (tests/conftest.py applies it only under mutmut).

mutmut hands pytest a mutant's tests as an unordered set, and pytest runs them in that order: the tests
of one file interleaved with another's set up the file's module fixtures (trainings, some of them) again
each time, and the time limit, worked out from the tests' own durations, does not count that. Grouped by
file, in definition order, the cheapest files first, each fixture is set up once and a mutant a quick
test kills stops early (mutmut runs with -x).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def recorded_durations(stats: Path) -> dict[str, float]:
    """Each test's duration from mutmut's statistics file; none where it cannot be read."""
    try:
        durations = json.loads(stats.read_text(encoding="utf-8")).get("duration_by_test", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return durations if isinstance(durations, dict) else {}


def mutation_order(items: Sequence[Any], durations: dict[str, float]) -> list[Any]:
    """pytest items (`path`, `nodeid`, `location`) by file, cheapest file first (the sum of its tests'
    recorded durations), each file's in definition order."""
    by_file: dict[Any, list[Any]] = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)
    cost = {path: sum(durations.get(item.nodeid, 0.0) for item in group) for path, group in by_file.items()}
    ordered: list[Any] = []
    for path in sorted(by_file, key=lambda p: (cost[p], str(p))):
        ordered += sorted(by_file[path], key=lambda item: item.location[1])  # stable: parameters keep theirs
    return ordered
