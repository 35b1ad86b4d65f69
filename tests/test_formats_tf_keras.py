"""TensorFlow checkpoints and Keras HDF5 files read into PyTorch layout, without TensorFlow."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, inspect_json, needs_shared
from fuzzing import SETTINGS
from hypothesis import given
from hypothesis import strategies as st
from protowire import field, varint
from torch import nn

from transferkit.checksums import masked_crc32c
from transferkit.errors import TransferKitError
from transferkit.weights.formats import read_weights, tf_checkpoint
from transferkit.weights.formats.tf_layout import convert
from transferkit.weights.sources import resolve_source

RFB = SHARED_DATA / "weights" / "ultralight_face_rfb320_multiformat"
RFB_TF = RFB / "tf" / "export_models" / "RFB"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
XCEPTION = SHARED_DATA / "weights" / "keras_fer2013_mini_xception" / "fer2013_mini_XCEPTION.102-0.66.hdf5"


# --- layouts -------------------------------------------------------------------------------------

def test_layout_conversions_move_each_element_where_pytorch_expects_it():
    rng = np.random.default_rng(0)
    hwio = rng.normal(size=(3, 2, 4, 5)).astype(np.float32)
    leaf, oihw, how, kind = convert("kernel", hwio)
    assert (leaf, oihw.shape, how, kind) == ("weight", (5, 4, 3, 2), "HWIO -> OIHW", "Conv2D")
    assert oihw[4, 1, 2, 0] == hwio[2, 0, 1, 4] and oihw[0, 3, 1, 1] == hwio[1, 1, 3, 0]

    # depthwise (H, W, in=3, multiplier=2): PyTorch output channel c*2+m reads input channel c
    hwim = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    leaf, dw, how, _ = convert("depthwise_kernel", hwim)
    assert (leaf, dw.shape) == ("weight", (6, 1, 3, 3))
    assert dw[2 * 2 + 1, 0, 0, 2] == hwim[0, 2, 2, 1] and dw[1, 0, 1, 0] == hwim[1, 0, 0, 1]

    dense = rng.normal(size=(7, 4)).astype(np.float32)
    leaf, out, how, kind = convert("kernel", dense)
    assert out.shape == (4, 7) and out[3, 6] == dense[6, 3] and kind == "Dense"

    names = [convert(leaf, np.zeros(2))[0] for leaf in ("gamma", "beta", "moving_mean", "moving_variance")]
    assert names == ["weight", "bias", "running_mean", "running_var"]


# --- TensorFlow checkpoints ---------------------------------------------------------------------------

@needs_shared
def test_tf_checkpoint_inspects_from_every_form_of_source(capsys):
    forms = [RFB_TF, RFB_TF / "variables", RFB_TF / "variables" / "variables",
             RFB_TF / "variables" / "variables.index", RFB_TF / "variables" / "variables.data-00000-of-00001"]
    infos = [inspect_json(form, capsys) for form in forms]
    for info in infos:
        assert info["format"] == "tensorflow" and info["tensors"] == 209
        assert [e["name"] for e in info["entries"]] == [e["name"] for e in infos[0]["entries"]]
    first = infos[0]["entries"][:2]
    assert first[0] == {"name": "layer_with_weights-0.weight", "shape": [16, 3, 3, 3], "dtype": "float32"}
    assert first[1]["name"] == "layer_with_weights-1.weight"  # model order, not the index's sorted order
    meta = infos[0]["metadata"]
    assert json.loads(meta["source_names"])["layer_with_weights-0.weight"] == \
        "layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert json.loads(meta["variable_names"])["layer_with_weights-1.running_var"] == "basenet.0.1_bn/moving_variance"
    assert json.loads(meta["layer_types"])["layer_with_weights-2.weight"] == "DepthwiseConv2D"
    assert json.loads(meta["left_out"]) == {"object graph, counters and optimizer state": 1}
    assert meta["batchnorm_eps"] == "0.001"


@needs_shared
def test_tf_rfb320_mapped_by_its_table_equals_the_pytorch_checkpoint():
    tf = read_weights(resolve_source(RFB_TF))
    pth = read_weights(RFB / "models" / "pretrained" / "version-RFB-320.pth").tensors
    table = json.loads((RFB / "tf" / "mapping_tables" / "rfb_320.json").read_text())
    by_layer: dict[str, list[str]] = {}
    for name, variable in json.loads(tf.metadata["variable_names"]).items():
        by_layer.setdefault(variable.split("/")[0], []).append(name)
    compared = set()
    for entry in table:
        ours = by_layer[entry["name"]]
        assert len(ours) == len(entry["weight"]), entry["name"]
        for tf_name, torch_name in zip(ours, entry["weight"], strict=True):
            a, b = tf.tensors[tf_name], pth[torch_name]
            assert a.shape == b.shape, (tf_name, torch_name)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), (tf_name, torch_name)
            compared.add(torch_name)
    # every .pth tensor but the BatchNorm step counters (TF keeps none) was compared
    assert compared == {k for k in pth if not k.endswith("num_batches_tracked")}
    assert len(compared) == len(tf.tensors) == 209


def _table_block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in entries)
    body += struct.pack("<II", 0, 1)  # one restart point, at 0
    return body + b"\0" + struct.pack("<I", masked_crc32c(body + b"\0"))


def write_bundle(prefix: Path, variables: dict[str, tuple[int, np.ndarray]], size_fix: dict | None = None) -> None:
    """A TF1-style checkpoint (no object graph): one data block, an index block, an empty meta block."""
    msgs = tf_checkpoint._messages()
    data, entries = b"", [(b"", msgs["BundleHeaderProto"](num_shards=1).SerializeToString())]
    for name in sorted(variables):
        dtype, array = variables[name]
        raw = np.ascontiguousarray(array).tobytes()
        entry = msgs["BundleEntryProto"](dtype=dtype, shard_id=0, offset=len(data),
                                         size=(size_fix or {}).get(name, len(raw)),
                                         crc32c=masked_crc32c(raw))
        for d in array.shape:
            entry.shape.dim.add(size=d)
        entries.append((name.encode(), entry.SerializeToString()))
        data += raw
    prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(data)
    block = _table_block(entries)
    index = _table_block([(entries[-1][0], varint(0) + varint(len(block) - 5))])
    meta = _table_block([])
    footer = (varint(len(block) + len(index)) + varint(len(meta) - 5) + varint(len(block)) + varint(len(index) - 5))
    footer = footer.ljust(40, b"\0") + struct.pack("<Q", tf_checkpoint.TABLE_MAGIC)
    prefix.with_name(prefix.name + ".index").write_bytes(block + index + meta + footer)


def test_tf1_names_slots_shadows_separable_and_bfloat16(tmp_path):
    rng = np.random.default_rng(2)
    conv = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    fc = rng.normal(size=(5, 3)).astype(np.float32)
    bf16 = torch.tensor([1.5, -2.0, 0.25], dtype=torch.bfloat16)
    f32 = lambda *shape: (1, np.ones(shape, np.float32))  # noqa: E731
    prefix = tmp_path / "model.ckpt-100"
    write_bundle(prefix, {
        "net/block10/conv/weights": f32(1, 1, 4, 4), "net/block2/conv/weights": (1, conv),
        "net/block2/conv/BatchNorm/gamma": f32(4), "net/block2/conv/BatchNorm/moving_variance": f32(4),
        "net/block2/conv/BatchNorm/beta": f32(4), "net/block2/conv/BatchNorm/moving_mean": f32(4),
        "net/sep/depthwise_kernel": f32(3, 3, 4, 1), "net/sep/pointwise_kernel": f32(1, 1, 4, 8),
        "net/sep/bias": f32(8), "net/logits/weights": (1, fc), "net/logits/biases": f32(3),
        "net/emb/embeddings": (14, bf16.view(torch.int16).numpy()),
        "net/block2/conv/weights/Adam": (1, conv), "net/block2/conv/weights/Adam_1": (1, conv),
        "net/block2/conv/weights/ExponentialMovingAverage": (1, conv), "global_step": (9, np.array(100)),
    })
    wf = read_weights(resolve_source(prefix))
    assert list(wf.tensors) == [
        "net.block2.conv.weight", "net.block2.conv.BatchNorm.weight", "net.block2.conv.BatchNorm.bias",
        "net.block2.conv.BatchNorm.running_mean", "net.block2.conv.BatchNorm.running_var",
        "net.block10.conv.weight", "net.emb.embeddings", "net.logits.weight", "net.logits.bias",
        "net.sep.depthwise.weight", "net.sep.pointwise.weight", "net.sep.pointwise.bias"]
    assert wf.tensors["net.block2.conv.weight"][3, 1, 2, 0] == float(conv[2, 0, 1, 3])
    assert wf.tensors["net.logits.weight"].shape == (3, 5) and wf.tensors["net.logits.weight"][2, 4] == fc[4, 2]
    emb = wf.tensors["net.emb.embeddings"]
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, bf16)
    assert wf.tensors["net.sep.depthwise.weight"].shape == (4, 1, 3, 3)
    assert json.loads(wf.metadata["layer_types"])["net.sep.pointwise.bias"] == "SeparableConv2D"
    assert json.loads(wf.metadata["left_out"]) == {
        "optimizer slots": 2, "moving-average shadows": 1, "object graph, counters and optimizer state": 1}
    assert wf.metadata["dtype"] == "bfloat16,float32"


def test_tf_entry_whose_size_does_not_fit_its_shape_is_refused(tmp_path):
    prefix = tmp_path / "model.ckpt"
    write_bundle(prefix, {"w": (1, np.ones((2, 2), np.float32))}, size_fix={"w": 1 << 40})
    with pytest.raises(TransferKitError, match=r"'w' declares 1099511627776 bytes but shape \[2, 2\] needs 16"):
        read_weights(prefix.with_name("model.ckpt.index"))


def _copy_rfb(tmp_path: Path) -> Path:
    dest = tmp_path / "variables"
    shutil.copytree(RFB_TF / "variables", dest)
    for p in dest.iterdir():
        p.chmod(0o644)
    return dest / "variables"


@needs_shared
def test_tf_damaged_data_is_caught_by_the_crc(tmp_path):
    prefix = _copy_rfb(tmp_path)
    data = prefix.with_name("variables.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0x40  # inside the first kernel
    data.write_bytes(bytes(raw))
    with pytest.raises(TransferKitError, match=r"layer_with_weights-0/kernel.* fails its CRC check"):
        read_weights(resolve_source(prefix))
    data.write_bytes(bytes(raw[:5000]))  # truncated: tensors declared past the end
    with pytest.raises(TransferKitError, match=r"past the file's 5000 bytes"):
        read_weights(resolve_source(prefix))
    data.unlink()
    with pytest.raises(TransferKitError, match="data shard missing"):
        read_weights(resolve_source(prefix))


@needs_shared
def test_tf_index_footer_and_blocks_are_checked(tmp_path):
    prefix = _copy_rfb(tmp_path)
    index = prefix.with_name("variables.index")
    raw = index.read_bytes()
    index.write_bytes(raw[:-10])
    with pytest.raises(TransferKitError, match=r"variables.index: .*magic number missing"):
        read_weights(index)
    broken = bytearray(raw)
    broken[40] ^= 0xFF  # inside the first data block
    index.write_bytes(bytes(broken))
    with pytest.raises(TransferKitError, match=r"variables.index: .*fails its CRC check"):
        read_weights(index)


@needs_shared
@SETTINGS
@given(data=st.data())
def test_tf_mutated_index_or_data_reads_or_fails_in_one_line(tmp_path_factory, data):
    prefix = _copy_rfb(tmp_path_factory.mktemp("tf"))
    target = prefix.with_name(data.draw(st.sampled_from(["variables.index", "variables.data-00000-of-00001"])))
    raw = bytearray(target.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    target.write_bytes(bytes(raw))
    try:
        wf = read_weights(resolve_source(prefix))
    except TransferKitError as exc:
        assert "\n" not in str(exc) and "variables" in str(exc)
    else:
        assert len(wf.tensors) == 209


# --- Keras HDF5 ------------------------------------------------------------------------------------

class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D: a depthwise 3x3 then a pointwise 1x1 ('same' padding, stride 1)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TF 'same' padding: the extra pixel, when the total is odd, goes bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class MiniXception(nn.Module):
    """oarriaga/face_classification's mini_XCEPTION, modules named as the Keras layers are."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, eps=1e-3)  # noqa: E731 - Keras's epsilon
        self.conv2d_1, self.batch_normalization_1 = nn.Conv2d(1, 8, 3, bias=False), bn(8)
        self.conv2d_2, self.batch_normalization_2 = nn.Conv2d(8, 8, 3, bias=False), bn(8)
        cin = 8
        for i, c in enumerate((16, 32, 64, 128), start=1):
            setattr(self, f"conv2d_{i + 2}", nn.Conv2d(cin, c, 1, stride=2, bias=False))
            setattr(self, f"batch_normalization_{3 * i}", bn(c))
            setattr(self, f"separable_conv2d_{2 * i - 1}", SeparableConv2d(cin, c))
            setattr(self, f"batch_normalization_{3 * i + 1}", bn(c))
            setattr(self, f"separable_conv2d_{2 * i}", SeparableConv2d(c, c))
            setattr(self, f"batch_normalization_{3 * i + 2}", bn(c))
            cin = c
        self.conv2d_7 = nn.Conv2d(128, num_classes, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.batch_normalization_1(self.conv2d_1(x)))
        x = F.relu(self.batch_normalization_2(self.conv2d_2(x)))
        for i in range(1, 5):
            m = lambda name: getattr(self, name)  # noqa: E731
            residual = m(f"batch_normalization_{3 * i}")(m(f"conv2d_{i + 2}")(tf_same_pad(x, 1, 2)))
            x = F.relu(m(f"batch_normalization_{3 * i + 1}")(m(f"separable_conv2d_{2 * i - 1}")(x)))
            x = m(f"batch_normalization_{3 * i + 2}")(m(f"separable_conv2d_{2 * i}")(x))
            x = F.max_pool2d(tf_same_pad(x, 3, 2, float("-inf")), 3, 2) + residual
        return self.conv2d_7(x).mean((2, 3)).softmax(1)


