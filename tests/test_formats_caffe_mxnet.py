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


# MXNet files written byte by byte: every header version, dtype and storage type, and each kind of damage.
V0_DIMS, V1 = "I", 0xF993FAC8
HEAD0 = struct.pack("<QQQ", 0x112, 0, 0)


def arr_head(magic: int, shape, stype: int | None = None) -> bytes:
    """An array's header up to its dims: magic, (storage type), ndim, dims (uint32 for V0, else int64)."""
    if magic <= 32:
        return struct.pack(f"<I{len(shape)}I", magic, *shape)
    pre = struct.pack("<I", magic) + (b"" if stype is None else struct.pack("<i", stype))
    return pre + struct.pack(f"<i{len(shape)}q", len(shape), *shape)


def one_array(body: bytes) -> bytes:
    return struct.pack("<QQQ", 0x112, 0, 1) + body


def mx_error(tmp_path, name: str, data: bytes) -> str:
    from transferkit.weights.formats import mxnet_file

    path = tmp_path / f"{name}.params"
    path.write_bytes(data)
    with pytest.raises(TransferKitError) as err:
        mxnet_file.read(path)
    message = str(err.value)
    prefix = f"{path}: "
    assert message.startswith(prefix), message
    return message[len(prefix):]


def test_mxnet_each_damage_has_its_exact_one_line_message(tmp_path):
    dev = struct.pack("<ii", 1, 0)
    f32 = struct.pack("<i", 0)
    ok1 = arr_head(V2, (1,), 0) + dev + f32 + struct.pack("<f", 1.5)
    row_sparse = arr_head(V2, (2,), 1) + struct.pack("<i1q", 1, 4) + dev + f32  # storage (2,), shape (4,)
    trunc = "damaged or truncated file: {} declares {} bytes but only {} remain; re-download or re-export it"
    cases = {
        "short": (b"\x12\x01" + bytes(8), "truncated .params file (10 bytes); re-download it"),
        "header_only": (HEAD0, trunc.format("name count", 8, 0)),
        "list_magic": (struct.pack("<QQQ", 2**64 - 1, 0, 0) + bytes(8),
                       "not an MXNet .params file (list magic 0xffffffffffffffff, expected 0x112)"),
        "count_max": (struct.pack("<QQQ", 0x112, 0, 2**64 - 1) + bytes(4),
                      trunc.format("the array count (18,446,744,073,709,551,615)", "73,786,976,294,838,206,460", 4)),
        "count_3": (struct.pack("<QQQ", 0x112, 0, 3) + bytes(8), trunc.format("the array count (3)", 12, 8)),
        "second_magic": (struct.pack("<QQQ", 0x112, 0, 2) + ok1 + bytes(2), trunc.format("array 1", 4, 2)),
        "stype": (one_array(struct.pack("<I", V2)), trunc.format("array 0", 4, 0)),
        "v1_ndim": (one_array(struct.pack("<I", V1)), trunc.format("array 0", 4, 0)),
        "v2_dims": (one_array(struct.pack("<Iiiq", V2, 0, 2, 3)), trunc.format("array 0", 16, 8)),
        "v0_dims": (one_array(struct.pack("<II", 2, 5)), trunc.format("array 0", 8, 4)),
        "storage_shape": (one_array(struct.pack("<Ii", V2, 1)), trunc.format("array 0", 4, 0)),
        "device": (one_array(arr_head(V2, (3,), 0) + struct.pack("<i", 1)), trunc.format("array 0", 8, 4)),
        "flag": (one_array(arr_head(V2, (3,), 0) + dev), trunc.format("array 0", 4, 0)),
        "values": (one_array(arr_head(V2, (3,), 0) + dev + f32 + bytes(8)), trunc.format("array 0", 12, 8)),
        "aux_flag": (one_array(row_sparse), trunc.format("array 0", 4, 0)),
        "aux_shape": (one_array(row_sparse + struct.pack("<i", 6)), trunc.format("array 0", 4, 0)),
        "aux_values": (one_array(row_sparse + struct.pack("<iiq", 6, 1, 2) + bytes(8) + bytes(8)),
                       trunc.format("array 0", 16, 8)),
        "aux_overflow": (one_array(row_sparse + struct.pack("<ii2q", 6, 2, 1 << 32, 1 << 32) + bytes(8)),
                         trunc.format("array 0", "147,573,952,589,676,412,928", 0)),
        "name_len": (one_array(ok1) + struct.pack("<Q", 1) + bytes(2), trunc.format("name 0", 8, 2)),
        "name_bytes": (one_array(ok1) + struct.pack("<QQ", 1, 5) + b"ab", trunc.format("name 0", 5, 2)),
        "name_len_max": (one_array(ok1) + struct.pack("<QQ", 1, 2**64 - 1),
                         trunc.format("name 0", "18,446,744,073,709,551,615", 0)),
        "name_utf8": (one_array(ok1) + struct.pack("<QQ", 1, 1) + b"\xff", "damaged .params file: name 0 is not UTF-8"),
        "names_max": (one_array(ok1) + struct.pack("<Q", 2**64 - 1),
                      "damaged .params file: 18,446,744,073,709,551,615 names for 1 arrays"),
        "names_1_of_2": (struct.pack("<QQQ", 0x112, 0, 2) + ok1 + ok1 + struct.pack("<QQ", 1, 1) + b"a",
                         "damaged .params file: 1 names for 2 arrays"),
        "stype_neg": (one_array(struct.pack("<Ii", V2, -1)), "damaged .params file: array 0 has storage type -1"),
        "stype_3": (one_array(struct.pack("<Ii", V3, 3)), "damaged .params file: array 0 has storage type 3"),
        "unknown_magic": (one_array(struct.pack("<I", 0xDEADBEEF)), "damaged .params file: array 0 has an unknown "
                          "header (0xdeadbeef); re-download or re-save it"),
        "v0_33": (one_array(struct.pack("<I", 33) + bytes(4)),
                  "damaged .params file: array 0 has an unknown header (0x21); re-download or re-save it"),
        "ndim_33": (one_array(struct.pack("<Iii", V2, 0, 33)),
                    "damaged .params file: array 0 has 33 dimensions at byte 36; re-download or re-save it"),
        "ndim_-2": (one_array(struct.pack("<Ii", V1, -2)),
                    "damaged .params file: array 0 has -2 dimensions at byte 32; re-download or re-save it"),
        "dim_neg": (one_array(arr_head(V2, (2, -3), 0)), "damaged .params file: array 0 has shape [2, -3]"),
        "v0_dim_2g": (one_array(arr_head(1, (0x80000000,)) + dev + f32),
                      trunc.format("array 0", "8,589,934,592", 0)),
        "flag_neg": (one_array(arr_head(V2, (1,), 0) + dev + struct.pack("<i", -1)),
                     "damaged .params file: array 0 has unknown type flag -1"),
        "flag_13": (one_array(arr_head(V2, (1,), 0) + dev + struct.pack("<i", 13)),
                    "damaged .params file: array 0 has unknown type flag 13"),
        "aux_flag_bad": (one_array(row_sparse + struct.pack("<iiq", 99, 1, 2) + bytes(8)),
                         "damaged .params file: array 0 has a bad sparse index"),
        "aux_shape_unknown": (one_array(row_sparse + struct.pack("<ii", 6, -1) + bytes(8)),
                              "damaged .params file: array 0 has a bad sparse index"),
        "sparse": (one_array(row_sparse + struct.pack("<iiq", 4, 1, 2) + bytes(8) + bytes(8))  # int32 indices
                   + struct.pack("<QQ", 1, 5) + b"arg:e",
                   "array 'arg:e' is row_sparse (sparse); only dense arrays are read: save it dense "
                   "(tostype('default')) first"),
        "twice": (struct.pack("<QQQ", 0x112, 0, 2) + ok1 + ok1 + struct.pack("<QQ", 2, 5) + b"arg:w"
                  + struct.pack("<Q", 5) + b"aux:w", "damaged .params file: the name 'w' appears twice"),
        "no_arrays": (HEAD0 + struct.pack("<Q", 0), "the .params file holds no arrays"),
        "only_empty": (one_array(arr_head(V1, (), None)) + struct.pack("<Q", 0), "the .params file holds no arrays"),
    }
    for name, (data, message) in cases.items():
        assert mx_error(tmp_path, name, data) == message, name


