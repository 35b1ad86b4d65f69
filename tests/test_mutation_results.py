"""tools/mutation_results.py: a mutation run's results saved to one file and put back in a fresh
folder, so that a run of hours goes on in another clone."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

spec = importlib.util.spec_from_file_location("mutation_results", REPO / "tools" / "mutation_results.py")
mutation_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_results)

META = "src/pkg/mod.py.meta"


def write_meta(mutants, codes, hashes):
    path = mutants / META
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code_by_key": codes, "hash_by_function_name": hashes,
                                "type_check_error_by_key": {}, "durations_by_key": {"pkg.mod.x_f__mutmut_1": 3.5},
                                "estimated_durations_by_key": {}}))


def test_decided_results_go_to_a_fresh_folder_and_not_over_a_live_one(tmp_path):
    old, fresh, results = tmp_path / "old", tmp_path / "fresh", tmp_path / "results.json"
    write_meta(old, {"pkg.mod.x_f__mutmut_1": 1, "pkg.mod.x_f__mutmut_2": 0, "pkg.mod.x_g__mutmut_1": None,
                     "pkg.mod.x_g__mutmut_2": 33}, {"f": "aa", "g": "bb"})
    assert mutation_results.save(results, old) == 2  # not checked and "no tests" (33) are left out
    assert mutation_results.restore(results, fresh) == 2
    back = json.loads((fresh / META).read_text())
    assert back == {"exit_code_by_key": {"pkg.mod.x_f__mutmut_1": 1, "pkg.mod.x_f__mutmut_2": 0},
                    "hash_by_function_name": {"f": "aa", "g": "bb"}, "type_check_error_by_key": {},
                    "durations_by_key": {}, "estimated_durations_by_key": {}}  # the keys mutmut's load() pops
    write_meta(fresh, {"pkg.mod.x_f__mutmut_1": 0}, {"f": "cc"})  # newer results of that folder's own
    assert mutation_results.restore(results, fresh) == 0
    assert json.loads((fresh / META).read_text())["hash_by_function_name"] == {"f": "cc"}


def test_a_mutants_tests_go_file_by_file_cheapest_first_in_definition_order(tmp_path):
    from types import SimpleNamespace

    from helpers.mutation_order import mutation_order, recorded_durations

    def item(path, name, line):
        return SimpleNamespace(path=Path(path), nodeid=f"{path}::{name}", location=(path, line, name))

    a1, b1, a2, b2 = item("a.py", "t1", 10), item("b.py", "t1", 5), item("a.py", "t2", 3), item("b.py", "t2", 20)
    p1, p2 = item("c.py", "t[1]", 7), item("c.py", "t[0]", 7)  # one test's parameters share its line
    durations = {"a.py::t1": 5.0, "a.py::t2": 1.0, "b.py::t1": 0.5, "b.py::t2": 0.5, "c.py::t[1]": 9.0}
    assert mutation_order([a1, b1, p1, a2, b2, p2], durations) == [b1, b2, a2, a1, p1, p2]
    assert mutation_order([a1, b1], {}) == [a1, b1]  # without statistics: by file name
    stats = tmp_path / "mutmut-stats.json"
    stats.write_text(json.dumps({"duration_by_test": durations}))
    assert recorded_durations(stats) == durations
    for damaged in ("{", "[]", '{"duration_by_test": 3}'):
        stats.write_text(damaged)
        assert recorded_durations(stats) == {}
    assert recorded_durations(tmp_path / "missing.json") == {}


def test_only_a_mutation_run_reorders_the_tests(tmp_path):
    ids = ["tests/test_patterns.py::" + name for name in ("test_b", "test_a")]
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    shutil.copytree(REPO / "tests" / "helpers", tmp_path / "tests" / "helpers")
    (tmp_path / "tests" / "test_patterns.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    (tmp_path / "tests" / "test_other.py").write_text("def test_c():\n    pass\n")
    ids.insert(1, "tests/test_other.py::test_c")
    (tmp_path / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": {"tests/test_other.py::test_c": 9}}))

    def order(mutant):
        env = {k: v for k, v in os.environ.items() if k != "MUTANT_UNDER_TEST"}
        env.update({"MUTANT_UNDER_TEST": mutant} if mutant else {})
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "--rootdir=.", *ids], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if "::" in line]

    assert order(None) == ids  # as given
    assert order("stats") == ids  # mutmut's statistics step
    # test_patterns.py first (no recorded time), in definition order; test_other.py's 9 s after it
    assert order("pkg.mod.x_f__mutmut_1") == ["tests/test_patterns.py::test_a", "tests/test_patterns.py::test_b",
                                              "tests/test_other.py::test_c"]
