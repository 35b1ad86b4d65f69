"""ONNX and TFLite readers: a timm model exported to ONNX and run by onnxruntime, the RFB-320 files
against their PyTorch original, and TFLite files built here with known tensors in TFLite layouts."""

import json
import struct
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import SHARED_DATA, needs_shared

from transferkit.cli import main
from transferkit.errors import TransferKitError
from transferkit.weights.formats import read_weights

# The timm model is exported with the TorchScript exporter (no onnxscript needed), which warns.
pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript"),
              pytest.mark.filterwarnings("ignore:The feature will be removed")]

RFB = SHARED_DATA / "weights" / "ultralight_face_rfb320_multiformat"
RFB_TFLITE = RFB / "tflite/pretrained/version-RFB-320_without_postprocessing.tflite"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomised_timm(name="test_efficientnet", classes=5) -> torch.nn.Module:
    """Fresh BatchNorms are all ones and zeros, and the exporter stores equal tensors once: random
    values keep every tensor distinct (and make the comparison mean something)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=classes).eval()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in key else torch.randn_like(t) * 0.1)
    return model


def export(model, path, **kw):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(model, x, str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      do_constant_folding=False, **kw)
    return x


# ---- ONNX ----

def test_onnx_export_of_timm_model_reads_back_as_its_state_dict_and_runs_like_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = randomised_timm()
    x = export(model, tmp_path / "m.onnx")
    wf = read_weights(tmp_path / "m.onnx")
    assert wf.format == "onnx"
    sd = model.state_dict()
    # Every parameter and running statistic, under its own name; BatchNorm step counters are not exported.
    assert set(wf.tensors) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for name, t in wf.tensors.items():
        assert torch.equal(t, sd[name]), name
    records = json.loads(wf.metadata["tensors"])
    assert records["conv_stem.weight"]["type"] == "Conv"
    assert records["bn1.running_var"]["type"] == "BatchNormalization"

    fresh = timm.create_model("test_efficientnet", num_classes=5).eval()
    fresh.load_state_dict(wf.tensors, strict=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (ref,) = session.run(["y"], {"x": x.numpy()})
    with torch.no_grad():
        assert rel_err(fresh(x), ref) < 1e-4


def test_onnx_external_data_inside_the_model_folder_only(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = randomised_timm()
    export(model, tmp_path / "inline.onnx")
    proto = onnx.load(str(tmp_path / "inline.onnx"))
    (tmp_path / "ext").mkdir()
    onnx.save_model(proto, str(tmp_path / "ext" / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    wf = read_weights(tmp_path / "ext" / "m.onnx")
    assert torch.equal(wf.tensors["conv_stem.weight"], model.state_dict()["conv_stem.weight"])
    assert len(wf.tensors) == len(read_weights(tmp_path / "inline.onnx").tensors)

    def with_location(location=None, offset=None, name="bad.onnx"):
        bad = onnx.load(str(tmp_path / "ext" / "m.onnx"), load_external_data=False)
        for entry in bad.graph.initializer[0].external_data:
            if entry.key == "location" and location is not None:
                entry.value = location
            if entry.key == "offset" and offset is not None:
                entry.value = str(offset)
        onnx.save_model(bad, str(tmp_path / "ext" / name))
        return tmp_path / "ext" / name

    (tmp_path / "secret.data").write_bytes(b"\0" * 4096)
    for location in ("../secret.data", str(tmp_path / "secret.data"), "missing.data"):
        with pytest.raises(TransferKitError, match="not a file inside the model's folder"):
            read_weights(with_location(location))
    with pytest.raises(TransferKitError, match="declares .* bytes but only 0 remain"):
        read_weights(with_location(offset=10**12))


@needs_shared
@pytest.mark.parametrize("name", ["version-RFB-320.onnx", "version-RFB-320_without_postprocessing.onnx"])
def test_rfb320_onnx_equals_the_pth_by_name(name):
    pytest.importorskip("onnx")
    wf = read_weights(RFB / "models/onnx" / name)
    pth = torch.load(RFB / "models/pretrained/version-RFB-320.pth", map_location="cpu", weights_only=True)
    assert set(wf.tensors) == set(pth)  # this old exporter kept even the step counters
    for key, t in pth.items():
        assert wf.tensors[key].dtype == t.dtype and torch.equal(wf.tensors[key], t), key
    assert wf.metadata["opset"] == "ai.onnx:9" and wf.metadata["producer"] == "pytorch 1.2"


def test_onnx_sniffed_by_content_and_missing_package_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    export(randomised_timm(), tmp_path / "m.onnx")
    renamed = tmp_path / "weights.model"
    renamed.write_bytes((tmp_path / "m.onnx").read_bytes())
    assert read_weights(renamed).format == "onnx"
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(TransferKitError, match=r"needs the onnx package: pip install 'transferkit\[onnx\]'"):
        read_weights(renamed)


def test_onnx_damaged_files(tmp_path):
    pytest.importorskip("onnx")
    export(randomised_timm(), tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(TransferKitError, match="cut.onnx: truncated or damaged ONNX file"):
        read_weights(tmp_path / "cut.onnx")


# ---- TFLite ----

class TfliteBuilder:
    """Writes a one-subgraph .tflite file with the generated flatbuffers builders of the tflite package.

    A tensor's options: ``outside=True`` stores its data after the flatbuffer (as models over 2 GB do),
    ``buffer=N`` points it at buffer N, ``at=(offset, size)`` gives it a buffer of those fields and no
    data, ``sparse=True`` gives it (empty) sparsity parameters. A quant of
    ``(scales, None, axis)`` has no zero points. ``custom`` names the custom operators (code 32)."""

    def __init__(self):
        self.tflite = pytest.importorskip("tflite")
        import flatbuffers

        self.b = flatbuffers.Builder(1024)
        self.tensors, self.ops, self.codes = [], [], []
        self.options: dict[int, dict] = {}
        self.custom = b""

    def tensor(self, name, shape, ttype, data: np.ndarray | None = None, quant=None, **options) -> int:
        self.tensors.append((name, shape, ttype, data, quant))
        self.options[len(self.tensors) - 1] = options
        return len(self.tensors) - 1

    PLACEHOLDER = 0x5EED_0000_0000

    def op(self, code: int, inputs, outputs) -> None:
        if code not in self.codes:
            self.codes.append(code)
        self.ops.append((self.codes.index(code), inputs, outputs))

    def _vector(self, offsets):
        self.b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            self.b.PrependUOffsetTRelative(off)
        return self.b.EndVector()

    def build(self) -> bytes:
        t, b = self.tflite, self.b
        buffers = []
        t.BufferStart(b)
        buffers.append(t.BufferEnd(b))
        tensor_offsets, outside = [], []
        for index, (name, shape, ttype, data, quant) in enumerate(self.tensors):
            options = self.options.get(index, {})
            buffer_index = 0
            if data is not None:
                raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
                if options.get("outside"):
                    t.BufferStart(b)
                    t.BufferAddOffset(b, self.PLACEHOLDER + len(outside))  # replaced once the size is known
                    t.BufferAddSize(b, raw.size)
                    outside.append(raw.tobytes())
                else:
                    vec = b.CreateNumpyVector(raw)
                    t.BufferStart(b)
                    t.BufferAddData(b, vec)
                buffers.append(t.BufferEnd(b))
                buffer_index = len(buffers) - 1
            if "at" in options:  # a buffer with this (offset, size) and no inline data
                t.BufferStart(b)
                t.BufferAddOffset(b, options["at"][0])
                t.BufferAddSize(b, options["at"][1])
                buffers.append(t.BufferEnd(b))
                buffer_index = len(buffers) - 1
            buffer_index = options.get("buffer", buffer_index)
            sparsity = None
            if options.get("sparse"):
                t.SparsityParametersStart(b)
                sparsity = t.SparsityParametersEnd(b)
            q = None
            if quant is not None:
                scales, zeros, axis = quant
                sv = b.CreateNumpyVector(np.asarray(scales, np.float32))
                zv = None if zeros is None else b.CreateNumpyVector(np.asarray(zeros, np.int64))
                t.QuantizationParametersStart(b)
                t.QuantizationParametersAddScale(b, sv)
                if zv is not None:
                    t.QuantizationParametersAddZeroPoint(b, zv)
                t.QuantizationParametersAddQuantizedDimension(b, axis)
                q = t.QuantizationParametersEnd(b)
            name_off = b.CreateString(name)
            shape_off = None if shape is None else b.CreateNumpyVector(np.asarray(shape, np.int32))
            t.TensorStart(b)
            if shape_off is not None:  # no shape at all: a scalar
                t.TensorAddShape(b, shape_off)
            t.TensorAddType(b, ttype)
            t.TensorAddBuffer(b, buffer_index)
            t.TensorAddName(b, name_off)
            if q is not None:
                t.TensorAddQuantization(b, q)
            if sparsity is not None:
                t.TensorAddSparsity(b, sparsity)
            tensor_offsets.append(t.TensorEnd(b))
        op_offsets = []
        for index, inputs, outputs in self.ops:
            iv = None if inputs is None else b.CreateNumpyVector(np.asarray(inputs, np.int32))
            ov = None if outputs is None else b.CreateNumpyVector(np.asarray(outputs, np.int32))
            t.OperatorStart(b)
            t.OperatorAddOpcodeIndex(b, index)
            if iv is not None:  # None leaves the vector out, an empty list writes an empty one
                t.OperatorAddInputs(b, iv)
            if ov is not None:
                t.OperatorAddOutputs(b, ov)
            op_offsets.append(t.OperatorEnd(b))
        code_offsets = []
        for code in self.codes:
            custom = b.CreateString(self.custom) if code == 32 else None
            t.OperatorCodeStart(b)
            if custom is not None:
                t.OperatorCodeAddCustomCode(b, custom)
            t.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            t.OperatorCodeAddBuiltinCode(b, code)
            code_offsets.append(t.OperatorCodeEnd(b))
        tensors_vec, ops_vec = self._vector(tensor_offsets), self._vector(op_offsets)
        io = b.CreateNumpyVector(np.asarray([0], np.int32))
        t.SubGraphStart(b)
        t.SubGraphAddTensors(b, tensors_vec)
        t.SubGraphAddOperators(b, ops_vec)
        t.SubGraphAddInputs(b, io)
        t.SubGraphAddOutputs(b, io)
        graph = t.SubGraphEnd(b)
        codes_vec, graphs_vec, buffers_vec = self._vector(code_offsets), self._vector([graph]), self._vector(buffers)
        t.ModelStart(b)
        t.ModelAddVersion(b, 3)
        t.ModelAddOperatorCodes(b, codes_vec)
        t.ModelAddSubgraphs(b, graphs_vec)
        t.ModelAddBuffers(b, buffers_vec)
        b.Finish(t.ModelEnd(b), file_identifier=b"TFL3")
        out = bytes(b.Output())
        at = len(out)
        for k, raw in enumerate(outside):
            out = out.replace(struct.pack("<Q", self.PLACEHOLDER + k), struct.pack("<Q", at))
            at += len(raw)
        return out + b"".join(outside)


CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, FULLY_CONNECTED, PAD = 3, 4, 6, 9, 34
FLOAT32, FLOAT16, INT32, UINT8, INT8 = 0, 1, 2, 3, 9


def test_tflite_layouts_and_dequantisation(tmp_path):
    rng = np.random.default_rng(3)
    conv = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)  # PyTorch OIHW, what must come back
    bias = rng.normal(size=4).astype(np.float32)
    dw = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(2, 36)).astype(np.float32)
    q = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    q_scales = np.array([0.5, 0.25, 0.125, 2.0], np.float32)
    u = rng.integers(0, 256, size=(2, 6)).astype(np.uint8)
    half = rng.normal(size=(4, 3, 1, 1)).astype(np.float16)

    tb = TfliteBuilder()
    x = tb.tensor("input", (1, 5, 5, 3), FLOAT32)
    w1 = tb.tensor("conv/filter", (4, 3, 3, 3), FLOAT32, conv.transpose(0, 2, 3, 1))  # OHWI
    b1 = tb.tensor("conv/bias", (4,), FLOAT32, bias)
    a1 = tb.tensor("a1", (1, 5, 5, 4), FLOAT32)
    tb.op(CONV_2D, [x, w1, b1], [a1])
    w2 = tb.tensor("dw/filter", (1, 3, 3, 4), FLOAT32, dw.transpose(1, 2, 3, 0))  # 1HWO
    a2 = tb.tensor("a2", (1, 5, 5, 4), FLOAT32)
    tb.op(DEPTHWISE_CONV_2D, [a1, w2], [a2])
    w3 = tb.tensor("fc/weights", (2, 36), FLOAT32, fc)  # (out, in), as PyTorch
    a3 = tb.tensor("a3", (1, 2), FLOAT32)
    tb.op(FULLY_CONNECTED, [a2, w3], [a3])
    pads = tb.tensor("pad/paddings", (4, 2), INT32, np.ones((4, 2), np.int32))
    a4 = tb.tensor("a4", (1, 7, 7, 3), FLOAT32)
    tb.op(PAD, [x, pads], [a4])
    w5 = tb.tensor("qconv/filter", (4, 3, 3, 3), INT8, q.transpose(0, 2, 3, 1), quant=(q_scales, [0] * 4, 0))
    a5 = tb.tensor("a5", (1, 5, 5, 4), FLOAT32)
    tb.op(CONV_2D, [x, w5], [a5])
    w6 = tb.tensor("ufc/weights", (2, 6), UINT8, u, quant=([0.5], [128], 0))
    a6 = tb.tensor("a6", (1, 2), FLOAT32)
    tb.op(FULLY_CONNECTED, [a5, w6], [a6])
    w7 = tb.tensor("hconv/filter_fp16", (4, 1, 1, 3), FLOAT16, half.transpose(0, 2, 3, 1))
    d7 = tb.tensor("hconv/filter", (4, 1, 1, 3), FLOAT32)
    tb.op(DEQUANTIZE, [w7], [d7])
    a7 = tb.tensor("a7", (1, 5, 5, 4), FLOAT32)
    tb.op(CONV_2D, [x, d7], [a7])
    path = tmp_path / "m.tflite"
    path.write_bytes(tb.build())

    wf = read_weights(path)
    assert wf.format == "tflite"
    assert list(wf.tensors) == ["conv/filter", "conv/bias", "dw/filter", "fc/weights", "qconv/filter",
                                "ufc/weights", "hconv/filter_fp16"]
    assert torch.equal(wf.tensors["conv/filter"], torch.from_numpy(conv))
    assert torch.equal(wf.tensors["conv/bias"], torch.from_numpy(bias))
    assert torch.equal(wf.tensors["dw/filter"], torch.from_numpy(dw))
    assert torch.equal(wf.tensors["fc/weights"], torch.from_numpy(fc))
    expected_q = q.astype(np.float32) * q_scales[:, None, None, None]  # per output channel
    assert torch.equal(wf.tensors["qconv/filter"], torch.from_numpy(expected_q))
    assert torch.equal(wf.tensors["ufc/weights"], torch.from_numpy((u.astype(np.float32) - 128) * 0.5))
    assert torch.equal(wf.tensors["hconv/filter_fp16"], torch.from_numpy(half.astype(np.float32)))
    records = json.loads(wf.metadata["tensors"])
    assert records["conv/filter"]["converted"] == "OHWI to OIHW"
    assert records["dw/filter"]["converted"] == "1HWO to O1HW"
    assert "converted" not in records["fc/weights"]
    assert records["qconv/filter"]["converted"] == "int8 dequantized per channel, OHWI to OIHW"
    assert records["hconv/filter_fp16"]["converted"] == "float16 to float32, OHWI to OIHW"
    assert records["conv/bias"]["type"] == "CONV_2D" and records["conv/bias"]["input"] == "2"
    assert wf.metadata["left_out"] == "1 integer constants (shapes, paddings, axes)"

    # An int8 weight with no scale cannot be dequantized: refused, naming it.
    tb = TfliteBuilder()
    x = tb.tensor("input", (1, 5, 5, 3), FLOAT32)
    w = tb.tensor("raw/filter", (4, 3, 3, 3), INT8, q.transpose(0, 2, 3, 1))
    tb.op(CONV_2D, [x, w], [tb.tensor("y", (1, 5, 5, 4), FLOAT32)])
    (tmp_path / "raw.tflite").write_bytes(tb.build())
    with pytest.raises(TransferKitError, match="'raw/filter' is int8 without a scale and zero point"):
        read_weights(tmp_path / "raw.tflite")


@needs_shared
def test_rfb320_tflite_filters_are_the_pth_convolutions_in_pytorch_layout():
    """The TFLite export folded BatchNorm into each convolution except the dilated one (TF runs it
    through SpaceToBatchND, which stops the folding): every filter equals either the .pth
    convolution with its BatchNorm folded (the Caffe file holds exactly those) or the .pth
    convolution itself, one to one."""
    pytest.importorskip("tflite")
    wf = read_weights(RFB_TFLITE)
    records = json.loads(wf.metadata["tensors"])
    filters = [t for n, t in wf.tensors.items() if records[n]["input"] == "1" and t.ndim == 4]
    assert len(filters) == 52
    folded = [t for n, t in read_weights(RFB / "caffe/model/RFB-320/RFB-320.caffemodel").tensors.items()
              if n.endswith(".weight")]
    pth = torch.load(RFB / "models/pretrained/version-RFB-320.pth", map_location="cpu", weights_only=True)
    plain = [t for t in pth.values() if t.ndim == 4]
    matched, unfolded = set(), 0
    for f in filters:
        # Folding in float32 by two different tools agrees to a few 1e-4 where a variance is tiny.
        hit = next((i for i, c in enumerate(folded) if i not in matched and c.shape == f.shape
                    and rel_err(f, c) < 1e-3), None)
        if hit is None:
            assert any(p.shape == f.shape and rel_err(f, p) < 1e-6 for p in plain)
            unfolded += 1
        else:
            matched.add(hit)
    assert (len(matched), unfolded) == (51, 1)
    assert wf.metadata["converted"] == "OHWI to OIHW: 34; 1HWO to O1HW: 18"


@needs_shared
@pytest.mark.parametrize(("path", "fmt", "count"), [
    ("models/onnx/version-RFB-320.onnx", "onnx", 244),
    ("models/onnx/version-RFB-320_without_postprocessing.onnx", "onnx", 244),
    ("tflite/pretrained/version-RFB-320_without_postprocessing.tflite", "tflite", 107),
])
def test_inspect_json_on_real_files(path, fmt, count, capsys):
    pytest.importorskip(fmt)
    assert main(["weights", "inspect", "--json", str(RFB / path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["tensors"], len(info["entries"])) == (fmt, count, count)


def test_tflite_damaged_files(tmp_path, monkeypatch):
    pytest.importorskip("tflite")
    flatbuffers = pytest.importorskip("flatbuffers")
    tb = TfliteBuilder()
    x = tb.tensor("input", (1, 5, 5, 3), FLOAT32)
    w = tb.tensor("f", (4, 3, 3, 3), FLOAT32, np.ones((4, 3, 3, 3), np.float32))
    tb.op(CONV_2D, [x, w], [tb.tensor("y", (1, 5, 5, 4), FLOAT32)])
    data = tb.build()
    (tmp_path / "cut.tflite").write_bytes(data[:200])
    with pytest.raises(TransferKitError, match="cut.tflite: "):
        read_weights(tmp_path / "cut.tflite")
    # A shape that asks for more values than the buffer holds.
    tb.tensors[1] = ("f", (4, 3, 3, 30), FLOAT32, np.ones((4, 3, 3, 3), np.float32), None)
    tb.b = flatbuffers.Builder(1024)
    (tmp_path / "shape.tflite").write_bytes(tb.build())
    with pytest.raises(TransferKitError, match=r"tensor 'f' of shape \[4, 3, 3, 30\] float32 has 432 bytes"):
        read_weights(tmp_path / "shape.tflite")
    monkeypatch.setitem(sys.modules, "tflite", None)
    with pytest.raises(TransferKitError, match=r"needs the tflite package: pip install 'transferkit\[tflite\]'"):
        read_weights(tmp_path / "shape.tflite")


# ---- ONNX files built here, tensor by tensor ----

def save_onnx(path, initializers, nodes=(), opsets=(("", 13),), producer=("", ""), sparse=()):
    """A model of the given initializers and nodes (graph inputs and outputs are not needed to read it)."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    graph = helper.make_graph(list(nodes), "g", [], [], initializer=list(initializers),
                              sparse_initializer=list(sparse))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              producer_name=producer[0], producer_version=producer[1])
    onnx.save_model(model, str(path))
    return path