def test_mxnet_parse_names_the_header_of_a_short_buffer(tmp_path):
    from transferkit.weights.formats import mxnet_file

    with pytest.raises(TransferKitError) as err:
        mxnet_file.parse(b"\x12\x01\x00\x00", tmp_path / "x.params")
    assert str(err.value) == (f"{tmp_path / 'x.params'}: damaged or truncated file: header declares 24 bytes but "
                              "only 4 remain; re-download or re-export it")


def test_mxnet_scalars_empty_arrays_bfloat16_and_32_dimensions(tmp_path):
    dev = struct.pack("<ii", 1, 0)
    items = [
        # bfloat16 (flag 12): 1.0, -2.0, 0.5, 3.0 as raw 16-bit words; the array after it must start right after.
        ("bf", arr_head(V2, (2, 2), 0) + dev + struct.pack("<i4H", 12, 0x3F80, 0xC000, 0x3F00, 0x4040)),
        ("after_bf", arr_head(V2, (1,), 0) + dev + struct.pack("<if", 0, 7.25)),
        ("v3_scalar", arr_head(V3, (), 0) + dev + struct.pack("<if", 0, 2.5)),
        ("v2_empty", arr_head(V2, (), 0)),
        ("v3_unknown", struct.pack("<Iii", V3, 0, -1)),
        ("v1_empty", arr_head(V1, ())),
        ("v0_empty", struct.pack("<I", 0)),
        ("zero_size", arr_head(V2, (2, 0), 0) + dev + struct.pack("<i", 0)),
        ("d32", arr_head(V2, (1,) * 31 + (2,), 0) + dev + struct.pack("<i2q", 6, -5, 1 << 40)),
        ("v0_d32", arr_head(32, (1,) * 30 + (2, 1)) + dev + struct.pack("<i2b", 5, -1, 2)),
        ("v1_u16", arr_head(V1, (2,)) + dev + struct.pack("<i2H", 9, 65535, 1)),
        ("f16", arr_head(V2, (1,), 0) + dev + struct.pack("<ie", 2, 0.25)),
    ]
    path = tmp_path / "kinds.params"
    path.write_bytes(params_file(items))
    from transferkit.weights.formats import mxnet_file

    wf = mxnet_file.read(path)
    assert wf.path == path and wf.format == "mxnet"
    assert list(wf.tensors) == ["bf", "after_bf", "v3_scalar", "zero_size", "d32", "v0_d32", "v1_u16", "f16"]
    t = wf.tensors
    assert t["bf"].dtype == torch.bfloat16 and t["bf"].tolist() == [[1.0, -2.0], [0.5, 3.0]]
    assert t["after_bf"].tolist() == [7.25]
    assert t["v3_scalar"].shape == () and t["v3_scalar"].item() == 2.5
    assert t["zero_size"].shape == (2, 0) and t["zero_size"].dtype == torch.float32
    assert t["d32"].shape == (1,) * 31 + (2,) and t["d32"].flatten().tolist() == [-5, 1 << 40]
    assert t["d32"].dtype == torch.int64
    assert t["v0_d32"].shape == (1,) * 30 + (2, 1) and t["v0_d32"].flatten().tolist() == [-1, 2]
    assert t["v1_u16"].dtype == torch.uint16 and t["v1_u16"].tolist() == [65535, 1]
    assert t["f16"].dtype == torch.float16 and t["f16"].tolist() == [0.25]
    assert json.loads(wf.metadata["empty_arrays"]) == ["v2_empty", "v3_unknown", "v1_empty", "v0_empty"]
    assert wf.metadata["source_format"] == "mxnet" and wf.metadata["converted"] == "none"
    assert json.loads(wf.metadata["tensors"])["bf"] == {"source": "bf", "layer": "", "type": "", "dtype": "bfloat16"}
    assert json.loads(wf.metadata["layers"]) == [["", ""]]


