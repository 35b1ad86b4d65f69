"""Caffe and MXNet readers: real files, and small files written here byte by byte (with an encoder of
our own, not the reader's schema), checked against OpenCV's Caffe importer and the PyTorch reference."""

import json
import struct

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, needs_shared
from PIL import Image, ImageDraw, ImageFont
from protowire import field
from torch import nn

from transferkit.cli import main
from transferkit.errors import TransferKitError
from transferkit.weights.formats import read_weights

LENET = SHARED_DATA / "weights" / "caffe_lenet_mnist"
MNET = SHARED_DATA / "weights" / "mxnet_retinaface_mnet25"
RFB = SHARED_DATA / "weights" / "ultralight_face_rfb320_multiformat"


def blob(arr: np.ndarray, legacy: bool = False) -> bytes:
    arr = np.asarray(arr, np.float32)
    if legacy:  # num, channels, height, width
        dims = (1,) * (4 - arr.ndim) + arr.shape
        head = b"".join(field(i + 1, d) for i, d in enumerate(dims))
    else:
        head = field(7, b"".join(field(1, d) for d in arr.shape))
    return head + field(5, arr.tobytes())


def layer(name, kind, bottom, top, blobs=(), extra=b"") -> bytes:
    body = field(1, name) + field(2, kind) + field(3, bottom) + field(4, top)
    return field(100, body + b"".join(field(7, blob(b)) for b in blobs) + extra)


def v1_layer(name, kind: int, bottom, top, blobs=()) -> bytes:
    body = field(2, bottom) + field(3, top) + field(4, name) + field(5, kind)
    return field(2, body + b"".join(field(6, blob(b, legacy=True)) for b in blobs))


def run_opencv(prototxt, caffemodel, x: np.ndarray, output: str) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip("this OpenCV has no Caffe importer (removed in OpenCV 5)")
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setInput(x)
    return net.forward(output)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- Caffe ----

class ConvBnFc(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=eps)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


