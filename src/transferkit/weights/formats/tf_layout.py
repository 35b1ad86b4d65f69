"""TensorFlow/Keras tensor layouts to PyTorch's, shared by the TF checkpoint and Keras readers.

TF stores a 2-D convolution kernel as (H, W, in, out), a depthwise kernel as (H, W, in, multiplier)
and a dense kernel as (in, out); PyTorch wants (out, in, H, W), (in * multiplier, 1, H, W) and
(out, in). BatchNorm's gamma/beta/moving_mean/moving_variance are PyTorch's
weight/bias/running_mean/running_var. Each conversion is named so readers can record it per tensor.
"""

from __future__ import annotations

import json

import numpy as np

# Variable leaf name -> (PyTorch leaf name, layer type); the kernel's type depends on its rank.
BATCHNORM_LEAVES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                    "moving_variance": "running_var"}
# Order in which PyTorch modules register these tensors (structure matching pairs by order).
LEAF_ORDER = ("kernel", "depthwise_kernel", "pointwise_kernel", "weights", "depthwise_weights",
              "pointwise_weights", "bias", "biases", "gamma", "beta", "moving_mean", "moving_variance")

TF_BATCHNORM_EPS = 1e-3  # tf.keras.layers.BatchNormalization's default; PyTorch's is 1e-5


def convert(leaf: str, array: np.ndarray, layer_type: str | None = None) -> tuple[str, np.ndarray, str, str]:
    """One TF variable to PyTorch: (PyTorch leaf name, array, conversion done, layer type).

    `leaf` is the variable's last name part (`kernel`, `gamma`, ...); `layer_type` (a Keras class
    name such as `DepthwiseConv2D`) settles what the shape alone cannot.
    """
    kind = (layer_type or "").lower()
    if leaf in BATCHNORM_LEAVES:
        return BATCHNORM_LEAVES[leaf], array, f"{leaf} -> {BATCHNORM_LEAVES[leaf]}", "BatchNorm"
    if leaf in ("bias", "biases"):
        return "bias", array, "unchanged", layer_type or "bias"
    depthwise = leaf in ("depthwise_kernel", "depthwise_weights") or (
        leaf in ("kernel", "weights") and "depthwise" in kind)
    if depthwise and array.ndim == 4:
        h, w, cin, mult = array.shape
        out = np.ascontiguousarray(array.transpose(2, 3, 0, 1)).reshape(cin * mult, 1, h, w)
        return "weight", out, "depthwise HWIM -> (I*M)1HW", layer_type or "DepthwiseConv2D"
    if leaf in ("kernel", "weights", "pointwise_kernel", "pointwise_weights"):
        if array.ndim == 2:
            return "weight", np.ascontiguousarray(array.T), "dense (in,out) -> (out,in)", layer_type or "Dense"
        if array.ndim == 3:  # Conv1D: (W, in, out)
            return "weight", np.ascontiguousarray(array.transpose(2, 1, 0)), "WIO -> OIW", layer_type or "Conv1D"
        if array.ndim == 4:
            # Conv2DTranspose kernels are (H, W, out, in); the same permutation gives PyTorch's (in, out, H, W).
            how = "HWOI -> IOHW" if "transpose" in kind else "HWIO -> OIHW"
            return "weight", np.ascontiguousarray(array.transpose(3, 2, 0, 1)), how, layer_type or "Conv2D"
        if array.ndim == 5:
            return ("weight", np.ascontiguousarray(array.transpose(4, 3, 0, 1, 2)), "DHWIO -> OIDHW",
                    layer_type or "Conv3D")
    return leaf, array, "unchanged", layer_type or "unknown"


def leaf_rank(leaf: str) -> int:
    return LEAF_ORDER.index(leaf) if leaf in LEAF_ORDER else len(LEAF_ORDER)


def as_metadata(value: object) -> str:
    """Metadata values are strings (they travel into safetensors headers): compact JSON."""
    return json.dumps(value, separators=(",", ":"))
