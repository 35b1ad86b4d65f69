"""A restricted unpickler: plain data and arrays come out, nothing named in the file is imported or run.

`pickle.load` imports and calls whatever the file names. Python's own (pure-Python) unpickler is
used here with `find_class`, `persistent_load` and the BUILD opcode replaced, so that:

- a global on the deny list (os, subprocess, builtins such as eval/exec/open/getattr, importlib, ...)
  stops the load with `Refused`, whatever the policy;
- numpy arrays, dtypes and scalars, and torch tensors and storages, are rebuilt by this module's
  own functions from the bytes in the file (sizes checked against those bytes), never by calling
  numpy's or torch's unpickling hooks;
- OrderedDict, set, frozenset, slice and complex are the real types (plain data), and the empty
  bytes (`bytes()`, how protocols 0-2 write an empty array's data);
- SETITEM(S), APPEND(S) and ADDITEMS fill only dicts, lists, sets and stand-ins: on anything else
  they would call a real type's method (`Tensor.add` broadcasts two small tensors into a huge one;
  a list assigned into its own slice doubles with each 5 bytes of file);
- sizes are bounded by the file's bytes: a dimension is below 2**63 before any product is taken,
  and a tensor holds no more elements than its storage record (a stride of 0 would otherwise
  make a 4-byte record into any size when the view is copied);
- with `stand_ins=True` every other class or function named by the file becomes an inert `StandIn`
  that records its arguments and state and runs nothing; otherwise it is refused.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
from typing import Any

import numpy as np
import torch

DENIED_MODULES = {
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "builtins", "__builtin__", "shutil", "socket",
    "importlib", "runpy", "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty", "webbrowser", "io",
    "_io", "types", "functools", "operator", "pdb", "bdb", "timeit", "multiprocessing", "threading", "_thread",
    "signal", "tempfile", "pathlib", "glob", "urllib", "http", "ftplib", "smtplib", "asyncio", "platform",
    "zipimport", "pkgutil", "ensurepip", "venv", "distutils", "setuptools", "pip", "inspect", "gc", "copyreg",
    "_posixsubprocess", "select", "selectors", "mmap", "fcntl", "resource", "sqlite3", "shelve", "dbm", "codecs",
    "pipes", "commands", "popen2",
}
def _empty_bytes(*args):
    if args:
        raise Damaged("builtins.bytes with arguments (only the empty bytes of an empty array are expected)")
    return b""


# Plain-data builtins that are safe to construct (small: no size argument that allocates).
SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex, "bytes": _empty_bytes}
MAX_DIM = 1 << 63  # numpy's and torch's dimensions are int64
NUMERIC_KINDS = "biuf"
TORCH_STORAGES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
TORCH_DTYPES = {"float16", "float32", "float64", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "half", "float", "double", "long", "int"}


class Refused(Exception):
    """The file names something that must never run; the message says what."""


class Damaged(Exception):
    """The pickle's contents contradict themselves (sizes, shapes, types); the message says where."""


class StandIn:
    """An inert stand-in for a class or function named in the file: it keeps what the file gave it."""

    _tk_name = "?"
    _tk_counter: collections.Counter | None = None

    def __new__(cls, *args, **kwargs):
        if cls._tk_counter is not None:
            cls._tk_counter[cls._tk_name] += 1
        obj = object.__new__(cls)
        object.__setattr__(obj, "_tk_args", args)
        object.__setattr__(obj, "_tk_state", None)
        object.__setattr__(obj, "_tk_items", {})
        object.__setattr__(obj, "_tk_list", [])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_tk_state", state)

    def __setitem__(self, key, value):  # dict subclasses are filled with SETITEMS
        self._tk_items[key] = value

    def append(self, value):  # list subclasses with APPENDS
        self._tk_list.append(value)

    def extend(self, values):
        self._tk_list.extend(values)

    def __repr__(self):
        return f"<not run: {self._tk_name}>"

    def module_state(self) -> dict | None:
        """The pickled `__dict__` of an nn.Module-like object (it has `_modules`), else None."""
        state = self._tk_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) and "_modules" in state else None


class _DtypeBuilder:
    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str) or len(spec) > 8:
            raise Damaged(f"numpy dtype {spec!r} is not a plain numeric type")
        try:
            dtype = np.dtype(spec)
        except TypeError:
            raise Damaged(f"numpy dtype {spec!r} is not a plain numeric type") from None
        if dtype.kind not in NUMERIC_KINDS or dtype.fields or dtype.subdtype:
            raise Damaged(f"numpy dtype {spec!r} is not numeric (object or structured arrays are refused)")
        self.dtype = dtype

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="):
            self.dtype = self.dtype.newbyteorder(state[1]) if state[1] != "|" else self.dtype