@needs_shared
def test_keras_mini_xception_loads_strictly_in_pytorch_layout(capsys):
    info = inspect_json(XCEPTION, capsys)
    assert info["format"] == "keras-h5" and info["tensors"] == 80
    wf = read_weights(XCEPTION)
    model = MiniXception()
    missing = model.load_state_dict(wf.tensors, strict=False)
    # only PyTorch's BatchNorm step counters have no Keras counterpart
    assert all(k.endswith("num_batches_tracked") for k in missing.missing_keys) and not missing.unexpected_keys
    with h5py.File(XCEPTION, "r") as f:  # the same elements, read straight from the file
        g = f["model_weights"]
        kernel = g["conv2d_1/conv2d_1_1/kernel:0"][()]
        depthwise = g["separable_conv2d_3/separable_conv2d_3_1/depthwise_kernel:0"][()]
        pointwise = g["separable_conv2d_3/separable_conv2d_3_1/pointwise_kernel:0"][()]
        variance = g["batch_normalization_7/batch_normalization_7_1/moving_variance:0"][()]
        head = g["conv2d_7/conv2d_7_1/kernel:0"][()]
    sd = model.state_dict()
    assert sd["conv2d_1.weight"][5, 0, 2, 1] == float(kernel[2, 1, 0, 5])
    assert sd["separable_conv2d_3.depthwise.weight"][11, 0, 0, 2] == float(depthwise[0, 2, 11, 0])
    assert sd["separable_conv2d_3.pointwise.weight"][30, 7, 0, 0] == float(pointwise[0, 0, 7, 30])
    assert torch.equal(sd["batch_normalization_7.running_var"], torch.from_numpy(variance))
    assert sd["conv2d_7.weight"].shape == (7, 128, 3, 3) and sd["conv2d_7.weight"][6, 100, 0, 2] == head[0, 2, 100, 6]
    meta = wf.metadata
    assert meta["batchnorm_eps"] == "0.001" and "eps=0.001" in meta["batchnorm_fix"]
    assert "max_pooling2d_1" in json.loads(meta["same_padding"]) and "tf_" in meta["same_padding_fix"]
    assert json.loads(meta["left_out"]) == {"optimizer variables": 105}
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 7) and torch.allclose(out.sum(1), torch.ones(2))


@needs_shared
def test_keras_mini_xception_computes_what_keras_computed():
    """Outputs Keras produced once (tests/fixtures/make_reference_outputs.py, run with TensorFlow)."""
    ref = np.load(FIXTURES / "keras_mini_xception_reference.npz")
    x = torch.from_numpy(((ref["pixels"].astype(np.float32) / 255 - 0.5) * 2)[:, None])
    model = MiniXception()
    model.load_state_dict(read_weights(XCEPTION).tensors, strict=False)
    with torch.no_grad():
        out = model.eval()(x).numpy()
    scale = float(np.abs(ref["outputs"]).max())
    assert np.abs(out - ref["outputs"]).max() <= 1e-4 * scale
    assert (out.argmax(1) == ref["outputs"].argmax(1)).all()
    # The two fixes the metadata names are needed: PyTorch's default eps, or symmetric pooling padding, differ.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-5
    with torch.no_grad():
        assert np.abs(model(x).numpy() - ref["outputs"]).max() > 1e-4 * scale


def _weights_only_split_copy(src: Path, dest: Path, chunk: int) -> None:
    """A Keras 2 weights-only file (save_weights) with its name lists split into `layer_names0`, ... chunks,
    as Keras writes attributes too large for one HDF5 header."""
    with h5py.File(src, "r") as f, h5py.File(dest, "w") as out:
        g = f["model_weights"]
        for name in g:
            g.copy(name, out)
        layers = list(g.attrs["layer_names"])
        for i in range(0, len(layers), chunk):
            out.attrs[f"layer_names{i // chunk}"] = layers[i: i + chunk]
        names = list(out["batch_normalization_1"].attrs["weight_names"])
        del out["batch_normalization_1"].attrs["weight_names"]
        out["batch_normalization_1"].attrs["weight_names0"] = names[:3]
        out["batch_normalization_1"].attrs["weight_names1"] = names[3:]


@needs_shared
def test_keras_weights_only_file_with_split_name_attributes(tmp_path):
    dest = tmp_path / "weights.h5"
    _weights_only_split_copy(XCEPTION, dest, chunk=7)
    with h5py.File(dest, "r") as f:
        assert "layer_names" not in f.attrs and "layer_names0" in f.attrs
    ours, full = read_weights(dest), read_weights(XCEPTION)
    assert list(ours.tensors) == list(full.tensors)
    assert all(torch.equal(ours.tensors[k], full.tensors[k]) for k in full.tensors)
    assert ours.metadata["source_format"] == "keras-legacy weights"
    assert "Keras default" in ours.metadata["batchnorm_eps_source"]  # no model config in a weights file


def test_keras_nested_model_layers_are_named_through_the_inner_model(tmp_path):
    config = {"class_name": "Model", "config": {"layers": [
        {"class_name": "InputLayer", "config": {"name": "image"}},
        {"class_name": "Model", "name": "inner", "config": {"name": "inner", "layers": [
            {"class_name": "DepthwiseConv2D", "config": {"name": "dw", "padding": "same", "strides": [2, 2]}},
            {"class_name": "BatchNormalization", "config": {"name": "bn", "epsilon": 1e-5}},
            {"class_name": "Dense", "config": {"name": "fc"}}]}}]}}
    rng = np.random.default_rng(3)
    dw = rng.normal(size=(3, 3, 2, 1)).astype(np.float32)
    path = tmp_path / "nested.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [b"image", b"inner"]
        g.create_group("image").attrs["weight_names"] = np.array([], dtype="S1")
        inner = g.create_group("inner")
        names = ["dw/depthwise_kernel:0", "bn/gamma:0", "bn/beta:0", "bn/moving_mean:0", "bn/moving_variance:0",
                 "fc/kernel:0", "fc/bias:0"]
        inner.attrs["weight_names"] = [n.encode() for n in names]
        inner["dw/depthwise_kernel:0"] = dw
        for n in names[1:5]:
            inner[n] = np.ones(2, np.float32)
        inner["fc/kernel:0"] = np.ones((2, 4), np.float32)
        inner["fc/bias:0"] = np.zeros(4, np.float32)
    wf = read_weights(path)
    assert list(wf.tensors) == ["inner.dw.weight", "inner.bn.weight", "inner.bn.bias", "inner.bn.running_mean",
                                "inner.bn.running_var", "inner.fc.weight", "inner.fc.bias"]
    assert wf.tensors["inner.dw.weight"].shape == (2, 1, 3, 3) and wf.tensors["inner.fc.weight"].shape == (4, 2)
    assert wf.tensors["inner.dw.weight"][1, 0, 2, 0] == float(dw[2, 0, 1, 0])
    assert json.loads(wf.metadata["same_padding"]) == ["dw"] and wf.metadata["batchnorm_eps"] == "1e-05"


def test_keras3_weights_h5_by_position(tmp_path):
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    dense = rng.normal(size=(4, 3)).astype(np.float32)
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/conv2d/vars/0", data=kernel)
        f.create_dataset("layers/conv2d/vars/1", data=np.arange(4, dtype=np.float32))
        for i, value in enumerate((1.0, 0.0, 0.5, 2.0)):
            f.create_dataset(f"layers/batch_normalization/vars/{i}", data=np.full(4, value, np.float32))
        f.create_dataset("layers/dense/vars/0", data=dense)
        f.create_dataset("layers/dense/vars/1", data=np.zeros(3, np.float32))
        f.create_group("layers/flatten/vars")
        f.create_dataset("optimizer/vars/0", data=np.zeros(1, np.int64))
        f.create_dataset("optimizer/vars/1", data=np.zeros((4, 3), np.float32))
    wf = read_weights(path)
    assert wf.format == "keras-h5" and wf.metadata["source_format"] == "keras3 .weights.h5"
    assert {k: tuple(v.shape) for k, v in wf.tensors.items()} == {
        "batch_normalization.weight": (4,), "batch_normalization.bias": (4,),
        "batch_normalization.running_mean": (4,), "batch_normalization.running_var": (4,),
        "conv2d.weight": (4, 2, 3, 3), "conv2d.bias": (4,), "dense.weight": (3, 4), "dense.bias": (3,)}
    assert wf.tensors["batch_normalization.running_var"][0] == 2.0
    assert wf.tensors["conv2d.weight"][3, 1, 0, 2] == float(kernel[0, 2, 1, 3])
    assert wf.tensors["dense.weight"][2, 1] == float(dense[1, 2])
    assert json.loads(wf.metadata["left_out"]) == {"optimizer variables": 2}
    # the optimizer's variables are a root group beside layers/; a layer may be named "optimizer" itself
    with h5py.File(path, "a") as f:
        f.create_dataset("layers/optimizer/vars/0", data=np.ones(5, np.float32))
    wf = read_weights(path)
    assert wf.tensors["optimizer.0"].tolist() == [1.0] * 5  # a layer of no known kind: its leaf by position
    assert json.loads(wf.metadata["left_out"]) == {"optimizer variables": 2}


