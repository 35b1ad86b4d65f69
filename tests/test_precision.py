"""Mixed precision (optim.amp), gradient accumulation (optim.accumulate) and model.compile."""

import json
import shutil
from functools import partial

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from transferkit.config import load_config
from transferkit.run import train
from transferkit.training import device as device_module
from transferkit.training.loop import optimiser_steps, window_size
from transferkit.training.precision import MixedPrecision
from transferkit.training.resume import load_state
from transferkit.training.runlog import read_metrics

CPU = torch.device("cpu")


def final_weights(run):
    return load_file(str(run / "checkpoints" / "last.safetensors"))


def strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_autocast_runs_the_forward_pass_in_the_asked_dtype():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    for amp, dtype in (("none", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with MixedPrecision(amp, CPU).autocast():
            assert layer(x).dtype == dtype, amp
    assert MixedPrecision("bf16", CPU).scaler is None
    assert MixedPrecision("fp16", CPU).scaler is not None


def test_fp16_scales_the_loss_on_the_runs_device():
    """The scaler belongs to the run's device: one made for another (CUDA, absent here) disables itself
    and leaves float16's small gradients to underflow."""
    precision = MixedPrecision("fp16", torch.device("cpu"))
    assert precision.scaler.is_enabled()
    assert precision.scaler.scale(torch.tensor(1.0)).item() == 2.0 ** 16  # GradScaler's first scale
    assert MixedPrecision("bf16", torch.device("cpu")).scaler is None


def test_bf16_on_cpu_trains_as_well_as_fp32(synth_root, tmp_path):
    extra = {"schedule.epochs": 4}
    fp32 = train(load_config(None, tiny_overrides(synth_root, **extra)), out=tmp_path / "fp32", quiet=True)
    bf16 = train(load_config(None, tiny_overrides(synth_root, **extra, **{"optim.amp": "bf16"})),
                 out=tmp_path / "bf16", quiet=True)
    # bf16 really ran: its losses are not fp32's ...
    assert [r["train_loss"] for r in bf16.metrics] != [r["train_loss"] for r in fp32.metrics]
    # ... and it learns the same: accuracy within 0.02, the last training loss close.
    assert abs(bf16.metrics[-1]["val_acc"] - fp32.metrics[-1]["val_acc"]) <= 0.02
    assert bf16.metrics[-1]["val_acc"] > 0.9
    assert bf16.metrics[-1]["train_loss"] == pytest.approx(fp32.metrics[-1]["train_loss"], abs=0.1)
    # the weights stay float32
    assert all(t.dtype == torch.float32 for t in final_weights(tmp_path / "bf16").values() if t.is_floating_point())


def test_fp16_scaler_state_round_trips_through_a_mid_epoch_resume(synth_root, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_root, **{"optim.amp": "fp16", "schedule.epochs": 3,
                                                          "checkpoint.every_steps": 3, "checkpoint.keep_last": 100}))
    train(cfg, out=tmp_path / "whole", quiet=True)
    run = tmp_path / "run"
    train(cfg, out=run, quiet=True)
    states = sorted((run / "checkpoints" / "states").glob("step-*"))
    markers = {p: json.loads((p / "COMPLETE").read_text()) for p in states}
    mid = next(p for p, m in markers.items() if (m["epoch"], m["batches_done"]) == (1, 1))  # step 6: epoch 2, batch 1
    scaler = load_state(mid)["scaler"]
    # the scaler skipped its first steps (gradients overflowed at 2^16) and lowered its scale
    assert scaler["scale"] < 65536.0
    for later in states[states.index(mid) + 1:]:
        shutil.rmtree(later)
    train(cfg, resume=run, quiet=True)
    a, b = final_weights(run), final_weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip(read_metrics(run)) == strip(read_metrics(tmp_path / "whole"))


def test_accumulation_windows():
    # 9 batches in windows of 2: four full windows and a last one of 1 batch
    assert [window_size(i, 9, 2) for i in range(9)] == [2, 2, 2, 2, 2, 2, 2, 2, 1]
    assert [window_size(i, 5, 1) for i in range(5)] == [1] * 5
    assert [window_size(i, 7, 3) for i in range(7)] == [3, 3, 3, 3, 3, 3, 1]
    assert optimiser_steps(9, 2) == 5 and optimiser_steps(5, 1) == 5 and optimiser_steps(7, 3) == 3


def test_accumulating_two_half_batches_steps_like_one_whole_batch(synth_root, tmp_path):
    """Batch 8 x 2 accumulated against batch 16 (BatchNorm frozen and no dropout, so a batch's size
    changes nothing else): the same optimiser steps, learning rates and weights."""
    same = {"optim.freeze_bn": "true", "model.drop_rate": 0.0, "schedule.epochs": 2, "optim.name": "sgd",
            "optim.lr": 0.05}
    whole = train(load_config(None, tiny_overrides(synth_root, **same)), out=tmp_path / "whole", quiet=True)
    halves = train(load_config(None, tiny_overrides(synth_root, **same, **{"data.batch_size": 8,
                                                                            "optim.accumulate": 2})),
                   out=tmp_path / "halves", quiet=True)
    # cosine over optimiser steps: 5 a epoch in both (72 images; 9 batches of 8 make 5 windows)
    assert [r["lr"] for r in halves.metrics] == pytest.approx([r["lr"] for r in whole.metrics], abs=1e-12)
    assert [r["train_loss"] for r in halves.metrics] == pytest.approx([r["train_loss"] for r in whole.metrics],
                                                                       rel=1e-4)
    a, b = final_weights(tmp_path / "halves"), final_weights(tmp_path / "whole")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # and without accumulation, batch 8 is a different run
    plain = train(load_config(None, tiny_overrides(synth_root, **same, **{"data.batch_size": 8})),
                  out=tmp_path / "plain", quiet=True)
    assert plain.metrics[-1]["train_loss"] != pytest.approx(whole.metrics[-1]["train_loss"], rel=1e-4)


def test_compile_trains_and_keeps_plain_names(synth_root, tmp_path, monkeypatch):
    # the eager backend: torch.compile's graph capture without generating C++ (too slow for the suite)
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    said = []
    monkeypatch.setattr("transferkit.run.console.print", lambda *a, **k: said.append(" ".join(map(str, a))))
    cfg = load_config(None, tiny_overrides(synth_root, **{"model.compile": "true", "schedule.epochs": 1}))
    calls = []
    real = device_module.compile_model
    monkeypatch.setattr("transferkit.run.compile_model", lambda *a: calls.append(real(*a)) or calls[-1])
    train(cfg, out=tmp_path / "run")
    assert type(calls[0]).__name__ == "OptimizedModule"
    assert not any("model.compile" in s for s in said)
    assert not any(k.startswith("_orig_mod.") for k in final_weights(tmp_path / "run"))


def test_compile_falls_back_with_one_line_where_unsupported(synth_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    said = []
    monkeypatch.setattr("transferkit.run.console.print", lambda *a, **k: said.append(" ".join(map(str, a))))
    cfg = load_config(None, tiny_overrides(synth_root, **{"model.compile": "true", "schedule.epochs": 1}))
    train(cfg, out=tmp_path / "run")
    lines = [s for s in said if s.startswith("model.compile")]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].endswith("on this platform; training without it")
    assert read_metrics(tmp_path / "run")[0]["epoch"] == 1


def test_compile_on_cpu_needs_a_cpp_compiler_named_by_cxx_or_found_as_gpp_or_cpp(monkeypatch):
    import sys

    from transferkit.training import device as device_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    found = set()
    monkeypatch.setattr(device_module.shutil, "which", lambda name: f"/bin/{name}" if name in found else None)
    monkeypatch.delenv("CXX", raising=False)
    none = "torch.compile on CPU needs a C++ compiler (g++ or $CXX), and none was found"
    assert device_module.compile_support(cpu) == none
    assert device_module.compile_support(cuda) is None  # a GPU compiles with Triton, not a C++ compiler
    for present in ("g++", "c++"):
        found = {present}
        assert device_module.compile_support(cpu) is None, present
    found = {"clang++"}
    assert device_module.compile_support(cpu) == none
    monkeypatch.setenv("CXX", "clang++")
    assert device_module.compile_support(cpu) is None
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert device_module.compile_support(cpu) == \
        f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} on this platform"