BN_PROTOTXT = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 5 } }
"""


def test_caffe_batchnorm_and_scale_become_one_pytorch_batchnorm_matching_opencv(tmp_path):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
    mean, var, factor = rng.normal(size=4), rng.uniform(0.5, 2, size=4), 7.5  # Caffe stores mean*s, var*s, s
    gamma, beta = rng.uniform(0.5, 2, size=4), rng.normal(size=4)
    fw, fb = rng.normal(size=(5, 144)) * 0.1, rng.normal(size=5)
    # The file lists its layers in another order than the prototxt: the prototxt's order wins.
    model = field(1, "tiny") + b"".join([
        layer("fc", "InnerProduct", "conv", "fc", [fw, fb]),
        layer("scale", "Scale", "conv", "conv", [gamma, beta]),
        layer("conv", "Convolution", "data", "conv", [w, b]),
        layer("bn", "BatchNorm", "conv", "conv", [mean * factor, var * factor, [factor]]),
    ])
    (tmp_path / "tiny.caffemodel").write_bytes(model)
    (tmp_path / "tiny.prototxt").write_text(BN_PROTOTXT)
    wf = read_weights(tmp_path / "tiny.caffemodel")
    assert wf.format == "caffe"
    assert list(wf.tensors) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                "bn.running_var", "fc.weight", "fc.bias"]
    assert np.allclose(wf.tensors["bn.running_mean"], mean) and np.allclose(wf.tensors["bn.running_var"], var)
    assert np.allclose(wf.tensors["bn.weight"], gamma) and np.allclose(wf.tensors["bn.bias"], beta)
    records = json.loads(wf.metadata["tensors"])
    assert records["bn.running_var"]["eps"] == "0.001" and records["bn.weight"]["layer"] == "scale"
    assert records["bn.running_mean"]["converted"] == "divided by the scale factor"
    assert json.loads(wf.metadata["layers"])[:3] == [["conv", "Convolution"], ["bn", "BatchNorm"],
                                                     ["scale", "Scale"]]

    net = ConvBnFc(eps=float(records["bn.running_var"]["eps"])).eval()
    net.load_state_dict(wf.tensors)  # strict (BatchNorm's step counter may be absent)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ours = net(torch.from_numpy(x)).numpy()
    ref = run_opencv(tmp_path / "tiny.prototxt", tmp_path / "tiny.caffemodel", x, "fc")
    assert rel_err(ours, ref) < 1e-4


V1_PROTOTXT = """name: "old"
input: "data"
input_dim: 2 input_dim: 1 input_dim: 5 input_dim: 5
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "ip" type: INNER_PRODUCT bottom: "conv" top: "ip" inner_product_param { num_output: 3 } }
"""


def test_caffe_v1_layers_with_legacy_4d_blobs(tmp_path):
    rng = np.random.default_rng(1)
    w, b, iw, ib = rng.normal(size=(2, 1, 3, 3)), rng.normal(size=2), rng.normal(size=(3, 18)), rng.normal(size=3)
    model = field(1, "old") + v1_layer("conv", 4, "data", "conv", [w, b]) + v1_layer("relu", 18, "conv", "conv") \
        + v1_layer("ip", 14, "conv", "ip", [iw, ib])
    (tmp_path / "old.caffemodel").write_bytes(model)
    (tmp_path / "old.prototxt").write_text(V1_PROTOTXT)
    wf = read_weights(tmp_path / "old.caffemodel")
    # The InnerProduct weight was stored (1, 1, 3, 18) and its bias (1, 1, 1, 3): back to PyTorch's shapes.
    assert {k: tuple(t.shape) for k, t in wf.tensors.items()} == {
        "conv.weight": (2, 1, 3, 3), "conv.bias": (2,), "ip.weight": (3, 18), "ip.bias": (3,)}
    assert json.loads(wf.metadata["layers"]) == [["conv", "Convolution"], ["ip", "InnerProduct"]]
    net = nn.Sequential()
    net.conv, net.relu, net.flat, net.ip = nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)
    net.load_state_dict(wf.tensors)
    x = rng.normal(size=(2, 1, 5, 5)).astype(np.float32)
    with torch.no_grad():
        ours = net(torch.from_numpy(x)).numpy()
    assert rel_err(ours, run_opencv(tmp_path / "old.prototxt", tmp_path / "old.caffemodel", x, "ip")) < 1e-4


def test_caffe_batchnorm_without_scale_and_zero_factor(tmp_path):
    model = layer("bn", "BatchNorm", "x", "x", [[1.0, 2.0], [3.0, 4.0], [0.0]])
    (tmp_path / "m.caffemodel").write_bytes(field(1, "n") + model)
    wf = read_weights(tmp_path / "m.caffemodel")
    # Caffe's rule: a zero scale factor zeroes the statistics; no Scale layer means weight 1, bias 0.
    assert wf.tensors["bn.running_mean"].tolist() == [0, 0] and wf.tensors["bn.running_var"].tolist() == [0, 0]
    assert wf.tensors["bn.weight"].tolist() == [1, 1] and wf.tensors["bn.bias"].tolist() == [0, 0]
    assert json.loads(wf.metadata["tensors"])["bn.weight"]["eps"] == "1e-05"  # Caffe's default


def test_caffe_damaged_files_are_one_line_errors(tmp_path):
    bad_shape = field(1, "n") + field(100, field(1, "c") + field(2, "Convolution") + field(
        7, field(7, field(1, 4) + field(1, 1000)) + field(5, np.zeros(4, np.float32).tobytes())))
    cases = {
        "shape.caffemodel": (bad_shape, "shape \\[4, 1000\\] does not match its 4 values"),
        "cut.caffemodel": (layer("c", "Convolution", "x", "y", [np.ones((8, 8))])[:-20], "truncated or damaged"),
        "empty.caffemodel": (field(1, "n") + layer("relu", "ReLU", "x", "x"), "no layer holds any weights"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TransferKitError, match=message) as err:
            read_weights(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "deploy.prototxt").write_text("layer { name: ")
    (tmp_path / "ok.caffemodel").write_bytes(field(1, "n") + layer("c", "Convolution", "x", "y", [np.ones(3)]))
    with pytest.raises(TransferKitError, match="deploy.prototxt: not a readable Caffe prototxt"):
        read_weights(tmp_path / "ok.caffemodel")


def test_caffe_sniffed_by_content_not_suffix(tmp_path):
    path = tmp_path / "weights.dat"
    path.write_bytes(field(1, "LeNet") + layer("c", "Convolution", "x", "y", [np.ones((2, 2))]))
    assert read_weights(path).format == "caffe"


class LeNet(nn.Module):
    """Caffe's examples/mnist/lenet.prototxt as PyTorch modules, named as the Caffe layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x), 2, 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2, 2)
        return self.ip2(torch.relu(self.ip1(x.flatten(1))))


