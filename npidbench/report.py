"""Render records as the tables of the mmselfsup NPID benchmark page, with pandas.

One table per benchmark and dataset, columns exactly as ARCHITECTURE.md lists them. A row is one
checkpoint (by sha256) under one protocol variant; records of the same row with different seeds
are averaged and shown as mean ± std; a rerun with the same seed replaces the older record.
Synthetic data is named in the table title; published reference rows (``--reference``) appear
only in tables of the matching real dataset.
"""

from __future__ import annotations

import fnmatch
import html
import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pandas as pd

from npidbench.errors import BadInput
from npidbench.precision import BF16, FP32

FORMATS = ("markdown", "csv", "json", "latex", "html")
DATASET_LABELS = {
    "imagenet": "ImageNet",
    "voc07": "VOC07",
    "places205": "Places205",
    "inat18": "iNaturalist2018",
    "voc12aug": "Pascal VOC 2012 + Aug",
    "voc0712": "Pascal VOC 2007 + 2012",
    "coco": "COCO2017",
    "cityscapes": "Cityscapes",
}


@dataclass(frozen=True)
class TableSpec:
    """A table of the page: its title, value columns and how a record fills them."""

    key: str
    title: str
    columns: tuple[str, ...]
    values: Callable[[dict[str, Any]], dict[str, Any]]
    references: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # dataset -> rows
    # Columns that depend on the record's seeds (mean ± std over seeds); the others are
    # deterministic and come from the latest record that has them. None: every column.
    seeded: frozenset[str] | None = None
    config_column: str = "Config"  # the semi-supervised table says "Pretrain Config"
    # What else tells rows of one checkpoint apart (the semi-supervised 1% and 10% splits).
    row_part: Callable[[dict[str, Any]], str] | None = None

    def is_seeded(self, column: str) -> bool:
        return self.seeded is None or column in self.seeded


def _knn_values(record: dict[str, Any]) -> dict[str, float | None]:
    top1 = record["metrics"].get("top1", {})
    return {f"k={k}": top1.get(str(k)) for k in (10, 20, 100, 200)}


LOWSHOT_COLUMNS = tuple(f"k={k}" for k in (1, 2, 4, 8, 16, 32, 64, 96))


def _voc_svm_values(record: dict[str, Any]) -> dict[str, Any]:
    """voc-svm-full fills Best Layer and SVM, voc-lowshot the k columns, voc-svm all of them."""
    metrics = record["metrics"]
    values: dict[str, Any] = {"Best Layer": metrics.get("best_layer"), "SVM": metrics.get("svm")}
    per_k = metrics.get("lowshot", {}).get("k", {})
    for column in LOWSHOT_COLUMNS:
        values[column] = per_k.get(column[2:], {}).get("mean")
    return values


LINEAR_COLUMNS = ("Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool")


def _linear_values(record: dict[str, Any]) -> dict[str, float | None]:
    """Top-1 per head: the features part fills Feature1..5, the avgpool part AvgPool."""
    top1 = record["metrics"].get("top1", {})
    return {column: top1.get(column) for column in LINEAR_COLUMNS}


SEMISUP_COLUMNS = ("Fine-tuned Config", "Top-1 (%)", "Top-5 (%)")


