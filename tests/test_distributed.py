"""Several processes through torchrun, on CPU with gloo: the same run as one process, rank 0 alone
writing, a stop signal reaching every rank, a killed run resumed exactly, detection close to one
process, gradients summed once an accumulation window, SyncBatchNorm, the learning rate scaled with
the effective batch."""

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from functools import partial

import pytest
import torch
from conftest import REPO, det_overrides, tiny_overrides
from safetensors.torch import load_file

from transferkit.config import load_config
from transferkit.data.detection import GroupedBatchSampler
from transferkit.data.synthetic import make_synthetic_detection
from transferkit.errors import TransferKitError
from transferkit.run import train
from transferkit.training.distributed import Processes, from_environment
from transferkit.training.runlog import read_metrics

# BatchNorm frozen, no dropout and no random augmentation: what a batch's split over the processes
# could change (batch statistics, random draws in another order) is left out.
# SGD: Adam's normalised steps would magnify the last-bit differences of a sum taken in another order.
SAME = {"optim.freeze_bn": "true", "model.drop_rate": 0.0, "data.crop_scale": "[1.0,1.0]", "data.hflip": 0.0,
        "schedule.epochs": 2, "optim.name": "sgd", "optim.lr": 0.1}
STOP_AT_STEP = REPO / "tests" / "helpers" / "stop_at_step.py"
CLOCK_JUMP_AT_STEP = REPO / "tests" / "helpers" / "clock_jump_at_step.py"
RANK_EXCHANGE = REPO / "tests" / "helpers" / "rank_exchange.py"
RANK_CLOCK_AHEAD = REPO / "tests" / "helpers" / "rank_clock_ahead.py"
# The learning rate scaled with the effective batch: 0.1 x 16 / 8 in both the 2 x 8 and the 1 x 16 run.
SCALED = {"optim.lr_scaling": "linear", "optim.lr_reference_batch": 8}


def torchrun(nproc, root, run, stop=None, **extra):
    """`transferkit train` under torchrun; with `stop` (signal, step), through tests/helpers/stop_at_step.py,
    which stops the run right after that optimiser step."""
    opts = [a for o in tiny_overrides(root, **{**SAME, **extra}) for a in ("-o", o)]
    return launch(nproc, ["train", *opts, "--out", str(run)], stop)


def launch(nproc, args, stop=None):
    program = [str(STOP_AT_STEP), str(int(stop[0])), str(stop[1]), "--"] if stop else ["-m", "transferkit"]
    return run_ranks(nproc, [*program, *args])


