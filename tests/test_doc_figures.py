"""The documented runs re-run: each test runs a command that docs/BENCHMARKS.md shows, exactly as
shown (only `--out` moved into the test's folder), and compares what it prints with the table the
page gives for it. The runs are deterministic on one machine, so a code change that moves a figure
turns its test red until the page is re-run. Minutes each: `make figures`, not part of `make test`
(the demo's figures are checked in the suite, tests/test_demo.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.doc_tables import demo_rows, table_after

from transferkit.demo import run_demo

pytestmark = pytest.mark.figures

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TRANSFERKIT = [sys.executable, "-m", "transferkit"]


def run_documented(command: str, out: Path, extra: list[str] = ()) -> dict:
    """`command` as the page shows it (`transferkit train ... --out runs/NAME`), with the run
    directory in `out`; the run's summary.json."""
    words = shlex.split(command)
    assert words[0] == "transferkit" and "--out" in words, command
    words[words.index("--out") + 1] = str(out)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([*TRANSFERKIT, *words[1:], *extra], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "summary.json").read_text())


def needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent")


HYM = ("transferkit train -c configs/classification/hymenoptera_efficientnet_lite0.yaml "
       "-o data.root=../shared/data/hymenoptera_data --out runs/hym")
HYM_EMA = ("transferkit train -c configs/classification/hymenoptera_efficientnet_lite0.yaml "
           "-o data.root=../shared/data/hymenoptera_data -o 'optim.ema={}' --out runs/hym-ema")
HYM_EMA_95 = ("transferkit train -c configs/classification/hymenoptera_efficientnet_lite0.yaml "
              "-o data.root=../shared/data/hymenoptera_data -o 'optim.ema={decay: 0.95}' --out runs/hym-ema-0.95")


def test_hymenoptera_recipe(tmp_path):
    needs(SHARED / "hymenoptera_data")
    doc = table_after("BENCHMARKS.md", HYM)
    summary = run_documented(HYM, tmp_path / "hym")
    best = next(cells for row, cells in doc.items() if row.startswith("best epoch"))
    final = next(cells for row, cells in doc.items() if row.startswith("final epoch"))
    assert f"best epoch ({summary['best_epoch']}," in next(r for r in doc if r.startswith("best epoch"))
    assert best[0] == f"{summary['best_val_acc']:.4f}"
    assert final[0] == f"{summary['final']['val_acc']:.4f}"


def test_hymenoptera_recipe_with_ema(tmp_path):
    needs(SHARED / "hymenoptera_data")
    doc = table_after("BENCHMARKS.md", HYM_EMA)
    summary = run_documented(HYM_EMA, tmp_path / "hym-ema")
    rows = [json.loads(line) for line in (tmp_path / "hym-ema" / "metrics.jsonl").read_text().splitlines()]
    final = next(cells for row, cells in doc.items() if row.startswith("final epoch"))
    assert final == [f"{rows[-1]['val_acc']:.4f}", f"{rows[-1]['ema_val_acc']:.4f}"]
    assert summary["final"]["ema_val_acc"] == rows[-1]["ema_val_acc"]


def test_hymenoptera_recipe_with_a_shorter_ema(tmp_path):
    """The decay table's seed 0 cells (live / EMA, final epoch) of the default and of decay 0.95."""
    needs(SHARED / "hymenoptera_data")
    doc = table_after("BENCHMARKS.md", HYM_EMA_95)
    summary = run_documented(HYM_EMA_95, tmp_path / "hym-ema-0.95")
    final = summary["final"]
    assert doc["0.95"][0] == f"{final['val_acc']:.4f} / {final['ema_val_acc']:.4f}"
    assert final["ema_val_acc"] >= final["val_acc"]  # the criterion: the EMA ends no lower


def test_detection_demo(tmp_path):
    arms = run_demo(tmp_path / "demo-det", quiet=True, task="detection")["arms"]
    documented, printed = demo_rows("BENCHMARKS.md", "transferkit demo --task detection --out runs/demo-det", arms,
                                    "val_map")
    assert documented == printed


SMALL_DATA = ("transferkit train -c configs/detection/small_data.yaml -o data.root=../shared/data/coco128 "
              "-o data.train_ann=../shared/data/coco128/annotations/instances_train2017.json "
              "-o data.train_images=../shared/data/coco128/images/train2017 -o 'data.classes=[person]' "
              "--out runs/person")


@pytest.mark.parametrize("backbone, extra", [("ImageNet-pretrained", ""), ("random", " -o pretrained.source=null")])
def test_small_data_detection_recipe(tmp_path, backbone, extra):
    needs(SHARED / "coco128")
    command = SMALL_DATA.replace(" --out runs/person", extra + (" --out runs/person-scratch" if extra else
                                                                " --out runs/person"))
    doc = table_after("BENCHMARKS.md", SMALL_DATA)
    summary = run_documented(command, tmp_path / "run")
    final = summary["final"]
    row = doc[backbone]
    assert row[:3] == [f"{final[k]:.4f}" for k in ("val_map", "val_ap50", "val_ap75")]
    assert row[3] == " / ".join(f"{final[k]:.4f}" for k in ("val_ap_small", "val_ap_medium", "val_ap_large"))
    assert row[4] == f"{summary['best_val_map']:.4f} ({summary['best_epoch']})"