def mnist_style(img: Image.Image) -> np.ndarray:
    """MNIST's own preparation: the digit fitted into 20x20, placed by its centre of mass in 28x28."""
    img = img.crop(img.getbbox())
    scale = 20 / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    a = np.clip(np.asarray(img, np.float32) / 255, 0, 1)
    ys, xs = np.indices(a.shape)
    cy, cx = (ys * a).sum() / a.sum(), (xs * a).sum() / a.sum()
    out = np.zeros((28, 28), np.float32)
    top, left = round(14 - cy), round(14 - cx)
    out[top:top + a.shape[0], left:left + a.shape[1]] = a
    return out


def drawn_digit(d: int) -> np.ndarray:
    img = Image.new("L", (192, 192), 0)
    draw = ImageDraw.Draw(img)
    if d == 1:
        # Pillow's font draws 1 with a long flag, which MNIST-trained nets read as 7 (MNIST's ones are
        # mostly bare strokes): this one is drawn as a pen would.
        draw.line([(100, 20), (92, 170)], fill=255, width=14)
    else:
        draw.text((96, 96), str(d), fill=255, font=ImageFont.load_default(size=96), anchor="mm")
    return mnist_style(img)


@needs_shared
def test_lenet_caffemodel_reads_digits_like_opencv():
    wf = read_weights(LENET / "lenet_iter_10000.caffemodel")
    assert wf.metadata["prototxt"] == "lenet.prototxt" and wf.metadata["net_name"] == "LeNet"
    net = LeNet().eval()
    net.load_state_dict(wf.tensors)  # strict: every tensor has the name and shape PyTorch expects
    x = np.stack([drawn_digit(d) for d in range(10)])[:, None]
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    assert logits.argmax(1).tolist() == list(range(10))
    ref = run_opencv(LENET / "lenet.prototxt", LENET / "lenet_iter_10000.caffemodel", x, "ip2")
    assert rel_err(logits, ref) < 1e-4


@needs_shared
def test_rfb320_caffe_is_the_pth_with_batchnorm_folded():
    """The Caffe export (converted from the ONNX one) folded every BatchNorm into its convolution:
    its convolutions come in the ONNX graph's order, and each equals the .pth convolution with the
    following BatchNorm (eps 1e-5) folded in."""
    caffe = read_weights(RFB / "caffe/model/RFB-320/RFB-320.caffemodel")
    onnx_order = read_weights(RFB / "models/onnx/version-RFB-320.onnx")  # names equal the .pth's
    pth = torch.load(RFB / "models/pretrained/version-RFB-320.pth", map_location="cpu", weights_only=True)
    records = json.loads(onnx_order.metadata["tensors"])
    convs = [n for n in onnx_order.tensors if records[n]["type"] == "Conv" and n.endswith(".weight")]
    caffe_convs = [n for n in caffe.tensors if n.endswith(".weight")]
    assert len(convs) == len(caffe_convs) == 52
    assert [tuple(pth[n].shape) for n in convs] == [tuple(caffe.tensors[n].shape) for n in caffe_convs]
    bn_after = {records[n]["layer"]: n.rsplit(".", 1)[0] for n in onnx_order.tensors
                if records[n]["type"] == "BatchNormalization"}
    layer_order = [name for name, _ in json.loads(onnx_order.metadata["layers"])]
    folded = 0
    for conv, cname in zip(convs, caffe_convs, strict=True):
        w = pth[conv]
        b = pth.get(conv[:-len("weight")] + "bias", torch.zeros(w.shape[0]))
        nxt = layer_order[layer_order.index(records[conv]["layer"]) + 1]
        if nxt in bn_after:  # the BatchNorm node right after this convolution
            bn = bn_after[nxt]
            s = pth[bn + ".weight"] / torch.sqrt(pth[bn + ".running_var"] + 1e-5)
            w, b = w * s[:, None, None, None], (b - pth[bn + ".running_mean"]) * s + pth[bn + ".bias"]
            folded += 1
        assert rel_err(caffe.tensors[cname], w) < 1e-5, cname
        assert rel_err(caffe.tensors[cname[:-len("weight")] + "bias"], b) < 1e-5, cname
    assert folded == 35  # every BatchNorm of the .pth