def run_ranks(nproc, program, timeout=300):
    """`program` (a script or -m module, and its arguments) in `nproc` processes under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *program]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def states_of(run):
    return sorted(p.name for p in (run / "checkpoints/states").iterdir())


@pytest.fixture(scope="module")
def two_processes(synth_root, tmp_path_factory):
    """A 2-process run of 8 images each, 2 epochs, never stopped; with its output."""
    run = tmp_path_factory.mktemp("two") / "run"
    proc = torchrun(2, synth_root, run, **{"data.batch_size": 8, **SCALED})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc.stdout + proc.stderr


def test_two_processes_give_the_metrics_of_one(synth_root, two_processes, tmp_path):
    one = torchrun(1, synth_root, tmp_path / "one", **{"data.batch_size": 16, **SCALED})
    assert one.returncode == 0, one.stderr[-3000:]
    two, out = two_processes
    rows2, rows1 = read_metrics(two), read_metrics(tmp_path / "one")
    assert [r["epoch"] for r in rows2] == [1, 2]  # each epoch once: rank 1 recorded nothing
    for a, b in zip(rows2, rows1, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert out.count("epoch 1 (finetune)") == 1 and out.count("parameter groups") == 1  # rank 0 alone speaks
    assert ("effective batch: 2 processes x data.batch_size 8 = 16 images a step; learning rate: optim.lr 0.1 x "
            "16 / 8 = 0.2 (optim.lr_scaling linear, reference batch 8)") in out
    a, b = (load_file(str(run / "checkpoints/last.safetensors")) for run in (two, tmp_path / "one"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert states_of(two) == ["step-00000005", "step-00000010"]  # 72 images / 16 a step: 5 steps an epoch


def test_sigkill_then_resume_ends_as_the_run_never_stopped(synth_root, two_processes, tmp_path):
    """Rank 0 is killed (SIGKILL on its process group) right after optimiser step 9, the step after the
    state of step 8 was written; torchrun ends rank 1. `--resume` with 2 processes redoes step 9 and
    ends with the weights and metrics of the unstopped run, bit for bit (the epoch's training loss
    too: each rank's share of it is in the state)."""
    run = tmp_path / "run"
    killed = torchrun(2, synth_root, run, stop=(signal.SIGKILL, 9),
                      **{"data.batch_size": 8, "checkpoint.every_steps": 4, **SCALED})
    assert killed.returncode != 0 and "Signal 9 (SIGKILL) received by PID" in killed.stderr, killed.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    assert states_of(run) == ["step-00000005", "step-00000008"]  # every 4 steps, and each epoch's end
    resumed = launch(2, ["train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} from step-00000008: epoch 2, batch 4" in resumed.stderr
    reference, _ = two_processes
    assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(reference))
    assert same_weights(run / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")


def test_rank_shares_of_detection_batches():
    """Each rank takes its share of the batch one process of world x batch_size would draw: a step
    sees the same images in 2 processes of 2 as in one of 4."""
    groups = [0, 1, 0, 1, 0, 0, 1]
    whole = list(GroupedBatchSampler(groups, 4, True, torch.Generator().manual_seed(3)))
    ranks = [list(GroupedBatchSampler(groups, 2, True, torch.Generator().manual_seed(3), (r, 2))) for r in range(2)]
    assert [len(r) for r in ranks] == [len(whole), len(whole)] == [2, 2]  # group 0: 4 images, group 1: 3
    for step, batch in enumerate(whole):
        shares = [r[step] for r in ranks]
        # 4 images: 2 each; 3 images: 2 and 1, the first taken again so that both ranks have 2
        assert shares[0] + shares[1] == (batch if len(batch) == 4 else batch + batch[:1])
    odd = [list(GroupedBatchSampler(groups, 2, False, torch.Generator(), (r, 3))) for r in range(3)]
    # unshuffled, batches of 6 over the ranks: group 0 [0, 2, 4, 5] and group 1 [1, 3, 6]
    assert odd == [[[0, 2], [1]], [[4, 5], [3]], [[0, 2], [6]]]


def test_effective_batch_line():
    assert Processes().describe_batch(32, 1) == "effective batch: data.batch_size 32 = 32 images a step"
    line = Processes(rank=0, world=4, active=True).describe_batch(16, 2, "learning rate: ...")
    assert line == ("effective batch: 4 processes x data.batch_size 16 x optim.accumulate 2 = 128 images a step; "
                    "learning rate: ...")
    assert Processes(rank=0, world=1, active=True).describe_batch(8, 1) == \
        "effective batch: 1 process x data.batch_size 8 = 8 images a step"  # torchrun with one process
    assert Processes(rank=1, world=2, active=True).describe_batch(8, 1) == \
        "effective batch: 2 processes x data.batch_size 8 = 16 images a step"


def test_probe_strategies_are_refused_under_torchrun(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, tiny_overrides(synth_root, strategy="lp_ft"))
    with pytest.raises(TransferKitError) as refused:
        train(cfg, out=tmp_path / "run", quiet=True)
    assert str(refused.value) == ("strategy lp_ft runs in one process; under torchrun use strategy: finetune, or "
                                  "start the run without torchrun")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_the_run_resumes(synth_root, tmp_path):
    """SIGTERM reaches torchrun right after optimiser step 7 (tests/helpers/stop_at_step.py) and torchrun
    passes it to every rank; they stop after the same step, rank 0 saves the state once, and `--resume`
    with the same number of processes ends where an unstopped run ends, with random crops and flips:
    each rank's random state is in the training state."""
    augmented = {"data.batch_size": 8, "schedule.epochs": 3, "data.crop_scale": "[0.08,1.0]", "data.hflip": 0.5}
    whole = torchrun(2, synth_root, tmp_path / "whole", **augmented)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "run"
    stopped = torchrun(2, synth_root, run, stop=(signal.SIGTERM, 7), **augmented)
    assert stopped.stderr.count("SIGTERM: stopped at epoch") == 1, stopped.stderr[-3000:]  # rank 0 speaks for both
    assert (f"SIGTERM: stopped at epoch 2, batch 2; the state is saved. Resume with: transferkit train --resume "
            f"{run}") in stopped.stderr
    assert states_of(run) == ["step-00000005", "step-00000007"]
    resumed = launch(2, ["train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]
    assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(tmp_path / "whole"))
    assert same_weights(run / "checkpoints/last.safetensors", tmp_path / "whole/checkpoints/last.safetensors")


def test_a_state_due_by_one_ranks_clock_is_saved_by_every_rank(synth_root, tmp_path):
    """checkpoint.every_minutes reads each rank's own clock. Rank 1's runs an hour ahead from optimiser step 3
    (tests/helpers/clock_jump_at_step.py), rank 0's does not: the ranks agree, save the state after step 3
    together (saving gathers every rank's position) and train on; a rank saving alone would leave the
    other waiting."""
    opts = [a for o in tiny_overrides(synth_root, **{**SAME, "data.batch_size": 8, "schedule.epochs": 1,
                                                     "checkpoint.every_minutes": 30}) for a in ("-o", o)]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(CLOCK_JUMP_AT_STEP), "1", "3", "--", "train", *opts, "--out", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states_of(run) == ["step-00000003", "step-00000005"]
    assert [r["epoch"] for r in read_metrics(run)] == [1]


def test_a_run_without_out_is_one_folder_named_by_rank_0s_clock_on_every_rank(synth_root, tmp_path):
    """Neither --out nor the config's `out`: the run goes under runs/, named by the clock. Rank 1's clock
    runs an hour ahead (tests/helpers/rank_clock_ahead.py), so a rank naming the folder by its own clock
    would name one that does not exist. The run stops on a loss that is not finite (SGD at 10 x 1000 on
    the head), and every rank's error line names rank 0's folder, the one on disk."""
    diverging = {**SAME, "optim.lr": 10, "optim.head_lr_mult": 1000}
    opts = [a for o in tiny_overrides(synth_root, **diverging) for a in ("-o", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(RANK_CLOCK_AHEAD), "1", "--", "train", *opts]
    # Run in tmp_path, where runs/ goes. Without MUTANT_UNDER_TEST: under a mutation run, mutmut's
    # statistics in the ranks would look for its settings in tmp_path and stop the ranks.
    env = {k: v for k, v in os.environ.items() if k != "MUTANT_UNDER_TEST"}
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    runs = list((tmp_path / "runs").iterdir()) if (tmp_path / "runs").is_dir() else []
    assert len(runs) == 1, (runs, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert all(line.startswith(f"error: runs/{runs[0].name}: stopped at epoch ") for line in errors), errors
    named = datetime.strptime(runs[0].name, "run-%Y%m%d-%H%M%S")
    assert abs(datetime.now() - named) < timedelta(minutes=10)  # rank 0's clock, not rank 1's hour ahead


@pytest.fixture
def one_rank(monkeypatch):
    """A world of one process in this one: torchrun's environment by hand."""
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(key, value)


def test_the_sampler_is_told_each_epoch(synth_root, tmp_path, monkeypatch, one_rank):
    """The DistributedSampler hears every epoch, so that each draws its own order from the seed."""
    from torch.utils.data import DistributedSampler

    heard = []
    real = DistributedSampler.set_epoch
    monkeypatch.setattr(DistributedSampler, "set_epoch", lambda self, epoch: heard.append(epoch) or real(self, epoch))
    train(load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 3})), out=tmp_path / "run", quiet=True)
    assert heard == [1, 2, 3]
    assert not torch.distributed.is_initialized()  # the process group is closed at the end


def test_each_rank_resumes_its_own_part_of_a_state():
    from transferkit.training.resume import rank_state

    ranks = [{"rng": {"torch": torch.tensor([r])}, "loss_sum": 1.5 + r, "seen": 8 + r} for r in range(2)]
    state = {"rng": ranks[0]["rng"], "loss_sum": 1.5, "seen": 8, "ranks": ranks}
    assert [rank_state(state, r)["loss_sum"] for r in (0, 1)] == [1.5, 2.5]
    assert rank_state(state, 1)["rng"]["torch"].item() == 1
    older = {k: v for k, v in state.items() if k != "ranks"}  # saved before each rank's part was kept
    assert rank_state(older, 1) == {"rng": state["rng"], "loss_sum": 1.5, "seen": 8}


def test_what_the_ranks_exchange_in_a_group_of_one_and_of_two(one_rank, tmp_path):
    """What the ranks exchange, through a real (gloo) process group of one in this process (where a
    mutation run sees it, unlike the torchrun tests' ranks): a rank's part of a state comes back whole,
    NumPy's uint32 random state included; a signal or a due state is agreed; a non-finite loss stays
    non-finite; sums come back on the CPU; only the processes that joined the group close it."""
    from transferkit.training.resume import rng_state

    processes = from_environment(torch.device("cpu"))
    try:
        assert processes.active and (processes.rank, processes.world) == (0, 1)
        part = {"rng": rng_state(), "loss_sum": 1.5, "seen": 8}
        [back] = processes.gather(part)
        assert back["rng"]["numpy"][1].dtype == torch.uint32
        assert torch.equal(back["rng"]["numpy"][1], part["rng"]["numpy"][1])
        assert torch.equal(back["rng"]["torch"], part["rng"]["torch"])
        assert back["rng"]["python"] == part["rng"]["python"] and (back["loss_sum"], back["seen"]) == (1.5, 8)
        assert processes.agree_stop(None) == (None, False)
        assert processes.agree_stop(15) == (15, False) and processes.agree_stop(None, due=True) == (None, True)
        assert processes.agree_finite(torch.tensor(2.0)).item() == 2.0
        assert torch.isnan(processes.agree_finite(torch.tensor(float("inf"))))
        summed = processes.sum(torch.tensor([1.0, 2.0], requires_grad=True))
        assert summed.tolist() == [1.0, 2.0] and summed.device.type == "cpu" and not summed.requires_grad
        Processes().close()  # a plain process's close leaves a group it did not make alone
        assert torch.distributed.is_initialized()
    finally:
        processes.close()
    assert not torch.distributed.is_initialized()
    # and between two ranks (processes of their own), where the reductions differ: rank 1 alone stops
    # (then both), finds a state due and has an inf loss
    proc = run_ranks(2, [str(RANK_EXCHANGE), str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert got == [{"rank": r, "signum": 15, "due": True, "both": [15, False], "loss": "nan",
                    "parts": [[0, [8]], [1, [9]]], "sum": [3.0, 20.0]} for r in (0, 1)]


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "one"},
                                 {"WORLD_SIZE": "two", "RANK": "0"},
                                 {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}],
                         ids=["no-rank", "rank-text", "world-text", "local-rank-text"])
def test_a_torchrun_environment_that_is_not_whole_is_one_line(monkeypatch, env):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TransferKitError) as refused:
        from_environment(torch.device("cpu"))
    assert str(refused.value) == ("WORLD_SIZE is set but RANK is missing or not a number; start several processes "
                                  "with torchrun: torchrun --nproc-per-node N -m transferkit train ...")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("local_rank, expected", [(None, 0), ("3", 3)], ids=["from-rank", "its-own"])
def test_the_local_rank_is_torchruns_or_else_the_rank(one_rank, monkeypatch, local_rank, expected):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK")
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    processes = from_environment(torch.device("cpu"))
    try:
        assert (processes.rank, processes.world, processes.local_rank, processes.active) == (0, 1, expected, True)
        assert processes.device(torch.device("cpu")) == torch.device("cpu")  # CPU ranks share the CPU
    finally:
        processes.close()


def test_each_cuda_rank_takes_the_gpu_of_its_local_rank_and_nothing_else_moves():
    """Told from device names alone, so it holds on a machine without a GPU."""
    second = Processes(rank=3, world=4, local_rank=1, active=True)
    assert second.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert second.device(torch.device("cpu")) == torch.device("cpu")
    assert Processes().device(torch.device("cuda", 2)) == torch.device("cuda", 2)  # one plain process: as asked


def test_a_cuda_world_joins_over_nccl_each_rank_on_its_own_gpu_sync_bn_allowed(monkeypatch):
    """Seen by standing in for torch.cuda.set_device and the process group (no GPU needed): CUDA ranks
    pick their local rank's GPU before joining over NCCL, and model.sync_bn is not refused there."""
    calls = []
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("join", backend)))
    processes = from_environment(torch.device("cuda"), "finetune", sync_bn=True)
    assert calls == [("set_device", 1), ("join", "nccl")]
    assert (processes.rank, processes.world, processes.local_rank, processes.active) == (1, 2, 1, True)


