"""Read checkpoints that pickle objects we cannot (and must not) import, without running them.

``torch.load(weights_only=True)`` is the safe loader, but it refuses a whole file as soon as one
global is outside its allow-list, and old checkpoints pickle such objects: lemniscate its
``NCEAverage`` module, DINO and timm an ``argparse.Namespace``, Lightning its hyper-parameters
(USERS.md, pain point 10). Two paths, both without executing anything from the file:

* torch zip files: the unknown globals are listed statically (torch's own pickle scanner) and
  registered, for this one load, as fresh *inert placeholder* classes; torch's weights-only
  unpickler then reads the file, so tensors are rebuilt by torch's maintained allow-listed code
  and a placeholder only records what it was given.
* torch's legacy non-zip files (lemniscate, 2018) record pickled modules as persistent ids,
  which torch's weights-only unpickler refuses, and plain pickles (MoCo's detectron2 ``.pkl`` of
  numpy arrays, any protocol): a pure-Python unpickler whose risky opcodes (REDUCE, BUILD,
  NEWOBJ[_EX], INST, OBJ, persistent ids) are restricted to numpy's array constructors, tensor
  views onto storages it allocated itself, and the placeholders.

Why not a C ``pickle.Unpickler`` with ``find_class``: it lets BUILD set attributes on allowed
functions and NEWOBJ_EX pass keywords to allowed classes (a review showed both corrupting the
process), so the allow-list alone is not enough.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class Inert:
    """Stands in for a pickled global we refuse to import or call; records what it was given."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        self = object.__new__(cls)
        self.__dict__["_inert_args"] = args
        self.__dict__["_inert_state"] = None
        self.__dict__["_inert_items"] = {}
        self.__dict__["_inert_list"] = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_inert_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._inert_items[key] = value

    def append(self, value: Any) -> None:
        self._inert_list.append(value)

    def extend(self, values: Any) -> None:
        self._inert_list.extend(values)

    def add(self, value: Any) -> None:
        self._inert_list.append(value)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"

    def contents(self) -> dict[str, Any]:
        """Everything the pickle put into this object, for walking nested tensors."""
        state = self._inert_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | None):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slotstate)
        out: dict[str, Any] = {}
        if isinstance(state, dict):
            out.update({str(k): v for k, v in state.items()})
        elif state is not None:
            out["state"] = state
        for i, arg in enumerate(self._inert_args):
            out[f"arg{i}"] = arg
        out.update({str(k): v for k, v in self._inert_items.items()})
        for i, item in enumerate(self._inert_list):
            out[f"item{i}"] = item
        return out

    def module_state(self) -> dict[str, Any] | None:
        """For a pickled torch.nn.Module, its parameters, buffers and children; else None."""
        state = self.contents()
        if not {"_parameters", "_buffers", "_modules"} <= state.keys():
            return None
        flat: dict[str, Any] = {}
        for group in ("_parameters", "_buffers"):
            for name, value in (state[group] or {}).items():
                if value is not None:
                    flat[name] = value
        for name, child in (state["_modules"] or {}).items():
            if child is not None:
                flat[name] = child
        return flat


def placeholder(qualname: str) -> type[Inert]:
    """A fresh inert class named after a pickled global (one per load: no shared state)."""
    return type(qualname.rsplit(".", 1)[-1], (Inert,), {"qualname": qualname})


class NeedsCode(pickle.UnpicklingError):
    """The file cannot be read without executing something it pickles."""

    def __init__(self, message: str, skipped: list[str]) -> None:
        super().__init__(message)
        self.skipped = skipped


# --- torch files ----------------------------------------------------------------------------


def unknown_torch_globals(path: str) -> list[str]:
    """Globals of a torch.save zip file outside torch's weights-only allow-list (a static scan)."""
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))


@contextmanager
def _placeholders(names: list[str]) -> Iterator[None]:
    with torch.serialization.safe_globals([(placeholder(name), name) for name in names]):
        yield


def torch_load_with_placeholders(path: str) -> tuple[Any, list[str]]:
    """torch's weights-only load of a zip file, with inert placeholders for its unknown globals."""
    names = unknown_torch_globals(path)
    try:
        with _placeholders(names):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NeedsCode(_reason(exc), names) from exc
    return obj, names


