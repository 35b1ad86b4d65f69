"""im2rec-style list files: seeded, stratified splits; training from lists; broken lists."""

import json

import pytest
from conftest import tiny_overrides

from transferkit.config import load_config
from transferkit.data.lists import make_lists, parse_fractions, read_labelled_list, read_list
from transferkit.errors import TransferKitError
from transferkit.run import train


def test_stratified_seeded_split_and_unreadable_files(synth_root, tmp_path):
    bad = synth_root / "train" / "cross" / "zz_broken.png"
    bad.write_bytes(b"not a png")
    try:
        result = make_lists(synth_root / "train", tmp_path / "s", (0.5, 0.25, 0.25), seed=3, stratify=True)
        make_lists(synth_root / "train", tmp_path / "t", (0.5, 0.25, 0.25), seed=3, stratify=True)
        make_lists(synth_root / "train", tmp_path / "u", (0.5, 0.25, 0.25), seed=4, stratify=True)
    finally:
        bad.unlink()
    assert result.unreadable and result.unreadable[0][0] == "cross/zz_broken.png"
    for split, size in (("train", 12), ("val", 6), ("test", 6)):
        labels = [label for label, _ in result.splits[split]]
        assert [labels.count(c) for c in range(3)] == [size] * 3, split
    assert (tmp_path / "s_train.lst").read_text() == (tmp_path / "t_train.lst").read_text()
    assert (tmp_path / "s_train.lst").read_text() != (tmp_path / "u_train.lst").read_text()
    first = (tmp_path / "s_train.lst").read_text().splitlines()[0].split("\t")
    assert first[0] == "0" and first[1] in {"0", "1", "2"} and first[2].endswith(".png")
    assert (tmp_path / "s_classes.txt").read_text().split() == ["circle", "cross", "square"]
    every = {rel for part in result.splits.values() for _, rel in part}
    assert len(every) == 72  # nothing lost, nothing twice


def test_training_from_list_files(synth_root, tmp_path):
    make_lists(synth_root / "train", tmp_path / "l", (0.75, 0.25), seed=0, stratify=True)
    cfg = load_config(None, tiny_overrides(synth_root / "train", **{
        "data.format": "list", "data.train_list": str(tmp_path / "l_train.lst"),
        "data.val_list": str(tmp_path / "l_val.lst"), "schedule.epochs": 2}))
    result = train(cfg, out=tmp_path / "run", quiet=True)
    assert len(result.metrics) == 2
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == ["circle", "cross", "square"]
    # Each listed label is the class of the folder its image sits in, and the two lists hold every image once.
    seen = []
    for name in ("l_train.lst", "l_val.lst"):
        classes, items = read_labelled_list(tmp_path / name, synth_root / "train")
        assert classes == ["circle", "cross", "square"]
        assert all(classes[label] == path.parent.name for path, label in items), name
        seen += [path for path, _ in items]
    assert sorted(seen) == sorted((synth_root / "train").glob("*/*.png")) and len(seen) == 72


def test_broken_lists_are_one_line_errors(tmp_path):
    with pytest.raises(TransferKitError, match="must be fractions"):
        parse_fractions("a,b")
    with pytest.raises(TransferKitError, match="add up to 1"):
        parse_fractions("0.5,0.2")
    bad = tmp_path / "bad.lst"
    for text, message in (("0\tcat\ta.png\n", r"bad.lst:1: expected `index<TAB>label<TAB>path`"),
                          ("0\t1\t../../etc/passwd\n", "leaves the data root"),
                          ("0\t9\ta.png\n", r"label 9 is not in 0..1")):
        bad.write_text(text)
        with pytest.raises(TransferKitError, match=message):
            read_list(bad, tmp_path, num_classes=2)
