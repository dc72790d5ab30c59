"""Render records as the tables of the mmselfsup NPID benchmark page, with pandas.

One table per benchmark and dataset, columns exactly as ARCHITECTURE.md lists them. A row is one
checkpoint (by sha256) under one protocol variant; records of the same row with different seeds
are averaged and shown as mean ± std; a rerun with the same seed replaces the older record.
Synthetic data is named in the table title; published reference rows (``--reference``) appear
only in tables of the matching real dataset. The tables are those the registered families bring
(``npidbench.tasks.tables()``); the formats are the keys of ``RENDERERS``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from npidbench.errors import BadInput
from npidbench.precision import BF16, FP32
from npidbench.tables import TableSpec

if TYPE_CHECKING:
    import pandas as pd

DATASET_LABELS = {
    "imagenet": "ImageNet",
    "voc07": "VOC07",
    "places205": "Places205",
    "inat18": "iNaturalist2018",
    "voc12aug": "Pascal VOC 2012 + Aug",
    "voc0712": "Pascal VOC 2007 + 2012",
    "coco": "COCO2017",
    "cityscapes": "Cityscapes",
    "ade20k": "ADE20K",
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
    import pandas as pd

    specs = registered_tables()
    groups: dict[tuple, dict[str, Any]] = {}
    for record in records:
        spec = specs.get(record.get("table", ""))
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
        groups.items(), key=lambda kv: (list(specs).index(kv[0][0]), kv[0][1], kv[0][2])
    ):
        spec = specs[table]
        names = _display_names(rows, spec.default_protocol)
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


def _display_names(rows: dict[RowKey, list[dict[str, Any]]], default_protocol: str) -> dict[RowKey, str]:
    """Row names. Rows never merge: where several share a name, what tells them apart is added
    (short sha, branch, dataset fingerprint); a protocol other than the table's and protocol
    variants are always named."""
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
        if key.protocol and key.protocol != default_protocol:
            parts.append(f"[{key.protocol}]")
        if key.variant:
            parts.append(f"[{key.variant}]")
        if key.precision != FP32:
            parts.append("[bf16]")
        out[key] = " ".join(parts)
    return out


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


@dataclass(frozen=True)
class ReportInput:
    """What a renderer gets: the tables, the records behind them, and the plot files written
    beside the report (linked from ``out``'s folder, where the text goes; None: stdout)."""

    tables: list[RenderedTable]
    records: list[dict[str, Any]]
    plots: tuple[tuple[str, Path], ...] = ()  # (caption, image file)
    out: Path | None = None


def registered_tables() -> dict[str, TableSpec]:
    """The tables of every registered family (imported here: the families load torch)."""
    from npidbench.tasks import tables

    return tables()


def _markdown_report(report: ReportInput) -> str:
    text = "\n".join(f"### {t.title}\n\n{_markdown(t.frame)}\n" for t in report.tables)
    if report.out is not None:  # plots written beside the report file are linked
        for caption, plot in report.plots:
            link = os.path.relpath(plot.resolve(), report.out.resolve().parent)
            text += f"\n### {caption}\n\n![{caption}]({link})\n"
    return text


def _csv_report(report: ReportInput) -> str:
    frames = [t.frame.assign(Table=t.title)[["Table", *t.frame.columns]] for t in report.tables]
    return "\n".join(f.to_csv(index=False) for f in frames)


def _json_report(report: ReportInput) -> str:
    return json.dumps(
        [
            {"title": t.title, "columns": list(t.frame.columns), "rows": t.frame.to_dict(orient="records")}
            for t in report.tables
        ],
        indent=2,
    )


def _latex_report(report: ReportInput) -> str:
    return "\n".join(f"% {t.title}\n" + t.frame.to_latex(index=False, caption=t.title) for t in report.tables)


def _html_report(report: ReportInput) -> str:
    from npidbench.report_html import render_page  # matplotlib only when a page is drawn

    return render_page(report.tables, report.records)


Renderer = Callable[[ReportInput], str]
RENDERERS: dict[str, Renderer] = {
    "markdown": _markdown_report,
    "csv": _csv_report,
    "json": _json_report,
    "latex": _latex_report,
    "html": _html_report,  # one self-contained page: tables, plots as inline SVG, provenance
}
FORMATS = tuple(RENDERERS)


def renderer(fmt: str) -> Renderer:
    found = RENDERERS.get(fmt)
    if found is None:
        raise BadInput(f"--format {fmt} is not supported; choose one of {', '.join(FORMATS)}")
    return found


def render(tables: list[RenderedTable], fmt: str, records: Sequence[dict[str, Any]] = ()) -> str:
    """Text of already built tables in ``fmt`` (``records``: those behind them, for html)."""
    return renderer(fmt)(ReportInput(tables, list(records)))


# Plots a report can draw beside itself: kind -> (caption, function writing the image file).
def _plot_functions() -> dict[str, tuple[str, Callable[[list[dict[str, Any]], Path], int]]]:
    from npidbench.plots import plot_linear, plot_lowshot

    return {"lowshot": ("Low-shot SVM", plot_lowshot), "linear": ("Linear probes per layer", plot_linear)}


def report(
    records: list[dict[str, Any]],
    fmt: str = "markdown",
    *,
    reference: bool = False,
    plots: dict[str, Path] | None = None,
    out: Path | None = None,
    source: str = "",
) -> str:
    """The report of ``records`` in ``fmt``: the tables, and the plots of ``plots`` (kind
    "lowshot" / "linear" -> image file) drawn first (markdown written to ``out`` links them).

    Raises:
        BadInput: an unknown format or plot kind, nothing to plot, or no record for any table.
    """
    render_as = renderer(fmt)
    functions = _plot_functions()
    drawn = []
    for kind, path in (plots or {}).items():
        if kind not in functions:
            raise BadInput(f"no plot {kind!r}; choose one of {', '.join(functions)}")
        caption, draw = functions[kind]
        draw(records, path)
        drawn.append((caption, path))
    tables = build_tables(records, reference=reference)
    if not tables:
        where = f" in {source}" if source else ""
        raise BadInput(f"no records to report{where} (run a task first, or relax the filters)")
    specs = registered_tables()
    behind = [r for r in records if r.get("table") in specs]
    return render_as(ReportInput(tables, behind, tuple(drawn), out))
