"""`report --format html`: one self-contained page with tables, plots and provenance, checked in
a real headless browser (Debian's chromium; skipped where it is not installed)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from npidbench.cli import main
from npidbench.report import build_tables
from npidbench.report_html import render_page
from npidbench.results import ResultStore

from test_results import make_record


def _records() -> list[dict]:
    knn = make_record(name="npid", sha="a" * 64)
    linear = make_record(name="npid", sha="a" * 64, protocol="linear-mhead")
    linear.update(task="linear-imagenet", family="linear", table="linear", seeds=[0])
    linear["metrics"] = {"top1": {f"Feature{i}": 10.0 * i for i in range(1, 6)} | {"AvgPool": 44.0}}
    svm = make_record(name="npid", sha="a" * 64, protocol="voc07-svm")
    svm.update(task="voc-svm", family="voc-svm", table="voc-svm", seeds=[0])
    svm["dataset"]["name"] = "voc07"
    ks = (1, 2, 4, 8, 16, 32, 64, 96)
    svm["metrics"] = {
        "best_layer": "Feature3",
        "svm": 50.0,
        "lowshot": {
            "k": {str(k): {"mean": 10.0 + k / 3, "min": 9.0 + k / 3, "max": 11.0 + k / 3} for k in ks}
        },
    }
    return [knn, linear, svm]


def test_page_is_self_contained_with_tables_plots_and_provenance():
    records = _records()
    page = render_page(build_tables(records), records)
    assert page.count("<table") == 4  # kNN, linear, VOC SVM, provenance
    assert page.count("<svg") == 2  # low-shot curve and linear probes per layer
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)  # nothing fetched
    assert "<script" not in page and "<link" not in page
    for text in ("ImageNet Linear Evaluation (synthetic data)", "Provenance", "a" * 12, "voc07-svm"):
        assert text in page


def test_report_command_writes_html(tmp_path):
    store = ResultStore(tmp_path / "results")
    for record in _records():
        store.write(record)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "report",
                "--results",
                str(tmp_path / "results"),
                "--format",
                "html",
                "--out",
                str(tmp_path / "r.html"),
            ]
        )
    assert exit_info.value.code == 0
    assert (tmp_path / "r.html").read_text().count("<svg") == 2


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    pytest.skip("no chromium here (.ci/run installs Debian's chromium package)")


def test_page_renders_in_a_headless_browser(tmp_path):
    browser = _chromium()
    records = _records()
    page = tmp_path / "report.html"
    page.write_text(render_page(build_tables(records), records))
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table") == 4 and dom.stdout.count("<svg") == 2
    assert "iNaturalist" not in dom.stdout and "kNN (synthetic data)" in dom.stdout
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,1800", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1800, 1200)
    dark = (pixels < 128).mean()
    assert 0.002 < dark < 0.5  # text, lines and plots drawn; not a blank or black page
