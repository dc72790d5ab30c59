"""A restricted unpickler that reads tensors out of pickles without running any pickled code.

Why hand-written: ``torch.load(weights_only=True)`` is the safe loader, but it refuses the whole
file as soon as one global is outside its allow-list, and old checkpoints pickle objects we
cannot (and must not) import: lemniscate pickles its ``NCEAverage`` module, DINO and timm an
``argparse.Namespace``, Lightning its hyper-parameters (USERS.md, pain point 10). Here every
global outside a small allow-list of pure data constructors becomes an inert placeholder: calling
it, building it or filling it only records the arguments, so tensors nested inside such objects
are still reachable and nothing from the file ever executes.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
from typing import Any

import numpy as np
import torch

# Pure data constructors that cannot run user code. Storage types are resolved by torch itself.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor,
}
if hasattr(torch._utils, "_rebuild_tensor_v3"):
    _ALLOWED[("torch._utils", "_rebuild_tensor_v3")] = torch._utils._rebuild_tensor_v3

# numpy moved numpy.core to numpy._core in 2.0; pickles name either, whichever numpy wrote them.
_np_core = getattr(np, "_core", None) or np.core
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _np_core.multiarray._reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _np_core.multiarray.scalar
    if hasattr(_np_core.numeric, "_frombuffer"):
        _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _np_core.numeric._frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype
# _codecs.encode turns a latin-1 str back into bytes (how protocol 2 pickles bytes): pure.
_ALLOWED[("_codecs", "encode")] = __import__("codecs").encode

_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


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


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; everything else becomes an Inert placeholder."""

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.skipped: list[str] = []
        self._placeholders: dict[str, type[Inert]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles name Python 2 modules (__builtin__, copy_reg): normalise first,
        # as pickle's own find_class does with fix_imports.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        qualname = f"{module}.{name}"
        if qualname not in self._placeholders:
            # A fresh class per global: getsource() fails on it, so torch's legacy loader never
            # compares "source code" of containers against ours.
            self._placeholders[qualname] = type(name, (Inert,), {"qualname": qualname})
            self.skipped.append(qualname)
        return self._placeholders[qualname]


class _RestrictedPickleModule:
    """Quacks like the ``pickle`` module for ``torch.load(pickle_module=...)``.

    torch subclasses ``Unpickler`` (for storages) and calls ``load`` for its header records, so
    both go through the restricted resolver; the skipped globals of every unpickler it creates
    are collected in ``skipped``.
    """

    __name__ = "npidbench_restricted_pickle"

    def __init__(self) -> None:
        self.skipped: list[str] = []
        outer = self

        class Unpickler(RestrictedUnpickler):
            def __init__(self, file: Any, **kwargs: Any) -> None:
                super().__init__(file, **kwargs)
                self.skipped = outer.skipped  # share one list across every unpickler

        self.Unpickler = Unpickler

    def load(self, file: Any, **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()

    def loads(self, data: bytes, **kwargs: Any) -> Any:
        return self.load(io.BytesIO(data), **kwargs)


def restricted_torch_load(path: str) -> tuple[Any, list[str]]:
    """torch.load through the restricted resolver. Returns (object, skipped global names)."""
    module = _RestrictedPickleModule()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    except Exception as exc:
        exc.skipped = sorted(set(module.skipped))  # lets the caller name the offending types
        raise
    return obj, sorted(set(module.skipped))


def restricted_pickle_load(path: str) -> tuple[Any, list[str]]:
    """A plain pickle (e.g. MoCo's detectron2 .pkl of numpy arrays) through the resolver."""
    with open(path, "rb") as f:
        unpickler = RestrictedUnpickler(f, encoding="latin1")
        try:
            obj = unpickler.load()
        except Exception as exc:
            exc.skipped = sorted(set(unpickler.skipped))
            raise
    return obj, sorted(set(unpickler.skipped))