@needs_shared
@pytest.mark.parametrize(("path", "fmt", "count"), [
    ("caffe_lenet_mnist/lenet_iter_10000.caffemodel", "caffe", 8),
    ("ultralight_face_rfb320_multiformat/caffe/model/RFB-320/RFB-320.caffemodel", "caffe", 104),
    ("mxnet_retinaface_mnet25/mnet.25-0000.params", "mxnet", 273),
])
def test_inspect_json_on_real_files(path, fmt, count, capsys):
    assert main(["weights", "inspect", "--json", str(SHARED_DATA / "weights" / path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["tensors"], len(info["entries"])) == (fmt, count, count)
    assert info["metadata"]["source_format"] == fmt


# ---- MXNet ----

V2, V3 = 0xF993FAC9, 0xF993FACA


def nd(arr: np.ndarray, version: str = "v2", stype: int = 0) -> bytes:
    """One NDArray as MXNet's NDArray::Save writes it (type flags: 0 float32, 1 float64, 4 int32)."""
    flag = {np.float32: 0, np.float64: 1, np.int32: 4}[arr.dtype.type]
    if version == "v0":  # uint32 ndim, uint32 dims
        head = struct.pack(f"<I{arr.ndim}I", arr.ndim, *arr.shape)
    elif version == "v1":
        head = struct.pack(f"<Ii{arr.ndim}q", 0xF993FAC8, arr.ndim, *arr.shape)
    else:
        head = struct.pack(f"<Iii{arr.ndim}q", V2 if version == "v2" else V3, stype, arr.ndim, *arr.shape)
    return head + struct.pack("<iii", 1, 0, flag) + arr.tobytes()


def params_file(items: list[tuple[str, bytes]]) -> bytes:
    names = b"".join(struct.pack("<Q", len(n.encode())) + n.encode() for n, _ in items)
    return (struct.pack("<QQQ", 0x112, 0, len(items)) + b"".join(a for _, a in items)
            + struct.pack("<Q", len(items)) + names)


def test_mxnet_headers_v0_to_v3_names_and_symbol_order(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    gamma, beta, mean, var = (rng.normal(size=4).astype(np.float32) for _ in range(4))
    counts = np.arange(6, dtype=np.int32).reshape(2, 3)
    # Stored alphabetically, as MXNet's save_checkpoint writes a dict; the symbol gives the graph order.
    (tmp_path / "net-0003.params").write_bytes(params_file([
        ("arg:bn0_beta", nd(beta, "v1")), ("arg:bn0_gamma", nd(gamma, "v0")), ("arg:conv0_weight", nd(w, "v2")),
        ("aux:bn0_moving_mean", nd(mean, "v3")), ("aux:bn0_moving_var", nd(var.astype(np.float64))),
        ("extra_counts", nd(counts)),
    ]))
    nodes = [{"op": "null", "name": "data", "inputs": []}, {"op": "null", "name": "conv0_weight", "inputs": []},
             {"op": "Convolution", "name": "conv0_fwd", "inputs": [[0, 0, 0], [1, 0, 0]]}]
    nodes += [{"op": "null", "name": f"bn0_{p}", "inputs": []} for p in ("gamma", "beta", "moving_mean", "moving_var")]
    nodes.append({"op": "BatchNorm", "name": "bn0_fwd", "attrs": {"eps": "2e-05"},  # fix_gamma: MXNet's default True
                  "inputs": [[2, 0, 0], [3, 0, 0], [4, 0, 0], [5, 0, 1], [6, 0, 1]]})
    (tmp_path / "net-symbol.json").write_text(json.dumps({"nodes": nodes}))
    wf = read_weights(tmp_path / "net-0003.params")
    assert wf.format == "mxnet" and wf.metadata["symbol"] == "net-symbol.json"
    assert list(wf.tensors) == ["conv0.weight", "bn0.weight", "bn0.bias", "bn0.running_mean", "bn0.running_var",
                                "extra_counts"]
    assert torch.equal(wf.tensors["conv0.weight"], torch.from_numpy(w))
    assert torch.equal(wf.tensors["bn0.bias"], torch.from_numpy(beta))
    assert torch.equal(wf.tensors["bn0.running_mean"], torch.from_numpy(mean))
    assert wf.tensors["bn0.running_var"].dtype == torch.float64
    assert torch.equal(wf.tensors["extra_counts"], torch.from_numpy(counts))
    # fix_gamma: MXNet computes with gamma = 1 whatever is stored.
    assert wf.tensors["bn0.weight"].tolist() == [1.0] * 4
    records = json.loads(wf.metadata["tensors"])
    assert records["bn0.weight"]["source"] == "bn0_gamma" and "fix_gamma" in records["bn0.weight"]["converted"]
    assert records["bn0.running_var"] == {"source": "bn0_moving_var", "layer": "bn0_fwd", "type": "BatchNorm",
                                          "dtype": "float64", "eps": "2e-05", "role": "aux"}
    assert records["extra_counts"]["layer"] == ""  # not in the symbol


def test_mxnet_without_symbol_keeps_file_order_and_unprefixed_names(tmp_path):
    a, b = np.ones(3, np.float32), np.zeros((2, 2), np.float32)
    (tmp_path / "gluon.params").write_bytes(params_file([("features.0.weight", nd(a)), ("dense0_bias", nd(b))]))
    wf = read_weights(tmp_path / "gluon.params")
    assert list(wf.tensors) == ["features.0.weight", "dense0.bias"]
    assert "symbol" not in wf.metadata


def test_mxnet_sparse_and_damaged_files_are_one_line_errors(tmp_path):
    # row_sparse: storage shape, shape, context, type, index type and shape, values, row indices
    sparse = struct.pack("<Iii1q", V2, 1, 1, 2) + struct.pack("<i1q", 1, 4) + struct.pack("<iii", 1, 0, 0) \
        + struct.pack("<i i1q", 6, 1, 2) + np.ones(2, np.float32).tobytes() + np.array([0, 3], np.int64).tobytes()
    good = nd(np.ones(3, np.float32))
    cases = {
        "sparse": (params_file([("arg:ok", good), ("arg:embed_weight", sparse)]),
                   "'arg:embed_weight' is row_sparse"),
        "truncated": (params_file([("arg:w", nd(np.ones(1000, np.float32)))])[:2000], "only [0-9,]+ remain"),
        "huge_count": (struct.pack("<QQQ", 0x112, 0, 1 << 60) + good, "the array count"),
        "huge_shape": (params_file([("w", struct.pack("<Iii2q", V2, 0, 2, 1 << 40, 1 << 40)
                                    + struct.pack("<iii", 1, 0, 0))]), "declares [0-9,]+ bytes"),
        "bad_ndim": (params_file([("w", struct.pack("<Iii", V2, 0, 1 << 20))]), "has 1048576 dimensions"),
        "names": (params_file([("a", good)])[:-1] + b"\xff", "remain|not UTF-8"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.params"
        path.write_bytes(data)
        with pytest.raises(TransferKitError, match=message) as err:
            read_weights(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


@needs_shared
def test_mxnet_retinaface_real_file():
    wf = read_weights(MNET / "mnet.25-0000.params")
    records = json.loads(wf.metadata["tensors"])
    first = list(wf.tensors)[:6]
    assert first == ["mobilenet0_conv0.weight", "mobilenet0_batchnorm0.weight", "mobilenet0_batchnorm0.bias",
                     "mobilenet0_batchnorm0.running_mean", "mobilenet0_batchnorm0.running_var",
                     "mobilenet0_conv1.weight"]
    assert records["mobilenet0_batchnorm0.weight"]["source"] == "mobilenet0_batchnorm0_gamma"
    assert records["mobilenet0_batchnorm0.running_var"]["role"] == "aux"
    assert tuple(wf.tensors["mobilenet0_conv1.weight"].shape) == (8, 1, 3, 3)  # depthwise, already OIHW
    kinds = {r["type"] for r in records.values()}
    assert kinds == {"Convolution", "BatchNorm"}
    assert {r["eps"] for r in records.values() if r["type"] == "BatchNorm"} == {"1e-05", "2e-05"}
