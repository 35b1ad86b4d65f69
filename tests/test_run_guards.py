"""Run directories guard what they hold: a new run never goes into a folder of the user's own nor over
another run, one process at a time works on a run, a resume checks the config it continues, a
non-finite loss stops the run before anything non-finite is saved, and a damaged run's config is
one line, not a traceback."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from transferkit.cli import main
from transferkit.config import load_config
from transferkit.data.classification import ImageDataset
from transferkit.errors import TransferKitError
from transferkit.run import train
from transferkit.training.runlog import read_metrics

MARKER = ".transferkit-run"


def options(root, **extra):
    return [a for o in tiny_overrides(root, **extra) for a in ("-o", o)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (ours included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    """The error: one line, the last written (a run that started prints its progress before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    return lines[-1]


@pytest.fixture(scope="module")
def finished_run(synth_root, tmp_path_factory):
    """A finished two-epoch run, copied by the tests that change it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2})), out=run, quiet=True)
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def finite_file(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


# --- a new run's --out --------------------------------------------------------------------------

def test_out_into_a_folder_of_the_users_own_is_refused_untouched(synth_root, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "config.yaml").write_text("my notes: keep\n")
    (mine / "classes.json").write_text('["mine"]\n')
    (mine / "checkpoints" / "best.safetensors").write_bytes(b"my own weights")
    before = snapshot(mine)
    assert main(["train", *options(synth_root), "--out", str(mine)]) == 2
    err = one_line_error(capsys)
    assert err == (f"error: --out {mine} is not empty and is not a transferkit run (it holds checkpoints, "
                   "classes.json, config.yaml); give a new or empty folder for the run")
    assert snapshot(mine) == before  # nothing written, not even a marker
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoints", "classes.json", "config.yaml"]


@pytest.mark.parametrize("files, holds", [
    (["a.txt", "b.txt", "c.txt"], "a.txt, b.txt, c.txt"),
    (["d.txt", "c.txt", "b.txt", "a.txt"], "a.txt, b.txt, c.txt and 1 more"),
    (["e.txt", "d.txt", "c.txt", "b.txt", "a.txt"], "a.txt, b.txt, c.txt and 2 more"),
])
def test_a_users_folder_is_named_by_its_first_three_files(tmp_path, files, holds):
    from transferkit.training.runguard import refuse_unusable_out

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in files:
        (mine / name).write_text("mine\n")
    with pytest.raises(TransferKitError) as refused:
        refuse_unusable_out(mine)
    assert str(refused.value) == (f"--out {mine} is not empty and is not a transferkit run (it holds {holds}); "
                                  "give a new or empty folder for the run")


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "killed-inside-its-second-epoch"])
def test_out_into_an_existing_run_is_refused_with_the_resume_command(synth_root, finished_run, tmp_path, capsys,
                                                                    finished):
    run = copy_of(finished_run, tmp_path)
    if not finished:  # what a run killed in its second epoch holds: one epoch, one state
        for name in ("summary.json", "curves.png"):
            (run / name).unlink()
        (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
        shutil.rmtree(run / "checkpoints" / "states" / "step-00000010")
    before = snapshot(run)
    assert main(["train", *options(synth_root), "--out", str(run)]) == 2
    assert one_line_error(capsys) == (
        f"error: {run} already holds a run; continue it with: transferkit train --resume {run} "
        "(add --epochs N to extend it), or choose another --out")
    assert snapshot(run) == before


def test_out_into_a_run_killed_before_its_first_state_says_there_is_nothing_to_resume(synth_root, finished_run,
                                                                                     tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    for name in ("metrics.jsonl", "summary.json", "curves.png"):  # what a run killed in its first epoch holds
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    before = snapshot(run)
    assert main(["train", *options(synth_root), "--out", str(run)]) == 2
    assert one_line_error(capsys) == (
        f"error: {run} already holds a run that stopped before it saved a training state, so there is nothing to "
        f"resume; choose another --out, or remove {run} to start it again")
    assert snapshot(run) == before


def test_out_naming_an_existing_file_is_one_line(synth_root, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    assert main(["train", *options(synth_root), "--out", str(target)]) == 2
    assert one_line_error(capsys) == f"error: --out {target} is a file, not a folder; give a new folder for the run"
    assert target.read_text() == "mine\n"


def test_a_run_that_fails_before_it_starts_leaves_nothing(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *options(synth_root, **{"data.root": str(tmp_path / "nowhere")}), "--out", str(run)]) == 2
    one_line_error(capsys)
    assert not run.exists()  # so the same command, with the data fixed, starts it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *options(synth_root, **{"data.root": str(tmp_path / "nowhere")}), "--out", str(empty)]) == 2
    assert empty.is_dir() and not any(empty.iterdir())  # the user's empty folder stays, empty


def test_the_marker_is_written_first_and_files_follow_the_umask(synth_root, tmp_path, monkeypatch):
    from transferkit.training import runguard

    seen_at_lock = []
    real_acquire = runguard.RunLock.acquire

    def acquire(self):
        seen_at_lock.append(sorted(os.listdir(self.run_dir)))
        return real_acquire(self)

    monkeypatch.setattr(runguard.RunLock, "acquire", acquire)
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1})), out=run, quiet=True)
    finally:
        os.umask(old)
    assert seen_at_lock == [[MARKER]]  # the folder's first file, before the lock and the rest
    marker = run / MARKER
    assert json.loads(marker.read_text()) == {"format": 1}
    state = next((run / "checkpoints" / "states").iterdir())
    for path in (marker, run / ".transferkit-run.lock", state / "config.yaml", state / "state.pt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not (run / ".transferkit-run.pid").exists()  # the holder's id goes with the lock


# --- one process per run ------------------------------------------------------------------------

def test_two_trainings_into_one_out_started_together_one_runs(synth_root, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "transferkit", "train", *options(synth_root), "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    ended: dict[int, float] = {}
    while len(ended) < 2:
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.02)
    outputs = [proc.communicate() for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 2], outputs
    winner = next(i for i, p in enumerate(procs) if p.returncode == 0)
    loser = 1 - winner
    assert ended[loser] < ended[winner]  # refused at once, not after the other's training
    last = outputs[loser][1].strip().splitlines()[-1]
    assert last == (f"error: {run} is in use by process {procs[winner].pid} (a train or resume of this run); "
                    "wait for it to end or stop it, then try again")
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


def test_a_resume_of_a_run_in_use_is_refused(synth_root, finished_run, tmp_path, capsys):
    from filelock import FileLock

    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    with FileLock(str(run / ".transferkit-run.lock")):
        (run / ".transferkit-run.pid").write_text("4242\n")
        assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    assert one_line_error(capsys) == (f"error: {run} is in use by process 4242 (a train or resume of this run); "
                                      "wait for it to end or stop it, then try again")
    (run / ".transferkit-run.pid").unlink()
    assert snapshot(run) == before


# --- a resume checks what it resumes -------------------------------------------------------------

def test_a_hand_edited_run_config_is_refused_on_resume(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.01\n", "lr: 0.5\n"))
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: the config differs from the run's (optim.lr: 0.01 -> 0.5); "
                          f"{config} was edited after step-00000010 was saved; ")
    assert snapshot(run) == before
    assert main(["train", "--resume", str(run), "--epochs", "3", "--allow-config-change", "optim.lr"]) == 2
    assert one_line_error(capsys) == "error: --allow-config-change: optim.lr cannot change in a resumed run"


def as_unmarked_run(run: Path) -> None:
    """What a run written before runs were marked holds: no marker, no lock, no config in its states."""
    for name in (MARKER, ".transferkit-run.lock"):
        (run / name).unlink()
    for state in (run / "checkpoints" / "states").iterdir():
        (state / "config.yaml").unlink()
        marker = json.loads((state / "COMPLETE").read_text())
        del marker["files"]["config.yaml"]
        (state / "COMPLETE").write_text(json.dumps(marker))


def test_a_new_run_over_an_unmarked_run_is_refused_untouched(synth_root, finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    as_unmarked_run(run)
    before = snapshot(run)
    assert main(["train", *options(synth_root), "--out", str(run)]) == 2
    assert one_line_error(capsys) == (f"error: {run} already holds a run; continue it with: transferkit train --resume "
                                      f"{run} (add --epochs N to extend it), or choose another --out")
    assert snapshot(run) == before


def test_an_unmarked_run_still_resumes_and_its_config_is_checked(synth_root, finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    as_unmarked_run(run)
    config = run / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("lr: 0.01\n", "lr: 0.5\n"))
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    assert one_line_error(capsys) == (
        f"error: {config} was changed after the training state step-00000010 was saved (its sha256 is not the one "
        "recorded then); put back the config the run was trained with, then resume")
    config.write_text(original)
    assert main(["train", *options(synth_root), "--out", str(run)]) == 2  # still a run: not overwritten
    assert "already holds a run" in one_line_error(capsys)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]
    assert (run / MARKER).is_file()  # marked now


def test_an_old_config_with_the_retired_key_still_resumes(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    as_unmarked_run(run)  # an old run's config.yaml holds optim.max_nonfinite_steps
    config = run / "config.yaml"
    text = config.read_text().replace("  lr: 0.01\n", "  lr: 0.01\n  max_nonfinite_steps: 5\n")
    config.write_text(text)
    for state in (run / "checkpoints" / "states").iterdir():
        marker = json.loads((state / "COMPLETE").read_text())
        marker["config_sha256"] = __import__("hashlib").sha256(text.encode()).hexdigest()
        (state / "COMPLETE").write_text(json.dumps(marker))
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert "max_nonfinite_steps" not in config.read_text()


# --- non-finite losses ---------------------------------------------------------------------------

def test_a_huge_learning_rate_stops_naming_the_step(synth_root, tmp_path, capsys, monkeypatch):
    """`-o optim.lr=1e30` is refused when the config is read (test_config_bounds.py); a learning rate
    that gets past that check (set from Python) still stops the run at its first non-finite loss."""
    import transferkit.cli as cli

    real_load = cli.load_config

    def huge_lr(*args, **kwargs):
        cfg = real_load(*args, **kwargs)
        cfg.optim = cfg.optim.model_copy(update={"lr": 1e30})
        return cfg

    monkeypatch.setattr(cli, "load_config", huge_lr)
    run = tmp_path / "run"
    args = ["train", *options(synth_root, **{"optim.name": "sgd"}), "--out", str(run)]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {run}: stopped at epoch 1, step 2 (batch 2 of 5): the loss is ")
    assert "the learning rate is the likely cause (lower optim.lr, now 1e+30)" in err
    for name in ("best", "last"):
        path = run / "checkpoints" / f"{name}.safetensors"
        assert not path.exists() or finite_file(path)
    assert not list((run / "checkpoints").glob("states/step-*"))


def test_nan_in_the_data_stops_and_keeps_the_last_good_state(synth_root, tmp_path, capsys, monkeypatch):
    real = ImageDataset.__getitem__
    calls = {"n": 0}

    def poisoned(self, index):
        image, label = real(self, index)
        if len(self) == 72:  # the train split (the validation split has 30 images)
            calls["n"] += 1
            if calls["n"] == 72 + 20:  # epoch 2, inside batch 2 (batches of 16)
                image = torch.full_like(image, float("nan"))
        return image, label

    monkeypatch.setattr(ImageDataset, "__getitem__", poisoned)
    run = tmp_path / "run"
    assert main(["train", *options(synth_root), "--out", str(run)]) == 2
    assert one_line_error(capsys) == (
        f"error: {run}: stopped at epoch 2, step 7 (batch 2 of 5): the loss is NaN; the batch holds NaN or inf "
        "values: check the data and its transforms; the newest training state is step-00000005, from before it")
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    states = sorted(p.name for p in (run / "checkpoints" / "states").iterdir())
    assert states == ["step-00000005"]
    for name in ("best", "last"):
        assert finite_file(run / "checkpoints" / f"{name}.safetensors")
    assert finite_file(run / "checkpoints" / "states" / "step-00000005" / "model.safetensors")


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    from transferkit.models.classification import create_classifier
    from transferkit.training.finite import NonFiniteError
    from transferkit.training.loop import EpochRecorder

    model, _ = create_classifier("test_efficientnet", 3)
    (tmp_path / "checkpoints").mkdir()
    recorder = EpochRecorder(tmp_path, model, {}, lambda *a, **k: None)
    recorder.record("finetune", 1.0, {"val_loss": 1.0, "val_acc": 0.5}, time.perf_counter(), [("base", 0.01)])
    assert (tmp_path / "checkpoints" / "best.safetensors").is_file()
    before = snapshot(tmp_path)
    with torch.no_grad():
        model.bn1.running_var[3] = float("inf")  # a buffer too, not only parameters
    with pytest.raises(NonFiniteError, match=r"the weights after epoch 2: bn1.running_var holds NaN or inf values"):
        recorder.record("finetune", 1.0, {"val_loss": 0.5, "val_acc": 0.9}, time.perf_counter(), [("base", 0.01)])
    assert snapshot(tmp_path) == before  # no metrics row, no last, no best
    # The EMA's weights likewise, named as the EMA's (the live weights finite again)
    with torch.no_grad():
        model.bn1.running_var[3] = 1.0
    recorder.ema_model, _ = create_classifier("test_efficientnet", 3)
    with torch.no_grad():
        recorder.ema_model.conv_stem.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        recorder.record("finetune", 1.0, {"val_loss": 0.5, "val_acc": 0.9}, time.perf_counter(), [("base", 0.01)])
    assert str(err.value).startswith(f"{tmp_path}: the EMA weights after epoch 2: conv_stem.weight holds NaN or inf "
                                     "values"), str(err.value)
    assert snapshot(tmp_path) == before


def test_an_optimiser_state_holding_nan_is_never_saved():
    """Adam's moments sit two mappings deep in its state_dict ({index: {"exp_avg": ...}})."""
    from transferkit.training.finite import NonFiniteError, require_finite

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    require_finite(model, "the state", optimizer)  # finite: nothing raised
    optimizer.state[model.bias]["exp_avg_sq"][1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^the state: the optimiser's state holds NaN or inf values"):
        require_finite(model, "the state", optimizer)


def test_a_run_whose_optimiser_state_goes_bad_saves_no_state_of_it(synth_root, tmp_path):
    """NaN in Adam's moments after the epoch's last step (the weights still finite): the epoch's state
    is not written, and the run stops naming the optimiser's state."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from transferkit.training.finite import NonFiniteError

    steps = [0]

    def at_step(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == 5:  # 72 images, batches of 16: epoch 1's last step
            first = optimizer.param_groups[0]["params"][0]
            moments = optimizer.state[first]["exp_avg_sq"]
            moments[(0,) * moments.dim()] = float("nan")

    hook = register_optimizer_step_post_hook(at_step)
    run = tmp_path / "run"
    try:
        with pytest.raises(NonFiniteError) as err:
            train(load_config(None, tiny_overrides(synth_root)), out=run, quiet=True)
    finally:
        hook.remove()
    assert str(err.value).startswith(f"{run}: the training state at step 5: the optimiser's state holds NaN or inf")
    assert not list((run / "checkpoints" / "states").glob("step-*"))


@pytest.mark.parametrize(("accumulate", "batch", "cause"), [
    (1, 1, "before any update"), (1, 2, "on finite data and weights"),
    (2, 2, "before any update"),  # a window of two batches: the first update comes after the second
    (2, 3, "on finite data and weights")])
def test_a_nan_loss_on_finite_data_and_weights_is_told_by_whether_an_update_came_before(
        synth_root, tmp_path, monkeypatch, accumulate, batch, cause):
    from transferkit.tasks.classification import ClassificationTask
    from transferkit.training.finite import NonFiniteError

    real = ClassificationTask.loss

    def loss(self, device):
        inner, calls = real(self, device), [0]

        def nan_at_batch(model, data):
            calls[0] += 1
            value, n = inner(model, data)
            return (value * float("nan") if calls[0] == batch else value), n
        return nan_at_batch

    monkeypatch.setattr(ClassificationTask, "loss", loss)
    cfg = load_config(None, tiny_overrides(synth_root, **{"optim.accumulate": accumulate}))
    with pytest.raises(NonFiniteError) as err:
        train(cfg, out=tmp_path / "run", quiet=True)
    assert str(err.value).startswith(f"{tmp_path / 'run'}: stopped at epoch 1, step {batch} (batch {batch} of 5): "
                                     f"the loss is NaN; {cause}"), str(err.value)


def test_a_detection_batch_with_an_inf_box_is_not_finite():
    """Images and targets as a detector takes them: a tuple of lists, the targets mappings."""
    from transferkit.training.finite import all_finite

    images = [torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1])} for _ in images]
    assert all_finite((images, targets))
    targets[1]["boxes"][0, 2] = float("inf")
    assert not all_finite((images, targets))


# --- a damaged run --------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [b"model: [unclosed\n", b"\xff\xfe\x00garbage", b"- just\n- a list\n"],
                         ids=["bad-yaml", "not-utf8", "not-a-mapping"])
def test_predict_on_a_run_with_a_damaged_config_is_one_line(synth_root, finished_run, tmp_path, capsys, damage):
    run = copy_of(finished_run, tmp_path)
    (run / "config.yaml").write_bytes(damage)
    image = next((synth_root / "val" / "circle").iterdir())
    assert main(["predict", "--run", str(run), str(image)]) == 2
    assert str(run / "config.yaml") in one_line_error(capsys)


def rewrite_metadata(ckpt: Path, **changes) -> None:
    """The checkpoint's tensors saved again with some of its metadata changed (None: removed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ckpt), framework="pt") as fh:
        meta = fh.metadata()
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    save_file(load_file(str(ckpt)), str(ckpt), metadata=meta)


@pytest.mark.parametrize("classes", ['"circle"', '["circle", "cross"]', '["circle", "cross", 3]', '{"a": 1}'],
                         ids=["a-string", "too-few", "not-names", "a-mapping"])
def test_a_checkpoint_whose_class_names_do_not_fit_is_one_line(synth_root, finished_run, tmp_path, capsys, classes):
    """Each of these named the outputs wrongly (a string's letters as the three classes) or not at all."""
    run = copy_of(finished_run, tmp_path)
    rewrite_metadata(run / "checkpoints" / "best.safetensors", classes=classes)
    image = next((synth_root / "val" / "circle").iterdir())
    assert main(["predict", "--run", str(run), str(image)]) == 2
    assert one_line_error(capsys) == (
        f"error: checkpoint {run / 'checkpoints' / 'best.safetensors'}: its metadata's classes are not a list of 3 "
        "class names (one per output of the model); save it again with transferkit, or remove that key")


def test_a_checkpoint_without_class_names_takes_the_runs(synth_root, finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    rewrite_metadata(run / "checkpoints" / "best.safetensors", classes=None)
    image = next((synth_root / "val" / "circle").iterdir())
    assert main(["predict", "--run", str(run), "--topk", "3", str(image)]) == 0
    named = capsys.readouterr().out.strip().split(": ", 1)[1]
    assert sorted(p.split()[0] for p in named.split(", ")) == ["circle", "cross", "square"]
    (run / "classes.json").write_text('["circle", "cross"]')  # damaged: two names for three outputs
    assert main(["predict", "--run", str(run), str(image)]) == 2
    assert one_line_error(capsys) == (
        f"error: {run / 'classes.json'} names 2 classes, the model has 3 outputs; the run's class names are damaged")


def test_a_training_state_with_nonfinite_weights_is_never_saved(synth_root, tmp_path, capsys, monkeypatch):
    """An update that leaves a weight NaN while the loss it came from was finite: the state due
    after that step (every 3 steps) is not written, and the run stops naming the tensor."""
    import transferkit.training.loop as loop_module

    real = loop_module.build_optimisation

    def spoiling(loop):
        opt = real(loop)
        calls = {"n": 0}

        def spoil(optimizer, args, kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                with torch.no_grad():
                    loop.model.conv_stem.weight[0, 0, 0, 0] = float("nan")

        opt.optimizer.register_step_post_hook(spoil)
        return opt

    monkeypatch.setattr(loop_module, "build_optimisation", spoiling)
    run = tmp_path / "run"
    assert main(["train", *options(synth_root, **{"checkpoint.every_steps": 3}), "--out", str(run)]) == 2
    assert one_line_error(capsys) == (
        f"error: {run}: the training state at step 3: conv_stem.weight holds NaN or inf values, so it was not "
        "saved; lower optim.lr, or check the data")
    assert not list((run / "checkpoints" / "states").glob("*"))
    assert not (run / "metrics.jsonl").exists()


def test_a_run_config_that_is_an_alias_bomb_is_refused_quickly(tmp_path):
    """The config a resume compares against is read with the same bounds as any config."""
    from transferkit.training.resumecheck import trained_with

    run, state = tmp_path / "run", tmp_path / "run" / "checkpoints" / "states" / "step-00000005"
    state.mkdir(parents=True)
    (state / "COMPLETE").write_text("{}")  # a state from before configs were kept with states
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]  # 9**9 values expanded
    (run / "config.yaml").write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(TransferKitError, match=r"config\.yaml: refused, the YAML .*\(the run's config is damaged\)$"):
        trained_with(run, state)
    assert time.perf_counter() - started < 5


def test_the_likely_cause_of_a_nonfinite_loss_is_told_from_what_is_still_finite():
    from transferkit.training.finite import likely_cause

    model = torch.nn.Linear(2, 1)
    good, bad = torch.ones(1, 2), torch.tensor([[1.0, float("nan")]])
    assert likely_cause(model, (bad, torch.zeros(1)), 3, 0.1) == \
        "the batch holds NaN or inf values: check the data and its transforms"
    assert likely_cause(model, (good, torch.zeros(1)), 0, 0.1) == \
        "before any update, so the data or labels of this batch are the likely cause"
    assert likely_cause(model, (good, torch.zeros(1)), 3, 0.1) == \
        "on finite data and weights: the learning rate is the likely cause (lower optim.lr, now 0.1), or this " \
        "batch's labels"
    with torch.no_grad():
        model.bias.fill_(float("inf"))
    assert likely_cause(model, (good, torch.zeros(1)), 3, 0.1) == \
        "the weights left the finite range in the last update: lower optim.lr (now 0.1)"


@pytest.mark.parametrize("value", ["NaN", "inf", "-inf"])
def test_a_nonfinite_loss_is_named_as_it_is(value):
    from transferkit.training.finite import NonFiniteError, check_loss

    model, batch = torch.nn.Linear(2, 1), (torch.ones(1, 2), torch.zeros(1))
    check_loss(torch.tensor(1e30), model, batch, 0, 0.1)  # large but finite: nothing raised
    with pytest.raises(NonFiniteError) as exc:
        check_loss(torch.tensor(float(value)), model, batch, 0, 0.1)
    assert str(exc.value) == (f"the loss is {value.lstrip('-')}; before any update, so the data or labels of this "
                              "batch are the likely cause")


def test_a_lock_whose_holder_wrote_no_id_says_so_within_a_second(tmp_path):
    from transferkit.training.runguard import HOLDER, RunLock

    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    started = time.monotonic()
    assert lock.holder() == "(id not recorded)"  # no holder file at all
    assert 0.9 < time.monotonic() - started < 3
    (run / HOLDER).write_text("12x\n", encoding="utf-8")  # not an id
    assert lock.holder() == "(id not recorded)"
    (run / HOLDER).write_text("4242\n", encoding="utf-8")
    assert lock.holder() == "4242"


def test_a_run_in_use_is_refused_at_once_not_after_waiting_for_it(tmp_path):
    from transferkit.training.runguard import RunLock

    run = tmp_path / "run"
    run.mkdir()
    held = RunLock(run).acquire()  # writes this process's id
    try:
        started = time.monotonic()
        with pytest.raises(TransferKitError, match=f"is in use by process {os.getpid()} "):
            RunLock(run).acquire()
        assert time.monotonic() - started < 0.5
    finally:
        held.release()
    RunLock(run).acquire().release()  # free once released


# --- where a run is, and what a finished run gives back -------------------------------------------

@pytest.fixture
def frozen_clock(monkeypatch):
    """The run folders' clock stopped at 2026-03-04 05:06:07."""
    import datetime as dt

    from transferkit.training import rundir

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 3, 4, 5, 6, 7)

    monkeypatch.setattr(rundir, "datetime", Frozen)


def test_a_run_without_out_goes_under_runs_named_after_its_config(frozen_clock):
    from transferkit.training import rundir

    assert rundir.default_run_dir("configs/flowers.yaml") == Path("runs/flowers-20260304-050607")
    assert rundir.default_run_dir(None) == Path("runs/run-20260304-050607")


def test_a_new_run_goes_to_out_else_the_configs_out_else_under_runs(tmp_path, monkeypatch, frozen_clock):
    from transferkit.training import rundir

    def new(out, config_out):
        cfg = load_config(None, ["data.root=x", *([f"out={config_out}"] if config_out else [])])
        return rundir.new_run_dir(out, cfg, "configs/flowers.yaml")

    assert new("given", "from-config") == Path("given")
    assert new(None, "from-config") == Path("from-config")
    assert new(None, None) == Path("runs/flowers-20260304-050607")
    monkeypatch.chdir(tmp_path)
    claim, point = rundir.open_run(load_config(None, ["data.root=x"]), Path("given"), None, [], print)
    with claim as run_dir:
        assert run_dir == Path("given") and point is None and (run_dir / ".transferkit-run").is_file()


def test_torchruns_other_ranks_follow_the_same_directory_and_state(synth_root, finished_run, tmp_path):
    from transferkit.training.rundir import follow_run

    cfg = load_config(None, tiny_overrides(synth_root))
    said = []
    held, point = follow_run(cfg, tmp_path / "given", None, [], said.append)
    assert point is None
    with held as run_dir:
        assert run_dir == tmp_path / "given" and not run_dir.exists()  # rank 0 makes and holds it
    run = copy_of(finished_run, tmp_path)
    states = run / "checkpoints" / "states"
    newest = max(states.glob("step-*"))
    (states / "step-99999999").mkdir()  # a state cut short by a kill: passed over, and said
    held, point = follow_run(cfg, tmp_path / "unused", run, [], said.append)
    with held as run_dir:
        assert run_dir == run
    assert point.dir == newest and point.state["global_step"] == int(newest.name.split("-")[1])
    assert len(said) == 1 and said[0].startswith(f"checkpoint {states / 'step-99999999'} is damaged")
    assert snapshot(run) == snapshot(finished_run)  # nothing claimed: no lock, no marker written


def test_a_finished_runs_checkpoints_by_name_or_path(finished_run, tmp_path):
    from transferkit.training.rundir import checkpoint_path, run_config

    assert checkpoint_path(finished_run, "best") == finished_run / "checkpoints" / "best.safetensors"
    assert checkpoint_path(finished_run, "last") == finished_run / "checkpoints" / "last.safetensors"
    own = tmp_path / "mine.safetensors"
    own.write_bytes(b"")
    assert checkpoint_path(finished_run, str(own)) == own  # a path is taken as it is
    with pytest.raises(TransferKitError) as err:
        checkpoint_path(finished_run, "ema")  # a run without optim.ema
    assert str(err.value) == (f"checkpoint not found: {finished_run / 'checkpoints' / 'ema.safetensors'}; "
                              "only a run with optim.ema writes it")
    with pytest.raises(TransferKitError) as err:
        checkpoint_path(tmp_path, "best")  # a run stopped before its first epoch ended
    assert str(err.value) == (f"checkpoint not found: {tmp_path / 'checkpoints' / 'best.safetensors'}; "
                              "has the run finished an epoch?")
    assert run_config(finished_run).schedule.epochs == 2
    with pytest.raises(TransferKitError) as err:
        run_config(tmp_path)
    assert str(err.value) == f"{tmp_path} is not a run directory (no config.yaml); give the --out of a train run"


@pytest.mark.parametrize("folder", ["users-own", "missing"])
def test_resume_of_a_folder_that_is_not_a_run_is_refused_untouched(tmp_path, folder):
    from transferkit.training.runguard import claim_run_to_resume

    target = tmp_path / "photos"
    if folder == "users-own":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(TransferKitError) as err:
        claim_run_to_resume(target)
    assert str(err.value) == f"{target} is not a run directory; give the --out of a train run to --resume"
    assert snapshot(tmp_path) == before and (folder == "users-own") == target.is_dir()  # no marker, no lock


@pytest.mark.parametrize("text", [None, "[\"a\", \"b\"", "{\"a\": 0}", "[1, 2]", "[]", "\"ab\""],
                         ids=["missing", "cut", "a-mapping", "numbers", "empty", "a-string"])
def test_a_runs_class_names_are_read_back_or_named_as_damaged(tmp_path, text):
    from transferkit.training.rundir import run_classes

    path = tmp_path / "classes.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(TransferKitError) as err:
        run_classes(tmp_path)
    assert str(err.value) == (f"{path} not found; give the --out of a train run (it writes its class names there)"
                              if text is None else
                              f"{path}: not a JSON list of class names; the run's class names are damaged")
    path.write_text('["cat", "dog"]', encoding="utf-8")
    assert run_classes(tmp_path) == ["cat", "dog"]
