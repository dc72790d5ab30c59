"""ViT and ConvNeXt checkpoints on the frozen-feature benchmarks, end to end on the embedded
data: kNN on the backbone's global feature, the VOC07 SVM on its multi-layer features (named in
the record as no published protocol), the other families refused in one line, `run all`
skipping them with the reason, and their rows in the report."""

from __future__ import annotations

import json
import re

import pytest
import torch

from npidbench.backbones.convnext import ConvNeXtSpec, build_convnext
from npidbench.backbones.vit import ViTSpec, build_vit

from helpers import cli, one_error_line

pytest.importorskip("timm")

TINY_VIT = ViTSpec(depth=4, embed_dim=192, num_heads=3, patch_size=8, img_size=56)
TINY_CONVNEXT = ConvNeXtSpec((1, 1, 2, 1), (16, 32, 48, 64))


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "dino_vit_tiny.pth"
    torch.save(build_vit(TINY_VIT).state_dict(), path)  # DINO's released layout: a bare timm state dict
    return path


@pytest.fixture(scope="module")
def convnext_file(tmp_path_factory):
    torch.manual_seed(0)
    state = build_convnext(TINY_CONVNEXT).state_dict()
    path = tmp_path_factory.mktemp("convnext") / "convnext_tiny_ssl.pth"
    torch.save({"model": state, "epoch": 3}, path)
    return path


def _record(results, task: str) -> dict:
    return json.loads(next(results.glob(f"*_{task}_*.json")).read_text())


@pytest.mark.parametrize("task", ["linear-imagenet", "semisup-imagenet-1pct", "det-voc0712", "seg-voc12aug"])
def test_vit_on_a_family_it_does_not_run_is_one_line_exit_2(vit_file, results_dir, capsys, task):
    assert cli("run", task, str(vit_file)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(r"does not run on vit backbones \(vit_tiny_patch8_56\) yet; it runs on: resnet", line)
    assert not results_dir.exists() or not list(results_dir.glob("*.json"))


def test_run_all_on_a_vit_runs_what_it_supports_and_skips_the_rest(vit_file, results_dir, capsys):
    assert cli("run", "all", str(vit_file)) == 0
    ran = {json.loads(p.read_text())["task"] for p in results_dir.glob("*.json")}
    assert ran == {"knn", "voc-svm"}
    knn = _record(results_dir, "knn")  # kNN on the CLS token
    assert knn["details"]["layer"] == "CLS" and knn["details"]["interpolation"] == "bicubic"
    assert knn["model"]["checkpoint"]["arch"] == TINY_VIT.name
    assert set(knn["metrics"]["top1"]) == {"10", "20", "100", "200"}
    # The SVM on four blocks (the record names them, as no published protocol exists)
    record = _record(results_dir, "voc-svm")
    assert list(record["metrics"]["layers"]) == ["Block1", "Block2", "Block3", "Block4"]
    assert record["metrics"]["best_layer"] in record["metrics"]["layers"]
    assert record["metrics"]["lowshot"]["layer"] == record["metrics"]["best_layer"]
    assert "no published VOC07 SVM protocol for vit" in record["details"]["protocol_note"]
    assert record["details"]["layers"] == ["Block1", "Block2", "Block3", "Block4"]
    err = capsys.readouterr().err
    assert "skipped" in err and "does not run on vit" in err
    assert cli("report") == 0
    report = capsys.readouterr().out
    assert "### ImageNet kNN (synthetic data)" in report and "dino_vit_tiny" in report
    assert "### VOC07 SVM / Low-shot SVM (synthetic data)" in report


def test_convnext_knn_reads_the_head_normed_average(convnext_file, results_dir):
    assert cli("run", "knn", str(convnext_file)) == 0
    record = _record(results_dir, "knn")
    assert record["details"]["layer"] == "AvgPool" and record["details"]["interpolation"] == "bicubic"
    assert record["model"]["checkpoint"]["arch"] == TINY_CONVNEXT.name
