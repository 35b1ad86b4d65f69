import json
import math
import re
import time

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from transferkit.config import load_config
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier
from transferkit.run import train
from transferkit.tasks.classification import build_model
from transferkit.training.checkpoint import load_weights, read_metadata
from transferkit.training.loop import EpochRecorder
from transferkit.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups, plan_params
from transferkit.training.runlog import read_metrics


def test_tiny_run_learns_and_writes_run_dir(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 6}))
    given = cfg.model_dump()
    result = train(cfg, out=tmp_path / "run", quiet=True)
    assert cfg.model_dump() == given  # the caller's config is left as it was (the run's copy is resolved)
    rows = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result.best_value > 1 / 3 + 0.15  # 3 classes: chance is 1/3
    run = tmp_path / "run"
    # what a run writes, and nothing else: its holder's id goes when the run ends (the lock file,
    # unlocked, may stay: filelock's choice)
    written = sorted(p.name for p in run.iterdir() if p.name != ".transferkit-run.lock")
    assert written == [".transferkit-run", "checkpoints", "classes.json", "config.yaml", "curves.png",
                       "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors",
                                                                        "states"]
    assert json.loads((run / "classes.json").read_text()) == ["circle", "cross", "square"]
    assert "num_classes: 3" in (run / "config.yaml").read_text()
    meta = read_metadata(run / "checkpoints" / "best.safetensors")
    assert meta["epoch"] == result.best_epoch and meta["val_acc"] == result.best_value
    model, _ = create_classifier("test_efficientnet", 3)
    load_weights(model, run / "checkpoints" / "last.safetensors")


def test_each_epochs_row_holds_the_first_groups_learning_rate(synth_root, tmp_path, monkeypatch):
    """`lr` in metrics.jsonl is the first parameter group's (the body's), not the head's ten times it;
    TensorBoard gets every group's, by name."""
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1, "optim.head_lr_mult": 10,
                                                          "schedule.kind": "constant"}))
    logged = []
    real = EpochRecorder.record

    def record(self, *args, **kwargs):
        self.listeners.append(lambda row, group_lrs: logged.append(group_lrs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EpochRecorder, "record", record)
    result = train(cfg, out=tmp_path / "run", quiet=True)
    assert [r["lr"] for r in result.metrics] == [0.01]
    assert logged == [[("base", 0.01), ("head", 0.1)]]


def test_a_training_prints_its_effective_batch_and_parameter_groups_once(synth_root, tmp_path, monkeypatch):
    """What a user reads before the first epoch: the images in a step with the learning rate they get,
    then the parameter-group table (rule, tensors, rate)."""
    import io

    from rich.console import Console
    from rich.table import Table

    said = []
    monkeypatch.setattr("transferkit.run.console.print", lambda *a, **k: said.append(a[0] if a else ""))
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1, "optim.head_lr_mult": 10,
                                                          "data.batch_size": 16}))
    train(cfg, out=tmp_path / "run")
    lines = [s for s in said if isinstance(s, str)]
    assert [s for s in lines if s.startswith("effective batch:")] == [
        "effective batch: data.batch_size 16 = 16 images a step; learning rate: optim.lr 0.01 as configured "
        "(optim.lr_scaling none)"]
    tables = [t for t in said if isinstance(t, Table) and t.title == "parameter groups"]
    assert len(tables) == 1
    out = Console(file=io.StringIO(), width=200, color_system=None)
    out.print(tables[0])
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("│")[1:-1]]
                                              for line in out.file.getvalue().splitlines() if line.startswith("│"))}
    assert sorted(rows) == ["base", "head"]
    assert rows["head"][0] == "2" and rows["head"][2:] == ["1.00e-01", "0.0001", "no"]  # classifier weight and bias
    assert rows["base"][2] == "1.00e-02"


@pytest.mark.parametrize("world", [1, 2])
def test_each_epochs_progress_bar_counts_its_images_and_a_resumed_one_starts_where_it_was(synth_root, tmp_path,
                                                                                          monkeypatch, world):
    """72 training images in batches of 16: each bar goes 0 to 72; a state after batch 4 of epoch 2
    resumes that epoch's bar at 64. Under torchrun each of N processes gets as many images and the
    bar counts all of them: with world 2, one process stands for the first of two (its loader
    unsharded, so it sees all 72 itself) and the bar counts twice as many."""
    import shutil

    from transferkit.progress import StepProgress
    from transferkit.training.distributed import Processes

    bars = {}
    real_add, real_remove = StepProgress.add_task, StepProgress.remove_task

    def add_task(self, description, **kw):
        task = real_add(self, description, **kw)
        bars[task] = [description, kw["total"], kw.get("completed", 0)]
        return task

    def remove_task(self, task):
        bars[task].append(next(t for t in self.tasks if t.id == task).completed)
        real_remove(self, task)

    monkeypatch.setattr(StepProgress, "add_task", add_task)
    monkeypatch.setattr(StepProgress, "remove_task", remove_task)
    monkeypatch.setattr("transferkit.run.from_environment", lambda *a: Processes(world=world))
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2, "data.batch_size": 16,
                                                          "checkpoint.every_steps": 3, "checkpoint.keep_last": 100}))
    train(cfg, out=run, quiet=True)
    assert list(bars.values()) == [["epoch 1", 72 * world, 0, 72 * world], ["epoch 2", 72 * world, 0, 72 * world]]
    bars.clear()
    shutil.rmtree(run / "checkpoints" / "states" / "step-00000010")  # step 9: batch 4 of epoch 2
    train(cfg, resume=run, quiet=True)
    assert list(bars.values()) == [["epoch 2", 72 * world, 64 * world, 72 * world]]


