"""Typed configuration: dataclass defaults < preset TOML < synthetic profile < ``--set key=value``.

nanoGPT's override idea without exec: every value is parsed as a TOML literal (so ``ks=[10,20]``,
``lr=0.01`` and ``name=abc`` all work), checked against the dataclass field's type, and unknown
keys are refused with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from npidbench.errors import BadInput

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

C = TypeVar("C")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path} is not valid TOML: {exc}") from exc


def parse_set_options(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> {k: parsed v}. Values are TOML literals; bare words are strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadInput(f"--set {item!r} is not key=value (e.g. --set ks=[10,20])")
        out[key] = parse_value(raw.strip())
    return out


def parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if raw.startswith("[") and raw.endswith("]"):  # a list of bare words: layers=[Feature4,Feature5]
            return [parse_value(item.strip()) for item in raw[1:-1].split(",") if item.strip()]
        return raw  # a bare word, e.g. solver=sklearn


def build_config(cls: type[C], *layers: Mapping[str, Any], source_names: Sequence[str] = ()) -> C:
    """Instantiate dataclass ``cls`` from override layers applied in order (later wins).

    Raises:
        BadInput: an unknown key (valid keys listed) or a value of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        origin = source_names[i] if i < len(source_names) else "config"
        for key, raw in layer.items():
            if key not in fields:
                raise BadInput(
                    f"unknown setting {key!r} in {origin}; valid keys: {', '.join(sorted(fields))}"
                )
            values[key] = coerce(raw, hints[key], key, origin)
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise BadInput(str(exc)) from exc


def coerce(value: Any, hint: Any, key: str, origin: str = "--set") -> Any:
    """Check/convert ``value`` to the annotated type; raise BadInput naming the key."""
    origin_type = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin_type in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, origin)
            except BadInput as exc:
                errors.append(str(exc))
        raise BadInput(errors[0] if errors else f"{origin}: bad value for {key}")
    if origin_type in (tuple, list):
        if isinstance(value, str):
            value = [parse_value(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            value = [value]
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, key, origin) for v in value]
        return tuple(items) if origin_type is tuple else items
    if origin_type is typing.Literal:
        if value not in args:
            raise BadInput(f"{origin}: {key}={value!r} is not one of {', '.join(map(str, args))}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise BadInput(f"{origin}: {key}={value!r} is not a boolean (true/false)")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInput(f"{origin}: {key}={value!r} is not an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadInput(f"{origin}: {key}={value!r} is not a number")
        if not math.isfinite(value):
            raise BadInput(f"{origin}: {key}={value!r} is not a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise BadInput(f"{origin}: {key}={value!r} is not a string")
        return value
    return value


def check_choices(config: Any) -> None:
    """Every ``Literal[...]`` field of dataclass instance ``config`` (and every item of a tuple of
    Literals) holds one of its choices: the check for configs built in Python, not through
    ``build_config`` (which coerces first). Raises ValueError naming the field and the choices."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        hint = hints[f.name]
        value = getattr(config, f.name)
        if (
            typing.get_origin(hint) is tuple
            and typing.get_args(hint)[:1]
            and _is_literal(typing.get_args(hint)[0])
        ):
            hint, values = typing.get_args(hint)[0], list(value)
        elif _is_literal(hint):
            values = [value]
        else:
            continue
        choices = typing.get_args(hint)
        for item in values:
            if item not in choices:
                raise ValueError(f"{f.name}={item!r} is not one of {', '.join(map(str, choices))}")


def field_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The choices of dataclass ``cls``'s ``Literal[...]`` field ``name`` (() for another type)."""
    hint = _hints(cls)[name]
    return typing.get_args(hint) if _is_literal(hint) else ()


def _is_literal(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Literal


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
