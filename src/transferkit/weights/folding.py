"""BatchNorm folded into convolutions: recognised in a source, restored so the function is kept.

Deployment exports (Caffe deploy models, TFLite files, some ONNX files) fold each BatchNorm into the
convolution before it: W' = W * s and b' = (b - mean) * s + beta, with s = gamma / sqrt(var + eps).
The model restored into still has the BatchNorm. Restoring keeps the function: the convolution
takes W' (and b', when it has a bias of its own), and the BatchNorm becomes the identity, or an
identity that adds b' (weight 1, bias b', mean 0, var 1 - eps) when the convolution has no bias to
hold it. A BatchNorm kept as a scale and an offset without running statistics (TFLite's MUL and ADD
constants after a convolution it could not fold) gets mean 0 and var 1 - eps: it then computes
x * weight + bias. The report marks every tensor of such a pair `folded`.

A source is taken for folded when the target has convolution + BatchNorm pairs and the source has
no BatchNorm statistics at all but convolutions with a bias; its convolution biases then land on
the target convolution's bias, which is added to the names matched against when the convolution
has none.

A source whose reader recorded its graph (Caffe, TFLite) names its tensors after its own layers:
there a convolution's bias is the 1-D tensor its layer holds beside the filter, and a BatchNorm the
export left unfolded is a per-channel multiply and add that read the convolution's output and
nothing else reads (`kept_scale_offset`), restored as that BatchNorm's weight and bias.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from transferkit.weights.formats.origins import LayerGraph

Shape = tuple[int, ...]
BN_LEAVES = ("weight", "bias", "running_mean", "running_var")
COUNTER = "num_batches_tracked"
DEFAULT_EPS = 1e-5  # PyTorch's BatchNorm default, assumed where no module says otherwise
# what a layer does with each tensor it holds, by the layer types readers record (TFLite, Caffe)
AFFINE_ROLES = {"MUL": ("scale",), "ADD": ("offset",), "Scale": ("scale", "offset"), "Bias": ("offset",)}


@dataclass(frozen=True)
class ConvBN:
    conv: str  # the convolution's module name
    bn: str  # the BatchNorm's module name
    has_bias: bool  # whether the convolution has a bias of its own
    eps: float

    @property
    def bias(self) -> str:
        return f"{self.conv}.bias"

    def bn_name(self, leaf: str) -> str:
        return f"{self.bn}.{leaf}"


def batchnorm_eps(model: nn.Module) -> dict[str, float]:
    """Each BatchNorm module's eps, by module name: PyTorch's and any other with running statistics
    and an eps (torchvision's FrozenBatchNorm2d, into which detectors freeze their backbones)."""
    return {name: float(m.eps) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            or (isinstance(getattr(m, "running_var", None), torch.Tensor)
                and isinstance(getattr(m, "eps", None), float))}


def conv_bn_pairs(shapes: Mapping[str, Shape], eps: Mapping[str, float] | None = None,
                  default_eps: float = DEFAULT_EPS) -> list[ConvBN]:
    """Convolutions directly followed by a BatchNorm of their width, in state-dict order: a 4-D
    `X.weight` (and `X.bias`), then `Y.weight`, `Y.bias`, `Y.running_mean`, `Y.running_var` of
    its output width. Works on names and shapes alone, so a template checkpoint serves as well as
    a model."""
    names = list(shapes)
    pairs = []
    for i, name in enumerate(names):
        if not name.endswith(".weight") or len(shapes[name]) != 4:
            continue
        conv = name[: -len(".weight")]
        j = i + 1
        has_bias = j < len(names) and names[j] == f"{conv}.bias"
        j += has_bias
        if j >= len(names) or not names[j].endswith(".weight"):
            continue
        bn = names[j][: -len(".weight")]
        width = (shapes[name][0],)
        if all(tuple(shapes.get(f"{bn}.{leaf}", ())) == width for leaf in BN_LEAVES):
            pairs.append(ConvBN(conv, bn, has_bias, (eps or {}).get(bn, default_eps)))
    return pairs


def source_is_folded(source: Mapping[str, Shape], pairs: Collection[ConvBN], graph: LayerGraph | None = None) -> bool:
    """The target has convolution + BatchNorm pairs, the source no BatchNorm statistics at all and
    convolutions with a bias (`X.bias` beside `X.weight`, or with a graph, a 1-D tensor of the
    filter's width in its layer): where its BatchNorms went. A source that keeps some BatchNorms (a
    backbone for a bigger model, a classifier for a detector) is matched as it is."""
    if not pairs or any(n.endswith(".running_mean") for n in source):
        return False

    def beside(name: str) -> list[str]:
        near = [f"{name[:-7]}.bias"] if name.endswith(".weight") else []
        layer = graph.layer_of.get(name) if graph is not None else None
        return near + (graph.tensors(layer) if layer is not None else [])

    return any(len(shape) == 4 and any(tuple(source.get(b, ())) == shape[:1] for b in beside(n))
               for n, shape in source.items())


def kept_scale_offset(pairs: Collection[ConvBN], matched: Mapping[str, str], source: Mapping[str, Shape],
                      graph: LayerGraph) -> dict[str, str]:
    """BatchNorms the source kept as a per-channel multiply and then add after the convolution
    matched to theirs (TFLite's MUL and ADD after a dilated convolution it could not fold into, a
    Caffe Scale layer):
    target BatchNorm weight and bias -> the source's scale and offset. Found in the graph: the
    layers after the convolution's, each reading only the one before it and read only by the next, holding
    only tensors of its width (a MUL reading two convolutions' sum would otherwise lend its scale, and an
    ADD its offset, to both convolutions' BatchNorms)."""
    taken = set(matched.values())
    out: dict[str, str] = {}
    for p in pairs:
        conv = matched.get(f"{p.conv}.weight")
        layer = graph.layer_of.get(conv) if conv is not None else None
        if layer is None or any(p.bn_name(leaf) in matched for leaf in BN_LEAVES):
            continue
        width = (source[conv][0],)
        found: list[tuple[str, str]] = []  # (role, source tensor), in the order the source applies them
        while len(readers := graph.readers(layer)) == 1 and graph.inputs.get(readers[0]) == [layer]:
            layer = readers[0]
            roles, tensors = AFFINE_ROLES.get(graph.kinds.get(layer, ""), ()), graph.tensors(layer)
            if not tensors or len(tensors) > len(roles) or any(tuple(source[t]) != width or t in taken
                                                               for t in tensors):
                break
            found += zip(roles, tensors, strict=False)
        if [role for role, _ in found] in (["scale"], ["offset"], ["scale", "offset"]):
            out.update({p.bn_name("weight" if role == "scale" else "bias"): t for role, t in found})
    return out


def folded_view(target: Mapping[str, Shape], pairs: Collection[ConvBN], keep: Collection[str] = ()) -> dict[str, Shape]:
    """The target's names as a folded source has them: each pair's BatchNorm left out, and a bias
    added to each convolution that has none. BatchNorm tensors in `keep` (named by a rename rule)
    stay, so a source's scale and offset can still land on them."""
    by_conv = {f"{p.conv}.weight": p for p in pairs}
    bn_names = {p.bn_name(leaf) for p in pairs for leaf in (*BN_LEAVES, COUNTER)}
    view: dict[str, Shape] = {}
    for name, shape in target.items():
        if name in bn_names and name not in keep:
            continue
        view[name] = shape
        pair = by_conv.get(name)
        if pair is not None and not pair.has_bias:
            view[pair.bias] = (shape[0],)
    return view


@dataclass
class Folded:
    """What folding restores: target name -> value, and the source tensors it consumed."""

    values: dict[str, torch.Tensor]
    sources: set[str]
    pairs: list[ConvBN]


def fold(pairs: Collection[ConvBN], matched: Mapping[str, str], source: Mapping[str, torch.Tensor],
         restored: Collection[str]) -> Folded:
    """For each pair whose convolution weight was restored (`restored`) and whose BatchNorm
    statistics the source lacks: the convolution bias and an identity-plus-offset BatchNorm.
    `matched` maps target names (the folded view's) to source names."""
    out = Folded({}, set(), [])
    for p in pairs:
        weight = f"{p.conv}.weight"
        if weight not in restored or any(p.bn_name(s) in matched for s in ("running_mean", "running_var")):
            continue
        width = source[matched[weight]].shape[0]
        conv_bias = _taken(out, matched, source, p.bias, width, 0.0)
        scale = _taken(out, matched, source, p.bn_name("weight"), width, 1.0)
        offset = _taken(out, matched, source, p.bn_name("bias"), width, 0.0)
        if p.has_bias:
            out.values[p.bias] = conv_bias
        else:  # (Wx + b) * scale + offset: the BatchNorm carries the bias
            offset = offset + scale * conv_bias
        out.values[p.bn_name("weight")] = scale
        out.values[p.bn_name("bias")] = offset
        out.values[p.bn_name("running_mean")] = torch.zeros(width)
        out.values[p.bn_name("running_var")] = torch.full((width,), 1.0 - p.eps)
        out.pairs.append(p)
    return out


def _taken(out: Folded, matched: Mapping[str, str], source: Mapping[str, torch.Tensor], name: str, width: int,
           default: float) -> torch.Tensor:
    """The source tensor matched to `name` when it has the pair's width, else the neutral value."""
    src = matched.get(name)
    if src is None or tuple(source[src].shape) != (width,):
        return torch.full((width,), default)
    out.sources.add(src)
    return source[src].float()
