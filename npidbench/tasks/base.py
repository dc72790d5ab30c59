"""What every benchmark family gets (RunContext) and gives back (TaskOutput)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from npidbench.cache import FeatureCache
from npidbench.checkpoint import LoadedBackbone
from npidbench.config import config_to_dict
from npidbench.data.splits import DatasetSplit
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


def run_identity(ctx: RunContext, config: Any, world_size: int, **parts: Any) -> dict[str, Any]:
    """What makes two training runs the same run (their resume state is shared only between
    those): the task, the checkpoint, the settings, the world size, and ``parts`` (the data,
    the seed, the grid point...)."""
    assert ctx.backbone is not None
    return {
        "task": ctx.preset.name,
        "checkpoint": ctx.backbone.sha256,
        "branch": ctx.backbone.inspection.branch,
        "config": config_to_dict(config),
        "world_size": world_size,
        **parts,
    }


def split_record(name: str, train: DatasetSplit, test: DatasetSplit, **extra: Any) -> dict[str, Any]:
    """The record's ``dataset`` entry for a classification train / test pair."""
    return {
        "name": name,
        "display": train.display_name,
        "synthetic": train.synthetic,
        "root": str(train.root),
        "fingerprint": train.fingerprint,
        "train": {"split": train.split, "images": len(train)},
        "test": {"split": test.split, "images": len(test)},
        "classes": len(train.classes),
        **extra,
    }
