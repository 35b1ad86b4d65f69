"""ONNX and TFLite readers: a timm model exported to ONNX and run by onnxruntime, the RFB-320 files
against their PyTorch original, and TFLite files built here with known tensors in TFLite layouts."""

import json
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
    """Writes a one-subgraph .tflite file with the generated flatbuffers builders of the tflite package."""

    def __init__(self):
        self.tflite = pytest.importorskip("tflite")
        import flatbuffers

        self.b = flatbuffers.Builder(1024)
        self.tensors, self.ops, self.codes = [], [], []

    def tensor(self, name, shape, ttype, data: np.ndarray | None = None, quant=None) -> int:
        self.tensors.append((name, shape, ttype, data, quant))
        return len(self.tensors) - 1

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
        tensor_offsets = []
        for name, shape, ttype, data, quant in self.tensors:
            buffer_index = 0
            if data is not None:
                vec = b.CreateNumpyVector(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                t.BufferStart(b)
                t.BufferAddData(b, vec)
                buffers.append(t.BufferEnd(b))
                buffer_index = len(buffers) - 1
            q = None
            if quant is not None:
                scales, zeros, axis = quant
                sv = b.CreateNumpyVector(np.asarray(scales, np.float32))
                zv = b.CreateNumpyVector(np.asarray(zeros, np.int64))
                t.QuantizationParametersStart(b)
                t.QuantizationParametersAddScale(b, sv)
                t.QuantizationParametersAddZeroPoint(b, zv)
                t.QuantizationParametersAddQuantizedDimension(b, axis)
                q = t.QuantizationParametersEnd(b)
            name_off = b.CreateString(name)
            shape_off = b.CreateNumpyVector(np.asarray(shape, np.int32))
            t.TensorStart(b)
            t.TensorAddShape(b, shape_off)
            t.TensorAddType(b, ttype)
            t.TensorAddBuffer(b, buffer_index)
            t.TensorAddName(b, name_off)
            if q is not None:
                t.TensorAddQuantization(b, q)
            tensor_offsets.append(t.TensorEnd(b))
        op_offsets = []
        for index, inputs, outputs in self.ops:
            iv = b.CreateNumpyVector(np.asarray(inputs, np.int32))
            ov = b.CreateNumpyVector(np.asarray(outputs, np.int32))
            t.OperatorStart(b)
            t.OperatorAddOpcodeIndex(b, index)
            t.OperatorAddInputs(b, iv)
            t.OperatorAddOutputs(b, ov)
            op_offsets.append(t.OperatorEnd(b))
        code_offsets = []
        for code in self.codes:
            t.OperatorCodeStart(b)
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
        return bytes(b.Output())


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