def error_text(path, reader=read_weights) -> str:
    with pytest.raises(TransferKitError) as excinfo:
        reader(path)
    return str(excinfo.value)


def test_onnx_tensors_in_first_use_order_with_their_users_dtypes_and_metadata(tmp_path):
    onnx = pytest.importorskip("onnx")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    helper, nph, TP = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    inits = [
        helper.make_tensor("steps", TP.INT64, [2], [7, -3]),  # used by no node
        helper.make_tensor("fc.bias", TP.FLOAT, [2], [0.5, -1.5]),
        helper.make_tensor("conv.weight", TP.FLOAT, [1, 1, 2, 2], [1.0, 2.0, 3.0, 4.0]),
        helper.make_tensor("labels", TP.STRING, [2], [b"cat", b"dog"]),  # not weights: left out, and the
        helper.make_tensor("names", TP.STRING, [1], [b"x"]),  # tensors after them still read
        nph.from_array(np.array([1.5, -2.0, 0.25], ml_dtypes.bfloat16), "bf"),
        nph.from_array(np.array([[5.0, 6.0], [7.0, 8.0]], np.float32), "fc.weight"),  # raw_data
        helper.make_tensor("conv.bias", TP.FLOAT, [1], [0.125]),
        helper.make_tensor("half", TP.FLOAT16, [2], [0.5, 3.0]),
        nph.from_array(np.array([1, -2, 3], ml_dtypes.int4), "nibbles"),  # two values a byte
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MatMul", ["r", "fc.weight"], ["m"]),  # no name: op type and index
        helper.make_node("Add", ["m", "fc.bias"], ["a"]),
        helper.make_node("Mul", ["fc.bias", "half"], ["s"], name="scale"),  # fc.bias keeps its first user
        helper.make_node("Mul", ["s", "bf", "nibbles"], ["y"], name="tail"),
    ]
    path = save_onnx(tmp_path / "m.onnx", inits, nodes, opsets=(("", 13), ("com.microsoft", 1)),
                     producer=("maker", "2.1"))
    wf = read_weights(path)
    assert (wf.format, wf.path) == ("onnx", path)
    assert list(wf.tensors) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias", "half", "bf", "nibbles",
                                "steps"]
    expected = {
        "conv.weight": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]),
        "conv.bias": torch.tensor([0.125]),
        "fc.weight": torch.tensor([[5.0, 6.0], [7.0, 8.0]]),
        "fc.bias": torch.tensor([0.5, -1.5]),
        "half": torch.tensor([0.5, 3.0], dtype=torch.float16),
        "bf": torch.tensor([1.5, -2.0, 0.25]),
        "nibbles": torch.tensor([1.0, -2.0, 3.0]),
        "steps": torch.tensor([7, -3]),
    }
    for name, t in expected.items():
        got = wf.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    records = json.loads(wf.metadata.pop("tensors"))
    assert records == {
        "conv.weight": {"source": "conv.weight", "layer": "conv1", "type": "Conv", "dtype": "FLOAT"},
        "conv.bias": {"source": "conv.bias", "layer": "conv1", "type": "Conv", "dtype": "FLOAT"},
        "fc.weight": {"source": "fc.weight", "layer": "MatMul_2", "type": "MatMul", "dtype": "FLOAT"},
        "fc.bias": {"source": "fc.bias", "layer": "Add_3", "type": "Add", "dtype": "FLOAT"},
        "half": {"source": "half", "layer": "scale", "type": "Mul", "dtype": "FLOAT16"},
        "bf": {"source": "bf", "layer": "tail", "type": "Mul", "dtype": "BFLOAT16",
               "converted": "BFLOAT16 to float32"},
        "nibbles": {"source": "nibbles", "layer": "tail", "type": "Mul", "dtype": "INT4",
                    "converted": "INT4 to float32"},
        "steps": {"source": "steps", "layer": "", "type": "unused", "dtype": "INT64"},
    }
    assert wf.metadata == {
        "source_format": "onnx",
        "layers": json.dumps([["conv1", "Conv"], ["MatMul_2", "MatMul"], ["Add_3", "Add"], ["scale", "Mul"],
                              ["tail", "Mul"], ["", "unused"]]),
        "converted": "BFLOAT16 to float32: 1; INT4 to float32: 1",
        "opset": "ai.onnx:13,com.microsoft:1",
        "producer": "maker 2.1",
        "skipped": "labels, names",
    }

    # No producer version, nothing skipped: no trailing space, no "skipped" entry.
    path = save_onnx(tmp_path / "p.onnx", [inits[1]], [nodes[3]], producer=("maker", ""))
    wf = read_weights(path)
    assert (wf.metadata["producer"], wf.metadata["opset"], "skipped" in wf.metadata) == ("maker", "ai.onnx:13", False)


