"""Outputs never replace a file transferkit did not write (unless --force): the data commands' folders,
predict's drawings; a single file named by --out is replaced, and an --out that cannot be a file is
one line."""

import json

import pytest
from measure import one_line_error, run_cli
from PIL import Image

from transferkit.cli import main
from transferkit.data.synthetic import make_synthetic_detection
from transferkit.outputs import MANIFEST


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_detection(tmp_path_factory.mktemp("shapes"), 6, 2, 48, seed=0)


@pytest.fixture
def voc(tmp_path):
    folder = tmp_path / "voc"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>10</width><height>10</height></size><object>"
        "<name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        "</annotation>")
    return folder


@pytest.fixture
def weights_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.ones(2, 3)}, str(path))
    return path


def file_writers(voc, weights_file):
    """Commands writing one file named by --out: a COCO JSON, converted weights."""
    return {"data convert": ["data", "convert", "--from", "voc", str(voc), "--out"],
            "weights convert": ["weights", "convert", str(weights_file), "--out"]}


def to_yolo(shapes, out, *extra):
    return ["data", "convert", "--from", "coco", shapes / "annotations" / "train.json", "--images",
            shapes / "images" / "train", "--to", "yolo", "--out", out, *extra]


def test_yolo_export_refuses_to_replace_the_users_data_yaml(tmp_path, shapes):
    out = tmp_path / "yout"
    out.mkdir()
    (out / "data.yaml").write_text("# my own dataset description\nnames: [a]\n")
    before = snapshot(out)
    result = run_cli(*to_yolo(shapes, out), timeout=120)
    one_line_error(result, str(out / "data.yaml"), "--force")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["data.yaml"]
    assert main([str(a) for a in to_yolo(shapes, out, "--force")]) == 0
    assert "names:" in (out / "data.yaml").read_text() and "my own" not in (out / "data.yaml").read_text()


def test_yolo_export_reruns_over_its_own_files_and_removes_its_stale_labels(tmp_path, shapes, capsys):
    out = tmp_path / "yout"
    assert main([str(a) for a in to_yolo(shapes, out)]) == 0
    first = snapshot(out)
    stale = out / "labels" / "train" / "gone.txt"
    stale.write_text("0 0.5 0.5 0.1 0.1\n")
    manifest = json.loads((out / MANIFEST).read_text())
    st = stale.stat()
    manifest["files"]["labels/train/gone.txt"] = [st.st_size, st.st_mtime_ns]  # as if an earlier export wrote it
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert main([str(a) for a in to_yolo(shapes, out)]) == 0  # no --force needed: every file is its own
    assert not stale.exists()
    assert {k: v for k, v in snapshot(out).items() if k != MANIFEST} == \
        {k: v for k, v in first.items() if k != MANIFEST}
    label = sorted((out / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")  # the user edits a label: now it is theirs
    capsys.readouterr()
    assert main([str(a) for a in to_yolo(shapes, out)]) == 2
    assert str(label) in capsys.readouterr().err


def test_pack_refuses_shards_it_did_not_write(tmp_path, shapes):
    out = tmp_path / "packed"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"somebody else's archive")
    before = snapshot(out)
    result = run_cli("data", "pack", shapes / "annotations" / "train.json", "--images", shapes / "images" / "train",
                     "--out", out, timeout=120)
    one_line_error(result, "shard-000000.tar", "--force")
    assert snapshot(out) == before


def test_list_refuses_list_files_it_did_not_write(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "photos" / name / f"{i}.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "p_val.lst").write_text("0\t0\tmine.png\n")
    before = snapshot(lists)
    result = run_cli("data", "list", tmp_path / "photos", "--out", lists / "p", timeout=120)
    one_line_error(result, "p_val.lst", "--force")
    assert snapshot(lists) == before
    assert main(["data", "list", str(tmp_path / "photos"), "--out", str(lists / "p"), "--force"]) == 0
    assert main(["data", "list", str(tmp_path / "photos"), "--out", str(lists / "p")]) == 0  # its own now
    assert len((lists / "p_train.lst").read_text().splitlines()) == 6


def test_synth_refuses_to_replace_the_users_images(tmp_path):
    out = tmp_path / "synth"
    (out / "train" / "circle").mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(out / "train" / "circle" / "circle_0000.png")
    before = snapshot(out)
    result = run_cli("data", "synth", "--out", out, "--train-per-class", "1", "--val-per-class", "1", "--size", "16",
                     timeout=120)
    one_line_error(result, "circle_0000.png", "--force")
    assert snapshot(out) == before and not (out / "val").exists()


def test_a_named_output_file_is_replaced(tmp_path, voc):
    out = tmp_path / "out.json"
    out.write_text("old")
    assert main(["data", "convert", "--from", "voc", str(voc), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [0, 0, 5, 5]


@pytest.mark.parametrize("command", ["data convert", "weights convert"])
def test_an_out_file_that_cannot_be_one_is_one_line_and_nothing_is_touched(tmp_path, voc, weights_file, capsys,
                                                                           command):
    """--out an existing folder, a path inside a file, a name the system refuses (too long, once the
    temporary file's prefix and suffix are added): one `error:` line naming it, exit 2, and what was
    there is as it was."""
    args = file_writers(voc, weights_file)[command]
    folder = tmp_path / "a-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    long_name = tmp_path / ("x" * 245 + ".json")  # 250 characters: allowed, but its temporary's are not
    for out, says in [(folder, f"error: {folder} is a folder; give the name of a file"),
                      (folder / "notes.txt" / "x.json", f"error: {folder / 'notes.txt'} is a file, so "),
                      (long_name, f"error: {long_name}: File name too long; check the path")]:
        capsys.readouterr()
        assert main([*args, str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(says), err
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
        assert (folder / "notes.txt").read_text() == "keep"


def test_predict_draw_into_the_folder_of_the_inputs_is_refused(tmp_path):
    import torch

    from transferkit.errors import TransferKitError
    from transferkit.tasks.detection import predict_boxes

    def detector(images):  # one fixed box: enough to exercise the drawing
        return [{"boxes": torch.tensor([[1.0, 1.0, 6.0, 6.0]]), "labels": torch.tensor([1]),
                 "scores": torch.tensor([0.9])}]

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (12, 12), (0, 90, 0)).save(photos / "a.png")
    before = snapshot(photos)
    with pytest.raises(TransferKitError, match=r"a\.png.*--force"):
        predict_boxes(detector, ["bg", "cat"], 0, [photos / "a.png"], draw_dir=photos)
    assert snapshot(photos) == before
    drawn = tmp_path / "drawn"
    for _ in range(2):  # its own drawings are replaced on a rerun
        results = predict_boxes(detector, ["bg", "cat"], 0, [photos / "a.png"], draw_dir=drawn)
    assert results[0]["drawn"] == str(drawn / "a.png") and snapshot(photos) == before
    predict_boxes(detector, ["bg", "cat"], 0, [photos / "a.png"], draw_dir=photos, force=True)
    assert snapshot(photos)["a.png"] != before["a.png"]


def test_the_manifest_is_not_taken_for_data(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--train-per-class", "2", "--val-per-class", "1",
                 "--size", "16"]) == 0
    assert (out / MANIFEST).is_file()
    capsys.readouterr()
    assert main(["data", "check", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "folder" and not report["errors"]
