"""Exact resumes: after SIGKILL, after SIGINT, from a damaged checkpoint; extending a finished run."""

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, RunsCode, tiny_overrides
from safetensors.torch import load_file

from transferkit.config import load_config
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier
from transferkit.run import train
from transferkit.training.optim import build_optimizer, build_scheduler
from transferkit.training.resume import carry_optimizer_state, find_state, load_state
from transferkit.training.runlog import read_metrics

EPOCHS = 6


def cli(*args, wait=True):
    cmd = [sys.executable, "-m", "transferkit", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def options(root, **extra):
    return [a for o in tiny_overrides(root, **{"schedule.epochs": EPOCHS, **extra}) for a in ("-o", o)]


def same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


EMA = {"optim.ema": "{decay: 0.9}"}  # an EMA moving fast enough to tell a rebuilt one from a resumed one


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = cli("train", *options(synth_root), "--out", run)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="module")
def reference_ema(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref_ema") / "run"
    proc = cli("train", *options(synth_root, **EMA), "--out", run)
    assert proc.returncode == 0, proc.stderr
    return run


# tests/helpers/stop_at_step.py runs the CLI with an optimiser-step hook that makes the process signal
# itself right after step STOP_AT: the signal lands at a known point inside the loop, on every machine.
STOP_AT = 8  # 5 steps an epoch: batch 3 of epoch 2
STOP_AT_STEP = REPO / "tests" / "helpers" / "stop_at_step.py"


def kill_mid_run(root, run, sig, **extra):
    """A run that signals itself after optimiser step STOP_AT, inside epoch 2."""
    cmd = [sys.executable, str(STOP_AT_STEP), str(int(sig)), str(STOP_AT), "--", "train", *options(root, **extra),
           "--out", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("ema", [False, True], ids=["plain", "with-EMA"])
def test_sigkill_then_resume_auto_is_bit_identical(synth_root, request, tmp_path, ema):
    reference = request.getfixturevalue("reference_ema" if ema else "reference")
    run = tmp_path / "run"
    code, _ = kill_mid_run(synth_root, run, signal.SIGKILL, **(EMA if ema else {}))
    assert code == -signal.SIGKILL
    assert len(read_metrics(run)) == 1  # killed inside epoch 2: its state is epoch 1's end
    assert [p.name for p in (run / "checkpoints" / "states").glob("step-*")] == ["step-00000005"]
    proc = cli("train", "--resume", "auto", "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr
    assert same_weights(run / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")
    if ema:  # the EMA and its update count came back with the state, not rebuilt from the weights
        assert same_weights(run / "checkpoints/ema.safetensors", reference / "checkpoints/ema.safetensors")
        assert same_weights(run / "checkpoints/best.safetensors", reference / "checkpoints/best.safetensors")
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))  # each epoch exactly once
    assert strip(rows) == strip(read_metrics(reference))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_state_and_resume_continues_mid_epoch(synth_root, reference, tmp_path, sig):
    run = tmp_path / "run"
    code, err = kill_mid_run(synth_root, run, sig)
    assert code == 128 + sig
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"{signal.Signals(sig).name}: stopped at epoch 2, batch 3")
    assert sorted(p.name for p in (run / "checkpoints" / "states").glob("step-*")) == [
        "step-00000005", f"step-{STOP_AT:08d}"]
    assert message.endswith(f"; the state is saved. Resume with: transferkit train --resume {run}")
    proc = cli("train", "--resume", run)
    assert proc.returncode == 0, proc.stderr
    assert same_weights(run / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, EPOCHS + 1))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_training_process_itself_stops_after_that_step(synth_root, reference, tmp_path, sig):
    """The test above in this process (where a mutation run sees which code it reaches): the signal
    arrives right after step STOP_AT; the run saves that step, stops with Interrupted naming where,
    gives the signal's handler back, and a resume ends as the run that was never stopped."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from transferkit.training.loop import Interrupted

    arrived = []

    def mine(signum, frame):  # catches the signal here if the run installed no handler of its own
        arrived.append(signum)

    previous = signal.signal(sig, mine)
    steps = [0]

    def at_step(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == STOP_AT:
            os.kill(os.getpid(), sig)  # the handler runs before the next line

    hook = register_optimizer_step_post_hook(at_step)
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": EPOCHS}))
    try:
        with pytest.raises(Interrupted) as stop:
            train(cfg, out=run, quiet=True)
        own = signal.getsignal(sig)
    finally:
        hook.remove()
        signal.signal(sig, previous)
    assert not arrived, "the run installed no handler of its own"
    assert (stop.value.signum, stop.value.run_dir, stop.value.where) == (sig, run, "epoch 2, batch 3")
    assert (run / ".transferkit-run").is_file()  # a run stopped after it started stays marked as a run
    assert own is mine  # the handler in place before the run, given back
    assert sorted(p.name for p in (run / "checkpoints" / "states").glob("step-*")) == [
        "step-00000005", f"step-{STOP_AT:08d}"]
    assert len(read_metrics(run)) == 1
    train(cfg, resume=run, quiet=True)
    assert same_weights(run / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")
    assert strip(read_metrics(run)) == strip(read_metrics(reference))


def test_damaged_newest_checkpoint_falls_back(synth_root, reference, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": EPOCHS}))
    train(cfg, out=run, quiet=True)
    states = sorted((run / "checkpoints" / "states").glob("step-*"))
    assert len(states) == 2  # keep_last
    newest = states[-1]
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])  # a write cut short
    messages = []
    assert find_state(run, messages.append) == states[0]
    assert messages == [f"checkpoint {newest} is damaged (state.pt does not match its checksum); "
                        "falling back to the previous one"]
    (states[0] / "COMPLETE").unlink()  # a kill before the marker was written
    messages.clear()
    with pytest.raises(TransferKitError, match="has no complete checkpoint to resume from"):
        find_state(run, messages.append)
    assert "no COMPLETE marker (the write did not finish)" in messages[1]


def test_resume_after_damage_is_still_exact(synth_root, reference, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": EPOCHS}))
    train(cfg, out=run, quiet=True)
    newest = sorted((run / "checkpoints" / "states").glob("step-*"))[-1]
    (newest / "COMPLETE").unlink()
    train(cfg, resume=run, quiet=True)  # redoes the last epoch from the state before it
    assert same_weights(run / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, EPOCHS + 1))


def test_extending_a_finished_run_equals_a_longer_run(synth_root, tmp_path):
    const = {"schedule.kind": "constant"}
    long = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 4, **const}))
    train(long, out=tmp_path / "four", quiet=True)
    short = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2, **const}))
    train(short, out=tmp_path / "two", quiet=True)
    more = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 4, **const}))
    with pytest.raises(TransferKitError, match=r"the config differs from the run's \(schedule.epochs: 2 -> 4\)"):
        train(more, resume=tmp_path / "two", quiet=True)
    with open(tmp_path / "two" / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"epoch": 3, "train_lo')  # a row cut short by a kill: left out, then written over
    train(more, resume=tmp_path / "two", quiet=True, allow_config_change=["schedule.epochs"])
    assert same_weights(tmp_path / "two/checkpoints/last.safetensors", tmp_path / "four/checkpoints/last.safetensors")
    assert strip(read_metrics(tmp_path / "two")) == strip(read_metrics(tmp_path / "four"))


def test_extending_a_cosine_run_recomputes_the_schedule(synth_root, tmp_path):
    """The documented rule: the step count goes on, and the learning rate is the new, longer cosine's
    value at that step (it rises again: the run is now earlier in its schedule)."""
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2}))
    train(cfg, out=tmp_path / "run", quiet=True)
    assert read_metrics(tmp_path / "run")[-1]["lr"] == pytest.approx(0.0)
    proc = cli("train", "--resume", tmp_path / "run", "--epochs", 4)
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(tmp_path / "run")
    steps = 5  # 72 images / batch 16
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * min(1.0, (e * steps) / (4 * steps)))) for e in (3, 4)]
    assert [r["lr"] for r in rows[2:]] == pytest.approx(expected)


def test_changed_config_is_refused_with_a_diff(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1}))
    train(cfg, out=tmp_path / "run", quiet=True)
    changed = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1, "optim.lr": 0.5}))
    with pytest.raises(TransferKitError, match=r"optim.lr: 0.01 -> 0.5"):
        train(changed, resume=tmp_path / "run", quiet=True)
    with pytest.raises(TransferKitError, match="optim.lr cannot change in a resumed run"):
        train(changed, resume=tmp_path / "run", quiet=True, allow_config_change=["optim.lr"])


def test_a_nonfinite_loss_stops_the_run_at_its_step(synth_root, tmp_path):
    """No step is skipped any more: the first NaN/inf loss stops the run (optim.max_nonfinite_steps,
    still read from old configs, no longer changes that)."""
    cfg = load_config(None, tiny_overrides(synth_root, **{"optim.name": "sgd", "optim.max_nonfinite_steps": 3}))
    # A config refuses lr 1e30 (docs/RELIABILITY.md); the loop's stop is for losses that go bad anyway.
    cfg.optim = cfg.optim.model_copy(update={"lr": 1e30})
    with pytest.raises(TransferKitError) as err:
        train(cfg, out=tmp_path / "run", quiet=True)
    assert str(err.value).startswith(f"{tmp_path / 'run'}: stopped at epoch 1, step 2 (batch 2 of 5): the loss is ")
    assert str(err.value).endswith("; no state was saved yet")
    assert os.path.isdir(tmp_path / "run")


def test_new_run_from_a_finished_run_restores_everything(synth_root, tmp_path):
    from transferkit.run import evaluate

    first = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2}))
    train(first, out=tmp_path / "first", quiet=True)
    final = read_metrics(tmp_path / "first")[-1]
    more = load_config(None, tiny_overrides(synth_root, **{"pretrained.source": str(tmp_path / "first"),
                                                           "pretrained.scope": "full"}))
    metrics, report = evaluate(more)
    assert report.fraction_restored() == 1.0
    assert metrics["val_acc"] == final["val_acc"]
    assert metrics["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)


def rewrite_state(state_dir: Path, state: dict) -> None:
    """`state` as the state's state.pt, its checksum in the COMPLETE marker to match."""
    from transferkit.weights.sources import sha256_of

    torch.save(state, state_dir / "state.pt")
    marker = json.loads((state_dir / "COMPLETE").read_text())
    marker["files"]["state.pt"] = sha256_of(state_dir / "state.pt")
    (state_dir / "COMPLETE").write_text(json.dumps(marker))