def test_a_cuda_ranks_model_is_wrapped_on_its_own_gpu_and_a_cpu_ranks_on_none(monkeypatch):
    """DistributedDataParallel's device_ids, seen by standing in for it (no process group needed)."""
    wrapped = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, device_ids: wrapped.append((model, device_ids)) or "wrapped")
    model, rank = torch.nn.Linear(2, 2), Processes(rank=1, world=2, local_rank=1, active=True)
    assert rank.wrap(model, torch.device("cuda", 1)) == "wrapped"
    assert rank.wrap(model, torch.device("cpu")) == "wrapped"
    assert Processes().wrap(model, torch.device("cuda", 0)) is model  # one plain process: not wrapped
    assert wrapped == [(model, [1]), (model, None)]


def test_a_state_is_resumed_by_as_many_processes_as_saved_it(tmp_path):
    Processes(rank=0, world=2, active=True).check_resume(2, tmp_path)
    Processes().check_resume(1, tmp_path)
    with pytest.raises(TransferKitError, match=r"saved by a run of 2 process\(es\), this one has 1; resume it with "
                                               r"2 processes in all \(torchrun\)"):
        Processes().check_resume(2, tmp_path)
    with pytest.raises(TransferKitError, match="resume it with one process, without torchrun"):
        Processes(rank=0, world=4, active=True).check_resume(1, tmp_path)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_accumulation_sums_gradients_over_the_ranks_once_a_window(synth_root, tmp_path, monkeypatch, one_rank,
                                                                   compiled):
    """With optim.accumulate, the batches that do not end a window run under DistributedDataParallel's
    no_sync: a communication hook hears one all-reduce an optimiser step, not one a batch. With
    model.compile too (torch.compile holds the DistributedDataParallel module as _orig_mod)."""
    if compiled:  # the eager backend: torch.compile's graph capture without generating C++
        monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    heard = []
    real = Processes.wrap

    def wrap_and_listen(self, model, device):
        ddp = real(self, model, device)

        def hook(state, bucket):
            heard.append(bucket.index())
            done = torch.futures.Future()
            done.set_result(bucket.buffer())  # one process: the sum is its own gradient
            return done

        ddp.register_comm_hook(None, hook)
        return ddp

    monkeypatch.setattr(Processes, "wrap", wrap_and_listen)
    cfg = load_config(None, tiny_overrides(synth_root, **{"schedule.epochs": 2, "optim.accumulate": 2,
                                                          "model.compile": str(compiled).lower()}))
    train(cfg, out=tmp_path / "run", quiet=True)
    # 72 images, batch 16: 5 batches an epoch in windows of 2, 2 and 1, so 3 steps an epoch
    assert heard.count(0) == 6  # the first bucket (every gradient of this 100k-parameter network)
    assert len(heard) == 6