def test_keras_links_to_other_data_are_refused(tmp_path):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f.create_dataset("secret", data=np.ones((2, 3), np.float32))
    for kind in ("external", "soft"):
        path = tmp_path / f"{kind}.h5"
        with h5py.File(path, "w") as f:
            f.attrs["layer_names"] = [b"dense"]
            g = f.create_group("dense")
            g.attrs["weight_names"] = [b"dense/kernel:0"]
            g.create_group("inner").create_dataset("kernel", data=np.ones((2, 3), np.float32))
            g["dense/kernel:0"] = (h5py.ExternalLink(str(outside), "secret") if kind == "external"
                                   else h5py.SoftLink("/dense/inner/kernel"))
        with pytest.raises(TransferKitError, match=rf"{kind}.h5: /dense/dense/kernel:0 is a \w+Link; refusing links"):
            read_weights(path)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.ones(6, np.float32).tobytes())
    path = tmp_path / "extstore.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"kernel:0"]
        g.create_dataset("kernel:0", shape=(2, 3), dtype=np.float32, external=[(str(raw), 0, 24)])
    with pytest.raises(TransferKitError, match=r"extstore.h5: /dense/kernel:0 keeps its data in other files"):
        read_weights(path)


def test_keras_damaged_and_foreign_hdf5_files_fail_in_one_line(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(TransferKitError, match=r"plain.h5: an HDF5 file without Keras weights"):
        read_weights(plain)
    liar = tmp_path / "liar.h5"
    with h5py.File(liar, "w") as f:
        f.attrs["layer_names"] = [b"dense", b"ghost"]
        f.create_group("dense").attrs["weight_names"] = [b"dense/kernel:0"]
        f["dense"].create_dataset("dense/kernel:0", data=np.ones((2, 3), np.float32))
    with pytest.raises(TransferKitError, match=r"liar.h5: layer 'ghost' is listed in layer_names but has no group"):
        read_weights(liar)
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(plain.read_bytes()[:900])
    with pytest.raises(TransferKitError, match="cut.h5"):
        read_weights(truncated)


@needs_shared
@SETTINGS
@given(data=st.data())
def test_keras_mutated_file_reads_or_fails_in_one_line(tmp_path_factory, data):
    raw = bytearray(XCEPTION.read_bytes())
    # the first 64 KiB hold the HDF5 superblock, object headers and the layer/weight name attributes
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, 65535))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("keras") / "model.hdf5"
    path.write_bytes(bytes(raw))
    try:
        wf = read_weights(path)
    except TransferKitError as exc:
        assert "\n" not in str(exc) and "model.hdf5" in str(exc)
    else:
        assert wf.tensors


# --- layouts, element by element --------------------------------------------------------------------

@pytest.mark.parametrize(("leaf", "shape", "layer_type", "expected"), [
    # (H=1, W=2, in=2, out=3): element (0, w, i, o) holds 6w + 3i + o
    ("kernel", (1, 2, 2, 3), None, ("weight", [[[[0, 6]], [[3, 9]]], [[[1, 7]], [[4, 10]]], [[[2, 8]], [[5, 11]]]],
                                    "HWIO -> OIHW", "Conv2D")),
    ("weights", (1, 2, 2, 3), "MyConv", ("weight", [[[[0, 6]], [[3, 9]]], [[[1, 7]], [[4, 10]]],
                                                    [[[2, 8]], [[5, 11]]]], "HWIO -> OIHW", "MyConv")),
    ("pointwise_kernel", (1, 1, 2, 2), None, ("weight", [[[[0]], [[2]]], [[[1]], [[3]]]], "HWIO -> OIHW", "Conv2D")),
    ("pointwise_weights", (1, 1, 2, 2), None, ("weight", [[[[0]], [[2]]], [[[1]], [[3]]]], "HWIO -> OIHW", "Conv2D")),
    ("kernel", (1, 1, 2, 2), "Conv2DTranspose", ("weight", [[[[0]], [[2]]], [[[1]], [[3]]]], "HWOI -> IOHW",
                                                 "Conv2DTranspose")),
    # depthwise (H=1, W=2, in=2, mult=2): element (0, w, c, m) holds 4w + 2c + m, PyTorch channel c*2+m
    ("depthwise_kernel", (1, 2, 2, 2), None, ("weight", [[[[0, 4]]], [[[1, 5]]], [[[2, 6]]], [[[3, 7]]]],
                                              "depthwise HWIM -> (I*M)1HW", "DepthwiseConv2D")),
    ("depthwise_weights", (1, 2, 2, 2), None, ("weight", [[[[0, 4]]], [[[1, 5]]], [[[2, 6]]], [[[3, 7]]]],
                                               "depthwise HWIM -> (I*M)1HW", "DepthwiseConv2D")),
    ("kernel", (1, 2, 2, 2), "DepthwiseConv2D", ("weight", [[[[0, 4]]], [[[1, 5]]], [[[2, 6]]], [[[3, 7]]]],
                                                 "depthwise HWIM -> (I*M)1HW", "DepthwiseConv2D")),
    ("weights", (1, 2, 2, 2), "depthwiseconv", ("weight", [[[[0, 4]]], [[[1, 5]]], [[[2, 6]]], [[[3, 7]]]],
                                                "depthwise HWIM -> (I*M)1HW", "depthwiseconv")),
    ("depthwise_kernel", (2, 2), None, ("depthwise_kernel", [[0, 1], [2, 3]], "unchanged", "unknown")),
    ("kernel", (2, 3), None, ("weight", [[0, 3], [1, 4], [2, 5]], "dense (in,out) -> (out,in)", "Dense")),
    ("kernel", (2, 3), "Head", ("weight", [[0, 3], [1, 4], [2, 5]], "dense (in,out) -> (out,in)", "Head")),
    ("kernel", (2, 2), "DepthwiseConv2D", ("weight", [[0, 2], [1, 3]], "dense (in,out) -> (out,in)",
                                           "DepthwiseConv2D")),
    # Conv1D (W=2, in=1, out=2): element (w, 0, o) holds 2w + o
    ("kernel", (2, 1, 2), None, ("weight", [[[0, 2]], [[1, 3]]], "WIO -> OIW", "Conv1D")),
    ("kernel", (2, 1, 2), "C1", ("weight", [[[0, 2]], [[1, 3]]], "WIO -> OIW", "C1")),
    ("kernel", (1, 1, 2, 1, 2), None, ("weight", [[[[[0, 2]]]], [[[[1, 3]]]]], "DHWIO -> OIDHW", "Conv3D")),
    ("kernel", (1, 1, 2, 1, 2), "C3", ("weight", [[[[[0, 2]]]], [[[[1, 3]]]]], "DHWIO -> OIDHW", "C3")),
    ("kernel", (3,), None, ("kernel", [0, 1, 2], "unchanged", "unknown")),
    ("kernel", (1, 1, 1, 1, 1, 2), None, ("kernel", [[[[[[0, 1]]]]]], "unchanged", "unknown")),
    ("embeddings", (2, 2), None, ("embeddings", [[0, 1], [2, 3]], "unchanged", "unknown")),
    ("embeddings", (2,), "Embedding", ("embeddings", [0, 1], "unchanged", "Embedding")),
    ("bias", (2,), None, ("bias", [0, 1], "unchanged", "bias")),
    ("biases", (2,), None, ("bias", [0, 1], "unchanged", "bias")),
    ("bias", (2,), "Dense", ("bias", [0, 1], "unchanged", "Dense")),
    ("gamma", (2,), None, ("weight", [0, 1], "gamma -> weight", "BatchNorm")),
    ("beta", (2,), "Dense", ("bias", [0, 1], "beta -> bias", "BatchNorm")),
    ("moving_mean", (2,), None, ("running_mean", [0, 1], "moving_mean -> running_mean", "BatchNorm")),
    ("moving_variance", (2,), None, ("running_var", [0, 1], "moving_variance -> running_var", "BatchNorm")),
])
def test_layout_conversion_of_each_leaf_and_rank(leaf, shape, layer_type, expected):
    """Every conversion puts each element where PyTorch expects it, names itself and the layer type,
    and hands back a C-contiguous array."""
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    pt_leaf, out, how, kind = convert(leaf, array, layer_type)
    assert (pt_leaf, out.tolist(), how, kind) == expected
    assert out.flags.c_contiguous and out.dtype == np.float32


# --- TensorFlow checkpoints written field by field -----------------------------------------------------
# These fixtures are built with protowire, not with the reader's own message classes, so a wrong field
# number in the reader cannot hide behind the same mistake in the writer.

def _fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value)


def _wire_entry(dtype: int, shape, offset: int, size: int, crc: int, shard: int = 0, slices: int = 0,
                unknown_rank: bool = False) -> bytes:
    dims = b"".join(field(2, field(1, d) + field(2, "d")) for d in shape) + (field(3, 1) if unknown_rank else b"")
    out = field(1, dtype) + field(2, dims) + field(3, shard) + field(4, offset) + field(5, size) + _fixed32(6, crc)
    return out + b"".join(field(7, field(1, b"\x01\x02")) for _ in range(slices))


def _prefixed_block(entries: list[tuple[bytes, bytes]], kind: int = 0) -> bytes:
    """A table block whose keys share their prefixes with the key before, as LevelDB writes them."""
    body, last = b"", b""
    for key, value in entries:
        shared = 0
        while shared < min(len(key), len(last)) and key[shared] == last[shared]:
            shared += 1
        body += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        last = key
    body += struct.pack("<II", 0, 1)
    return body + bytes([kind]) + struct.pack("<I", masked_crc32c(body + bytes([kind])))


def _sstable(entries: list[tuple[bytes, bytes]], per_block: int = 2) -> bytes:
    """The whole `.index` file: data blocks of `per_block` entries, an index block, an empty meta block, footer."""
    out, handles = b"", []
    for i in range(0, len(entries), per_block):
        block = _prefixed_block(entries[i: i + per_block])
        handles.append((entries[i: i + per_block][-1][0], varint(len(out)) + varint(len(block) - 5)))
        out += block
    index = _prefixed_block(handles)
    meta = _prefixed_block([])
    footer = varint(len(out) + len(index)) + varint(len(meta) - 5) + varint(len(out)) + varint(len(index) - 5)
    return out + index + meta + footer.ljust(40, b"\0") + struct.pack("<Q", tf_checkpoint.TABLE_MAGIC)


def _graph(nodes: list[tuple[list[tuple[int, str]], list[tuple[str, str]]]]) -> bytes:
    """A TrackableObjectGraph: per node its (child id, local name) references and (full name, key) tensors."""
    out = b""
    for children, attributes in nodes:
        node = b"".join(field(1, field(1, cid) + field(2, local)) for cid, local in children)
        node += b"".join(field(2, field(1, "VARIABLE_VALUE") + field(2, full) + field(3, key))
                         for full, key in attributes)
        out += field(1, node)
    return out


def write_checkpoint(prefix: Path, variables: dict, graph: bytes | None = None, header: bytes | None = None,
                     shards: int = 1, per_block: int = 2) -> None:
    """A checkpoint bundle: `variables` maps a key to (dtype, array) or (dtype, array, shard)."""
    data = [b""] * shards
    entries = [(b"", header if header is not None else field(1, shards) + field(3, field(1, 1) + field(2, 0)))]
    if graph is not None:
        blob = varint(len(graph)) + struct.pack("<I", masked_crc32c(struct.pack("<I", len(graph)))) + graph
        crc = masked_crc32c(struct.pack("<I", len(graph)) + blob[len(varint(len(graph))):])
        variables = {**variables, "_CHECKPOINTABLE_OBJECT_GRAPH": (7, blob)}
    for key in sorted(variables):
        dtype, array, shard = (*variables[key], 0)[:3]
        raw = array if isinstance(array, bytes) else np.ascontiguousarray(array).tobytes()
        shape = () if isinstance(array, bytes) else array.shape
        entry_crc = crc if key == "_CHECKPOINTABLE_OBJECT_GRAPH" else masked_crc32c(raw)
        entries.append((key.encode(), _wire_entry(dtype, shape, len(data[shard]), len(raw), entry_crc, shard)))
        data[shard] += raw
    for i, raw in enumerate(data):
        prefix.with_name(f"{prefix.name}.data-{i:05d}-of-{shards:05d}").write_bytes(raw)
    prefix.with_name(prefix.name + ".index").write_bytes(_sstable(entries, per_block))


