"""`npidbench run all`: what runs, what is skipped and why, a failure does not stop the rest."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from npidbench import suite
from npidbench.cli import main
from npidbench.errors import BadInput, RunFailed
from npidbench.runner import RunRequest

from helpers import tiny_imagefolder


def test_suite_runs_each_protocol_once():
    names = [p.name for p in suite.suite_presets()]
    assert "voc-svm" in names and "voc-svm-full" not in names and "voc-lowshot" not in names
    assert "det-coco" in names and "det-coco-c4" not in names
    assert {"knn", "linear-imagenet", "semisup-imagenet-1pct", "seg-cityscapes", "det-voc0712"} <= set(names)


def test_skips_missing_data_and_survives_a_failure(tmp_path, monkeypatch, capsys):
    tiny_imagefolder(tmp_path / "data" / "imagenet", split="train")
    tiny_imagefolder(tmp_path / "data" / "imagenet", split="val")
    calls = []

    def fake_run_task(request: RunRequest, backbone=None):
        calls.append(request.task)
        if request.task == "linear-imagenet":
            raise RunFailed("the loss became nan in epoch 3")
        if request.task == "semisup-imagenet-1pct":
            raise ValueError("something unexpected")
        return tmp_path / f"{request.task}.json"

    monkeypatch.setattr(suite, "run_task", fake_run_task)
    monkeypatch.setattr(suite, "load_backbone", lambda *args, **kwargs: None)
    checkpoint = tmp_path / "ckpt.pth"
    checkpoint.write_bytes(b"x")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "run",
                "all",
                str(checkpoint),
                "--data-root",
                str(tmp_path / "data"),
                "--results",
                str(tmp_path / "r"),
            ]
        )
    assert exit_info.value.code == 1
    imagenet_tasks = [p.name for p in suite.suite_presets() if p.dataset == "imagenet"]
    assert calls == imagenet_tasks  # the others were skipped: their data is absent
    out, err = capsys.readouterr()
    printed = out.split()
    assert printed == [
        str(tmp_path / f"{t}.json")
        for t in imagenet_tasks
        if t not in ("linear-imagenet", "semisup-imagenet-1pct")
    ]
    assert "skipped" in err and "failed" in err and "2 of" in err
    assert "voc07 not found under --data-root" in " ".join(err.split())


def test_run_all_refuses_set_options_and_needs_a_checkpoint(tmp_path):
    with pytest.raises(BadInput, match="no --set"):
        suite.run_all(RunRequest(task="all", checkpoint=tmp_path / "c.pth", set_options=["epochs=1"]))
    with pytest.raises(BadInput, match="needs a checkpoint"):
        suite.run_all(RunRequest(task="all"))


def test_a_wrong_checkpoint_is_one_bad_input_not_a_failure_per_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "all", str(tmp_path / "nope.pth"), "--results", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "not found" in err


def test_missing_data_names_the_dataset(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2007").mkdir(parents=True)
    det = next(p for p in suite.suite_presets() if p.name == "det-voc0712")
    reason = suite.missing_data(det, tmp_path)
    assert reason is not None and "voc12" in reason
    assert suite.missing_data(det, None) is None


def test_run_all_loads_the_checkpoint_once_and_gives_each_task_a_fresh_copy(
    tmp_path, monkeypatch, random_checkpoint
):
    tiny_imagefolder(tmp_path / "data" / "imagenet", split="train")
    tiny_imagefolder(tmp_path / "data" / "imagenet", split="val")
    loads, given = [], []
    real_load = suite.load_backbone

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    def fake_run_task(request: RunRequest, backbone=None):
        given.append(float(backbone.model.conv1.weight.detach().abs().sum()))  # what the task starts from
        backbone.model.conv1.weight.data.zero_()  # a task changing its network in place
        return tmp_path / f"{request.task}.json"

    monkeypatch.setattr(suite, "load_backbone", counting_load)
    monkeypatch.setattr(suite, "run_task", fake_run_task)
    result = suite.run_all(RunRequest(task="all", checkpoint=random_checkpoint, data_root=tmp_path / "data"))
    assert len(loads) == 1 and len(given) == len([o for o in result.outcomes if o.status == "ran"]) > 1
    # each task starts from the checkpoint's weights, not from what the previous task left
    assert given == [float(real_load(random_checkpoint).model.conv1.weight.detach().abs().sum())] * len(given)
    assert given[0] > 0


def test_the_clock_scales_the_reference_seconds_by_this_machines_pace():
    clock = suite.SuiteClock({"a": 10.0, "b": 20.0, "c": 30.0})
    assert clock.remaining(["a", "b", "c"]) == 60.0  # no task finished: the reference machine's
    clock.finished("a", 25.0)  # this machine took 2.5x the reference
    assert clock.remaining(["b", "c"]) == pytest.approx(125.0)
    clock.finished("b", 30.0)  # 55 s for 30 reference seconds
    assert clock.remaining(["c"]) == pytest.approx(55.0)
    assert suite.SuiteClock({"a": 10.0, "d": None}).remaining(["a", "d"]) is None


def test_the_progress_line_names_the_task_the_time_so_far_and_the_time_left():
    assert suite.progress_line(3, 15, "knn", 65.4, 250.0) == "[3/15] knn (1:05 so far, about 4 min left)"
    assert suite.progress_line(15, 15, "voc-svm", 600.0, 20.0) == "[15/15] voc-svm (10:00 so far, under a minute left)"
    assert suite.progress_line(1, 2, "knn", 0.0, None) == "[1/2] knn (0:00 so far)"


def test_run_all_on_the_embedded_data_prints_the_remaining_time_per_task(tmp_path, monkeypatch, capsys):
    """Every preset of the ResNet suite has reference seconds; each task takes twice its reference
    here (a fake clock), so from the second task on the estimate is twice the references left."""
    chosen = suite.suite_presets()
    assert all(p.synthetic_seconds for p in chosen), [p.name for p in chosen if not p.synthetic_seconds]
    now = {"t": 0.0}
    monkeypatch.setattr(suite, "time", SimpleNamespace(perf_counter=lambda: now["t"]))

    def fake_run_task(request: RunRequest, backbone=None):
        now["t"] += 2 * suite.presets()[request.task].synthetic_seconds
        return tmp_path / f"{request.task}.json"

    monkeypatch.setattr(suite, "run_task", fake_run_task)
    monkeypatch.setattr(suite, "load_backbone", lambda *args, **kwargs: None)
    monkeypatch.setenv("NPIDBENCH_QUIET", "0")
    result = suite.run_all(RunRequest(task="all", checkpoint=tmp_path / "c.pth"))
    assert [o.status for o in result.outcomes] == ["ran"] * len(chosen)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(lines) == len(chosen)
    reference = [p.synthetic_seconds for p in chosen]
    first_left = sum(reference)  # the reference machine's pace before anything ran
    assert lines[0] == suite.progress_line(1, len(chosen), chosen[0].name, 0.0, first_left)
    for n in range(1, len(chosen)):
        expected = suite.progress_line(n + 1, len(chosen), chosen[n].name, 2 * sum(reference[:n]), 2 * sum(reference[n:]))
        assert lines[n] == expected
