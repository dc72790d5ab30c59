"""The package: presets reach a non-editable install, the registry is consistent, CI = README."""

from __future__ import annotations

import re
import shutil
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
    assert family.description and preset.description
    from npidbench.config import build_config

    build_config(family.config, preset.config)
    build_config(family.config, preset.config, preset.synthetic)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0


def test_wheel_ships_presets_and_works_without_the_checkout(tmp_path):
    pytest.importorskip("setuptools")
    # Build from a copy of the tracked files: a build/ folder left in the checkout by an earlier
    # build would otherwise leak stale modules into the wheel (as on a fresh clone it would not).
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
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
            str(source),
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
    subsets = ("1percent.txt.xz", "10percent.txt.xz", "LICENSE-simclr", "SOURCE.md")
    assert {f"npidbench/data/subsets/{name}" for name in subsets} <= set(names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = (
        "import npidbench.tasks as t, npidbench.paths as p; "
        "print(p.preset_dir('tasks')); print(sorted(t.presets()))"
    )
    # -S: no site processing, so the editable install's import hook cannot serve the checkout;
    # the dependencies come from site-packages placed after the unpacked wheel.
    import sysconfig

    paths = [str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    run = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin"},
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


def test_every_package_folder_is_listed_for_the_wheel():
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "npidbench").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