def as_saved_before_ranks(state_dir: Path) -> None:
    """The state as one saved before it said how many processes wrote it and kept each rank's part:
    the random state and the epoch's loss so far at its top level."""
    state = load_state(state_dir)
    ranks = state.pop("ranks")
    del state["processes"]
    assert len(ranks) == 1
    rewrite_state(state_dir, {**state, **ranks[0]})


@pytest.mark.parametrize(("where", "ema", "older"), [((0, 3), False, False), ((1, 4), False, False),
                                                     ((1, 4), True, False), ((1, 4), False, True)],
                         ids=["inside-epoch-1", "inside-epoch-2", "inside-epoch-2-with-EMA",
                              "inside-epoch-2-saved-before-ranks"])
def test_resume_from_a_mid_epoch_state_is_exact(synth_root, request, tmp_path, where, ema, older):
    """In this process (where a mutation run sees what the resume reaches; the SIGKILL test above
    runs the CLI). A state saved before the number of processes and each rank's part were kept
    resumes in one process as exactly."""
    reference = request.getfixturevalue("reference_ema" if ema else "reference")
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": EPOCHS, "checkpoint.every_steps": 3,
                                                          "checkpoint.keep_last": 100, **(EMA if ema else {})}))
    train(cfg, out=run, quiet=True)
    states = sorted((run / "checkpoints" / "states").glob("step-*"))
    markers = {p: json.loads((p / "COMPLETE").read_text()) for p in states}
    # 5 steps an epoch, a state every 3: step 3 is batch 3 of epoch 1, step 9 batch 4 of epoch 2.
    mid = next(p for p, m in markers.items() if (m["epoch"], m["batches_done"]) == where)
    for later in states[states.index(mid) + 1:]:
        shutil.rmtree(later)
    if older:
        as_saved_before_ranks(mid)
    train(cfg, resume=run, quiet=True)
    assert same_weights(run / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")
    if ema:  # the EMA came back with the state, not rebuilt from the weights
        assert same_weights(run / "checkpoints/ema.safetensors", reference / "checkpoints/ema.safetensors")
    assert strip(read_metrics(run)) == strip(read_metrics(reference))


def test_states_are_saved_every_k_steps_and_every_m_minutes_besides_each_epoch_end(synth_root, tmp_path,
                                                                                  monkeypatch):
    """5 optimiser steps an epoch, 3 epochs. Every 3 steps: steps 3, 6, 9, 12 and 15 (15 ends epoch
    3, saved once). Every minute, on a clock that moves 20 s a step: 60 s after the last save, which
    an epoch's end resets too: steps 3, 8 and 13."""
    from types import SimpleNamespace

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from transferkit.training import loop

    def states(run):
        return [int(p.name.split("-")[1]) for p in sorted((run / "checkpoints" / "states").glob("step-*"))]

    saved = []  # each state written once: a state due at an epoch's last step is the epoch end's

    def save_state(run_dir, model, optimizer, scheduler, counters, keep_last):
        saved.append(counters["global_step"])
        real_save_state(run_dir, model, optimizer, scheduler, counters, keep_last)

    real_save_state = loop.save_state
    monkeypatch.setattr(loop, "save_state", save_state)
    every = {"schedule.epochs": 3, "checkpoint.keep_last": 100}
    train(load_config(None, tiny_overrides(synth_root, **every, **{"checkpoint.every_steps": 3})),
          out=tmp_path / "steps", quiet=True)
    assert states(tmp_path / "steps") == saved == [3, 5, 6, 9, 10, 12, 15]

    clock = [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=loop.time.perf_counter))
    hook = register_optimizer_step_post_hook(lambda *args: clock.__setitem__(0, clock[0] + 20.0))
    try:
        train(load_config(None, tiny_overrides(synth_root, **every, **{"checkpoint.every_minutes": 1})),
              out=tmp_path / "minutes", quiet=True)
    finally:
        hook.remove()
    assert states(tmp_path / "minutes") == [3, 5, 8, 10, 13, 15]


