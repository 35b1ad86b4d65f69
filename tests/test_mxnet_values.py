"""MXNet RetinaFace mnet.25 without MXNet: the converted tensors against values decoded by hand
from the file's bytes, and each BatchNorm against the symbol's own attributes (fix_gamma, eps).
What the restored network computes is compared with MXNet's own outputs in
test_runtime_parity_faces.py."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import SHARED_DATA, needs_shared

from transferkit.weights.formats import read_weights

MNET = SHARED_DATA / "weights" / "mxnet_retinaface_mnet25"
V2_MAGIC = 0xF993FAC9


def decode_by_hand(raw: bytes) -> dict[str, np.ndarray]:
    """The NDArray list format as this file writes it: list magic 0x112, reserved, count, then each
    array (V2 magic, storage type 0, ndim, int64 dims, device type and id, dtype 0 = float32, the
    values), then the count of names and each name (length, bytes)."""
    magic, _reserved, count = struct.unpack_from("<QQQ", raw, 0)
    assert magic == 0x112
    pos, arrays = 24, []
    for _ in range(count):
        array_magic, stype, ndim = struct.unpack_from("<IiI", raw, pos)
        assert (array_magic, stype) == (V2_MAGIC, 0)
        shape = struct.unpack_from(f"<{ndim}q", raw, pos + 12)
        pos += 12 + 8 * ndim + 8  # dims, then the device type and id
        (dtype,) = struct.unpack_from("<i", raw, pos)
        assert dtype == 0
        pos += 4
        size = int(np.prod(shape))
        arrays.append(np.frombuffer(raw, "<f4", size, pos).reshape(shape))
        pos += 4 * size
    (names,) = struct.unpack_from("<Q", raw, pos)
    pos += 8
    out = {}
    for array in arrays[:names]:
        (length,) = struct.unpack_from("<Q", raw, pos)
        out[raw[pos + 8: pos + 8 + length].decode()] = array
        pos += 8 + length
    assert pos == len(raw)
    return out


@needs_shared
def test_mnet25_tensors_equal_the_bytes_and_batchnorms_follow_the_symbol():
    stored = decode_by_hand((MNET / "mnet.25-0000.params").read_bytes())
    wf = read_weights(MNET / "mnet.25-0000.params")
    assert len(stored) == len(wf.tensors) == 273
    conv = stored["arg:mobilenet0_conv0_weight"]
    assert conv.shape == (8, 3, 3, 3)
    assert np.array_equal(wf.tensors["mobilenet0_conv0.weight"].numpy(), conv)
    records = json.loads(wf.metadata["tensors"])
    by_source = {r["source"]: name for name, r in records.items()}
    nodes = json.loads((MNET / "mnet.25-symbol.json").read_text())["nodes"]
    batchnorms = [n for n in nodes if n["op"] == "BatchNorm"]
    assert len(batchnorms) == 47
    for node in batchnorms:
        # inputs: data, gamma, beta, moving mean, moving var; the last two are auxiliary states
        params = [nodes[i]["name"] for i, *_ in node["inputs"][1:]]
        for position, (param, leaf) in enumerate(zip(params, ("weight", "bias", "running_mean", "running_var"),
                                                     strict=True)):
            key = f"{'aux' if position >= 2 else 'arg'}:{param}"
            name = by_source[param]
            assert name.endswith(f".{leaf}"), (name, leaf)
            want = stored[key]
            if leaf == "weight" and node["attrs"].get("fix_gamma", "True") == "True":  # MXNet computes with 1
                want = np.ones_like(want)
            assert np.array_equal(wf.tensors[name].numpy(), want), name
            assert float(records[name]["eps"]) == pytest.approx(float(node["attrs"]["eps"]))
