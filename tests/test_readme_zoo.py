"""The README's "Start from a COCO detector" commands, run as written on fixtures named as they name them."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shlex
import shutil

import torch
from conftest import REPO
from detection_fixtures import csv_from_voc, labelimg_from_voc, make_voc_year, tfrecord_from_voc
from test_sources import RangeHandler, server  # noqa: F401 - the loopback server fixture

from transferkit.cli import main
from transferkit.weights import zoo


def readme_commands(title: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == ".venv/bin/transferkit", line
            commands.append(words[1:])
    return commands


def test_start_from_a_coco_detector_as_the_readme_says(server, tmp_path, monkeypatch):  # noqa: F811
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    base, handler = server
    monkeypatch.chdir(tmp_path)
    year = make_voc_year(tmp_path / "VOC", count=8)
    labelimg_from_voc(year, tmp_path / "labelimg")
    csv_from_voc(year, tmp_path / "boxes.csv")
    shutil.copytree(year / "JPEGImages", tmp_path / "photos")
    tfrecord_from_voc(year, tmp_path / "train.tfrecord")
    # the zoo, mirrored on the loopback server: a COCO SSDlite in the zoo's layout (91 classes)
    buf = io.BytesIO()
    torch.save(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91).state_dict(), buf)
    handler.files["/ssdlite320_mobilenet_v3_large_coco-a79551df.pth"] = buf.getvalue()
    monkeypatch.setenv(zoo.MIRROR_ENV, base)
    real, prefix = zoo.torchvision_weights, hashlib.sha256(buf.getvalue()).hexdigest()[:8]
    monkeypatch.setattr(zoo, "torchvision_weights", lambda n: dataclasses.replace(real(n), sha256_prefix=prefix))

    commands = readme_commands("Start from a COCO detector")
    assert [c[:2] for c in commands] == [["data", "convert"]] * 3 + [["data", "check"], ["train", "-o"]]
    for args in commands:
        if args[0] == "train":  # as written, but one short epoch on small batches
            args = [*args, "-o", "schedule.epochs=1", "-o", "data.batch_size=4"]
        assert main(args) == 0, args
    converted = [json.loads((tmp_path / f).read_text()) for f in ("boxes.json", "boxes_csv.json", "boxes_tf.json")]
    assert all(c["images"] == converted[0]["images"] and len(c["annotations"]) == 14 for c in converted)
    report = json.loads((tmp_path / "runs" / "zoo" / "transfer_report.json").read_text())
    assert [r["from"] for r in report["head_rows"]] == [["cat (16)"], ["dog (17)"]]  # COCO's own rows
    assert (tmp_path / "runs" / "zoo" / "checkpoints" / "last.safetensors").is_file()