def test_resume_with_loader_workers_is_exact(synth_root, tmp_path):
    """With data.num_workers 2 the augmentations run in the workers, on their own random state: a
    run resumed from inside epoch 2 ends as one that was never stopped (each epoch's workers are
    seeded from the loader's generator, which the state restores)."""
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 4, "checkpoint.every_steps": 3,
                                                          "checkpoint.keep_last": 100, "data.num_workers": 2}))
    train(cfg, out=tmp_path / "whole", quiet=True)
    run = tmp_path / "run"
    train(cfg, out=run, quiet=True)
    states = sorted((run / "checkpoints" / "states").glob("step-*"))
    mid = next(p for p in states if json.loads((p / "COMPLETE").read_text())["batches_done"] == 4)  # epoch 2
    for later in states[states.index(mid) + 1:]:
        shutil.rmtree(later)
    train(cfg, resume=run, quiet=True)
    assert same_weights(run / "checkpoints/last.safetensors", tmp_path / "whole/checkpoints/last.safetensors")
    assert strip(read_metrics(run)) == strip(read_metrics(tmp_path / "whole"))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(synth_root, tmp_path, monkeypatch):
    from transferkit.training import resume

    calls = {"n": 0}
    real = resume.save_weights

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(resume, "save_weights", failing)
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 3}))
    with pytest.raises(TransferKitError) as err:
        train(cfg, out=run, quiet=True)
    assert str(err.value) == (
        f"could not save a checkpoint in {run / 'checkpoints' / 'states'}: No space left on device; "
        f"the previous checkpoint step-00000005 is intact; free space and resume with: "
        f"transferkit train --resume {run}")
    assert find_state(run) == run / "checkpoints" / "states" / "step-00000005"
    assert not list((run / "checkpoints" / "states").glob(".*tmp"))
    monkeypatch.setattr(resume, "save_weights", real)
    train(cfg, resume=run, quiet=True)
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


