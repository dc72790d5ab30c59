"""benchmarks/regenerate.py rebuilds the speed table from the kept benchmark outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("regenerate", REPO / "benchmarks" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