def test_mxnet_unnamed_list_prefixes_and_renames_that_would_collide(tmp_path):
    from transferkit.weights.formats import mxnet_file

    one = nd(np.array([1.0], np.float32))
    unnamed = tmp_path / "list.params"  # nd.save of a plain list: no names at all
    unnamed.write_bytes(struct.pack("<QQQ", 0x112, 0, 2) + one + nd(np.array([2], np.int32)) + struct.pack("<Q", 0))
    wf = mxnet_file.read(unnamed)
    assert list(wf.tensors) == ["#0", "#1"] and wf.tensors["#1"].tolist() == [2]
    assert "empty_arrays" not in wf.metadata

    path = tmp_path / "names.params"
    path.write_bytes(params_file([
        ("arg:a:b", one), ("_weight", one), ("c_weight", one), ("c_gamma", one), ("d_bias", one), ("d.bias", one),
        ("aux:e_moving_var", one), ("f_running_mean", one), ("g_beta", one), ("plain", one),
    ]))
    wf = mxnet_file.read(path)
    # c_weight and c_gamma would both be c.weight, d_bias would overwrite d.bias: those keep their stored names.
    assert list(wf.tensors) == ["a:b", "_weight", "c_weight", "c_gamma", "d_bias", "d.bias", "e.running_var",
                                "f.running_mean", "g.bias", "plain"]
    records = json.loads(wf.metadata["tensors"])
    assert records["a:b"] == {"source": "a:b", "layer": "", "type": "", "dtype": "float32", "role": "arg"}
    assert records["e.running_var"]["role"] == "aux"
    assert records["plain"] == {"source": "plain", "layer": "", "type": "", "dtype": "float32"}


def test_mxnet_symbol_attribute_spellings_and_fix_gamma_values(tmp_path):
    """MXNet 1.x writes "attrs", 0.9-0.11 "attr", older ones "param"; fix_gamma may be True/true/1/False/0."""
    from transferkit.weights.formats import mxnet_file

    g = np.array([2.0, 3.0], np.float32)
    bns = {"bn1": {"attr": {"fix_gamma": "False"}}, "bn2": {"param": {"eps": "0.0001", "fix_gamma": "true"}},
           "bn3": {"attrs": {"fix_gamma": "1"}}, "bn4": {"attrs": {"fix_gamma": "0", "eps": "1e-05"}},
           "bn5": {"attr": {"eps": "0.01", "fix_gamma": "false"}}, "bn6": {}}
    nodes, items = [{"op": "null", "name": "data"}], []  # variables may come without "inputs"
    for bn, spelling in bns.items():
        nodes.append({"op": "null", "name": f"{bn}_gamma", "attrs": {"__shape__": "(2,)"}})
        nodes.append({"op": "BatchNorm", "name": f"{bn}_fwd", "inputs": [[0, 0, 0], [len(nodes) - 1, 0, 0]],
                      **spelling})
        items.append((f"arg:{bn}_gamma", nd(g)))
    (tmp_path / "m-symbol.json").write_text(json.dumps({"nodes": nodes}))
    (tmp_path / "m-0000.params").write_bytes(params_file(items))
    wf = mxnet_file.read(tmp_path / "m-0000.params")
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {
        "bn1.weight": [2, 3], "bn2.weight": [1, 1], "bn3.weight": [1, 1], "bn4.weight": [2, 3],
        "bn5.weight": [2, 3], "bn6.weight": [1, 1]}
    records = json.loads(wf.metadata["tensors"])
    assert {k: r["eps"] for k, r in records.items()} == {
        "bn1.weight": "0.001", "bn2.weight": "0.0001", "bn3.weight": "0.001", "bn4.weight": "1e-05",
        "bn5.weight": "0.01", "bn6.weight": "0.001"}
    assert records["bn2.weight"] == {"source": "bn2_gamma", "layer": "bn2_fwd", "type": "BatchNorm", "dtype": "float32",
                                     "converted": "fix_gamma: weight 1 (MXNet ignores the stored gamma)",
                                     "eps": "0.0001", "role": "arg"}
    assert wf.metadata["converted"] == "fix_gamma: weight 1 (MXNet ignores the stored gamma): 3"