def test_same_seed_same_run(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2}))
    a = train(cfg, out=tmp_path / "a", quiet=True)
    b = train(cfg, out=tmp_path / "b", quiet=True)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a.metrics]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b.metrics]


def test_existing_run_dir_is_not_overwritten(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1}))
    train(cfg, out=tmp_path / "r", quiet=True)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(TransferKitError, match="already holds a run"):
        train(cfg, out=tmp_path / "r", quiet=True)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_head_learning_rate_multiplier():
    cfg = load_config(None, ["data.root=x", "optim.lr=0.02", "optim.head_lr_mult=10"])
    model, family = create_classifier("test_efficientnet", 3)
    groups = param_groups(model, family.head_patterns, cfg.optim)
    head = next(g for g in groups if g["name"] == "head")
    assert head["lr"] == pytest.approx(0.2)
    assert {id(p) for p in head["params"]} == {id(model.classifier.weight), id(model.classifier.bias)}
    opt = build_optimizer(model, family.head_patterns, cfg.optim)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.2])


def test_schedules():
    cfg = load_config(None, ["data.root=x", "schedule.epochs=4", "schedule.warmup_epochs=1"]).schedule
    steps = [lr_factor(s, 40, 10, cfg) for s in range(40)]
    assert steps[0] == pytest.approx(0.1) and steps[9] == pytest.approx(1.0)  # linear warmup
    assert steps[10] == pytest.approx(1.0) and steps[-1] < 0.01  # cosine to ~0
    assert all(a >= b for a, b in zip(steps[10:], steps[11:], strict=False))
    step = load_config(None, ["data.root=x", "schedule.kind=step", "schedule.step_epochs=2",
                              "schedule.gamma=0.5"]).schedule
    assert [lr_factor(s * 10, 40, 10, step) for s in range(4)] == [1.0, 1.0, 0.5, 0.5]
    const = load_config(None, ["data.root=x", "schedule.kind=constant"]).schedule
    assert lr_factor(39, 40, 10, const) == 1.0
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, step, steps_per_epoch=10)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_frozen_batchnorm_keeps_statistics_and_weights(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1, "optim.freeze_bn": "true"}))
    result = train(cfg, out=tmp_path / "run", quiet=True)
    after, _ = create_classifier("test_efficientnet", 3)
    load_weights(after, result.run_dir / "checkpoints" / "last.safetensors")
    start, _, _ = build_model(cfg, 3)  # the untrained model, exactly as the run built it
    bn = [n for n, m in start.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    s0, s1 = start.state_dict(), after.state_dict()
    for name in bn:
        for key in ("running_mean", "running_var", "weight", "bias", "num_batches_tracked"):
            assert torch.equal(s0[f"{name}.{key}"], s1[f"{name}.{key}"]), f"{name}.{key}"
    assert not torch.equal(s0["conv_stem.weight"], s1["conv_stem.weight"])  # the rest did train


def test_a_wrapped_model_is_saved_under_its_plain_names(tmp_path):
    """Wrappers nested either way (a run under torchrun with model.compile compiles its
    DistributedDataParallel model; a user's DataParallel may go around that): the names saved are the
    model's own, without `module.` or `_orig_mod.`, so any run or tool loads them."""
    from safetensors.torch import load_file

    from transferkit.training.checkpoint import save_weights

    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    wrapped = torch.nn.DataParallel(torch.compile(torch.nn.DataParallel(model)))  # compiled lazily: no build
    save_weights(wrapped, tmp_path / "w.safetensors")
    saved = load_file(str(tmp_path / "w.safetensors"))
    assert sorted(saved) == ["0.bias", "0.weight"] and torch.equal(saved["0.weight"], model[0].weight)


def _optim(*overrides):
    return load_config(None, ["data.root=x", "optim.lr=0.1", "optim.weight_decay=0.01", *overrides]).optim


def test_param_group_rules_first_match_wins_and_carry_lr_and_decay():
    model, family = create_classifier("test_efficientnet", 3)
    cfg = _optim('optim.param_groups=[{match: "blocks.0.*", lr_mult: 0.5, decay_mult: 0}, '
                 '{match: "blocks.*", lr_mult: 0.25}, {match: "conv_stem.*", freeze: true}]',
                 "optim.head_lr_mult=10")
    opt = build_optimizer(model, family.head_patterns, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["param_groups[0] blocks.0.*"]["lr"] == pytest.approx(0.05)
    assert by_name["param_groups[0] blocks.0.*"]["weight_decay"] == 0.0
    assert by_name["param_groups[1] blocks.*"]["lr"] == pytest.approx(0.025)
    assert by_name["param_groups[1] blocks.*"]["weight_decay"] == pytest.approx(0.01)
    assert by_name["head"]["lr"] == pytest.approx(1.0)
    assert by_name["base"]["lr"] == pytest.approx(0.1)
    assert not model.conv_stem.weight.requires_grad
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.conv_stem.weight) not in in_opt  # frozen parameters are left out
    first_block = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.0.")}
    assert first_block == {id(p) for p in by_name["param_groups[0] blocks.0.*"]["params"]}


def test_rule_matching_nothing_is_an_error():
    model, family = create_classifier("test_efficientnet", 3)
    with pytest.raises(TransferKitError) as refused:
        build_optimizer(model, family.head_patterns, _optim('optim.param_groups=[{match: "blcoks.*"}]'))
    assert str(refused.value) == ("optim.param_groups[0].match 'blcoks.*' matches no parameter of EfficientNet; "
                                  "list the names with `transferkit model params`")
    with pytest.raises(TransferKitError, match="optim.freeze_until 'blocks.99' names no module"):
        build_optimizer(model, family.head_patterns, _optim("optim.freeze_until=blocks.99"))


def test_freeze_until_no_decay_and_layer_decay():
    model, family = create_classifier("tf_efficientnet_lite0", 2)
    plans = {p.name: p for p in plan_params(model, family.head_patterns,
                                            _optim("optim.freeze_until=blocks.1", "optim.no_decay_norm_bias=true",
                                                   "optim.layer_decay=0.5", "optim.head_lr_mult=1"))}
    names = list(plans)
    last_frozen = max(i for i, n in enumerate(names) if n.startswith("blocks.1."))
    assert all(plans[n].frozen for n in names[: last_frozen + 1])
    assert not any(plans[n].frozen for n in names[last_frozen + 1:])
    assert plans["blocks.2.0.conv_pw.weight"].weight_decay == pytest.approx(0.01)
    assert plans["blocks.2.0.bn1.weight"].weight_decay == 0.0 and plans["classifier.bias"].weight_decay == 0.0
    assert plans["classifier.weight"].weight_decay == pytest.approx(0.01)  # a matrix decays
    # timm's layers for this model run from the stem (0) to the head (17): lr x 0.5 per layer below the top.
    assert plans["classifier.weight"].lr == pytest.approx(0.1)
    assert plans["conv_head.weight"].lr == pytest.approx(0.1 * 0.5)
    assert plans["conv_stem.weight"].lr == pytest.approx(0.1 * 0.5 ** 17)
    lrs = [plans[n].lr for n in names]
    assert all(a <= b * (1 + 1e-9) for a, b in zip(lrs, lrs[1:], strict=False))  # never falls with depth
    assert {round(math.log(lr / 0.1, 0.5), 6) for lr in lrs} <= {float(k) for k in range(18)}


def test_no_decay_spares_every_bias_whatever_its_shape_and_only_vectors_besides():
    """As timm's param_groups_weight_decay: a tensor of one dimension or a `.bias`, of any shape."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(1, 4, 1, 1))  # a bias kept 4-D for broadcasting
            self.scale = torch.nn.Parameter(torch.ones(1, 4, 1, 1))

    plans = plan_params(torch.nn.Sequential(Scaled()), (), _optim("optim.no_decay_norm_bias=true"))
    assert {p.name: p.weight_decay for p in plans} == {"0.bias": 0.0, "0.scale": pytest.approx(0.01)}


def test_the_parameter_groups_table_sums_each_rule():
    """One row a rule, in the order rules first match: tensors, values (thousands separated), the
    learning rate and weight decay (a range where they differ within the rule, as under layer decay
    or no_decay_norm_bias), and "-" for both where the rule freezes."""
    import io

    from rich.console import Console

    from transferkit.training.optim import ParamPlan, plan_table

    plans = [ParamPlan("blocks.0.w", (100, 30), "backbone", 1e-3, 0.05, False),
             ParamPlan("stem.w", (3, 3), "freeze_until", 0.0, 0.0, True),
             ParamPlan("blocks.0.b", (100,), "backbone", 5e-4, 0.0, False),
             ParamPlan("blocks.1.w", (10,), "backbone", 2e-3, 0.01, False),
             ParamPlan("head.w", (2, 100), "head", 1e-2, 0.05, False),
             ParamPlan("head.b", (2,), "head", 1e-2, 0.05, False)]
    table = plan_table(plans)
    assert table.title == "parameter groups"
    assert [(c.header, c.justify) for c in table.columns] == [
        ("rule", "left"), ("tensors", "right"), ("values", "right"), ("lr", "right"), ("weight decay", "right"),
        ("frozen", "right")]
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in console.file.getvalue().splitlines()
            if line.startswith("│")]
    assert rows == [["backbone", "3", "3,110", "5.00e-04..2.00e-03", "0..0.05", "no"],
                    ["freeze_until", "1", "9", "-", "-", "yes"],
                    ["head", "2", "202", "1.00e-02", "0.05", "no"]]


def test_frozen_parameters_are_bit_identical_after_training(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{
        "schedule.epochs": 1, "optim.param_groups": '[{match: "blocks.0.*", freeze: true}]'}))
    result = train(cfg, out=tmp_path / "run", quiet=True)
    start, _, _ = build_model(cfg, 3)
    after, _ = create_classifier("test_efficientnet", 3)
    load_weights(after, result.run_dir / "checkpoints" / "last.safetensors")
    s0, s1 = start.state_dict(), after.state_dict()
    frozen = [k for k in s0 if k.startswith("blocks.0.") and "running" not in k and "num_batches" not in k]
    assert frozen and all(torch.equal(s0[k], s1[k]) for k in frozen)
    trained = next(k for k in s0 if k.startswith("blocks.1.") and k.endswith(".weight"))
    assert not torch.equal(s0[trained], s1[trained])


def _cells(table) -> tuple[str, list[list[str]]]:
    """A rich table as printed: its title and each line's cells, padding kept."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    lines = console.file.getvalue().splitlines()
    return lines[0].strip(), [line.replace("┃", "│").split("│")[1:-1] for line in lines if line[:1] in "┃│"]


def test_the_closing_summary_shows_each_epoch_and_marks_the_best():
    from transferkit.training.runlog import summary_table

    rows = [{"epoch": 1, "train_loss": 0.693147, "val_loss": 0.5, "val_acc": 0.75, "val_top5": 0.96875, "lr": 1e-3,
             "seconds": 2.54},
            {"epoch": 2, "train_loss": 0.25, "val_loss": 0.125, "val_acc": 0.875, "val_top5": 1.0, "lr": 5e-4,
             "seconds": 12.0}]
    title, cells = _cells(summary_table(rows, best_epoch=2))
    assert title == "training summary"
    assert [[c.strip() for c in line] for line in cells] == [
        ["epoch", "train_loss", "val_loss", "val_acc", "val_top5", "lr", "seconds"],
        ["1", "0.6931", "0.5000", "0.7500", "0.9688", "1.00e-03", "2.5"],
        ["2 *", "0.2500", "0.1250", "0.8750", "1.0000", "5.00e-04", "12.0"]]
    assert all(c == " " + c.strip().rjust(len(c) - 2) + " " for line in cells for c in line)  # right-aligned
    detector = [{"epoch": 3, "train_loss": 1.5, "val_map": 0.25, "val_ap50": 0.5, "lr": 0.02, "seconds": 60.0}]
    title, cells = _cells(summary_table(detector, best_epoch=None, title="detector"))
    assert title == "detector"
    assert [[c.strip() for c in line] for line in cells] == [
        ["epoch", "train_loss", "val_map", "val_ap50", "lr", "seconds"],
        ["3", "1.5000", "0.2500", "0.5000", "2.00e-02", "60.0"]]


def test_the_curves_draw_each_series_the_rows_hold(tmp_path, monkeypatch):
    from PIL import Image

    from transferkit.training.runlog import curves_figure, plot_curves

    rows = [{"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "val_acc": 0.5, "val_top5": 0.75, "lr": 1e-3,
             "seconds": 1.0},
            {"epoch": 2, "train_loss": 0.4, "val_loss": 0.6, "val_acc": 0.625, "val_top5": 0.875, "lr": 1e-3,
             "seconds": 1.0}]
    fig = curves_figure(rows, title="resnet18 on flowers")
    loss, quality = fig.axes
    drawn = {ax.get_title(): [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]
             for ax in (loss, quality)}
    assert drawn == {"loss": [("train", [1, 2], [0.9, 0.4]), ("val", [1, 2], [0.8, 0.6])],
                     "validation": [("val top-1", [1, 2], [0.5, 0.625]), ("val top-5", [1, 2], [0.75, 0.875])]}
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train", "val"]
    assert [t.get_text() for t in quality.get_legend().get_texts()] == ["val top-1", "val top-5"]
    assert (loss.get_xlabel(), loss.get_ylabel(), quality.get_xlabel(), quality.get_ylabel()) == (
        "epoch", "loss", "epoch", "score")
    assert quality.get_ylim() == (0, 1.02)
    assert {line.get_marker() for ax in fig.axes for line in ax.lines} == {"o"}  # a point per epoch
    left, right = loss.get_position(), quality.get_position()
    assert left.x1 < right.x0 and (left.y0, left.y1) == (right.y0, right.y1)  # side by side
    assert fig._suptitle.get_text() == "resnet18 on flowers"
    detector = [{"epoch": 1, "train_loss": 2.0, "val_map": 0.1, "val_ap50": 0.3, "lr": 0.02, "seconds": 9.0}]
    fig = curves_figure(detector)
    assert [line.get_label() for ax in fig.axes for line in ax.lines] == ["train", "val mAP", "val AP50"]
    assert fig._suptitle is None
    plot_curves(rows, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (1000, 400)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    from transferkit.training import runlog

    titles, real = [], runlog.curves_figure
    monkeypatch.setattr(runlog, "curves_figure", lambda rows, title="": titles.append(title) or real(rows, title))
    plot_curves(rows, tmp_path / "titled.png", title="resnet18 on flowers")
    assert titles == ["resnet18 on flowers"]
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.parametrize("text, error", [
    ('{"epoch": 1}\n{"epoch": 2}\n', None),
    ('{"epoch": 1}\n\n{"epoch": 2}\n{"epoch": 3, "val', None),  # the last row cut short by a kill
    ('{"epoch": 1}\n{"epo\n{"epoch": 3}\n', "2"),
    ('{"epoch": 1}\n[1, 2]\n', "2"),
    ('{"epoch": "1"}\n', "1"),
    ('{"epoch": 1}\n{"epoch": 2}', None),
], ids=["whole", "cut-last-row", "bad-middle-row", "not-a-row", "epoch-not-a-number", "no-final-newline"])
def test_metrics_rows_are_read_back_and_damage_is_named_by_line(tmp_path, text, error):
    (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8")
    if error is None:
        assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
        return
    with pytest.raises(TransferKitError) as err:
        read_metrics(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'metrics.jsonl'}:{error}: not an epoch's row of metrics (damaged); "
                              "remove the line, or start the run again")


def test_metrics_that_are_not_utf8_are_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n\xff\n')
    with pytest.raises(TransferKitError) as err:
        read_metrics(tmp_path)
    assert str(err.value) == f"{tmp_path / 'metrics.jsonl'}: not UTF-8 text; the run's metrics are damaged"


def test_another_tools_safetensors_metadata_is_kept_as_text(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "hub.safetensors"),
              metadata={"format": "pt", "classes": '["a", "b"]'})
    assert read_metadata(tmp_path / "hub.safetensors") == {"format": "pt", "classes": ["a", "b"]}


def test_a_checkpoint_that_is_missing_damaged_or_for_another_model_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from transferkit.training.checkpoint import save_weights

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with pytest.raises(TransferKitError) as err:
        load_weights(model, tmp_path / "none.safetensors")
    assert str(err.value) == f"checkpoint not found: {tmp_path / 'none.safetensors'}"
    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(TransferKitError) as err:
        load_weights(model, tmp_path / "cut.safetensors")
    assert str(err.value).startswith(f"cannot read checkpoint {tmp_path / 'cut.safetensors'}: ")
    with pytest.raises(TransferKitError) as err:
        read_metadata(tmp_path / "cut.safetensors")
    assert str(err.value).startswith(f"cannot read checkpoint {tmp_path / 'cut.safetensors'}: ")
    other = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "2.weight": torch.zeros(1)}
    save_file(other, str(tmp_path / "other.safetensors"))  # 1.weight, 1.bias missing; 2.weight extra; 0.bias 4
    with pytest.raises(TransferKitError) as err:
        load_weights(model, tmp_path / "other.safetensors")
    assert str(err.value) == (f"checkpoint {tmp_path / 'other.safetensors'} does not fit model: 2 missing, "
                              "1 unexpected, 1 wrong-shape tensors (first: 1.bias); was it written for another "
                              "model or class set?")
    own = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [({"0.bias": torch.zeros(4), "9.x": torch.zeros(1)}, "0 missing, 1 unexpected, 1 wrong-shape tensors "
              "(first: 9.x)"),
             ({"0.bias": torch.zeros(4)}, "0 missing, 0 unexpected, 1 wrong-shape tensors (first: 0.bias)")]
    for extra, first in cases:
        save_file({**own, **extra}, str(tmp_path / "other.safetensors"))
        with pytest.raises(TransferKitError) as err:
            load_weights(model, tmp_path / "other.safetensors")
        assert first in str(err.value)
    save_file({k: v for k, v in own.items() if k != "1.bias"}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TransferKitError, match=r"1 missing, 0 unexpected, 0 wrong-shape tensors \(first: 1\.bias\)"):
        load_weights(model, tmp_path / "other.safetensors")
    save_weights(model, tmp_path / "own.safetensors", {"classes": ["a"]})
    assert load_weights(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)),
                        tmp_path / "own.safetensors") == {"classes": ["a"]}