def test_onnx_damaged_files_are_refused_in_one_line_naming_file_and_initializer(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    from transferkit.weights.formats import onnx_file

    helper, TP = onnx.helper, onnx.TensorProto

    def weight(name="w", dims=(2, 2), values=(1.0, 2.0, 3.0, 4.0)):
        return helper.make_tensor(name, TP.FLOAT, list(dims), list(values))

    good = save_onnx(tmp_path / "good.onnx", [weight()])
    (tmp_path / "cut.onnx").write_bytes(good.read_bytes()[:-5])
    assert error_text(tmp_path / "cut.onnx") == (
        f"{tmp_path / 'cut.onnx'}: truncated or damaged ONNX file (Error parsing message with type "
        "'onnx.ModelProto': Wire format was corrupt); re-export it")
    missing = tmp_path / "missing.onnx"
    assert error_text(missing, onnx_file.read) == f"{missing}: cannot read (No such file or directory)"

    sparse = helper.make_sparse_tensor(helper.make_tensor("sv", TP.FLOAT, [1], [1.0]),
                                       helper.make_tensor("si", TP.INT64, [1], [0]), [3])
    path = save_onnx(tmp_path / "sparse.onnx", [weight()], sparse=[sparse])
    assert error_text(path) == f"{path}: sparse initializer 'sv' is not read; export the model with dense weights"
    path = save_onnx(tmp_path / "twice.onnx", [weight(), weight("v"), weight()])
    assert error_text(path) == f"{path}: the initializer name 'w' appears twice"
    path = save_onnx(tmp_path / "none.onnx", [], [helper.make_node("Relu", ["x"], ["y"])])
    assert error_text(path) == f"{path}: the ONNX graph has no initializers (no stored weights)"

    unknown = weight()
    unknown.data_type = 999
    path = save_onnx(tmp_path / "type.onnx", [unknown])
    assert error_text(path) == f"{path}: initializer 'w' has unknown data type 999"
    short = weight()
    short.ClearField("float_data")
    short.raw_data = np.array([1, 2, 3], np.float32).tobytes()
    path = save_onnx(tmp_path / "raw.onnx", [short])
    assert error_text(path) == (f"{path}: initializer 'w' holds 12 bytes for shape [2, 2]; the file is damaged, "
                                "re-export it")
    # 2**64 values: counted exactly, not wrapped round to 0 (which the empty data would match).
    huge = weight(dims=(0,), values=())
    huge.dims[:] = [2**32, 2**32, 1]
    huge.raw_data = b""
    path = save_onnx(tmp_path / "huge.onnx", [huge])
    assert error_text(path) == (f"{path}: initializer 'w' holds 0 bytes for shape [4294967296, 4294967296, 1]; "
                                "the file is damaged, re-export it")
    few = weight(dims=(1, 3), values=(1.0, 2.0, 3.0))
    few.dims[:] = [2, 2]
    path = save_onnx(tmp_path / "few.onnx", [few])
    assert error_text(path) == (f"{path}: initializer 'w' cannot be read (cannot reshape array of size 3 into "
                                "shape (2,2)); the file is damaged, re-export it")

    # What the protobuf and onnx layers raise otherwise: the first line of the message, or the type.
    for exc, shown in [(ValueError(""), "ValueError"), (RuntimeError("first line\nsecond line"), "first line"),
                       (onnx_file.DecodeError("bad wire"), "bad wire")]:
        def fail(*args, exc=exc, **kw):
            raise exc
        monkeypatch.setattr(onnx, "load_model", fail)
        assert error_text(good) == f"{good}: truncated or damaged ONNX file ({shown}); re-export it"
    monkeypatch.setattr(onnx, "load_model", lambda *a, **kw: (_ for _ in ()).throw(PermissionError(13, "Denied")))
    assert error_text(good) == f"{good}: cannot read (Denied)"


def test_onnx_external_data_is_read_at_its_offset_and_bounded_by_its_shape(tmp_path):
    onnx = pytest.importorskip("onnx")
    TP = onnx.TensorProto
    folder = tmp_path / "model"
    folder.mkdir()
    # Two float32 values of another tensor, then the four of w.
    (folder / "w.data").write_bytes(np.array([9.0, 10.0, 1.0, 2.0, 3.0, 4.0], np.float32).tobytes())

    def external(name="w", dims=(2, 2), **entries):
        tensor = TP(name=name, data_type=TP.FLOAT, dims=list(dims), data_location=TP.EXTERNAL)
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)
        return tensor

    path = save_onnx(folder / "m.onnx", [external(location="w.data", offset="8", length="16"),
                                         external("head", (2,), location="w.data")])  # no offset: from 0
    wf = read_weights(path)
    assert list(wf.tensors) == ["w", "head"]
    assert torch.equal(wf.tensors["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(wf.tensors["head"], torch.tensor([9.0, 10.0]))

    def refused(name, **entries):
        return error_text(save_onnx(folder / name, [external(**entries)]))

    p = folder / "none.onnx"
    assert refused("none.onnx", offset="8") == (
        f"{p}: initializer 'w' points to external data '', which is not a file inside the model's folder; put "
        "the data file beside the model")
    inside = str(folder / "w.data")  # the right file, but named by an absolute path: refused all the same
    p = folder / "absolute.onnx"
    assert refused("absolute.onnx", location=inside) == (
        f"{p}: initializer 'w' points to external data {inside!r}, which is not a file inside the model's "
        "folder; put the data file beside the model")
    for name, entries in [("offset.onnx", {"offset": "eight"}), ("negative.onnx", {"offset": "-1"}),
                          ("size.onnx", {"length": "sixteen"})]:
        p = folder / name
        assert refused(name, location="w.data", **entries) == (
            f"{p}: initializer 'w' has a malformed external data offset or length"), name
    p = folder / "length.onnx"
    assert refused("length.onnx", location="w.data", offset="8", length="12") == (
        f"{p}: initializer 'w' declares 12 bytes of external data for shape [2, 2] (16 bytes)")
    p = folder / "past.onnx"
    assert refused("past.onnx", location="w.data", offset="100") == (
        f"{p}: damaged or truncated file: initializer 'w' in w.data at offset 100 declares 16 bytes but only 0 "
        "remain; re-download or re-export it")
    p = folder / "tail.onnx"
    assert refused("tail.onnx", location="w.data", offset="16") == (
        f"{p}: damaged or truncated file: initializer 'w' in w.data at offset 16 declares 16 bytes but only 8 "
        "remain; re-download or re-export it")
    # 2**64 values of 4 bytes: counted exactly, not wrapped round to 0 bytes.
    p = folder / "huge.onnx"
    assert refused("huge.onnx", dims=(2**32, 2**32, 1), location="w.data") == (
        f"{p}: damaged or truncated file: initializer 'w' in w.data at offset 0 declares "
        "73,786,976,294,838,206,464 bytes but only 24 remain; re-download or re-export it")


def test_onnx_external_data_of_an_unknown_type_or_of_two_values_a_byte(tmp_path):
    onnx = pytest.importorskip("onnx")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    TP = onnx.TensorProto
    (tmp_path / "w.data").write_bytes(b"\0" * 16)
    unknown = TP(name="w", data_type=999, dims=[2], data_location=TP.EXTERNAL)
    unknown.external_data.add(key="location", value="w.data")
    path = save_onnx(tmp_path / "type.onnx", [unknown])
    assert error_text(path) == f"{path}: initializer 'w' has unknown data type 999"

    # Three int4 values take two bytes, as onnx itself writes them out (with their length).
    nibbles = onnx.numpy_helper.from_array(np.array([1, -2, 3, 7, -8], ml_dtypes.int4), "nibbles")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[nibbles]))
    onnx.save_model(model, str(tmp_path / "int4.onnx"), save_as_external_data=True, location="int4.data",
                    size_threshold=0)
    assert (tmp_path / "int4.data").read_bytes() == bytes([0xE1, 0x73, 0x08])
    wf = read_weights(tmp_path / "int4.onnx")
    assert torch.equal(wf.tensors["nibbles"], torch.tensor([1.0, -2.0, 3.0, 7.0, -8.0]))
    # An even count fills its last byte: four values, two bytes, not three.
    nibbles = onnx.numpy_helper.from_array(np.array([1, -2, 3, 7], ml_dtypes.int4), "nibbles")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[nibbles]))
    onnx.save_model(model, str(tmp_path / "even.onnx"), save_as_external_data=True, location="even.data",
                    size_threshold=0)
    assert (tmp_path / "even.data").read_bytes() == bytes([0xE1, 0x73])
    assert torch.equal(read_weights(tmp_path / "even.onnx").tensors["nibbles"], torch.tensor([1.0, -2.0, 3.0, 7.0]))


