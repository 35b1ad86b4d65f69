"""Folded sources in execution order restored by structure, without a name map.

`Toy` is a small detector: a stem, two branches of two convolutions with the same shapes (the
second one dilated in the right branch) joined by a concatenation, a stage, and a class and a box
head on the concatenation and on the stage. Its module order lists the network, then the class
heads, then the box heads, as SSD-style detectors do; a graph runs each head right after what it
reads. The sources are written here, folded by hand from a `Toy` whose outputs are the reference: a
Caffe model in one execution order, and a TFLite file in another (the left branch's second
convolution after the right branch's, the heads last, box heads first) that keeps the dilated
convolution's BatchNorm as a MUL and an ADD, as TensorFlow does (and a Caffe variant that keeps it
as a Scale layer). Neither order lines up with the module order; the graphs their readers record do.

Module order (convolutions):  0 stem.0  1 left.0  2 left.3  3 right.0  4 right.3  5 stage.0
  6 stage.3  7 cls.0.0  8 cls.0.1  9 cls.1  10 box.0.0  11 box.0.1  12 box.1
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from protowire import field
from safetensors.torch import load_file
from test_formats_caffe_mxnet import layer
from test_formats_onnx_tflite import TfliteBuilder
from torch import nn

from transferkit.cli import main
from transferkit.errors import TransferKitError
from transferkit.weights import matching
from transferkit.weights.formats import read_weights
from transferkit.weights.formats.origins import LayerGraph
from transferkit.weights.matching import match_names
from transferkit.weights.transfer import transfer

# tflite BuiltinOperator codes and tensor type
ADD, CONCATENATION, CONV_2D, DEPTHWISE_CONV_2D, MUL, RELU = 0, 2, 3, 4, 18, 19
FLOAT32 = 0


def conv_bn(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8))
        self.left = nn.Sequential(*conv_bn(8, 4, 1), *conv_bn(4, 4))
        self.right = nn.Sequential(*conv_bn(8, 4, 1), *conv_bn(4, 4, dilation=2))
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.cls = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 2, 1)),
                                  nn.Conv2d(16, 2, 1)])
        self.box = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)),
                                  nn.Conv2d(16, 4, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        outs = [self.cls[0](x), self.box[0](x)]
        x = self.stage(x)
        outs += [self.cls[1](x), self.box[1](x)]
        return torch.cat([o.flatten(1) for o in outs], 1)


def trained_toy() -> Toy:
    torch.manual_seed(0)
    net = Toy().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.05, 3.0)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-1, 1)
    return net


def outputs(net: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return net.eval()(x)


def scale_offset(bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s.detach().numpy(), (bn.bias - bn.running_mean * s).detach().numpy()


def layers_of(net: Toy) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each convolution as a deployment export holds it, by the export's layer name: (filter, bias)
    with the BatchNorm after it folded in."""
    out = {}
    for name, conv, bn in (("stem", net.stem[0], net.stem[1]), ("left_a", net.left[0], net.left[1]),
                           ("left_b", net.left[3], net.left[4]), ("right_a", net.right[0], net.right[1]),
                           ("right_b", net.right[3], net.right[4]), ("stage_dw", net.stage[0], net.stage[1]),
                           ("stage_pw", net.stage[3], net.stage[4]), ("cls0a", net.cls[0][0], None),
                           ("cls0b", net.cls[0][1], None), ("cls1", net.cls[1], None),
                           ("box0a", net.box[0][0], None), ("box0b", net.box[0][1], None), ("box1", net.box[1], None)):
        w = conv.weight.detach().numpy()
        b = conv.bias.detach().numpy() if conv.bias is not None else np.zeros(w.shape[0], np.float32)
        if bn is not None:
            s, o = scale_offset(bn)
            w, b = w * s[:, None, None, None], b * s + o
        out[name] = (w.astype(np.float32), b.astype(np.float32))
    return out