def _reason(exc: BaseException) -> str:
    """The useful part of torch's long weights-only error message."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --- plain pickles ----------------------------------------------------------------------------

_np_core = getattr(np, "_core", None) or np.core
# Callables a plain pickle of numpy arrays may call: pure data constructors.
_PLAIN_CALLABLES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 pickles bytes
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
for _core in ("numpy.core", "numpy._core"):
    _PLAIN_CALLABLES[(f"{_core}.multiarray", "_reconstruct")] = _np_core.multiarray._reconstruct
    _PLAIN_CALLABLES[(f"{_core}.multiarray", "scalar")] = _np_core.multiarray.scalar
    if hasattr(_np_core.numeric, "_frombuffer"):
        _PLAIN_CALLABLES[(f"{_core}.numeric", "_frombuffer")] = _np_core.numeric._frombuffer


@dataclass(frozen=True)
class _StorageKind:
    """What a pickled ``torch.FloatStorage`` global resolves to: only its dtype."""

    dtype: torch.dtype


class _TensorViews:
    """Tensor rebuild callables for legacy files: a view onto a storage this loader allocated,
    checked against the storage's size; requires_grad, hooks and metadata are dropped (only
    values are needed), so nothing from the file is ever attached to a tensor."""

    def __init__(self) -> None:
        self.storages: dict[str, torch.storage.TypedStorage] = {}

    def tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
        if not any(storage is s for s in self.storages.values()) and not isinstance(storage, _View):
            raise pickle.UnpicklingError("a tensor refers to a storage the file did not declare")
        base = storage.typed if isinstance(storage, _View) else storage
        if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))):
            raise pickle.UnpicklingError("malformed tensor geometry")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True) if n > 0)
        if offset < 0 or (all(n > 0 for n in size) and last >= base.size()):
            raise pickle.UnpicklingError("tensor geometry outside its storage")
        return torch.empty((0,), dtype=base.dtype).set_(
            base._untyped_storage, offset, tuple(size), tuple(stride)
        )

    @staticmethod
    def parameter(data: Any, *_: Any) -> torch.Tensor:
        if not isinstance(data, torch.Tensor):
            raise pickle.UnpicklingError("a parameter without tensor data")
        return data


@dataclass
class _View:
    typed: torch.storage.TypedStorage


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode is ours
    """Numpy arrays and containers are rebuilt, every other global is inert; with
    ``torch_legacy`` also storages (allocated here, filled later) and tensor views onto them."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, torch_legacy: bool = False, max_bytes: int = 0) -> None:
        super().__init__(file, encoding="latin1")
        self.skipped: list[str] = []
        self._classes: dict[str, type[Inert]] = {}
        self.torch_legacy = torch_legacy
        self.views = _TensorViews()
        self._max_bytes = max_bytes
        self._allowed = dict(_PLAIN_CALLABLES)
        if torch_legacy:
            self._allowed.update(
                {
                    ("torch._utils", "_rebuild_tensor"): self.views.tensor,
                    ("torch._utils", "_rebuild_tensor_v2"): self.views.tensor,
                    ("torch._utils", "_rebuild_parameter"): _TensorViews.parameter,
                    ("torch._utils", "_rebuild_parameter_with_state"): _TensorViews.parameter,
                    ("torch", "Size"): torch.Size,
                }
            )
        self._allowed_ids = {id(v) for v in self._allowed.values()}

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if self.torch_legacy and module in ("torch", "torch.cuda") and name.endswith("Storage"):
            try:
                return _StorageKind(torch.serialization.StorageType(name).dtype)
            except (KeyError, AttributeError):
                pass
        if self.torch_legacy and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        qualname = f"{module}.{name}"
        if qualname not in self._classes:
            self._classes[qualname] = placeholder(qualname)
            self.skipped.append(qualname)
        return self._classes[qualname]

    def _refuse(self, what: str) -> None:
        raise NeedsCode(what, sorted(self.skipped))

    def _callable_ok(self, func: Any) -> bool:
        return id(func) in self._allowed_ids or (isinstance(func, type) and issubclass(func, Inert))

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not self._callable_ok(func):
            self._refuse(f"REDUCE of {func!r}")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Inert | np.ndarray | np.dtype | np.generic):
            inst.__setstate__(state)  # numpy validates its own state
        elif type(inst) is collections.OrderedDict and isinstance(state, dict):
            inst.update(state)
        else:
            self._refuse(f"BUILD of a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, Inert)):
            self._refuse(f"NEWOBJ of {cls!r}")
        self.append(cls.__new__(cls, *args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, Inert)):
            self._refuse(f"NEWOBJ_EX of {cls!r}")
        self.append(cls.__new__(cls, *args, **kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _no_protocol0_objects(self) -> None:
        self._refuse("protocol 0/1 object construction (INST/OBJ)")

    dispatch[pickle.INST[0]] = _no_protocol0_objects
    dispatch[pickle.OBJ[0]] = _no_protocol0_objects

    def persistent_load(self, pid: Any) -> Any:
        """torch's legacy files: storages (allocated here, filled from the file afterwards) and
        pickled modules' classes (their recorded source is ignored)."""
        if not self.torch_legacy or not isinstance(pid, tuple) or not pid:
            self._refuse("a persistent id (external data reference)")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) >= 2:
            return pid[1]
        if kind != "storage" or len(pid) != 6 or not isinstance(pid[1], _StorageKind):
            self._refuse(f"a persistent id of kind {kind!r}")
        _, storage_kind, key, _location, numel, view = pid
        itemsize = torch.empty((), dtype=storage_kind.dtype).element_size()
        if not isinstance(numel, int) or numel < 0 or numel * itemsize > self._max_bytes:
            raise pickle.UnpicklingError("a storage larger than the file")
        key = str(key)
        if key not in self.views.storages:
            raw = torch.UntypedStorage(numel * itemsize)
            self.views.storages[key] = torch.storage.TypedStorage(
                wrap_storage=raw, dtype=storage_kind.dtype, _internal=True
            )
        typed = self.views.storages[key]
        if view is None:
            return typed
        _view_key, offset, size = view
        start, stop = offset * itemsize, (offset + size) * itemsize
        return _View(
            torch.storage.TypedStorage(
                wrap_storage=typed._untyped_storage[start:stop], dtype=typed.dtype, _internal=True
            )
        )


_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def legacy_torch_load(path: str) -> tuple[Any, list[str]]:
    """torch's legacy (non-zip, non-tar) format: header pickles, the object pickle, the storage
    keys, then each storage's bytes (an int64 element count and raw little-endian data)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = [RestrictedUnpickler(f).load() for _ in range(3)]
        if header[0] != _LEGACY_MAGIC_NUMBER or header[1] != _LEGACY_PROTOCOL:
            raise pickle.UnpicklingError("not a torch legacy file (bad magic number)")
        if isinstance(header[2], dict) and not header[2].get("little_endian", True):
            raise pickle.UnpicklingError("big-endian legacy files are not supported")
        unpickler = RestrictedUnpickler(f, torch_legacy=True, max_bytes=size)
        try:
            obj = unpickler.load()
        except (NeedsCode, pickle.UnpicklingError, EOFError):
            raise
        except Exception as exc:
            raise NeedsCode(f"{type(exc).__name__}: {exc}", sorted(unpickler.skipped)) from exc
        keys = RestrictedUnpickler(f).load()
        for key in keys:
            storage = unpickler.views.storages.get(str(key))
            if storage is None:
                raise pickle.UnpicklingError(f"storage {key} is listed but never used")
            (count,) = struct.unpack("<q", f.read(8))
            nbytes = storage._untyped_storage.nbytes()
            data = f.read(nbytes)
            if count * storage.element_size() != nbytes or len(data) != nbytes:
                raise EOFError("storage data truncated")
            if nbytes:
                view = torch.empty(0, dtype=torch.uint8).set_(storage._untyped_storage)
                view.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return obj, sorted(unpickler.skipped)


def restricted_pickle_load(path: str) -> tuple[Any, list[str]]:
    """A plain pickle through the restricted unpickler. Returns (object, inert globals)."""
    with open(path, "rb") as f:
        unpickler = RestrictedUnpickler(io.BufferedReader(f))
        try:
            obj = unpickler.load()
        except NeedsCode:
            raise
        except (pickle.UnpicklingError, EOFError):
            raise
        except Exception as exc:  # a placeholder or numpy rejected what the pickle fed it
            raise NeedsCode(f"{type(exc).__name__}: {exc}", sorted(unpickler.skipped)) from exc
    return obj, sorted(unpickler.skipped)
