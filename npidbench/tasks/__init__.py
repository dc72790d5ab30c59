"""The registries: benchmark families, the tables they fill, and the presets users type
(``npidbench list``).

A family is a ``TaskFamily`` object (``FAMILY`` of each module here). The built-in ones are
listed below in the order of the benchmark page; third-party packages add theirs through the
``npidbench.tasks`` entry-point group (``name = "package.module:FAMILY"``, or a module that
exports ``FAMILY``). Each family brings its report tables. Presets are the TOML files of the
top-level ``tasks/`` folder (shipped as package data), one per benchmark; a preset naming an
unknown family, table or dataset is refused when it loads.

Adding a family: one module exporting ``FAMILY`` + one preset TOML (+ a synthetic generator if
it reads a new dataset).
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from npidbench.config import field_choices, read_toml
from npidbench.errors import BadInput
from npidbench.paths import preset_dir
from npidbench.tables import TableSpec
from npidbench.tasks import detection, frozen_linear, knn, linear, segmentation, semisup, voc_svm
from npidbench.tasks.base import Preset, TaskFamily

ENTRY_POINT_GROUP = "npidbench.tasks"
# The benchmark page's order (ARCHITECTURE.md "Report columns"): the report's tables follow it.
BUILTIN_FAMILIES: tuple[TaskFamily, ...] = (
    knn.FAMILY,
    voc_svm.FAMILY,
    linear.FAMILY,
    frozen_linear.FAMILY,
    semisup.FAMILY,
    detection.FAMILY,
    segmentation.FAMILY,
)
_PRESET_KEYS = {
    "family",
    "description",
    "table",
    "dataset",
    "config",
    "synthetic",
    "synthetic_protocol",
    "in_all",
    "synthetic_seconds",
}


def register(registry: dict[str, TaskFamily], family: TaskFamily, origin: str = "built in") -> None:
    """Add ``family`` to ``registry``; a second family of the same name, or a table key another
    family already brings, is refused (BadInput: one line, exit 2)."""
    if not isinstance(family, TaskFamily):
        raise BadInput(
            f"entry point {origin} of group {ENTRY_POINT_GROUP} gives {type(family).__name__}, "
            "not a npidbench.tasks.base.TaskFamily (export FAMILY = TaskFamily(...))"
        )
    if family.name in registry:
        raise BadInput(
            f"task family {family.name!r} is registered twice ({origin}); uninstall one of the packages"
        )
    taken = {t.key: f.name for f in registry.values() for t in f.tables}
    for table in family.tables:
        if table.key in taken:
            raise BadInput(
                f"table {table.key!r} of family {family.name!r} ({origin}) is already brought by "
                f"family {taken[table.key]!r}: give it another key"
            )
    registry[family.name] = family


def _load_entry_point(entry: EntryPoint) -> Any:
    try:
        loaded = entry.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin is named, not a traceback
        raise BadInput(f"task family plugin {entry.name} ({entry.value}) does not import: {exc}") from exc
    return getattr(loaded, "FAMILY", loaded) if isinstance(loaded, ModuleType) else loaded


@functools.lru_cache(maxsize=1)
def families() -> dict[str, TaskFamily]:
    """Built-in families, then entry-point plugins, by name."""
    registry: dict[str, TaskFamily] = {}
    for family in BUILTIN_FAMILIES:
        register(registry, family)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        register(registry, _load_entry_point(entry), f"{entry.name} = {entry.value}")
    return registry


def tables() -> dict[str, TableSpec]:
    """Every registered family's tables by key, in the families' order."""
    return {table.key: table for family in families().values() for table in family.tables}


def load_preset(path: Path) -> Preset:
    data = read_toml(path)
    unknown = set(data) - _PRESET_KEYS
    missing = {"family", "description", "table", "dataset"} - set(data)
    if unknown or missing:
        raise BadInput(f"preset {path}: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
    family = families().get(data["family"])
    if family is None:
        raise BadInput(
            f"preset {path}: unknown family {data['family']}; choose one of {', '.join(families())}"
        )
    if data["table"] not in family.table_keys:
        raise BadInput(
            f"preset {path}: family {family.name} fills no table {data['table']!r}; "
            f"choose one of {', '.join(family.table_keys)}"
        )
    if data["dataset"] not in family.datasets:
        raise BadInput(
            f"preset {path}: family {family.name} does not read dataset {data['dataset']!r}; "
            f"choose one of {', '.join(family.datasets)}"
        )
    return Preset(
        name=path.stem,
        family=data["family"],
        description=data["description"],
        table=data["table"],
        dataset=data["dataset"],
        config=data.get("config", {}),
        synthetic=data.get("synthetic", {}),
        path=path,
        in_all=_in_all(path, data.get("in_all", True)),
        synthetic_seconds=_synthetic_seconds(path, data.get("synthetic_seconds")),
        synthetic_protocol=_synthetic_protocol(path, family, data.get("synthetic_protocol", {})),
    )


def _synthetic_protocol(path: Path, family: TaskFamily, tables: Any) -> dict[str, dict[str, Any]]:
    """[synthetic_protocol.VALUE] tables: VALUE must be a choice of one of the family's
    protocol_keys (a typo would otherwise never apply, silently)."""
    choices = {str(c) for key in family.protocol_keys for c in field_choices(family.config, key)}
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise BadInput(f"preset {path}: synthetic_protocol must hold tables, [synthetic_protocol.VALUE]")
    unknown = sorted(set(tables) - choices)
    if unknown:
        raise BadInput(
            f"preset {path}: [synthetic_protocol.{unknown[0]}] names no protocol of family "
            f"{family.name}; choose from {', '.join(sorted(choices)) or 'none (it has no protocol_keys)'}"
        )
    return tables


def _synthetic_seconds(path: Path, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise BadInput(f"preset {path}: synthetic_seconds must be a positive number of seconds, got {value!r}")
    return float(value)


def _in_all(path: Path, value: Any) -> bool | tuple[str, ...]:
    """``in_all``: true, false, or a list of backbone families (backbones.FAMILIES)."""
    from npidbench.backbones import FAMILIES

    if isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(v in FAMILIES for v in value):
        return tuple(value)
    raise BadInput(
        f"preset {path}: in_all must be true, false or a list of backbone families ({', '.join(FAMILIES)}), "
        f"got {value!r}"
    )


@functools.lru_cache(maxsize=1)
def presets() -> dict[str, Preset]:
    """Every preset by name: the shipped ones, then those plugin families bring."""
    found = {p.stem: load_preset(p) for p in sorted(preset_dir("tasks").glob("*.toml"))}
    for family in families().values():
        for path in family.preset_files:
            preset = load_preset(Path(path))
            if preset.name in found:
                raise BadInput(
                    f"preset {path}: a task named {preset.name!r} exists already ({found[preset.name].path})"
                )
            found[preset.name] = preset
    return found


def get_preset(name: str) -> Preset:
    found = presets().get(name)
    if found is None:
        raise BadInput(f"unknown task {name!r}; choose one of: {', '.join(presets())} (npidbench list)")
    return found


def family_of(preset: Preset) -> TaskFamily:
    return families()[preset.family]
