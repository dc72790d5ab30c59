"""What a benchmark table of the report is (``TableSpec``) and the helpers families use to
declare theirs. Each family brings its tables (``TaskFamily.tables``); ``npidbench.report``
renders every registered one, so a plugin family's records reach the report as a built-in's do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The published NPID rows (PROTOCOLS.md "Reference numbers": mmselfsup model zoo, ResNet-50, 200 ep).
NPID_MODEL = "NPID (mmselfsup)"
NPID_CONFIG = "npid_resnet50_8xb32-steplr-200e_in1k"


@dataclass(frozen=True)
class TableSpec:
    """A table of the page: its title, value columns and how a record fills them."""

    key: str
    title: str
    columns: tuple[str, ...]
    values: Callable[[dict[str, Any]], dict[str, Any]]
    # The protocol the table stands for: rows under another protocol are named ("[linear-cached]").
    default_protocol: str
    references: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # dataset -> rows
    # Columns that depend on the record's seeds (mean ± std over seeds); the others are
    # deterministic and come from the latest record that has them. None: every column.
    seeded: frozenset[str] | None = None
    config_column: str = "Config"  # the semi-supervised table says "Pretrain Config"
    # What else tells rows of one checkpoint apart (the semi-supervised 1% and 10% splits).
    row_part: Callable[[dict[str, Any]], str] | None = None

    def is_seeded(self, column: str) -> bool:
        return self.seeded is None or column in self.seeded


def npid_reference(columns: tuple[str, ...], values: tuple[Any, ...], **extra: Any) -> dict[str, Any]:
    """A published NPID reference row: ``columns`` filled with ``values`` in order."""
    return {"Model": NPID_MODEL, "Config": NPID_CONFIG, **dict(zip(columns, values, strict=True)), **extra}


def trial_values(record: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """column -> every trial's value of metric ``keys[column]`` (a list: the cell shows mean ± std
    over trials and seeds). Records of one trial may hold the metrics directly."""
    metrics = record["metrics"]
    trials = metrics.get("trials") or [metrics]
    out = {}
    for column, key in keys.items():
        values = [t.get(key) for t in trials if t.get(key) is not None]
        out[column] = values or None
    return out