def test_new_run_can_carry_the_optimiser_state(synth_root, tmp_path):
    first = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1}))
    train(first, out=tmp_path / "first", quiet=True)
    # This run's own learning rate (0.003, the first run's was 0.01) with the first run's moments.
    new = {"schedule.epochs": 1, "pretrained.source": str(tmp_path / "first"), "pretrained.scope": "full",
           "optim.lr": 0.003, "schedule.kind": "constant"}
    carried = load_config(None, tiny_overrides(synth_root, **new, **{"pretrained.with_optimizer": "true"}))
    plain = load_config(None, tiny_overrides(synth_root, **new))
    a = train(carried, out=tmp_path / "carried", quiet=True)
    b = train(plain, out=tmp_path / "plain", quiet=True)
    assert a.metrics[0]["train_loss"] != b.metrics[0]["train_loss"]  # Adam moments made a difference
    # Adam's step count goes on from the first run's 5 steps (72 images, batch 16) only when carried.
    states = [load_state(find_state(tmp_path / r, print))["optimizer"] for r in ("carried", "plain")]
    assert [s["state"][0]["step"].item() for s in states] == [10, 5]
    assert {(g["lr"], g["initial_lr"]) for s in states for g in s["param_groups"]} == {(0.003, 0.003)}
    # From the very first step: at a learning rate of 1e-9 the weights stay the first run's (one step
    # at the carried 0.01 would move them by about 0.01).
    still = load_config(None, tiny_overrides(synth_root, **{**new, "optim.lr": 1e-9},
                                             **{"pretrained.with_optimizer": "true"}))
    train(still, out=tmp_path / "still", quiet=True)
    before, after = (load_file(tmp_path / r / "checkpoints" / "last.safetensors") for r in ("first", "still"))
    weights = [k for k in before if "running" not in k and "num_batches" not in k]
    assert max(float((before[k] - after[k]).abs().max()) for k in weights) < 1e-6
    # A state of other parameter groups (biases and norms without decay here) does not fit: one line, naming it.
    other = load_config(None, tiny_overrides(synth_root, **new, **{"pretrained.with_optimizer": "true",
                                                                   "optim.no_decay_norm_bias": "true"}))
    with pytest.raises(TransferKitError, match=r"the optimiser state of .*first.* does not fit this run \(.*\); "
                       r"keep the same optim settings, or set pretrained.with_optimizer=false"):
        train(other, out=tmp_path / "other", quiet=True)
    bad = load_config(None, tiny_overrides(synth_root, **{"pretrained.with_optimizer": "true"}))
    with pytest.raises(TransferKitError) as err:
        train(bad, out=tmp_path / "bad", quiet=True)
    assert str(err.value) == ("pretrained.with_optimizer needs pretrained.source to be a run directory (the --out of "
                              "a train run); none is not one")