def write_caffe(net: Toy, path, box1_width: int = 4, kept_scale: bool = False):
    """The Caffe export: every BatchNorm folded, layers in the order a graph runs them, ReLUs in
    place; with `kept_scale`, the dilated convolution's BatchNorm kept as a Scale layer after it."""
    conv = layers_of(net)
    if kept_scale:
        conv["right_b"] = (net.right[3].weight.detach().numpy(), np.zeros(4, np.float32))
    if box1_width != 4:  # another architecture's box head
        conv["box1"] = (np.zeros((box1_width, 16, 1, 1), np.float32), np.zeros(box1_width, np.float32))
    parts = [field(1, "toy")]
    for name, bottom in (("stem", "data"), ("left_a", "stem"), ("left_b", "left_a"), ("right_a", "stem"),
                         ("right_b", "right_a"), ("cat", None), ("cls0a", "cat"), ("cls0b", "cls0a"),
                         ("box0a", "cat"), ("box0b", "box0a"), ("stage_dw", "cat"), ("stage_pw", "stage_dw"),
                         ("cls1", "stage_pw"), ("box1", "stage_pw")):
        if name == "cat":
            parts.append(layer("cat", "Concat", "left_b", "cat", extra=field(3, "right_b")))
            continue
        parts.append(layer(name, "Convolution", bottom, name, list(conv[name])))
        if name == "right_b" and kept_scale:
            parts.append(layer("right_b_scale", "Scale", name, name, list(scale_offset(net.right[4]))))
        if name in ("stem", "left_a", "left_b", "right_a", "right_b", "stage_dw", "stage_pw"):
            parts.append(layer(f"{name}_relu", "ReLU", name, name))
    path.write_bytes(b"".join(parts))
    return path


# Which export layer each target convolution must get (written out, not computed)
EXPORT_LAYER = {"stem.0": "stem", "left.0": "left_a", "left.3": "left_b", "right.0": "right_a", "right.3": "right_b",
               "stage.0": "stage_dw", "stage.3": "stage_pw", "cls.0.0": "cls0a", "cls.0.1": "cls0b", "cls.1": "cls1",
               "box.0.0": "box0a", "box.0.1": "box0b", "box.1": "box1"}


def restore_into_a_fresh_toy(net: Toy, path):
    """The written file restored into a new Toy by structure: the same function as `net`; returns the
    report and its entries by target name."""
    fresh = Toy()
    report = transfer(fresh, path, scope="full")
    assert torch.allclose(outputs(fresh), outputs(net), rtol=1e-5, atol=1e-5)
    return report, {e.target: e for e in report.entries}


def test_caffe_in_execution_order_restores_the_same_function(tmp_path):
    net = trained_toy()
    report, entries = restore_into_a_fresh_toy(net, write_caffe(net, tmp_path / "toy.caffemodel"))
    assert {conv: entries[f"{conv}.weight"].source for conv in EXPORT_LAYER} == {
        conv: f"{layer}.weight" for conv, layer in EXPORT_LAYER.items()}
    # 7 pairs folded (conv weight, BatchNorm weight, bias, mean, var, counter), 6 plain convs loaded
    assert report.counts() == {"folded": 42, "loaded": 12}
    assert entries["stage.1.running_var"].status == "folded" and entries["cls.1.bias"].how == "structure"
    assert report.unused_source == []
    # a BatchNorm the export kept as a Scale layer (scale and offset) after its convolution
    path = write_caffe(net, tmp_path / "scaled.caffemodel", kept_scale=True)
    fresh = Toy()
    report = transfer(fresh, path, scope="full")
    assert torch.allclose(outputs(fresh), outputs(net), rtol=1e-5, atol=1e-5)
    entries = {e.target: e for e in report.entries}
    assert (entries["right.4.weight"].source, entries["right.4.bias"].source) == (
        "right_b_scale.weight", "right_b_scale.bias")
    assert report.counts() == {"folded": 42, "loaded": 12} and report.unused_source == []


def test_without_the_graph_the_same_tensors_are_refused(tmp_path):
    """The graph is what pairs them: the same tensors in a plain checkpoint part at the first head."""
    path = write_caffe(trained_toy(), tmp_path / "toy.caffemodel")
    torch.save(read_weights(path).tensors, tmp_path / "plain.pth")
    with pytest.raises(TransferKitError, match=r"part at position 12: source cls0b.weight \(2, 8, 1, 1\) vs target "
                                               r"stage.3.weight \(16, 8, 1, 1\)"):
        transfer(Toy(), tmp_path / "plain.pth", scope="full")


