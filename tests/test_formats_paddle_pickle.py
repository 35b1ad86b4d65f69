"""PaddlePaddle .pdparams and PyTorch files pickling whole modules, read without running anything."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import pickletools
import re
import subprocess
import sys
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, inspect_json, needs_shared
from fuzzing import SETTINGS
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from transferkit.errors import TransferKitError
from transferkit.weights.formats import paddle_file, pickled_module, read_weights
from transferkit.weights.formats import restricted_pickle as rp
from transferkit.weights.formats.restricted_pickle import Damaged, Refused, StandIn, resolve, restricted_load

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PADDLE = SHARED_DATA / "weights" / "paddle_mnist_mlp" / "model.pdparams"
YOLO = SHARED_DATA / "weights" / "yolov5n_coco_pickled_module" / "yolov5n.pt"


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
@SETTINGS
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
@SETTINGS
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


# --- the restricted unpickler, function by function -----------------------------------------------
# The pickles are built here: pickle.dumps of real numpy/torch/OrderedDict objects where that writes the
# opcodes wanted, pickle's opcode constants for damaged or hostile files, and the small classes below for
# stand-ins. Expected values are written out, or computed with numpy, torch or pickle themselves.

def _exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def _ops(value) -> bytes:
    """The opcodes that push `value` as pickle writes them (protocol 3: no frames), without PROTO and STOP."""
    return pickletools.optimize(pickle.dumps(value, protocol=3))[2:-1]


def _many(*values) -> bytes:
    return b"".join(_ops(v) for v in values)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _call(func: bytes, *args: bytes) -> bytes:
    """func(*args): the callable, a MARK, the arguments, TUPLE, REDUCE."""
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _pickle(*ops: bytes) -> bytes:
    return pickle.PROTO + b"\x03" + b"".join(ops) + pickle.STOP


def _load(data: bytes, stand_ins: bool = False, torch_records=None):
    return restricted_load(data, stand_ins=stand_ins, torch_records=torch_records)[0]


def _dtype_state(order: str) -> tuple:
    """numpy's pickled dtype state: (version, byte order, subarray, names, fields, itemsize, alignment, flags)."""
    return (3, order, None, None, None, -1, -1, 0)


def _dtype(spec, state=None) -> bytes:
    """numpy.dtype(spec, False, True), then BUILD with `state`, as numpy writes a dtype."""
    ops = _call(_global("numpy", "dtype"), _ops(spec), pickle.NEWFALSE, pickle.NEWTRUE)
    return ops if state is None else ops + _ops(state) + pickle.BUILD


def _frombuffer(data, dtype_ops: bytes, shape, *order: str) -> bytes:
    """numpy.core.numeric._frombuffer(data, dtype, shape[, order]): numpy's protocol-5 array."""
    return _call(_global("numpy.core.numeric", "_frombuffer"), _ops(data), dtype_ops, _ops(shape), *map(_ops, order))


def _reconstructed(state_ops: bytes) -> bytes:
    """numpy's protocol 0-4 array: the _reconstruct(ndarray, (0,), b'b') placeholder, BUILD with the state."""
    return _call(_global("numpy.core.multiarray", "_reconstruct"), _global("numpy", "ndarray"), _ops((0,)),
                 _ops(b"b")) + state_ops + pickle.BUILD


def _array_state(shape, dtype_ops: bytes, fortran, data) -> bytes:
    """(version, shape, dtype, fortran, data), numpy's array state."""
    return pickle.MARK + _ops(1) + _ops(shape) + dtype_ops + _ops(fortran) + _ops(data) + pickle.TUPLE


F4 = _dtype("f4", _dtype_state("<"))


def _filled(array: np.ndarray) -> rp._ArrayBuilder:
    """A numpy placeholder as BUILD leaves it."""
    placeholder = rp._ArrayBuilder()
    placeholder.array = array
    return placeholder


def _stand_in(state) -> StandIn:
    obj = StandIn()
    obj.__setstate__(state)
    return obj


# resolve

def test_resolve_replaces_placeholders_in_every_kind_of_container():
    """Placeholders in dicts, lists, tuples and stand-in states, at every level, become their arrays; other
    values and the containers themselves stay (tuples are rebuilt)."""
    a = [np.arange(i + 1, dtype=np.int16) for i in range(7)]
    st = _stand_in({"w": _filled(a[5]), "deep": [(_filled(a[6]), "keep")]})
    root = {"d": {"x": _filled(a[0]), "n": 3}, "l": [_filled(a[1]), [_filled(a[2])]],
            "t": (_filled(a[3]), (_filled(a[4]),)), "s": st, "text": "x"}
    inner_list = root["l"]
    out = resolve(root)
    assert out is root and out["l"] is inner_list and out["s"] is st
    assert out["d"] == {"x": a[0], "n": 3} and out["d"]["x"] is a[0]
    assert out["l"][0] is a[1] and out["l"][1][0] is a[2]
    assert type(out["t"]) is tuple and out["t"][0] is a[3] and type(out["t"][1]) is tuple and out["t"][1][0] is a[4]
    assert st._tk_state["w"] is a[5] and type(st._tk_state["deep"][0]) is tuple
    assert st._tk_state["deep"][0][0] is a[6] and st._tk_state["deep"][0][1] == "keep"
    assert out["text"] == "x" and resolve(_filled(a[0])) is a[0] and resolve(7) == 7


def test_resolve_visits_a_shared_or_self_referencing_container_once():
    """A list the pickle shares stays one list; a list, dict or stand-in that holds itself is resolved once
    and still holds itself."""
    arr = np.arange(3)
    shared = [_filled(arr)]
    loop = [_filled(arr)]
    loop.append(loop)
    d = {"w": _filled(arr)}
    d["me"] = d
    st = StandIn()
    st.__setstate__({"me": st, "w": _filled(arr)})
    out = resolve({"a": shared, "b": [shared], "loop": loop, "d": d, "st": st})
    assert out["a"] is shared and out["b"][0] is shared and shared == [arr] and shared[0] is arr
    assert len(loop) == 2 and loop[0] is arr and loop[1] is loop
    assert d["w"] is arr and d["me"] is d
    assert st._tk_state["me"] is st and st._tk_state["w"] is arr


@pytest.mark.parametrize("parent, both", [
    (lambda t: {"a": t, "b": t}, lambda out: (out["a"], out["b"])),
    (lambda t: [t, t], lambda out: (out[0], out[1])),
    (lambda t: (t, t), lambda out: (out[0], out[1])),
    (lambda t: [t, _stand_in({"again": t})], lambda out: (out[0], out[1]._tk_state["again"])),
], ids=["dict", "list", "tuple", "stand-in"])
def test_resolve_a_shared_tuple_becomes_one_new_tuple(parent, both):
    """A tuple holding a placeholder is replaced by a new tuple, and every reference to it gets that same one."""
    arr = np.arange(2.0)
    inner = (_filled(arr), "x")
    first, second = both(resolve(parent(inner)))
    assert first is second and first is not inner and type(first) is tuple
    assert first[0] is arr and first[1] == "x"


_NEST = {"list": lambda x: [x], "dict": lambda x: {"k": x}, "tuple": lambda x: (x,), "stand-in": _stand_in}
_UNNEST = {"list": lambda x: x[0], "dict": lambda x: x["k"], "tuple": lambda x: x[0],
           "stand-in": lambda x: x._tk_state}


@pytest.mark.parametrize("kind", list(_NEST))
def test_resolve_goes_200_deep_and_refuses_201(kind):
    """A placeholder under 200 containers is filled in; under 201 the file is damaged."""
    arr = np.ones(1)
    obj = _filled(arr)
    for _ in range(200):
        obj = _NEST[kind](obj)
    out = resolve(obj)
    for _ in range(200):
        out = _UNNEST[kind](out)
    assert out is arr
    with pytest.raises(Damaged, match=_exactly("containers nested more than 200 deep")):
        resolve(_NEST[kind](obj))


def test_restricted_load_refuses_lists_nested_201_deep():
    """The same limit through a pickle: 200 nested lists around a value load, 201 are damaged."""
    def nested(n):
        return _pickle(pickle.EMPTY_LIST * n + _ops(5) + pickle.APPEND * n)

    out = _load(nested(200))
    for _ in range(200):
        assert type(out) is list and len(out) == 1
        out = out[0]
    assert out == 5
    with pytest.raises(Damaged, match=_exactly("containers nested more than 200 deep")):
        _load(nested(201))


def test_a_numpy_array_never_filled_in_is_damaged():
    """numpy's _reconstruct placeholder without its BUILD (the state) is damaged, not returned."""
    with pytest.raises(Damaged, match=_exactly("a numpy array that was never filled in")):
        resolve([rp._ArrayBuilder()])
    bare = _call(_global("numpy.core.multiarray", "_reconstruct"), _global("numpy", "ndarray"), _ops((0,)), _ops(b"b"))
    with pytest.raises(Damaged, match=_exactly("a numpy array that was never filled in")):
        _load(_pickle(bare))


# numpy: _codecs.encode, dtypes, arrays, scalars

