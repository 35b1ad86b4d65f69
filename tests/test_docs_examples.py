"""The shell examples of docs/*.md run as written, and the output each one shows is what it prints.

A line `# error: MESSAGE` or `# ...: TEXT` under a command is what that command prints: the test
requires the same line (`...` stands for any text, such as a folder path). Trainings get the suite's
tiny budget; everything else runs unchanged. Examples that cannot run here say where they run
(`ELSEWHERE`), and `test_every_docs_example_is_run_somewhere` keeps that list complete.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, needs_shared

from transferkit.cli import main

DOCS = REPO / "docs"
# (page, section) -> where its blocks run, for those not run by this file.
ELSEWHERE = {
    ("BENCHMARKS.md", "*"): "make figures (tests/test_doc_figures.py) and tests/test_demo.py: minutes each",
    ("TESTING.md", "*"): "make targets: the suite itself, the mutation run",
    ("RELIABILITY.md", "Fuzzing"): "make fuzz: the suite runs the same fuzzers with fewer examples",
    ("FORMATS.md", "Parity"): "the suite itself (pytest on three of its files)",
}
RUN_HERE = {
    ("DETECTION.md", "Detection"), ("DETECTION.md", "Export"),
    ("RELIABILITY.md", "Run directories"), ("RELIABILITY.md", "Nothing is written over what is not the run's"),
    ("RELIABILITY.md", "A resume checks what it resumes"), ("RELIABILITY.md", "A non-finite loss stops the run"),
    ("RELIABILITY.md", "A damaged run is one line"),
    ("FORMATS.md", "Weights from other frameworks"), ("FORMATS.md", "TensorFlow checkpoints"),
    ("FORMATS.md", "Keras HDF5"), ("FORMATS.md", "PaddlePaddle"), ("FORMATS.md", "Pickled whole modules"),
    ("FORMATS.md", "Restoring and converting"),
}
# The tiny budget for trainings of docs that train on synthetic data.
TINY_DETECTION = ["model.name=test_efficientnet", "pretrained.source=null", "schedule.epochs=1",
                  "detection.min_size=[128]", "detection.max_size=160", "detection.fpn_channels=64"]


def sh_blocks(page: str) -> list[tuple[str, str]]:
    """(section title, block) for each ```sh block of a page, the title being the nearest heading above."""
    found, title, fence, block = [], page, None, ""
    for line in (DOCS / page).read_text().splitlines(keepends=True):
        if fence is not None:  # inside a fence, where `# ...` lines are shell comments
            if line.startswith("```"):
                found += [(title, block)] if fence == "sh" else []
                fence, block = None, ""
            else:
                block += line
        elif line.startswith("```"):
            fence = line.strip()[3:]
        elif re.match(r"#{1,4} ", line):
            title = line.lstrip("#").strip()
    return found


def test_every_docs_example_is_run_somewhere():
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    have = {(page, title) for page in pages for title, _ in sh_blocks(page)}
    placed = {(page, title) for page, title in have
              if (page, title) in RUN_HERE or (page, title) in ELSEWHERE or (page, "*") in ELSEWHERE}
    assert have == placed, f"blocks no test runs: {sorted(have - placed)}"
    assert RUN_HERE <= have, f"listed but not in the docs any more: {sorted(RUN_HERE - have)}"


def expectation_matches(expected: str, printed: str) -> bool:
    """A doc's `# ...` line against the lines a command printed; `...` stands for any text."""
    pattern = ".*".join(re.escape(piece) for piece in expected.split("..."))
    return any(re.fullmatch(pattern, line.strip()) for line in printed.splitlines())