def test_a_carried_optimiser_state_keeps_each_groups_rate_and_schedule_base(synth_root, tmp_path):
    """...from the newest intact state, saying which damaged one it passed over."""
    train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1, "checkpoint.every_steps": 3})),
          out=tmp_path / "first", quiet=True)
    states = tmp_path / "first" / "checkpoints" / "states"
    (states / "step-00000005" / "state.pt").write_bytes(b"damaged")
    cfg = load_config(None, tiny_overrides(synth_root, **{"optim.lr": 0.003, "optim.head_lr_mult": 10,
                                                          "schedule.warmup_epochs": 1}))
    said = []

    def carried(with_schedule: bool) -> list[float]:
        model, family = create_classifier("test_efficientnet", 3)
        optimizer = build_optimizer(model, family.head_patterns, cfg.optim)
        if with_schedule:  # a warm-up of 5 steps: the first step's rate is a fifth of each group's base
            build_scheduler(optimizer, cfg.schedule, steps_per_epoch=5)
        carry_optimizer_state(tmp_path / "first", optimizer, lambda *a, **k: said.append(a[0]))
        return [rate for g in optimizer.param_groups for rate in (g["lr"], g["initial_lr"])]

    # Before a schedule exists (no base rate yet) the base is the group's rate.
    assert carried(False) == pytest.approx([0.003, 0.003, 0.03, 0.03])  # (rate, base) of each group
    assert carried(True) == pytest.approx([0.0006, 0.003, 0.006, 0.03])
    assert said == [f"checkpoint {states / 'step-00000005'} is damaged (state.pt does not match its checksum); "
                    "falling back to the previous one",
                    f"optimiser state carried from {states / 'step-00000003'}"] * 2


def test_an_optimiser_state_is_carried_only_from_a_run_directory_named_as_the_source(synth_root, tmp_path,
                                                                                      monkeypatch):
    """No source is not the current folder, even when that folder is a run; a run's checkpoint file
    or states folder is not the run."""
    train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1})), out=tmp_path / "first",
          quiet=True)
    model, family = create_classifier("test_efficientnet", 3)
    optimizer = build_optimizer(model, family.head_patterns, load_config(None, ["data.root=x"]).optim)
    before = optimizer.state_dict()
    monkeypatch.chdir(tmp_path / "first")
    for source, named in ((None, "none"), ("", "none"), (tmp_path / "first" / "checkpoints", None),
                          (tmp_path / "first" / "checkpoints" / "last.safetensors", None)):
        with pytest.raises(TransferKitError) as err:
            carry_optimizer_state(source, optimizer, lambda *a, **k: None)
        assert str(err.value) == ("pretrained.with_optimizer needs pretrained.source to be a run directory (the "
                                  f"--out of a train run); {named or source} is not one")
    assert optimizer.state_dict() == before


def test_config_changes_name_added_and_removed_keys_and_compare_require_whole():
    from transferkit.training.resume import config_changes

    saved = {"optim": {"lr": 0.1, "old": 1}, "pretrained": {"require": {"backbone.*": 1.0}}}
    new = {"optim": {"lr": 0.1, "new": {"deep": 2}}, "pretrained": {"require": {"backbone.*": 0.9}}}
    assert config_changes(saved, new) == {
        "optim.new.deep": (None, 2), "optim.old": (1, None),
        # require's keys are patterns with dots in them: the mapping is one value
        "pretrained.require": ({"backbone.*": 1.0}, {"backbone.*": 0.9})}
    assert config_changes(saved, saved) == {}


@pytest.mark.parametrize("strategy", ["linear_probe", "lp_ft"])
def test_a_probe_run_is_not_resumed(synth_root, tmp_path, strategy):
    from transferkit.training.rundir import prepare_resume

    cfg = load_config(None, tiny_overrides(synth_root, strategy=strategy))
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(TransferKitError) as err:
        prepare_resume(tmp_path, cfg, [], print)
    assert str(err.value) == f"resuming strategy {strategy} is not supported; start the run again"
    (tmp_path / "config.yaml").unlink()  # a run that stopped before it wrote its config
    with pytest.raises(TransferKitError) as err:
        prepare_resume(tmp_path, cfg, [], print)
    assert str(err.value) == f"{tmp_path} is not a run directory (no config.yaml); give the --out of a train run"