@pytest.mark.parametrize("args, expected", [
    ((_ops("\x00\xff\xe9"), _ops("latin1")), b"\x00\xff\xe9"),
    ((_ops("ab"), _ops("latin-1")), b"ab"),
])
def test_codecs_encode_gives_latin1_bytes(args, expected):
    """_codecs.encode(text, 'latin1'), how protocols 0-2 carry bytes, gives those bytes."""
    assert _load(_pickle(_call(_global("_codecs", "encode"), *args))) == expected
    data = pickle.dumps(expected, protocol=2)
    assert b"_codecs\nencode" in data and _load(data) == expected


@pytest.mark.parametrize("args, message", [
    ((_ops("ab"),), "_codecs.encode with 'utf8' (only latin-1 array bytes are expected)"),
    ((_ops("ab"), _ops("utf-8")), "_codecs.encode with 'utf-8' (only latin-1 array bytes are expected)"),
    ((_ops(b"ab"), _ops("latin1")), "_codecs.encode with 'latin1' (only latin-1 array bytes are expected)"),
])
def test_codecs_encode_of_anything_else_is_damaged(args, message):
    """Another encoding (utf8 is the default) or bytes instead of text is damaged."""
    with pytest.raises(Damaged, match=_exactly(message)):
        _load(_pickle(_call(_global("_codecs", "encode"), *args)))