def test_mxnet_damaged_symbol_files_are_one_line_errors(tmp_path):
    from transferkit.weights.formats import mxnet_file

    (tmp_path / "m.params").write_bytes(params_file([("w", nd(np.ones(1, np.float32)))]))
    symbol = tmp_path / "m-symbol.json"
    cases = {"{": "not a readable MXNet symbol file (Expecting property name enclosed in double quotes: "
                  "line 1 column 2 (char 1))",
             '{"nodes": [{"op": "Convolution", "name": "c"}]}':
                 "not an MXNet symbol file (no well-formed 'nodes' list)",
             # attributes that are not an object (a BatchNorm's are read for eps and fix_gamma)
             '{"nodes": [{"op": "null", "name": "w"}, {"op": "BatchNorm", "name": "bn", "attrs": "eps=1", '
             '"inputs": [[0, 0, 0]]}]}': "not an MXNet symbol file (no well-formed 'nodes' list)"}
    for text, message in cases.items():
        symbol.write_text(text)
        with pytest.raises(TransferKitError) as err:
            mxnet_file.read(tmp_path / "m.params")
        assert str(err.value) == f"{symbol}: {message}"


# Caffe BatchNorm layers written byte by byte: each blob layout, each Scale that may follow, each damage.
def bn_param(eps: float) -> bytes:
    """batch_norm_param (field 139) with eps (field 3, a 32-bit float: wire type 5)."""
    return field(139, bytes([3 << 3 | 5]) + struct.pack("<f", eps))