def test_the_learning_rate_scales_with_the_effective_batch():
    from transferkit.config import OptimConfig
    from transferkit.training.optim import scale_lr

    none = scale_lr(OptimConfig(lr=0.1), 64, 16)
    assert (none.lr, none.line) == (0.1, "learning rate: optim.lr 0.1 as configured (optim.lr_scaling none)")
    linear = scale_lr(OptimConfig(lr=0.1, lr_scaling="linear"), 64, 16)  # reference: data.batch_size
    assert linear.lr == pytest.approx(0.4)
    assert linear.line == "learning rate: optim.lr 0.1 x 64 / 16 = 0.4 (optim.lr_scaling linear, reference batch 16)"
    assert scale_lr(OptimConfig(lr=0.1, lr_scaling="linear", lr_reference_batch=256), 64, 16).lr == pytest.approx(0.025)
    with pytest.raises(TransferKitError, match=r"optim.lr_scaling linear makes the learning rate 1 x 4096 / 16 = 256, "
                                               r"above 10; lower optim.lr or raise optim.lr_reference_batch"):
        scale_lr(OptimConfig(lr=1.0, lr_scaling="linear"), 4096, 16)
    assert scale_lr(OptimConfig(lr=5.0, lr_scaling="linear"), 32, 16).lr == 10.0  # the bound itself is allowed


