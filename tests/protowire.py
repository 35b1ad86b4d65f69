"""A protobuf wire-format writer for test fixtures (varints and length-delimited fields), written
here rather than with the readers' own schemas, so a fixture cannot share a reader's mistake."""

from __future__ import annotations


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are ten-byte varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value: int | str | bytes) -> bytes:
    """Field `number`: an int as a varint (wire type 0), text or bytes length-delimited (wire type 2)."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data