def test_the_resume_refusal_names_every_changed_key_an_edit_and_what_may_change(synth_root, tmp_path):
    from transferkit.training.resume import KEPT_CONFIG
    from transferkit.training.resumecheck import check_resume_config

    trained = load_config(None, tiny_overrides(synth_root, **{"optim.lr": 0.25, "seed": 3}))
    run, state = tmp_path / "run", tmp_path / "run" / "checkpoints" / "states" / "step-00000004"
    state.mkdir(parents=True)
    (run / "config.yaml").write_text(trained.to_yaml())
    (state / KEPT_CONFIG).write_text(trained.to_yaml())
    moved = load_config(None, tiny_overrides(synth_root, **{"optim.lr": 0.25, "seed": 3, "out": str(tmp_path / "x")}))
    check_resume_config(run, state, moved, [])  # where the run is may differ: it is the run given
    changed = load_config(None, tiny_overrides(synth_root, **{"optim.lr": 0.5, "seed": 7}))
    may_change = ("schedule.epochs, out, device, data.num_workers, checkpoint.keep_last, checkpoint.every_steps, "
                  "checkpoint.every_minutes")
    with pytest.raises(TransferKitError) as err:
        check_resume_config(run, state, changed, [])
    assert str(err.value) == ("the config differs from the run's (optim.lr: 0.25 -> 0.5; seed: 3 -> 7); resume with "
                              "the config the run was trained with, or allow keys with --allow-config-change "
                              f"(only {may_change})")
    with (run / "config.yaml").open("a") as fh:
        fh.write("# edited\n")
    with pytest.raises(TransferKitError) as err:
        check_resume_config(run, state, changed, ["seed"])
    assert str(err.value) == (f"the config differs from the run's (optim.lr: 0.25 -> 0.5); {run / 'config.yaml'} was "
                              "edited after step-00000004 was saved; resume with the config the run was trained "
                              f"with, or allow keys with --allow-config-change (only {may_change})")
    with pytest.raises(TransferKitError) as err:
        check_resume_config(run, state, changed, ["seed", "optim.lr"])
    assert str(err.value) == "--allow-config-change: optim.lr, seed cannot change in a resumed run"


@pytest.mark.parametrize("marker, problem", [
    (None, "no COMPLETE marker (the write did not finish)"),
    (b"{not json", "unreadable COMPLETE marker"),
    (b"\xff\xfe", "unreadable COMPLETE marker"),
    (b"[]", "unreadable COMPLETE marker"),
    (b'{"files": ["state.pt"]}', "unreadable COMPLETE marker"),
    (b'{"files": {"../state.pt": "0"}}', "unreadable COMPLETE marker"),
    (b'{"files": {"..": "0"}}', "unreadable COMPLETE marker"),
    (b'{"files": {".": "0"}}', "unreadable COMPLETE marker"),
    (b'{"files": {"": "0"}}', "unreadable COMPLETE marker"),
    (b'{"files": {"state.pt": 5}}', "unreadable COMPLETE marker"),
    (b'{"files": {"gone.pt": "0"}}', "gone.pt is missing"),
    (b'{"files": {"state.pt": "0"}}', "state.pt does not match its checksum"),
], ids=["none", "not-json", "not-utf8", "a-list", "files-a-list", "outside", "parent", "self", "no-name",
        "digest-a-number", "missing", "changed"])
def test_a_damaged_state_is_named_by_what_is_wrong(tmp_path, marker, problem):
    from transferkit.training.resume import check_state

    (tmp_path / "state.pt").write_bytes(b"state")
    if marker is not None:
        (tmp_path / "COMPLETE").write_bytes(marker)
    assert check_state(tmp_path) == problem