def caffe_error(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name / "m.caffemodel"
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(TransferKitError) as err:
        read_weights(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: "):]


def test_caffe_batchnorm_blob_layouts_scales_and_records_by_hand(tmp_path):
    model = field(1, "bns") + b"".join([
        # A 2-d mean and variance, factor 2, eps stored in the file; then a Scale with weight and bias.
        layer("bn1", "BatchNorm", "x", "x", [[[2.0, 4.0]], [[6.0, 8.0]], [2.0]], bn_param(0.002)),
        layer("sc1", "Scale", "x", "x", [[[5.0, 6.0]], [[7.0, 8.0]]]),
        # A fourth blob (some converters write one) is not read; a Scale without bias gives bias 0.
        layer("bn2", "BatchNorm", "x", "y", [[1.0, 1.0], [2.0, 2.0], [0.5], [9.0]]),
        layer("sc2", "Scale", "y", "y", [[3.0, 3.5]]),
        # An empty scale factor blob counts as factor 0 (statistics zeroed); no Scale follows.
        layer("bn3", "BatchNorm", "y", "z", [[1.0, 2.0], [3.0, 4.0], np.zeros(0)]),
    ])
    (tmp_path / "bns.caffemodel").write_bytes(model)
    wf = read_weights(tmp_path / "bns.caffemodel")
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {
        "bn1.weight": [5, 6], "bn1.bias": [7, 8], "bn1.running_mean": [1, 2], "bn1.running_var": [3, 4],
        "bn2.weight": [3, 3.5], "bn2.bias": [0, 0], "bn2.running_mean": [2, 2], "bn2.running_var": [4, 4],
        "bn3.weight": [1, 1], "bn3.bias": [0, 0], "bn3.running_mean": [0, 0], "bn3.running_var": [0, 0]}
    assert list(wf.tensors) == ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn2.weight",
                                "bn2.bias", "bn2.running_mean", "bn2.running_var", "bn3.weight", "bn3.bias",
                                "bn3.running_mean", "bn3.running_var"]
    records = json.loads(wf.metadata["tensors"])
    merged, divided = "Scale merged into BatchNorm", "divided by the scale factor"
    assert records["bn1.weight"] == {"source": "sc1/blob0", "layer": "sc1", "type": "Scale", "dtype": "float32",
                                     "converted": merged, "eps": "0.002"}
    assert records["bn1.bias"] == {"source": "sc1/blob1", "layer": "sc1", "type": "Scale", "dtype": "float32",
                                   "converted": merged, "eps": "0.002"}
    assert records["bn1.running_mean"] == {"source": "bn1/blob0", "layer": "bn1", "type": "BatchNorm",
                                           "dtype": "float32", "converted": divided, "eps": "0.002"}
    assert records["bn1.running_var"] == {"source": "bn1/blob1", "layer": "bn1", "type": "BatchNorm",
                                          "dtype": "float32", "converted": divided, "eps": "0.002"}
    assert records["bn2.weight"]["source"] == "sc2/blob0"
    assert records["bn2.bias"] == {"source": "", "layer": "sc2", "type": "Scale", "dtype": "float32",
                                   "converted": "BatchNorm bias 0 (Scale without bias)", "eps": "1e-05"}
    assert records["bn3.weight"] == {"source": "", "layer": "bn3", "type": "BatchNorm", "dtype": "float32",
                                     "converted": "BatchNorm weight 1 (no Scale layer follows)", "eps": "1e-05"}
    assert records["bn3.bias"] == {"source": "", "layer": "bn3", "type": "BatchNorm", "dtype": "float32",
                                   "converted": "BatchNorm bias 0 (no Scale layer follows)", "eps": "1e-05"}
    assert json.loads(wf.metadata["layers"]) == [["bn1", "BatchNorm"], ["sc1", "Scale"], ["bn2", "BatchNorm"],
                                                 ["sc2", "Scale"], ["bn3", "BatchNorm"]]
    assert wf.metadata["converted"] == (
        "Scale merged into BatchNorm: 3; divided by the scale factor: 6; BatchNorm bias 0 (Scale without bias): 1; "
        "BatchNorm weight 1 (no Scale layer follows): 1; BatchNorm bias 0 (no Scale layer follows): 1")


def test_caffe_batchnorm_eps_from_the_file_when_the_prototxt_has_none(tmp_path):
    (tmp_path / "m.caffemodel").write_bytes(field(1, "n") + layer("bn", "BatchNorm", "x", "x", [[1.0], [1.0], [1.0]],
                                                                  bn_param(0.25)))
    (tmp_path / "m.prototxt").write_text('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }')
    records = json.loads(read_weights(tmp_path / "m.caffemodel").metadata["tensors"])
    assert {r["eps"] for r in records.values()} == {"0.25"}
    (tmp_path / "m.prototxt").write_text('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
                                         "batch_norm_param { eps: 0.5 } }")
    records = json.loads(read_weights(tmp_path / "m.caffemodel").metadata["tensors"])
    assert {r["eps"] for r in records.values()} == {"0.5"}
    # A batch_norm_param without eps means Caffe's default, whatever the file holds; the other usual
    # parameters (not used here) are read without complaint.
    (tmp_path / "m.prototxt").write_text('input: "x"\ninput: "im_info"\n'  # inputs may be repeated
                                         'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
                                         "batch_norm_param { use_global_stats: true } }\n"
                                         'layer { name: "sc" type: "Scale" bottom: "x" top: "x" '
                                         "scale_param { axis: 1 bias_term: true } }")
    records = json.loads(read_weights(tmp_path / "m.caffemodel").metadata["tensors"])
    assert {r["eps"] for r in records.values()} == {"1e-05"}


def test_caffe_batchnorm_and_scale_damage_exact_messages(tmp_path):
    bn = [[1.0, 2.0], [3.0, 4.0], [1.0]]
    cases = {
        "two_blobs": (layer("bn", "BatchNorm", "x", "x", bn[:2]),
                      "BatchNorm layer bn has 2 blobs, expected 3 (mean, variance, scale factor); re-export the model"),
        "var_size": (layer("bn", "BatchNorm", "x", "x", [[1.0, 2.0], [3.0, 4.0, 5.0], [1.0]]),
                     "BatchNorm layer bn has 2 means but 3 variances; re-export the model"),
        "scale_size": (layer("bn", "BatchNorm", "x", "x", bn) + layer("sc", "Scale", "x", "x", [[1.0] * 3, [0.0] * 2]),
                       "Scale layer sc has 3 values for BatchNorm bn of 2 channels; re-export the model"),
    }
    for name, (data, message) in cases.items():
        assert caffe_error(tmp_path, name, field(1, "n") + data) == message, name
    bad_scale = field(100, field(1, "sc") + field(2, "Scale") + field(3, "x") + field(4, "x") + field(
        7, field(7, field(1, 3)) + field(5, np.zeros(2, np.float32).tobytes())))
    got = caffe_error(tmp_path, "bad_scale", field(1, "n") + layer("bn", "BatchNorm", "x", "x", bn) + bad_scale)
    assert got == "damaged blob in layer sc: shape [3] does not match its 2 values; re-download or re-export the model"


def test_caffe_prototxt_errors_name_the_prototxt_exactly(tmp_path, monkeypatch):
    from pathlib import Path

    model = field(1, "n") + layer("c", "Convolution", "x", "y", [np.ones(3)])
    cases = {
        "syntax": ("layer { name: ", "1:15 : '': Expected string but found: ''"),
        "utf8": (b'layer { name: "\xff" }', "'utf-8' codec can't decode byte 0xff in position 15: invalid start byte"),
        "v0": ('layers { v0_layer: "" }', None),
    }
    for name, (text, detail) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "m.caffemodel").write_bytes(model)
        proto = folder / "deploy.prototxt"
        proto.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(TransferKitError) as err:
            read_weights(folder / "m.caffemodel")
        if detail is None:
            assert str(err.value) == (f"{proto}: a V0 (pre-2014) Caffe net; upgrade it with Caffe's "
                                      "upgrade_net_proto_binary tool first")
        else:
            assert str(err.value) == (f"{proto}: not a readable Caffe prototxt ({detail}); fix it or move it away "
                                      "to read the .caffemodel alone")
    # An OSError without a message is named by its type.
    def no_message(self, *args, **kwargs):
        raise OSError()

    monkeypatch.setattr(Path, "read_text", no_message)
    with pytest.raises(TransferKitError) as err:
        read_weights(tmp_path / "v0" / "m.caffemodel")
    assert str(err.value) == (f"{tmp_path / 'v0' / 'deploy.prototxt'}: not a readable Caffe prototxt (OSError); fix "
                              "it or move it away to read the .caffemodel alone")