def test_classification_metrics_by_hand():
    from transferkit.training.evaluate import classification_metrics

    rows = [([5, 0, 0, 0, 0, 0], 0),  # top-1
            ([6, 5, 4, 3, 2, 1], 4),  # fifth: top-5 only
            ([6, 5, 4, 3, 2, 1], 5),  # sixth: neither
            ([0, 0, 9, 0, 0, 0], 2)]  # top-1

    def nll(logits, label):  # -log softmax, written out
        return math.log(sum(math.exp(v) for v in logits)) - logits[label]

    metrics = classification_metrics(torch.tensor([r for r, _ in rows], dtype=torch.float32),
                                     torch.tensor([label for _, label in rows]))
    assert metrics.keys() == {"val_loss", "val_acc", "val_top5"}
    assert metrics["val_loss"] == pytest.approx(sum(nll(r, label) for r, label in rows) / 4, rel=1e-12)
    assert (metrics["val_acc"], metrics["val_top5"]) == (0.5, 0.75)
    five = classification_metrics(torch.tensor([[1.0, 2, 3, 4, 5]]), torch.tensor([0]))
    assert (five["val_acc"], five["val_top5"]) == (0.0, 1.0)  # five classes: top-5 is shown (and always hit)
    four = classification_metrics(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([3]))
    assert four.keys() == {"val_loss", "val_acc"} and four["val_acc"] == 1.0
    assert classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == {"val_loss": 0.0,
                                                                                          "val_acc": 0.0}