def test_the_device_asked_for(monkeypatch):
    from transferkit.errors import TransferKitError

    assert device_module.select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_module.select_device("auto") == torch.device("cpu")
    with pytest.raises(TransferKitError) as refused:
        device_module.select_device("cuda")
    assert str(refused.value) == "device=cuda was asked for but no CUDA GPU is available; use device=auto or cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_module.select_device("auto") == torch.device("cuda")
    assert device_module.select_device("cuda") == torch.device("cuda")
    assert device_module.select_device("cpu") == torch.device("cpu")


def test_the_model_is_placed_on_the_device_asked_for_in_the_layout_asked_for():
    """The meta device stands for a GPU: a model left on the CPU would show."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert device_module.place_model(model, torch.device("meta"), channels_last=False) is model
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last)
    placed = device_module.place_model(torch.nn.Conv2d(3, 4, 3), torch.device("cpu"), channels_last=True)
    assert placed.weight.is_contiguous(memory_format=torch.channels_last) and not placed.weight.is_contiguous()


def test_one_seed_seeds_every_generator_and_a_rank_past_numpys_range_wraps():
    """Under torchrun each rank seeds with seed + rank, which may pass NumPy's 32-bit range."""
    import random

    import numpy as np

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    device_module.seed_everything(7)
    first = draws()
    device_module.seed_everything(7)
    assert draws() == first
    device_module.seed_everything(8)
    assert all(a != b for a, b in zip(draws(), first, strict=True))
    device_module.seed_everything(2**32 + 5)
    wrapped = draws()[1]
    np.random.seed(5)
    assert wrapped == float(np.random.rand())


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_model_is_placed_in_the_memory_format_asked_for(channels_last):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    placed = device_module.place_model(model, torch.device("cpu"), channels_last)
    assert placed is model
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert model[0].weight.is_contiguous(memory_format=fmt)
    assert model[0].weight.is_contiguous() is not channels_last
