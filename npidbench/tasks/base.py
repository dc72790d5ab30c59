"""What a benchmark family is (TaskFamily), what it gets (RunContext) and gives back (TaskOutput)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npidbench.backbones import Backbone
from npidbench.cache import CachedFeatures, FeatureCache
from npidbench.checkpoint import LoadedBackbone
from npidbench.config import config_to_dict
from npidbench.data import DATASETS, dataset_parts
from npidbench.data.images import EvalTransform
from npidbench.data.splits import DatasetSplit
from npidbench.errors import BadInput
from npidbench.features import ExtractOptions, ExtractStats, extract
from npidbench.tables import TableSpec


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
    # Run by `npidbench run all`: True, False (parts of another preset, alternative protocols),
    # or the backbone families it is run for (e.g. the ViT-era linear protocol: vit, convnext).
    in_all: bool | tuple[str, ...] = True
    # Wall seconds of the [synthetic] profile for the main job's ResNet-18 on the project's slower
    # 2-core AMD EPYC (README): what `run all`'s progress line scales into its remaining time. None: not measured.
    synthetic_seconds: float | None = None
    # [synthetic_protocol.VALUE]: overrides applied on top of [synthetic] when one of the family's
    # protocol_keys takes VALUE (e.g. the linear probe's mode=cached, whose rows cost nothing to
    # revisit, so it keeps the protocol's epochs that the augmented profile cuts).
    synthetic_protocol: dict[str, dict[str, Any]] = field(default_factory=dict)

    def runs_in_all(self, backbone_family: str) -> bool:
        return self.in_all if isinstance(self.in_all, bool) else backbone_family in self.in_all


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

    @property
    def model(self) -> LoadedBackbone:
        """The checkpoint's backbone; a family that needs one says so when run without it."""
        if self.backbone is None:
            raise BadInput(
                f"{self.preset.name} needs a checkpoint (CKPT); --features-dir is for the SVM presets"
            )
        return self.backbone

    def features(
        self, split: DatasetSplit, transform: EvalTransform, layers: tuple[str, ...] | list[str]
    ) -> dict[str, CachedFeatures]:
        """Frozen features of ``layers`` for every image of ``split`` (one forward pass, cached)."""
        return extract(
            self.model, split, transform, tuple(layers), self.cache, self.extract, self.extract_stats
        )


@dataclass
class TaskOutput:
    """A family's result: metrics for the table plus everything else worth recording."""

    metrics: dict[str, Any]
    dataset: dict[str, Any]
    protocol: str  # the protocol variant, named in the report when it is not the default
    seeds: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None  # identity of features given without a checkpoint


@dataclass(frozen=True)
class TaskFamily:
    """A benchmark family as it registers (built in, or through the ``npidbench.tasks`` entry-point
    group): presets name it by ``name`` and fill ``config`` from their TOML; ``run`` makes the
    numbers; ``tables`` are where its records land in the report."""

    name: str
    description: str  # one line, shown by `npidbench list`
    config: type  # a frozen dataclass, every field with a default (presets override some)
    run: Callable[[RunContext, Any], TaskOutput]
    tables: tuple[TableSpec, ...]
    datasets: tuple[str, ...]  # what its presets may name as ``dataset`` (keys of data.DATASETS)
    # Settings the protocol name already says (linear's mode -> "linear-cached"): not a variant.
    protocol_keys: tuple[str, ...] = ()
    accepts_features_dir: bool = False  # runs on --features-dir instead of a checkpoint (SVM)
    # Preset TOML files a plugin ships beside its module (the built-in presets are tasks/*.toml).
    preset_files: tuple[Path, ...] = ()
    # (config, backbone) -> why this config cannot run on that backbone, or None: for a protocol
    # written for one backbone family (semi-supervised ResNet fine-tuning). Backbone.supports
    # says which families run at all.
    backbone_check: Callable[[Any, Backbone], str | None] | None = None

    def refusal(self, config: Any, backbone: Backbone) -> str | None:
        """Why ``backbone`` cannot run this family with ``config`` (None: it can)."""
        try:
            backbone.check_supports(self.name)
        except BadInput as exc:
            return str(exc)
        return self.backbone_check(config, backbone) if self.backbone_check is not None else None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise BadInput(f"task family {self.name!r} is not valid: {'; '.join(problems)}")

    def problems(self) -> list[str]:
        """What is wrong with the declaration (empty: nothing)."""
        found = []
        if not isinstance(self.name, str) or not self.name.strip() or " " in self.name:
            found.append("name must be a non-empty word")
        if not isinstance(self.description, str) or not self.description.strip():
            found.append("description must be a non-empty line")
        if not (dataclasses.is_dataclass(self.config) and self.config.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            found.append("config must be a frozen dataclass")
        else:
            fields = dataclasses.fields(self.config)
            no_default = [
                f.name
                for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            if no_default:
                found.append(f"config fields without a default: {', '.join(no_default)}")
            unknown = set(self.protocol_keys) - {f.name for f in fields}
            if unknown:
                found.append(f"protocol_keys not in config: {', '.join(sorted(unknown))}")
        if not callable(self.run):
            found.append("run must be callable")
        if not self.tables or not all(isinstance(t, TableSpec) for t in self.tables):
            found.append("tables must be a non-empty tuple of TableSpec")
        unknown_data = [d for d in self.datasets if any(p not in DATASETS for p in dataset_parts(d))]
        missing = [str(f) for f in self.preset_files if not Path(f).is_file()]
        if missing:
            found.append(f"preset files not found: {', '.join(missing)}")
        if not self.datasets or unknown_data:
            found.append(
                f"datasets must name known datasets ({', '.join(DATASETS)}), got {list(self.datasets)}"
            )
        return found

    @property
    def table_keys(self) -> tuple[str, ...]:
        return tuple(t.key for t in self.tables)


def run_identity(ctx: RunContext, config: Any, world_size: int, **parts: Any) -> dict[str, Any]:
    """What makes two training runs the same run (their resume state is shared only between
    those): the task, the checkpoint, the settings, the world size, and ``parts`` (the data,
    the seed, the grid point...)."""
    return {
        "task": ctx.preset.name,
        "checkpoint": ctx.model.sha256,
        "branch": ctx.model.inspection.branch,
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