V = "/.ATTRIBUTES/VARIABLE_VALUE"


def test_tf2_checkpoint_in_object_graph_order_with_names_types_and_values(tmp_path):
    """A TF2 checkpoint: tensors in the object graph's depth-first order (children as listed, cycles and
    unknown ids ignored), the rest after it in natural order; keys dotted and renamed, every value,
    dtype, source key, variable name, layer type, conversion and left-out count recorded."""
    conv = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
    sep_dw = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    sep_pw = np.arange(8, dtype=np.float32).reshape(1, 1, 4, 2)
    f64 = np.array([0.5, -1.0])
    variables = {
        f"layer_with_weights-0/kernel{V}": (1, conv), f"layer_with_weights-0/bias{V}": (1, np.array([1, 2, 3], "<f4")),
        f"layer_with_weights-1/gamma{V}": (1, np.array([1.0, 2.0], "<f4")),
        f"layer_with_weights-1/beta{V}": (1, np.array([3.0, 4.0], "<f4")),
        f"layer_with_weights-1/moving_mean{V}": (2, f64),
        f"layer_with_weights-1/moving_variance{V}": (1, np.array([5.0, 6.0], "<f4")),
        f"layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m{V}": (1, conv),
        f"layer_with_weights-0/bias/.OPTIMIZER_SLOT/optimizer/v{V}": (1, np.zeros(3, "<f4")),
        f"save_counter{V}": (9, np.array(3, "<i8")), f"optimizer/iter{V}": (9, np.array(7, "<i8")),
        f"b10/depthwise_kernel{V}": (1, sep_dw), f"b10/pointwise_kernel{V}": (1, sep_pw),
        f"b2/step{V}": (3, np.array([9, -9], "<i4")), f"b2/flags{V}": (10, np.array([True, False])),
        f"b2/labels{V}": (7, b"ab"),
        f"layer_with_weights-2/kernel{V}": (19, np.array([[1.5], [-2.0]], "<f2")),
        f"layer_with_weights-2/bias{V}": (5, np.array([-3], "<i2")),
    }
    graph = _graph([
        ([(2, "layer_with_weights-1"), (1, "layer_with_weights-0"), (9, "ghost"), (3, "layer_with_weights-2")], []),
        ([(0, "root"), (2, "again")], [("conv1/kernel", f"layer_with_weights-0/kernel{V}"),
                                       ("conv1/bias", f"layer_with_weights-0/bias{V}")]),
        ([], [("bn/beta", f"layer_with_weights-1/beta{V}"), ("bn/gamma", f"layer_with_weights-1/gamma{V}"),
              ("bn/moving_variance", f"layer_with_weights-1/moving_variance{V}"),
              ("bn/moving_mean", f"layer_with_weights-1/moving_mean{V}")]),
        ([], [("head/bias", f"layer_with_weights-2/bias{V}"), ("head/kernel", f"layer_with_weights-2/kernel{V}")]),
    ])
    prefix = tmp_path / "ckpt-7"
    write_checkpoint(prefix, variables, graph=graph, per_block=3)
    wf = tf_checkpoint.read(prefix)
    assert wf.format == "tensorflow" and wf.path == tmp_path / "ckpt-7.index"
    assert list(wf.tensors) == [
        "layer_with_weights-1.bias", "layer_with_weights-1.weight", "layer_with_weights-1.running_var",
        "layer_with_weights-1.running_mean", "layer_with_weights-0.weight", "layer_with_weights-0.bias",
        "layer_with_weights-2.bias", "layer_with_weights-2.weight",
        "b2.flags", "b2.step", "b10.depthwise.weight", "b10.pointwise.weight"]
    t = wf.tensors
    assert t["layer_with_weights-0.weight"].tolist() == [[[[0, 6]], [[3, 9]]], [[[1, 7]], [[4, 10]]],
                                                         [[[2, 8]], [[5, 11]]]]
    assert t["layer_with_weights-0.bias"].tolist() == [1, 2, 3]
    assert t["layer_with_weights-1.weight"].tolist() == [1, 2] and t["layer_with_weights-1.bias"].tolist() == [3, 4]
    assert t["layer_with_weights-1.running_mean"].dtype == torch.float64
    assert t["layer_with_weights-1.running_mean"].tolist() == [0.5, -1.0]
    assert t["layer_with_weights-1.running_var"].tolist() == [5, 6]
    assert t["layer_with_weights-2.weight"].dtype == torch.float16
    assert t["layer_with_weights-2.weight"].tolist() == [[1.5, -2.0]]
    assert t["layer_with_weights-2.bias"].dtype == torch.int16 and t["layer_with_weights-2.bias"].tolist() == [-3]
    assert t["b2.step"].dtype == torch.int32 and t["b2.step"].tolist() == [9, -9]
    assert t["b2.flags"].dtype == torch.bool and t["b2.flags"].tolist() == [True, False]
    assert t["b10.depthwise.weight"].tolist() == [[[[0]]], [[[1]]], [[[2]]], [[[3]]]]
    assert t["b10.pointwise.weight"].tolist() == [[[[0]], [[2]], [[4]], [[6]]], [[[1]], [[3]], [[5]], [[7]]]]
    meta = wf.metadata
    assert meta["source_format"] == "tensorflow-bundle"
    assert meta["dtype"] == "bool,float16,float32,float64,int16,int32"
    assert json.loads(meta["source_names"])["layer_with_weights-1.running_mean"] == \
        f"layer_with_weights-1/moving_mean{V}"
    assert json.loads(meta["source_names"])["b10.pointwise.weight"] == f"b10/pointwise_kernel{V}"
    assert json.loads(meta["variable_names"]) == {
        "layer_with_weights-1.bias": "bn/beta", "layer_with_weights-1.weight": "bn/gamma",
        "layer_with_weights-1.running_var": "bn/moving_variance", "layer_with_weights-1.running_mean": "bn/moving_mean",
        "layer_with_weights-0.weight": "conv1/kernel", "layer_with_weights-0.bias": "conv1/bias",
        "layer_with_weights-2.bias": "head/bias", "layer_with_weights-2.weight": "head/kernel"}
    assert json.loads(meta["layer_types"]) == {
        "layer_with_weights-1.bias": "BatchNorm", "layer_with_weights-1.weight": "BatchNorm",
        "layer_with_weights-1.running_var": "BatchNorm", "layer_with_weights-1.running_mean": "BatchNorm",
        "layer_with_weights-0.weight": "Conv2D", "layer_with_weights-0.bias": "bias",
        "layer_with_weights-2.bias": "bias", "layer_with_weights-2.weight": "Dense", "b2.step": "unknown",
        "b2.flags": "unknown", "b10.depthwise.weight": "SeparableConv2D", "b10.pointwise.weight": "SeparableConv2D"}
    assert json.loads(meta["converted"])["layer_with_weights-1.running_var"] == "moving_variance -> running_var"
    assert json.loads(meta["converted"])["b10.depthwise.weight"] == "depthwise HWIM -> (I*M)1HW"
    assert json.loads(meta["left_out"]) == {"optimizer slots": 2, "object graph, counters and optimizer state": 3,
                                            "non-numeric variables": 1}
    assert meta["batchnorm_eps"] == "0.001"
    assert meta["batchnorm_eps_source"] == "TF/Keras default (a checkpoint does not record it)"
    assert meta["batchnorm_fix"] == ("set eps=0.001 on the PyTorch BatchNorm modules unless the model was built "
                                     "with another (PyTorch's default is 1e-5)")
    assert meta["padding_note"] == (
        "a checkpoint does not record padding: TF 'SAME' with stride > 1 pads bottom/right more than PyTorch; "
        "use timm's tf_ variants (Conv2dSame) or pad explicitly")
    assert set(meta) == {"source_format", "dtype", "source_names", "layer_types", "converted", "left_out",
                         "variable_names", "batchnorm_eps", "batchnorm_eps_source", "batchnorm_fix", "padding_note"}


def _index_error(tmp_path: Path, raw: bytes) -> str:
    index = tmp_path / "m.index"
    index.write_bytes(raw)
    with pytest.raises(TransferKitError) as caught:
        tf_checkpoint.read(index)
    return str(caught.value)


def _footer(meta: tuple[int, int], index: tuple[int, int]) -> bytes:
    raw = varint(meta[0]) + varint(meta[1]) + varint(index[0]) + varint(index[1])
    return raw.ljust(40, b"\0") + struct.pack("<Q", tf_checkpoint.TABLE_MAGIC)


def test_tf_damaged_index_tables_fail_in_one_line_naming_the_fault(tmp_path):
    """Each kind of damage to the `.index` table is named in one line with the file and the way out."""
    where = f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint index"
    tail = "; re-export the checkpoint"
    magic = struct.pack("<Q", tf_checkpoint.TABLE_MAGIC)
    assert _index_error(tmp_path, magic * 5) == \
        f"{where} (no table footer (magic number missing): not a TensorFlow .index file, or truncated){tail}"
    assert _index_error(tmp_path, b"\0" * 48) == \
        f"{where} (no table footer (magic number missing): not a TensorFlow .index file, or truncated){tail}"
    assert _index_error(tmp_path, b"\xff" * 40 + magic) == f"{where} (bad varint in footer){tail}"
    good = _prefixed_block([(b"", field(1, 1))])  # 13 bytes + 5
    assert _index_error(tmp_path, good + _footer((0, 0), (0, 62))) == \
        f"{where} (index block at 0+62 lies outside the 66-byte file){tail}"
    assert _index_error(tmp_path, good + _footer((0, 0), (0, 61))) == \
        f"{where} (index block at 0 fails its CRC check){tail}"  # the trailer's last byte is the file's last
    assert _index_error(tmp_path, good + _footer((0, 0), (0, 3))) == \
        f"{where} (index block at 0+3 lies outside the 66-byte file){tail}"
    assert _index_error(tmp_path, good + _footer((0, 0), (50, 13))) == \
        f"{where} (index block at 50+13 lies outside the 66-byte file){tail}"
    four = _raw_block(struct.pack("<I", 0))  # a four-byte block is allowed in, then its restart count is wrong
    assert _index_error(tmp_path, four + _footer((0, 0), (0, 4))) == \
        f"{where} (index block has a bad restart count (0)){tail}"
    broken = bytearray(good)
    broken[2] ^= 1
    assert _index_error(tmp_path, bytes(broken) + _footer((0, 0), (0, 13))) == \
        f"{where} (index block at 0 fails its CRC check){tail}"
    squeezed = _prefixed_block([(b"", field(1, 1))], kind=1)
    assert _index_error(tmp_path, squeezed + _footer((0, 0), (0, 13))) == \
        f"{where} (index block at 0 is compressed (type 1); only uncompressed tables are read){tail}"


def _raw_block(body: bytes) -> bytes:
    return body + b"\0" + struct.pack("<I", masked_crc32c(body + b"\0"))


