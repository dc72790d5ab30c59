"""``report --format html``: one self-contained page (no external file, script or font) with every
table, the low-shot and linear-probe plots as inline SVG, and the provenance of each number."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

import pandas as pd

from npidbench import __version__
from npidbench.plots import figure_svg, linear_figure, lowshot_figure
from npidbench.report import RenderedTable

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}
td,th{padding:4px 10px;border-bottom:1px solid #ccc;text-align:right;white-space:nowrap}
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}
figure{margin:1em 0}figure svg{max-width:100%;height:auto}
.provenance td,.provenance th{font-size:.8em;text-align:left}
.meta{color:#666;font-size:.9em}.scroll{overflow-x:auto}
"""


def _table_html(frame: pd.DataFrame, css_class: str = "") -> str:
    table = frame.to_html(index=False, border=0, escape=True, classes=css_class or None)
    return f"<div class='scroll'>{table}</div>"


def provenance_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record behind the tables: what ran, on what, with which code."""
    rows = []
    for r in records:
        model, versions, data = r.get("model", {}), r.get("versions", {}), r.get("dataset", {})
        sha = model.get("sha256") or model.get("checkpoint", {}).get("sha256") or ""
        rows.append(
            {
                "Table": r.get("table", ""),
                "Model": model.get("name", ""),
                "Task": r.get("task", ""),
                "Protocol": r.get("protocol", ""),
                "Variant": r.get("variant", "") or "-",
                "Seeds": ",".join(str(s) for s in r.get("seeds", [])) or "-",
                "Checkpoint sha256": sha[:12],
                "Dataset": data.get("display", data.get("name", "")),
                "Created": r.get("created_at", ""),
                "npidbench": versions.get("npidbench", ""),
                "git": (versions.get("git_sha") or "")[:10],
                "torch": versions.get("torch", ""),
                "torchvision": versions.get("torchvision", ""),
            }
        )
    return pd.DataFrame(rows)


def render_page(tables: list[RenderedTable], records: list[dict[str, Any]]) -> str:
    """The whole report as one HTML document."""
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'><title>npidbench report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>npidbench report</h1>",
        f"<p class='meta'>npidbench {html.escape(__version__)}, generated "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}, {len(records)} records</p>",
    ]
    for table in tables:
        parts += [f"<h2>{html.escape(table.title)}</h2>", _table_html(table.frame)]
    figures = [("Low-shot SVM", lowshot_figure(records)), ("Linear probes per layer", linear_figure(records))]
    for caption, fig in figures:
        if fig is not None:
            parts += [f"<h2>{html.escape(caption)}</h2>", f"<figure>{figure_svg(fig)}</figure>"]
    parts += ["<h2>Provenance</h2>", _table_html(provenance_frame(records), "provenance"), "</body></html>"]
    return "\n".join(parts) + "\n"
