"""Small files that expand hugely, built without ever holding or compressing the expanded bytes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

MIB = 1 << 20


def zip_with_zeros(path: Path, name: str, mib: int, prefix: bytes = b"") -> Path:
    """A zip holding one deflated member: `prefix` then `mib` MiB of zeros. The deflate stream is one
    compressed MiB of zeros repeated: each block ends with a full flush, so it decodes on its own."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    data = head + block * mib + c.flush(zlib.Z_FINISH)
    crc, zeros = zlib.crc32(prefix), bytes(MIB)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    size = len(prefix) + mib * MIB  # below 4 GiB: no ZIP64 records needed
    raw = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(raw), 0) + raw
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size, len(raw),
                          0, 0, 0, 0, 0o644 << 16, 0) + raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)
    return path


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """An .npy version 1.0 header (magic, length, dictionary padded to a multiple of 64 bytes)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = 63 - (10 + len(text)) % 64
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body