def run_block(block: str, capfd, train_extra: list[str] | None = None) -> int:
    """Run one block line by line in the current folder; returns how many printed lines it checked."""
    checked, printed, failed = 0, None, None
    for line in block.replace("\\\n", " ").splitlines():
        stripped = line.strip()
        if stripped.startswith("# error:") or stripped.startswith("# ..."):
            assert printed is not None, f"an output line with no command above it: {line}"
            assert expectation_matches(stripped[2:], printed), f"expected {stripped[2:]!r}, got:\n{printed}"
            assert (failed is not None) == stripped.startswith("# error:"), f"exit status against {line}"
            checked, failed = checked + 1, None
            continue
        # A command may fail only where the page shows its error line.
        assert failed is None, f"{failed} failed:\n{printed}"
        words = shlex.split(os.path.expandvars(line) if "$" in line else line, comments=True)
        if not words:
            continue
        if "=" in words[0] and len(words) == 1:  # NAME=value
            name, _, value = words[0].partition("=")
            os.environ[name] = value  # the fixture in_tmp removes it again
            continue
        if words[0] in (".venv/bin/transferkit", "transferkit"):
            args = words[1:]
            if args[0] in ("train", "eval") and train_extra:
                args += sum((["-o", o] for o in train_extra), [])
            capfd.readouterr()
            code = main(args)
            out, err = capfd.readouterr()
            printed = out + err
            if code != 0:
                assert printed.strip().splitlines()[-1].startswith("error: "), printed
                failed = line
        else:
            result = subprocess.run(line, shell=True, capture_output=True, text=True)
            assert result.returncode == 0, (line, result.stderr)
            printed = result.stdout + result.stderr
    assert failed is None, f"{failed} failed:\n{printed}"
    return checked


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for name in ("T", "W", "RFB"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    for name in ("T", "W", "RFB"):
        os.environ.pop(name, None)


def test_reliability_examples_print_what_the_page_shows(in_tmp, capfd):
    blocks = [block for title, block in sh_blocks("RELIABILITY.md") if ("RELIABILITY.md", title) in RUN_HERE]
    checked = sum(run_block(block, capfd) for block in blocks)
    # every refusal on the page was compared: not empty, another run, config changed, NaN, lr bound, YAML
    assert checked == 6, checked


def test_detection_examples_run(in_tmp, capfd):
    blocks = dict(sh_blocks("DETECTION.md"))
    run_block(blocks["Detection"], capfd, TINY_DETECTION)
    assert (in_tmp / "dets.json").is_file() and any((in_tmp / "drawn").iterdir())
    # The export block names a run of the user's (runs/person) and a photo: the run above stands in.
    (in_tmp / "runs" / "person").symlink_to(in_tmp / "runs" / "shapes")
    shutil.copy(next((in_tmp / "shapes" / "images" / "val").iterdir()), in_tmp / "photo.jpg")
    run_block(blocks["Export"], capfd)
    assert (in_tmp / "runs" / "person" / "export" / "best.onnx").is_file()
    assert (in_tmp / "runs" / "person" / "export" / "best.pt").is_file()


MYNETS = '''
import torch.nn as nn


def lenet():
    """Caffe's examples/mnist/lenet.prototxt, named as its layers."""
    net = nn.Module()
    net.conv1, net.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
    net.ip1, net.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)
    return net
'''


@needs_shared
def test_formats_examples_print_what_the_page_shows(in_tmp, capfd, monkeypatch):
    # The page's paths are relative to the repository: ../shared/data from it.
    (in_tmp / "repo").mkdir()
    monkeypatch.chdir(in_tmp / "repo")
    (in_tmp / "shared").symlink_to(SHARED_DATA.parent)
    (in_tmp / "repo" / "mynets.py").write_text(MYNETS)
    monkeypatch.syspath_prepend(str(in_tmp / "repo"))
    checked = 0
    for title, block in sh_blocks("FORMATS.md"):
        if ("FORMATS.md", title) in RUN_HERE:
            checked += run_block(block, capfd)
    assert checked == 4, checked
    written = sorted(p.name for p in Path.cwd().glob("*.safetensors"))
    assert written == sorted(["lenet.safetensors", "lenet_caffe.safetensors", "mnet25.safetensors",
                              "rfb_onnx.safetensors", "rfb_tf.safetensors", "rfb_caffe.safetensors",
                              "rfb_tflite.safetensors", "mini_xception.safetensors", "mlp.safetensors",
                              "yolov5n.safetensors", "lite0.safetensors"]), written