def test_caffe_sniff_by_the_first_bytes():
    from pathlib import Path

    from transferkit.weights.formats.caffe_file import sniff

    heads = {
        b"\xa2\x06\x05": True,  # straight into a `layer`
        b"\x12\x10\x0a": True, b"\x12\x10\x0a\x08": True,  # straight into V1 `layers`
        b"\x12\x10\x12": False, b"\x12\x0a": False,
        b"\x0a\x05LeNet\x12\x00": True, b"\x0a\x05LeNet\x1a\x04": True, b"\x0a\x05LeNet\xa2\x06": True,
        b"\x0a\x05LeNet\xa2\x07": False, b"\x0a\x05LeNet\x22": False, b"\x0a\x05LeNet": False,
        b"\x0a\x05Le\tet\x12": False, b"\x0a\x05\x01eNet\x12": False,  # a name must be printable
        b"\x0a\x05L\xc3\xa9et\x12": False,  # and ASCII
        b"\x0a\x40" + b"a" * 64 + b"\x12": False,  # names are short
        b"\x0a\x3f" + b"a" * 63 + b"\x12": True,
        b"\x0a\x00\x12": True, b"\x0a": False, b"\x0a\x05": False, b"": False, b"\x08\x05LeNet\x12": False,
    }
    assert {head: sniff(Path("m.bin"), head) for head in heads} == heads


def legacy_blob(dims: tuple[int, int, int, int], values) -> bytes:
    return b"".join(field(i + 1, d) for i, d in enumerate(dims)) + field(5, np.asarray(values, np.float32).tobytes())


def test_caffe_blob_layouts_innerproduct_shapes_and_extra_blobs(tmp_path):
    double = field(7, field(1, 2)) + field(8, np.array([0.5], np.float64).tobytes()) \
        + field(8, np.array([-1.25], np.float64).tobytes())
    chunks = field(7, field(1, 3)) + field(5, np.array([1, 2], np.float32).tobytes()) \
        + field(5, np.array([3], np.float32).tobytes())  # a repeated data field split in two
    ip_param = field(117, field(6, 1))  # inner_product_param { transpose: true }
    model = field(1, "blobs") + b"".join([
        field(100, field(1, "dbl") + field(2, "Convolution") + field(3, "x") + field(4, "y") + field(7, double)),
        field(100, field(1, "chunks") + field(2, "Convolution") + field(3, "y") + field(4, "z") + field(7, chunks)
              + field(7, legacy_blob((1, 1, 1, 2), [7, 8])) + field(7, blob(np.array([[9.0]])))),
        field(100, field(1, "ip_legacy") + field(2, "InnerProduct") + field(3, "z") + field(4, "a")
              + field(7, legacy_blob((1, 1, 2, 3), range(6))) + field(7, legacy_blob((1, 1, 1, 2), [1, 2]))),
        field(100, field(1, "ip_oi11") + field(2, "InnerProduct") + field(3, "a") + field(4, "b")
              + field(7, legacy_blob((2, 3, 1, 1), range(6)))),
        field(100, field(1, "ip_t") + field(2, "InnerProduct") + field(3, "b") + field(4, "c")
              + field(7, blob(np.arange(6).reshape(3, 2))) + ip_param),
        field(100, field(1, "ip_t4") + field(2, "InnerProduct") + field(3, "c") + field(4, "d")
              + field(7, legacy_blob((2, 1, 3, 1), range(6))) + ip_param),
        field(100, field(1, "conv4") + field(2, "Convolution") + field(3, "d") + field(4, "e")
              + field(7, legacy_blob((1, 1, 2, 3), range(6)))),
    ])
    (tmp_path / "b.caffemodel").write_bytes(model)
    wf = read_weights(tmp_path / "b.caffemodel")
    t = {k: v.tolist() for k, v in wf.tensors.items()}
    assert t == {
        "dbl.weight": [0.5, -1.25], "chunks.weight": [1, 2, 3], "chunks.bias": [7, 8], "chunks.blobs.2": [[9]],
        "ip_legacy.weight": [[0, 1, 2], [3, 4, 5]], "ip_legacy.bias": [1, 2],
        "ip_oi11.weight": [[0, 1, 2], [3, 4, 5]],
        "ip_t.weight": [[0, 2, 4], [1, 3, 5]],
        "ip_t4.weight": [[[[0], [1], [2]]], [[[3], [4], [5]]]],
        "conv4.weight": [[[[0, 1, 2], [3, 4, 5]]]]}
    assert wf.tensors["dbl.weight"].dtype == torch.float64 and wf.tensors["chunks.weight"].dtype == torch.float32
    records = json.loads(wf.metadata["tensors"])
    assert records["dbl.weight"] == {"source": "dbl/blob0", "layer": "dbl", "type": "Convolution", "dtype": "float64"}
    assert records["chunks.blobs.2"] == {"source": "chunks/blob2", "layer": "chunks", "type": "Convolution",
                                         "dtype": "float32"}
    assert records["ip_t.weight"] == {"source": "ip_t/blob0", "layer": "ip_t", "type": "InnerProduct",
                                      "dtype": "float32", "converted": "InnerProduct weight transposed"}
    assert wf.metadata["net_name"] == "blobs" and "prototxt" not in wf.metadata
    assert json.loads(wf.metadata["inputs"]) == {"dbl": [], "chunks": ["dbl"], "ip_legacy": ["chunks"],
                                                 "ip_oi11": ["ip_legacy"], "ip_t": ["ip_oi11"], "ip_t4": ["ip_t"],
                                                 "conv4": ["ip_t4"]}


