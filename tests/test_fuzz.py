"""Fuzzing the CLI's arguments and --set values (hypothesis): every bad input ends with exit
code 2 and one line on stderr, never a traceback.

`run` gets a checkpoint that does not exist, so an input that happens to be valid still ends at
the checkpoint (exit 2) and no benchmark starts: every example is a bad input, and what is tested
is that the settings, the task name and the options are checked with one clear line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npidbench.cli import main
from npidbench.tasks import families, presets

KEYS = sorted({f.name for family in families().values() for f in dataclasses.fields(family.config)})
TASKS = sorted(presets())

scalar = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans().map(str),
    st.text(max_size=12),
    st.sampled_from(
        ["none", "[]", "[1,2", "[a,b]", "1e999", "-0", "0x10", "Feature9", "nan", "inf", "=", ""]
    ),
)
value = st.one_of(
    scalar.map(str), st.lists(scalar.map(str), max_size=4).map(lambda items: "[" + ",".join(items) + "]")
)
set_option = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), value),
    st.text(max_size=20),  # no "=", unknown keys, empty
)


def _run_cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        pytest.raises(SystemExit) as exit_info,
    ):
        main(args)
    return exit_info.value.code, err.getvalue()


def _assert_one_line_exit_2(args: list[str]) -> None:
    code, err = _run_cli(args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (args, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), (args, err[-2000:])
    assert "Traceback" not in err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task=st.one_of(st.sampled_from([*TASKS, "all"]), st.text(max_size=15)),
    options=st.lists(set_option, min_size=1, max_size=4),
    device=st.sampled_from([None, "cpu", "cuda:x", "tpu", ""]),
    batch=st.one_of(st.none(), st.integers(min_value=-5, max_value=5).map(str), st.text(max_size=4)),
)
def test_run_with_bad_settings_exits_2_with_one_line(tmp_path_factory, task, options, device, batch):
    home = tmp_path_factory.getbasetemp()
    args = ["run", task, str(home / "missing.pth"), "--results", str(home / "fuzz-results")]
    for option in options:
        args += ["--set", option]
    if device is not None:
        args += ["--device", device]
    if batch is not None:
        args += ["--eval-batch-size", batch]
    _assert_one_line_exit_2(args)
    assert not list((home / "fuzz-results").glob("*.json"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(["report", "convert", "inspect", "data"]),
    word=st.text(min_size=1, max_size=12).filter(lambda w: not w.startswith("-") and w.strip() == w and w),
)
def test_other_commands_with_bad_input_exit_2(tmp_path_factory, command, word):
    home = Path(tmp_path_factory.getbasetemp())
    if command == "report":
        if word in ("markdown", "csv", "json", "latex", "html"):
            return
        args = ["report", "--results", str(home / "fuzz-empty"), "--format", word]
    elif command == "convert":
        args = ["convert", str(home / "missing.pth"), "--to", word, "--out", str(home / "out.pth")]
    elif command == "inspect":
        args = ["inspect", str(home / f"missing-{word}.pth")]
    else:
        args = ["data", "check", f"no-such-{word}", "--root", str(home)]
    _assert_one_line_exit_2(args)
