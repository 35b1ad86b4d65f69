"""The README's examples, shell and Python, run as written on small data: `mydata` is the synthetic
class-folder set, `photo.jpg` and `more_photos/` are its images, and every training (train, eval,
compare, load_config) gets the suite's tiny budget (timm's test network, 32 px, one epoch)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys

from conftest import REPO, SHARED_DATA, needs_shared, tiny_overrides

from transferkit.cli import main

README = (REPO / "README.md").read_text()
# Sections whose blocks run here; the others run elsewhere or need what the suite does not have.
RUN_HERE = ("Fine-tune on your own images", "Use the model outside transferkit",
            "Fine-tuned, from scratch, or frozen: compare on your data",
            "Mixed precision, EMA, accumulation, compile", "Python")
ELSEWHERE = {
    "Quick start": "make targets: the whole suite and the demo (tests/test_demo.py)",
    "Start from a COCO detector": "tests/test_readme_zoo.py",
    "Detection": "test_readme_detection_runs_on_coco128 below (needs ../shared/data/coco128)",
    "Data tools": "needs a VOC devkit; each command has its tests (test_convert, test_lists, test_check, test_shards)",
    "Stopping, resuming, continuing": "tests/test_resume.py",
    "Pretrained weights from anywhere": "needs a model.pth; tests/test_weights.py",
    "Several processes: torchrun": "torchrun with 2 processes in tests/test_distributed.py",
}


def blocks(kind: str) -> dict[str, list[str]]:
    """Section title -> its code blocks of one kind (sh or python)."""
    found: dict[str, list[str]] = {}
    for part in README.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        found.update({title: re.findall(rf"```{kind}\n(.*?)```", body, re.S)} if f"```{kind}" in body else {})
    return found


def tiny(extra: dict | None = None) -> list[str]:
    return tiny_overrides("mydata", **{"schedule.epochs": 1, "probe.epochs": 1, "data.eval_image_size": "null",
                                       **(extra or {})})


def test_every_example_is_run_somewhere():
    sections = set(blocks("sh")) | set(blocks("python"))
    assert sections == set(RUN_HERE) | set(ELSEWHERE), sections ^ (set(RUN_HERE) | set(ELSEWHERE))


def test_readme_examples_run_as_written(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").symlink_to(synth_root)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    shutil.copy(synth_root / "val" / "cross" / "cross_0000.png", tmp_path / "photo.jpg")
    shutil.copytree(synth_root / "val" / "circle", tmp_path / "more_photos")

    sh = blocks("sh")
    commands = [shlex.split(line, comments=True) for section in RUN_HERE for block in sh.get(section, [])
                for line in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) >= 7
    for words in commands:
        assert words[0] == ".venv/bin/transferkit", words
        args = words[1:]
        if args[0] in ("train", "eval", "compare"):
            args += sum((["-o", o] for o in tiny()), [])
        assert main(args) == 0, args
    assert (tmp_path / "runs" / "mine" / "export" / "best.onnx").is_file()
    assert (tmp_path / "mine.pt").is_file()
    assert set(_json("runs/compare/report.json")["arms"]) == {"finetune", "scratch", "linear_probe",
                                                              "head_from_classes"}
    capsys.readouterr()

    shutil.rmtree(tmp_path / "runs")
    for section in ("Python",):
        for code in blocks("python")[section]:
            code = code.replace('["data.root=mydata"]', repr(tiny()))
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"README.md ({section})", "exec"), {})
            assert out.getvalue().strip(), code
    assert (tmp_path / "runs" / "mine" / "export" / "best.onnx").is_file()


def _json(path):
    return json.loads(open(path, encoding="utf-8").read())


def test_help_shows_the_api_and_import_stays_light():
    # `import transferkit` alone does not load torch; help() reaches the API and so does
    code = ("import sys, transferkit as tk; print('TORCH', 'torch' in sys.modules); help(tk); "
            "import transferkit.training.loop; print(type(tk.train).__name__, type(tk.predict).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PAGER": "cat", "PATH": "/usr/bin:/bin"}).stdout
    for name in ("load_config", "train", "evaluate", "predict", "transfer", "create_model", "load_run",
                 "export", "TransferReport", "TrainResult"):
        assert re.search(rf"^    {name}\(|^    class {name}\(", out, re.M), name
    assert "TORCH False" in out
    assert "function function" in out  # the API names stay functions after their submodules are imported
    version = subprocess.run([sys.executable, "-m", "transferkit", "--version"], capture_output=True, text=True,
                             env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert version.stdout.strip() == "transferkit 0.1.0", version


@needs_shared
def test_readme_detection_runs_on_coco128(tmp_path, monkeypatch, capsys):
    """The Detection section as written, on coco128 (the recipe at one epoch, 128 px, from timm's test
    network); the demo line is run by tests/test_demo.py."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "coco128").symlink_to(SHARED_DATA / "coco128")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    shutil.copy(next((SHARED_DATA / "coco128" / "images" / "train2017").glob("*.jpg")), tmp_path / "photo.jpg")
    block = blocks("sh")["Detection"][0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c and c[1] != "demo"]
    assert [c[1] for c in commands] == ["train", "predict"]
    small = ["model.name=test_efficientnet", "pretrained.source=null", "schedule.epochs=1",
             "detection.min_size=[128]", "detection.max_size=160", "detection.fpn_channels=32"]
    for words in commands:
        args = words[1:] + (sum((["-o", o] for o in small), []) if words[1] == "train" else [])
        assert main(args) == 0, args
    summary = _json("runs/person/summary.json")
    assert summary["final"]["epoch"] == 1 and 0 <= summary["final"]["val_map"] <= 1
    assert (tmp_path / "drawn" / "photo.png").is_file()
    capsys.readouterr()