def test_tf_damaged_table_blocks_and_handles_fail_in_one_line(tmp_path):
    """Bad restart counts, entries past a block's end and cut-off varints in block handles are named."""
    where = f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint index"
    tail = "; re-export the checkpoint"

    def with_index(body: bytes) -> bytes:
        block = _raw_block(body)
        return block + _footer((0, 0), (0, len(block) - 5))

    entry = varint(0) + varint(1) + varint(1) + b"ab"
    assert _index_error(tmp_path, with_index(entry + struct.pack("<I", 0))) == \
        f"{where} (index block has a bad restart count (0)){tail}"
    assert _index_error(tmp_path, with_index(entry + struct.pack("<II", 0, 3))) == \
        f"{where} (index block has a bad restart count (3)){tail}"
    assert _index_error(tmp_path, with_index(varint(0) + varint(1) + varint(3) + b"ab" + struct.pack("<II", 0, 1))) \
        == f"{where} (index block has an entry running past its end){tail}"
    assert _index_error(tmp_path, with_index(varint(1) + varint(1) + varint(1) + b"ab" + struct.pack("<II", 0, 1))) \
        == f"{where} (index block has an entry running past its end){tail}"
    assert _index_error(tmp_path, with_index(b"\x80" + struct.pack("<II", 0, 1))) == \
        f"{where} (bad varint in index){tail}"
    cut = varint(0) + varint(1) + varint(1) + b"k" + b"\x80"  # a handle whose offset varint is cut off
    assert _index_error(tmp_path, with_index(cut + struct.pack("<II", 0, 1))) == \
        f"{where} (bad varint in block handle){tail}"
    cut = varint(0) + varint(1) + varint(1) + b"k" + b"\x00"  # an offset and no size
    assert _index_error(tmp_path, with_index(cut + struct.pack("<II", 0, 1))) == \
        f"{where} (bad varint in block handle){tail}"
    data = _prefixed_block([(b"x", field(1, 1))])
    index = _prefixed_block([(b"x", varint(0) + varint(len(data) - 5))])
    assert _index_error(tmp_path, data + index + _footer((0, 0), (len(data), len(index) - 5))) == \
        f"{where} (the bundle header entry is missing){tail}"
    index = _prefixed_block([])
    assert _index_error(tmp_path, index + _footer((0, 0), (0, len(index) - 5))) == \
        f"{where} (the bundle header entry is missing){tail}"


def test_tf_table_varints_of_ten_bytes_are_read(tmp_path):
    """A footer varint may take ten bytes (a padded 64-bit value); the table is still read."""
    prefix = tmp_path / "m"
    write_checkpoint(prefix, {"w": (1, np.array([2.5], "<f4")), "x" * 16400: (1, np.array([1.0], "<f4"))})
    raw = (tmp_path / "m.index").read_bytes()
    footer = raw[-48:]
    _, pos = tf_checkpoint._varint(footer, 0, 40, "t")
    padded = b"\x80" * 9 + b"\x00" + footer[pos:40]  # the meta offset, 0, in ten bytes
    (tmp_path / "m.index").write_bytes(raw[:-48] + padded[:40].ljust(40, b"\0") + raw[-8:])
    wf = tf_checkpoint.read(prefix)
    assert wf.tensors["w"].tolist() == [2.5] and wf.tensors["x" * 16400].tolist() == [1.0]  # a 3-byte key length


def test_tf_header_and_entries_that_are_not_protobuf_or_big_endian_are_refused(tmp_path):
    """A broken message, a big-endian header and a checkpoint without numbers each fail in one line."""
    where = f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint index"
    prefix = tmp_path / "m"
    write_checkpoint(prefix, {"w": (1, np.ones(1, "<f4"))}, header=field(1, 1) + b"\x0a\x05ab")
    with pytest.raises(TransferKitError, match=re.escape(f"{where} (an entry is not a valid protobuf message (")):
        tf_checkpoint.read(prefix)
    write_checkpoint(prefix, {"w": (1, np.ones(1, "<f4"))}, header=field(1, 1) + field(2, 1))
    with pytest.raises(TransferKitError) as caught:
        tf_checkpoint.read(prefix)
    assert str(caught.value) == \
        f"{tmp_path / 'm.index'}: a big-endian checkpoint; re-save it on a little-endian machine"
    write_checkpoint(prefix, {"names": (7, b"abc"), "global_step": (9, np.array(1, "<i8"))})
    with pytest.raises(TransferKitError) as caught:
        tf_checkpoint.read(prefix)
    assert str(caught.value) == f"{tmp_path / 'm.index'}: the checkpoint holds no numeric variables"
    (tmp_path / "d.index").mkdir()
    with pytest.raises(TransferKitError) as caught:
        tf_checkpoint.read(tmp_path / "d.index")
    assert str(caught.value) == f"cannot read TensorFlow checkpoint {tmp_path / 'd.index'}: Is a directory"


def _one_entry(prefix: Path, entry: bytes, data: bytes, shards: int = 1) -> None:
    header = field(1, shards)
    prefix.with_name(prefix.name + ".index").write_bytes(_sstable([(b"", header), (b"w", entry)]))
    prefix.with_name(f"{prefix.name}.data-00000-of-{shards:05d}").write_bytes(data)


def _read_error(prefix: Path) -> str:
    with pytest.raises(TransferKitError) as caught:
        tf_checkpoint.read(prefix)
    return str(caught.value)