def test_command_with_a_template_and_a_refused_architecture(tmp_path, capsys):
    net = trained_toy()
    torch.save(net.state_dict(), tmp_path / "toy.pth")
    out = tmp_path / "out.safetensors"
    args = ["weights", "transfer", "--like", str(tmp_path / "toy.pth"), "--scope", "full", "--out", str(out)]
    assert main([*args, "--from", str(write_caffe(net, tmp_path / "toy.caffemodel"))]) == 0
    fresh = Toy()
    fresh.load_state_dict(load_file(out))
    assert torch.allclose(outputs(fresh), outputs(net), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    other = write_caffe(net, tmp_path / "other.caffemodel", box1_width=6)
    assert main([*args, "--from", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("they part at position 12: source box1.weight (6, 16, 1, 1) vs target box.1.weight (4, 16, 1, 1)"
            in err)


def write_tflite(net: Toy, path):
    """The TFLite export: BatchNorms folded except the dilated branch's, kept as a MUL and an ADD
    after a convolution with a zero bias; a scalar MUL after the concatenation (a constant of the
    forward, no tensor of the model); the heads run last, box heads first."""
    conv = layers_of(net)
    tb = TfliteBuilder()
    act = {"input": tb.tensor("input", (1, 10, 10, 3), FLOAT32)}

    def op(code, inputs, out, consts=()):
        ins = [act[i] for i in inputs] + [tb.tensor(n, a.shape, FLOAT32, a) for n, a in consts]
        act[out] = tb.tensor(out, (1, 1, 1, 1), FLOAT32)
        tb.op(code, ins, [act[out]])

    def conv_op(name, src):
        w, b = conv[name]
        depthwise = w.shape[1] == 1
        filt = w.transpose(1, 2, 3, 0) if depthwise else w.transpose(0, 2, 3, 1)  # 1HWO or OHWI
        op(DEPTHWISE_CONV_2D if depthwise else CONV_2D, [src], name,
           [(f"{name}/filter", filt), (f"{name}/bias", b)])

    conv_op("stem", "input")
    op(RELU, ["stem"], "stem_relu")
    conv_op("left_a", "stem_relu")
    op(RELU, ["left_a"], "left_a_relu")
    conv_op("right_a", "stem_relu")
    op(RELU, ["right_a"], "right_a_relu")
    conv["right_b"] = (net.right[3].weight.detach().numpy(), np.zeros(4, np.float32))
    conv_op("right_b", "right_a_relu")
    s, o = scale_offset(net.right[4])
    op(MUL, ["right_b"], "right_mul", [("right_bn/mul", s)])
    op(ADD, ["right_mul"], "right_add", [("right_bn/add", o)])
    op(RELU, ["right_add"], "right_relu")
    conv_op("left_b", "left_a_relu")
    op(RELU, ["left_b"], "left_b_relu")
    op(CONCATENATION, ["left_b_relu", "right_relu"], "cat0")
    op(MUL, ["cat0"], "cat", [("cat/scale", np.ones(1, np.float32))])
    conv_op("stage_dw", "cat")
    op(RELU, ["stage_dw"], "stage_dw_relu")
    conv_op("stage_pw", "stage_dw_relu")
    op(RELU, ["stage_pw"], "stage_pw_relu")
    for name, src in (("box1", "stage_pw_relu"), ("cls1", "stage_pw_relu"), ("box0a", "cat"), ("box0b", "box0a"),
                      ("cls0a", "cat"), ("cls0b", "cls0a")):
        conv_op(name, src)
    path.write_bytes(tb.build())
    return path


def test_tflite_in_execution_order_with_a_batchnorm_kept_as_mul_and_add(tmp_path):
    net = trained_toy()
    report, entries = restore_into_a_fresh_toy(net, write_tflite(net, tmp_path / "toy.tflite"))
    assert {conv: entries[f"{conv}.weight"].source for conv in EXPORT_LAYER} == {
        conv: f"{layer}/filter" for conv, layer in EXPORT_LAYER.items()}
    assert (entries["right.4.weight"].source, entries["right.4.bias"].source) == ("right_bn/mul", "right_bn/add")
    assert entries["right.4.weight"].status == entries["right.4.bias"].status == "folded"
    assert entries["left.4.weight"].source is None  # folded into left_b's filter: the identity here
    assert report.counts() == {"folded": 42, "loaded": 12}
    assert report.unused_source == ["cat/scale"]  # the scalar belongs to no tensor of the model
    # excluded, the kept scale and offset are still reported with the source tensors they would take
    report = transfer(Toy(), tmp_path / "toy.tflite", scope="full", exclude=["right.4.*"])
    entries = {e.target: e for e in report.entries}
    assert [(e.status, e.source, e.how) for e in (entries["right.4.weight"], entries["right.4.bias"])] == [
        ("excluded", "right_bn/mul", "structure"), ("excluded", "right_bn/add", "structure")]


class Wrapped(nn.Module):
    """A detector-like model: the Toy as its backbone under `backbone.`, a head of its own after it."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Toy()
        self.head = nn.Conv2d(16, 3, 1)


def test_a_backbone_under_a_prefix_is_paired_by_the_graph(tmp_path):
    """Scope backbone with a backbone prefix matches the source against the names under the prefix;
    the graph still pairs them (without it they part at the first head, as above)."""
    net = trained_toy()
    model = Wrapped()
    head = model.head.weight.detach().clone()
    report = transfer(model, write_caffe(net, tmp_path / "toy.caffemodel"), "backbone", (), ("backbone.*",),
                      backbone_prefix="backbone.")
    assert torch.allclose(outputs(model.backbone), outputs(net), rtol=1e-5, atol=1e-5)
    entries = {e.target: e for e in report.entries}
    assert entries["backbone.cls.1.bias"].source == "cls1.bias" and entries["backbone.cls.1.bias"].how == "structure"
    assert entries["head.weight"].status == "out-of-scope" and torch.equal(model.head.weight, head)


def with_eps(net: Toy, eps: float) -> Toy:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps
    return net


def test_a_frozen_batchnorm_folds_with_its_own_eps(tmp_path):
    """Detectors freeze their backbone's BatchNorms (timm's `freeze_batch_norm_2d`, into
    torchvision's FrozenBatchNorm2d, which is no `_BatchNorm`); a folded source is unfolded with the
    frozen layer's eps (1e-3 here, as TensorFlow-ported backbones have), not PyTorch's default."""
    from timm.layers import freeze_batch_norm_2d
    from torchvision.ops import FrozenBatchNorm2d

    net = with_eps(trained_toy(), 1e-3)
    fresh = freeze_batch_norm_2d(with_eps(Toy(), 1e-3))
    assert isinstance(fresh.stem[1], FrozenBatchNorm2d) and fresh.stem[1].eps == 1e-3
    transfer(fresh, write_caffe(net, tmp_path / "toy.caffemodel"), scope="full")
    assert torch.allclose(outputs(fresh), outputs(net), rtol=1e-5, atol=1e-5)


def graph_of(layers: dict[str, list[str]], inputs: dict[str, list[str]]) -> LayerGraph:
    return LayerGraph({t: layer for layer, ts in layers.items() for t in ts}, dict.fromkeys(layers, "Conv"),
                      list(layers), inputs)


def test_pairing_backtracks_and_breaks_ties_by_the_order_the_source_runs():
    """Three layers read the stem, two of them with the target's next shape: the first the source
    runs leaves nothing for the position after, so the search goes back; two branches with the same
    shapes throughout are told apart by the order the source runs them."""
    src = {"head.w": (4, 8, 1, 1), "head2.w": (2, 4, 1, 1), "a1.w": (4, 8, 1, 1), "a2.w": (6, 4, 1, 1),
           "b1.w": (4, 8, 1, 1), "b2.w": (6, 4, 1, 1), "stem.w": (8, 3, 3, 3)}
    graph = graph_of({"stem": ["stem.w"], "head": ["head.w"], "head2": ["head2.w"], "a1": ["a1.w"],
                      "b1": ["b1.w"], "a2": ["a2.w"], "b2": ["b2.w"]},
                     {"stem": [], "head": ["stem"], "head2": ["head"], "a1": ["stem"], "b1": ["stem"],
                      "a2": ["a1"], "b2": ["b1"]})
    src = {k: src[k] for k in ("stem.w", "head.w", "head2.w", "a1.w", "b1.w", "b2.w", "a2.w")}  # as the file runs
    tgt = {"s.weight": (8, 3, 3, 3), "x.0.weight": (4, 8, 1, 1), "x.1.weight": (6, 4, 1, 1), "y.0.weight": (4, 8, 1, 1),
           "y.1.weight": (6, 4, 1, 1), "h.0.weight": (4, 8, 1, 1), "h.1.weight": (2, 4, 1, 1)}
    m = {t: x.source for t, x in match_names(src, tgt, graph=graph).items()}
    assert m == {"s.weight": "stem.w", "x.0.weight": "a1.w", "x.1.weight": "a2.w", "y.0.weight": "b1.w",
                 "y.1.weight": "b2.w", "h.0.weight": "head.w", "h.1.weight": "head2.w"}
    with pytest.raises(TransferKitError, match=r"part at position 2: source head2.w \(2, 4, 1, 1\) vs target "
                                               r"x.1.weight \(6, 4, 1, 1\)"):
        match_names(src, tgt)  # the stored order alone


def test_a_search_without_end_is_cut_short(monkeypatch):
    """Twelve interchangeable layers and a thirteenth position nothing fills: the search stops at its
    step limit with one line, instead of trying every subset."""
    src = {f"l{i}.w": (4, 4, 1, 1) for i in range(12)}
    graph = graph_of({f"l{i}": [f"l{i}.w"] for i in range(12)}, {f"l{i}": [] for i in range(12)})
    tgt = {f"m{i}.weight": (4, 4, 1, 1) for i in range(12)} | {"z.weight": (5, 4, 1, 1)}
    monkeypatch.setattr(matching, "GRAPH_STEPS", 500)
    with pytest.raises(TransferKitError, match="allows too many orders"):
        match_names(src, tgt, graph=graph)


def test_a_converted_file_keeps_its_graph(tmp_path):
    """`weights convert` carries the reader's record, graph included, into the safetensors file,
    which stores its tensors in an order of its own (a bias before its filter): restored the same."""
    net = trained_toy()
    out = tmp_path / "toy.safetensors"
    assert main(["weights", "convert", str(write_tflite(net, tmp_path / "toy.tflite")), "--out", str(out)]) == 0
    assert list(read_weights(out).tensors)[:2] == ["box0a/bias", "box0a/filter"]
    fresh = Toy()
    report = transfer(fresh, out, scope="full")
    assert torch.allclose(outputs(fresh), outputs(net), rtol=1e-5, atol=1e-5)
    assert report.counts() == {"folded": 42, "loaded": 12}


@pytest.mark.parametrize("inputs", ["{not json", "[" * 100_000 + "]" * 100_000, '{"op1": 3}', '["op1"]'],
                         ids=["not-json", "nested-deep", "not-lists", "not-an-object"])
def test_a_damaged_graph_record_is_left_aside(tmp_path, inputs):
    """A safetensors file can carry any metadata: a graph record that does not read back is not
    used, and the tensors are paired by their stored order alone (here: refused in one line)."""
    from safetensors.torch import save_file

    path = write_tflite(trained_toy(), tmp_path / "toy.tflite")
    wf = read_weights(path)
    save_file(wf.tensors, tmp_path / "toy.safetensors", metadata={**wf.metadata, "inputs": inputs})
    with pytest.raises(TransferKitError, match="their structures do not line up \\(") as caught:
        transfer(Toy(), tmp_path / "toy.safetensors", scope="full")
    assert "\n" not in str(caught.value)


# --- the graph pairing's rules, on shapes alone ---------------------------------------------------

def pairing(src, tgt, graph, **kw) -> dict[str, str]:
    return {t: x.source for t, x in match_names(src, tgt, graph=graph, **kw).items()}


STEM_AB = graph_of({"stem": ["stem.w"], "a": ["a.w"], "b": ["b.w"]}, {"stem": [], "a": ["stem"], "b": ["stem"]})
# Every source below is stored heads first, so the plain order pairing parts at position 0 and the graph decides.


def test_two_replaced_heads_each_take_the_source_layer_of_their_own_shape():
    """Replaced heads (`may_differ`) accept a source layer of any shape: among those the graph allows
    at a position, the one with the target's exact shape comes first, before the order the source runs."""
    src = {"a.w": (2, 16), "b.w": (5, 16), "stem.w": (16, 3, 3, 3)}
    tgt = {"s.weight": (16, 3, 3, 3), "x.weight": (5, 16), "y.weight": (2, 16)}
    assert pairing(src, tgt, STEM_AB, may_differ={"x.weight", "y.weight"}) == {
        "s.weight": "stem.w", "x.weight": "b.w", "y.weight": "a.w"}
    assert pairing(src, {**tgt, "x.weight": (2, 16), "y.weight": (5, 16)}, STEM_AB,
                   may_differ={"x.weight", "y.weight"}) == {"s.weight": "stem.w", "x.weight": "a.w", "y.weight": "b.w"}


@pytest.mark.parametrize("src, tgt, expected", [
    # linear layers (2-D weights, with and without a bias) are units on both sides
    ({"fc.w": (10, 16), "fc.b": (10,), "stem.w": (16, 3, 3, 3), "stem.b": (16,)},
     {"s.weight": (16, 3, 3, 3), "s.bias": (16,), "fc.weight": (10, 16), "fc.bias": (10,)},
     {"s.weight": "stem.w", "s.bias": "stem.b", "fc.weight": "fc.w", "fc.bias": "fc.b"}),
    # a source with a layer more than the target (a classifier's head): the target's modules are all paired
    ({"b.w": (5, 16), "a.w": (2, 16), "stem.w": (16, 3, 3, 3)}, {"s.weight": (16, 3, 3, 3), "x.weight": (2, 16)},
     {"s.weight": "stem.w", "x.weight": "a.w"}),
], ids=["linear-layers", "source-has-more"])
def test_graph_pairings_that_line_up(src, tgt, expected):
    graph = graph_of({"stem": ["stem.w", "stem.b"], "a": ["a.w"], "b": ["b.w"], "fc": ["fc.w", "fc.b"]},
                     {"stem": [], "a": ["stem"], "b": ["stem"], "fc": ["stem"]})
    assert pairing(src, tgt, graph) == expected


def graph_error(layers: int, modules: int, at: str) -> str:
    return (f"^source and target tensor names differ and their structures do not line up in any order the source's "
            f"graph allows \\({layers} source layers vs {modules} target modules, convolution and linear\\); they "
            f"part at position {at}; check that the source is for this architecture$")


@pytest.mark.parametrize("src, tgt, expected", [
    # nothing the source can run first fits the target's first module
    ({"a.w": (4, 8, 1, 1), "stem.w": (8, 3, 3, 3)}, {"s.weight": (8, 3, 5, 5), "x.weight": (4, 8, 1, 1)},
     graph_error(2, 2, r"0: source stem.w \(8, 3, 3, 3\) vs target s.weight \(8, 3, 5, 5\)")),
    # the target has a module more than the source has layers
    ({"a.w": (4, 8, 1, 1), "stem.w": (8, 3, 3, 3)},
     {"s.weight": (8, 3, 3, 3), "x.weight": (4, 8, 1, 1), "z.weight": (2, 4, 1, 1)},
     graph_error(2, 3, r"2: source \(none left to run\) vs target z.weight \(2, 4, 1, 1\)")),
    # position 2 reached twice (a then b, b then a): what the source runs there first is named
    ({"b.w": (4, 8, 1, 1), "a.w": (4, 8, 1, 1), "stem.w": (8, 3, 3, 3)},
     {"s.weight": (8, 3, 3, 3), "x.weight": (4, 8, 1, 1), "z.weight": (6, 4, 1, 1)},
     graph_error(3, 3, r"2: source b.w \(4, 8, 1, 1\) vs target z.weight \(6, 4, 1, 1\)")),
], ids=["first-position", "none-left", "reached-twice"])
def test_graph_pairings_that_part_name_where(src, tgt, expected):
    with pytest.raises(TransferKitError, match=expected):
        match_names(src, tgt, graph=STEM_AB)


def test_the_step_limit_counts_each_layer_placed(monkeypatch):
    """Three layers placed without a step back: three steps, the limit allows exactly that many."""
    src = {"a.w": (2, 16), "b.w": (5, 16), "stem.w": (16, 3, 3, 3)}
    tgt = {"s.weight": (16, 3, 3, 3), "x.weight": (5, 16), "y.weight": (2, 16)}
    monkeypatch.setattr(matching, "GRAPH_STEPS", 3)
    assert pairing(src, tgt, STEM_AB) == {"s.weight": "stem.w", "x.weight": "b.w", "y.weight": "a.w"}
    monkeypatch.setattr(matching, "GRAPH_STEPS", 2)
    with pytest.raises(TransferKitError, match=r"^source and target tensor names differ, and the source's graph "
                                               r"allows too many orders of its 3 layers to pair them with the "
                                               r"target's 3 modules \(2 tried\); give a name map \(--map\)$"):
        match_names(src, tgt, graph=STEM_AB)


def test_sets_of_layers_already_failed_from_are_not_tried_again(monkeypatch):
    """Three interchangeable layers and a fourth module nothing fills. Counted by hand: 3 placements
    down, then {0, 2} -> 1 and {1} -> {0, 2} -> 0 ... tried once each: 12 steps, where trying every
    order would take 3 + 6 + 6 = 15."""
    src = {f"l{i}.w": (4, 4, 1, 1) for i in range(3)}
    graph = graph_of({f"l{i}": [f"l{i}.w"] for i in range(3)}, {f"l{i}": [] for i in range(3)})
    tgt = {f"m{i}.weight": (4, 4, 1, 1) for i in range(3)} | {"z.weight": (5, 4, 1, 1)}
    monkeypatch.setattr(matching, "GRAPH_STEPS", 12)
    with pytest.raises(TransferKitError, match=graph_error(3, 4, r"3: source \(none left to run\) vs target "
                                                                 r"z.weight \(5, 4, 1, 1\)")):
        match_names(src, tgt, graph=graph)
    monkeypatch.setattr(matching, "GRAPH_STEPS", 11)
    with pytest.raises(TransferKitError, match=r"too many orders of its 3 layers .*\(11 tried\)"):
        match_names(src, tgt, graph=graph)


@pytest.mark.parametrize("shapes, units", [
    ({"c.weight": (8, 3, 3, 3), "c.bias": (8,)}, [["c.weight", "c.bias"]]),
    ({"fc.weight": (10, 8), "fc.bias": (10,), "c.weight": (8, 3, 3, 3)}, [["fc.weight", "fc.bias"], ["c.weight"]]),
    ({"c.weight": (8, 3, 3, 3), "bn.weight": (8,)}, None),           # a BatchNorm: not a convolution or linear
    ({"bn.weight": (8,), "c.weight": (8, 3, 3, 3)}, None),
    ({"c.bias": (8,), "c.weight": (8, 3, 3, 3)}, None),                # a bias before any weight
    ({"c.weight": (8, 3, 3, 3), "c.bias": (5,)}, None),              # a bias of another width
    ({"c.weight": (8, 3, 3, 3), "d.bias": (8,)}, None),              # another module's bias
    ({"c.weight": (8, 3, 3, 3), "c.bias": (8,), "d.bias": (8,)}, None),
    ({"pos_embed.table": (4, 8)}, None),                              # 2-D, but not a weight
], ids=["conv", "linear", "batchnorm", "batchnorm-first", "bias-first", "bias-width", "bias-other-module",
        "bias-alone", "not-a-weight"])
def test_target_modules_are_convolutions_and_linear_layers_only(shapes, units):
    assert matching._module_units(list(shapes), shapes) == units


def test_source_layers_and_what_each_needs_first():
    """A record may name a layer whose tensors the file no longer holds (`ghost`), and inputs it never
    runs (`data`) or runs later (`fc` read by `a`): those are passed over, the rest grouped by layer."""
    shapes = {"stem.w": (8, 3, 3, 3), "stem.b": (8,), "bn.s": (8,), "a.w": (4, 8, 1, 1), "fc.w": (10, 4),
              "fc.b": (10,)}
    graph = graph_of({"stem": ["stem.w", "stem.b"], "bn": ["bn.s"], "a": ["a.w"], "ghost": ["ghost.w"],
                      "fc": ["fc.w", "fc.b"]},
                     {"stem": ["data"], "bn": ["stem"], "a": ["bn", "fc"], "ghost": ["a"], "fc": ["ghost"]})
    units, needs = matching._layer_units(list(shapes), shapes, graph)
    assert units == [["stem.w", "stem.b"], ["a.w"], ["fc.w", "fc.b"]]
    assert needs == [frozenset(), frozenset({0}), frozenset({1})]
    # the same record for a file that holds the stem alone
    assert matching._layer_units(["stem.w", "stem.b"], shapes, graph) == ([["stem.w", "stem.b"]], [frozenset()])


@pytest.mark.parametrize("names, prefix", [
    (["resnetv20_conv0_weight", "resnetv20_dense0_weight"], "resnetv20_"),  # two names are enough
    (["resnetv20_conv0_weight"], ""),                                       # one is not
    ([], ""),
    (["net.body.a", "net.body.b", "net.body.c"], "net.body."),             # cut at the last `.`
    (["net.conv1", "net.conv2"], "net."),                                   # not inside a name
    (["a_b_c1.w", "a_b_c2.w"], "a_b_"),                                     # or at the last `_`
    (["a.x", "a.y"], "a."),
    (["_x.a", "_x.b"], ""),                                                 # a bare `_` is a naming style
    (["conv.weight", "fc.weight"], ""),
], ids=["two", "one", "none", "last-dot", "inside-a-name", "last-underscore", "one-letter", "underscore", "no-common"])
def test_instance_prefix_is_the_common_part_cut_at_a_separator(names, prefix):
    assert matching.instance_prefix(names) == prefix


@pytest.mark.parametrize("src, tgt, rename, expected", [
    # a tensor paired by name (renamed, or exact) is out of the rest, which then pairs by order
    ({"features.0.weight": (8, 3, 3, 3), "classifier.weight": (10, 8), "classifier.bias": (10,)},
     {"stem.weight": (8, 3, 3, 3), "fc.weight": (10, 8), "fc.bias": (10,)}, [(r"^features\.0\.", "stem.")],
     {"stem.weight": ("features.0.weight", "renamed"), "fc.weight": ("classifier.weight", "structure"),
      "fc.bias": ("classifier.bias", "structure")}),
    ({"stem.weight": (8, 3, 3, 3), "classifier.weight": (10, 8), "classifier.bias": (10,)},
     {"stem.weight": (8, 3, 3, 3), "fc.weight": (10, 8), "fc.bias": (10,)}, [],
     {"stem.weight": ("stem.weight", "exact"), "fc.weight": ("classifier.weight", "structure"),
      "fc.bias": ("classifier.bias", "structure")}),
    # renamed names meet a wrapped target's names once its wrapper is removed, whatever the stored order
    ({"features.fc.weight": (2, 4), "features.conv.weight": (4, 3)},
     {"module.body.conv.weight": (4, 3), "module.head.fc.weight": (2, 4)},
     [(r"^features\.conv", "body.conv"), (r"^features\.fc", "head.fc")],
     {"module.body.conv.weight": ("features.conv.weight", "prefix"),
      "module.head.fc.weight": ("features.fc.weight", "prefix")}),
    # an exact name, then a wrapped one
    ({"stem.weight": (8, 3, 3, 3), "module.fc.weight": (2, 4)}, {"stem.weight": (8, 3, 3, 3), "fc.weight": (2, 4)}, [],
     {"stem.weight": ("stem.weight", "exact"), "fc.weight": ("module.fc.weight", "prefix")}),
    # two sources under different wrappers with one name: ambiguous, neither is taken
    ({"stem.weight": (8, 3, 3, 3), "module.fc.weight": (2, 4), "model.fc.weight": (2, 4)},
     {"stem.weight": (8, 3, 3, 3), "_orig_mod.fc.weight": (2, 4)}, [], {"stem.weight": ("stem.weight", "exact")}),
    # names equal once instance prefixes are removed are a guess: taken only where the shapes agree too
    ({"resnetv20_conv0_weight": (8, 3, 3, 3), "resnetv20_dense0_weight": (10, 8)},
     {"resnetv22_conv0_weight": (8, 3, 3, 3), "resnetv22_dense0_weight": (5, 8)}, [],
     {"resnetv22_conv0_weight": ("resnetv20_conv0_weight", "prefix")}),
    # a tensor paired under its wrapper is out of the rest too
    ({"module.stem.weight": (8, 3, 3, 3), "a.w": (10, 8)}, {"stem.weight": (8, 3, 3, 3), "fc.weight": (10, 8)}, [],
     {"stem.weight": ("module.stem.weight", "prefix"), "fc.weight": ("a.w", "structure")}),
    # nothing on one side: nothing to pair, and nothing to refuse (the report lists what is missing or unused)
    ({}, {"fc.weight": (10, 8)}, [], {}),
    ({"a.w": (10, 8)}, {}, [], {}),
], ids=["renamed-then-order", "exact-then-order", "renamed-under-a-wrapper", "exact-then-wrapped", "ambiguous-wrappers",
        "instance-prefix-shapes", "wrapped-then-order", "empty-source", "empty-target"])
def test_names_first_then_order(src, tgt, rename, expected):
    assert {t: (x.source, x.how) for t, x in match_names(src, tgt, rename=rename).items()} == expected
