"""TensorFlow's masked CRC-32C, which guards both TFRecord files (data/tfrecord.py) and checkpoint
bundles (weights/formats/tf_checkpoint.py). The CRC itself comes from the `crc32c` package; the
mask (rotate right by 15 bits, add a constant) is TensorFlow's, from lib/hash/crc32c.h."""

from __future__ import annotations

import crc32c

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF
