"""Keeps a mutation run's results in one file, so that a run longer than a working day (training/'s
takes hours) can stop on one machine and go on in a fresh clone on another.

    .venv/bin/python tools/mutation_results.py save RESULTS MUTANTS      e.g. MUTANTS build/mutation-training/mutants
    .venv/bin/python tools/mutation_results.py restore RESULTS MUTANTS

mutmut keeps its results beside the mutated code (`mutants/**/*.py.meta`), a folder a clone does not
have. `save` writes each module's decided results and the hash of each function's source to RESULTS;
`restore` puts them back as those `.meta` files where the folder has none yet. mutmut then keeps a
result only where the function's hash is unchanged (it regenerates the mutants of changed functions
as not checked), so a result restored for code edited since is dropped, not trusted. A survivor stays
one until it is run again by name against the tests of its day. mutmut has no export of its own.

"no tests" is not saved: it is read off the run's stats, not found by running a test, and a run whose
stats came back empty marks every mutant so; saved, those would never be checked again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEPT = ("exit_code_by_key", "hash_by_function_name")
NO_TESTS = 33  # mutmut's exit code for a mutant whose function no test reaches


def save(results: Path, mutants: Path) -> int:
    """Every module's decided results (not checked and no tests left out) and function hashes; the number
    of results."""
    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        data = json.loads(meta.read_text(encoding="utf-8"))
        codes = {k: v for k, v in data["exit_code_by_key"].items() if v not in (None, NO_TESTS)}
        out[str(meta.relative_to(mutants))] = {"exit_code_by_key": codes,
                                               "hash_by_function_name": data["hash_by_function_name"]}
    results.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return sum(len(m["exit_code_by_key"]) for m in out.values())


def restore(results: Path, mutants: Path) -> int:
    """The saved `.meta` files, where `mutants` has none (a folder's own results are newer); the number
    of results put back."""
    restored = 0
    for name, data in json.loads(results.read_text(encoding="utf-8")).items():
        meta = mutants / name
        if meta.exists():
            continue
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({**{k: data[k] for k in KEPT}, "type_check_error_by_key": {},
                                    "durations_by_key": {}, "estimated_durations_by_key": {}}),
                        encoding="utf-8")
        restored += len(data["exit_code_by_key"])
    return restored


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("save", "restore"):
        sys.exit(__doc__)
    action, results, mutants = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if action == "save":
        print(f"{results}: {save(results, mutants)} results saved")
    elif not results.is_file():
        print(f"{results}: none saved yet; the run starts from nothing")
    else:
        print(f"{mutants}: {restore(results, mutants)} results restored from {results}")