class _ArrayBuilder:
    """numpy's `_reconstruct(ndarray, (0,), b'b')` placeholder, filled in by BUILD."""

    array: np.ndarray | None = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise Damaged("a numpy array's state is not (version, shape, dtype, fortran, data)")
        _version, shape, dtype, fortran, data = state
        self.array = _array_from_bytes(data, dtype, shape, "F" if fortran else "C")


def _array_from_bytes(data, dtype, shape, order="C") -> np.ndarray:
    if not isinstance(dtype, _DtypeBuilder):
        raise Damaged("a numpy array without a plain numeric dtype")
    if isinstance(data, str):  # protocol 0-2 may carry the bytes as a latin-1 string
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise Damaged("a numpy array whose data is not bytes (object arrays are refused)")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and 0 <= d < MAX_DIM for d in shape):
        raise Damaged(f"a numpy array with a bad shape {shape!r}")
    count = math.prod(shape)
    if count * dtype.dtype.itemsize != len(data):
        raise Damaged(f"a numpy array of shape {shape} {dtype.dtype} holds {len(data)} bytes, "
                      f"not {count * dtype.dtype.itemsize}")
    return np.frombuffer(bytearray(data), dtype=dtype.dtype).reshape(shape, order=order)


def _reconstruct(cls, shape=(0,), typecode=b"b"):
    if cls is not _NDARRAY:
        raise Damaged("numpy _reconstruct of something other than an ndarray")
    return _ArrayBuilder()


def _frombuffer(buf, dtype, shape, order="C"):
    return _array_from_bytes(buf, dtype, tuple(shape), order)


def _scalar(dtype, data=None):
    return _array_from_bytes(data, dtype, ())[()]


def _codecs_encode(text, encoding="utf8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Damaged(f"_codecs.encode with {encoding!r} (only latin-1 array bytes are expected)")
    return text.encode("latin1")


_NDARRAY = object()
NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeBuilder,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _StorageType:
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise Damaged("a tensor rebuilt from something that is not one of the file's storages")
    size, stride = tuple(size), tuple(stride)
    ints = (offset, *size, *stride)
    if len(size) != len(stride) or len(size) > 16 or not all(isinstance(v, int) and 0 <= v < MAX_DIM for v in ints):
        raise Damaged(f"a tensor with a bad shape {size}, stride {stride} or offset {offset}")
    if all(size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if last >= storage.flat.numel():
            raise Damaged(f"a tensor of shape {size} reaches element {last} of a "
                          f"{storage.flat.numel()}-element storage")
        numel = math.prod(size)
        if numel > storage.flat.numel():
            raise Damaged(f"a tensor of shape {size} holds {numel} elements, more than its "
                          f"{storage.flat.numel()}-element storage (a stride of 0 or overlapping strides)")
    return torch.as_strided(storage.flat, size, stride, offset).clone()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_state):
    if not isinstance(data, torch.Tensor):
        raise Damaged("a parameter whose data is not a tensor")
    return data


def _torch_size(*args):
    return tuple(*args) if args else ()


TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
}


def _load_build(self):
    """BUILD only fills this module's placeholders, stand-ins and plain dicts; it never calls a
    `__setstate__` of a real type (a tensor's, for one)."""
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, (StandIn, _ArrayBuilder, _DtypeBuilder)):
        inst.__setstate__(state)
    elif isinstance(inst, torch.Tensor):
        pass  # a parameter's extra Python attributes: not weights
    elif isinstance(inst, collections.OrderedDict) and isinstance(state, dict):
        for key, value in state.items():
            if isinstance(key, str) and key.isidentifier() and not key.startswith("__"):
                inst.__dict__[key] = value  # state_dict._metadata
    else:
        raise Damaged(f"BUILD on a {type(inst).__name__}, which this reader never sets state on")


def _fill(target, what: str) -> None:
    """The opcodes that fill a container call its methods: only these containers are filled."""
    kinds = {"SETITEM": (dict, StandIn), "APPEND": (list, StandIn), "ADDITEMS": (set,)}[what]
    if not isinstance(target, kinds):
        raise Damaged(f"{what} on a {type(target).__name__}, which this reader never fills")


def _setitem(target, key, value) -> None:
    try:
        target[key] = value
    except TypeError:  # an unhashable key
        raise Damaged(f"a dict key of type {type(key).__name__}") from None


def _load_setitem(self):
    value = self.stack.pop()
    key = self.stack.pop()
    _fill(self.stack[-1], "SETITEM")
    _setitem(self.stack[-1], key, value)


