"""The low-shot curve: test mAP against k (log scale) with the min-max band over the samples."""

from __future__ import annotations

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


def plot_lowshot(records: list[dict[str, Any]], path: Path) -> int:
    """Write the curves to PNG or SVG (chosen by the suffix), atomically; returns how many."""
    if path.suffix.lower() not in PLOT_FORMATS:
        raise BadInput(f"--lowshot-plot {path}: give a .png or .svg file name")
    curves = lowshot_curves(records)
    if not curves:
        raise BadInput("no low-shot records to plot: run voc-svm or voc-lowshot first")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix[1:].lower()))
    finally:
        plt.close(fig)
    return len(curves)
