"""The package: presets reach a non-editable install, the registry is consistent, CI = README."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from npidbench.cli import main
from npidbench.tasks import families, presets

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(presets()))
def test_every_preset_loads_and_has_help(name, capsys):
    preset = presets()[name]
    family = families()[preset.family]
    assert family.__doc__ and family.DESCRIPTION and preset.description
    from npidbench.config import build_config

    build_config(family.Config, preset.config)
    build_config(family.Config, preset.config, preset.synthetic)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0


def test_wheel_ships_presets_and_works_without_the_checkout(tmp_path):
    pytest.importorskip("setuptools")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("npidbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "npidbench/presets/tasks/knn.toml" in names
    assert any(n.startswith("npidbench/presets/pretrain/") for n in names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = (
        "import npidbench.tasks as t, npidbench.paths as p; "
        "print(p.preset_dir('tasks')); print(sorted(t.presets()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    preset_folder, names_line = run.stdout.strip().splitlines()
    assert preset_folder.startswith(str(target)) and "knn" in names_line


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"### Run the tests\s+```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert match, "README needs a '### Run the tests' section with one fenced command"
    command = match.group(1).strip()
    assert command in (REPO / ".ci" / "run").read_text()
