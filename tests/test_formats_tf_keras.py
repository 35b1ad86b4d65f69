"""TensorFlow checkpoints and Keras HDF5 files read into PyTorch layout, without TensorFlow."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, needs_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protowire import varint
from torch import nn

from transferkit.checksums import masked_crc32c
from transferkit.cli import main
from transferkit.errors import TransferKitError
from transferkit.weights.formats import read_weights, tf_checkpoint
from transferkit.weights.formats.tf_layout import convert
from transferkit.weights.sources import resolve_source

RFB = SHARED_DATA / "weights" / "ultralight_face_rfb320_multiformat"
RFB_TF = RFB / "tf" / "export_models" / "RFB"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
XCEPTION = SHARED_DATA / "weights" / "keras_fer2013_mini_xception" / "fer2013_mini_XCEPTION.102-0.66.hdf5"
# FUZZ_EXAMPLES=1000 for a longer hunt; the suite runs 25 per format.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def inspect_json(source, capsys) -> dict:
    capsys.readouterr()
    assert main(["weights", "inspect", "--json", str(source)]) == 0
    return json.loads(capsys.readouterr().out)


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
@FUZZ
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
@FUZZ
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
