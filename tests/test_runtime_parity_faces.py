"""Two face detectors restored through transferkit compute what their own runtimes compute.

MXNet RetinaFace mnet.25: the network is rebuilt here from its `-symbol.json` by a small
interpreter (one PyTorch module per parameterised node, named as MXNet names its parameters),
restored from the `.params` file by `transferkit.transfer`, and compared with the outputs MXNet's
own executor produced once (tests/fixtures/make_reference_outputs.py, run with MXNet 1.9.1; the
suite needs no MXNet). Written by hand because no maintained package runs an MXNet symbol without
MXNet, and because the interpreter is the test's own account of what each operator computes.
Every BatchNorm of this file has fix_gamma False (its stored gamma counts); the reader's rule for
fix_gamma True (weight 1) is checked against the symbol in test_mxnet_values.py.

RFB-320: the Ultra-Light detector's PyTorch definition (Linzaer's vision/nn/mb_tiny_RFB.py and
vision/ssd/mb_tiny_RFB_fd.py + ssd.py, with its priors and box decoding), restored from the ONNX
export, is compared with onnxruntime running that same ONNX file on the same photo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, needs_shared
from PIL import Image
from torch import nn

from transferkit import transfer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MNET = SHARED_DATA / "weights" / "mxnet_retinaface_mnet25"
RFB = SHARED_DATA / "weights" / "ultralight_face_rfb320_multiformat"
RFB_ONNX = RFB / "models" / "onnx" / "version-RFB-320.onnx"
FACE_PHOTO = SHARED_DATA / "coco128" / "images" / "train2017" / "000000000110.jpg"  # a woman and a girl
MXNET_BN_EPS = 1e-3  # mx.sym.BatchNorm's default, for a node that does not say


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference relative to the reference's scale (its largest magnitude)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ---- MXNet RetinaFace mnet.25 ----

def _tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.strip("()").split(",") if v.strip())


def _reshape(x: torch.Tensor, spec: tuple[int, ...]) -> torch.Tensor:
    """MXNet Reshape's codes 0 (keep this dimension) and -1 (infer); the others are not used here."""
    if any(s < -1 for s in spec):
        raise NotImplementedError(f"Reshape code in {spec}")
    return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(spec)])


