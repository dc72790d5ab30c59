"""The registry of benchmark families and the presets users type (``npidbench list``).

Families are modules with NAME, DESCRIPTION, TABLE, a frozen ``Config`` dataclass and
``run(ctx, config) -> TaskOutput``. The built-in ones are a literal dict; third-party packages
add theirs through the ``npidbench.tasks`` entry-point group. Presets are the TOML files of the
top-level ``tasks/`` folder (shipped as package data), one per benchmark.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from npidbench.config import read_toml
from npidbench.errors import BadInput
from npidbench.paths import preset_dir
from npidbench.tasks import detection, knn, linear, segmentation, semisup, voc_svm
from npidbench.tasks.base import Preset

BUILTIN_FAMILIES: dict[str, ModuleType] = {
    detection.NAME: detection,
    knn.NAME: knn,
    linear.NAME: linear,
    semisup.NAME: semisup,
    segmentation.NAME: segmentation,
    voc_svm.NAME: voc_svm,
}
_PRESET_KEYS = {"family", "description", "table", "dataset", "config", "synthetic", "in_all"}


@functools.lru_cache(maxsize=1)
def families() -> dict[str, ModuleType]:
    """Built-in families merged with entry-point plugins; a duplicate name is an error."""
    merged = dict(BUILTIN_FAMILIES)
    for entry in entry_points(group="npidbench.tasks"):
        if entry.name in merged:
            raise RuntimeError(f"task family {entry.name!r} is registered twice ({entry.value})")
        merged[entry.name] = entry.load()
    return merged


def load_preset(path: Path) -> Preset:
    data = read_toml(path)
    unknown = set(data) - _PRESET_KEYS
    missing = {"family", "description", "table", "dataset"} - set(data)
    if unknown or missing:
        raise BadInput(f"preset {path}: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
    if data["family"] not in families():
        raise BadInput(f"preset {path}: unknown family {data['family']}")
    return Preset(
        name=path.stem,
        family=data["family"],
        description=data["description"],
        table=data["table"],
        dataset=data["dataset"],
        config=data.get("config", {}),
        synthetic=data.get("synthetic", {}),
        path=path,
        in_all=bool(data.get("in_all", True)),
    )


@functools.lru_cache(maxsize=1)
def presets() -> dict[str, Preset]:
    """Every shipped preset by name."""
    return {p.stem: load_preset(p) for p in sorted(preset_dir("tasks").glob("*.toml"))}


def get_preset(name: str) -> Preset:
    found = presets().get(name)
    if found is None:
        raise BadInput(f"unknown task {name!r}; choose one of: {', '.join(presets())} (npidbench list)")
    return found


def family_of(preset: Preset) -> ModuleType:
    return families()[preset.family]
