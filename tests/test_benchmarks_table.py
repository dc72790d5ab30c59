"""benchmarks/regenerate.py rebuilds the speed table from the kept benchmark outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _module():
    return load_benchmark("regenerate")


def test_table_from_kept_outputs_and_marked_hand_measured_rows(tmp_path, monkeypatch):
    regenerate = _module()
    readme = tmp_path / "README.md"
    readme.write_text(
        f"intro\n{regenerate.START}\n| what | against | figure | machine | command |\n|---|---|---|---|---|\n"
        "| extraction | bare | 0.955x | 2 cores | `python benchmarks/extraction_throughput.py` |\n"
        f"{regenerate.END}\nNotes stay.\n"
    )
    results = tmp_path / "results"
    results.mkdir()
    output = {
        "five_heads_over_single_head": {"feature5": 1.054, "avgpool": 1.08},
        "median_step_s": {"five-heads": 1.169, "feature5": 1.123, "avgpool": 1.112},
    }
    kept = {"commands": ["linear_heads.py --rounds 7"], "machine": "2 cores", "outputs": [output]}
    (results / "linear-heads.json").write_text(json.dumps(kept))
    monkeypatch.setattr(regenerate, "README", readme)
    monkeypatch.setattr(regenerate, "RESULTS", results)
    regenerate.rewrite_readme()
    regenerate.rewrite_readme()  # idempotent: the hand-measured note is added once
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("Notes stay.\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "what" not in line]
    assert len(rows) == len(regenerate.BENCHMARKS)
    linear = next(r for r in rows if "linear_heads.py" in r)
    assert "1.054x the Feature5 probe, 1.08x the AvgPool probe" in linear and "2 cores" in linear
    extraction = next(r for r in rows if "extraction_throughput.py" in r)
    assert "0.955x" in extraction and extraction.count("measured before regenerate.py") == 1
    assert sum("not measured yet" in r for r in rows) == len(regenerate.BENCHMARKS) - 2


def _scaling():
    return load_benchmark("scaling")


def test_scaling_points_exponents_and_their_table(tmp_path, monkeypatch):
    """Two real points of two stages (tiny sizes), the fitted exponent, and the README table."""
    scaling = _scaling()
    points = []
    for size in (2_000, 8_000):
        work = tmp_path / f"places-{size}"
        work.mkdir()
        points.append({"size": size, **scaling.POINTS["index-places"](size, work)})
    assert [p["entries"] for p in points] == [2_000, 8_000] and all(p["seconds"] > 0 for p in points)
    report = scaling.POINTS["report"](3, tmp_path / "report")
    assert report["rows"] == 3
    # the exponent: slope of log seconds on log N, over the sizes from fit_from up
    made_up = [{"size": n, "seconds": 2e-3 * n**1.5} for n in (10, 100, 1000)]
    assert scaling.exponent(made_up, 0) == 1.5
    assert scaling.exponent(made_up[:1] + [{"size": 100, "seconds": 0.2}, {"size": 1000, "seconds": 2.0}], 100) == 1.0
    assert scaling.exponent(made_up, 1000) is None  # one point is no slope
    regenerate = _module()
    readme = tmp_path / "README.md"
    readme.write_text(
        f"{regenerate.START}\n{regenerate.END}\n{regenerate.SCALING_START}\nstale rows\n{regenerate.SCALING_END}\nend\n"
    )
    results = tmp_path / "results"
    results.mkdir()
    stages = {"index-places": {"what": "list", "points": points, "exponent": 1.01, "fit_from": 0}}
    kept = {
        "measured_at": "2026-12-01T00:00:00",
        "machine": "2 cores",
        "commands": ["scaling.py --plot results/scaling.png"],
        "outputs": [{"stages": stages}],
    }
    (results / "scaling.json").write_text(json.dumps(kept))
    monkeypatch.setattr(regenerate, "README", readme)
    monkeypatch.setattr(regenerate, "RESULTS", results)
    regenerate.rewrite_readme()
    text = readme.read_text()
    assert "stale rows" not in text and text.endswith("end\n")
    row = next(line for line in text.splitlines() if line.startswith("| index-places"))
    assert "2,000: " in row and "8,000: " in row and "1.01 (from 0)" in row
    assert "![cost curves](results/scaling.png)" in text
    real = (REPO / "benchmarks" / "README.md").read_text()
    assert regenerate.SCALING_START in real and regenerate.SCALING_END in real
    # one more size measured into the kept sweep (its own process), refitted and marked
    kept["outputs"][0]["threads"] = 1
    (results / "scaling.json").write_text(json.dumps(kept))
    scaling.add_points(results / "scaling.json", "index-places", [4_000], 1, None)
    entry = json.loads((results / "scaling.json").read_text())["outputs"][0]["stages"]["index-places"]
    assert [p["size"] for p in entry["points"]] == [2_000, 4_000, 8_000] and entry["added"] == [4_000]
    assert entry["exponent"] == scaling.exponent(entry["points"], 0) != 1.01
    cpu = entry["points"][1]["cpu"]  # an added point names its CPU: points compare only on one
    assert cpu == scaling.cpu_model() and cpu and "cpu" not in entry["points"][0]
    regenerate.rewrite_readme()
    assert f"4,000 (added, {cpu}): " in readme.read_text()
    with pytest.raises(SystemExit, match="1 threads, not 2"):
        scaling.add_points(results / "scaling.json", "index-places", [4_000], 2, None)


def test_compare_records_ignores_timings_and_names_every_changed_number(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "compare_records", REPO / "benchmarks" / "compare_records.py"
    )
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    record = {
        "task": "knn",
        "protocol": "npid-knn",
        "id": "a",
        "created_at": "t0",
        "timings": {"total_s": 1.0},
        "metrics": {"top1": {"20": 41.5}},
        "details": {"history": [{"loss": 1.0, "images_per_s": 10.0}]},
    }
    before, after = tmp_path / "before", tmp_path / "after"
    for folder in (before, after):
        folder.mkdir()
    (before / "a.json").write_text(json.dumps(record))
    rerun = {**record, "id": "b", "created_at": "t1", "timings": {"total_s": 2.0}}
    rerun["details"] = {"history": [{"loss": 1.0, "images_per_s": 12.0}]}
    (after / "b.json").write_text(json.dumps(rerun))
    sys.argv = ["compare_records.py", str(before), str(after)]
    assert compare.main() == 0
    assert "knn [npid-knn]: identical" in capsys.readouterr().out
    (after / "b.json").write_text(json.dumps({**rerun, "metrics": {"top1": {"20": 41.6}}}))
    assert compare.main() == 1
    assert "knn [npid-knn].metrics.top1.20: 41.5 -> 41.6" in capsys.readouterr().out