def _load_setitems(self):
    items = self.pop_mark()
    _fill(self.stack[-1], "SETITEM")
    for i in range(0, len(items), 2):
        _setitem(self.stack[-1], items[i], items[i + 1])


def _load_append(self):
    value = self.stack.pop()
    _fill(self.stack[-1], "APPEND")
    self.stack[-1].append(value)


def _load_appends(self):
    items = self.pop_mark()
    _fill(self.stack[-1], "APPEND")
    self.stack[-1].extend(items)


def _load_additems(self):
    items = self.pop_mark()
    _fill(self.stack[-1], "ADDITEMS")
    self.stack[-1].update(items)


class RestrictedUnpickler(pickle._Unpickler):
    """See the module docstring. `torch_records(key, nbytes)` returns a torch zip's storage record; without
    it, torch globals and persistent ids are not admitted."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.ADDITEMS[0]] = _load_additems

    def __init__(self, data: bytes, *, stand_ins: bool, torch_records=None):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.stand_ins = stand_ins
        self.torch_records = torch_records  # callable(key, nbytes) -> bytes, for torch zip files
        self.not_run: collections.Counter[str] = collections.Counter()  # stand-in class -> instances
        self._storages: dict[str, _Storage] = {}
        self._stand_in_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles use Python 2 names (`commands.Popen` is subprocess.Popen): map them first.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if module.split(".")[0] in DENIED_MODULES or module.startswith(("torch.hub", "torch.jit", "torch.ops")):
            if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
                return SAFE_BUILTINS[name]
            raise Refused(f"the pickle calls {full}, which is never run")
        if (module, name) in NUMPY_GLOBALS:
            return NUMPY_GLOBALS[(module, name)]
        if self.torch_records is not None:
            if (module, name) in TORCH_GLOBALS:
                return TORCH_GLOBALS[(module, name)]
            if module in ("torch", "torch.storage") and name in TORCH_STORAGES:
                return _StorageType(name, TORCH_STORAGES[name])
            if module == "torch" and name in TORCH_DTYPES:
                return getattr(torch, name)
        if not self.stand_ins:
            raise Refused(f"the pickle needs {full}, which is neither an array nor plain data")
        if full not in self._stand_in_classes:
            self._stand_in_classes[full] = type(name, (StandIn,), {
                "_tk_name": full, "_tk_counter": self.not_run, "__module__": __name__})
            self.not_run[full] += 0  # listed even when never instantiated
        return self._stand_in_classes[full]

    def persistent_load(self, pid):
        if self.torch_records is None:
            raise Damaged("a persistent id in a pickle that should have none")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise Damaged(f"an unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            itemsize = torch.empty((), dtype=kind.dtype).element_size()
            raw = self.torch_records(key, numel * itemsize)
            flat = torch.frombuffer(bytearray(memoryview(raw)[: numel * itemsize]), dtype=kind.dtype) if numel else \
                torch.empty(0, dtype=kind.dtype)
            self._storages[key] = _Storage(flat)
        return self._storages[key]


def resolve(obj: Any, depth: int = 0, done: dict[int, Any] | None = None) -> Any:
    """Replace array placeholders by their arrays, in containers and stand-in states (a container the
    pickle shares or nests in itself is visited once)."""
    done = {} if done is None else done
    if depth > 200:
        raise Damaged("containers nested more than 200 deep")
    if isinstance(obj, _ArrayBuilder):
        if obj.array is None:
            raise Damaged("a numpy array that was never filled in")
        return obj.array
    if not isinstance(obj, (dict, list, tuple, StandIn)):
        return obj
    if id(obj) in done:
        return done[id(obj)]
    done[id(obj)] = obj
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = resolve(obj[key], depth + 1, done)
    elif isinstance(obj, list):
        obj[:] = [resolve(v, depth + 1, done) for v in obj]
    elif isinstance(obj, tuple):
        done[id(obj)] = tuple(resolve(v, depth + 1, done) for v in obj)
    else:
        object.__setattr__(obj, "_tk_state", resolve(obj._tk_state, depth + 1, done))
    return done[id(obj)]


def restricted_load(data: bytes, *, stand_ins: bool, torch_records=None) -> tuple[Any, RestrictedUnpickler]:
    """Unpickle `data` under the rules above. Raises Refused, Damaged, or pickle/EOF/value errors for
    the caller to turn into one line naming the file."""
    unpickler = RestrictedUnpickler(data, stand_ins=stand_ins, torch_records=torch_records)
    return resolve(unpickler.load()), unpickler
