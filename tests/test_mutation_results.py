"""tools/mutation_results.py: a mutation run's results saved to one file and put back in a fresh
folder, so that a run of hours goes on in another clone."""

import importlib.util
import json

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