TRANSPOSE_CONV, CONV_3D, ADD, MUL, CUSTOM = 67, 132, 0, 18, 32
INT64, STRING, INT16, FLOAT64, INT4, BFLOAT16 = 4, 5, 7, 10, 17, 18


def test_tflite_every_layout_quantisation_and_record_in_graph_order(tmp_path):
    conv = np.arange(24, dtype=np.float32).reshape(3, 2, 2, 2) - 12  # OIHW
    tconv = np.arange(12, dtype=np.float32).reshape(3, 2, 1, 2) * 0.5  # PyTorch ConvTranspose (in, out, H, W)
    c3d = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 1, 2) + 100  # OIDHW
    tb = TfliteBuilder()
    act = lambda name: tb.tensor(name, (1, 2), FLOAT32)  # noqa: E731
    x = act("x")
    tb.op(CONV_2D, [x, tb.tensor("conv/w", (3, 2, 2, 2), FLOAT32, conv.transpose(0, 2, 3, 1)),
                    tb.tensor("conv/b", (3,), FLOAT32, np.array([0.5, -0.5, 1.0], np.float32))], [a0 := act("a0")])
    tb.op(TRANSPOSE_CONV, [tb.tensor("tconv/shape", (4,), INT32, np.array([1, 4, 4, 2], np.int32)),
                           tb.tensor("tconv/w", (2, 1, 2, 3), FLOAT32, tconv.transpose(1, 2, 3, 0)), a0],
          [a1 := act("a1")])
    tb.op(CONV_3D, [act("free"), tb.tensor("c3d/w", (2, 1, 2, 1, 2), FLOAT32, c3d.transpose(2, 3, 4, 1, 0))],
          [act("a2")])
    q = np.array([5, -1, 3, 7, 3, -125], np.int8).reshape(2, 1, 1, 3)  # OHWI, a scale per O, one zero point
    tb.op(DEQUANTIZE, [tb.tensor("q/w", (2, 1, 1, 3), INT8, q, quant=([0.5, 0.25], [3], 0))],
          [d := tb.tensor("q/w_dequantized", (2, 1, 1, 3), FLOAT32)])
    tb.op(CONV_2D, [a1, d], [a4 := act("a4")])
    tb.op(FULLY_CONNECTED, [a4, tb.tensor("fc/w", (2, 3), INT8, np.array([[1, -1, 3], [5, -3, 0]], np.int8),
                                          quant=([0.5], [-1], 0)),
                            tb.tensor("fc/b", (2,), INT32, np.array([8, -4], np.int32),
                                      quant=([0.125, 0.25], None, 0))],
          [a5 := act("a5")])
    tb.op(ADD, [a5, tb.tensor("", (2,), FLOAT32, np.array([1.0, 2.0], np.float32))], [a6 := act("a6")])
    bf16 = np.array([0x3FC0, 0xBE80], np.uint16)  # bfloat16 1.5 and -0.25
    tb.op(MUL, [a6, tb.tensor("scale", (2,), BFLOAT16, bf16)], [a7 := act("a7")])
    tb.op(FULLY_CONNECTED, [a7, tb.tensor("fc2/w", (1, 2), INT16, np.array([[1, 2]], np.int16))], [a8 := act("a8")])
    tb.op(MUL, [a8, tb.tensor("scale", (1,), FLOAT32, np.array([4.0], np.float32))], [a9 := act("a9")])
    tb.op(ADD, [a9, tb.tensor("mask", (2,), UINT8, np.array([1, 0], np.uint8))], [act("a10")])
    tb.tensor("orphan", (2,), FLOAT64, np.array([0.5, 0.25]))
    tb.tensor("nibbles", (4,), INT4, np.array([0x21, 0x43], np.uint8))
    tb.tensor("int16q", (3,), INT16, np.array([4, -6, 0], np.int16), quant=([0.5], [2], 0))
    path = tmp_path / "m.tflite"
    path.write_bytes(tb.build())

    wf = read_weights(path)
    assert (wf.format, wf.path) == ("tflite", path)
    expected = {
        "conv/w": torch.from_numpy(conv),
        "conv/b": torch.tensor([0.5, -0.5, 1.0]),
        "tconv/w": torch.from_numpy(tconv),
        "c3d/w": torch.from_numpy(c3d),
        "q/w": torch.tensor([1.0, -2.0, 0.0, 1.0, 0.0, -32.0]).reshape(2, 3, 1, 1),
        "fc/w": torch.tensor([[1.0, 0.0, 2.0], [3.0, -1.0, 0.5]]),
        "fc/b": torch.tensor([1.0, -1.0]),
        "tensor_16": torch.tensor([1.0, 2.0]),
        "scale": torch.tensor([1.5, -0.25]),
        "scale#22": torch.tensor([4.0]),
        "orphan": torch.tensor([0.5, 0.25], dtype=torch.float64),
        "int16q": torch.tensor([1.0, -4.0, -1.0]),
    }
    assert list(wf.tensors) == list(expected)
    for name, t in expected.items():
        got = wf.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        assert got.is_contiguous(), name

    def record(source, layer, kind, dtype, index, pos, converted=None):
        r = {"source": source, "layer": layer, "type": kind, "dtype": dtype}
        r.update({"converted": converted} if converted else {})
        return {**r, "tensor_index": str(index), "input": str(pos)}

    assert json.loads(wf.metadata.pop("tensors")) == {
        "conv/w": record("conv/w", "op0", "CONV_2D", "float32", 1, 1, "OHWI to OIHW"),
        "conv/b": record("conv/b", "op0", "CONV_2D", "float32", 2, 2),
        "tconv/w": record("tconv/w", "op1", "TRANSPOSE_CONV", "float32", 5, 1, "OHWI to IOHW"),
        "c3d/w": record("c3d/w", "op2", "CONV_3D", "float32", 8, 1, "DHWIO to OIDHW"),
        "q/w": record("q/w", "op4", "CONV_2D", "int8", 10, 1, "int8 dequantized per channel, OHWI to OIHW"),
        "fc/w": record("fc/w", "op5", "FULLY_CONNECTED", "int8", 13, 1, "int8 dequantized"),
        "fc/b": record("fc/b", "op5", "FULLY_CONNECTED", "int32", 14, 2, "int32 dequantized per channel"),
        "tensor_16": record("tensor_16", "op6", "ADD", "float32", 16, 1),
        "scale": record("scale", "op7", "MUL", "bfloat16", 18, 1, "bfloat16 to float32"),
        "scale#22": record("scale", "op9", "MUL", "float32", 22, 1),
        "orphan": record("orphan", "", "unused", "float64", 26, -1),
        "int16q": record("int16q", "", "unused", "int16", 28, -1, "int16 dequantized"),
    }
    assert json.loads(wf.metadata.pop("inputs")) == {
        "op0": [], "op1": ["op0"], "op2": [], "op4": ["op1"], "op5": ["op4"], "op6": ["op5"], "op7": ["op6"],
        "op9": ["op7"]}  # op8 holds no tensor (its int16 weight has no scale): op9 reads op7 through it
    assert wf.metadata == {
        "source_format": "tflite",
        "layers": json.dumps([["op0", "CONV_2D"], ["op1", "TRANSPOSE_CONV"], ["op2", "CONV_3D"], ["op4", "CONV_2D"],
                              ["op5", "FULLY_CONNECTED"], ["op6", "ADD"], ["op7", "MUL"], ["op9", "MUL"],
                              ["", "unused"]]),
        "converted": "OHWI to OIHW: 1; OHWI to IOHW: 1; DHWIO to OIDHW: 1; int8 dequantized per channel, OHWI to "
                     "OIHW: 1; int8 dequantized: 1; int32 dequantized per channel: 1; bfloat16 to float32: 1; "
                     "int16 dequantized: 1",
        "version": "3",
        "left_out": "3 integer constants (shapes, paddings, axes); 1 type 17",
    }


