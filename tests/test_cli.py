import json
import subprocess
import sys

import pytest
from conftest import REPO, tiny_overrides

from transferkit.cli import main


def overrides(root, **extra):
    return [a for o in tiny_overrides(root, **extra) for a in ("-o", o)]


def test_train_eval_predict(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *overrides(synth_root, **{"schedule.epochs": 4}), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("\n".join(
        ["data:", f"  root: {synth_root}", "  image_size: 32", "model:", "  name: test_efficientnet",
         "pretrained:", "  source: null"]) + "\n")
    assert main(["eval", "-c", str(cfg), "--weights", str(run / "checkpoints" / "best.safetensors"),
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 30
    assert abs(metrics["val_acc"] - summary["best_val_acc"]) < 1e-9
    # --run: the run's own config and its best checkpoint; --weights last; -o on top of the run's config
    assert main(["eval", "--run", str(run), "--json"]) == 0  # the run's batch size: sums in another order
    own = json.loads(capsys.readouterr().out)
    assert own == pytest.approx(metrics, rel=1e-6)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["best_epoch"] < last["epoch"]  # so that best and last are told apart
    assert main(["eval", "--run", str(run), "--weights", "last", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx({"val_loss": last["val_loss"],
                                                                 "val_acc": last["val_acc"], "images": 30}, rel=1e-6)
    assert main(["eval", "--run", str(run), "-o", "data.image_size=48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] != pytest.approx(own["val_loss"], rel=1e-3)
    assert main(["eval", "--run", str(run), "-c", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("error: give --run or -c, not both")

    val = synth_root / "val"
    assert main(["predict", "--run", str(run), str(val / "circle"), str(val / "square" / "square_0000.png"),
                 "--topk", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 11
    assert results[-1]["path"].endswith("square_0000.png")
    assert len(results[0]["predictions"]) == 2
    assert {p["class"] for r in results for p in r["predictions"]} <= {"circle", "cross", "square"}
    for r in results:  # the top 2 of 3 classes, most probable first
        probs = [p["prob"] for p in r["predictions"]]
        assert probs[0] >= probs[1] > 0 and sum(probs) < 1, r


def test_eval_without_weights_is_the_model_before_training(synth_root, tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"data:\n  root: {synth_root}\n  image_size: 32\nmodel:\n  name: test_efficientnet\n"
                   "pretrained:\n  source: null\n")
    assert main(["eval", "-c", str(cfg), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["eval", "-c", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first  # seeded: the same model each time
    assert set(first) == {"val_loss", "val_acc", "images"}


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  root: x\n  batch_sise: 4\n")
    assert main(["train", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: config error in {bad}: key 'data.batch_sise': unknown key " \
                          "(check the spelling; see docs/CONFIG.md)"
    assert main(["train", "-o", f"data.root={tmp_path / 'nowhere'}", "--out", str(tmp_path / "r")]) == 2
    assert "data.root not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a failed start leaves no half-made run directory
    assert main(["predict", "--run", str(tmp_path), "x.jpg"]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_data_synth_and_module_entry_point(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.run(
        [sys.executable, "-m", "transferkit", "data", "synth", "--out", str(out), "--train-per-class", "2",
         "--val-per-class", "1", "--size", "24"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "train").glob("*/*.png"))) == 12
    assert len(list((out / "val").glob("*/*.png"))) == 6
    again = tmp_path / "again"
    main(["data", "synth", "--out", str(again), "--train-per-class", "2", "--val-per-class", "1", "--size", "24"])
    for a in sorted((out / "train").rglob("*.png")):
        assert a.read_bytes() == (again / a.relative_to(out)).read_bytes()  # deterministic


def test_weights_inspect_and_transfer(tmp_path, capsys):
    import torch

    from transferkit.models.classification import create_classifier
    from transferkit.training.checkpoint import load_weights

    src, _ = create_classifier("test_efficientnet", 10)
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "src.pth")
    assert main(["weights", "inspect", str(tmp_path / "src.pth"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "pytorch" and info["tensors"] == len(src.state_dict())
    assert info["metadata"] == {"nested_key": "model"}
    assert info["entries"][0] == {"name": "module.conv_stem.weight", "shape": [24, 3, 3, 3], "dtype": "float32"}
    assert info["parameters"] == sum(v.numel() for v in src.state_dict().values())

    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    args = ["weights", "transfer", "--model", "test_efficientnet", "--num-classes", "3", "--from",
            str(tmp_path / "src.pth"), "--scope", "detection", "--report", str(report)]
    assert main([*args, "--dry-run"]) == 0
    assert not out.exists() and json.loads(report.read_text())["counts"]["out-of-scope"] == 2
    assert main([*args, "--out", str(out)]) == 0
    fresh, _ = create_classifier("test_efficientnet", 3)
    assert load_weights(fresh, out) == {"model": "test_efficientnet", "source": str(tmp_path / "src.pth")}
    assert torch.equal(fresh.state_dict()["conv_stem.weight"], src.state_dict()["conv_stem.weight"])
    capsys.readouterr()
    assert main([*args, "--dry-run", "--require", "all=1.0"]) == 2
    assert "of all was restored" in capsys.readouterr().err
    assert main(["weights", "transfer", "--model", "test_efficientnet", "--from", str(tmp_path / "src.pth")]) == 2
    assert "give --out" in capsys.readouterr().err


def test_model_params_shows_rules(capsys):
    assert main(["model", "params", "--model", "test_efficientnet", "--num-classes", "3", "--match", "classifier.*",
                 "-o", 'optim.param_groups=[{match: "classifier.bias", lr_mult: 0}]', "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["rule"]) for r in rows] == [("classifier.weight", "head"),
                                                      ("classifier.bias", "param_groups[0] classifier.bias")]
    assert rows[1]["lr"] == 0.0 and rows[0]["lr"] == 0.1
    assert main(["model", "params", "--model", "test_efficientnet", "--match", "nothing.*"]) == 2
    assert "matches no parameter" in capsys.readouterr().err