def test_tf_damaged_variables_fail_in_one_line_naming_file_and_variable(tmp_path):
    """Sliced, shapeless, mis-sized, mis-placed and corrupted variables are each refused by name."""
    prefix = tmp_path / "m"
    raw = np.array([1.0, 2.0], "<f4").tobytes()
    crc = masked_crc32c(raw)
    _one_entry(prefix, _wire_entry(1, (2,), 0, 8, crc, slices=1), raw)
    assert _read_error(prefix) == (f"{prefix}: variable 'w' is partitioned into slices; re-save the checkpoint "
                                   "without partitioned variables")
    _one_entry(prefix, _wire_entry(1, (), 0, 8, crc, unknown_rank=True), raw)
    assert _read_error(prefix) == f"{prefix}: variable 'w' has an unknown or negative shape []"
    _one_entry(prefix, _wire_entry(1, (2, -1), 0, 8, crc), raw)
    assert _read_error(prefix) == f"{prefix}: variable 'w' has an unknown or negative shape [2, -1]"
    _one_entry(prefix, _wire_entry(1, (3,), 0, 8, crc), raw)
    assert _read_error(prefix) == (f"{prefix}: variable 'w' declares 8 bytes but shape [3] needs 12; "
                                   "the checkpoint is damaged")
    _one_entry(prefix, _wire_entry(1, (2,), 0, 8, crc ^ 1), raw)
    assert _read_error(prefix) == f"{prefix}: variable 'w' fails its CRC check; the data file is damaged"
    _one_entry(prefix, _wire_entry(1, (2,), 0, 8, crc, shard=1), raw)
    assert _read_error(prefix) == (f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint index ('w' names data "
                                   "shard 1, but the header says 1); re-export the checkpoint")
    _one_entry(prefix, _wire_entry(1, (2,), 0, 8, crc, shard=-1), raw)
    assert "('w' names data shard -1, but the header says 1)" in _read_error(prefix)
    _one_entry(prefix, _wire_entry(1, (2,), 4, 8, crc), raw)
    shard = tmp_path / "m.data-00000-of-00001"
    assert _read_error(prefix) == (f"{shard}: 'w' is declared at bytes 4..12, past the file's 8 bytes; "
                                   "the checkpoint is truncated or damaged")
    _one_entry(prefix, _wire_entry(1, (2,), -4, 8, crc), raw)
    assert _read_error(prefix) == (f"{shard}: 'w' is declared at bytes -4..4, past the file's 8 bytes; "
                                   "the checkpoint is truncated or damaged")
    _one_entry(prefix, _wire_entry(1, (2,), 0, 8, crc), b"")
    assert _read_error(prefix) == (f"{shard}: 'w' is declared at bytes 0..8, past the file's 0 bytes; "
                                   "the checkpoint is truncated or damaged")
    shard.unlink()
    assert _read_error(prefix) == (f"{shard}: data shard missing; the checkpoint needs every .data-* file "
                                   "beside its .index")
    _one_entry(prefix, _wire_entry(1, (0, 3), 0, 0, masked_crc32c(b"")), b"")  # an empty tensor, an empty shard
    assert tf_checkpoint.read(prefix).tensors["w"].shape == (0, 3)


def test_tf_variables_across_shards_are_read_from_their_own_file(tmp_path):
    """With two shards each variable is read from the `.data-0000N-of-00002` file its entry names."""
    prefix = tmp_path / "m"
    write_checkpoint(prefix, {"a/kernel": (1, np.array([[1.0, 2.0]], "<f4"), 1),
                              "a/bias": (1, np.array([3.0, 4.0], "<f4"), 0),
                              "b/kernel": (1, np.array([[5.0, 6.0]], "<f4"), 1)}, shards=2, per_block=1)
    assert (tmp_path / "m.data-00001-of-00002").stat().st_size == 16
    wf = tf_checkpoint.read(prefix)
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {
        "a.weight": [[1.0], [2.0]], "a.bias": [3.0, 4.0], "b.weight": [[5.0], [6.0]]}
    assert list(wf.tensors) == ["a.weight", "a.bias", "b.weight"]


def _graph_checkpoint(prefix: Path, blob: bytes, crc: int, dtype: int = 7) -> None:
    w = np.array([1.0], "<f4").tobytes()
    prefix.with_name(prefix.name + ".index").write_bytes(_sstable([
        (b"", field(1, 1)), (b"_CHECKPOINTABLE_OBJECT_GRAPH", _wire_entry(dtype, (), 4, len(blob), crc)),
        (b"b/w", _wire_entry(1, (1,), 0, 4, masked_crc32c(w))),
        (b"a/w", _wire_entry(1, (1,), 0, 4, masked_crc32c(w)))]))
    prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(w + blob)


def test_tf_object_graph_damage_is_named_and_a_non_string_graph_ignored(tmp_path):
    """A short, corrupted or non-protobuf object graph fails in one line; a graph entry that is not a
    string tensor, or has no nodes, leaves the names' natural order and records no variable names."""
    prefix = tmp_path / "m"
    graph = _graph([([], [("v/w", "b/w")])])
    blob = varint(len(graph)) + b"\0\0\0\0" + graph
    crc = masked_crc32c(struct.pack("<I", len(graph)) + b"\0\0\0\0" + graph)
    _graph_checkpoint(prefix, blob, crc)
    wf = tf_checkpoint.read(prefix)
    assert list(wf.tensors) == ["b.w", "a.w"] and json.loads(wf.metadata["variable_names"]) == {"b.w": "v/w"}
    _graph_checkpoint(prefix, blob, crc ^ 1)
    assert _read_error(prefix) == f"{prefix}: the object graph fails its CRC check; the data file is damaged"
    _graph_checkpoint(prefix, varint(len(graph) + 1) + b"\0\0\0\0" + graph,
                      masked_crc32c(struct.pack("<I", len(graph) + 1) + b"\0\0\0\0" + graph))
    assert _read_error(prefix) == (f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint index (the object graph "
                                   "is shorter than its declared length); re-export the checkpoint")
    _graph_checkpoint(prefix, b"\x80", 0)
    assert "(bad varint in object graph)" in _read_error(prefix)
    bad = b"\x0a\x09ab"
    _graph_checkpoint(prefix, varint(len(bad)) + b"\0\0\0\0" + bad,
                      masked_crc32c(struct.pack("<I", len(bad)) + b"\0\0\0\0" + bad))
    assert _read_error(prefix).startswith(f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint index (the "
                                          "object graph is not a valid protobuf message (")
    _graph_checkpoint(prefix, blob, crc, dtype=1)
    wf = tf_checkpoint.read(prefix)
    assert list(wf.tensors) == ["a.w", "b.w"] and "variable_names" not in wf.metadata
    assert json.loads(wf.metadata["left_out"]) == {"object graph, counters and optimizer state": 1}
    _graph_checkpoint(prefix, varint(0) + b"\0\0\0\0", masked_crc32c(struct.pack("<I", 0) + b"\0\0\0\0"))
    wf = tf_checkpoint.read(prefix)
    assert list(wf.tensors) == ["a.w", "b.w"] and "variable_names" not in wf.metadata
    assert "batchnorm_eps" not in wf.metadata and json.loads(wf.metadata["layer_types"]) == {
        "a.w": "unknown", "b.w": "unknown"}


def test_tf1_left_out_names_natural_order_and_name_clashes(tmp_path):
    """Optimizer slots of every TF1 optimizer, moving-average shadows and private or counter variables are
    counted, not kept; `block10` sorts after `block9`; a second `x/weights` beside `x/kernel` keeps its name."""
    one, mat = (1, np.array([1.0], "<f4")), (1, np.ones((1, 1), "<f4"))
    prefix = tmp_path / "m"
    write_checkpoint(prefix, {
        "n/block10/kernel": mat, "n/block9/kernel": mat, "n/block9/Adamx": one, "n/block9/weights": mat,
        "n/block9/bias": one, "n/a/Momentum": one, "n/a/RMSProp": one, "n/a/RMSProp_1": one, "n/a/Adagrad": one,
        "n/a/Ftrl": one, "n/a/Ftrl_3": one, "n/a/AdamW": one, "n/a/AdamW_1": one, "n/a/Adam": one,
        "n/a/Adam_12": one, "n/a/w/ExponentialMovingAverage": one, "_hidden/w": one, "global_step": one,
        "save_counter": one, "optimizer/iter": one, "opt/x.OPTIMIZER_SLOT": one, "n/c/gamma": one})
    wf = tf_checkpoint.read(prefix)
    assert list(wf.tensors) == ["n.block9.weight", "n.block9.weights", "n.block9.bias", "n.block9.Adamx",
                                "n.block10.weight", "n.c.weight"]
    assert json.loads(wf.metadata["left_out"]) == {
        "optimizer slots": 11, "moving-average shadows": 1, "object graph, counters and optimizer state": 4}
    assert json.loads(wf.metadata["source_names"])["n.block9.weights"] == "n/block9/weights"


def test_tf_checkpoint_index_from_each_form_of_source(tmp_path):
    """A prefix, its `.index`, a data shard, `variables/`, a SavedModel folder or a folder with one index
    all name the same index; a folder with several refuses to guess and lists the first six."""
    saved = tmp_path / "saved"
    (saved / "variables").mkdir(parents=True)
    write_checkpoint(saved / "variables" / "variables", {"w": (1, np.ones(1, "<f4"))})
    index = saved / "variables" / "variables.index"
    ci = tf_checkpoint.checkpoint_index
    assert ci(saved) == index and ci(saved / "variables") == index and ci(saved / "variables" / "variables") == index
    assert ci(index) == index and ci(saved / "variables" / "variables.data-00000-of-00001") == index
    (saved / "variables.index").write_bytes(b"x")
    assert ci(saved) == index  # variables/variables.index comes first
    other = tmp_path / "other"
    other.mkdir()
    (other / "variables.index").write_bytes(b"x")
    (other / "a.index").write_bytes(b"x")
    assert ci(other) == other / "variables.index"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "m.data-v2.data-00000-of-00001").write_bytes(b"")
    assert ci(odd / "m.data-v2.data-00000-of-00001") is None
    (odd / "m.data-v2.index").write_bytes(b"x")
    assert ci(odd / "m.data-v2.data-00000-of-00001") == odd / "m.data-v2.index"
    assert ci(odd) == odd / "m.data-v2.index"  # the one index in the folder
    (odd / "notes.txt").write_bytes(b"x")
    assert ci(odd / "notes.txt") is None and ci(tmp_path / "absent") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ci(empty) is None
    many = tmp_path / "many"
    many.mkdir()
    for i in range(7):
        (many / f"c{i}.index").write_bytes(b"x")
    with pytest.raises(TransferKitError) as caught:
        ci(many)
    assert str(caught.value) == (f"{many} holds several TensorFlow checkpoints (c0.index, c1.index, c2.index, "
                                 "c3.index, c4.index, c5.index); give one prefix or .index")


def test_tf_sniff_by_footer_magic_folder_or_shard(tmp_path):
    """sniff: a file whose last 8 bytes are the table magic (48 bytes at least), a folder or shard that
    names an index; nothing else, and no error for a missing file."""
    magic = struct.pack("<Q", tf_checkpoint.TABLE_MAGIC)
    sniff = tf_checkpoint.sniff
    (tmp_path / "exact").write_bytes(b"\0" * 40 + magic)
    (tmp_path / "short").write_bytes(b"\0" * 39 + magic)
    (tmp_path / "other").write_bytes(b"\0" * 40 + magic[::-1])
    assert sniff(tmp_path / "exact", b"") is True and sniff(tmp_path / "short", b"") is False
    assert sniff(tmp_path / "other", b"") is False and sniff(tmp_path / "absent", b"") is False
    folder = tmp_path / "f"
    folder.mkdir()
    assert sniff(folder, b"") is False
    write_checkpoint(folder / "m", {"w": (1, np.ones(1, "<f4"))})
    assert sniff(folder, b"") is True and sniff(folder / "m.data-00000-of-00001", b"") is True
    (folder / "m.index").unlink()
    assert sniff(folder / "m.data-00000-of-00001", b"\0" * 40 + magic) is False


# --- Keras HDF5, small files written with h5py -----------------------------------------------------------

def _legacy_layer(group, layer: str, weights: dict[str, np.ndarray]) -> None:
    g = group.create_group(layer)
    g.attrs["weight_names"] = np.array([n.encode() for n in weights], dtype="S") if weights else \
        np.array([], dtype="S1")
    for name, array in weights.items():
        g[name] = array


def _legacy_model(path, config: dict, layers: dict[str, dict[str, np.ndarray]]) -> None:
    """A Keras 2 model file at `path`: the model config, and each layer's weights in order."""
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [name.encode() for name in layers]
        for name, weights in layers.items():
            _legacy_layer(g, name, weights)


def test_keras_legacy_model_names_values_types_eps_padding_and_metadata(tmp_path):
    """A Keras 2 model file: every tensor named, converted and typed through the model config, clashing
    names kept apart, BatchNorm eps values and 'same'-padded strided layers listed, optimizer variables
    counted and the Keras version recorded."""
    config = {"class_name": "Sequential", "config": [
        "not a layer", {"class_name": "Odd", "config": "no dict"},
        {"class_name": "Conv2D", "config": {"name": "conv", "padding": "same", "strides": [2, 2]}},
        {"class_name": "BatchNormalization", "config": {"name": "bn", "epsilon": 1e-4}},
        {"class_name": "BatchNormalization", "name": "bn2", "config": {}},
        {"class_name": "SeparableConv2D", "config": {"name": "sep", "padding": "valid", "strides": [2, 2]}},
        {"class_name": "MaxPooling2D", "config": {"name": "pool", "padding": "SAME", "pool_size": [2, 2]}},
        {"class_name": "AveragePooling2D", "config": {"name": "avg", "padding": "same", "pool_size": [1, 1]}},
        {"class_name": "Dense", "config": {"name": "head", "padding": "same", "pool_size": [2, 2]}},
        {"class_name": "DepthwiseConv2D", "name": "dwc", "config": {"padding": "same", "strides": [1, 1]}}]}
    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config).encode()
        f.attrs["keras_version"] = np.bytes_(b"2.2.4")
        g = f.create_group("model_weights")
        g.attrs["keras_version"] = b"9.9.9"  # the root's wins
        g.attrs["layer_names"] = [b"conv", b"bn", b"bn2", b"sep", b"pool", b"dwc", b"head"]
        _legacy_layer(g, "conv", {"conv/kernel:0": np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3),
                                  "conv/bias:0": np.array([1, 2, 3], np.float32)})
        _legacy_layer(g, "bn", {f"bn/{leaf}:0": np.full(2, i, np.float32)
                                for i, leaf in enumerate(("gamma", "beta", "moving_mean", "moving_variance"))})
        _legacy_layer(g, "bn2", {"bn2/gamma:0": np.ones(1, np.float64)})
        _legacy_layer(g, "sep", {"sep/depthwise_kernel:0": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2),
                                 "sep/pointwise_kernel:0": np.arange(8, dtype=np.float32).reshape(1, 1, 4, 2),
                                 "sep/bias:0": np.array([5, 6], np.float32)})
        _legacy_layer(g, "pool", {})
        _legacy_layer(g, "dwc", {"dwc/kernel:0": np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)})
        _legacy_layer(g, "head", {"head/kernel:0": np.arange(6, dtype=np.float32).reshape(2, 3),
                                  "head/weights:0": np.zeros((1, 1), np.float32)})
        f.create_group("optimizer_weights").attrs["weight_names"] = [b"a", b"b", b"c"]
    wf = read_weights(path)
    assert wf.format == "keras-h5" and wf.path == path
    assert list(wf.tensors) == [
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn2.weight",
        "sep.depthwise.weight", "sep.pointwise.weight", "sep.pointwise.bias", "dwc.weight", "head.weight",
        "head.weight.12"]
    t = wf.tensors
    assert t["conv.weight"].tolist() == [[[[0, 6]], [[3, 9]]], [[[1, 7]], [[4, 10]]], [[[2, 8]], [[5, 11]]]]
    assert t["bn.running_var"].tolist() == [3, 3] and t["bn.running_mean"].tolist() == [2, 2]
    assert t["sep.depthwise.weight"].tolist() == [[[[0]]], [[[1]]], [[[2]]], [[[3]]]]
    assert t["sep.pointwise.weight"].tolist() == [[[[0]], [[2]], [[4]], [[6]]], [[[1]], [[3]], [[5]], [[7]]]]
    assert t["dwc.weight"].tolist() == [[[[0, 2]]], [[[1, 3]]]]
    assert t["head.weight"].tolist() == [[0, 3], [1, 4], [2, 5]] and t["head.weight.12"].tolist() == [[0]]
    meta = wf.metadata
    assert json.loads(meta["source_names"])["head.weight.12"] == "head/head/weights:0"
    assert json.loads(meta["source_names"])["sep.pointwise.bias"] == "sep/sep/bias:0"
    assert json.loads(meta["layer_types"]) == {
        "conv.weight": "Conv2D", "conv.bias": "Conv2D", "bn.weight": "BatchNorm", "bn.bias": "BatchNorm",
        "bn.running_mean": "BatchNorm", "bn.running_var": "BatchNorm", "bn2.weight": "BatchNorm",
        "sep.depthwise.weight": "SeparableConv2D", "sep.pointwise.weight": "SeparableConv2D",
        "sep.pointwise.bias": "SeparableConv2D", "dwc.weight": "DepthwiseConv2D", "head.weight": "Dense",
        "head.weight.12": "Dense"}
    assert json.loads(meta["converted"])["dwc.weight"] == "depthwise HWIM -> (I*M)1HW"
    assert json.loads(meta["converted"])["conv.bias"] == "unchanged"
    assert meta == {
        "source_format": "keras-legacy model", "keras_version": "2.2.4", "dtype": "float32,float64",
        "source_names": meta["source_names"], "layer_types": meta["layer_types"], "converted": meta["converted"],
        "left_out": '{"optimizer variables":3}', "batchnorm_eps": "0.0001,0.001",
        "batchnorm_eps_source": "model_config",
        "batchnorm_fix": "set eps=0.0001 on the PyTorch BatchNorm modules (PyTorch's default is 1e-5)",
        "same_padding": '["conv","pool"]',
        "same_padding_fix": (
            "TF 'same' padding with stride > 1 pads the bottom/right more than PyTorch's symmetric padding: "
            "use timm's tf_ model variants (Conv2dSame), or F.pad(x, (0, 1, 0, 1)) before the layer "
            "(value=-inf for max pooling) with padding=0")}


