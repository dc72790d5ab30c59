"""Precision is part of the protocol: bf16 autocast only on CUDA with amp, named in records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from npidbench.precision import BF16, FP32, autocast, precision_name
from npidbench.runner import RunRequest, resolve_config, run_task
from npidbench.tasks import get_preset


def test_the_precision_is_bf16_only_on_cuda_with_amp():
    assert precision_name("cuda", True) == BF16
    assert precision_name("cuda:1", False) == precision_name("cpu", True) == FP32
    with autocast("cpu", True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("task", ["linear-imagenet", "semisup-imagenet-1pct", "seg-voc12aug"])
def test_amp_false_is_a_setting_of_every_family_with_a_bf16_path(task):
    assert resolve_config(get_preset(task), True, ["amp=false"]).amp is False
    assert resolve_config(get_preset(task), True, []).amp is True


@pytest.mark.gpu
def test_amp_runs_bf16_on_cuda_and_amp_false_fp32(random_checkpoint, tmp_path):
    for amp, expected in (("true", BF16), ("false", FP32)):
        path = run_task(
            RunRequest(
                task="linear-imagenet",
                checkpoint=random_checkpoint,
                set_options=["parts=[avgpool]", "avgpool_epochs=1", "avgpool_milestones=[]", f"amp={amp}"],
                results=tmp_path / "results",
                device="cuda",
            )
        )
        assert json.loads(Path(path).read_text())["details"]["precision"] == expected