@pytest.mark.parametrize("spec, state, expected", [
    ("i2", _dtype_state(">"), ">i2"),
    ("i2", _dtype_state("<"), "<i2"),
    (">i2", _dtype_state("<"), "<i2"),
    (">i2", _dtype_state("="), np.dtype("=i2").str),  # native
    (">i2", _dtype_state("|"), ">i2"),  # '|' (not applicable): the spec's order stays
    ("u1", _dtype_state("|"), "|u1"),
    ("i2", (3, ">"), ">i2"),  # two items are enough
    ("i2", (3, ">", "|"), ">i2"),  # the order is the second item
    (">i2", [3, "<"], ">i2"),  # not a tuple: ignored
    (">i2", (3,), ">i2"),  # too short: ignored
    (">i2", (3, "x"), ">i2"),  # not a byte order: ignored
    ("longlong", _dtype_state("<"), "<i8"),  # eight characters: still looked at
])
def test_dtype_byte_order_comes_from_its_state(spec, state, expected):
    """BUILD's state sets a dtype's byte order ('<', '>', '=' native, '|' none); anything else leaves it."""
    raw = bytes(range(1, 9))
    out = _load(_pickle(_frombuffer(raw, _dtype(spec, state), (8 // np.dtype(expected).itemsize,), "C")))
    assert out.dtype.str == expected
    assert np.array_equal(out, np.frombuffer(raw, dtype=expected))


NUMERIC_DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", ">u4", ">f8"]
SHAPED_ARRAYS = {
    "C 2-d": np.arange(6, dtype="<f4").reshape(2, 3) / 4,
    "Fortran 2-d": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    "Fortran 3-d big-endian": np.asfortranarray(np.arange(24, dtype=">f8").reshape(2, 3, 4)),
    "big-endian": np.arange(5, dtype=">i4") - 2,
    "0-d": np.array(-7, dtype=np.int64),
    "empty": np.zeros((0, 3), np.float32),
    "bool": np.array([[True, False, True]]),
    "3-d u1": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    "f2": np.array([0.5, -1.25], np.float16),
}


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
def test_arrays_of_every_numeric_kind_come_back(dtype, protocol):
    """Booleans, signed and unsigned integers and floats ('biuf'), either byte order, come back exactly."""
    assert {np.dtype(d).kind for d in NUMERIC_DTYPES} == set(rp.NUMERIC_KINDS) == set("biuf")
    arr = (np.arange(6) * 7 % 50).reshape(2, 3).astype(dtype)
    out = _load(pickle.dumps(arr, protocol=protocol))
    assert type(out) is np.ndarray and out.dtype.str == arr.dtype.str and out.shape == (2, 3)
    assert np.array_equal(out, arr)


@pytest.mark.parametrize("name, protocol", [(name, protocol) for name in SHAPED_ARRAYS for protocol in (0, 2, 5)])
def test_arrays_of_every_shape_and_order_come_back(name, protocol):
    """C and Fortran order, 0-d, empty and big-endian arrays come back with their values, shape and dtype
    (protocols 0-2 write an empty array's data as `__builtin__.bytes()`)."""
    arr = SHAPED_ARRAYS[name]
    out = _load(pickle.dumps(arr, protocol=protocol))
    assert type(out) is np.ndarray and out.dtype.str == arr.dtype.str and out.shape == arr.shape
    assert np.array_equal(out, arr)


def test_several_arrays_in_one_list_each_get_their_own_state():
    """Each BUILD fills the placeholder just made (a list of three arrays, protocol 2)."""
    arrays = [np.arange(3, dtype=np.int8), np.ones((2, 2), np.float32), np.array([5], ">u2")]
    out = _load(pickle.dumps(arrays, protocol=2))
    assert type(out) is list and len(out) == 3
    for got, want in zip(out, arrays, strict=True):
        assert got.dtype.str == want.dtype.str and np.array_equal(got, want)


@pytest.mark.parametrize("args, expected", [
    ((), [[0, 1, 2], [3, 4, 5]]),  # numpy writes the order; without it, C
    (("C",), [[0, 1, 2], [3, 4, 5]]),
    (("F",), [[0, 2, 4], [1, 3, 5]]),
])
def test_frombuffer_order(args, expected):
    """_frombuffer lays the bytes out in the order it is given, C when none is given; a list shape is taken."""
    u1 = _dtype("u1", _dtype_state("|"))
    out = _load(_pickle(_frombuffer(bytes(range(6)), u1, (2, 3), *args)))
    assert out.dtype == np.uint8 and np.array_equal(out, np.array(expected, np.uint8))
    out = _load(_pickle(_frombuffer(bytes(range(6)), u1, [2, 3], *args)))
    assert out.shape == (2, 3) and np.array_equal(out, np.array(expected, np.uint8))


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("value", [np.float32(1.5), np.float64(-2.25), np.int64(-3), np.uint8(200), np.int16(-300),
                                   np.bool_(True), np.float16(0.5)])
def test_numpy_scalars_come_back(value, protocol):
    """numpy scalars (numpy.core.multiarray.scalar(dtype, bytes)) come back with their type and value."""
    out = _load(pickle.dumps(value, protocol=protocol))
    assert type(out) is type(value) and out == value and out.dtype.str == value.dtype.str


def test_python2_text_data_is_the_arrays_latin1_bytes():
    """A Python 2 pickle carries array bytes as a str (SHORT_BINSTRING): read as latin-1, they are the bytes."""
    py2_text = pickle.SHORT_BINSTRING + bytes([4]) + np.float32(1.5).tobytes()
    out = _load(_pickle(_call(_global("numpy.core.multiarray", "scalar"), F4, py2_text)))
    assert type(out) is np.float32 and out == np.float32(1.5)
    raw = np.arange(3, dtype="<i2").tobytes()
    state = pickle.MARK + _ops(1) + _ops((3,)) + _dtype("i2", _dtype_state("<")) + _ops(False) \
        + pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw + pickle.TUPLE
    out = _load(_pickle(_reconstructed(state)))
    assert out.dtype.str == "<i2" and np.array_equal(out, np.arange(3))


@pytest.mark.parametrize("spec, message", [
    ("O", "numpy dtype 'O' is not numeric (object or structured arrays are refused)"),
    ("O8", "numpy dtype 'O8' is not numeric (object or structured arrays are refused)"),
    ("c8", "numpy dtype 'c8' is not numeric (object or structured arrays are refused)"),
    ("U2", "numpy dtype 'U2' is not numeric (object or structured arrays are refused)"),
    ("S3", "numpy dtype 'S3' is not numeric (object or structured arrays are refused)"),
    ("V8", "numpy dtype 'V8' is not numeric (object or structured arrays are refused)"),
    ("M8", "numpy dtype 'M8' is not numeric (object or structured arrays are refused)"),
    ("i4,i4", "numpy dtype 'i4,i4' is not numeric (object or structured arrays are refused)"),
    ("(2,)i4", "numpy dtype '(2,)i4' is not numeric (object or structured arrays are refused)"),
    ("ulonglong", "numpy dtype 'ulonglong' is not a plain numeric type"),  # nine characters: not looked at
    ("complex64", "numpy dtype 'complex64' is not a plain numeric type"),
    ("nonsense", "numpy dtype 'nonsense' is not a plain numeric type"),
    (5, "numpy dtype 5 is not a plain numeric type"),
    (b"f4", "numpy dtype b'f4' is not a plain numeric type"),
])
def test_dtype_that_is_not_plain_numbers_is_damaged(spec, message):
    """Object, text, complex, date, void, structured and subarray dtypes, and specs that are not short
    strings, are refused when the dtype is built."""
    with pytest.raises(Damaged, match=_exactly(message)):
        _load(_pickle(_dtype(spec)))


def test_object_array_is_refused_before_its_contents_are_read():
    """numpy's own pickle of an object array stops at its dtype."""
    with pytest.raises(Damaged, match=_exactly("numpy dtype 'O8' is not numeric (object or structured arrays "
                                               "are refused)")):
        _load(pickle.dumps(np.array([1, "x"], dtype=object), protocol=2), stand_ins=True)


@pytest.mark.parametrize("ops, message", [
    (_reconstructed(pickle.MARK + _ops(1) + _ops((2,)) + F4 + _ops(False) + pickle.TUPLE),
     "a numpy array's state is not (version, shape, dtype, fortran, data)"),
    (_reconstructed(pickle.MARK + _ops(1) + _ops((2,)) + F4 + _ops(False) + _ops(bytes(8)) + pickle.LIST),
     "a numpy array's state is not (version, shape, dtype, fortran, data)"),
    (_reconstructed(_array_state([2], F4, False, bytes(8))), "a numpy array with a bad shape [2]"),
    (_reconstructed(_array_state((-1,), F4, False, bytes(8))), "a numpy array with a bad shape (-1,)"),
    (_reconstructed(_array_state((2.0,), F4, False, bytes(8))), "a numpy array with a bad shape (2.0,)"),
    (_reconstructed(_array_state((2,), _ops("f4"), False, bytes(8))), "a numpy array without a plain numeric dtype"),
    (_reconstructed(_array_state((2,), F4, False, [0, 0])),
     "a numpy array whose data is not bytes (object arrays are refused)"),
    (_reconstructed(_array_state((2,), F4, False, None)),
     "a numpy array whose data is not bytes (object arrays are refused)"),
    (_reconstructed(_array_state((2, 3), F4, False, bytes(20))),
     "a numpy array of shape (2, 3) float32 holds 20 bytes, not 24"),
    (_reconstructed(_array_state((2,), _dtype("i4", _dtype_state(">")), True, bytes(12))),
     "a numpy array of shape (2,) >i4 holds 12 bytes, not 8"),
    (_reconstructed(_array_state((), _dtype("f8", _dtype_state("<")), False, bytes(9))),
     "a numpy array of shape () float64 holds 9 bytes, not 8"),
    (_frombuffer(bytes(6), F4, (2,), "C"), "a numpy array of shape (2,) float32 holds 6 bytes, not 8"),
    (_frombuffer(bytes(12), F4, (0, 3), "C"), "a numpy array of shape (0, 3) float32 holds 12 bytes, not 0"),
    (_frombuffer(bytes(8), _ops("f4"), (2,), "C"), "a numpy array without a plain numeric dtype"),
    (_call(_global("numpy.core.multiarray", "scalar"), F4, _ops(bytes(3))),
     "a numpy array of shape () float32 holds 3 bytes, not 4"),
    (_call(_global("numpy.core.multiarray", "_reconstruct"), _global("collections", "OrderedDict"), _ops((0,)),
           _ops(b"b")), "numpy _reconstruct of something other than an ndarray"),
], ids=["4-tuple state", "list state", "list shape", "negative dim", "float dim", "str dtype", "list data",
        "no data", "too short", "too long", "0-d too long", "frombuffer short", "empty with bytes",
        "frombuffer str dtype", "scalar short", "not ndarray"])
def test_array_whose_parts_do_not_fit_is_damaged(ops, message):
    """An array's state, shape, dtype and bytes must agree; the message says what did not."""
    with pytest.raises(Damaged, match=_exactly(message)):
        _load(_pickle(ops))


# torch: storages, tensors, parameters, sizes

def _pid(key, numel, module="torch", name="FloatStorage") -> bytes:
    """A storage's persistent id as torch.save writes it: ('storage', torch.FloatStorage, key, 'cpu', numel)."""
    return pickle.MARK + _ops("storage") + _global(module, name) + _ops(key) + _ops("cpu") + _ops(numel) \
        + pickle.TUPLE + pickle.BINPERSID


def _tensor(storage_ops: bytes, offset, size, stride) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""
    return _call(_global("torch._utils", "_rebuild_tensor_v2"), storage_ops, _ops(offset), _ops(size), _ops(stride),
                 pickle.NEWFALSE, _call(_global("collections", "OrderedDict")))


class _Records:
    """A torch zip's storage records; every read is logged as (key, nbytes)."""

    def __init__(self, **records: bytes):
        self.records, self.reads = records, []

    def __call__(self, key, nbytes):
        self.reads.append((key, nbytes))
        return self.records[key]


def _save_to_zip(obj) -> tuple[bytes, dict[str, bytes]]:
    """torch.save's data.pkl and storage records."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as zf:
        return zf.read("archive/data.pkl"), {n.rsplit("/", 1)[1]: zf.read(n) for n in zf.namelist()
                                             if n.startswith("archive/data/")}


def test_tensors_torch_saved_as_views_of_one_storage_come_back():
    """Views with offsets and strides of one storage (torch.save) come back equal, the record read once;
    torch.Size is a tuple."""
    base = torch.arange(12, dtype=torch.float32)
    saved = {"a": base[2:8].view(2, 3), "b": base.view(3, 4).t(), "c": base[5], "all": base,
             "size": base.view(3, 4).t().shape}
    pkl, records = _save_to_zip(saved)
    recs = _Records(**records)
    out = _load(pkl, torch_records=recs)
    assert recs.reads == [("0", 48)]
    for key in ("a", "b", "c", "all"):
        assert type(out[key]) is torch.Tensor and out[key].dtype == torch.float32
        assert out[key].shape == saved[key].shape and torch.equal(out[key], saved[key])
    assert type(out["size"]) is tuple and out["size"] == (4, 3)


FOUR = _floats = np.array([10, 11, 12, 13], "<f4").tobytes()


@pytest.mark.parametrize("offset, size, stride, expected", [
    (1, (3,), (1,), [11, 12, 13]),  # ends on the storage's last element
    (0, (2, 2), (2, 1), [[10, 11], [12, 13]]),
    (0, (2, 2), (1, 2), [[10, 12], [11, 13]]),  # a transposed view
    (3, (), (), 13),
    (0, (4,), (0,), [10, 10, 10, 10]),  # stride 0 (an expanded tensor)
    (2, (2, 0), (1, 1), np.zeros((2, 0))),
    (0, (1,) * 16, (1,) * 16, np.full((1,) * 16, 10)),  # 16 dimensions
])
def test_rebuild_tensor_takes_offset_size_and_stride(offset, size, stride, expected):
    """A tensor is the storage's elements at offset + sum(index * stride), in its shape."""
    out = _load(_pickle(_tensor(_pid("s", 4), offset, size, stride)), torch_records=_Records(s=FOUR))
    assert out.dtype == torch.float32 and out.shape == tuple(size)
    assert torch.equal(out, torch.as_tensor(np.asarray(expected, np.float32)))


@pytest.mark.parametrize("storage_ops, offset, size, stride, message", [
    (_pid("s", 4), 2, (3,), (1,), "a tensor of shape (3,) reaches element 4 of a 4-element storage"),
    (_pid("s", 4), 0, (2, 2), (3, 1), "a tensor of shape (2, 2) reaches element 4 of a 4-element storage"),
    (_pid("s", 4), 4, (), (), "a tensor of shape () reaches element 4 of a 4-element storage"),
    (_pid("z", 0), 0, (1,), (1,), "a tensor of shape (1,) reaches element 0 of a 0-element storage"),
    (_pid("s", 4), 0, (2,), (1, 1), "a tensor with a bad shape (2,), stride (1, 1) or offset 0"),
    (_pid("s", 4), 0, (1,) * 17, (1,) * 17, f"a tensor with a bad shape {(1,) * 17}, stride {(1,) * 17} or offset 0"),
    (_pid("s", 4), 0, (2,), (-1,), "a tensor with a bad shape (2,), stride (-1,) or offset 0"),
    (_pid("s", 4), -1, (2,), (1,), "a tensor with a bad shape (2,), stride (1,) or offset -1"),
    (_pid("s", 4), 0, (2.0,), (1,), "a tensor with a bad shape (2.0,), stride (1,) or offset 0"),
    (_ops(0), 0, (1,), (1,), "a tensor rebuilt from something that is not one of the file's storages"),
])
def test_rebuild_tensor_outside_its_storage_is_damaged(storage_ops, offset, size, stride, message):
    """A tensor must lie inside its storage, with as many strides as sizes (16 at most), none negative."""
    with pytest.raises(Damaged, match=_exactly(message)):
        _load(_pickle(_tensor(storage_ops, offset, size, stride)), torch_records=_Records(s=FOUR, z=b""))


def test_a_tensor_of_an_empty_storage():
    """A storage of 0 elements gives empty tensors (its record is asked for 0 bytes)."""
    recs = _Records(z=b"")
    out = _load(_pickle(_tensor(_pid("z", 0, name="LongStorage"), 0, (0, 5), (5, 1))), torch_records=recs)
    assert out.dtype == torch.int64 and out.shape == (0, 5) and recs.reads == [("z", 0)]


TORCH_STORAGE_TYPES = [  # (module, name, dtype, bytes per element)
    ("torch", "HalfStorage", torch.float16, 2), ("torch", "FloatStorage", torch.float32, 4),
    ("torch", "DoubleStorage", torch.float64, 8), ("torch", "BFloat16Storage", torch.bfloat16, 2),
    ("torch", "LongStorage", torch.int64, 8), ("torch", "IntStorage", torch.int32, 4),
    ("torch", "ShortStorage", torch.int16, 2), ("torch", "CharStorage", torch.int8, 1),
    ("torch", "ByteStorage", torch.uint8, 1), ("torch", "BoolStorage", torch.bool, 1),
    ("torch.storage", "UntypedStorage", torch.uint8, 1), ("torch", "UntypedStorage", torch.uint8, 1),
    ("torch.storage", "FloatStorage", torch.float32, 4),
]


@pytest.mark.parametrize("module, name, dtype, itemsize", TORCH_STORAGE_TYPES)
def test_every_storage_type_reads_its_record_once(module, name, dtype, itemsize):
    """Each storage type reads numel * itemsize bytes of its record (once for all its tensors, extra bytes
    left out) as its dtype."""
    assert {n for _, n, _, _ in TORCH_STORAGE_TYPES} == set(rp.TORCH_STORAGES)
    expected = torch.tensor([1, 0, 1], dtype=dtype)
    recs = _Records(k=expected.view(torch.uint8).numpy().tobytes() + b"\xff" * 3)
    data = _pickle(pickle.EMPTY_LIST + pickle.MARK + _tensor(_pid("k", 3, module, name), 0, (3,), (1,))
                   + _tensor(_pid("k", 3, module, name), 1, (2,), (1,)) + pickle.APPENDS)
    out = _load(data, torch_records=recs)
    assert recs.reads == [("k", 3 * itemsize)]
    assert out[0].dtype == dtype and torch.equal(out[0], expected) and torch.equal(out[1], expected[1:])
    kind = rp.RestrictedUnpickler(b"", stand_ins=False, torch_records=recs).find_class(module, name)
    assert type(kind) is rp._StorageType and (kind.name, kind.dtype) == (name, dtype)


def test_a_bare_storage_is_its_flat_elements():
    """A storage pickled on its own (torch.save of an UntypedStorage) is kept as its flat bytes."""
    pkl, records = _save_to_zip({"u": torch.tensor([1, 2], dtype=torch.int16).untyped_storage()})
    out = _load(pkl, torch_records=_Records(**records))
    assert type(out["u"]) is rp._Storage and out["u"].flat.dtype == torch.uint8
    assert out["u"].flat.tolist() == [1, 0, 2, 0]


_STORAGE_PID = "('storage', <transferkit.weights.formats.restricted_pickle._StorageType object a"  # str(pid)[:80]


@pytest.mark.parametrize("ops, message", [
    (pickle.MARK + _ops("storage") + _global("torch", "FloatStorage") + _ops("0") + _ops("cpu") + pickle.TUPLE
     + pickle.BINPERSID, _STORAGE_PID),  # four items
    (pickle.MARK + _ops("storage") + _global("torch", "FloatStorage") + _ops("0") + _ops("cpu") + _ops(1) + _ops(1)
     + pickle.TUPLE + pickle.BINPERSID, _STORAGE_PID),  # six
    (_pid("0", -1), _STORAGE_PID),
    (_pid("0", 2.0), _STORAGE_PID),
    (_pid(0, 1), _STORAGE_PID),
    (pickle.MARK + _ops("Storage") + _global("torch", "FloatStorage") + _ops("0") + _ops("cpu") + _ops(1)
     + pickle.TUPLE + pickle.BINPERSID, _STORAGE_PID.replace("storage", "Storage", 1)),
    (_ops(("storage", "FloatStorage", "0", "cpu", 1)) + pickle.BINPERSID, "('storage', 'FloatStorage', '0', 'cpu', 1)"),
    (_ops(("Storage", "x" * 100)) + pickle.BINPERSID, "('Storage', '" + "x" * 67),
    (pickle.PERSID + b"0\n", "0"),
], ids=["4 items", "6 items", "negative numel", "float numel", "int key", "not storage", "type a str", "long",
        "text"])
def test_persistent_id_that_is_not_a_storage_is_damaged(ops, message):
    """Only ('storage', <storage type>, key, location, numel >= 0) is a persistent id; the message shows the
    first 80 characters of another."""
    with pytest.raises(Damaged, match=_exactly(f"an unexpected persistent id {message}")):
        _load(_pickle(ops), torch_records=_Records(**{"0": FOUR}))


@pytest.mark.parametrize("ops", [_pid("0", 1), pickle.PERSID + b"0\n"])
def test_persistent_id_in_a_pickle_without_records_is_damaged(ops):
    """A pickle read without a torch zip (a .pdparams) has no persistent ids."""
    with pytest.raises(Damaged, match=_exactly("a persistent id in a pickle that should have none")):
        _load(_pickle(ops), stand_ins=True)


def test_parameters_come_back_as_plain_tensors_without_grad():
    """nn.Parameter (torch._utils._rebuild_parameter, _with_state when it has attributes) is its data: a plain
    tensor, requires_grad False whatever was saved, no attributes set."""
    on = nn.Parameter(torch.tensor([1.0, 2.0]))
    off = nn.Parameter(torch.tensor([3.0]), requires_grad=False)
    noted = nn.Parameter(torch.tensor([4.0]))
    noted.note = "x"
    pkl, records = _save_to_zip({"on": on, "off": off, "noted": noted})
    assert b"_rebuild_parameter\n" in pkl and b"_rebuild_parameter_with_state\n" in pkl
    out = _load(pkl, torch_records=_Records(**records))
    for key, values in (("on", [1.0, 2.0]), ("off", [3.0]), ("noted", [4.0])):
        assert type(out[key]) is torch.Tensor and out[key].requires_grad is False
        assert out[key].tolist() == values
    assert not hasattr(out["noted"], "note")
    bad = _call(_global("torch._utils", "_rebuild_parameter"), _ops([1.0]), pickle.NEWTRUE,
                _call(_global("collections", "OrderedDict")))
    with pytest.raises(Damaged, match=_exactly("a parameter whose data is not a tensor")):
        _load(_pickle(bad), torch_records=_Records())


@pytest.mark.parametrize("args, expected", [((_ops((2, 3)),), (2, 3)), ((_ops(()),), ()), ((), ())])
def test_torch_size_is_a_tuple(args, expected):
    """torch.Size(...) is the plain tuple of its sizes."""
    out = _load(_pickle(_call(_global("torch", "Size"), *args)), torch_records=_Records())
    assert type(out) is tuple and out == expected


# BUILD

@pytest.mark.parametrize("protocol", [2, 5])
def test_build_on_an_ordered_dict_keeps_only_identifier_attributes(protocol):
    """A state_dict's `_metadata` comes back as its attribute; keys that are not identifiers, dunder names and
    non-strings are dropped."""
    sd = OrderedDict(w=1)
    sd._metadata = {"": {"version": 1}}
    sd.__dict__.update({"__evil": 1, "not-ident": 2, 5: 3})
    out = _load(pickle.dumps(sd, protocol=protocol))
    assert type(out) is OrderedDict and dict(out) == {"w": 1}
    assert out.__dict__ == {"_metadata": {"": {"version": 1}}}


def test_build_on_a_tensor_sets_nothing():
    """A tensor's BUILD state (a parameter's Python attributes) is not applied."""
    ops = _tensor(_pid("s", 4), 0, (2,), (1,)) + _ops({"note": "x"}) + pickle.BUILD
    out = _load(_pickle(ops), torch_records=_Records(s=FOUR))
    assert out.tolist() == [10.0, 11.0] and out.__dict__ == {}


@pytest.mark.parametrize("target, state, kind", [
    (pickle.EMPTY_DICT, {"a": 1}, "dict"),
    (_call(_global("collections", "OrderedDict")), [1], "OrderedDict"),
    (pickle.EMPTY_LIST, {}, "list"),
    (_call(_global("builtins", "set"), _ops([1])), {"a": 1}, "set"),
])
def test_build_on_anything_else_is_damaged(target, state, kind):
    """BUILD sets state only on placeholders, stand-ins, tensors and (with a dict) OrderedDicts."""
    with pytest.raises(Damaged, match=_exactly(f"BUILD on a {kind}, which this reader never sets state on")):
        _load(_pickle(target + _ops(state) + pickle.BUILD))


# find_class

@pytest.mark.parametrize("module, name, full", [
    ("os", "system", "os.system"), ("posix", "system", "posix.system"), ("nt", "system", "nt.system"),
    ("os.path", "join", "os.path.join"), ("posixpath", "join", "posixpath.join"),
    ("subprocess", "Popen", "subprocess.Popen"), ("subprocess", "check_output", "subprocess.check_output"),
    ("builtins", "eval", "builtins.eval"), ("builtins", "exec", "builtins.exec"),
    ("builtins", "getattr", "builtins.getattr"), ("builtins", "open", "builtins.open"),
    ("builtins", "__import__", "builtins.__import__"), ("__builtin__", "eval", "builtins.eval"),
    ("__builtin__", "reduce", "functools.reduce"), ("__builtin__", "xrange", "builtins.range"),
    ("copy_reg", "_reconstructor", "copyreg._reconstructor"), ("cPickle", "loads", "pickle.loads"),
    ("commands", "getoutput", "subprocess.getoutput"), ("thread", "start_new_thread", "_thread.start_new_thread"),
    ("urllib2", "urlopen", "urllib.request.urlopen"), ("httplib", "HTTPConnection", "http.client.HTTPConnection"),
    ("importlib", "import_module", "importlib.import_module"), ("runpy", "run_path", "runpy.run_path"),
    ("shutil", "rmtree", "shutil.rmtree"), ("socket", "create_connection", "socket.create_connection"),
    ("pickle", "loads", "pickle.loads"), ("_pickle", "loads", "_pickle.loads"), ("marshal", "loads", "marshal.loads"),
    ("ctypes", "CDLL", "ctypes.CDLL"), ("io", "open", "io.open"), ("codecs", "open", "codecs.open"),
    ("types", "FunctionType", "types.FunctionType"), ("functools", "partial", "functools.partial"),
    ("operator", "attrgetter", "operator.attrgetter"), ("sys", "exit", "sys.exit"),
    ("multiprocessing.context", "Process", "multiprocessing.context.Process"), ("pty", "spawn", "pty.spawn"),
    ("webbrowser", "open", "webbrowser.open"), ("tempfile", "mkdtemp", "tempfile.mkdtemp"),
    ("torch.hub", "load", "torch.hub.load"), ("torch.jit", "load", "torch.jit.load"),
    ("torch.jit._script", "RecursiveScriptModule", "torch.jit._script.RecursiveScriptModule"),
    ("torch.ops.aten", "add", "torch.ops.aten.add"),
])
@pytest.mark.parametrize("stand_ins", [False, True])
def test_denied_globals_are_refused_whatever_the_policy(module, name, full, stand_ins):
    """The deny list (module prefixes, Python 2 names mapped first, torch.hub/jit/ops) refuses a global even
    where stand-ins are allowed, naming it as Python 3 spells it."""
    with pytest.raises(Refused, match=_exactly(f"the pickle calls {full}, which is never run")):
        _load(_pickle(_global(module, name)), stand_ins=stand_ins, torch_records=_Records())


@pytest.mark.parametrize("module", ["builtins", "__builtin__"])
@pytest.mark.parametrize("name, expected", [("set", set), ("frozenset", frozenset), ("slice", slice),
                                            ("complex", complex)])
def test_safe_builtins_are_the_real_types(module, name, expected):
    """set, frozenset, slice and complex, under Python 3 or 2 names, are the real types."""
    assert _load(_pickle(_global(module, name))) is expected


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_plain_data_types_of_every_protocol(protocol):
    """OrderedDict, set, frozenset, complex and slice come back as themselves from every protocol (0-2 write
    Python 2 names, __builtin__.set)."""
    value = [{1, 2}, frozenset({3}), complex(1, -2), slice(1, 5, 2), OrderedDict(a=1, b=[2])]
    data = pickle.dumps(value, protocol=protocol)
    assert (b"__builtin__" in data) == (protocol < 3)
    out = _load(data)
    assert [type(v) for v in out] == [set, frozenset, complex, slice, OrderedDict] and out == value
    assert list(out[4].items()) == [("a", 1), ("b", [2])]


class _Plain:
    """An ordinary class: protocols 0-1 pickle it through copy_reg._reconstructor."""


def test_protocol_0_objects_are_refused_for_copyreg():
    """copy_reg._reconstructor, how protocols 0-1 build any object, is copyreg's: refused even with stand-ins."""
    with pytest.raises(Refused, match=_exactly("the pickle calls copyreg._reconstructor, which is never run")):
        _load(pickle.dumps(_Plain(), protocol=0), stand_ins=True)


@pytest.mark.parametrize("module, name, records", [
    ("zipfile", "ZipInfo", False), ("numpy", "load", False), ("numpy.core.multiarray", "fromstring", False),
    ("torch._utils", "_rebuild_tensor_v2", False), ("torch", "FloatStorage", False), ("torch", "float32", False),
    ("torch", "Size", False), ("mymodule", "FloatStorage", True), ("mymodule", "float16", True),
    ("torch", "complex64", True), ("torch", "Tensor", True), ("torch._utils", "_rebuild_qtensor", True),
    ("torch.nn.modules.linear", "Linear", True), ("cPickles", "loads", False),
])
def test_other_globals_are_refused_without_stand_ins(module, name, records):
    """Without stand-ins anything but numpy's array functions, plain types (and torch's, in a torch zip) is
    refused, named."""
    with pytest.raises(Refused, match=_exactly(f"the pickle needs {module}.{name}, which is neither an array "
                                               "nor plain data")):
        _load(_pickle(_global(module, name)), torch_records=_Records() if records else None)


@pytest.mark.parametrize("module, name, expected", [
    ("numpy.core.multiarray", "_reconstruct", rp._reconstruct), ("numpy._core.multiarray", "_reconstruct",
                                                                 rp._reconstruct),
    ("numpy.core.multiarray", "scalar", rp._scalar), ("numpy._core.multiarray", "scalar", rp._scalar),
    ("numpy.core.numeric", "_frombuffer", rp._frombuffer), ("numpy._core.numeric", "_frombuffer", rp._frombuffer),
    ("numpy", "dtype", rp._DtypeBuilder), ("_codecs", "encode", rp._codecs_encode),
    ("collections", "OrderedDict", OrderedDict),
    ("torch._utils", "_rebuild_tensor_v2", rp._rebuild_tensor), ("torch._utils", "_rebuild_tensor", rp._rebuild_tensor),
    ("torch._utils", "_rebuild_parameter", rp._rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state", rp._rebuild_parameter), ("torch", "Size", rp._torch_size),
    ("torch", "float16", torch.float16), ("torch", "half", torch.float16), ("torch", "bfloat16", torch.bfloat16),
    ("torch", "long", torch.int64), ("torch", "int", torch.int32), ("torch", "bool", torch.bool),
])
def test_admitted_globals_are_the_readers_own(module, name, expected):
    """numpy's and torch's globals are this module's rebuilders (torch's in a torch zip), dtypes torch's own."""
    assert _load(_pickle(_global(module, name)), torch_records=_Records()) is expected


def test_stand_in_classes_are_made_once_per_name_and_counted():
    """With stand-ins, a global becomes one inert StandIn subclass per name, listed in not_run with its count of
    instances (0 until one is made)."""
    unpickler = rp.RestrictedUnpickler(b"", stand_ins=True)
    cls = unpickler.find_class("zipfile", "ZipInfo")
    assert issubclass(cls, StandIn) and cls.__name__ == "ZipInfo" and cls._tk_name == "zipfile.ZipInfo"
    assert cls.__module__ == "transferkit.weights.formats.restricted_pickle"
    assert unpickler.find_class("zipfile", "ZipInfo") is cls and unpickler.not_run == Counter({"zipfile.ZipInfo": 0})
    first, second = cls(), cls(1, "a", k=2)
    assert unpickler.not_run == Counter({"zipfile.ZipInfo": 2})
    assert repr(first) == "<not run: zipfile.ZipInfo>" and second._tk_args == (1, "a")
    torch_global = unpickler.find_class("torch._utils", "_rebuild_tensor_v2")  # no torch zip: a stand-in too
    assert torch_global._tk_name == "torch._utils._rebuild_tensor_v2" and issubclass(torch_global, StandIn)
    user_dict = unpickler.find_class("UserDict", "UserDict")  # Python 2's name
    assert user_dict._tk_name == "collections.UserDict"
    assert unpickler.not_run == Counter({"zipfile.ZipInfo": 2, "torch._utils._rebuild_tensor_v2": 0,
                                         "collections.UserDict": 0})


# StandIn

class _Bag(dict):
    """A dict subclass: filled by SETITEM(S), its attributes set by BUILD."""


class _Row(list):
    """A list subclass: filled by APPEND(S)."""


class _Point:
    """Pickled as a call with arguments (REDUCE)."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (_Point, self.args)


class _Slots:
    __slots__ = ("a", "b")


def test_stand_ins_record_what_the_file_gives_them():
    """A stand-in keeps its call's arguments, the items SETITEM(S) and APPEND(S) give it and its BUILD state,
    exactly."""
    bag = _Bag(a=1, b=[2])
    bag.note = "x"
    slots = _Slots()
    slots.a, slots.b = 1, 2
    value = {"bag": bag, "single": _Bag(k="v"), "one": _Row([7]), "three": _Row([1, 2, 3]),
             "point": _Point(1, "two", (3,)), "bare": _Point(), "slots": slots}
    data = pickle.dumps(value, protocol=2)
    assert {"SETITEM", "SETITEMS", "APPEND", "APPENDS", "NEWOBJ", "REDUCE", "BUILD"} <= {
        op.name for op, _, _ in pickletools.genops(data)}
    out, unpickler = restricted_load(data, stand_ins=True)
    recorded = {k: (v._tk_args, v._tk_items, v._tk_list, v._tk_state) for k, v in out.items()}
    assert recorded == {
        "bag": ((), {"a": 1, "b": [2]}, [], {"note": "x"}),
        "single": ((), {"k": "v"}, [], None),
        "one": ((), {}, [7], None),
        "three": ((), {}, [1, 2, 3], None),
        "point": ((1, "two", (3,)), {}, [], None),
        "bare": ((), {}, [], None),
        "slots": ((), {}, [], (None, {"a": 1, "b": 2})),
    }
    assert all(isinstance(v, StandIn) for v in out.values()) and repr(out["bag"]) == f"<not run: {__name__}._Bag>"
    assert unpickler.not_run == Counter({f"{__name__}._Bag": 2, f"{__name__}._Row": 2, f"{__name__}._Point": 2,
                                         f"{__name__}._Slots": 1})


_MODULE_DICT = {"_modules": {}, "training": True}


@pytest.mark.parametrize("state, expected", [
    (_MODULE_DICT, _MODULE_DICT),
    ((_MODULE_DICT, {"slot": 1}), _MODULE_DICT),  # (__dict__, slots)
    ((_MODULE_DICT, None, None), None),
    (({"x": 1}, _MODULE_DICT), None),
    ({"x": 1}, None),
    (["_modules"], None),
    (("_modules", "x"), None),
    (None, None),
])
def test_module_state_is_the_dict_of_an_nn_module(state, expected):
    """module_state is the pickled __dict__ (alone, or first of a (dict, slots) pair) when it has `_modules`."""
    got = _stand_in(state).module_state()
    assert got is expected


# pickled_module.py: whole modules in a torch zip

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))
        self.head = nn.Linear(2, 3)
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("tmp", torch.zeros(1), persistent=False)
        self.yaml = {"nc": 3, "depth": 0.33}


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def test_pickled_module_names_its_tensors_as_state_dict_does(tmp_path):
    """A whole nn.Module read through stand-ins gives state_dict()'s names, order and values (parameters that
    are None and non-persistent buffers left out), with its classes listed as not run."""
    torch.manual_seed(0)
    net = _Net()
    path = tmp_path / "net.pt"
    torch.save({"model": net, "epoch": 3}, path)
    wf = read_weights(path)
    expected = net.state_dict()
    assert wf.format == "pytorch-pickled-module" and wf.path == path
    assert list(wf.tensors) == list(expected)
    for name, tensor in expected.items():
        assert wf.tensors[name].dtype == tensor.dtype and torch.equal(wf.tensors[name], tensor)
    assert wf.metadata == {
        "source_format": "pytorch zip pickling whole modules (read with inert stand-ins)",
        "not_run": _json({f"{__name__}._Net": 1, "torch.nn.modules.batchnorm.BatchNorm2d": 1,
                          "torch.nn.modules.container.Sequential": 1, "torch.nn.modules.conv.Conv2d": 1,
                          "torch.nn.modules.linear.Linear": 1}),
        "dtype": "float32,int64", "nested_key": "model", "module_class": f"{__name__}._Net",
        "model_config": '{"nc":3,"depth":0.33}', "checkpoint_keys": '["model","epoch"]',
    }


@pytest.mark.parametrize("checkpoint, where", [
    ({"model": None, "ema": "LIN"}, "ema"),  # YOLOv5 keeps the EMA model beside an empty `model`
    ({"module": "LIN"}, "module"),
    ({"net": "LIN", "epoch": 1}, "net"),
    ({"model": _Point(1), "network": "LIN"}, "network"),  # a stand-in that is not a module is passed over
    ("LIN", ""),  # torch.save(model)
])
def test_pickled_module_found_under_each_checkpoint_key(tmp_path, checkpoint, where):
    """The module is the checkpoint itself or the first of model/ema/module/net/network holding one."""
    lin = nn.Linear(2, 1)
    obj = lin if checkpoint == "LIN" else {k: lin if v == "LIN" else v for k, v in checkpoint.items()}
    path = tmp_path / "m.pt"
    torch.save(obj, path)
    wf = pickled_module.read(path)
    assert list(wf.tensors) == ["weight", "bias"] and torch.equal(wf.tensors["weight"], lin.weight.detach())
    assert wf.metadata.get("nested_key", "") == where
    assert wf.metadata["module_class"] == "torch.nn.modules.linear.Linear" and "model_config" not in wf.metadata
    assert wf.metadata.get("checkpoint_keys") == (None if where == "" else _json(list(obj)))


def test_walk_lists_shared_modules_under_each_name_and_stops_a_tree_past_max_modules(monkeypatch):
    """A module inside itself is not followed; one held under two names is listed under both (as
    state_dict() lists it); a tree of more than MAX_MODULES module visits is damaged, not listed in part."""
    weight, bias = torch.ones(1), torch.zeros(1)
    child = _stand_in({"_parameters": {"bias": bias}, "_buffers": None, "_modules": {}})
    root = StandIn()
    root.__setstate__({"_parameters": {"w": weight, "none": None}, "_buffers": {"b": bias}, "_modules": {
        "me": root, "child": child, "twin": child, "plain": 3}, "_non_persistent_buffers_set": set()})
    out = {}
    pickled_module._walk(root, "", out)
    assert list(out) == ["w", "b", "child.bias", "twin.bias"] and out["w"] is weight
    monkeypatch.setattr(pickled_module, "MAX_MODULES", 3)  # root, child, twin: 3 visits
    pickled_module._walk(root, "", {})
    monkeypatch.setattr(pickled_module, "MAX_MODULES", 2)
    with pytest.raises(Damaged, match=_exactly("more than 2 modules in the tree (one module shared under many "
                                               "names?)")):
        pickled_module._walk(root, "", {})


def _rezip(src: Path, dst: Path, members: dict | None = None, deflate: tuple[str, ...] = ()) -> None:
    """Copy a zip, replacing members (None drops one) and deflating the named ones."""
    members = members or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = members.get(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
        for name, data in members.items():
            if name not in zin.namelist() and data is not None:
                zout.writestr(name, data)


def _too_big_message() -> str:
    try:
        np.frombuffer(bytearray(), np.float32).reshape((0, 2**62))
    except ValueError as exc:
        assert len(str(exc)) > 80
        return str(exc)[:80]
    raise AssertionError("numpy took a (0, 2**62) shape")


def _pickled_module_file(tmp_path, case) -> tuple[Path, str]:
    src = tmp_path / "archive.pt"  # torch.save names the zip's folder after the file: archive/
    torch.save({"layer": _Layer(), "w": torch.arange(4.0)}, src)
    path = tmp_path / "bad.pt"
    if case == "refused":
        torch.save({"layer": _Layer(), "x": _Calls(os.system, "true")}, path)
        return path, f"{path}: refused, the pickle calls posix.system, which is never run; re-save the state_dict " \
                     "only, e.g. torch.save(model.state_dict(), path)"
    damaged = f"{path}: damaged PyTorch checkpoint ({{}}); re-download or re-save it"
    if case == "no data.pkl":
        _rezip(src, path, {"archive/data.pkl": None, "data.pkl": b".", "x/y/data.pkl": b"."})
        return path, damaged.format("expected one <name>/data.pkl in the zip, found 0")
    if case == "two data.pkl":
        _rezip(src, path, {"other/data.pkl": b"."})
        return path, damaged.format("expected one <name>/data.pkl in the zip, found 2")
    if case == "big-endian":
        _rezip(src, path, {"archive/byteorder": b"big"})
        return path, damaged.format("its tensors are big-endian; re-save it on a little-endian machine")
    if case == "record missing":
        _rezip(src, path, {"archive/data/0": None})
        return path, damaged.format("storage record archive/data/0 is missing")
    if case == "record expanding":
        torch.save({"w": torch.zeros(250_000)}, src)
        _rezip(src, path, deflate=("archive/data/0",))
        return path, damaged.format("storage record archive/data/0 declares 1000000 bytes")
    if case == "too big":
        big = _frombuffer(b"", F4, (0, 2**62), "C")
        _rezip(src, path, {"archive/data.pkl": _pickle(big)})
        return path, f"{path}: truncated or damaged PyTorch checkpoint (ValueError: {_too_big_message()}); " \
                     "re-download or re-save it"
    if case == "no tensors":
        torch.save({"layer": _Point(1)}, path)
        return path, f"{path}: no tensors found in the pickled objects"
    if case == "not a mapping":
        torch.save([_Point(1), torch.ones(1)], path)
        return path, f"{path}: no tensors found in the pickled objects"
    path.mkdir()
    return path, f"cannot read {path}: Is a directory"


@pytest.mark.parametrize("case", ["refused", "no data.pkl", "two data.pkl", "big-endian", "record missing",
                                  "record expanding", "too big", "no tensors", "not a mapping", "a directory"])
def test_pickled_module_errors_are_one_line_naming_the_file(tmp_path, case):
    """Each refusal and damage reads as one line naming the file and what is wrong."""
    path, message = _pickled_module_file(tmp_path, case)
    with pytest.raises(TransferKitError, match=_exactly(message)):
        pickled_module.read(path)


@pytest.mark.parametrize("byteorder", [b"little", b"little\n", b""])
def test_pickled_module_little_endian_or_unmarked_reads(tmp_path, byteorder):
    """A byteorder record saying little (or nothing) reads."""
    src, path = tmp_path / "archive.pt", tmp_path / "m.pt"
    torch.save({"layer": _Layer(), "w": torch.arange(4.0)}, src)
    _rezip(src, path, {"archive/byteorder": byteorder})
    assert torch.equal(pickled_module.read(path).tensors["w"], torch.arange(4.0))


@pytest.mark.parametrize("extra", [0, 1])
def test_stored_record_may_not_declare_more_than_the_file(tmp_path, extra):
    """A stored (uncompressed) record whose header declares more bytes than the whole zip is damaged; up to the
    zip's size, its real bytes are read."""
    src, path = tmp_path / "archive.pt", tmp_path / "m.pt"
    torch.save({"layer": _Layer(), "w": torch.arange(4.0)}, src)
    _rezip(src, path)
    raw = bytearray(path.read_bytes())
    entry = raw.rindex(b"archive/data/1") - 46  # w's central directory entry (its name comes last)
    assert raw[entry:entry + 4] == b"PK\x01\x02"
    declared = len(raw) + extra
    raw[entry + 24:entry + 28] = declared.to_bytes(4, "little")  # its uncompressed size
    path.write_bytes(bytes(raw))
    if extra:
        with pytest.raises(TransferKitError, match=_exactly(f"{path}: damaged PyTorch checkpoint (storage record "
                                                            f"archive/data/1 declares {declared} bytes, more than "
                                                            "the file); re-download or re-save it")):
            pickled_module.read(path)
    else:
        assert torch.equal(pickled_module.read(path).tensors["w"], torch.arange(4.0))


def _padded_zip(path: Path, members: dict[str, bytes], deflate: tuple[str, ...], size: int) -> None:
    """A zip of exactly `size` bytes: the members, then a stored padding member to make up the size."""
    def write(pad: int):
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
            zf.writestr("archive/pad", b"p" * pad)

    write(0)
    write(size - path.stat().st_size)
    assert path.stat().st_size == size


@pytest.mark.parametrize("size, ok", [(2000, True), (1999, False)])
def test_pickle_declaring_more_than_100_times_the_file_is_damaged(tmp_path, size, ok):
    """data.pkl may be up to 100 times the zip's size (compressed), no more."""
    path = tmp_path / "m.pt"
    _padded_zip(path, {"archive/data.pkl": b"\x80\x02" + b"N" * 199_997 + b"."}, ("archive/data.pkl",), size)
    message = "no tensors found in the pickled objects" if ok else \
        "damaged PyTorch checkpoint (data.pkl declares 200000 bytes); re-download or re-save it"
    with pytest.raises(TransferKitError, match=_exactly(f"{path}: {message}")):
        pickled_module.read(path)


@pytest.mark.parametrize("size, ok", [(10_000, True), (9_999, False)])
def test_compressed_record_declaring_more_than_100_times_the_file_is_damaged(tmp_path, size, ok):
    """A compressed storage record may expand to 100 times the zip's size, no more."""
    pkl, _ = _save_to_zip({"w": torch.zeros(250_000)})
    path = tmp_path / "m.pt"
    _padded_zip(path, {"archive/data.pkl": pkl, "archive/data/0": bytes(1_000_000)}, ("archive/data/0",), size)
    if ok:
        assert torch.equal(pickled_module.read(path).tensors["w"], torch.zeros(250_000))
    else:
        with pytest.raises(TransferKitError, match=_exactly(f"{path}: damaged PyTorch checkpoint (storage record "
                                                            "archive/data/0 declares 1000000 bytes); re-download or "
                                                            "re-save it")):
            pickled_module.read(path)


# paddle_file.py

@pytest.mark.parametrize("head, expected", [
    (pickle.dumps({"w": np.zeros(1, np.float32)}, protocol=2)[:512], True),
    (pickle.dumps({"w": np.zeros(1, np.float32)}, protocol=3)[:512], True),
    (pickle.dumps({"w": np.zeros(1, np.float32)}, protocol=5)[:512], True),
    (b"\x80\x02numpy", True),
    (b"\x80\x05numpy", True),
    (pickle.dumps({"w": 1}, protocol=2), False),  # a pickle without numpy
    (b"\x80\x01numpy", False),
    (b"\x80\x06numpy", False),
    (b"\x81\x02numpy", False),
    (b"numpy arrays\n", False),
    (b"\x80\x02", False),
    (b"", False),
])
def test_paddle_sniff_wants_a_protocol_2_to_5_pickle_naming_numpy(head, expected):
    assert paddle_file.sniff(Path("x.bin"), head) is expected


def test_paddle_layout_conversions_and_metadata(tmp_path):
    """Linear weights are transposed (by Paddle's parameter name when the bookkeeping entry gives one, else by
    shape and name), BatchNorm statistics renamed, everything else unchanged; non-arrays and non-string keys
    are left out; each conversion and name is in the metadata."""
    rng = np.random.default_rng(0)

    def a(*shape, dtype=np.float32):
        return rng.normal(size=shape).astype(dtype)

    params = {
        "StructuredToParameterName@@": {"fc.weight": "linear_3.w_0", "old.weight": "fc_0.w_0",
                                        "lookup.weight": "embedding_0.w_0", "emb2.weight": "linear_9.w_0", 7: 8},
        "fc.weight": a(2, 3), "old.weight": a(3, 2, dtype=np.float64), "lookup.weight": a(4, 2),
        "emb2.weight": a(2, 5), "plain.weight": a(3, 4), "Embedding.weight": a(5, 2), "conv.weight": a(2, 1, 3, 3),
        "vec.weight": a(4, dtype=np.float16), "bn._mean": a(2), "bn.block._variance": a(2), "_mean": a(2),
        "count": np.array(5, np.int64), "step": 3, 9: np.zeros(1),
    }
    path = tmp_path / "m.pdparams"
    path.write_bytes(pickle.dumps(params, protocol=2))
    wf = read_weights(path)
    transposed = {"fc.weight", "old.weight", "emb2.weight", "plain.weight"}
    renamed = {"bn._mean": "bn.running_mean", "bn.block._variance": "bn.block.running_var", "_mean": "running_mean"}
    expected = {renamed.get(k, k): torch.from_numpy(v.T.copy() if k in transposed else v)
                for k, v in params.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    assert wf.format == "paddle" and wf.path == path and list(wf.tensors) == list(expected)
    for name, tensor in expected.items():
        assert wf.tensors[name].dtype == tensor.dtype and torch.equal(wf.tensors[name], tensor)
    assert wf.metadata == {
        "source_format": "paddle pdparams", "dtype": "float16,float32,float64,int64",
        "converted": _json({
            "fc.weight": "linear [in,out] -> [out,in] (linear_3.w_0)",
            "old.weight": "linear [in,out] -> [out,in] (fc_0.w_0)",
            "lookup.weight": "unchanged",  # Paddle names it an embedding
            "emb2.weight": "linear [in,out] -> [out,in] (linear_9.w_0)",  # the name wins over `emb`
            "plain.weight": "linear [in,out] -> [out,in] (by shape and name)",
            "Embedding.weight": "unchanged", "conv.weight": "unchanged", "vec.weight": "unchanged",
            "bn.running_mean": "_mean -> running_mean", "bn.block.running_var": "_variance -> running_var",
            "running_mean": "_mean -> running_mean", "count": "unchanged"}),
        "parameter_names": _json({"fc.weight": "linear_3.w_0", "old.weight": "fc_0.w_0",
                                  "lookup.weight": "embedding_0.w_0", "emb2.weight": "linear_9.w_0", "7": "8"}),
        "left_out": '["step","9"]',
    }


def test_paddle_bookkeeping_entry_that_is_not_a_dict_is_ignored(tmp_path):
    path = tmp_path / "m.pdparams"
    path.write_bytes(pickle.dumps({"StructuredToParameterName@@": ["x"], "lookup.weight": np.ones((2, 3))},
                                  protocol=2))
    wf = paddle_file.read(path)
    assert wf.tensors["lookup.weight"].shape == (3, 2) and "parameter_names" not in wf.metadata
    assert "left_out" not in wf.metadata


def _paddle_file(tmp_path, case) -> tuple[Path, str]:
    path = tmp_path / "p.pdparams"
    damaged = f"{path}: truncated or damaged Paddle parameters file ({{}}); re-download or re-save it"
    if case == "refused":
        path.write_bytes(pickle.dumps({"w": np.zeros(2, np.float32), "c": zipfile.ZipInfo("a")}, protocol=2))
        return path, f"{path}: refused, the pickle needs zipfile.ZipInfo, which is neither an array nor plain " \
                     "data; a .pdparams file holds only arrays"
    if case == "damaged":
        path.write_bytes(_pickle(_frombuffer(bytes(6), F4, (2,), "C")))
        return path, f"{path}: damaged Paddle parameters file (a numpy array of shape (2,) float32 holds 6 bytes, " \
                     "not 8); re-download or re-save it"
    if case == "not a dict":
        path.write_bytes(pickle.dumps([np.zeros(2)], protocol=2))
        return path, f"{path}: holds a list, not a dictionary of parameters"
    if case == "no arrays":
        path.write_bytes(pickle.dumps({f"k{i}": i for i in range(10)}, protocol=2))
        return path, f"{path}: no arrays found (keys: ['k0', 'k1', 'k2', 'k3', 'k4', 'k5', 'k6', 'k7'])"
    if case == "too big":
        path.write_bytes(_pickle(_frombuffer(b"", F4, (0, 2**62), "C")))
        return path, damaged.format(f"ValueError: {_too_big_message()}")
    if case == "truncated":
        path.write_bytes(pickle.dumps({"w": np.zeros(2, np.float32)}, protocol=2)[:-1])
        return path, damaged.format("EOFError: ")
    path.mkdir()
    return path, f"cannot read {path}: Is a directory"


@pytest.mark.parametrize("case", ["refused", "damaged", "not a dict", "no arrays", "too big", "truncated",
                                  "a directory"])
def test_paddle_errors_are_one_line_naming_the_file(tmp_path, case):
    path, message = _paddle_file(tmp_path, case)
    with pytest.raises(TransferKitError, match=_exactly(message)):
        paddle_file.read(path)


# --- defects found while writing the tests above, fixed: each test was red before the fix ----------------------

@pytest.mark.parametrize("stand_ins", [False, True])
def test_slice_assignment_cannot_double_a_list(stand_ins):
    """SETITEM called `target[key] = value` on whatever was on the stack; with a list, the key slice(0, 0) (a
    safe builtin) and the list itself as value, each 5-byte step doubled the list: 40 steps, about 250 bytes of
    .pdparams or data.pkl, asked for 2**40 items. SETITEM fills dicts and stand-ins only."""
    steps = 16
    data = _pickle(pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + _ops(None) + pickle.APPEND
                   + _call(_global("builtins", "slice"), _ops(0), _ops(0)) + pickle.BINPUT + b"\x01" + pickle.POP
                   + (pickle.BINGET + b"\x01" + pickle.BINGET + b"\x00" + pickle.SETITEM) * steps)
    with pytest.raises(Damaged, match=_exactly("SETITEM on a list, which this reader never fills")):
        _load(data, stand_ins=stand_ins)


@pytest.mark.parametrize(("body", "message"), [
    (pickle.EMPTY_DICT + pickle.EMPTY_LIST + _ops(1) + pickle.SETITEM, "a dict key of type list"),
    (pickle.EMPTY_DICT + pickle.MARK + _many(1, 2) + pickle.EMPTY_LIST + _ops(3) + pickle.SETITEMS,
     "a dict key of type list"),
    (pickle.EMPTY_DICT + _ops(1) + pickle.APPEND, "APPEND on a dict, which this reader never fills"),
    (pickle.EMPTY_DICT + pickle.MARK + _ops(1) + pickle.APPENDS, "APPEND on a dict, which this reader never fills"),
    (pickle.EMPTY_LIST + pickle.MARK + _many(1, 2) + pickle.SETITEMS,
     "SETITEM on a list, which this reader never fills"),
    (pickle.EMPTY_LIST + pickle.MARK + _ops(1) + pickle.ADDITEMS, "ADDITEMS on a list, which this reader never fills"),
])
def test_filling_opcodes_refuse_containers_they_never_fill(body, message):
    with pytest.raises(Damaged, match=_exactly(message)):
        _load(_pickle(body))


def test_filling_opcodes_fill_dicts_lists_sets_and_stand_ins():
    out = _load(_pickle(pickle.EMPTY_LIST + pickle.EMPTY_DICT + _many("a", 1) + pickle.SETITEM
                        + pickle.MARK + _many("b", 2, "c", 3) + pickle.SETITEMS + pickle.APPEND
                        + pickle.MARK + _many(4, 5) + pickle.APPENDS + pickle.EMPTY_SET + pickle.MARK + _many(6, 7)
                        + pickle.ADDITEMS + pickle.APPEND))
    assert out == [{"a": 1, "b": 2, "c": 3}, 4, 5, {6, 7}]
    shell = _load(_pickle(_call(_global("m", "Box")) + _many("k", 1) + pickle.SETITEM + _ops(2) + pickle.APPEND
                          + pickle.MARK + _many(3, 4) + pickle.APPENDS), stand_ins=True)
    assert (shell._tk_items, shell._tk_list) == ({"k": 1}, [2, 3, 4])


def test_additems_on_a_tensor_does_not_run_tensor_add(monkeypatch):
    """ADDITEMS called `.add(item)` on whatever was on the stack; on a rebuilt tensor that is torch.Tensor.add,
    which broadcasts: an (n, 1) and a (1, n) tensor make an n*n one (n = 100,000: 40 GB, from two 4-byte
    storage records read with stride 0). ADDITEMS fills sets only."""
    calls = []
    real_add = torch.Tensor.add

    def spy(self, *args, **kwargs):
        result = real_add(self, *args, **kwargs)
        calls.append(tuple(result.shape))
        return result

    monkeypatch.setattr(torch.Tensor, "add", spy)
    n = 64
    data = _pickle(_tensor(_pid("a", n), 0, (n, 1), (1, 1)) + pickle.MARK + _tensor(_pid("b", n), 0, (1, n), (n, 1))
                   + pickle.ADDITEMS)
    with pytest.raises(Damaged, match=_exactly("ADDITEMS on a Tensor, which this reader never fills")):
        _load(data, torch_records=_Records(a=bytes(4 * n), b=bytes(4 * n)))
    assert calls == []


def test_a_tensor_holds_no_more_elements_than_its_storage():
    """_rebuild_tensor returned torch.as_strided(storage, size, stride).clone(), so stride 0 (or overlapping
    strides) gave a tensor of any size from a 1-element record: size (2**16, 2**16) float32 is 16 GiB from 4
    bytes (torch.load keeps it a view, which a later copy would make as big)."""
    with pytest.raises(Damaged, match=_exactly("a tensor of shape (1000, 1000) holds 1000000 elements, more than "
                                               "its 1-element storage (a stride of 0 or overlapping strides)")):
        _load(_pickle(_tensor(_pid("s", 1), 0, (1000, 1000), (0, 0))), torch_records=_Records(s=FOUR[:4]))
    # as many elements as the storage, strides overlapping or not, still read
    out = _load(_pickle(_tensor(_pid("s", 4), 0, (2, 2), (1, 1))), torch_records=_Records(s=FOUR))
    assert out.tolist() == [[10.0, 11.0], [11.0, 12.0]]


@pytest.mark.parametrize("dims", [(0, 2**64), (0, 2**63), (2**63, 0)])
def test_array_dimensions_beyond_numpys_are_refused_before_any_product(dims):
    """_array_from_bytes multiplied the shape's integers before anything bounded them, and a pickle's integers
    are as long as its bytes (LONG4): 400 dimensions of 4 kB integers (a 1.6 MB .pdparams) took 5 s,
    quadratic in the file's size. numpy's dimensions are below 2**63."""
    with pytest.raises(Damaged, match=_exactly(f"a numpy array with a bad shape {dims}")):
        _load(_pickle(_frombuffer(b"", F4, dims, "C")))


def test_tensor_sizes_beyond_torchs_are_refused():
    with pytest.raises(Damaged, match=_exactly(f"a tensor with a bad shape (0, {2**63}), stride (1, 1) or offset 0")):
        _load(_pickle(_tensor(_pid("s", 4), 0, (0, 2**63), (1, 1))), torch_records=_Records(s=FOUR))


def test_shared_submodule_is_listed_under_each_name(tmp_path):
    """nn.Module.state_dict() lists a submodule held under two names (weight tying) under both; the walk's
    `seen` set (there against cycles) listed it once, so the names were not those a real state_dict has and a
    strict load_state_dict of the tensors read failed."""
    net = nn.Module()
    net.a = nn.Linear(2, 2)
    net.b = net.a
    path = tmp_path / "tied.pt"
    torch.save(net, path)
    assert list(pickled_module.read(path).tensors) == list(net.state_dict())


def test_bytes_is_admitted_only_empty():
    """`bytes()` is how protocols 0-2 write an empty array's data; with an argument it could allocate any size."""
    assert _load(_pickle(_call(_global("__builtin__", "bytes")))) == b""
    with pytest.raises(Damaged, match=_exactly("builtins.bytes with arguments (only the empty bytes of an empty array "
                                               "are expected)")):
        _load(_pickle(_call(_global("builtins", "bytes"), _ops(10**9))))


def test_a_module_tree_past_max_modules_is_one_line_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "net.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), path)
    monkeypatch.setattr(pickled_module, "MAX_MODULES", 2)  # the Sequential and its two layers are 3
    with pytest.raises(TransferKitError) as err:
        pickled_module.read(path)
    assert str(err.value) == (f"{path}: damaged PyTorch checkpoint (more than 2 modules in the tree (one module "
                              "shared under many names?)); re-download or re-save it")