def test_caffe_v1_layer_types_transpose_and_v0_nets(tmp_path):
    ip_t = field(17, field(6, 1))  # V1 inner_product_param { transpose: true }
    model = field(1, "v1") + b"".join([
        field(2, field(2, "data") + field(3, "dec") + field(4, "deconv") + field(5, 39)
              + field(6, legacy_blob((1, 2, 1, 1), [1, 2]))),
        field(2, field(2, "dec") + field(3, "mv") + field(4, "mvn") + field(5, 34)
              + field(6, legacy_blob((1, 1, 1, 1), [3]))),
        field(2, field(2, "mv") + field(3, "pl") + field(4, "pool") + field(5, 17)),
        field(2, field(2, "pl") + field(3, "h5o") + field(4, "h5") + field(5, 9)
              + field(6, legacy_blob((1, 1, 1, 1), [4]))),
        field(2, field(2, "h5o") + field(3, "ipo") + field(4, "ip") + field(5, 14) + ip_t
              + field(6, legacy_blob((1, 1, 2, 3), range(6)))),
    ])
    (tmp_path / "v1.caffemodel").write_bytes(model)
    wf = read_weights(tmp_path / "v1.caffemodel")
    assert json.loads(wf.metadata["layers"]) == [["deconv", "Deconvolution"], ["mvn", "Mvn"], ["h5", "Hdf5Data"],
                                                 ["ip", "InnerProduct"]]
    assert wf.tensors["ip.weight"].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert json.loads(wf.metadata["tensors"])["ip.weight"]["converted"] == "InnerProduct weight transposed"
    assert json.loads(wf.metadata["inputs"]) == {"deconv": [], "mvn": ["deconv"], "h5": ["mvn"], "ip": ["h5"]}
    v0 = field(1, "old") + field(2, field(1, b"\x0a\x01c") + field(6, legacy_blob((1, 1, 1, 1), [1])))
    assert caffe_error(tmp_path, "v0", v0) == ("a V0 (pre-2014) Caffe net; upgrade it with Caffe's "
                                               "upgrade_net_proto_binary tool first")


def test_caffe_file_level_damage_exact_messages(tmp_path):
    from transferkit.weights.formats import caffe_file

    conv = layer("c", "Convolution", "x", "y", [np.ones(2)])
    cases = {
        "both": (field(1, "n") + conv + v1_layer("d", 4, "y", "z", [np.ones(2)]),
                 "holds both V1 'layers' and current 'layer' lists; upgrade it with Caffe's "
                 "upgrade_net_proto_binary tool"),
        "no_blobs": (field(1, "n") + layer("relu", "ReLU", "x", "x"),
                     "no layer holds any weights (a prototxt saved as .caffemodel?)"),
        "decode": (field(1, "n") + conv[:-3],
                   "truncated or damaged .caffemodel (Error parsing message with type 'tkcaffe.NetParameter': "
                   "Wire format was corrupt); re-download it"),
        "neg_dim": (field(1, "n") + field(100, field(1, "c") + field(7, field(7, field(1, -2) + field(1, -1))
                                                                       + field(5, np.ones(2, np.float32).tobytes()))),
                    "damaged blob in layer c: shape [-2, -1] does not match its 2 values; re-download or re-export "
                    "the model"),
        "odd_bytes": (field(1, "n") + field(100, field(1, "c") + field(7, field(7, field(1, 1)) + field(5, b"\0" * 6))),
                      "damaged blob in layer c: shape [1] does not match its 1 values; re-download or re-export "
                      "the model"),
        "overflow": (field(1, "n") + field(100, field(1, "c") + field(7, field(7, field(1, 1 << 32) + field(1, 1 << 32))
                                                                       + field(5, b""))),  # 2**64 values, not 0
                     "damaged blob in layer c: shape [4294967296, 4294967296] does not match its 0 values; "
                     "re-download or re-export the model"),
        "legacy": (field(1, "n") + field(100, field(1, "c") + field(7, legacy_blob((1, 2, 3, 1), range(5)))),
                   "damaged blob in layer c: shape [1, 2, 3, 1] does not match its 5 values; re-download or "
                   "re-export the model"),
    }
    for name, (data, message) in cases.items():
        assert caffe_error(tmp_path, name, data) == message, name
    with pytest.raises(TransferKitError) as err:
        caffe_file.read(tmp_path)
    assert str(err.value) == f"{tmp_path}: cannot read (Is a directory)"


