"""NumPy .npz archives of named arrays, and single .npy files, read without pickle and within bounds.

`np.load` is not used for the arrays: for an .npz member it allocates whatever shape the member's
header declares before reading a byte (a 200-byte member can claim a terabyte), and it offers no way
to see shapes without decompressing the data. Here the zip directory and each member's .npy header
are read (the header through NumPy's own parser, `numpy.lib.format`), the declared size
(shape x item size) is checked against the bytes the member really holds, and only then is an array
allocated and filled. `describe` stops after the headers, so inspecting a file costs no more than
its headers whatever the arrays' sizes.
"""

from __future__ import annotations

import math
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from numpy.lib import format as npy_format

from transferkit.errors import TransferKitError, one_line
from transferkit.weights.formats import TensorInfo, WeightFile, tensor_from_numpy, zip_names

NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER = 10_000  # bytes of an .npy header dictionary (NumPy's own default bound)
MAX_ARRAYS = 100_000


def sniff(path: Path, head: bytes) -> bool:
    if head.startswith(NPY_MAGIC):
        return True
    names = zip_names(path, head)
    return bool(names) and all(n.endswith(".npy") for n in names)


@dataclass
class _Header:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    nbytes: int


def _read_header(fh: IO[bytes], where: str, available: int) -> _Header:
    """The .npy header of `fh`, checked: no object arrays, and no more data declared than `available`."""
    try:
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fh, max_header_size=MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fh, max_header_size=MAX_HEADER)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, SyntaxError, TypeError, OverflowError, EOFError, MemoryError, RecursionError,
            tokenize.TokenError) as exc:  # what NumPy's header parser (a literal_eval) raises on bad text
        raise TransferKitError(f"{where}: damaged .npy header ({one_line(exc)}); re-save the file") from None
    if dtype.hasobject:
        raise TransferKitError(f"{where}: refused, an array needs pickle to load (dtype {dtype}); "
                               "save plain numeric arrays")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > available:
        raise TransferKitError(
            f"{where}: the header declares shape {shape} of {dtype} ({nbytes:,} bytes) but the file holds "
            f"{max(available, 0):,} bytes of data; the file is truncated or damaged"
        )
    return _Header(where, tuple(shape), dtype, fortran, nbytes)


def _fill(fh: IO[bytes], header: _Header, where: str, sized: bool) -> torch.Tensor:
    """The array's data from `fh`. `sized`: the bytes are known to be there (a plain file, a stored
    member), so the array is allocated at once; otherwise (a compressed member, whose size in the
    zip directory is only a claim) it grows as data really arrives, so memory follows the data."""
    chunk = 16 << 20
    if sized:
        flat = np.empty(math.prod(header.shape), header.dtype)
        view = memoryview(flat).cast("B") if header.nbytes else memoryview(bytearray())
        done = 0
        while done < header.nbytes:
            got = fh.readinto(view[done:done + chunk])
            if not got:
                break
            done += got
    else:
        data = bytearray()
        while len(data) < header.nbytes:
            block = fh.read(min(chunk, header.nbytes - len(data)))
            if not block:
                break
            data += block
        done = len(data)
        flat = np.frombuffer(data, header.dtype) if done == header.nbytes else None
    if done < header.nbytes:
        raise TransferKitError(f"{where}: ends after {done:,} of {header.nbytes:,} bytes; the file is truncated")
    array = flat.reshape(header.shape, order="F" if header.fortran else "C")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return tensor_from_numpy(array)
    except TypeError:
        raise TransferKitError(f"{where}: dtype {header.dtype} has no PyTorch equivalent; convert the array") from None


def _array_name(member: str) -> str:
    return member[: -len(".npy")] if member.endswith(".npy") else member


def _walk(path: Path, load: bool) -> tuple[list[_Header], dict[str, torch.Tensor]]:
    headers: list[_Header] = []
    tensors: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as raw:
            single = raw.read(len(NPY_MAGIC)) == NPY_MAGIC
        if single:  # one .npy file: one array, named after the file
            size = path.stat().st_size
            with open(path, "rb") as fh:
                header = _read_header(fh, str(path), size)
                available = size - fh.tell()
                if header.nbytes > available:
                    raise TransferKitError(f"{path}: the header declares {header.nbytes:,} bytes of data, the file "
                                           f"holds {available:,}; it is truncated")
                header.name = path.stem
                headers.append(header)
                if load:
                    tensors[path.stem] = _fill(fh, header, str(path), sized=True)
            return headers, tensors
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.filename.endswith("/")]  # is_dir() fails on an empty name
            if len(infos) > MAX_ARRAYS:
                raise TransferKitError(f"{path}: more than {MAX_ARRAYS:,} arrays; not a weights file")
            for info in infos:
                where = f"{path} member {info.filename!r}"
                with zf.open(info) as fh:
                    header = _read_header(fh, where, info.file_size)
                    if header.nbytes > info.file_size - fh.tell():
                        raise TransferKitError(
                            f"{where}: the header declares {header.nbytes:,} bytes of data, the member holds "
                            f"{info.file_size - fh.tell():,}; the file is truncated or damaged")
                    header.name = _array_name(info.filename)
                    headers.append(header)
                    if load:
                        stored = info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size
                        tensors[header.name] = _fill(fh, header, where, sized=stored and info.header_offset
                                                     + info.compress_size <= path.stat().st_size)
    except TransferKitError:
        raise
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, ValueError,
            zlib.error, MemoryError, IndexError) as exc:
        what = getattr(exc, "strerror", None) or one_line(exc)
        raise TransferKitError(f"{path}: truncated or damaged .npz file ({what}); re-download or re-save it") from None
    if not headers:
        raise TransferKitError(f"{path}: the .npz file holds no arrays")
    return headers, tensors


def read(path: Path) -> WeightFile:
    _, tensors = _walk(path, load=True)
    return WeightFile(tensors, "npz", path)


def describe(path: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes from the headers alone; no array data is read."""
    headers, _ = _walk(path, load=False)
    return [TensorInfo(h.name, h.shape, str(h.dtype.newbyteorder("=").name)) for h in headers]