def test_a_state_file_is_read_without_running_its_code(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default back to unpickling anything
    ran = tmp_path / "ran"
    torch.save({"global_step": 1, "payload": RunsCode(ran)}, tmp_path / "state.pt")
    with pytest.raises(TransferKitError) as err:
        load_state(tmp_path)
    assert str(err.value) == (f"cannot read {tmp_path / 'state.pt'}: refused, unpickling it would run code (needs "
                              f"{os.system.__module__}.system); the state is damaged or not a transferkit state")
    assert not ran.exists()
    (tmp_path / "state.pt").write_bytes(b"")  # emptied by a disk that filled up, its checksum not consulted
    with pytest.raises(TransferKitError) as err:
        load_state(tmp_path)
    assert str(err.value) == f"cannot read {tmp_path / 'state.pt'}: EOFError"


def test_a_save_cut_short_earlier_is_cleared_and_the_newest_states_are_kept(tmp_path):
    from transferkit.training.resume import check_state, save_state

    (tmp_path / "config.yaml").write_text("seed: 0\n")
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    states = tmp_path / "checkpoints" / "states"
    leftover = states / ".step-00000005.tmp"  # a save killed part way, with what it had written
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("x")
    for step in (3, 5, 7):
        save_state(tmp_path, model, optimizer, scheduler, {"epoch": 1, "batches_done": step, "global_step": step},
                   keep_last=2)
    assert sorted(p.name for p in states.iterdir()) == ["step-00000005", "step-00000007"]
    assert sorted(p.name for p in (states / "step-00000005").iterdir()) == [
        "COMPLETE", "config.yaml", "model.safetensors", "state.pt"]
    assert check_state(states / "step-00000005") is None
    state = load_state(states / "step-00000007")
    assert sorted(state) == ["batches_done", "epoch", "global_step", "optimizer", "scheduler"]
    marker = json.loads((states / "step-00000007" / "COMPLETE").read_text())  # for people who look
    assert {k: v for k, v in marker.items() if k != "files"} == {
        "epoch": 1, "batches_done": 7, "global_step": 7,
        "config_sha256": hashlib.sha256(b"seed: 0\n").hexdigest()}
    assert sorted(marker["files"]) == ["config.yaml", "model.safetensors", "state.pt"]
    blocked = tmp_path / "blocked"
    (blocked / "checkpoints").mkdir(parents=True)
    (blocked / "checkpoints" / "states").write_text("a file where the states go")
    (blocked / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(TransferKitError) as err:
        save_state(blocked, model, optimizer, scheduler, {"epoch": 1, "batches_done": 0, "global_step": 9},
                   keep_last=2)
    assert str(err.value) == (f"could not save a checkpoint in {blocked / 'checkpoints' / 'states'}: Not a directory; "
                              f"no earlier checkpoint exists; free space and resume with: transferkit train --resume "
                              f"{blocked}")


def test_a_state_written_by_another_number_of_processes_is_refused_untouched(synth_root, tmp_path):
    """The state says how many processes wrote it and the loop compares that with its own (each rank's
    share of the data order depends on it): here in one process; tests/test_distributed.py does it
    under torchrun."""
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 1}))
    train(cfg, out=run, quiet=True)
    state_dir = find_state(run)
    state = load_state(state_dir)
    assert state["processes"] == 1
    state["processes"] = 2  # as torchrun's two ranks would have written it
    state["ranks"] = state["ranks"] * 2
    rewrite_state(state_dir, state)
    more = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2}))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(TransferKitError) as err:
        train(more, resume=run, quiet=True, allow_config_change=["schedule.epochs"])
    assert str(err.value) == (f"{state_dir} was saved by a run of 2 process(es), this one has 1; resume it with "
                              "2 processes in all (torchrun)")
    assert (run / "metrics.jsonl").read_text() == before
