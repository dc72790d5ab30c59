"""Report plots: the low-shot curve (test mAP against k, log scale, min-max band over the
samples) and the linear probes per layer (top-1 against Feature1..5, AvgPool)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from npidbench.atomic import atomic_write
from npidbench.errors import BadInput

PLOT_FORMATS = (".png", ".svg")


def lowshot_curves(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Per model name, the latest low-shot result: k -> mean/min/max (records oldest first)."""
    curves: dict[str, dict[int, dict[str, float]]] = {}
    for record in records:
        per_k = record.get("metrics", {}).get("lowshot", {}).get("k")
        if record.get("table") == "voc-svm" and per_k:
            label = record["model"].get("name", "?")
            if record.get("variant"):
                label += f" [{record['variant']}]"
            curves[label] = {int(k): v for k, v in per_k.items()}
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return matplotlib, plt


def lowshot_figure(records: list[dict[str, Any]]):
    """The low-shot curves as a matplotlib figure (None without low-shot records)."""
    curves = lowshot_curves(records)
    if not curves:
        return None
    matplotlib, plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, per_k in curves.items():
        ks = sorted(per_k)
        mean = [per_k[k]["mean"] for k in ks]
        ax.plot(ks, mean, marker="o", label=label)
        ax.fill_between(ks, [per_k[k]["min"] for k in ks], [per_k[k]["max"] for k in ks], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({k for c in curves.values() for k in c}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("positives per class (k)")
    ax.set_ylabel("VOC07 test mAP (%)")
    ax.set_title("Low-shot SVM (band: min-max over samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


LINEAR_LAYERS = ("Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool")


def linear_curves(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per dataset label, per model (and protocol), top-1 per layer; the parts of a row merge
    and later records replace earlier ones (records oldest first)."""
    curves: dict[str, dict[str, dict[str, float]]] = {}
    for record in records:
        if record.get("table") != "linear":
            continue
        data = record["dataset"]
        dataset = data.get("name", "?") + (" (synthetic)" if data.get("synthetic") else "")
        label = record["model"].get("name", "?")
        if record.get("protocol") == "linear-cached":
            label += " [cached]"
        top1 = record.get("metrics", {}).get("top1", {})
        row = curves.setdefault(dataset, {}).setdefault(label, {})
        row.update({layer: v for layer, v in top1.items() if layer in LINEAR_LAYERS})
    return curves


def linear_figure(records: list[dict[str, Any]]):
    """Linear-probe top-1 against the layer, one panel per dataset (None without records)."""
    curves = linear_curves(records)
    if not curves:
        return None
    _, plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, (dataset, models) in zip(axes[0], sorted(curves.items()), strict=True):
        for label, per_layer in sorted(models.items()):
            layers = [layer for layer in LINEAR_LAYERS if layer in per_layer]
            ax.plot(layers, [per_layer[layer] for layer in layers], marker="o", label=label)
        ax.set_title(f"Linear probes, {dataset}")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    """Write a figure to PNG or SVG (by the suffix), atomically."""
    _, plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix[1:].lower()))
    finally:
        plt.close(fig)


def figure_svg(fig) -> str:
    """A figure as inline SVG text (for the self-contained HTML report)."""
    _, plt = _pyplot()
    buffer = io.StringIO()
    try:
        fig.savefig(buffer, format="svg")
    finally:
        plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def plot_lowshot(records: list[dict[str, Any]], path: Path) -> int:
    """Write the low-shot curves to PNG or SVG (chosen by the suffix); returns how many."""
    if path.suffix.lower() not in PLOT_FORMATS:
        raise BadInput(f"--lowshot-plot {path}: give a .png or .svg file name")
    fig = lowshot_figure(records)
    if fig is None:
        raise BadInput("no low-shot records to plot: run voc-svm or voc-lowshot first")
    save_figure(fig, path)
    return len(lowshot_curves(records))


def plot_linear(records: list[dict[str, Any]], path: Path) -> int:
    """Write the per-layer linear-probe plot to PNG or SVG; returns how many datasets."""
    if path.suffix.lower() not in PLOT_FORMATS:
        raise BadInput(f"--linear-plot {path}: give a .png or .svg file name")
    fig = linear_figure(records)
    if fig is None:
        raise BadInput(
            "no linear-probe records to plot: run linear-imagenet (or another linear preset) first"
        )
    save_figure(fig, path)
    return len(linear_curves(records))