def test_schedules_by_hand():
    """Each schedule's multiplier at chosen steps, worked out by hand: 4 epochs of 10 steps."""
    def schedule(*overrides):
        return load_config(None, ["data.root=x", "schedule.epochs=4", *overrides]).schedule

    cosine = schedule("schedule.warmup_epochs=1", "schedule.min_lr_ratio=0.1")
    # warmup: (step + 1) / 10; then 0.1 + 0.9 x (1 + cos(pi x (step - 10) / 30)) / 2, down to 0.1 at step 40
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 25: 0.55, 40: 0.1}
    assert {s: lr_factor(s, 40, 10, cosine) for s in expected} == pytest.approx(expected)
    # warmup_epochs 0.28 of 10 steps is 2.8 steps, rounded to 3
    short = schedule("schedule.warmup_epochs=0.28")
    assert [lr_factor(s, 40, 10, short) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    # step: gamma every step_epochs, counted from step 0 (a warmup epoch counts as an epoch)
    step = schedule("schedule.kind=step", "schedule.warmup_epochs=1", "schedule.step_epochs=1", "schedule.gamma=0.5")
    assert [lr_factor(s, 40, 10, step) for s in (5, 10, 19, 20, 39)] == pytest.approx([0.6, 0.5, 0.5, 0.25, 0.125])
    constant = schedule("schedule.kind=constant", "schedule.warmup_epochs=2")
    assert [lr_factor(s, 40, 10, constant) for s in (0, 19, 20, 39)] == pytest.approx([0.05, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("name, expected", [
    ("sgd", {"lr": 0.1, "momentum": 0.8, "nesterov": True, "weight_decay": 0.03}),
    ("adamw", {"lr": 0.1, "weight_decay": 0.03}),
])
def test_the_optimiser_is_the_one_named_with_its_settings(name, expected):
    model, family = create_classifier("test_efficientnet", 3)
    opt = build_optimizer(model, family.head_patterns,
                          _optim(f"optim.name={name}", "optim.momentum=0.8", "optim.nesterov=true",
                                 "optim.weight_decay=0.03"))
    assert type(opt) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    assert {k: opt.defaults[k] for k in expected} == pytest.approx(expected)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.03}


def test_every_parameter_frozen_is_one_line():
    model, family = create_classifier("test_efficientnet", 3)
    with pytest.raises(TransferKitError, match="^every parameter is frozen: nothing to train; loosen freeze rules$"):
        build_optimizer(model, family.head_patterns, _optim('optim.param_groups=[{match: "*", freeze: true}]'))


def test_each_parameter_is_labelled_by_what_decided_it():
    """A rule wins over freeze_until; freeze_until over the head and base; a parameter whose
    requires_grad is off is frozen, under its rule's label where a rule froze it too."""
    model, family = create_classifier("test_efficientnet", 3)
    model.blocks[1][0].bn1.weight.requires_grad_(False)
    model.conv_head.weight.requires_grad_(False)
    cfg = _optim('optim.param_groups=[{match: "blocks.0.0.conv.*", lr_mult: 0.5}, '
                 '{match: "conv_head.*", freeze: true}]', "optim.freeze_until=blocks.0", "optim.head_lr_mult=10")
    plans = {p.name: (p.rule, p.frozen, p.lr) for p in plan_params(model, family.head_patterns, cfg)}
    assert plans["blocks.0.0.conv.weight"] == ("param_groups[0] blocks.0.0.conv.*", False, pytest.approx(0.05))
    assert plans["conv_stem.weight"] == ("freeze_until blocks.0", True, pytest.approx(0.1))
    assert plans["blocks.0.0.bn1.weight"][:2] == ("freeze_until blocks.0", True)
    assert plans["blocks.1.0.bn1.weight"][:2] == ("frozen (requires_grad off)", True)
    assert plans["conv_head.weight"][:2] == ("param_groups[1] conv_head.*", True)
    assert plans["blocks.1.0.conv_pwl.weight"] == ("base", False, pytest.approx(0.1))
    assert plans["classifier.weight"] == ("head", False, pytest.approx(1.0))
    assert [(p.name, p.shape) for p in plan_params(model, family.head_patterns, cfg)] == [
        (n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_parameters_of_one_rule_and_rate_share_a_group_in_the_order_met():
    """Under layer decay a rule spans several learning rates: a group for each, named by the rule."""
    model, family = create_classifier("test_efficientnet", 3)
    cfg = _optim("optim.layer_decay=0.5", "optim.no_decay_norm_bias=true", "optim.head_lr_mult=1")
    groups = param_groups(model, family.head_patterns, cfg)
    plans = plan_params(model, family.head_patterns, cfg)
    keys = list(dict.fromkeys((p.rule, p.lr, p.weight_decay) for p in plans))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == keys
    params = dict(model.named_parameters())
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(params[p.name]) for p in plans if (p.rule, p.lr, p.weight_decay) == key] for key in keys]


# Which epoch's weights become best.safetensors (EpochRecorder): the higher score, ties to the lower
# loss; the lower loss where the loss is the metric; the EMA's weights where the metric is the EMA's;
# and the line each epoch prints.

def recorder_for(tmp_path, best_metric, ema=False):
    model = torch.nn.Linear(2, 1)
    (tmp_path / "checkpoints").mkdir(parents=True)
    said = []
    recorder = EpochRecorder(tmp_path, model, {"classes": ["a"]}, lambda *a, **k: said.append(a[0]),
                             best_metric=best_metric)
    if ema:
        recorder.ema_model = torch.nn.Linear(2, 1)
    return recorder, said


def record_epochs(recorder, rows):
    """Each row recorded with the weights set to its epoch number, so that a checkpoint names its epoch."""
    bests = []
    for epoch, metrics in enumerate(rows, 1):
        with torch.no_grad():
            recorder.model.bias.fill_(epoch)
            if recorder.ema_model is not None:
                recorder.ema_model.bias.fill_(-epoch)
        recorder.record("finetune", 1.0, metrics, time.perf_counter(), [("base", 0.01)])
        bests.append(recorder.best_epoch)
    return bests


@pytest.mark.parametrize("best_metric, rows, expected", [
    # higher accuracy wins; a tie goes to the lower loss, an exact tie keeps the earlier epoch
    ("val_acc", [(0.5, 0.9), (0.7, 0.8), (0.7, 0.6), (0.7, 0.7), (0.7, 0.6), (0.6, 0.1)], [1, 2, 3, 3, 3, 3]),
    # the loss as the metric: lower wins, a tie keeps the earlier epoch
    ("val_loss", [(0.9, 1.0), (0.1, 0.8), (0.9, 0.8), (0.9, 0.9), (0.2, 0.5)], [1, 2, 2, 2, 5]),
])
def test_the_best_epoch_is_the_higher_score_and_ties_go_to_the_lower_loss(tmp_path, best_metric, rows, expected):
    recorder, _ = recorder_for(tmp_path, best_metric)
    bests = record_epochs(recorder, [{"val_loss": loss, "val_acc": acc} for acc, loss in rows])
    assert bests == expected
    best = tmp_path / "checkpoints" / "best.safetensors"
    assert read_metadata(best)["epoch"] == expected[-1] and read_metadata(best)["weights"] == "live"
    assert load_file(str(best))["bias"].item() == expected[-1]  # that epoch's weights
    assert load_file(str(tmp_path / "checkpoints" / "last.safetensors"))["bias"].item() == len(rows)


def test_a_detector_without_a_validation_loss_keeps_the_first_of_equal_maps(tmp_path):
    recorder, _ = recorder_for(tmp_path, "val_map")
    assert record_epochs(recorder, [{"val_map": m} for m in (0.2, 0.3, 0.3, 0.1)]) == [1, 2, 2, 2]


def test_the_ema_metric_picks_the_ema_weights_and_a_phase_without_an_ema_is_never_best(tmp_path):
    recorder, _ = recorder_for(tmp_path, "ema_val_acc", ema=True)
    rows = [{"val_acc": 0.9, "val_loss": 0.1},  # a probe phase: no EMA metric, whatever its own score
            {"val_acc": 0.1, "val_loss": 0.9, "ema_val_acc": 0.5, "ema_val_loss": 0.8},
            {"val_acc": 0.1, "val_loss": 0.1, "ema_val_acc": 0.5, "ema_val_loss": 0.6},  # the tie: lower EMA loss
            {"val_acc": 0.1, "val_loss": 0.05, "ema_val_acc": 0.5, "ema_val_loss": 0.7}]
    assert record_epochs(recorder, rows) == [0, 2, 3, 3]
    best = tmp_path / "checkpoints" / "best.safetensors"
    assert read_metadata(best)["weights"] == "ema" and read_metadata(best)["epoch"] == 3
    assert load_file(str(best))["bias"].item() == -3  # the EMA's weights of epoch 3
    assert load_file(str(tmp_path / "checkpoints" / "ema.safetensors"))["bias"].item() == -4
    assert read_metadata(tmp_path / "checkpoints" / "ema.safetensors")["weights"] == "ema"


def test_the_ema_loss_as_the_metric_lower_wins(tmp_path):
    recorder, _ = recorder_for(tmp_path, "ema_val_loss", ema=True)
    rows = [{"val_loss": 0.1, "ema_val_loss": 0.5}, {"val_loss": 0.9, "ema_val_loss": 0.4},
            {"val_loss": 0.0, "ema_val_loss": 0.45}]
    assert record_epochs(recorder, rows) == [1, 2, 2]


def test_each_epoch_prints_its_losses_and_scores(tmp_path):
    recorder, said = recorder_for(tmp_path, "val_acc")
    recorder.record("probe", 0.123456, {"val_loss": 0.5, "val_acc": 0.25, "val_top5": 0.75}, time.perf_counter(),
                    [("head", 0.01)])
    assert re.fullmatch(r"epoch 1 \(probe\): train_loss 0\.1235  val_loss 0\.5000  val_acc 0\.2500  \(\d+\.\ds\)",
                        said[-1]), said[-1]
    recorder.record("finetune", 2.0, {"val_map": 0.125, "val_ap50": 0.5}, time.perf_counter(), [("base", 0.01)])
    assert re.fullmatch(r"epoch 2 \(finetune\): train_loss 2\.0000  val_map 0\.1250  val_ap50 0\.5000  \(\d+\.\ds\)",
                        said[-1]), said[-1]
    # with an EMA, its score beside the live weights' (its loss stays in metrics.jsonl)
    recorder, said = recorder_for(tmp_path / "ema", "val_acc", ema=True)
    recorder.record("finetune", 1.0, {"val_loss": 0.5, "val_acc": 0.25, "ema_val_loss": 0.4, "ema_val_acc": 0.375},
                    time.perf_counter(), [("base", 0.01)])
    assert re.fullmatch(r"epoch 1 \(finetune\): train_loss 1\.0000  val_loss 0\.5000  val_acc 0\.2500  "
                        r"ema_val_acc 0\.3750  \(\d+\.\ds\)", said[-1]), said[-1]
    recorder.record("finetune", 1.0, {"val_map": 0.125, "ema_val_map": 0.25}, time.perf_counter(),
                    [("base", 0.01)])
    assert re.fullmatch(r"epoch 2 \(finetune\): train_loss 1\.0000  val_map 0\.1250  ema_val_map 0\.2500  "
                        r"\(\d+\.\ds\)", said[-1]), said[-1]


def test_an_epoch_loss_is_the_mean_over_images_and_each_window_makes_one_step(tmp_path):
    """train_one_epoch on 9 images in batches of 2, 2, 2, 2, 1 with optim.accumulate 2, and a loss
    whose value is its batch's mean label and whose gradient on the bias is that mean too. Windows
    end after batches 2, 4 and 5 (the last one short); each step moves the bias (SGD, lr 1) by minus
    its window's mean batch loss: (0.5 + 2.5) / 2, (4.5 + 6.5) / 2 and 8 / 1. The epoch's loss is the
    mean over images, 36 / 9 (not the mean over batches, 4.4)."""
    from torch.utils.data import DataLoader, TensorDataset

    from transferkit.progress import make_progress
    from transferkit.training.loop import EpochPosition, Loop, Optimisation, train_one_epoch

    def loss_fn(model, batch):
        _, labels = batch
        bias = model.bias.sum()
        return (bias - bias.detach() + 1) * labels.mean(), len(labels)

    def epoch(position=None, accumulate=2, labels=tuple(range(9))):
        model = torch.nn.Linear(2, 1)
        model.eval()
        with torch.no_grad():
            model.bias.zero_()
        loader = DataLoader(TensorDataset(torch.zeros(len(labels), 2), torch.tensor(labels, dtype=torch.float32)),
                            batch_size=2,
                            generator=torch.Generator())
        recorder = EpochRecorder(tmp_path, model, {}, lambda *a, **k: None)
        progress = make_progress(disable=True)
        cfg = load_config(None, ["data.root=x", f"optim.accumulate={accumulate}"])
        loop = Loop(cfg, model, (), loader, loader, loss_fn, None, recorder, progress, torch.device("cpu"))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        opt = Optimisation(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                           accumulate=accumulate)
        bias, after = [], []
        optimizer.register_step_post_hook(lambda *args: bias.append(model.bias.item()))
        loss = train_one_epoch(loop, opt, progress.add_task("epoch", total=9), position,
                               after_step=lambda pos: after.append((pos.batches_done, pos.seen, pos.loss_sum)))
        assert model.training
        return loss, bias, after

    loss, bias, after = epoch()
    assert loss == pytest.approx(4.0)
    assert bias == pytest.approx([-1.5, -7.0, -15.0])
    assert after == [(2, 4, pytest.approx(6.0)), (4, 8, pytest.approx(28.0)), (5, 9, pytest.approx(36.0))]
    # from a state taken after the first window: its batches are passed over, its loss and images kept
    loss, bias, after = epoch(EpochPosition(batches_done=2, loss_sum=6.0, seen=4))
    assert loss == pytest.approx(4.0)
    assert bias == pytest.approx([-5.5, -13.5])
    assert after == [(4, 8, pytest.approx(28.0)), (5, 9, pytest.approx(36.0))]
    # The running sum is kept in float64: a long epoch's sum (here 2^24 + 1 before the window, which
    # float32 cannot hold) keeps its units.
    loss, _, after = epoch(EpochPosition(batches_done=2, loss_sum=2.0**24 + 1, seen=4))
    assert [sum_ for _, _, sum_ in after] == [2.0**24 + 1 + 22, 2.0**24 + 1 + 30]
    assert loss == (2.0**24 + 1 + 30) / 9
    # optim.accumulate 3: windows end after batches 3 and 5, the last of two batches; the bias moves
    # by (0.5 + 2.5 + 4.5) / 3, then (6.5 + 8) / 2.
    loss, bias, after = epoch(accumulate=3)
    assert loss == pytest.approx(4.0)
    assert bias == pytest.approx([-2.5, -9.75])
    assert after == [(3, 6, pytest.approx(15.0)), (5, 9, pytest.approx(36.0))]
    assert epoch(labels=(5.0,))[0] == 5.0  # an epoch of one image