class SymbolNet(nn.Module):
    """An MXNet symbol graph run by PyTorch. Each Convolution and BatchNorm node becomes a module
    named as MXNet names its parameters (`mobilenet0_conv0_weight` -> module `mobilenet0_conv0`),
    so that the state dict's names are the ones transferkit's reader gives the `.params` tensors.
    Only the operators this file uses are known; any other stops it."""

    def __init__(self, symbol: Path, inputs: tuple[str, ...] = ("data",), input_channels: int = 3) -> None:
        super().__init__()
        graph = json.loads(symbol.read_text(encoding="utf-8"))
        self.nodes, self.inputs = graph["nodes"], inputs
        self.heads = [self.nodes[i]["name"] for i, *_ in graph["heads"]]
        self.module_of: dict[int, str] = {}
        channels: dict[int, int] = {}  # each node's output channels, for the modules' input widths
        for i, node in enumerate(self.nodes):  # the nodes come in topological order
            op, attrs = node["op"], node.get("attrs", {})
            ins = [channels[j] for j, *_ in node["inputs"] if j in channels]
            if op == "null":
                if node["name"] in inputs:
                    channels[i] = input_channels
                continue
            if op == "Convolution":
                channels[i] = int(attrs["num_filter"])
                module = nn.Conv2d(
                    ins[0], channels[i], _tuple(attrs["kernel"]), stride=_tuple(attrs.get("stride", "(1, 1)")),
                    padding=_tuple(attrs.get("pad", "(0, 0)")), dilation=_tuple(attrs.get("dilate", "(1, 1)")),
                    groups=int(attrs.get("num_group", 1)),
                    bias=attrs.get("no_bias", "False") not in ("True", "true", "1"))
                self._add(i, self._param(node, "_weight"), module)
            elif op == "BatchNorm":
                channels[i] = ins[0]
                module = nn.BatchNorm2d(ins[0], eps=float(attrs.get("eps", MXNET_BN_EPS)))
                self._add(i, self._param(node, "_gamma"), module)
            else:
                channels[i] = sum(ins) if op == "Concat" else ins[0]

    def _param(self, node: dict, suffix: str) -> str:
        """The module name: the node's first parameter (its weight or gamma) without the suffix."""
        name = self.nodes[node["inputs"][1][0]]["name"]
        assert name.endswith(suffix), (node["name"], name)
        return name.removesuffix(suffix)

    def _add(self, index: int, name: str, module: nn.Module) -> None:
        self.add_module(name, module)
        self.module_of[index] = name

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        values: dict[int, torch.Tensor] = {}
        for i, node in enumerate(self.nodes):
            op, attrs = node["op"], node.get("attrs", {})
            if op == "null":
                if node["name"] in self.inputs:
                    values[i] = inputs[node["name"]]
                continue  # a parameter: held by the node's module
            x = [values[j] for j, *_ in node["inputs"] if j in values]
            if op in ("Convolution", "BatchNorm"):
                y = getattr(self, self.module_of[i])(x[0])
            elif op == "Activation" and attrs["act_type"] == "relu":
                y = F.relu(x[0])
            elif op == "Concat":
                y = torch.cat(x, int(attrs.get("dim", 1)))
            elif op == "elemwise_add":
                y = x[0] + x[1]
            elif op == "UpSampling" and attrs["sample_type"] == "nearest":
                y = F.interpolate(x[0], scale_factor=int(attrs["scale"]), mode="nearest")
            elif op == "Crop" and len(x) == 2 and _tuple(attrs.get("offset", "(0, 0)")) == (0, 0) \
                    and attrs.get("center_crop", "False") == "False":
                y = x[0][:, :, : x[1].shape[2], : x[1].shape[3]]  # to the second input's size, from the top left
            elif op == "Reshape":
                y = _reshape(x[0], _tuple(attrs["shape"]))
            elif op == "softmax":
                y = torch.softmax(x[0], int(attrs.get("axis", -1)))
            else:
                raise NotImplementedError(f"MXNet operator {op} ({node['name']}) with {attrs}")
            values[i] = y
        by_name = {node["name"]: values[i] for i, node in enumerate(self.nodes) if i in values}
        return {name: by_name[name] for name in self.heads}


@needs_shared
def test_mxnet_retinaface_restored_through_transferkit_computes_what_mxnet_computed():
    ref = np.load(FIXTURES / "mxnet_retinaface_reference.npz")
    net = SymbolNet(MNET / "mnet.25-symbol.json").eval()
    report = transfer(net, MNET / "mnet.25-0000.params", scope="full")
    counts = report.counts()
    # every parameter and statistic by its own name; only PyTorch's BatchNorm step counters have none
    assert counts == {"loaded": 273, "missing": 47}, counts
    assert {e.how for e in report.by_status("loaded")} == {"exact"}
    assert all(e.target.endswith("num_batches_tracked") for e in report.by_status("missing"))
    assert not report.unused_source

    x = torch.from_numpy(ref["pixels"].astype(np.float32).transpose(2, 0, 1)[None])  # raw RGB, 0-255
    with torch.no_grad():
        out = net(data=x)
    assert list(out) == [k for k in ref.files if k.startswith("face_rpn_")]
    for name, y in out.items():
        assert y.shape == ref[name].shape, name
        err = rel_err(y.numpy(), ref[name])
        assert err <= 1e-4, (name, err)
    # the photo's two faces: the same anchors over 0.5 in both (the face half of each softmax pair)
    faces = {s: ref[f"face_rpn_cls_prob_reshape_stride{s}"][:, 2:] > 0.5 for s in (32, 16, 8)}
    assert sum(int(f.sum()) for f in faces.values()) > 0
    for s, want in faces.items():
        assert np.array_equal(out[f"face_rpn_cls_prob_reshape_stride{s}"].numpy()[:, 2:] > 0.5, want)