def test_keras_weights_only_file_guesses_layer_kinds_from_default_names(tmp_path):
    """Without a model config: split `layer_names0/1` and `weight_names0/1` lists are joined, depthwise and
    separable layers are told by their default names, eps is Keras's default, no padding notes."""
    path = tmp_path / "weights.h5"
    k = np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names0"] = [b"depthwise_conv2d_1", b"block1_dw"]
        f.attrs["layer_names1"] = np.array(["conv_dwx", "separable_conv2d_2"], dtype=h5py.string_dtype())
        f.attrs["layer_names3"] = [b"ignored"]  # after a gap the chunks end
        f.attrs["keras_version"] = "2.9.0"
        for layer in ("depthwise_conv2d_1", "block1_dw", "conv_dwx"):
            _legacy_layer(f, layer, {f"{layer}/kernel:0": k})
        g = f.create_group("separable_conv2d_2")
        g.attrs["weight_names0"] = [b"separable_conv2d_2/depthwise_kernel:0"]
        g.attrs["weight_names1"] = [b"separable_conv2d_2/pointwise_kernel:0", b"separable_conv2d_2/bias:0"]
        g["separable_conv2d_2/depthwise_kernel:0"] = k
        g["separable_conv2d_2/pointwise_kernel:0"] = np.ones((1, 1, 2, 3), np.float32)
        g["separable_conv2d_2/bias:0"] = np.zeros(3, np.float32)
        _legacy_layer(f, "bn", {"bn/gamma:0": np.ones(2, np.float32)})
    wf = read_weights(path)
    assert list(wf.tensors) == ["depthwise_conv2d_1.weight", "block1_dw.weight", "conv_dwx.weight",
                                "separable_conv2d_2.depthwise.weight", "separable_conv2d_2.pointwise.weight",
                                "separable_conv2d_2.pointwise.bias"]
    assert wf.tensors["block1_dw.weight"].tolist() == [[[[0, 2]]], [[[1, 3]]]]
    assert wf.tensors["conv_dwx.weight"].tolist() == [[[[0, 2]], [[1, 3]]]]  # an ordinary (1 out) conv
    assert json.loads(wf.metadata["layer_types"]) == {
        "depthwise_conv2d_1.weight": "DepthwiseConv2D", "block1_dw.weight": "DepthwiseConv2D",
        "conv_dwx.weight": "Conv2D", "separable_conv2d_2.depthwise.weight": "SeparableConv2D",
        "separable_conv2d_2.pointwise.weight": "SeparableConv2D",
        "separable_conv2d_2.pointwise.bias": "SeparableConv2D"}
    assert wf.metadata["source_format"] == "keras-legacy weights" and wf.metadata["keras_version"] == "2.9.0"
    assert "batchnorm_eps" not in wf.metadata and "left_out" not in wf.metadata and "same_padding" not in wf.metadata
    with h5py.File(path, "a") as f:
        del f.attrs["layer_names3"]
        f.attrs["layer_names2"] = [b"bn"]
        del f.attrs["keras_version"]
    wf = read_weights(path)
    assert list(wf.tensors)[-1] == "bn.weight" and "keras_version" not in wf.metadata
    assert wf.metadata["batchnorm_eps"] == "0.001"
    assert wf.metadata["batchnorm_eps_source"] == "Keras default (no model config in the file)"
    assert wf.metadata["batchnorm_fix"] == "set eps=0.001 on the PyTorch BatchNorm modules (PyTorch's default is 1e-5)"


def test_keras3_nested_layers_leaves_by_position_and_left_out_roots(tmp_path):
    """Keras 3 `layers/<name>/vars/<i>`: nested models' layers dotted, layers in natural order, vars by
    number, leaves guessed from position and shapes, optimizer and metrics variables counted."""
    path = tmp_path / "m.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense_10/vars/0", data=np.arange(6, dtype=np.float32).reshape(2, 3))
        f.create_dataset("layers/dense_10/vars/1", data=np.array([7, 8, 9], np.float32))
        f.create_dataset("layers/dense_10/vars/2", data=np.array([1], np.float32))
        f.create_dataset("layers/dense_10/vars/note", data=np.zeros(1, np.float32))
        f.create_dataset("layers/dense_2/vars/0", data=np.ones((1, 1), np.float32))
        for i in range(11):
            f.create_dataset(f"layers/many/vars/{i}", data=np.full(1, i, np.float32))
        f.create_dataset("layers/emb/vars/0", data=np.arange(3, dtype=np.float32))
        f.create_dataset("layers/emb/vars/1", data=np.arange(2, dtype=np.float32))
        f.create_dataset("layers/bn/vars/0", data=np.full(2, 1, np.float32))
        f.create_dataset("layers/bn/vars/1", data=np.full(2, 2, np.float32))
        f.create_dataset("layers/trio/vars/0", data=np.full(2, 1, np.float32))
        f.create_dataset("layers/trio/vars/1", data=np.full(2, 2, np.float32))
        f.create_dataset("layers/trio/vars/2", data=np.full(2, 3, np.float32))
        f.create_dataset("layers/backbone/layers/sep_block_dw/vars/0",
                         data=np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2))
        f.create_dataset("layers/backbone/layers/separable_conv2d/vars/0",
                         data=np.arange(2, dtype=np.float32).reshape(1, 1, 2, 1))
        f.create_dataset("layers/backbone/layers/separable_conv2d/vars/1", data=np.ones((1, 1, 2, 3), np.float32))
        f.create_dataset("layers/backbone/layers/separable_conv2d/vars/2", data=np.zeros(3, np.float32))
        f.create_dataset("layers/loose", data=np.zeros(1, np.float32))
        f.create_dataset("optimizer/vars/0", data=np.zeros(1, np.int64))
        f.create_dataset("optimizer/inner/vars/1", data=np.zeros(2, np.float32))
        f.create_dataset("metrics/mean/vars/0", data=np.zeros(1, np.float32))
    wf = read_weights(path)
    names = ["backbone.sep_block_dw.weight", "backbone.separable_conv2d.depthwise.weight",
             "backbone.separable_conv2d.pointwise.weight", "backbone.separable_conv2d.pointwise.bias",
             "bn.weight", "bn.bias", "dense_2.weight", "dense_10.weight", "dense_10.bias", "dense_10.2",
             "emb.0", "emb.1", *[f"many.{i}" for i in range(11)],
             "trio.0", "trio.1", "trio.2"]
    assert list(wf.tensors) == names
    t = wf.tensors
    assert t["dense_10.weight"].tolist() == [[0, 3], [1, 4], [2, 5]] and t["dense_10.bias"].tolist() == [7, 8, 9]
    assert t["backbone.sep_block_dw.weight"].tolist() == [[[[0]]], [[[1]]], [[[2]]], [[[3]]]]
    assert t["many.10"].tolist() == [10] and t["emb.0"].tolist() == [0, 1, 2] and t["trio.2"].tolist() == [3, 3]
    meta = wf.metadata
    sources = json.loads(meta["source_names"])
    assert sources["dense_10.2"] == "layers/dense_10/vars/2"
    assert sources["backbone.separable_conv2d.pointwise.bias"] == "layers/backbone.separable_conv2d/vars/2"
    assert json.loads(meta["converted"])["dense_10.weight"] == "dense (in,out) -> (out,in) (leaf from position)"
    assert json.loads(meta["converted"])["bn.bias"] == "beta -> bias (leaf from position)"
    types = json.loads(meta["layer_types"])
    assert types["backbone.sep_block_dw.weight"] == "DepthwiseConv2D" and types["dense_10.2"] == "unknown"
    assert types["backbone.separable_conv2d.pointwise.bias"] == "SeparableConv2D" and types["bn.weight"] == "BatchNorm"
    assert json.loads(meta["left_out"]) == {"optimizer variables": 3}
    assert meta["batchnorm_eps"] == "0.001" and meta["source_format"] == "keras3 .weights.h5"
    assert "keras_version" not in meta and meta["dtype"] == "float32"


def test_keras_errors_name_the_file_and_the_fault_in_one_line(tmp_path, monkeypatch):
    """Non-HDF5 bytes, bad JSON, non-numeric or oversized datasets, a missing listed weight, an empty
    Keras 3 file and any h5py error each come back as one TransferKitError line naming the file."""
    from transferkit.weights.formats import keras_h5

    def error(path: Path) -> str:
        with pytest.raises(TransferKitError) as caught:
            keras_h5.read(path)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 10)
    assert error(junk) == f"{junk}: not an HDF5 file (bad signature); give a Keras .h5/.hdf5 weights file"
    assert keras_h5.sniff(junk, b"\x89HDF\r\n\x1a\nrest") and not keras_h5.sniff(junk, b"\x89HDF\r\n\x1a")
    path = tmp_path / "k.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = "{not json"
        f.create_group("model_weights").attrs["layer_names"] = [b"d"]
    assert error(path) == f"{path}: the model_config attribute is not valid JSON (Expecting property name " \
        "enclosed in double quotes)"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"d"]
        _legacy_layer(f, "d", {"d/kernel:0": np.array([b"text"])})
    assert error(path) == f"{path}: /d/d/kernel:0 is not a numeric array; the file is damaged or not Keras weights"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"d"]
        f.create_group("d").attrs["weight_names"] = [b"d/kernel:0"]
    assert error(path) == f"{path}: /d/d/kernel:0 is listed but missing; the file is damaged"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"d"]
        g = f.create_group("d")
        g.attrs["weight_names"] = [b"k:0", b"z:0"]
        g.create_dataset("k:0", shape=(1000, 1000), dtype=np.float32, chunks=(100, 100))  # no chunk written
        g.create_dataset("z:0", shape=(64, 64), dtype=np.float32, chunks=(8, 8), compression="gzip")
    size = path.stat().st_size
    assert size < 16384 < size * 1000
    assert error(path) == (f"{path}: /d/k:0 declares 4000000 bytes, more than the file can hold ({size}); "
                           "the file is damaged")
    with h5py.File(path, "a") as f:
        f["d"].attrs["weight_names"] = [b"z:0"]
    wf = keras_h5.read(path)  # 16384 compressed bytes may come from a smaller file
    assert wf.tensors["d.z"].shape == (64, 64) and "keras_version" not in wf.metadata
    model = tmp_path / "mv.h5"
    with h5py.File(model, "w") as f:
        f.attrs["keras_version"] = b""
        g = f.create_group("model_weights")
        g.attrs["keras_version"] = b"3.1"
        g.attrs["layer_names"] = [b"d"]
        _legacy_layer(g, "d", {"d/bias:0": np.ones(2, np.float32)})
    wf = keras_h5.read(model)
    assert wf.metadata["keras_version"] == "3.1" and wf.metadata["source_format"] == "keras-legacy model"
    empty = tmp_path / "e.weights.h5"
    with h5py.File(empty, "w") as f:
        f.create_group("layers/flatten/vars")
    assert error(empty) == f"{empty}: the Keras file holds no weights"
    with h5py.File(empty, "w") as f:
        f.create_group("weights")
    assert error(empty) == (f"{empty}: an HDF5 file without Keras weights (no layer_names attribute, model_weights "
                            "or layers group); give a file written by Keras model.save or save_weights")
    with h5py.File(empty, "w") as f:
        f.create_dataset("layers/d/vars/0", data=np.array([b"x"]))
    assert error(empty) == f"{empty}: /layers/d/vars/0 is not a numeric array; the file is damaged or not Keras weights"

    def fail(exc):
        def raiser(f, p):
            raise exc
        return raiser

    monkeypatch.setattr(keras_h5, "_read_open", fail(ValueError("first line\nsecond line")))
    assert error(path) == f"{path}: damaged Keras HDF5 file (first line); re-download or re-save it"
    monkeypatch.setattr(keras_h5, "_read_open", fail(KeyError()))
    assert error(path) == f"{path}: damaged Keras HDF5 file (KeyError); re-download or re-save it"
    monkeypatch.setattr(keras_h5, "_read_open", fail(TransferKitError("as it was")))
    assert error(path) == "as it was"


def test_tf_key_that_is_not_utf8_is_read_with_a_replacement_character(tmp_path):
    """A variable key with bytes that are not UTF-8 still reads, the bad byte shown as U+FFFD."""
    prefix = tmp_path / "m"
    raw = np.array([4.0], "<f4").tobytes()
    prefix.with_name("m.index").write_bytes(_sstable([
        (b"", field(1, 1)), (b"w\xff/bias", _wire_entry(1, (1,), 0, 4, masked_crc32c(raw)))]))
    prefix.with_name("m.data-00000-of-00001").write_bytes(raw)
    wf = tf_checkpoint.read(prefix)
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {"w\ufffd.bias": [4.0]}


