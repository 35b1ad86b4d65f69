import json

import pytest
from helpers.doc_tables import demo_rows

from transferkit.demo import run_demo
from transferkit.errors import TransferKitError


def test_demo_writes_report_for_both_arms(tmp_path):
    report = run_demo(tmp_path / "demo", epochs=1, train_per_class=3, val_per_class=2, quiet=True)
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk == report
    assert set(report["arms"]) == {"finetune", "scratch"}
    for arm in ("finetune", "scratch"):
        rows = [json.loads(line) for line in (tmp_path / "demo" / arm / "metrics.jsonl").read_text().splitlines()]
        assert report["arms"][arm]["val_acc"] == rows[-1]["val_acc"]  # the arm's own final epoch
        assert report["arms"][arm]["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert report["seconds"] >= sum(report["arms"][arm]["seconds"] for arm in ("finetune", "scratch"))
    assert (tmp_path / "demo" / "report.png").stat().st_size > 1000
    finetune = json.loads((tmp_path / "demo" / "finetune" / "transfer_report.json").read_text())
    assert finetune["counts"] == {"loaded": 294, "out-of-scope": 2}
    assert not (tmp_path / "demo" / "scratch" / "transfer_report.json").exists()
    # A rerun replaces the demo's own folder; a folder holding other files is refused and kept.
    again = run_demo(tmp_path / "demo", epochs=1, train_per_class=3, val_per_class=2, quiet=True)
    assert json.loads((tmp_path / "demo" / "report.json").read_text()) == again
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(TransferKitError, match="holds files the demo did not write"):
        run_demo(tmp_path / "mine", epochs=1, train_per_class=3, val_per_class=2, quiet=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_only_a_folder_the_demo_made_is_emptied_by_a_rerun(tmp_path):
    """A user's folder holding only names the demo uses (`data/`, `finetune/`, `report.json`) is not the
    demo's: refused, untouched. A folder with the demo's mark is emptied, the mark kept last."""
    from transferkit.demo import DEMO_MARK, claim_demo_folder

    def tree(folder):
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))

    project = tmp_path / "project"
    (project / "data" / "train").mkdir(parents=True)
    (project / "data" / "train" / "cat.jpg").write_bytes(b"the user's photo")
    (project / "report.json").write_text("{}")
    before = tree(project)
    with pytest.raises(TransferKitError, match=r"project holds files the demo did not write \(data, report\.json\)"):
        claim_demo_folder(project)
    assert tree(project) == before
    (project / DEMO_MARK).write_text("{}")  # the same names, in a folder the demo made
    (project / "finetune").mkdir()
    claim_demo_folder(project)
    assert tree(project) == [DEMO_MARK]
    (project / "notes.txt").write_text("keep")  # the user's file put into a demo's folder
    with pytest.raises(TransferKitError, match=r"did not write \(notes\.txt\)"):
        claim_demo_folder(project)
    claim_demo_folder(tmp_path / "new" / "demo")
    assert tree(tmp_path / "new" / "demo") == [DEMO_MARK]
    with pytest.raises(TransferKitError, match="is a file"):
        claim_demo_folder(project / "notes.txt")
    assert (project / "notes.txt").read_text() == "keep"


def test_demo_transfer_beats_scratch_by_a_margin(tmp_path):
    """The demo's claim, at its default budget (`transferkit demo`'s): fine-tuning ends at least 0.10
    above scratch, and the figures docs/BENCHMARKS.md prints for it are what the run prints now
    (the run is deterministic; a change that moves them must re-run the doc)."""
    report = run_demo(tmp_path / "demo", quiet=True)
    arms = report["arms"]
    assert arms["finetune"]["val_acc"] >= arms["scratch"]["val_acc"] + 0.10, arms
    documented, printed = demo_rows("BENCHMARKS.md", "transferkit demo --out runs/demo", arms, "val_acc")
    assert documented == printed, "docs/BENCHMARKS.md's demo table no longer matches a re-run: re-run it"


def test_detection_demo_backbone_from_imagenet_beats_random(tmp_path):
    """The detection arm's claim at a small budget (40 training images, 4 epochs): ImageNet backbone
    ahead of a random one by at least 0.05 val_map."""
    report = run_demo(tmp_path / "det", epochs=4, train_per_class=14, val_per_class=5, quiet=True, task="detection")
    arms = report["arms"]
    assert report["metric"] == "val_map"
    assert arms["finetune"]["val_map"] >= arms["scratch"]["val_map"] + 0.05, arms
    transfer = json.loads((tmp_path / "det" / "finetune" / "transfer_report.json").read_text())
    assert transfer["counts"]["loaded"] == 240