@needs_shared
def test_mxnet_retinaface_needs_each_batchnorms_own_eps():
    """The symbol gives the backbone's BatchNorms eps 1e-5 and the detection layers' 2e-5: PyTorch's
    default (1e-5) everywhere is visibly off, so the comparison above does test the eps."""
    ref = np.load(FIXTURES / "mxnet_retinaface_reference.npz")
    net = SymbolNet(MNET / "mnet.25-symbol.json").eval()
    transfer(net, MNET / "mnet.25-0000.params", scope="full")
    batchnorms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.eps for m in batchnorms} == {1e-5, 2e-5}
    for module in batchnorms:
        module.eps = 1e-5
    x = torch.from_numpy(ref["pixels"].astype(np.float32).transpose(2, 0, 1)[None])
    with torch.no_grad():
        out = net(data=x)
    assert max(rel_err(y.numpy(), ref[name]) for name, y in out.items()) > 1e-3


# ---- RFB-320 ----

class BasicConv(nn.Sequential):
    """Convolution, BatchNorm (eps 1e-5), optional ReLU; the .pth calls them conv and bn."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                 relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)
        if relu:
            self.relu = nn.ReLU()


class BasicRFB(nn.Module):
    """Three branches of growing dilation, concatenated, projected, plus a shortcut (scale 1.0)."""

    def __init__(self, cin: int, cout: int, map_reduce: int = 8, vision: int = 1) -> None:
        super().__init__()
        inter = cin // map_reduce
        self.branch0 = nn.Sequential(
            BasicConv(cin, inter, 1, relu=False), BasicConv(inter, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 1, dilation=vision + 1, relu=False))
        self.branch1 = nn.Sequential(
            BasicConv(cin, inter, 1, relu=False), BasicConv(inter, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 2, dilation=vision + 2, relu=False))
        self.branch2 = nn.Sequential(
            BasicConv(cin, inter, 1, relu=False), BasicConv(inter, inter // 2 * 3, 3, padding=1),
            BasicConv(inter // 2 * 3, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 4, dilation=vision + 4, relu=False))
        self.ConvLinear = BasicConv(6 * inter, cout, 1, relu=False)
        self.shortcut = BasicConv(cin, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ConvLinear(torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1))
        return F.relu(y + self.shortcut(x))


def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 and pointwise 1x1, each with BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """The detector's SeperableConv2d: depthwise 3x3 with bias, ReLU, pointwise 1x1 with bias."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.ReLU(), nn.Conv2d(cin, cout, 1))


def rfb_priors(size=(320, 240), maps=((40, 20, 10, 5), (30, 15, 8, 4)),
               min_boxes=((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))) -> torch.Tensor:
    """fd_config's priors for 320x240: (cx, cy, w, h) relative to the image, row by row, clamped to [0, 1]."""
    priors = []
    for k, boxes in enumerate(min_boxes):
        for j in range(maps[1][k]):
            for i in range(maps[0][k]):
                # shrinkage = size / map, so the centre is (i + 0.5) / map in each direction
                priors += [[(i + 0.5) / maps[0][k], (j + 0.5) / maps[1][k], b / size[0], b / size[1]] for b in boxes]
    return torch.tensor(priors).clamp(0.0, 1.0)


