"""The Ultra-Light RFB-320 face detector, one trained network saved in several formats, restored
into its own PyTorch checkpoint as a template (`weights transfer --like`): every file gives the
.pth's network. A convolution + BatchNorm pair is compared as the function it computes (the
convolution with the BatchNorm folded in, computed here), so a file that folded its BatchNorms
(Caffe, TFLite) passes when it restores the same function. The Caffe and TFLite files run the
detection heads between backbone stages and name their layers their own way: they are restored
without a map, by the graphs their readers record; a user's map still restores them the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, needs_shared
from safetensors.torch import load_file

from transferkit.cli import main
from transferkit.weights.formats import read_weights

RFB = SHARED_DATA / "weights" / "ultralight_face_rfb320_multiformat"
PTH = RFB / "models" / "pretrained" / "version-RFB-320.pth"
TABLE = RFB / "tf" / "mapping_tables" / "rfb_320.json"
EPS = 1e-5  # the .pth's BatchNorms


def as_functions(state: dict[str, torch.Tensor], order: list[str]) -> dict[str, torch.Tensor]:
    """Each convolution as (weight, bias) with the BatchNorm right after it folded in; every other
    tensor as it is. `order` is the .pth's, where a BatchNorm follows its convolution."""
    out, absorbed = {}, set()
    for i, name in enumerate(order):
        if name in absorbed or name.endswith("num_batches_tracked"):
            continue
        if state[name].ndim != 4:
            out[name] = state[name]
            continue
        conv = name[: -len(".weight")]
        w = state[name]
        b = state.get(f"{conv}.bias", torch.zeros(w.shape[0]))
        j = i + 1 + (f"{conv}.bias" in state)
        nxt = order[j] if j < len(order) else ""
        bn = nxt[: -len(".weight")]
        if nxt.endswith(".weight") and f"{bn}.running_var" in state:
            s = state[f"{bn}.weight"] / torch.sqrt(state[f"{bn}.running_var"] + EPS)
            w, b = w * s[:, None, None, None], (b - state[f"{bn}.running_mean"]) * s + state[f"{bn}.bias"]
            absorbed |= {f"{bn}.{leaf}" for leaf in ("weight", "bias", "running_mean", "running_var")}
        out[f"{conv}.weight"], out[f"{conv}.bias"] = w, b
        absorbed.add(f"{conv}.bias")
    return out


def tflite_map(tmp_path: Path) -> Path:
    """TFLite tensors are named after the TF layers that made them (several, when TF fused them):
    a filter after its convolution layer, which the TF table maps to a .pth name; its bias goes to
    that convolution's bias; the unfolded BatchNorm's MUL and ADD constants to its weight and bias."""
    pytest.importorskip("tflite")
    table = {e["name"]: e["weight"] for e in json.loads(TABLE.read_text())}
    wf = read_weights(RFB / "tflite" / "pretrained" / "version-RFB-320_without_postprocessing.tflite")
    records = json.loads(wf.metadata["tensors"])

    def layers(name: str) -> list[list[str]]:
        return [seg.replace("StatefulPartitionedCall/", "").split("/") for seg in name.split(";")]

    names, conv_of_op = {}, {}
    for name, tensor in wf.tensors.items():
        if records[name]["input"] == "1" and tensor.ndim == 4:
            layer = next(parts[-2] for parts in layers(name) if parts[-1] in ("Conv2D", "depthwise"))
            names[name] = table[layer][0]
            conv_of_op[records[name]["layer"]] = table[layer][0][: -len(".weight")]
    for name, tensor in wf.tensors.items():
        record = records[name]
        if record["input"] == "2":
            names[name] = f"{conv_of_op[record['layer']]}.bias"
        elif record["type"] in ("MUL", "ADD") and tensor.numel() > 1:
            names[name] = table[layers(name)[0][-2]][0 if record["type"] == "MUL" else 1]
    (tmp_path / "tflite_map.json").write_text(json.dumps(names))
    return tmp_path / "tflite_map.json"


CAFFE = "caffe/model/RFB-320/RFB-320.caffemodel"
TFLITE = "tflite/pretrained/version-RFB-320_without_postprocessing.tflite"
CASES = {  # source, its name map, tolerance (relative to each tensor's largest value), folded pairs
    "onnx": ("models/onnx/version-RFB-320.onnx", None, 1e-4, 0),
    "onnx-without-postprocessing": ("models/onnx/version-RFB-320_without_postprocessing.onnx", None, 1e-4, 0),
    "caffe": (CAFFE, None, 1e-4, 35),
    "tensorflow": ("tf/export_models/RFB", lambda _tmp: TABLE, 1e-4, 0),
    # TFLite folded in float32 itself: up to 3.4e-4 apart from a fold of the .pth where a variance is tiny
    "tflite": (TFLITE, None, 5e-4, 35),
    "tflite-user-map": (TFLITE, tflite_map, 5e-4, 35),
}
# what the .pth has no tensor for: the TFLite file's `out * self.scale` constant of the RFB block
UNUSED = {"tflite": 1, "tflite-user-map": 1}


def transferred(case: str, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """`weights transfer --like` the .pth `--from` the case's file: what it wrote, and its report."""
    source, make_map, _tolerance, _pairs = CASES[case]
    if case.startswith("onnx"):
        pytest.importorskip("onnx")
    if case.startswith("tflite"):
        pytest.importorskip("tflite")
    out, report = tmp_path / f"{case}.safetensors", tmp_path / f"{case}.json"
    args = ["weights", "transfer", "--like", str(PTH), "--from", str(RFB / source), "--scope", "full",
            "--out", str(out), "--report", str(report)]
    if make_map is not None:
        args += ["--map", str(make_map(tmp_path))]
    assert main(args) == 0
    return load_file(out), json.loads(report.read_text())


@needs_shared
@pytest.mark.parametrize("case", list(CASES))
def test_rfb320_every_format_gives_the_pth_network(case, tmp_path):
    _source, _make_map, tolerance, folded_pairs = CASES[case]
    written, report = transferred(case, tmp_path)
    pth = read_weights(PTH).tensors
    order = list(pth)
    assert set(written) == set(pth)
    want, got = as_functions(pth, order), as_functions(written, order)
    assert set(got) == set(want)
    for name, ref in want.items():
        err = float((got[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        assert err <= tolerance, (name, err)
    counts = report["counts"]
    assert counts.get("folded", 0) == 6 * folded_pairs  # conv weight, 4 BatchNorm tensors, the counter
    assert counts.get("loaded", 0) + counts.get("folded", 0) + counts.get("missing", 0) == len(pth)
    assert counts.get("missing", 0) in (0, 35)  # TF keeps no BatchNorm counters
    assert len(report["unused_source"]) == UNUSED.get(case, 0)


@needs_shared
def test_rfb320_tflite_by_structure_is_what_a_user_map_gives(tmp_path):
    """The graph pairs every TFLite tensor where the map built from the TF layer names puts it: the
    written files are equal, and so are the source tensors each target tensor came from."""
    by_graph, graph_report = transferred("tflite", tmp_path)
    by_map, map_report = transferred("tflite-user-map", tmp_path)
    assert all(torch.equal(by_graph[k], by_map[k]) for k in by_map)
    sources = [{e["target"]: (e["source"], e["status"]) for e in r["tensors"]} for r in (graph_report, map_report)]
    assert sources[0] == sources[1]
    assert sum(how == "structure" for how in (e["how"] for e in graph_report["tensors"])) == 34