def test_scaled_learning_rate_reaches_every_parameter_group(synth_root, tmp_path, capsys):
    """One process with optim.accumulate 2: linear scaling doubles the learning rate, and the head's
    multiplier applies on top; the line with the effective batch says so."""
    from transferkit.cli import main
    from transferkit.training.resume import find_state, load_state

    run = tmp_path / "run"
    opts = tiny_overrides(synth_root, **{"schedule.epochs": 1, "schedule.kind": "constant", "optim.accumulate": 2,
                                         "optim.lr_scaling": "linear", "optim.head_lr_mult": 10})
    assert main(["train", *[a for o in opts for a in ("-o", o)], "--out", str(run)]) == 0
    assert ("effective batch: data.batch_size 16 x optim.accumulate 2 = 32 images a step; learning rate: optim.lr "
            "0.01 x 32 / 16 = 0.02 (optim.lr_scaling linear, reference batch 16)") in capsys.readouterr().err
    groups = load_state(find_state(run))["optimizer"]["param_groups"]
    assert sorted((g["name"], g["lr"]) for g in groups) == [("base", pytest.approx(0.02)),
                                                             ("head", pytest.approx(0.2))]


def test_sync_bn_converts_batchnorm_and_keeps_frozen_layers_frozen():
    import timm

    from transferkit.training.optim import freeze_batchnorm, set_train_mode

    model = timm.create_model("test_efficientnet", num_classes=3)
    names = {k: v.shape for k, v in model.state_dict().items()}
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert Processes().sync_batchnorm(model, True) is model  # one process: nothing to synchronise
    assert Processes(rank=0, world=2, active=True).sync_batchnorm(model, False) is model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    freeze_batchnorm(model)
    synced = Processes(rank=0, world=2, active=True).sync_batchnorm(model, True)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == batchnorms > 0
    assert {k: v.shape for k, v in synced.state_dict().items()} == names  # checkpoints keep their names
    assert not any(p.requires_grad for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)
                   for p in m.parameters())
    set_train_mode(synced, freeze_bn=True)  # frozen: statistics not updated, nothing to synchronise
    assert not any(m.training for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm))