class RFB320(nn.Module):
    """Mb_Tiny_RFB's base net and the SSD heads of create_Mb_Tiny_RFB_fd (2 classes), in test mode:
    softmax scores and corner-form boxes relative to the image, as the ONNX export computes."""

    def __init__(self) -> None:
        super().__init__()
        c = 16
        self.base_net = nn.Sequential(
            conv_bn(3, c, 2), conv_dw(c, 2 * c, 1), conv_dw(2 * c, 2 * c, 2), conv_dw(2 * c, 2 * c, 1),
            conv_dw(2 * c, 4 * c, 2), conv_dw(4 * c, 4 * c, 1), conv_dw(4 * c, 4 * c, 1), BasicRFB(4 * c, 4 * c),
            conv_dw(4 * c, 8 * c, 2), conv_dw(8 * c, 8 * c, 1), conv_dw(8 * c, 8 * c, 1),
            conv_dw(8 * c, 16 * c, 2), conv_dw(16 * c, 16 * c, 1))
        self.extras = nn.ModuleList([nn.Sequential(
            nn.Conv2d(16 * c, 4 * c, 1), nn.ReLU(), separable(4 * c, 16 * c, stride=2), nn.ReLU())])
        anchors, widths = (3, 2, 2, 3), (4 * c, 8 * c, 16 * c)
        self.regression_headers = nn.ModuleList(
            [separable(w, a * 4) for w, a in zip(widths, anchors, strict=False)] + [nn.Conv2d(16 * c, 3 * 4, 3, 1, 1)])
        self.classification_headers = nn.ModuleList(
            [separable(w, a * 2) for w, a in zip(widths, anchors, strict=False)] + [nn.Conv2d(16 * c, 3 * 2, 3, 1, 1)])
        self.register_buffer("priors", rfb_priors(), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = []
        for start, end in ((0, 8), (8, 11), (11, 13)):  # the heads read base_net's 8th, 11th and 13th outputs
            x = self.base_net[start:end](x)
            features.append(x)
        features.append(self.extras[0](x))
        scores, locations = [], []
        for i, f in enumerate(features):
            scores.append(self.classification_headers[i](f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, 2))
            locations.append(self.regression_headers[i](f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, 4))
        loc, p = torch.cat(locations, 1), self.priors
        centre = loc[..., :2] * 0.1 * p[:, 2:] + p[:, :2]  # center_variance 0.1
        size = torch.exp(loc[..., 2:] * 0.2) * p[:, 2:]  # size_variance 0.2
        return torch.cat(scores, 1).softmax(2), torch.cat([centre - size / 2, centre + size / 2], 2)


def rfb_input() -> np.ndarray:
    """The face photo resized to 320x240, normalised as the detector's own scripts do: (RGB - 127) / 128."""
    rgb = np.asarray(Image.open(FACE_PHOTO).convert("RGB").resize((320, 240), Image.BILINEAR), np.float32)
    return ((rgb - 127.0) / 128.0).transpose(2, 0, 1)[None].copy()


@needs_shared
def test_rfb320_restored_from_onnx_computes_what_onnxruntime_computes():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = RFB320().eval()
    report = transfer(net, RFB_ONNX, scope="full")
    counts = report.counts()
    # every tensor by its own name: the export kept the .pth's names, BatchNorm step counters included
    assert counts == {"loaded": 244}, counts
    assert {e.how for e in report.by_status("loaded")} == {"exact"}

    x = rfb_input()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the 2019 export lists its initializers as inputs too, which ORT warns about
    session = ort.InferenceSession(str(RFB_ONNX), options, providers=["CPUExecutionProvider"])
    ref_scores, ref_boxes = session.run(["scores", "boxes"], {"input": x})
    with torch.no_grad():
        scores, boxes = (t.numpy() for t in net(torch.from_numpy(x)))
    assert scores.shape == ref_scores.shape == (1, 4420, 2) and boxes.shape == ref_boxes.shape == (1, 4420, 4)
    assert rel_err(scores, ref_scores) <= 1e-4, rel_err(scores, ref_scores)
    assert rel_err(boxes, ref_boxes) <= 1e-4, rel_err(boxes, ref_boxes)
    faces = ref_scores[0, :, 1] > 0.7  # the detector's own demo threshold
    assert faces.sum() > 0 and np.array_equal(scores[0, :, 1] > 0.7, faces)
