"""The .npz / .npy reader (`weights/formats/npz_file.py`) on files the tests write themselves with
NumPy or zipfile: values element by element, byte order, every header version, the bounds and each
refusal's exact words. `_fill`'s two ways of reading (allocated at once, or grown as data arrives)
are also called directly, on streams that hand out a few bytes at a time."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format

from transferkit.errors import TransferKitError
from transferkit.weights.formats import npz_file
from transferkit.weights.formats.npz_file import _array_name, _fill, _Header, _read_header, describe, read, sniff


def npy(array: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    """`array` as .npy bytes, written by NumPy."""
    buf = io.BytesIO()
    npy_format.write_array(buf, array, version=version)
    return buf.getvalue()


def npy_header(descr: str, shape: tuple[int, ...], fortran: bool = False, version: int = 1,
               length: int | None = None) -> bytes:
    """An .npy header written by hand: magic, version, length, then `length` characters of dictionary
    text (by default padded so that the header fills a multiple of 64 bytes, as NumPy writes it)."""
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    prefix = 8 + (2 if version == 1 else 4)
    if length is None:
        length = -(-(prefix + len(text) + 1) // 64) * 64 - prefix
    body = (text + " " * (length - len(text) - 1) + "\n").encode("latin1")
    assert len(body) == length
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<H" if version == 1 else "<I", length) + body


def write_zip(path, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def message(call, *args) -> str:
    with pytest.raises(TransferKitError) as err:
        call(*args)
    return str(err.value)


class Trickle(io.RawIOBase):
    """A stream that hands out at most `step` bytes a call, as a pipe or a zip member may."""

    def __init__(self, data: bytes, step: int = 999):
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@pytest.fixture
def fills(monkeypatch) -> list[tuple[str, bool]]:
    """(array name, sized) of every `_fill` call, the arrays still read by the real `_fill`."""
    seen, real = [], npz_file._fill

    def spy(fh, header, where, sized):
        seen.append((header.name, sized))
        return real(fh, header, where, sized)

    monkeypatch.setattr(npz_file, "_fill", spy)
    return seen


BYTES_1234 = bytes(i % 251 for i in range(1234))  # 1,234 bytes of data, values 0..250


# --- values, order and byte order -----------------------------------------------------------------

@pytest.mark.parametrize("save", ["npy", "savez", "savez_compressed"])
def test_c_and_fortran_order_arrays_come_back_element_by_element(tmp_path, save):
    c = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    f = np.asfortranarray(c)
    assert f.flags.f_contiguous and not f.flags.c_contiguous
    if save == "npy":
        np.save(tmp_path / "c.npy", c)
        np.save(tmp_path / "f.npy", f)
        assert b"'fortran_order': True" in (tmp_path / "f.npy").read_bytes()[:128]
        tensors = {**read(tmp_path / "c.npy").tensors, **read(tmp_path / "f.npy").tensors}
    else:
        getattr(np, save)(tmp_path / "w.npz", c=c, f=f)
        tensors = read(tmp_path / "w.npz").tensors
    assert list(tensors) == ["c", "f"]
    for name in ("c", "f"):
        t = tensors[name]
        assert t.shape == (2, 3, 4) and t.dtype == torch.float32 and t.is_contiguous()
        assert t[0, 0, 1].item() == 1.0 and t[0, 1, 0].item() == 4.0 and t[1, 0, 0].item() == 12.0
        assert t[1, 2, 3].item() == 23.0
        assert t.flatten().tolist() == [float(i) for i in range(24)]


def test_fortran_and_c_order_read_directly_by_both_ways_of_filling():
    data = np.array([0, 1, 2, 3, 4, 5], "<i4").tobytes()
    for sized in (True, False):
        f = _fill(io.BytesIO(data), _Header("w", (2, 3), np.dtype("<i4"), True, 24), "w", sized)
        assert f.tolist() == [[0, 2, 4], [1, 3, 5]] and f.is_contiguous()  # column by column
        c = _fill(io.BytesIO(data), _Header("w", (2, 3), np.dtype("<i4"), False, 24), "w", sized)
        assert c.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("save", ["npy", "savez", "savez_compressed"])
def test_big_endian_arrays_come_back_native_with_their_values(tmp_path, save):
    arrays = {"f": np.array([1.5, -2.25, 3e38], ">f4"), "i": np.array([-1, 2**40 + 3, -(2**62)], ">i8"),
              "u": np.array([1, 256, 65535], ">u2")}
    if save == "npy":
        for name, array in arrays.items():
            np.save(tmp_path / f"{name}.npy", array)
        tensors = {n: read(tmp_path / f"{n}.npy").tensors[n] for n in arrays}
        infos = [i for n in arrays for i in describe(tmp_path / f"{n}.npy")]
    else:
        getattr(np, save)(tmp_path / "w.npz", **arrays)
        tensors = read(tmp_path / "w.npz").tensors
        infos = describe(tmp_path / "w.npz")
    assert tensors["f"].dtype == torch.float32 and tensors["f"].tolist() == [1.5, -2.25, pytest.approx(3e38)]
    assert tensors["f"][2].item() == float(np.float32(3e38))
    assert tensors["i"].dtype == torch.int64 and tensors["i"].tolist() == [-1, 1099511627779, -4611686018427387904]
    assert tensors["u"].dtype == torch.uint16 and tensors["u"].tolist() == [1, 256, 65535]
    assert [(i.name, i.shape, i.dtype) for i in infos] == [("f", (3,), "float32"), ("i", (3,), "int64"),
                                                           ("u", (3,), "uint16")]


def test_big_endian_read_directly_by_both_ways_of_filling():
    for sized in (True, False):
        t = _fill(io.BytesIO(b"\x01\x00\x00\x02\xff\xfe"), _Header("w", (3,), np.dtype(">i2"), False, 6), "w", sized)
        assert t.dtype == torch.int16 and t.tolist() == [256, 2, -2]


@pytest.mark.parametrize("dtype, values, torch_dtype, name", [
    ("float16", [0.5, -2.0, 65504.0], torch.float16, "float16"),
    ("float32", [0.1, -3.5, 1e30], torch.float32, "float32"),
    ("float64", [0.1, -3.5, 1e300], torch.float64, "float64"),
    ("int8", [-128, 0, 127], torch.int8, "int8"),
    ("int16", [-32768, 1, 32767], torch.int16, "int16"),
    ("int32", [-(2**31), 2, 2**31 - 1], torch.int32, "int32"),
    ("int64", [-(2**63), 3, 2**63 - 1], torch.int64, "int64"),
    ("uint8", [0, 7, 255], torch.uint8, "uint8"),
    ("bool", [True, False, True], torch.bool, "bool"),
    ("complex64", [1 + 2j, -0.5j, 3], torch.complex64, "complex64"),
])
def test_each_numeric_dtype_gives_its_torch_dtype(tmp_path, dtype, values, torch_dtype, name):
    array = np.array(values, dtype)
    np.savez(tmp_path / "w.npz", w=array)
    t = read(tmp_path / "w.npz").tensors["w"]
    assert t.dtype == torch_dtype and t.shape == (3,)
    assert t.tolist() == array.tolist()  # the values as NumPy itself holds them in this dtype
    assert [(i.name, i.shape, i.dtype) for i in describe(tmp_path / "w.npz")] == [("w", (3,), name)]


def test_a_dtype_torch_has_not_is_refused_naming_the_file_and_member(tmp_path):
    np.save(tmp_path / "s.npy", np.array(["ab", "c"], "<U2"))
    assert message(read, tmp_path / "s.npy") == (
        f"{tmp_path / 's.npy'}: dtype <U2 has no PyTorch equivalent; convert the array")
    np.savez_compressed(tmp_path / "d.npz", when=np.array([1, 2], "datetime64[s]"))
    assert message(read, tmp_path / "d.npz") == (
        f"{tmp_path / 'd.npz'} member 'when.npy': dtype datetime64[s] has no PyTorch equivalent; convert the array")


# --- header versions ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_npy_version_numpy_writes_is_read(tmp_path, version):
    array = np.array([[1, -2, 3], [4, 5, -6]], np.int16)
    raw = npy(array, version)
    assert raw[6:8] == bytes(version)
    (tmp_path / "w.npy").write_bytes(raw)
    write_zip(tmp_path / "w.npz", {"w.npy": raw})
    for path in (tmp_path / "w.npy", tmp_path / "w.npz"):
        assert read(path).tensors["w"].tolist() == [[1, -2, 3], [4, 5, -6]]
        assert [(i.name, i.shape, i.dtype) for i in describe(path)] == [("w", (2, 3), "int16")]


@pytest.mark.parametrize("version", [(4, 0), (2, 1), (0, 0)])
def test_an_unknown_npy_version_is_refused(tmp_path, version):
    raw = bytearray(npy(np.zeros(3, np.float32)))
    raw[6:8] = bytes(version)
    (tmp_path / "w.npy").write_bytes(bytes(raw))
    assert message(read, tmp_path / "w.npy") == (
        f"{tmp_path / 'w.npy'}: damaged .npy header (unknown .npy version {version}); re-save the file")
    write_zip(tmp_path / "w.npz", {"a.npy": bytes(raw)})
    assert message(describe, tmp_path / "w.npz") == (
        f"{tmp_path / 'w.npz'} member 'a.npy': damaged .npy header (unknown .npy version {version}); re-save the file")


@pytest.mark.parametrize("text", [
    b"{'descr': [",                                        # cut inside a list
    b"{'descr': '<f4', 'fortran_order': False}",           # no shape
    b"[1, 2]",                                             # not a dictionary
    b"{'descr': 'zz', 'fortran_order': False, 'shape': (2,), }",
])
def test_a_damaged_npy_header_is_one_line(tmp_path, text):
    (tmp_path / "w.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text)
    error = message(read, tmp_path / "w.npy")
    assert error.startswith(f"{tmp_path / 'w.npy'}: damaged .npy header (") and error.endswith("); re-save the file")
    assert "\n" not in error


def test_a_negative_dimension_is_not_read(tmp_path):
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }"
    (tmp_path / "w.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(8))
    assert message(read, tmp_path / "w.npy").startswith(f"{tmp_path / 'w.npy'}: ")


def test_a_header_cut_inside_its_magic_is_one_line(tmp_path):
    (tmp_path / "w.npy").write_bytes(b"\x93NUMPY\x01")
    error = message(read, tmp_path / "w.npy")
    assert error.startswith(f"{tmp_path / 'w.npy'}: damaged .npy header (") and "magic" in error


def test_the_header_bound_is_numpys_own_10000_characters(tmp_path):
    assert npz_file.MAX_HEADER == 10_000
    data = np.array([1.5, 2.5], "<f4").tobytes()
    for version in (1, 2):
        (tmp_path / "ok.npy").write_bytes(npy_header("<f4", (2,), version=version, length=10_000) + data)
        assert read(tmp_path / "ok.npy").tensors["ok"].tolist() == [1.5, 2.5]
        (tmp_path / "big.npy").write_bytes(npy_header("<f4", (2,), version=version, length=10_001) + data)
        error = message(read, tmp_path / "big.npy")
        assert error.startswith(f"{tmp_path / 'big.npy'}: damaged .npy header (Header info length (10001) is large ")
        assert "\n" not in error


@pytest.mark.parametrize("version", [1, 2])
def test_a_smaller_header_bound_is_passed_to_numpy(tmp_path, monkeypatch, version):
    header = npy_header("<i2", (2,), version=version)
    length = len(header) - (10 if version == 1 else 12)
    (tmp_path / "w.npy").write_bytes(header + b"\x01\x00\x02\x00")
    write_zip(tmp_path / "w.npz", {"w.npy": header + b"\x01\x00\x02\x00"})
    monkeypatch.setattr(npz_file, "MAX_HEADER", length)  # a header exactly at the bound passes
    assert read(tmp_path / "w.npy").tensors["w"].tolist() == [1, 2]
    assert read(tmp_path / "w.npz").tensors["w"].tolist() == [1, 2]
    monkeypatch.setattr(npz_file, "MAX_HEADER", length - 1)  # one character over it is refused
    for path, where in ((tmp_path / "w.npy", f"{tmp_path / 'w.npy'}"),
                        (tmp_path / "w.npz", f"{tmp_path / 'w.npz'} member 'w.npy'")):
        assert message(read, path).startswith(f"{where}: damaged .npy header (Header info length ({length}) is large")


# --- shapes: zero-size, scalars, many arrays ------------------------------------------------------

@pytest.mark.parametrize("save", ["npy", "savez", "savez_compressed"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 2, 5)])
def test_zero_size_arrays_keep_their_shape(tmp_path, save, shape):
    array = np.zeros(shape, np.float16)
    if save == "npy":
        np.save(tmp_path / "e.npy", array)
        path = tmp_path / "e.npy"
    else:
        getattr(np, save)(tmp_path / "w.npz", e=array, after=np.array([9], np.int8))
        path = tmp_path / "w.npz"
    tensors = read(path).tensors
    assert tensors["e"].shape == shape and tensors["e"].dtype == torch.float16 and tensors["e"].numel() == 0
    assert describe(path)[0].shape == shape
    if save != "npy":
        assert tensors["after"].tolist() == [9]  # the member after an empty one is read from its own start


def test_zero_size_and_scalars_read_directly_by_both_ways_of_filling():
    for sized in (True, False):
        t = _fill(io.BytesIO(b""), _Header("e", (3, 0), np.dtype("<f4"), False, 0), "e", sized)
        assert t.shape == (3, 0) and t.dtype == torch.float32
        s = _fill(io.BytesIO(b"\x00\x00\xf0\x3f"), _Header("s", (), np.dtype("<f4"), False, 4), "s", sized)
        assert s.shape == () and s.item() == 1.875  # a scalar keeps the empty shape


@pytest.mark.parametrize("save", ["npy", "savez", "savez_compressed"])
def test_scalars_have_the_empty_shape(tmp_path, save):
    if save == "npy":
        np.save(tmp_path / "s.npy", np.array(7.5))
        path = tmp_path / "s.npy"
    else:
        getattr(np, save)(tmp_path / "w.npz", s=np.array(7.5), n=np.array(-3, np.int32))
        path = tmp_path / "w.npz"
    tensors = read(path).tensors
    assert tensors["s"].shape == () and tensors["s"].dtype == torch.float64 and tensors["s"].item() == 7.5
    if save != "npy":
        assert tensors["n"].shape == () and tensors["n"].item() == -3
    assert (describe(path)[0].name, describe(path)[0].shape, describe(path)[0].dtype) == ("s", (), "float64")


@pytest.mark.parametrize("save", ["npy", "savez", "savez_compressed"])
def test_arrays_larger_than_one_read_come_back_equal(tmp_path, save, fills):
    n = (16 << 20) // 4 + 1  # one float32 past the 16 MiB that `_fill` asks for at a time
    big = np.zeros(n, np.float32)  # mostly zeros, so that compressing it is quick
    big[0], big[1_000_000:1_000_005], big[n - 2], big[n - 1] = 1.0, [5, 6, 7, 8, 9], 2.0, 3.0
    wide = (np.arange(60_000, dtype=np.int64) * 7 - 5).reshape(1000, 60)
    if save == "npy":
        np.save(tmp_path / "big.npy", big)
        tensors = read(tmp_path / "big.npy").tensors
    else:
        getattr(np, save)(tmp_path / "w.npz", big=big, wide=wide)
        tensors = read(tmp_path / "w.npz").tensors
        assert tensors["wide"].shape == (1000, 60) and tensors["wide"][999, 59].item() == 59_999 * 7 - 5
        assert np.array_equal(tensors["wide"].numpy(), wide)
    assert fills[0] == ("big", save != "savez_compressed")
    t = tensors["big"]
    assert t.shape == (4_194_305,) and t[0].item() == 1.0 and t[1_000_000:1_000_005].tolist() == [5, 6, 7, 8, 9]
    assert t[-2].item() == 2.0 and t[-1].item() == 3.0  # the last four bytes, past the first 16 MiB
    assert np.array_equal(t.numpy(), big)


# --- _fill: the two ways of reading and their truncation -----------------------------------------

@pytest.mark.parametrize("step", [999, 1 << 30])
@pytest.mark.parametrize("sized", [True, False])
def test_fill_reads_exactly_the_declared_bytes_however_they_arrive(sized, step):
    data = np.arange(1000, dtype="<f4").tobytes() + b"trailing bytes of the next member"
    header = _Header("w", (1000,), np.dtype("<f4"), False, 4000)
    stream = Trickle(data, step)
    t = _fill(stream, header, "w", sized)
    assert t.dtype == torch.float32 and t.shape == (1000,)
    assert t.tolist() == [float(i) for i in range(1000)]
    assert stream.pos == 4000  # nothing read past the array's own bytes


@pytest.mark.parametrize("step", [999, 1 << 30])
@pytest.mark.parametrize("sized", [True, False])
def test_fill_refuses_data_that_ends_early_counting_the_bytes(sized, step):
    header = _Header("w", (1000,), np.dtype("<f4"), False, 4000)
    error = message(_fill, Trickle(bytes(1234), step), header, "w.npz member 'w.npy'", sized)
    assert error == "w.npz member 'w.npy': ends after 1,234 of 4,000 bytes; the file is truncated"
    error = message(_fill, io.BytesIO(b""), header, "w.npy", sized)
    assert error == "w.npy: ends after 0 of 4,000 bytes; the file is truncated"


def test_a_compressed_member_that_ends_early_describes_but_does_not_read(tmp_path, fills):
    header = npy_header("<f4", (1000,))
    assert len(header) == 128
    path = write_zip(tmp_path / "cut.npz", {"w.npy": header + bytes(1234)}, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    for signature, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size, local and central
        struct.pack_into("<I", raw, raw.index(signature) + field, 128 + 4000)  # the 4,000 bytes declared
    path.write_bytes(bytes(raw))
    assert [(i.name, i.shape, i.dtype) for i in describe(path)] == [("w", (1000,), "float32")]
    assert fills == []
    assert message(read, path) == f"{path} member 'w.npy': ends after 1,234 of 4,000 bytes; the file is truncated"
    assert fills == [("w", False)]


# --- which way of filling is chosen ---------------------------------------------------------------

class Sized(type(Path())):
    """A path whose size, as `stat` tells it, is chosen by the test (the zip itself left honest)."""

    def stat(self, *, follow_symlinks=True):
        real = super().stat()
        return type("Stat", (), {"st_size": self.size if hasattr(self, "size") else real.st_size})()


def test_stored_members_within_the_file_are_filled_at_once_compressed_ones_as_data_arrives(tmp_path, fills):
    np.savez(tmp_path / "s.npz", a=np.arange(3, dtype=np.int8), b=np.ones(2, np.float32))
    np.savez_compressed(tmp_path / "c.npz", a=np.arange(3, dtype=np.int8), b=np.ones(2, np.float32))
    for name in ("s.npz", "c.npz"):
        tensors = read(tmp_path / name).tensors
        assert tensors["a"].tolist() == [0, 1, 2] and tensors["b"].tolist() == [1.0, 1.0]
    assert fills == [("a", True), ("b", True), ("a", False), ("b", False)]


def test_a_stored_member_said_to_reach_past_the_end_of_the_file_grows_as_data_arrives(tmp_path, fills):
    np.savez(tmp_path / "w.npz", a=np.arange(3, dtype=np.int8), b=np.ones(2, np.float32))
    with zipfile.ZipFile(tmp_path / "w.npz") as zf:
        a, b = zf.infolist()
    assert a.compress_type == b.compress_type == zipfile.ZIP_STORED and a.header_offset == 0 < b.header_offset
    path = Sized(tmp_path / "w.npz")
    path.size = b.header_offset + b.compress_size  # b's data ends exactly at the end: both at once
    assert read(path).tensors["b"].tolist() == [1.0, 1.0]
    path.size -= 1  # one byte short for b, still room for a
    assert read(path).tensors["b"].tolist() == [1.0, 1.0]
    path.size = a.compress_size  # a exactly, not b
    assert read(path).tensors["a"].tolist() == [0, 1, 2]
    path.size -= 1  # neither
    assert read(path).tensors["a"].tolist() == [0, 1, 2]
    assert fills == [("a", True), ("b", True), ("a", True), ("b", False), ("a", True), ("b", False),
                     ("a", False), ("b", False)]


def test_a_stored_member_whose_two_sizes_differ_grows_as_data_arrives(tmp_path, fills):
    path = write_zip(tmp_path / "w.npz", {"w.npy": npy(np.array([5, 6], np.int16))})
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")
    size = struct.unpack_from("<I", raw, at + 24)[0]
    struct.pack_into("<I", raw, at + 24, size + 8)  # the directory's uncompressed size: 8 bytes more than stored
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size == info.compress_size + 8
    assert read(path).tensors["w"].tolist() == [5, 6]
    assert fills == [("w", False)]


# --- names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("member, name", [("w.npy", "w"), ("conv.weight.npy", "conv.weight"), ("bias", "bias"),
                                          ("w.npz", "w.npz"), ("npy", "npy"), ("a/b.npy", "a/b"), ("x.NPY", "x.NPY")])
def test_member_names_lose_only_a_trailing_npy_suffix(tmp_path, member, name):
    assert _array_name(member) == name
    write_zip(tmp_path / "w.npz", {member: npy(np.array([1, 2], np.uint8))})
    assert list(read(tmp_path / "w.npz").tensors) == [name]
    assert [i.name for i in describe(tmp_path / "w.npz")] == [name]


def test_a_plain_npy_is_named_after_its_file_stem(tmp_path):
    np.save(tmp_path / "layer1.conv.weight.npy", np.array([[1.0, 2.0]], np.float32))
    (tmp_path / "weights").write_bytes((tmp_path / "layer1.conv.weight.npy").read_bytes())  # no suffix at all
    wf = read(tmp_path / "layer1.conv.weight.npy")
    assert wf.format == "npz" and wf.path == tmp_path / "layer1.conv.weight.npy"
    assert list(wf.tensors) == ["layer1.conv.weight"] and wf.tensors["layer1.conv.weight"].tolist() == [[1.0, 2.0]]
    assert [(i.name, i.shape, i.dtype) for i in describe(tmp_path / "weights")] == [("weights", (1, 2), "float32")]
    assert list(read(tmp_path / "weights").tensors) == ["weights"]


def test_members_keep_the_order_of_the_archive(tmp_path):
    np.savez(tmp_path / "w.npz", zeta=np.array([1]), alpha=np.array([2]), mid=np.array([3]))
    wf = read(tmp_path / "w.npz")
    assert wf.format == "npz" and wf.path == tmp_path / "w.npz"
    assert [(n, t.tolist()) for n, t in wf.tensors.items()] == [("zeta", [1]), ("alpha", [2]), ("mid", [3])]
    assert [i.name for i in describe(tmp_path / "w.npz")] == ["zeta", "alpha", "mid"]


def test_directory_entries_are_skipped(tmp_path):
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as zf:
        zf.writestr(zipfile.ZipInfo("layer1/"), b"")
        zf.writestr("layer1/w.npy", npy(np.array([4, 5], np.int32)))
        zf.writestr(zipfile.ZipInfo("empty/"), b"")
    assert {n: t.tolist() for n, t in read(tmp_path / "w.npz").tensors.items()} == {"layer1/w": [4, 5]}
    assert [i.name for i in describe(tmp_path / "w.npz")] == ["layer1/w"]


# --- refusals -------------------------------------------------------------------------------------

def test_an_archive_without_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "empty.npz")
    assert message(read, tmp_path / "empty.npz") == f"{tmp_path / 'empty.npz'}: the .npz file holds no arrays"
    with zipfile.ZipFile(tmp_path / "dirs.npz", "w") as zf:
        zf.writestr(zipfile.ZipInfo("only/"), b"")
    assert message(describe, tmp_path / "dirs.npz") == f"{tmp_path / 'dirs.npz'}: the .npz file holds no arrays"


def test_the_number_of_arrays_is_bounded(tmp_path, monkeypatch):
    assert npz_file.MAX_ARRAYS == 100_000
    monkeypatch.setattr(npz_file, "MAX_ARRAYS", 3)
    members = {f"a{i}.npy": npy(np.array([i], np.int8)) for i in range(3)}
    write_zip(tmp_path / "three.npz", members)
    with zipfile.ZipFile(tmp_path / "three.npz", "a") as zf:
        zf.writestr(zipfile.ZipInfo("folder/"), b"")  # a directory entry is not an array
    assert {n: t.tolist() for n, t in read(tmp_path / "three.npz").tensors.items()} == {
        "a0": [0], "a1": [1], "a2": [2]}
    write_zip(tmp_path / "four.npz", {**members, "a3.npy": npy(np.array([3], np.int8))})
    assert message(read, tmp_path / "four.npz") == f"{tmp_path / 'four.npz'}: more than 3 arrays; not a weights file"
    monkeypatch.setattr(npz_file, "MAX_ARRAYS", 1000)
    write_zip(tmp_path / "many.npz", {f"a{i}.npy": b"" for i in range(1001)})  # refused before any member is read
    assert message(describe, tmp_path / "many.npz") == (
        f"{tmp_path / 'many.npz'}: more than 1,000 arrays; not a weights file")


def test_object_arrays_are_refused_naming_the_member(tmp_path):
    np.savez(tmp_path / "w.npz", ok=np.ones(2), meta=np.array([{"lr": 0.1}], dtype=object))
    expected = (f"{tmp_path / 'w.npz'} member 'meta.npy': refused, an array needs pickle to load (dtype object); "
                "save plain numeric arrays")
    assert message(read, tmp_path / "w.npz") == expected
    assert message(describe, tmp_path / "w.npz") == expected
    np.save(tmp_path / "o.npy", np.array([None, 1], dtype=object))
    assert message(read, tmp_path / "o.npy") == (
        f"{tmp_path / 'o.npy'}: refused, an array needs pickle to load (dtype object); save plain numeric arrays")


def test_read_header_compares_the_declared_bytes_with_those_available():
    raw = npy_header("<f4", (250,))  # 1,000 bytes declared
    assert _read_header(io.BytesIO(raw), "w", 1000).nbytes == 1000  # exactly what there is
    h = _read_header(io.BytesIO(npy_header(">i2", (3, 4), fortran=True)), "w", 24)
    assert (h.name, h.shape, h.dtype, h.fortran, h.nbytes) == ("w", (3, 4), np.dtype(">i2"), True, 24)
    assert message(_read_header, io.BytesIO(raw), "w.npz member 'a.npy'", 999) == (
        "w.npz member 'a.npy': the header declares shape (250,) of float32 (1,000 bytes) but the file holds "
        "999 bytes of data; the file is truncated or damaged")
    assert message(_read_header, io.BytesIO(raw), "w", -5) == (
        "w: the header declares shape (250,) of float32 (1,000 bytes) but the file holds 0 bytes of data; "
        "the file is truncated or damaged")
    assert message(_read_header, io.BytesIO(npy_header(">f8", (1000, 2))), "w", 15_999) == (
        "w: the header declares shape (1000, 2) of >f8 (16,000 bytes) but the file holds 15,999 bytes of data; "
        "the file is truncated or damaged")
    assert _read_header(io.BytesIO(npy_header("<f4", (0, 7))), "w", 0).nbytes == 0  # nothing declared, nothing there


@pytest.mark.parametrize("declared", [2000, 1362, 1300, 1234])
def test_a_header_declaring_more_than_the_npy_file_holds_is_refused(tmp_path, declared):
    header = npy_header("|u1", (declared,))
    assert len(header) == 128  # the file: 128 header bytes and 1,234 of data, 1,362 in all
    path = tmp_path / "w.npy"
    path.write_bytes(header + BYTES_1234)
    if declared == 1234:
        assert read(path).tensors["w"].tolist() == list(BYTES_1234)
        assert describe(path)[0].shape == (1234,)
        return
    expected = {
        2000: f"{path}: the header declares shape (2000,) of uint8 (2,000 bytes) but the file holds 1,362 bytes "
              "of data; the file is truncated or damaged",  # more than the whole file
        1362: f"{path}: the header declares 1,362 bytes of data, the file holds 1,234; it is truncated",
        1300: f"{path}: the header declares 1,300 bytes of data, the file holds 1,234; it is truncated",
    }[declared]
    assert message(read, path) == expected and message(describe, path) == expected


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("declared", [2000, 1362, 1300, 1234])
def test_a_header_declaring_more_than_the_member_holds_is_refused(tmp_path, declared, compress):
    header = npy_header("|u1", (declared,))
    assert len(header) == 128
    path = write_zip(tmp_path / "w.npz", {"ok.npy": npy(np.array([1], np.uint8)), "w.npy": header + BYTES_1234},
                     compress)
    if declared == 1234:
        assert read(path).tensors["w"].tolist() == list(BYTES_1234)
        return
    where = f"{path} member 'w.npy'"
    expected = {
        2000: f"{where}: the header declares shape (2000,) of uint8 (2,000 bytes) but the file holds 1,362 bytes "
              "of data; the file is truncated or damaged",
        1362: f"{where}: the header declares 1,362 bytes of data, the member holds 1,234; the file is truncated "
              "or damaged",
        1300: f"{where}: the header declares 1,300 bytes of data, the member holds 1,234; the file is truncated "
              "or damaged",
    }[declared]
    assert message(read, path) == expected and message(describe, path) == expected


def test_damaged_or_missing_archives_are_one_line(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(bytes(range(256)) * 4)
    assert message(read, path) == f"{path}: truncated or damaged .npz file (File is not a zip file); re-download or " \
                                  "re-save it"
    assert message(read, tmp_path / "gone.npz") == (
        f"{tmp_path / 'gone.npz'}: truncated or damaged .npz file (No such file or directory); re-download or "
        "re-save it")
    np.savez(tmp_path / "w.npz", w=np.arange(1000, dtype=np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:2000])
    error = message(describe, tmp_path / "cut.npz")
    assert error.startswith(f"{tmp_path / 'cut.npz'}: truncated or damaged .npz file (") and "\n" not in error
    raw = bytearray((tmp_path / "w.npz").read_bytes())
    raw[500] ^= 0xFF  # inside the data: the member's CRC no longer matches
    (tmp_path / "crc.npz").write_bytes(bytes(raw))
    assert message(read, tmp_path / "crc.npz") == (
        f"{tmp_path / 'crc.npz'}: truncated or damaged .npz file (Bad CRC-32 for file 'w.npy'); re-download or "
        "re-save it")
    assert describe(tmp_path / "crc.npz")[0].shape == (1000,)  # the header alone is still whole


# --- describe and sniff ---------------------------------------------------------------------------

def test_describe_reads_headers_alone(tmp_path, monkeypatch):
    np.savez(tmp_path / "w.npz", w=np.zeros((2, 3), ">f4"), b=np.zeros(4, np.bool_), i=np.zeros((), "<i8"))
    np.save(tmp_path / "one.npy", np.zeros((5, 1), ">f8"))

    def no_data(*args):
        raise AssertionError("describe read array data")

    monkeypatch.setattr(npz_file, "_fill", no_data)
    assert [(i.name, i.shape, i.dtype) for i in describe(tmp_path / "w.npz")] == [
        ("w", (2, 3), "float32"), ("b", (4,), "bool"), ("i", (), "int64")]
    assert [(i.name, i.shape, i.dtype) for i in describe(tmp_path / "one.npy")] == [("one", (5, 1), "float64")]


def test_sniff_knows_npy_files_and_zips_of_npy_members(tmp_path):
    np.save(tmp_path / "a.npy", np.ones(2))
    np.savez(tmp_path / "w.npz", a=np.ones(2), b=np.zeros(1))
    write_zip(tmp_path / "notes.zip", {"a.npy": npy(np.ones(2)), "readme.txt": b"hello"})
    write_zip(tmp_path / "text.zip", {"readme.txt": b"hello"})
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "junk").write_bytes(bytes(range(256)))

    def head(name):
        return (tmp_path / name).read_bytes()[:512]

    assert sniff(tmp_path / "a.npy", head("a.npy")) is True
    assert sniff(tmp_path / "anything", b"\x93NUMPY") is True  # the magic alone
    assert sniff(tmp_path / "w.npz", head("w.npz")) is True
    assert sniff(tmp_path / "notes.zip", head("notes.zip")) is False
    assert sniff(tmp_path / "text.zip", head("text.zip")) is False
    assert sniff(tmp_path / "empty.npz", head("empty.npz")) is False
    assert sniff(tmp_path / "junk", head("junk")) is False
    assert sniff(tmp_path / "a.npy", b"\x93NUMP") is False


def test_tensor_from_numpy_keeps_every_shape_and_copies_into_contiguous_memory():
    """The helper every array reader ends in: 0-d stays 0-d (np.ascontiguousarray alone gives (1,)),
    Fortran-order and strided arrays come back C-contiguous with their values."""
    from transferkit.weights.formats import tensor_from_numpy

    scalar = tensor_from_numpy(np.array(3.5, np.float32))
    assert scalar.shape == () and scalar.item() == 3.5
    fortran = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    t = tensor_from_numpy(fortran)
    assert t.shape == (2, 3) and t.is_contiguous() and t.tolist() == [[0, 1, 2], [3, 4, 5]]
    strided = np.arange(10, dtype=np.float64)[::3]
    assert tensor_from_numpy(strided).tolist() == [0.0, 3.0, 6.0, 9.0]
