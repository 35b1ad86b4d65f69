"""Several processes through torchrun, on CPU with gloo: the same run as one process, rank 0 alone
writing, a stop signal reaching every rank."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from transferkit.config import load_config
from transferkit.data.detection import GroupedBatchSampler
from transferkit.errors import TransferKitError
from transferkit.run import train
from transferkit.training.distributed import Processes
from transferkit.training.runlog import read_metrics

# BatchNorm frozen, no dropout and no random augmentation: what a batch's split over the processes
# could change (batch statistics, random draws in another order) is left out.
# SGD: Adam's normalised steps would magnify the last-bit differences of a sum taken in another order.
SAME = {"optim.freeze_bn": "true", "model.drop_rate": 0.0, "data.crop_scale": "[1.0,1.0]", "data.hflip": 0.0,
        "schedule.epochs": 2, "optim.name": "sgd", "optim.lr": 0.1}


def torchrun(nproc, root, run, wait=True, **extra):
    opts = [a for o in tiny_overrides(root, **{**SAME, **extra}) for a in ("-o", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "transferkit", "train", *opts, "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_two_processes_give_the_metrics_of_one(synth_root, tmp_path):
    two = torchrun(2, synth_root, tmp_path / "two", **{"data.batch_size": 8})
    assert two.returncode == 0, two.stderr[-3000:]
    one = torchrun(1, synth_root, tmp_path / "one", **{"data.batch_size": 16})
    assert one.returncode == 0, one.stderr[-3000:]
    rows2, rows1 = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["epoch"] for r in rows2] == [1, 2]  # each epoch once: rank 1 recorded nothing
    for a, b in zip(rows2, rows1, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    out = two.stdout + two.stderr
    assert out.count("epoch 1 (finetune)") == 1 and out.count("parameter groups") == 1  # rank 0 alone speaks
    assert "effective batch: 2 processes x data.batch_size 8 = 16 images a step" in out
    a, b = (load_file(str(tmp_path / name / "checkpoints/last.safetensors")) for name in ("two", "one"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    states = sorted(p.name for p in (tmp_path / "two/checkpoints/states").iterdir())
    assert states == ["step-00000005", "step-00000010"]  # 72 images / 16 a step: 5 steps an epoch


def test_rank_shares_of_detection_batches():
    groups = [0, 1, 0, 1, 0, 0, 1]
    whole = GroupedBatchSampler(groups, 2, True, torch.Generator().manual_seed(3))
    ranks = [GroupedBatchSampler(groups, 2, True, torch.Generator().manual_seed(3), (r, 2)) for r in range(2)]
    batches = list(whole)  # 4 batches: 2 a rank, none repeated
    assert [list(r) for r in ranks] == [batches[0::2], batches[1::2]]
    odd = [GroupedBatchSampler(groups, 2, False, torch.Generator(), (r, 3)) for r in range(3)]
    assert [len(s) for s in odd] == [2, 2, 2]  # 4 batches over 3 ranks: the first two again
    assert [list(s) for s in odd] == [[[0, 2], [6]], [[4, 5], [0, 2]], [[1, 3], [4, 5]]]


def test_effective_batch_line():
    assert Processes().describe_batch(32, 1) == "effective batch: data.batch_size 32 = 32 images a step"
    line = Processes(rank=0, world=4, active=True).describe_batch(16, 2)
    assert line.startswith("effective batch: 4 processes x data.batch_size 16 x optim.accumulate 2 = 128 images")
    assert line.endswith("(not scaled with the processes)")


def test_probe_strategies_are_refused_under_torchrun(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, tiny_overrides(synth_root, strategy="lp_ft"))
    with pytest.raises(TransferKitError, match="strategy lp_ft runs in one process; under torchrun use strategy"):
        train(cfg, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_the_run_resumes(synth_root, tmp_path):
    """torchrun passes SIGTERM to every rank; they stop after the same step, rank 0 saves the state
    once, and `--resume` with the same number of processes ends where an unstopped run ends."""
    long = {"data.batch_size": 8, "schedule.epochs": 6}
    whole = torchrun(2, synth_root, tmp_path / "whole", **long)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "run"
    proc = torchrun(2, synth_root, run, wait=False, **long)
    deadline = time.time() + 200
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "the run ended before its first epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=200)
    if "the state is saved" not in err:
        pytest.skip("the run finished before the signal landed")
    assert err.count("SIGTERM: stopped at epoch") == 1  # rank 0 speaks for both
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              "2", "-m", "transferkit", "train", "--resume", str(run)],
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, 7))
    a, b = (load_file(str(r / "checkpoints/last.safetensors")) for r in (run, tmp_path / "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_sampler_is_told_each_epoch(synth_root, tmp_path, monkeypatch):
    """A world of one process in this one (torchrun's environment by hand): the DistributedSampler
    hears every epoch, so that each draws its own order from the seed."""
    from torch.utils.data import DistributedSampler

    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(key, value)
    heard = []
    real = DistributedSampler.set_epoch
    monkeypatch.setattr(DistributedSampler, "set_epoch", lambda self, epoch: heard.append(epoch) or real(self, epoch))
    train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 3})), out=tmp_path / "run", quiet=True)
    assert heard == [1, 2, 3]
    assert not torch.distributed.is_initialized()  # the process group is closed at the end


def test_a_state_is_resumed_by_as_many_processes_as_saved_it(tmp_path):
    Processes(rank=0, world=2, active=True).check_resume(2, tmp_path)
    Processes().check_resume(1, tmp_path)
    with pytest.raises(TransferKitError, match=r"saved by a run of 2 process\(es\), this one has 1; resume it with "
                                               r"2 processes in all \(torchrun\)"):
        Processes().check_resume(2, tmp_path)
    with pytest.raises(TransferKitError, match="resume it with one process, without torchrun"):
        Processes(rank=0, world=4, active=True).check_resume(1, tmp_path)
