"""What every benchmark family gets (RunContext) and gives back (TaskOutput)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from npidbench.cache import FeatureCache
from npidbench.checkpoint import LoadedBackbone
from npidbench.features import ExtractOptions, ExtractStats


@dataclass(frozen=True)
class Preset:
    """A benchmark as users name it: a family plus protocol settings (tasks/<name>.toml)."""

    name: str
    family: str
    description: str
    table: str
    dataset: str
    config: dict[str, Any]
    synthetic: dict[str, Any]  # overrides applied on the embedded synthetic data
    path: Path
    in_all: bool = True  # run by `npidbench run all` (false for parts of another preset, options)


@dataclass
class RunContext:
    """Inputs shared by all families: the backbone, data location, cache, device options."""

    preset: Preset
    backbone: LoadedBackbone | None
    data_root: Path | None
    cache: FeatureCache
    extract: ExtractOptions
    extract_stats: ExtractStats = field(default_factory=ExtractStats)
    features_dir: Path | None = None  # precomputed features instead of a backbone (SVM presets)
    previous_records: Callable[[], list[dict[str, Any]]] = list  # the results folder's records


@dataclass
class TaskOutput:
    """A family's result: metrics for the table plus everything else worth recording."""

    metrics: dict[str, Any]
    dataset: dict[str, Any]
    protocol: str  # the protocol variant, named in the report when it is not the default
    seeds: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None  # identity of features given without a checkpoint


class TaskFamily(Protocol):
    """A benchmark family module: a frozen Config dataclass and run()."""

    name: str
    description: str
    Config: type

    def run(self, ctx: RunContext, config: Any) -> TaskOutput: ...
