"""PaddlePaddle .pdparams and PyTorch files pickling whole modules, read without running anything."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, needs_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from transferkit.cli import main
from transferkit.errors import TransferKitError
from transferkit.weights.formats import read_weights

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PADDLE = SHARED_DATA / "weights" / "paddle_mnist_mlp" / "model.pdparams"
YOLO = SHARED_DATA / "weights" / "yolov5n_coco_pickled_module" / "yolov5n.pt"
# FUZZ_EXAMPLES=1000 for a longer hunt; the suite runs 25 per format.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def inspect_json(source, capsys) -> dict:
    capsys.readouterr()
    assert main(["weights", "inspect", "--json", str(source)]) == 0
    return json.loads(capsys.readouterr().out)


class _NumpyOnly(pickle.Unpickler):
    """The test's own, independent way to read the .pdparams: numpy's real unpickling functions."""

    def find_class(self, module, name):
        if module.startswith("numpy") or module == "_codecs":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


# --- Paddle --------------------------------------------------------------------------------------

@needs_shared
def test_paddle_mlp_loads_strictly_into_the_pytorch_sequential(capsys):
    info = inspect_json(PADDLE, capsys)
    assert info["format"] == "paddle" and info["tensors"] == 4
    assert [e["name"] for e in info["entries"]] == ["1.weight", "1.bias", "4.weight", "4.bias"]
    meta = info["metadata"]
    assert json.loads(meta["parameter_names"])["4.weight"] == "linear_1.w_0"  # the bookkeeping entry, kept aside
    assert "linear [in,out] -> [out,in]" in json.loads(meta["converted"])["1.weight"]

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 10))
    model.load_state_dict(read_weights(PADDLE).tensors, strict=True)
    with open(PADDLE, "rb") as fh:
        raw = _NumpyOnly(fh, encoding="latin1").load()
    assert raw["1.weight"].shape == (784, 512)  # Paddle's [in, out]
    assert torch.equal(model[1].weight.detach(), torch.from_numpy(raw["1.weight"].T.copy()))
    assert torch.equal(model[4].bias.detach(), torch.from_numpy(raw["4.bias"]))
    x = torch.rand(3, 1, 28, 28)
    expected = np.maximum(x.reshape(3, 784).numpy() @ raw["1.weight"] + raw["1.bias"], 0) @ raw["4.weight"] \
        + raw["4.bias"]  # the network in Paddle's own layout, computed with numpy
    with torch.no_grad():
        assert np.allclose(model.eval()(x).numpy(), expected, atol=1e-4)


@needs_shared
def test_paddle_mlp_computes_what_paddle_computed():
    """Logits Paddle produced once (tests/fixtures/make_reference_outputs.py, run with paddlepaddle)."""
    ref = np.load(FIXTURES / "paddle_mnist_mlp_reference.npz")
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 10))
    model.load_state_dict(read_weights(PADDLE).tensors, strict=True)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(ref["pixels"].astype(np.float32) / 255)[:, None]).numpy()
    scale = float(np.abs(ref["outputs"]).max())
    assert np.abs(out - ref["outputs"]).max() <= 1e-4 * scale
    assert (out.argmax(1) == ref["outputs"].argmax(1)).all()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_paddle_arrays_of_every_pickle_protocol_and_linear_detection(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    params = {"fc.weight": rng.normal(size=(3, 5)).astype(np.float32), "fc.bias": np.zeros(5, np.float32),
              "emb.weight": rng.normal(size=(10, 4)).astype(np.float64),
              "bn._mean": np.arange(4, dtype=np.float32), "bn._variance": np.ones(4, np.float32),
              "conv.weight": rng.normal(size=(2, 3, 3, 3)).astype(np.float16), "step": 7,
              "bn.counter": np.array(5, np.int64)}
    path = tmp_path / "m.pdparams"
    path.write_bytes(pickle.dumps(params, protocol=protocol))
    wf = read_weights(path)
    assert wf.format == "paddle"
    t = wf.tensors
    assert t["fc.weight"].shape == (5, 3) and t["fc.weight"][4, 2] == float(params["fc.weight"][2, 4])
    assert torch.equal(t["emb.weight"], torch.from_numpy(params["emb.weight"]))  # embeddings keep their layout
    assert torch.equal(t["conv.weight"], torch.from_numpy(params["conv.weight"]))
    assert torch.equal(t["bn.running_var"], torch.ones(4)) and "bn._mean" not in t
    assert json.loads(wf.metadata["left_out"]) == ["step"]
    assert t["bn.counter"].shape == () and t["bn.counter"].item() == 5  # a 0-d array stays 0-d


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_paddle_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"w": np.zeros(2, np.float32), "x": _System(marker)}, protocol=2))
    with pytest.raises(TransferKitError, match=r"evil.pdparams: refused, the pickle calls posix.system"):
        read_weights(path)
    assert not marker.exists()
    other = tmp_path / "class.pdparams"
    other.write_bytes(pickle.dumps({"w": np.zeros(2, np.float32), "c": zipfile.ZipInfo("a")}, protocol=2))
    with pytest.raises(TransferKitError, match=r"refused, the pickle needs zipfile.ZipInfo"):
        read_weights(other)


def test_paddle_array_whose_bytes_do_not_fit_its_shape_is_damaged(tmp_path):
    path = tmp_path / "liar.pdparams"
    blob = pickle.dumps({"w": np.zeros((4, 4), np.float32)}, protocol=2)
    # the shape tuple (4, 4) is pickled as BININT1 4, BININT1 4: claim (4, 40)
    at = blob.index(b"K\x04K\x04")
    path.write_bytes(blob[:at] + b"K\x04K\x28" + blob[at + 4:])
    with pytest.raises(TransferKitError, match=r"liar.pdparams: damaged .*holds 64 bytes, not 640"):
        read_weights(path)


@needs_shared
@FUZZ
@given(data=st.data())
def test_paddle_mutated_file_reads_or_fails_in_one_line(tmp_path_factory, data):
    raw = bytearray(PADDLE.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        # half the mutations hit the first 300 bytes: opcodes, globals, shapes and dtypes
        pos = data.draw(st.integers(0, 300) if data.draw(st.booleans()) else st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("paddle") / "model.pdparams"
    path.write_bytes(bytes(raw))
    try:
        wf = read_weights(path)
    except TransferKitError as exc:
        assert "\n" not in str(exc) and "model.pdparams" in str(exc)
    else:
        assert wf.tensors


# --- pickled whole modules -----------------------------------------------------------------------

@needs_shared
def test_yolov5_whole_module_lists_its_tensors_and_runs_nothing(capsys):
    before = set(sys.modules)
    info = inspect_json(YOLO, capsys)
    assert not {m for m in set(sys.modules) - before if m == "models" or m.startswith("models.")}  # nothing imported
    assert info["format"] == "pytorch-pickled-module" and info["tensors"] == 349
    entries = {e["name"]: e for e in info["entries"]}
    assert entries["model.0.conv.weight"] == {"name": "model.0.conv.weight", "shape": [16, 3, 6, 6], "dtype": "float16"}
    assert entries["model.24.m.2.weight"]["shape"] == [255, 256, 1, 1]  # 3 anchors x (80 classes + 5)
    assert entries["model.0.bn.num_batches_tracked"]["dtype"] == "int64"
    assert info["parameters"] == 1_881_736
    meta = info["metadata"]
    not_run = json.loads(meta["not_run"])
    assert not_run["models.yolo.Model"] == 1 and not_run["models.common.Conv"] == 57
    assert not_run["torch.nn.modules.conv.Conv2d"] == 60
    assert meta["dtype"] == "float16,int64" and meta["nested_key"] == "model"
    assert json.loads(meta["model_config"])["nc"] == 80

    wf = read_weights(YOLO)
    with zipfile.ZipFile(YOLO) as zf:  # the first storage record, read straight from the zip
        record = np.frombuffer(zf.read("archive/data/0"), np.float16)
    assert torch.equal(wf.tensors["model.0.conv.weight"].flatten(), torch.from_numpy(record.copy()))


def _touch(path):
    Path(path).touch()


class _Calls:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _Layer:
    """A stand-in candidate: a class from this test module, which the reader must not import."""

    def __init__(self):
        self.weight = torch.ones(2)


@pytest.mark.parametrize("func, args", [
    (os.system, ("touch {marker}",)),
    (builtins.eval, ("open({marker!r}, 'w')",)),
    (builtins.exec, ("open({marker!r}, 'w')",)),
    (open, ("{marker}", "w")),
    (subprocess.Popen, (["touch", "{marker}"],)),
])
def test_hostile_pickled_module_is_refused_and_runs_nothing(tmp_path, func, args):
    marker = tmp_path / "ran"
    args = tuple(a.format(marker=marker) if isinstance(a, str) else [x.format(marker=marker) for x in a]
                 for a in args)
    path = tmp_path / "evil.pt"
    # a class first, so weights_only's refusal names it and the stand-in reader is tried; then the call
    torch.save({"layer": _Layer(), "payload": _Calls(func, *args)}, path)
    with pytest.raises(TransferKitError, match=r"evil.pt: refused, .*(never run|would run code)"):
        read_weights(path)
    assert not marker.exists()


def test_function_off_the_deny_list_becomes_an_inert_stand_in(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "hook": _Calls(_touch, str(marker))}, path)
    wf = read_weights(path)
    assert not marker.exists()
    assert wf.format == "pytorch-pickled-module" and list(wf.tensors) == ["w"]
    assert torch.equal(wf.tensors["w"], torch.arange(3.0))
    assert json.loads(wf.metadata["not_run"]) == {f"{__name__}._touch": 1}


def test_pickled_module_with_a_storage_smaller_than_its_tensor_is_damaged(tmp_path):
    path = tmp_path / "short.pt"
    torch.save({"layer": _Layer(), "w": torch.zeros(16)}, path)
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob[:8] if name.endswith("/data/1") else blob)
    with pytest.raises(TransferKitError, match=r"short.pt: damaged .*data/1 holds 8 bytes, the pickle needs 64"):
        read_weights(path)


@needs_shared
@FUZZ
@given(data=st.data())
def test_yolov5_mutated_file_reads_or_fails_in_one_line(tmp_path_factory, data):
    raw = bytearray(YOLO.read_bytes())
    with zipfile.ZipFile(YOLO) as zf:
        pkl = zf.getinfo("archive/data.pkl")
    for _ in range(data.draw(st.integers(1, 4))):
        # half the mutations land in the pickle itself (stored uncompressed after its local header)
        if data.draw(st.booleans()):
            pos = data.draw(st.integers(pkl.header_offset, pkl.header_offset + 200 + pkl.compress_size - 1))
        else:
            pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("yolo") / "yolov5n.pt"
    path.write_bytes(bytes(raw))
    try:
        wf = read_weights(path)
    except TransferKitError as exc:
        assert "\n" not in str(exc) and "yolov5n.pt" in str(exc)
    else:
        assert wf.tensors