def _semisup_values(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record["metrics"]
    return {
        "Fine-tuned Config": metrics.get("finetuned_config"),
        "Top-1 (%)": metrics.get("top1"),
        "Top-5 (%)": metrics.get("top5"),
    }


def _semisup_split(record: dict[str, Any]) -> str:
    return record["dataset"].get("train", {}).get("labelled", {}).get("label", "")


def _segmentation_values(record: dict[str, Any]) -> dict[str, Any]:
    """Every trial's mIoU (a list: the cell shows mean ± std over trials and seeds)."""
    metrics = record["metrics"]
    return {"mIOU": metrics.get("trials") or metrics.get("mIoU")}


COCO_COLUMNS = ("mAP(Box)", "AP50(Box)", "AP75(Box)", "mAP(Mask)", "AP50(Mask)", "AP75(Mask)")


def _trial_values(record: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """column -> every trial's value (a list: mean ± std over trials and seeds)."""
    metrics = record["metrics"]
    trials = metrics.get("trials") or [metrics]
    out = {}
    for column, key in keys.items():
        values = [t.get(key) for t in trials if t.get(key) is not None]
        out[column] = values or None
    return out


def _detection_voc_values(record: dict[str, Any]) -> dict[str, Any]:
    return _trial_values(record, {"mAP": "mAP", "AP50": "AP50"})


def _detection_coco_values(record: dict[str, Any]) -> dict[str, Any]:
    return _trial_values(record, {column: column.replace("mAP", "AP") for column in COCO_COLUMNS})


# Published NPID rows (PROTOCOLS.md "Reference numbers": mmselfsup model zoo, ResNet-50, 200 ep).
_NPID_MODEL = "NPID (mmselfsup)"
_NPID_CONFIG = "npid_resnet50_8xb32-steplr-200e_in1k"

TABLES: dict[str, TableSpec] = {
    "knn": TableSpec(
        key="knn",
        title="kNN",
        columns=("k=10", "k=20", "k=100", "k=200"),
        values=_knn_values,
        references={
            "imagenet": [
                {
                    "Model": _NPID_MODEL,
                    "Config": _NPID_CONFIG,
                    "k=10": 42.9,
                    "k=20": 44.0,
                    "k=100": 43.2,
                    "k=200": 42.2,
                }
            ]
        },
    ),
    "voc-svm": TableSpec(
        key="voc-svm",
        title="SVM / Low-shot SVM",
        columns=("Best Layer", "SVM", *LOWSHOT_COLUMNS),
        values=_voc_svm_values,
        seeded=frozenset(LOWSHOT_COLUMNS),
        references={
            "voc07": [
                {
                    "Model": _NPID_MODEL,
                    "Config": _NPID_CONFIG,
                    "Best Layer": "feature5",
                    "SVM": 76.75,
                    **dict(
                        zip(
                            LOWSHOT_COLUMNS,
                            (26.96, 35.37, 44.48, 53.89, 60.39, 66.41, 71.48, 73.39),
                            strict=True,
                        )
                    ),
                }
            ]
        },
    ),
    "linear": TableSpec(
        key="linear",
        title="Linear Evaluation",
        columns=LINEAR_COLUMNS,
        values=_linear_values,
        references={
            "imagenet": [
                {
                    "Model": _NPID_MODEL,
                    "Config": _NPID_CONFIG,
                    **dict(zip(LINEAR_COLUMNS, (14.68, 31.98, 42.85, 56.95, 58.41, 57.97), strict=True)),
                }
            ],
            "places205": [
                {
                    "Model": _NPID_MODEL,
                    "Config": _NPID_CONFIG,
                    **dict(zip(LINEAR_COLUMNS[:5], (19.98, 34.86, 41.59, 48.43, 48.71), strict=True)),
                }
            ],
        },
    ),
    "semisup": TableSpec(
        key="semisup",
        title="Semi-Supervised Classification",
        columns=SEMISUP_COLUMNS,
        values=_semisup_values,
        config_column="Pretrain Config",
        row_part=_semisup_split,
        references={
            "imagenet": [
                {
                    "Model": f"{_NPID_MODEL}, older OpenSelfSup checkpoint",
                    "Pretrain Config": _NPID_CONFIG,
                    "Fine-tuned Config": f"in1k-{pct}_lr0.01-head100",
                    "Top-1 (%)": top1,
                    "Top-5 (%)": top5,
                }
                for pct, top1, top5 in (("1pct", 27.95, 54.37), ("10pct", 57.22, 81.39))
            ]
        },
    ),
    "detection-voc": TableSpec(
        key="detection-voc",
        title="Detection",
        columns=("mAP", "AP50"),
        values=_detection_voc_values,
        references={"voc0712": [{"Model": _NPID_MODEL, "Config": _NPID_CONFIG, "AP50": 79.52}]},
    ),
    "detection-coco": TableSpec(
        key="detection-coco",
        title="Detection and Instance Segmentation",
        columns=COCO_COLUMNS,
        values=_detection_coco_values,
        references={
            "coco": [
                {
                    "Model": _NPID_MODEL,
                    "Config": _NPID_CONFIG,
                    **dict(zip(COCO_COLUMNS, (38.5, 57.7, 42.0, 34.6, 54.8, 37.1), strict=True)),
                }
            ]
        },
    ),
    "segmentation": TableSpec(
        key="segmentation",
        title="Segmentation",
        columns=("mIOU",),
        values=_segmentation_values,
        references={"voc12aug": [{"Model": _NPID_MODEL, "Config": _NPID_CONFIG, "mIOU": 65.45}]},
    ),
}


@dataclass
class RenderedTable:
    title: str
    frame: pd.DataFrame


def select(
    records: list[dict[str, Any]],
    model: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """Filter records; each filter is a case-insensitive glob (``--model 'npid*'``)."""

    def match(pattern: str | None, *candidates: str) -> bool:
        if pattern is None:
            return True
        pattern = pattern.lower()
        return any(fnmatch.fnmatch(c.lower(), pattern) for c in candidates if c)

    return [
        r
        for r in records
        if match(model, r["model"].get("name", ""))
        and match(task, r.get("task", ""), r.get("family", ""), r.get("table", ""))
        and match(dataset, r["dataset"].get("name", ""), r["dataset"].get("display", ""))
    ]


def record_precision(record: dict[str, Any]) -> str:
    """The precision a record's forward passes ran in. Records written before it was recorded:
    linear probes (augmented), fine-tuning and segmentation autocast to bf16 on CUDA, all else
    and every CPU run was fp32."""
    details = record.get("details", {})
    if "precision" in details:
        return details["precision"]
    autocast = record.get("family") in ("semisup", "segmentation") or (
        record.get("family") == "linear" and record.get("protocol") != "linear-cached"
    )
    return BF16 if autocast and str(details.get("device", "cpu")).startswith("cuda") else FP32


def _row_identity(record: dict[str, Any]) -> str:
    """The checkpoint a row stands for: its sha256 (or the features' sha256)."""
    model = record["model"]
    return model.get("sha256") or model.get("checkpoint", {}).get("sha256") or model.get("name", "")


def build_tables(records: list[dict[str, Any]], reference: bool = False) -> list[RenderedTable]:
    """Group records into the benchmark tables that have data."""
    groups: dict[tuple, dict[str, Any]] = {}
    for record in records:
        spec = TABLES.get(record.get("table", ""))
        if spec is None:
            continue
        data = record["dataset"]
        table_key = (spec.key, data.get("name"), bool(data.get("synthetic")))
        row_key = RowKey(
            sha=_row_identity(record),
            branch=record["model"].get("branch") or "",
            protocol=record.get("protocol", ""),
            variant=record.get("variant", ""),
            data=data.get("fingerprint", ""),
            config=record["model"].get("config", "-"),
            part=spec.row_part(record) if spec.row_part else "",
            precision=record_precision(record),
        )
        rows = groups.setdefault(table_key, {})
        rows.setdefault(row_key, []).append(record)  # oldest first (sorted input)
    tables = []
    for (table, dataset, synthetic), rows in sorted(
        groups.items(), key=lambda kv: (list(TABLES).index(kv[0][0]), kv[0][1], kv[0][2])
    ):
        spec = TABLES[table]
        names = _display_names(rows)
        body = []
        for row_key, runs in rows.items():
            cells = {"Model": names[row_key], spec.config_column: runs[-1]["model"].get("config", "-")}
            for column in spec.columns:
                cells[column] = _aggregate(list(_column_values(spec, column, runs).values()))
            body.append(cells)
        body.sort(key=lambda c: (c["Model"], c[spec.config_column], _natural(str(c[spec.columns[0]]))))
        if reference and not synthetic:
            body.extend(
                {
                    **ref,
                    **{c: ref[c] if isinstance(ref.get(c), str) else _fmt(ref.get(c)) for c in spec.columns},
                }
                for ref in spec.references.get(dataset, [])
            )
        label = DATASET_LABELS.get(dataset, dataset)
        title = f"{label} {spec.title}" + (" (synthetic data)" if synthetic else "")
        tables.append(
            RenderedTable(title, pd.DataFrame(body, columns=["Model", spec.config_column, *spec.columns]))
        )
    return tables


def _column_values(spec: TableSpec, column: str, runs: list[dict[str, Any]]) -> dict[tuple, Any]:
    """One value per seed (a rerun with the same seed replaces the older value); columns that
    do not depend on seeds keep only the latest value. Records without the column are skipped,
    so the parts of a row (voc-svm-full, voc-lowshot) fill it together."""
    values: dict[tuple, Any] = {}
    for record in runs:
        value = spec.values(record).get(column)
        if value is not None:
            values[tuple(record.get("seeds") or ()) if spec.is_seeded(column) else ()] = value
    return values


class RowKey(NamedTuple):
    """What makes two records different rows (ARCHITECTURE.md "Records and grouping")."""

    sha: str
    branch: str
    protocol: str
    variant: str
    data: str  # dataset content fingerprint
    config: str
    part: str = ""  # e.g. the semi-supervised split (1% and 10% rows of one checkpoint)
    precision: str = "fp32"  # bf16 autocast changes the numbers: its rows are kept apart, named


def _display_names(rows: dict[RowKey, list[dict[str, Any]]]) -> dict[RowKey, str]:
    """Row names. Rows never merge: where several share a name, what tells them apart is added
    (short sha, branch, dataset fingerprint); protocol variants are always named."""
    base = {key: runs[-1]["model"].get("name", "?") for key, runs in rows.items()}
    by_name: dict[str, list[RowKey]] = {}
    for key, name in base.items():
        by_name.setdefault(name, []).append(key)
    out = {}
    for key, name in base.items():
        peers = by_name[name]
        parts = [name]
        if len({k.sha for k in peers}) > 1:
            parts.append(f"({key.sha[:8]})")
        if len({k.branch for k in peers if k.sha == key.sha}) > 1:
            parts.append(f"[branch {key.branch}]")
        if len({k.data for k in peers if k.sha == key.sha}) > 1:
            parts.append(f"[data {key.data[:8]}]")
        if key.protocol and key.protocol not in _DEFAULT_PROTOCOLS:
            parts.append(f"[{key.protocol}]")
        if key.variant:
            parts.append(f"[{key.variant}]")
        if key.precision != FP32:
            parts.append("[bf16]")
        out[key] = " ".join(parts)
    return out


_DEFAULT_PROTOCOLS = {
    "npid-knn",
    "voc07-svm",
    "linear-mhead",
    "semisup-finetune",
    "faster-rcnn-c4",
    "mask-rcnn-fpn",
    "fcn-d8",
}


def _natural(text: str) -> tuple:
    """Sort key that puts "1pct" before "10pct"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _aggregate(values: list[Any]) -> str:
    flat = [item for v in values for item in (v if isinstance(v, list) else [v])]  # trials
    present = [v for v in flat if v is not None]
    if not present:
        return "-"
    if any(isinstance(v, str) for v in present):  # e.g. Best Layer
        return " / ".join(dict.fromkeys(str(v) for v in present))
    if len(present) == 1:
        return _fmt(present[0])
    return f"{statistics.mean(present):.2f} ± {statistics.stdev(present):.2f}"


def _markdown(frame: pd.DataFrame) -> str:
    # Cells are pre-formatted strings ("42.90 ± 0.12"): no number parsing, numbers right-aligned.
    align = [
        "left" if frame[c].astype(str).str.contains("[A-Za-z]").any() else "right" for c in frame.columns
    ]
    align[:2] = ["left", "left"]
    return frame.to_markdown(index=False, disable_numparse=True, colalign=align)


def render(tables: list[RenderedTable], fmt: str) -> str:
    """Text of the tables in ``fmt`` (markdown, csv, json, latex or html)."""
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt} is not supported; choose one of {', '.join(FORMATS)}")
    if fmt == "markdown":
        return "\n".join(f"### {t.title}\n\n{_markdown(t.frame)}\n" for t in tables)
    if fmt == "csv":
        frames = [t.frame.assign(Table=t.title)[["Table", *t.frame.columns]] for t in tables]
        return "\n".join(f.to_csv(index=False) for f in frames)
    if fmt == "json":
        return json.dumps(
            [
                {
                    "title": t.title,
                    "columns": list(t.frame.columns),
                    "rows": t.frame.to_dict(orient="records"),
                }
                for t in tables
            ],
            indent=2,
        )
    if fmt == "latex":
        return "\n".join(f"% {t.title}\n" + t.frame.to_latex(index=False, caption=t.title) for t in tables)
    sections = "\n".join(
        f"<h2>{html.escape(t.title)}</h2>\n{t.frame.to_html(index=False, border=0)}" for t in tables
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>npidbench report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ccc;text-align:right}"
        "td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}</style>"
        f"</head><body><h1>npidbench report</h1>\n{sections}\n</body></html>\n"
    )