def small_tflite(tmp_path, name="m.tflite", edit=None, **options):
    """input -> CONV_2D with a 2-value float32 filter 'f' (given options) -> y; `edit(tb)` changes it first."""
    tb = TfliteBuilder()
    x = tb.tensor("input", (1, 5, 5, 3), FLOAT32)
    w = tb.tensor("f", options.pop("shape", (2,)), FLOAT32, np.array([1.5, -2.5], np.float32), **options)
    tb.op(CONV_2D, [x, w], [tb.tensor("y", (1, 5, 5, 4), FLOAT32)])
    if edit is not None:
        edit(tb)
    path = tmp_path / name
    path.write_bytes(tb.build())
    return path


def test_tflite_damaged_files_are_refused_in_one_line_naming_the_file(tmp_path, monkeypatch):
    tflite = pytest.importorskip("tflite")
    import re

    from transferkit.weights.formats import tflite_file

    missing = tmp_path / "missing.tflite"
    assert error_text(missing, tflite_file.read) == f"{missing}: cannot read (No such file or directory)"
    for name, data in [("short.tflite", b"\0\0\0\0TFL"), ("other.tflite", b"\0\0\0\0TFL4")]:
        (tmp_path / name).write_bytes(data)
        assert error_text(tmp_path / name, tflite_file.read) == (
            f"{tmp_path / name}: not a TFLite file (no TFL3 identifier)")
    (tmp_path / "empty.tflite").write_bytes(b"\0\0\0\0TFL3")  # 8 bytes: a root table with no fields
    p = tmp_path / "empty.tflite"
    assert error_text(p) == f"{p}: the TFLite model has no subgraph"

    good = small_tflite(tmp_path)
    assert torch.equal(read_weights(good).tensors["f"], torch.tensor([1.5, -2.5]))
    (tmp_path / "cut.tflite").write_bytes(good.read_bytes()[:200])
    p = tmp_path / "cut.tflite"
    assert re.fullmatch(re.escape(f"{p}: truncated or damaged TFLite file (error: unpack_from requires a buffer of ")
                        + r"at least \d+ bytes .*\); re-export it", error_text(p))
    for exc in [IndexError("i"), ValueError("v"), TypeError("t"), OverflowError("o"), struct.error("s"),
                UnicodeDecodeError("utf-8", b"\xff", 0, 1, "u")]:
        def fail(*args, exc=exc):
            raise exc
        monkeypatch.setattr(tflite_file, "_read", fail)
        assert error_text(good) == (f"{good}: truncated or damaged TFLite file ({type(exc).__name__}: {exc}); "
                                    "re-export it")
    monkeypatch.undo()

    p = small_tflite(tmp_path, "opcode.tflite", lambda tb: tb.ops.append((1, [0], [2])))  # one opcode only
    assert error_text(p) == f"{p}: damaged TFLite file: operator 1 has opcode index 1"
    p = small_tflite(tmp_path, "buffer.tflite", buffer=2)  # buffers 0 (empty) and 1 only
    assert error_text(p) == f"{p}: damaged TFLite file: tensor 1 points to buffer 2 of 2"
    p = small_tflite(tmp_path, "sparse.tflite", sparse=True)
    assert error_text(p) == f"{p}: tensor 'f' is stored sparse; densify the model before reading it"
    p = small_tflite(tmp_path, "negative.tflite", shape=(-1, -2))  # -1 * -2 values would be the right count
    assert error_text(p) == f"{p}: damaged TFLite file: tensor 'f' of shape [-1, -2] float32 has 8 bytes of data"

    def no_weights(tb):
        tb.tensors[1] = ("f", (2,), FLOAT32, None, None)
    p = small_tflite(tmp_path, "none.tflite", no_weights)
    assert error_text(p) == f"{p}: the TFLite model holds no weight tensors"

    for ttype, dtype in [(INT8, "int8"), (UINT8, "uint8")]:
        def unscaled(tb, ttype=ttype):
            tb.tensors[1] = ("raw/filter", (2,), ttype, np.array([1, 2], np.uint8), None)
        p = small_tflite(tmp_path, f"{dtype}.tflite", unscaled)
        assert error_text(p) == (f"{p}: tensor 'raw/filter' is {dtype} without a scale and zero point, so it "
                                 "cannot be dequantized; export the model with float weights")

    # Data stored after the flatbuffer (models over 2 GB): read from there, and its end checked.
    p = small_tflite(tmp_path, "outside.tflite", outside=True)
    data = p.read_bytes()
    assert data.endswith(np.array([1.5, -2.5], np.float32).tobytes())
    assert torch.equal(read_weights(p).tensors["f"], torch.tensor([1.5, -2.5]))
    p.write_bytes(data[:-1])
    assert error_text(p) == (f"{p}: damaged or truncated file: the buffer of tensor 1 declares {len(data):,} bytes "
                             f"but only {len(data) - 1:,} remain; re-download or re-export it")

    # Every list's length is checked against the file's size (4 bytes an entry at least) before it is walked.
    size = good.stat().st_size
    for owner, accessor, what in [("Model", "SubgraphsLength", "subgraph"),
                                  ("Model", "OperatorCodesLength", "operator code"),
                                  ("SubGraph", "TensorsLength", "tensor"), ("Model", "BuffersLength", "buffer"),
                                  ("SubGraph", "OperatorsLength", "operator")]:
        monkeypatch.setattr(getattr(tflite, owner), accessor, lambda self: size // 4 + 1)
        assert error_text(good) == (
            f"{good}: damaged or truncated file: the {what} list ({size // 4 + 1:,} entries) declares "
            f"{(size // 4 + 1) * 4:,} bytes but only {size:,} remain; re-download or re-export it"), what
        monkeypatch.undo()


def test_tflite_custom_and_unknown_operators_and_dequantize_without_inputs_or_outputs(tmp_path):
    tb = TfliteBuilder()
    tb.custom = b"MyOp"
    const = lambda name, value: tb.tensor(name, (1,), FLOAT32, np.array([value], np.float32))  # noqa: E731
    x, c1, c6, a0 = tb.tensor("x", (1, 1), FLOAT32), const("c1", 1.0), const("c6", 6.0), tb.tensor("a0", (1,), 0)
    c2, a1, c3, a2 = const("c2", 2.0), tb.tensor("a1", (1,), 0), const("c3", 3.0), tb.tensor("a2", (1,), 0)
    a3, a4, c4, a6 = tb.tensor("a3", (1,), 0), tb.tensor("a4", (1,), 0), const("c4", 4.0), tb.tensor("a6", (1,), 0)
    tb.op(CUSTOM, [x, c1, c6], [a0])
    tb.op(1000, [a0, c2], [a1])  # an operator this tflite package does not know
    tb.op(ADD, [a1, c3, c6], [a2])  # c6 is first used by op0: it goes with op0
    tb.op(MUL, [a2, c1], [a3])
    tb.op(DEQUANTIZE, [], [a4])
    tb.op(DEQUANTIZE, [c4], [])  # no output: c4 is not passed on to tensor 0's user
    tb.op(DEQUANTIZE, None, [a4])  # the same without the vectors at all
    tb.op(DEQUANTIZE, [c4], None)
    tb.op(FULLY_CONNECTED, [a3, x], [a6])
    tb.tensor("empty shape", (), FLOAT32, np.array(0.5, np.float32))  # shape [] and no shape read alike
    path = tmp_path / "m.tflite"
    path.write_bytes(tb.build())
    wf = read_weights(path)
    assert list(wf.tensors) == ["c1", "c6", "c2", "c3", "c4", "empty shape"]
    assert [t.item() for t in wf.tensors.values()] == [1.0, 6.0, 2.0, 3.0, 4.0, 0.5]
    assert wf.tensors["empty shape"].shape == ()
    records = json.loads(wf.metadata["tensors"])
    assert {name: (r["layer"], r["type"], r["tensor_index"], r["input"]) for name, r in records.items()} == {
        "c1": ("op0", "CUSTOM:MyOp", "1", "1"), "c6": ("op0", "CUSTOM:MyOp", "2", "2"),
        "c2": ("op1", "1000", "4", "1"), "c3": ("op2", "ADD", "6", "1"), "c4": ("op5", "DEQUANTIZE", "10", "0"),
        "empty shape": ("", "unused", "12", "-1")}
    assert json.loads(wf.metadata["inputs"]) == {"op0": [], "op1": ["op0"], "op2": ["op1"], "op5": []}
    assert (wf.metadata["converted"], "left_out" in wf.metadata) == ("none", False)


def test_onnx_and_tflite_sniffed_by_their_first_bytes(tmp_path):
    from transferkit.weights.formats import onnx_file, tflite_file

    p = tmp_path / "x"
    for tag in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x4A, 0x52, 0x72, 0x7A):
        assert onnx_file.sniff(p, bytes([0x08, 7, tag, 0])), tag
    for tag in (0x0A, 0x10, 0x13, 0x62, 0x7B):
        assert not onnx_file.sniff(p, bytes([0x08, 7, tag, 0])), tag
    assert [onnx_file.sniff(p, bytes([0x08, v, 0x3A, 0])) for v in (0, 1, 30, 31)] == [False, True, True, False]
    assert not onnx_file.sniff(p, bytes([0x08, 7, 0x3A]))  # 4 bytes at least
    assert not onnx_file.sniff(p, bytes([0x09, 7, 0x3A, 0]))
    assert tflite_file.sniff(p, b"\x1c\0\0\0TFL3") and tflite_file.sniff(p, b"\x1c\0\0\0TFL3\0\0\x12\0")
    assert not tflite_file.sniff(p, b"\x1c\0\0TFL3\0") and not tflite_file.sniff(p, b"\x1c\0\0\0TFL")
    assert not tflite_file.sniff(p, b"\x1c\0\0\0TFL2\0")