def test_sync_bn_is_refused_on_cpu_with_several_processes(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, tiny_overrides(synth_root, **{"model.sync_bn": "true", "device": "cpu"}))
    with pytest.raises(TransferKitError, match=r"^model.sync_bn needs CUDA \(SyncBatchNorm does not run on cpu\); set "
                                               r"model.sync_bn=false to train several processes on cpu$"):
        train(cfg, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_sync_bn_in_one_process_says_so_and_trains(synth_root, tmp_path, capsys, one_rank):
    from transferkit.cli import main

    opts = tiny_overrides(synth_root, **{"schedule.epochs": 1, "model.sync_bn": "true"})
    assert main(["train", *[a for o in opts for a in ("-o", o)], "--out", str(tmp_path / "run")]) == 0
    assert "model.sync_bn: one process, nothing to synchronise; BatchNorm left as it is" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_detection(tmp_path_factory.mktemp("shapes"), 48, 16, 96, seed=0)


@pytest.mark.slow
def test_detection_in_two_processes_is_close_to_one(shapes, tmp_path):
    """FCOS, 2 processes of 4 images against one of 8, the same seed and no random augmentation: every
    step sees the same images, and the backbone's BatchNorm is frozen. What still differs: FCOS divides
    its losses by the foreground locations of each process's batch, so 2 processes average two
    halves' normalised losses where one process normalises over all 8 images; and sums are taken in
    another order. AdamW on a tiny detector magnifies both: over seeds 0, 1 and 2 (4 epochs each) the
    epochs' val_map differed by at most 0.024 and train_loss by at most 0.030; with the model left out
    of DistributedDataParallel (each rank training alone; seed 0) by up to 0.060 and 0.178."""
    same = {"detection.hflip": 0, "detection.color_jitter": 0, "schedule.epochs": 4}
    runs = {}
    for nproc, batch in ((2, 4), (1, 8)):
        opts = [a for o in det_overrides(shapes, **{**same, "data.batch_size": batch}) for a in ("-o", o)]
        proc = launch(nproc, ["train", *opts, "--out", str(tmp_path / str(nproc))])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[nproc] = proc.stdout + proc.stderr
    two, one = read_metrics(tmp_path / "2"), read_metrics(tmp_path / "1")
    assert [r["epoch"] for r in two] == [1, 2, 3, 4]  # each epoch once: rank 1 recorded nothing
    for a, b in zip(two, one, strict=True):
        assert a["val_map"] == pytest.approx(b["val_map"], abs=0.04), (a, b)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=0.05), (a, b)
    assert runs[2].count("epoch 1 (finetune)") == 1  # rank 0 alone speaks
    # rank 0 alone writes: the same files as one process's run
    assert ({p.relative_to(tmp_path / "2") for p in (tmp_path / "2").rglob("*")}
            == {p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*")})


def test_each_epoch_under_torchrun_draws_the_order_of_the_seed_and_the_epoch():
    """The epoch's order of a sharded loader (a DistributedSampler) moves on with the epoch when the
    loop starts it, as torch documents: a permutation from a generator seeded with seed + epoch."""
    from types import SimpleNamespace

    from transferkit.data.classification import make_loader
    from transferkit.training.loop import StateSaver

    loader = make_loader(list(range(10)), 2, True, 0, seed=3, shard=(0, 1))
    saver = StateSaver(SimpleNamespace(train_loader=loader), None, None)
    orders = []
    for epoch in (1, 2):
        saver.start_epoch(epoch)
        assert saver.epoch == epoch and torch.equal(saver.loader_state, loader.generator.get_state())
        orders.append([int(i) for batch in loader for i in batch])
        assert orders[-1] == torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
    assert orders[0] != orders[1]


def test_the_images_of_an_epoch_are_this_processes_share_counted_without_drawing():
    """What each epoch's progress bar counts (times the processes): a DistributedSampler's padded
    share; detection's grouped batches, a step's images over every rank shared as evenly as they go."""
    from transferkit.data.classification import make_loader
    from transferkit.data.detection import GroupedBatchSampler
    from transferkit.training.loop import images_per_epoch

    assert images_per_epoch(make_loader(list(range(10)), 4, True, 0, seed=3)) == 10
    for rank in range(3):  # 10 images over 3 processes: 4 each, two taken again
        loader = make_loader(list(range(10)), 4, True, 0, seed=3, shard=(rank, 3))
        before = loader.generator.get_state()
        assert images_per_epoch(loader) == 4
        assert torch.equal(loader.generator.get_state(), before)
    groups = [0] * 5 + [1] * 3  # batch 2 on 2 ranks: steps of 4 images: group 0 gives 4 and 1, group 1 gives 3
    for shard, expected in ((None, 8), ((0, 2), 2 + 1 + 2), ((1, 2), 2 + 1 + 2)):
        generator = torch.Generator().manual_seed(0)
        sampler = GroupedBatchSampler(groups, 2, True, generator, shard)
        before = generator.get_state()
        loader = torch.utils.data.DataLoader(list(range(8)), batch_sampler=sampler)
        assert images_per_epoch(loader) == expected
        assert torch.equal(generator.get_state(), before)
        assert sum(map(len, sampler)) == expected  # the batches drawn hold as many