def test_caffe_prototxt_choice_order_and_scale_pairing(tmp_path):
    model = field(1, "n") + b"".join([
        layer("sc", "Scale", "b", "b", [[2.0], [3.0]]),
        layer("bn", "BatchNorm", "c", "b", [[1.0], [1.0], [1.0]]),
        layer("late", "Convolution", "q", "r", [[5.0]]),
        layer("c", "Convolution", "x", "c", [[4.0]]),
    ])
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "m.caffemodel").write_bytes(model)
    conv_bn = ('layer { name: "c" type: "Convolution" bottom: "x" top: "c" }\n'
               'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "b" }\n')
    relu = 'layer { name: "relu" type: "ReLU" bottom: "b" top: "b" }\n'
    scale = 'layer { name: "sc" type: "Scale" bottom: "b" top: "b" }\n'
    (folder / "other.prototxt").write_text(conv_bn + relu + scale)  # the only prototxt: used
    wf = read_weights(folder / "m.caffemodel")
    assert wf.metadata["prototxt"] == "other.prototxt"
    # The first layer reading the BatchNorm's top is a ReLU, not a Scale: nothing merged; "late" is not in
    # the prototxt and comes last.
    assert list(wf.tensors) == ["c.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                "sc.weight", "sc.bias", "late.weight"]
    (folder / "second.prototxt").write_text("")  # two others: neither is used, the file's order is kept
    wf = read_weights(folder / "m.caffemodel")
    assert "prototxt" not in wf.metadata
    assert list(wf.tensors) == ["sc.weight", "sc.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                "bn.running_var", "late.weight", "c.weight"]
    (folder / "deploy.prototxt").write_text(conv_bn + scale)
    wf = read_weights(folder / "m.caffemodel")
    assert wf.metadata["prototxt"] == "deploy.prototxt"
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {
        "c.weight": [4], "bn.weight": [2], "bn.bias": [3], "bn.running_mean": [1], "bn.running_var": [1],
        "late.weight": [5]}
    assert json.loads(wf.metadata["inputs"]) == {"c": [], "bn": ["c"], "sc": ["bn"], "late": []}
    # The prototxt named as the model wins over deploy.prototxt; a Scale with two bottoms is not merged.
    (folder / "m.prototxt").write_text(conv_bn + scale.replace('bottom: "b"', 'bottom: "b" bottom: "x"'))
    wf = read_weights(folder / "m.caffemodel")
    assert wf.metadata["prototxt"] == "m.prototxt"
    assert list(wf.tensors) == ["c.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                "sc.weight", "sc.bias", "late.weight"]
    assert json.loads(wf.metadata["inputs"]) == {"c": [], "bn": ["c"], "sc": ["bn"], "late": []}


def test_caffe_inputs_left_out_when_a_layer_with_tensors_has_no_bottom(tmp_path):
    model = field(1, "n") + field(100, field(1, "c") + field(2, "Convolution") + field(4, "y")
                                  + field(7, blob(np.ones(1)))) + layer("d", "Convolution", "y", "z", [np.ones(1)])
    (tmp_path / "m.caffemodel").write_bytes(model)
    wf = read_weights(tmp_path / "m.caffemodel")
    assert "inputs" not in wf.metadata and list(wf.tensors) == ["c.weight", "d.weight"]


def test_caffe_prototxt_layers_without_type_and_a_scale_after_a_convolution(tmp_path):
    model = field(1, "n") + b"".join([
        layer("c", "Convolution", "x", "c", [[4.0]]), layer("bn", "BatchNorm", "c", "bn_out", [[2.0], [4.0], [2.0]]),
        layer("sc", "Scale", "bn_out", "bn_out", [[3.0], [5.0]]), layer("c2", "Convolution", "bn_out", "d", [[6.0]]),
        layer("sc2", "Scale", "d", "d", [[7.0], [8.0]]),
    ])
    (tmp_path / "m.caffemodel").write_bytes(model)
    (tmp_path / "m.prototxt").write_text(
        'layer { name: "c" type: "Convolution" bottom: "x" top: "c" }\n'
        'layer { name: "bn" bottom: "c" top: "bn_out" }\n'  # no type here: the file's BatchNorm
        'layer { name: "sc" type: "Scale" bottom: "bn_out" top: "bn_out" }\n'
        'layer { name: "mystery" bottom: "bn_out" top: "m" }\n'  # no type and no blobs
        'layer { name: "c2" type: "Convolution" bottom: "bn_out" top: "d" }\n'
        'layer { name: "sc2" type: "Scale" bottom: "d" top: "d" }\n')  # after a convolution: kept as it is
    wf = read_weights(tmp_path / "m.caffemodel")
    assert {k: v.tolist() for k, v in wf.tensors.items()} == {
        "c.weight": [4], "bn.weight": [3], "bn.bias": [5], "bn.running_mean": [1], "bn.running_var": [2],
        "c2.weight": [6], "sc2.weight": [7], "sc2.bias": [8]}
    assert json.loads(wf.metadata["layers"]) == [["c", "Convolution"], ["bn", "BatchNorm"], ["sc", "Scale"],
                                                 ["c2", "Convolution"], ["sc2", "Scale"]]
    assert json.loads(wf.metadata["tensors"])["bn.running_var"]["type"] == "BatchNorm"
    assert wf.metadata["source_format"] == "caffe" and wf.metadata["net_name"] == "n"
    assert wf.path == tmp_path / "m.caffemodel" and wf.format == "caffe"
