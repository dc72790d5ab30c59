"""The CLI contract: run knn end to end, cache hit, report, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npidbench.backbones.resnet import MultiLayerFeatures

from helpers import cli, one_error_line

KNN_HEADER = "| Model | Config | k=10 | k=20 | k=100 | k=200 |"


def test_list_shows_the_knn_task(capsys):
    assert cli("list") == 0
    out = capsys.readouterr().out
    assert "knn" in out and "imagenet" in out
    assert cli("list", "--json") == 0
    assert "knn" in json.loads(capsys.readouterr().out)["tasks"]


def test_run_knn_then_cache_hit_then_report(random_checkpoint, results_dir, capsys, monkeypatch):
    monkeypatch.delenv("NPIDBENCH_QUIET")
    assert cli("run", "knn", str(random_checkpoint), "--name", "rand") == 0
    captured = capsys.readouterr()
    record_path = Path(captured.out.strip().splitlines()[-1])
    assert record_path.parent == results_dir and record_path.exists()
    record = json.loads(record_path.read_text())
    assert record["dataset"]["synthetic"] and record["table"] == "knn"
    assert record["model"]["checkpoint"]["format"] == "npidbench"
    top1 = record["metrics"]["top1"]
    assert set(top1) == {"10", "20", "100", "200"} and all(0 <= v <= 100 for v in top1.values())
    assert top1["20"] > 100 / record["dataset"]["classes"]  # random features beat chance here

    def no_forward(*args, **kwargs):
        raise AssertionError("forward pass on a cache hit")

    monkeypatch.setattr(MultiLayerFeatures, "forward", no_forward)
    assert cli("run", "knn", str(random_checkpoint), "--name", "rand") == 0
    captured = capsys.readouterr()
    assert captured.err.count("cache hit") == 2
    second = json.loads(Path(captured.out.strip().splitlines()[-1]).read_text())
    assert second["metrics"] == record["metrics"] and second["timings"]["cache_hit"]

    assert cli("report", "--format", "markdown") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "### ImageNet kNN (synthetic data)"
    header = "| " + " | ".join(c.strip() for c in lines[2].strip().strip("|").split("|")) + " |"
    assert header == KNN_HEADER
    assert len([line for line in lines if line.startswith("| rand")]) == 1  # same seed: one row


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    return path


BAD_INPUTS = [
    (["run", "knn", "{missing}"], "checkpoint not found"),
    (["run", "knn", "{text}"], "text file"),
    (["run", "knn", "{ckpt}", "--set", "bogus=1"], "unknown setting 'bogus'"),
    (["run", "knn", "{ckpt}", "--set", "ks=abc"], "not an integer"),
    (["run", "knn", "{ckpt}", "--set", "noequals"], "not key=value"),
    (["run", "knn", "{ckpt}", "--device", "tpu"], "--device tpu"),
    (["run", "knn", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["run", "knn", "{ckpt}", "--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["run", "all", "{ckpt}", "--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["run", "all", "{ckpt}", "--workers", "-1"], "--workers must be 0 or more"),
    (["report", "--format", "docx", "--results", "{missing}"], "--format docx"),
    (["run", "knn", "{ckpt}", "--eval-batch-size", "8", "--batch-size", "8"], "give --eval-batch-size only"),
    (["run", "knn", "{ckpt}", "--data-root", "{missing}"], "is not a folder"),
    (["run", "knn", "{ckpt}", "--data-root", "{tmp}"], "imagenet not found under --data-root"),
    (["run", "knn", "{ckpt}", "--arch", "resnet50"], "--arch resnet50 was asked"),
    (["run", "knn", "{ckpt}", "--arch", "vgg16"], "--arch vgg16 is not supported"),
    (["run", "knn", "{ckpt}", "--branch", "teacher"], "--branch teacher is not in"),
    (["run", "knn"], "exactly one of CKPT and --features-dir"),
    (["run", "knn", "{ckpt}", "--features-dir", "{tmp}"], "exactly one of"),
    (["run", "nosuchtask", "{ckpt}"], "unknown task 'nosuchtask'"),
    (["run", "knn", "{ckpt}", "--bogus"], "No such option"),
    (["run", "knn", "{ckpt}", "--workers", "many"], "Invalid value for '--workers'"),
    (["nosuchcommand"], "No such command"),
    (["inspect", "{text}"], "text file"),
    (["convert", "{ckpt}", "--to", "onnx", "--out", "{tmp}/x.pth"], "--to onnx is not supported"),
    (["convert", "{ckpt}", "--to", "torchvision", "--out", "{ckpt}"], "already exists"),
    (["report", "--format", "docx"], "--format docx"),
    (["report", "--results", "{tmp}"], "no records to report"),
    (["report", "--results", "{missing}"], "is not a folder"),
    (["pretrain", "--set", "arch=vgg"], "arch vgg is not supported"),
    (["pretrain", "no_such_recipe"], "unknown recipe"),
    (["data", "check", "imagenet", "--root", "{tmp}"], "train not found: expected imagenet"),
    (["data", "check", "imagenet", "--root", "{missing}"], "is not a folder"),
    (["data", "check", "mnist", "--root", "{tmp}"], "unknown dataset mnist"),
    (["data", "synth", "--root", "{ckpt}"], "already exists"),
    (["run", "knn", "{ckpt}", "--results", "{text}"], "is a file"),
    (["run", "knn", "{ckpt}", "--cache", "{text}"], "is a file"),
    (["run", "knn", "{ckpt}", "--set", "temperature=nan"], "not a finite number"),
    (["convert", "{ckpt}", "--to", "torchvision", "--out", "{tmp}", "--force"], "is a folder"),
    (["cache", "clear", "--checkpoint", ""], "needs a sha256 prefix"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_record(
    argv, message, random_checkpoint, text_file, tmp_path, results_dir, capsys
):
    values = {
        "missing": str(tmp_path / "missing.pth"),
        "text": str(text_file),
        "ckpt": str(random_checkpoint),
        "tmp": str(tmp_path),
    }
    args = [a.format(**values) for a in argv]
    assert cli(*args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line
    assert not results_dir.exists() or not list(results_dir.iterdir())


def test_inspect_json_contract(random_checkpoint, tmp_path, capsys):
    assert cli("inspect", str(random_checkpoint), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("format", "arch", "loaded", "missing", "ignored", "sha256", "branch"):
        assert key in info
    assert info["format"] == "npidbench" and info["arch"] == "resnet18" and not info["missing"]
    state = torch.load(random_checkpoint, weights_only=True)
    del state["state_dict"]["layer4.1.conv2.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    assert cli("inspect", str(broken), "--json") == 2
    assert json.loads(capsys.readouterr().out)["missing"] == ["layer4.1.conv2.weight"]
    assert cli("inspect", str(broken)) == 2
    assert "layer4.1.conv2.weight" in one_error_line(capsys.readouterr().err)


def test_convert_writes_a_plain_state_dict(random_checkpoint, tmp_path, capsys):
    out = tmp_path / "tv.pth"
    assert cli("convert", str(random_checkpoint), "--to", "torchvision", "--out", str(out)) == 0
    assert capsys.readouterr().out.strip() == str(out)
    state = torch.load(out, weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)


def test_pretrain_epochs_0_writes_a_random_init_checkpoint(tmp_path, capsys):
    assert cli("pretrain", "--set", "epochs=0", "--set", "seed=3", "--out", str(tmp_path / "run")) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "run" / "last.pth"
    checkpoint = torch.load(path, weights_only=True)  # plain types only: no npidbench needed
    assert checkpoint["format"] == "npidbench" and checkpoint["arch"] == "resnet18"
    assert checkpoint["meta"]["epochs"] == 0 and checkpoint["meta"]["seed"] == 3


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "npidbench.cli", "run", "knn", str(tmp_path / "x.pth")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith("error: checkpoint not found")


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "npidbench.cli", "--debug", "inspect", str(tmp_path / "x.pth")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_cache_ls_and_clear(random_checkpoint, results_dir, tmp_path, capsys):
    from helpers import tiny_imagefolder

    cache, root = tmp_path / "cache", tmp_path / "data"
    tiny_imagefolder(root / "imagenet", classes=2, per_class=4, split="train")
    tiny_imagefolder(root / "imagenet", classes=2, per_class=2, split="val", seed=1)
    small = ["--set", "ks=[5]", "--set", "resize=40", "--set", "crop=32"]
    assert (
        cli("run", "knn", str(random_checkpoint), "--cache", str(cache), "--data-root", str(root), *small)
        == 0
    )
    capsys.readouterr()
    assert cli("cache", "ls", "--cache", str(cache), "--json") == 0
    entries = json.loads(capsys.readouterr().out)
    assert {(e["key"]["split"], e["key"]["layer"]) for e in entries} == {
        ("train", "AvgPool"),
        ("val", "AvgPool"),
    }
    assert cli("cache", "ls", "--cache", str(cache)) == 0
    assert "AvgPool" in capsys.readouterr().out
    assert cli("cache", "clear", "--cache", str(cache), "--checkpoint", "ffff") == 0
    assert "removed 0 entries" in capsys.readouterr().out
    sha = entries[0]["key"]["checkpoint_sha256"]
    assert cli("cache", "clear", "--cache", str(cache), "--checkpoint", sha[:10]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert cli("cache", "ls", "--cache", str(cache), "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_run_with_skip_corrupt_lists_the_skipped_images(random_checkpoint, results_dir, tmp_path, capsys):
    from helpers import tiny_imagefolder

    root = tmp_path / "data"
    tiny_imagefolder(root / "imagenet", split="train")
    tiny_imagefolder(root / "imagenet", split="val", seed=1)
    bad = sorted((root / "imagenet" / "val" / "c1").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:100])
    args = ["run", "knn", str(random_checkpoint), "--data-root", str(root), "--set", "ks=[3]"]
    assert cli(*args) == 2
    assert str(bad) in one_error_line(capsys.readouterr().err)
    assert cli(*args, "--skip-corrupt") == 0
    record = json.loads(Path(capsys.readouterr().out.strip()).read_text())
    assert record["dataset"]["skipped"] == [str(bad)] and not record["dataset"]["synthetic"]


def test_version_and_broken_record_files(tmp_path, capsys):
    assert cli("--version") == 0
    assert capsys.readouterr().out.startswith("npidbench ")
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "partial.json").write_text('{"schema": 1}')
    assert cli("report", "--results", str(folder)) == 2
    err = capsys.readouterr().err
    assert "not an npidbench record" in err and "no records to report" in err and "Traceback" not in err


def test_batch_size_is_the_old_name_of_eval_batch_size(monkeypatch, random_checkpoint, capsys):
    import npidbench.runner

    seen = []
    monkeypatch.setattr(npidbench.runner, "run_task", lambda request: seen.append(request) or None)
    assert cli("run", "knn", str(random_checkpoint), "--batch-size", "8") == 0
    assert "--batch-size is now --eval-batch-size" in capsys.readouterr().err
    assert cli("run", "knn", str(random_checkpoint), "--eval-batch-size", "16") == 0
    assert capsys.readouterr().err == ""
    assert [r.eval_batch_size for r in seen] == [8, 16]
    assert cli("run", "--help") == 0
    shown = capsys.readouterr().out
    assert "--eval-batch-size" in shown and "--batch-size " not in shown  # the old name is hidden


def test_debug_after_the_command_is_a_value_not_the_traceback_switch(tmp_path, capsys):
    """Found by tests/test_fuzz.py: `--set --debug` printed a traceback instead of one line."""
    from helpers import cli, one_error_line

    assert cli("run", "knn", str(tmp_path / "missing.pth"), "--set", "--debug") == 2
    assert "--set '--debug' is not key=value" in one_error_line(capsys.readouterr().err)