def test_keras_dataset_size_limits_at_their_exact_edges(tmp_path):
    """An uncompressed dataset may declare as many bytes as the file has and no more; a compressed one
    up to 1000 times the file's size and no more."""
    from transferkit.weights.formats import keras_h5

    def write(path: Path, n: int, compression: str | None) -> int:
        with h5py.File(path, "w") as f:
            f.attrs["layer_names"] = [b"d"]
            g = f.create_group("d")
            g.attrs["weight_names"] = [b"v:0"]
            g.create_dataset("v:0", shape=(n,), dtype=np.uint8, chunks=(min(n, 4096),), compression=compression)
        return path.stat().st_size

    for compression, factor in ((None, 1), ("gzip", 1000)):
        path = tmp_path / f"{compression}.h5"
        size = write(path, 4096, compression)
        assert write(path, size * factor, compression) == size  # the header does not grow with the shape
        assert keras_h5.read(path).tensors["d.v"].shape == (size * factor,)
        assert write(path, size * factor + 1, compression) == size
        with pytest.raises(TransferKitError) as caught:
            keras_h5.read(path)
        assert str(caught.value) == (f"{path}: /d/v:0 declares {size * factor + 1} bytes, more than the file can "
                                     f"hold ({size}); the file is damaged")


def test_tf_damaged_data_blocks_and_bare_footers_are_named(tmp_path):
    """A data block (not the index block) that is damaged is named as such; a 48-byte file that is only a
    footer is parsed as one; a shape whose byte count overflows 64 bits is still compared exactly."""
    where = f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint index"
    tail = "; re-export the checkpoint"
    magic = struct.pack("<Q", tf_checkpoint.TABLE_MAGIC)
    assert _index_error(tmp_path, b"\0" * 40 + magic) == \
        f"{where} (index block at 0+0 lies outside the 48-byte file){tail}"

    def with_data(data_block: bytes, size: int | None = None) -> bytes:
        index = _prefixed_block([(b"k", varint(0) + varint(len(data_block) - 5 if size is None else size))])
        return data_block + index + _footer((0, 0), (len(data_block), len(index) - 5))

    data = bytearray(_prefixed_block([(b"", field(1, 1))]))
    data[1] ^= 4
    assert _index_error(tmp_path, with_data(bytes(data))) == f"{where} (data block at 0 fails its CRC check){tail}"
    assert _index_error(tmp_path, with_data(bytes(data), 200)) == \
        f"{where} (data block at 0+200 lies outside the 86-byte file){tail}"
    assert _index_error(tmp_path, with_data(_prefixed_block([(b"", field(1, 1))], kind=2))) == \
        f"{where} (data block at 0 is compressed (type 2); only uncompressed tables are read){tail}"
    assert _index_error(tmp_path, with_data(_raw_block(b"\x00" + struct.pack("<I", 0)))) == \
        f"{where} (data block has a bad restart count (0)){tail}"
    assert _index_error(tmp_path, with_data(_raw_block(b"\x00\x00\x09ab" + struct.pack("<II", 0, 1)))) == \
        f"{where} (data block has an entry running past its end){tail}"
    assert _index_error(tmp_path, with_data(_raw_block(b"\x80" + struct.pack("<II", 0, 1)))) == \
        f"{where} (bad varint in data){tail}"
    prefix = tmp_path / "big"
    raw = np.ones(2, "<f4").tobytes()
    _one_entry(prefix, _wire_entry(1, (1 << 32, 1 << 32), 0, 8, masked_crc32c(raw)), raw)
    assert _read_error(prefix) == (f"{prefix}: variable 'w' declares 8 bytes but shape [4294967296, 4294967296] "
                                   "needs 73786976294838206464; the checkpoint is damaged")


def test_tf_object_graph_reads_only_its_declared_length(tmp_path):
    """Bytes after the declared length of the object graph (covered by the CRC) are not parsed."""
    prefix = tmp_path / "m"
    graph = _graph([([], [("v/w", "b/w"), ("v/u", "a/w")])])
    blob = varint(len(graph)) + b"\0\0\0\0" + graph + b"\0"
    _graph_checkpoint(prefix, blob, masked_crc32c(struct.pack("<I", len(graph)) + b"\0\0\0\0" + graph + b"\0"))
    wf = tf_checkpoint.read(prefix)
    assert list(wf.tensors) == ["b.w", "a.w"] and json.loads(wf.metadata["variable_names"]) == {
        "b.w": "v/w", "a.w": "v/u"}


def test_keras3_links_and_a_nested_model_weight_without_a_scope(tmp_path):
    """A link inside a Keras 3 `layers/` tree is refused by name; a nested model's weight named without
    an inner layer scope is named after the outer layer alone."""
    path = tmp_path / "link.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.ones((2, 2), np.float32))
        f["layers/alias"] = h5py.SoftLink("/layers/dense")
    with pytest.raises(TransferKitError) as caught:
        read_weights(path)
    assert str(caught.value) == f"{path}: /layers/alias is a SoftLink; refusing links in a weights file"
    path = tmp_path / "nested.h5"
    config = {"config": {"layers": [{"class_name": "Functional", "config": {"name": "inner", "layers": []}}]}}
    _legacy_model(path, config, {"inner": {"kernel:0": np.arange(2, dtype=np.float32).reshape(1, 2)}})
    wf = read_weights(path)
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {"inner.weight": [[0], [1]]}
    assert json.loads(wf.metadata["layer_types"]) == {"inner.weight": "Functional"}


def test_keras_separable_names_follow_the_class_then_the_layer_name(tmp_path):
    """With a model config, a Dense layer whose name says 'separable' keeps plain names; a Keras 1
    SeparableConvolution2D (another class name) still gets depthwise/pointwise kernel names."""
    config = {"config": {"layers": [
        {"class_name": "Dense", "config": {"name": "separable_head"}},
        {"class_name": "SeparableConvolution2D", "config": {"name": "separable_k1"}}]}}
    path = tmp_path / "k1.h5"
    _legacy_model(path, config, {
        "separable_head": {"separable_head/kernel:0": np.ones((2, 1), np.float32),
                           "separable_head/bias:0": np.ones(1, np.float32)},
        "separable_k1": {"separable_k1/depthwise_kernel:0": np.ones((1, 1, 2, 1), np.float32),
                         "separable_k1/pointwise_kernel:0": np.ones((1, 1, 2, 3), np.float32)}})
    wf = read_weights(path)
    assert list(wf.tensors) == ["separable_head.weight", "separable_head.bias", "separable_k1.depthwise.weight",
                                "separable_k1.pointwise.weight"]
    assert wf.tensors["separable_k1.depthwise.weight"].shape == (2, 1, 1, 1)


def test_tf_block_restart_count_is_unsigned_and_each_entry_varint_is_checked(tmp_path):
    """The restart count is an unsigned 32-bit number; a cut-off varint in any of an entry's three
    lengths is named."""
    where = f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint index"

    def with_index(body: bytes) -> bytes:
        block = _raw_block(body)
        return block + _footer((0, 0), (0, len(block) - 5))

    assert _index_error(tmp_path, with_index(b"\x00" + struct.pack("<I", 0xFFFFFFFF))) == \
        f"{where} (index block has a bad restart count (4294967295)); re-export the checkpoint"
    for cut in (b"\x00\x80", b"\x00\x00\x80"):
        assert _index_error(tmp_path, with_index(cut + struct.pack("<II", 0, 1))) == \
            f"{where} (bad varint in index); re-export the checkpoint"


def test_keras_model_config_of_an_unexpected_shape_is_ignored(tmp_path):
    """A model_config whose `config` is neither a layer list nor a dict names no layers; the weights still read."""
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": "Model", "config": 5})
        f.attrs["layer_names"] = [b"d"]
        _legacy_layer(f, "d", {"d/bias:0": np.array([1.0], np.float32)})
    assert {k: v.tolist() for k, v in read_weights(path).tensors.items()} == {"d.bias": [1.0]}


def test_keras_inner_scopes_missing_from_the_config_and_nameless_config_layers(tmp_path):
    """A nested model's weight scope the config does not list takes the outer model's class; a config layer
    with an empty name lends its class to no one."""
    config = {"config": {"layers": [
        {"class_name": "Functional", "config": {"name": "inner", "layers": []}},
        {"class_name": "DepthwiseConv2D", "name": "", "config": {"name": ""}},
        {"class_name": "Conv2D", "config": {"name": "conv"}}]}}
    path = tmp_path / "scopes.h5"
    _legacy_model(path, config, {"inner": {"ghost/kernel:0": np.arange(2, dtype=np.float32).reshape(1, 2)},
                                 "conv": {"conv/kernel:0": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)}})
    wf = read_weights(path)
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {
        "inner.ghost.weight": [[0], [1]], "conv.weight": [[[[0]], [[2]]], [[[1]], [[3]]]]}
    assert json.loads(wf.metadata["layer_types"]) == {"inner.ghost.weight": "Functional", "conv.weight": "Conv2D"}


def test_tf_each_footer_varint_is_named_when_bad(tmp_path):
    """Whichever of the footer's four varints is bad, the fault is named as the footer's."""
    magic = struct.pack("<Q", tf_checkpoint.TABLE_MAGIC)
    zero10 = b"\x80" * 9 + b"\x00"  # 0 in ten bytes
    for good in range(1, 4):
        footer = (zero10 * good + b"\xff" * 10).ljust(40, b"\xff")
        assert _index_error(tmp_path, footer + magic) == (f"{tmp_path / 'm.index'}: damaged TensorFlow checkpoint "
                                                          "index (bad varint in footer); re-export the checkpoint")


def test_tf_object_graph_past_its_data_file_is_named(tmp_path):
    """An object graph declared past the end of its data file is refused by its key."""
    prefix = tmp_path / "m"
    graph = _graph([([], [("v/w", "b/w")])])
    blob = varint(len(graph)) + b"\0\0\0\0" + graph
    _graph_checkpoint(prefix, blob, masked_crc32c(struct.pack("<I", len(graph)) + b"\0\0\0\0" + graph))
    shard = tmp_path / "m.data-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:4])
    assert _read_error(prefix) == (f"{shard}: '_CHECKPOINTABLE_OBJECT_GRAPH' is declared at bytes 4..{4 + len(blob)}, "
                                   "past the file's 4 bytes; the checkpoint is truncated or damaged")


def test_keras_nested_layer_class_and_a_linked_layer_group(tmp_path):
    """A nested model's inner layer is converted by its own class (a depthwise `kernel`); a layer group that
    is a link is refused by name."""
    config = {"config": {"layers": [{"class_name": "Functional", "config": {"name": "inner", "layers": [
        {"class_name": "DepthwiseConv2D", "config": {"name": "dw"}}]}}]}}
    path = tmp_path / "nested_dw.h5"
    _legacy_model(path, config, {"inner": {"dw/kernel:0": np.arange(2, dtype=np.float32).reshape(1, 1, 2, 1)}})
    wf = read_weights(path)
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {"inner.dw.weight": [[[[0]]], [[[1]]]]}
    assert json.loads(wf.metadata["layer_types"]) == {"inner.dw.weight": "DepthwiseConv2D"}
    path = tmp_path / "linked.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"d"]
        _legacy_layer(f, "real", {"real/bias:0": np.ones(1, np.float32)})
        f["d"] = h5py.SoftLink("/real")
    with pytest.raises(TransferKitError) as caught:
        read_weights(path)
    assert str(caught.value) == f"{path}: //d is a SoftLink; refusing links in a weights file"


def test_tf_object_graph_child_one_past_the_last_node_is_ignored(tmp_path):
    """A child reference to the node id just past the last node is ignored like any unknown id."""
    prefix = tmp_path / "m"
    graph = _graph([([(1, "missing")], [("v/w", "b/w")])])
    blob = varint(len(graph)) + b"\0\0\0\0" + graph
    _graph_checkpoint(prefix, blob, masked_crc32c(struct.pack("<I", len(graph)) + b"\0\0\0\0" + graph))
    assert list(tf_checkpoint.read(prefix).tensors) == ["b.w", "a.w"]
