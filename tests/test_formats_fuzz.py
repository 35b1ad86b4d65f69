"""Property: whatever bytes of a real Caffe, MXNet, ONNX or TFLite file are damaged, reading it either
succeeds or stops with one line naming the file; nothing else is raised (no traceback for the user)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import SHARED_DATA, needs_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferkit.errors import TransferKitError
from transferkit.weights.formats import read_weights

WEIGHTS = SHARED_DATA / "weights"
# (file, files copied beside it unchanged, package it needs)
REAL_FILES = {
    "caffe": ("caffe_lenet_mnist/lenet_iter_10000.caffemodel", ["caffe_lenet_mnist/lenet.prototxt"], None),
    "mxnet": ("mxnet_retinaface_mnet25/mnet.25-0000.params", ["mxnet_retinaface_mnet25/mnet.25-symbol.json"], None),
    "onnx": ("ultralight_face_rfb320_multiformat/models/onnx/version-RFB-320_without_postprocessing.onnx", [],
             "onnx"),
    "tflite": ("ultralight_face_rfb320_multiformat/tflite/pretrained/version-RFB-320_without_postprocessing.tflite",
               [], "tflite"),
}
# FUZZ_EXAMPLES=2000 for a longer hunt; the suite runs 30 per format, derandomised.
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "30")), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Values that make sizes, counts and offsets extreme, or plain random bytes.
NASTY = st.sampled_from([b"\xff" * 8, b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\x00" * 8, b"\x80" * 5,
                         b"\x01\x00\x00\x00\x00\x00\x00\x01"]) | st.binary(min_size=1, max_size=8)
POSITION = st.integers(0, 511) | st.floats(0, 1, exclude_max=True)  # headers, or anywhere
MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("overwrite"), st.lists(st.tuples(POSITION, NASTY), min_size=1, max_size=6)),
)


def mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    out = bytearray(data)
    for pos, value in arg:
        at = int(pos * len(out)) if isinstance(pos, float) else pos
        out[at:at + len(value)] = value
    return bytes(out[: len(data)])


@needs_shared
@pytest.mark.parametrize("fmt", sorted(REAL_FILES))
def test_damaged_real_files_read_or_fail_in_one_line(fmt):
    rel, sidecars, package = REAL_FILES[fmt]
    if package:
        pytest.importorskip(package)
    original = (WEIGHTS / rel).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        for side in sidecars:
            shutil.copy(WEIGHTS / side, tmp)
        path = Path(tmp) / Path(rel).name

        @SETTINGS
        @given(MUTATION)
        def check(mutation):
            path.write_bytes(mutate(original, mutation))
            try:
                wf = read_weights(path)
            except TransferKitError as exc:
                message = str(exc)
                assert str(path) in message or path.name in message, message
                assert "\n" not in message
            else:
                assert wf.tensors

        check()
