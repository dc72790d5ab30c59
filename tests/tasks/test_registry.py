"""The registries of families, tables, presets and report formats: every entry is checked as
timm checks its model registry, and a plugin family registers through the entry-point group and
reaches `npidbench report` as a built-in one does."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import pytest

from npidbench.errors import BadInput
from npidbench.report import FORMATS, RENDERERS, build_tables, render
from npidbench.tables import TableSpec
from npidbench.tasks import BUILTIN_FAMILIES, families, load_preset, presets, register, tables
from npidbench.tasks.base import TaskFamily

from helpers import cli, one_error_line


@pytest.mark.parametrize("family", BUILTIN_FAMILIES, ids=lambda f: f.name)
def test_every_family_is_documented_and_valid(family: TaskFamily):
    module = sys.modules[family.run.__module__]
    doc = module.__doc__ or ""
    assert "PROTOCOLS.md" in doc or "PROTOCOLS-ARCH.md" in doc  # the protocol it implements, cited
    assert family.description and family.problems() == []
    family.config()  # every setting has a default


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_names_a_table_of_its_family(name):
    preset = presets()[name]
    family = families()[preset.family]
    assert preset.table in family.table_keys and preset.dataset in family.datasets


@pytest.mark.parametrize("key", list(tables()))
def test_every_table_has_a_default_protocol_that_a_preset_runs(key):
    spec = tables()[key]
    assert spec.default_protocol and spec.columns
    assert any(p.table == key for p in presets().values())


def _one_record_per_table() -> list[dict]:
    records = []
    for number, (key, spec) in enumerate(tables().items()):
        records.append(
            {
                "task": key,
                "family": next(f.name for f in families().values() if key in f.table_keys),
                "table": key,
                "protocol": spec.default_protocol,
                "dataset": {"name": "imagenet", "synthetic": True, "fingerprint": "f"},
                "model": {"name": "m", "sha256": f"{number:064d}", "config": "-"},
                "metrics": {},
                "seeds": [0],
            }
        )
    return records


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_renders_every_table(fmt):
    records = _one_record_per_table()
    text = render(build_tables(records), fmt, records)
    for spec in tables().values():
        assert spec.title in text
    assert set(FORMATS) == set(RENDERERS)


def test_a_family_declared_wrong_is_refused_with_what_is_wrong():
    @dataclasses.dataclass  # not frozen
    class Loose:
        x: int  # no default

    with pytest.raises(BadInput, match="config must be a frozen dataclass"):
        TaskFamily("loose", "d", Loose, lambda ctx, c: None, (tables()["knn"],), ("imagenet",))
    with pytest.raises(BadInput, match="datasets must name known datasets"):
        TaskFamily(
            "nodata", "d", families()["knn"].config, lambda ctx, c: None, (tables()["knn"],), ("mnist",)
        )


def test_a_second_family_of_one_name_or_table_is_bad_input():
    registry = dict(families())
    with pytest.raises(BadInput, match="registered twice"):
        register(registry, families()["knn"], "plugin")
    renamed = dataclasses.replace(families()["knn"], name="knn2")
    with pytest.raises(BadInput, match="table 'knn' of family 'knn2'"):
        register(registry, renamed, "plugin")


def test_a_preset_naming_a_table_its_family_lacks_is_refused(tmp_path):
    path = tmp_path / "wrong.toml"
    path.write_text('family = "knn"\ndescription = "d"\ntable = "linear"\ndataset = "imagenet"\n')
    with pytest.raises(BadInput, match="family knn fills no table 'linear'"):
        load_preset(path)


@pytest.mark.parametrize("value", ["-3", "0", '"fast"', "true"])
def test_a_preset_with_a_bad_reference_time_is_refused(tmp_path, value):
    path = tmp_path / "timed.toml"
    path.write_text(
        f'family = "knn"\ndescription = "d"\ntable = "knn"\ndataset = "imagenet"\nsynthetic_seconds = {value}\n'
    )
    with pytest.raises(BadInput, match="synthetic_seconds must be a positive number of seconds"):
        load_preset(path)
    path.write_text(path.read_text().replace(f"synthetic_seconds = {value}", "synthetic_seconds = 42"))
    assert load_preset(path).synthetic_seconds == 42.0


def test_a_synthetic_protocol_table_must_name_a_protocol_of_its_family(tmp_path):
    path = tmp_path / "probe.toml"
    head = 'family = "linear"\ndescription = "d"\ntable = "linear"\ndataset = "imagenet"\n'
    path.write_text(head + "[synthetic_protocol.cahced]\navgpool_lr = 0.3\n")  # a typo never applies
    with pytest.raises(
        BadInput,
        match=r"\[synthetic_protocol.cahced\] names no protocol of family linear; choose from augmented, cached",
    ):
        load_preset(path)
    path.write_text(head + "[synthetic_protocol.cached]\navgpool_lr = 0.3\n")
    assert load_preset(path).synthetic_protocol == {"cached": {"avgpool_lr": 0.3}}
    knn = tmp_path / "knn.toml"
    knn.write_text(
        'family = "knn"\ndescription = "d"\ntable = "knn"\ndataset = "imagenet"\n[synthetic_protocol.cached]\nk = 1\n'
    )
    with pytest.raises(BadInput, match="none .it has no protocol_keys."):
        load_preset(knn)


# A plugin family as a third-party package would ship it: a module exporting FAMILY, its preset
# TOML beside it, and an entry point of the group npidbench.tasks in its dist-info.
_TOY_MODULE = '''
"""A toy family: counts the training images of a split (PROTOCOLS.md has no such protocol)."""

from dataclasses import dataclass
from pathlib import Path

from npidbench.data import load_split
from npidbench.tables import TableSpec
from npidbench.tasks.base import TaskFamily, TaskOutput, split_record


@dataclass(frozen=True)
class Config:
    scale: float = 1.0


def run(ctx, config):
    train = load_split(ctx.preset.dataset, "train", ctx.data_root)
    test = load_split(ctx.preset.dataset, "val", ctx.data_root)
    return TaskOutput(
        metrics={"score": config.scale * len(train) + ctx.model.model.conv1.weight.shape[0]},
        dataset=split_record(ctx.preset.dataset, train, test),
        protocol="toy-count",
    )


TABLE = TableSpec(
    key="toy",
    title="Toy Count",
    columns=("Score",),
    values=lambda record: {"Score": record["metrics"].get("score")},
    default_protocol="toy-count",
)
FAMILY = TaskFamily(
    name="toy",
    description="Counts training images (a plugin example)",
    config=Config,
    run=run,
    tables=(TABLE,),
    datasets=("imagenet",),
    preset_files=(Path(__file__).with_name("toy-count.toml"),),
)
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_family.py").write_text(textwrap.dedent(_TOY_MODULE))
    (site / "toy-count.toml").write_text(
        'family = "toy"\ndescription = "Toy count on ImageNet"\ntable = "toy"\ndataset = "imagenet"\n'
        "in_all = false\n\n[config]\nscale = 2.0\n"
    )
    info = site / "npidbench_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: npidbench-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[npidbench.tasks]\ntoy = toy_family:FAMILY\n")
    monkeypatch.syspath_prepend(str(site))
    for cached in (families, presets):
        cached.cache_clear()
    yield site
    sys.modules.pop("toy_family", None)
    monkeypatch.undo()
    for cached in (families, presets):
        cached.cache_clear()


def test_a_plugin_family_registers_runs_and_appears_in_report(
    toy_plugin, random_checkpoint, results_dir, capsys
):
    assert "toy" in families() and "toy" in tables() and "toy-count" in presets()
    assert cli("list", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["tasks"]["toy-count"]["family"] == "toy"
    assert cli("run", "toy-count", str(random_checkpoint)) == 0
    record = json.loads(next(results_dir.glob("*toy-count*.json")).read_text())
    assert record["table"] == "toy" and record["protocol"] == "toy-count"
    capsys.readouterr()
    assert cli("report", "--format", "markdown") == 0
    report = capsys.readouterr().out
    assert "### ImageNet Toy Count (synthetic data)" in report
    expected = 2.0 * record["dataset"]["train"]["images"] + 64  # resnet18's conv1 has 64 filters
    assert f"{expected:.2f}" in report


def test_a_plugin_that_clashes_with_a_builtin_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    info = site / "npidbench_clash-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: npidbench-clash\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[npidbench.tasks]\nknn = npidbench.tasks.knn:FAMILY\n")
    monkeypatch.syspath_prepend(str(site))
    families.cache_clear()
    presets.cache_clear()
    try:
        assert cli("list") == 2
        assert "task family 'knn' is registered twice" in one_error_line(capsys.readouterr().err)
    finally:
        monkeypatch.undo()
        families.cache_clear()
        presets.cache_clear()


def test_table_specs_are_frozen_declarations():
    spec = tables()["knn"]
    assert isinstance(spec, TableSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.title = "x"  # type: ignore[misc]


def _literal_fields(config: type) -> list[str]:
    import typing

    hints = typing.get_type_hints(config)
    return [
        f.name
        for f in dataclasses.fields(config)
        if typing.get_origin(hints[f.name]) is typing.Literal
        or (
            typing.get_origin(hints[f.name]) is tuple
            and typing.get_origin(typing.get_args(hints[f.name])[0]) is typing.Literal
        )
    ]


@pytest.mark.parametrize("family", BUILTIN_FAMILIES, ids=lambda f: f.name)
def test_named_choices_are_literals_checked_also_when_built_in_python(family: TaskFamily):
    fields = _literal_fields(family.config)
    assert fields, "named choices are Literal fields"
    for name in fields:
        default = getattr(family.config(), name)
        bogus = ("no-such-choice",) if isinstance(default, tuple) else "no-such-choice"
        with pytest.raises(ValueError, match=f"{name}='no-such-choice' is not one of"):
            family.config(**{name: bogus})