def test_tflite_per_channel_scales_along_any_dimension_and_damaged_ones_refused(tmp_path):
    q = np.array([[3, 4, 5], [1, 2, 3]], np.int8)

    def quantised(scales, zeros, axis):
        def edit(tb):
            tb.tensors[1] = ("q", (2, 3), INT8, q, (scales, zeros, axis))
        return read_weights(small_tflite(tmp_path, edit=edit)).tensors["q"]

    assert torch.equal(quantised([0.5, 0.25, 2.0], [1, 2, 3], 1), torch.tensor([[1.0, 0.5, 4.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(quantised([0.5, 2.0], [1, 3], 0), torch.tensor([[1.0, 1.5, 2.0], [-4.0, -2.0, 0.0]]))
    assert torch.equal(quantised([0.5, 2.0], [1], 0), torch.tensor([[1.0, 1.5, 2.0], [0.0, 2.0, 4.0]]))
    assert torch.equal(quantised([0.5, 0.25, 2.0], None, 1), torch.tensor([[1.5, 1.0, 10.0], [0.5, 0.5, 6.0]]))
    assert quantised([0.5], [3], 0).dtype == torch.float32
    p = tmp_path / "m.tflite"
    for scales, zeros, axis in [([0.5, 0.25], [0], 2), ([0.5, 0.25], [0], 5), ([0.5, 0.25, 2.0], [0], 0),
                                ([0.5], [1, 2], 0), ([0.5, 0.25], [1, 2, 3], 0)]:
        with pytest.raises(TransferKitError) as excinfo:
            quantised(scales, zeros, axis)
        assert str(excinfo.value) == (f"{p}: tensor 'q' has {len(scales)} scales for shape [2, 3] along dimension "
                                      f"{axis}; the file is damaged, re-export it"), (scales, zeros, axis)


def test_tflite_order_follows_first_use_not_storage_and_odd_tensors(tmp_path):
    tb = TfliteBuilder()
    x = tb.tensor("x", (1, 2), FLOAT32)
    late = tb.tensor("late", (1, 2), FLOAT32, np.array([[1.0, 2.0]], np.float32))
    half = tb.tensor("half", (1, 1, 1, 2), FLOAT16, np.array([0.5, -4.0], np.float16))  # OHWI
    early = tb.tensor("early", (1,), FLOAT32, np.array([3.0], np.float32))
    tb.tensor("unused", (1,), FLOAT32, np.array([5.0], np.float32))
    scalar = tb.tensor("scalar", None, FLOAT32, np.array(2.5, np.float32))  # no shape: a scalar
    tb.tensor(b"w\xff", (1,), FLOAT32, np.array([6.0], np.float32))  # a name that is not UTF-8
    tb.tensor("text", (2,), STRING, np.frombuffer(b"ab", np.uint8))
    tb.tensor("more text", (1,), STRING, np.frombuffer(b"c", np.uint8))
    # 4 * 5 * 5581 * 8681 * 49477 * 384773 = 2**64 + 4 values, counted exactly: not the 4 (wrapped round) it holds.
    tb.tensor("huge", (4, 5, 5581, 8681, 49477, 384773), FLOAT32, np.array([7.0, 7.0, 7.0, 7.0], np.float32))
    d = tb.tensor("half_dequantized", (1, 1, 1, 2), FLOAT32)
    tb.op(DEQUANTIZE, [half], [d])  # op0, but half is laid out for op3, which uses it as its filter
    tb.op(ADD, [x, early, scalar], [a := tb.tensor("a", (1, 2), FLOAT32)])
    tb.op(FULLY_CONNECTED, [a, late], [b := tb.tensor("b", (1, 1), FLOAT32)])
    tb.op(CONV_2D, [b, d], [tb.tensor("c", (1, 1, 1, 1), FLOAT32)])
    path = tmp_path / "m.tflite"
    path.write_bytes(tb.build())
    assert error_text(path) == (f"{path}: damaged TFLite file: tensor 'huge' of shape [4, 5, 5581, 8681, 49477, "
                                "384773] float32 has 16 bytes of data")

    tb.tensors[9] = ("huge", (1,), FLOAT32, np.array([7.0], np.float32), None)
    import flatbuffers
    tb.b = flatbuffers.Builder(1024)
    path.write_bytes(tb.build())
    wf = read_weights(path)
    assert list(wf.tensors) == ["early", "scalar", "late", "half", "unused", "w\ufffd", "huge"]
    assert [wf.tensors[n].tolist() for n in ["early", "scalar", "late", "unused", "w\ufffd", "huge"]] == [
        [3.0], 2.5, [[1.0, 2.0]], [5.0], [6.0], [7.0]]
    assert wf.tensors["half"].dtype == torch.float32
    assert torch.equal(wf.tensors["half"], torch.tensor([[[[0.5]], [[-4.0]]]]))
    records = json.loads(wf.metadata["tensors"])
    assert {n: (r["layer"], r["type"], r["input"]) for n, r in records.items()} == {
        "early": ("op1", "ADD", "1"), "scalar": ("op1", "ADD", "2"), "late": ("op2", "FULLY_CONNECTED", "1"),
        "half": ("op3", "CONV_2D", "1"), "unused": ("", "unused", "-1"), "w\ufffd": ("", "unused", "-1"),
        "huge": ("", "unused", "-1")}
    assert records["half"]["converted"] == "float16 to float32, OHWI to OIHW"
    assert wf.metadata["left_out"] == "2 type 5"


def test_onnx_and_tflite_without_their_package_say_what_to_install(tmp_path, monkeypatch):
    onnx_path = save_onnx(tmp_path / "m.onnx", [])
    tflite_path = small_tflite(tmp_path)
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "tflite", None)
    assert error_text(onnx_path) == "reading ONNX files needs the onnx package: pip install 'transferkit[onnx]'"
    assert error_text(tflite_path) == ("reading TFLite files needs the tflite package: pip install "
                                       "'transferkit[tflite]'")


def test_tflite_buffer_offsets_up_to_one_mean_no_data_outside(tmp_path):
    """Only an offset above 1 with a size points after the flatbuffer (the schema's rule for models over 2 GB)."""
    for offset, size in [(0, 4), (1, 4), (2, 0)]:
        p = small_tflite(tmp_path, edit=lambda tb, at=(offset, size): tb.tensor("a", (1,), FLOAT32, at=at))
        assert list(read_weights(p).tensors) == ["f"], (offset, size)
    p = small_tflite(tmp_path, edit=lambda tb: tb.tensor("a", (1,), FLOAT32, at=(2, 4)))
    wf = read_weights(p)
    assert list(wf.tensors) == ["f", "a"]
    assert wf.tensors["a"].numpy().tobytes() == p.read_bytes()[2:6]


def test_tflite_float_weight_with_quantisation_parameters_is_not_rescaled(tmp_path):
    wf = read_weights(small_tflite(tmp_path, quant=([2.0], [1], 0)))
    assert torch.equal(wf.tensors["f"], torch.tensor([1.5, -2.5]))
    assert "converted" not in json.loads(wf.metadata["tensors"])["f"]
