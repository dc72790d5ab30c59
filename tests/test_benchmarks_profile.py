"""benchmarks/main_job_profile.py: its stage runner keeps a failed stage's exit status, and its
summary of py-spy's raw samples ranks the right functions."""

from __future__ import annotations

import os

import pytest

from helpers import load_benchmark


def test_top_costs_from_raw_samples(tmp_path):
    raw = tmp_path / "stage.raw"
    raw.write_text(
        "main (npidbench/cli.py:10);run (npidbench/pretrain/train.py:342);"
        "step (npidbench/pretrain/train.py:472);_engine_run_backward (torch/autograd/graph.py:1072) 60\n"
        "main (npidbench/cli.py:10);run (npidbench/pretrain/train.py:350);"
        "step (npidbench/pretrain/train.py:447);_conv_forward (torch/nn/modules/conv.py:560) 30\n"
        "main (npidbench/cli.py:10);_write_dataset (npidbench/data/synthetic/__init__.py:98);"
        "_write_dataset (npidbench/data/synthetic/__init__.py:99) 10\n"
        "\n"
    )
    top = load_benchmark("main_job_profile").top_costs(raw)
    # leaves: the line numbers are dropped so that one function's samples add up
    assert top["self"][0] == {"function": "_engine_run_backward (torch/autograd/graph.py)", "share": 0.6}
    assert [r["function"] for r in top["self"]][1:] == [
        "_conv_forward (torch/nn/modules/conv.py)",
        "_write_dataset (npidbench/data/synthetic/__init__.py)",
    ]
    # inclusive: npidbench's own functions, a frame seen twice on one stack counted once, the CLI left out
    inclusive = {r["function"]: r["share"] for r in top["inclusive"]}
    assert inclusive == {
        "run (npidbench/pretrain/train.py)": 0.9,
        "step (npidbench/pretrain/train.py)": 0.9,
        "_write_dataset (npidbench/data/synthetic/__init__.py)": 0.1,
    }


def test_a_failed_stage_stops_the_script_with_its_exit_status(tmp_path):
    module = load_benchmark("main_job_profile")
    with pytest.raises(SystemExit, match=r"stage bad failed \(exit 2\)"):
        module.run_stage("bad", ["run", "no-such-task", "missing.pth"], tmp_path, dict(os.environ), profile=False)
